"""Attacks that used to destroy or falsify a user's data with exit code 0 (issue 19, critical cases): each test
builds its bad input, runs the command line in this process, and checks exit code 2, that nothing partial is
left and that nothing that existed before changed."""

from __future__ import annotations

import gzip
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from tiny import make_bundle

from MedKDSegmentLib.engine import bundle as bundle_module
from MedKDSegmentLib.engine import volume as volume_module
from MedKDSegmentLib.engine.cli import EXIT_ERROR, main
from MedKDSegmentLib.engine.errors import InvalidInputError
from MedKDSegmentLib.engine.phantom import generate_phantom
from MedKDSegmentLib.engine.volume import read_volume, write_volume


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("models") / "tiny-student").path


@pytest.fixture
def scan(tmp_path) -> Path:
    image, _ = generate_phantom("CT", 5, size=(40, 36, 24), spacing=(8.0, 8.0, 8.0))
    return write_volume(image, tmp_path / "scan.nii.gz")


def segment(model: Path, source: Path, output: Path, *extra: str) -> int:
    return main(["--quiet", "segment", "--model", str(model), "--input", str(source), "--output", str(output),
                 "--device", "cpu", *extra])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("output", ["scan.nii.gz", "scan", "scan.seg.nrrd", "link"])
def test_an_output_that_is_the_input_is_refused_and_the_scan_kept(model, scan, output, capsys):
    if output == "link":
        os.link(scan, scan.parent / "link.nii.gz")  # the same file under another name
    before = snapshot(scan.parent)
    assert segment(model, scan, scan.parent / output, "--overwrite") == EXIT_ERROR
    assert "would replace the input" in capsys.readouterr().err
    assert snapshot(scan.parent) == before


def test_an_output_inside_an_input_dicom_folder_is_refused(model, tmp_path, capsys):
    image, _ = generate_phantom("CT", 6, size=(24, 24, 6), spacing=(8.0, 8.0, 8.0))
    series = tmp_path / "series"
    series.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index in range(image.shape[0]):
        slice_image = sitk.Cast(image.to_sitk()[:, :, index], sitk.sitkInt16)
        slice_image.SetMetaData("0020|0013", str(index))
        slice_image.SetMetaData("0008|0060", "CT")
        writer.SetFileName(str(series / f"{index:03d}.dcm"))
        writer.Execute(slice_image)
    before = snapshot(series)
    assert segment(model, series, series / "labels") == EXIT_ERROR
    assert "inside the input folder" in capsys.readouterr().err and snapshot(series) == before


def test_an_existing_output_is_kept_unless_overwrite_is_given(model, scan, tmp_path, capsys):
    existing = tmp_path / "out.nii.gz"
    existing.write_bytes(b"someone's work")
    assert segment(model, scan, tmp_path / "out", "--format", "nifti") == EXIT_ERROR
    assert "--overwrite" in capsys.readouterr().err and existing.read_bytes() == b"someone's work"
    assert segment(model, scan, tmp_path / "out", "--format", "nifti", "--overwrite") == 0
    assert read_volume(existing).shape == read_volume(scan).shape


def test_a_write_that_comes_out_short_is_not_published(model, scan, tmp_path, monkeypatch, capsys):
    real = volume_module.sitk.WriteImage

    def full_disk(image, path, *args):  # what SimpleITK does on a full disk: a short file, no error
        real(image, path, *args)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(volume_module.sitk, "WriteImage", full_disk)
    before = snapshot(tmp_path)
    assert segment(model, scan, tmp_path / "out", "--format", "nifti") == EXIT_ERROR
    error = capsys.readouterr().err
    assert "came out incomplete" in error and "free on that disk" in error
    assert snapshot(tmp_path) == before  # neither the output nor a .partial- file
    with pytest.raises(InvalidInputError, match="came out incomplete"):
        write_volume(read_volume(scan), tmp_path / "direct.nii.gz")
    assert not (tmp_path / "direct.nii.gz").exists()


def _nifti_bytes(array: np.ndarray) -> bytes:
    """An uncompressed NIfTI file of ``array`` as SimpleITK writes it."""
    image = sitk.GetImageFromArray(array)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"medkd-attack-{os.getpid()}.nii"
    sitk.WriteImage(image, str(path))
    try:
        return path.read_bytes()
    finally:
        path.unlink()


@pytest.mark.parametrize("damage", ["gzip cut short", "complete gzip of half the data", "short .nii"])
def test_a_truncated_nifti_is_refused_not_zero_filled(model, tmp_path, damage, capsys):
    data = _nifti_bytes(np.random.default_rng(0).normal(0, 100, (24, 36, 40)).astype(np.float32))
    if damage == "gzip cut short":
        whole = gzip.compress(data)
        path, content = tmp_path / "scan.nii.gz", whole[: len(whole) * 2 // 3]
    elif damage == "complete gzip of half the data":
        path, content = tmp_path / "scan.nii.gz", gzip.compress(data[: len(data) // 2])
    else:
        path, content = tmp_path / "scan.nii", data[: len(data) - 4000]
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match="cut short or damaged"):
        read_volume(path)
    assert segment(model, path, tmp_path / "out") == EXIT_ERROR
    assert "cut short" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name] and path.read_bytes() == content


def test_an_uncompressed_nifti_named_nii_gz_is_read_by_content_and_a_short_one_still_refused(model, tmp_path):
    array = np.random.default_rng(1).normal(0, 100, (24, 36, 40)).astype(np.float32)
    plain = tmp_path / "plain.nii.gz"
    plain.write_bytes(_nifti_bytes(array))  # some tools write these; SimpleITK reads them by content
    assert np.array_equal(read_volume(plain).array, array)
    assert segment(model, plain, tmp_path / "out", "--modality", "CT") == 0
    short = tmp_path / "short.nii.gz"
    short.write_bytes(_nifti_bytes(array)[:-4000])
    with pytest.raises(InvalidInputError, match="cut short or damaged"):
        read_volume(short)


def test_series_given_for_a_file_is_refused_not_ignored(model, scan, tmp_path, capsys):
    assert segment(model, scan, tmp_path / "out", "--series", "1.2.3") == EXIT_ERROR
    assert "is a file, so --series 1.2.3 cannot apply" in capsys.readouterr().err
    assert not list(tmp_path.glob("out*"))


def test_nan_and_infinity_in_a_nifti_are_refused_not_read_as_zero(model, tmp_path, capsys):
    array = np.random.default_rng(1).normal(0, 100, (24, 36, 40)).astype(np.float32)
    array[10:12] = np.nan
    array[3, 4, 5] = np.inf
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(gzip.compress(_nifti_bytes(array)))
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        read_volume(path)
    assert segment(model, path, tmp_path / "out") == EXIT_ERROR
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]


@pytest.mark.parametrize("option, value", [("--epochs", "-3"), ("--epochs", "0"), ("--steps-per-epoch", "0"),
                                           ("--batch-size", "0"), ("--learning-rate", "0"),
                                           ("--spatial-augmentation", "2")])
def test_a_training_option_no_run_can_use_is_refused_before_anything_is_written(tmp_path, option, value, capsys):
    image, labels = generate_phantom("CT", 7, size=(32, 32, 16), spacing=(8.0, 8.0, 8.0))
    write_volume(image, tmp_path / "data" / "images" / "case.nii.gz")
    write_volume(labels, tmp_path / "data" / "labels" / "case.nii.gz")
    code = main(["--quiet", "train-teacher", "--modality", "CT", "--data", str(tmp_path / "data"), "--output",
                 str(tmp_path / "model"),
                 "--device", "cpu", option, value])
    assert code == EXIT_ERROR and "fix:" in capsys.readouterr().err
    assert not (tmp_path / "model").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_outputs_and_models_get_the_users_umask_not_private_modes(model, scan, tmp_path):
    previous = os.umask(0o022)
    try:
        assert segment(model, scan, tmp_path / "out") == 0
        shared = make_bundle(tmp_path / "shared-model").path
    finally:
        os.umask(previous)
    for path in (tmp_path / "out.nii.gz", tmp_path / "out.seg.nrrd"):
        assert path.stat().st_mode & 0o777 == 0o644, oct(path.stat().st_mode)
    assert shared.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("spacing", [60.0, 0.001])
def test_a_spacing_no_scan_has_is_refused_before_any_grid_is_allocated(model, tmp_path, spacing, capsys):
    image, _ = generate_phantom("CT", 8, size=(48, 48, 48), spacing=(8.0, 8.0, 8.0))
    image.spacing = (spacing, spacing, spacing)
    path = write_volume(image, tmp_path / "scan.nii.gz")
    assert segment(model, path, tmp_path / "out") == EXIT_ERROR
    assert "Check the voxel spacing" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]


def test_a_crash_leftover_and_a_broken_bundle_do_not_hide_the_good_models(tmp_path, capsys):
    good = make_bundle(tmp_path / "models" / "good").path
    leftover = tmp_path / "models" / ".partial-good-x1"  # what kill -9 during a bundle write leaves
    shutil.copytree(good, leftover)
    broken = tmp_path / "models" / "broken"
    shutil.copytree(good, broken)
    (broken / "configs" / "metadata.json").write_text("{ not json")
    assert main(["info", "--models-dir", str(tmp_path / "models")]) == 0
    captured = capsys.readouterr()
    assert "good" in captured.out and ".partial" not in captured.out
    assert "broken" in captured.err and "skipped a broken model" in captured.err


@pytest.mark.parametrize("bad", ["float", "negative", "huge", "not in the table"])
def test_compare_refuses_label_values_it_would_truncate_drop_or_allocate_for(tmp_path, bad, capsys):
    grid = {"spacing": (2.0, 2.0, 2.0), "origin": (0.0, 0.0, 0.0)}
    good = np.zeros((12, 12, 12), np.int32)
    good[3:8, 3:8, 3:8] = 1
    values = {"float": 1.5, "negative": -2, "huge": 60_000, "not in the table": 9}[bad]
    other = good.astype(np.float32 if bad == "float" else np.int32)
    other[4:6, 4:6, 4:6] = values
    first = write_volume(volume_module.Volume(good, **grid), tmp_path / "first.nii.gz")
    second = write_volume(volume_module.Volume(other, **grid), tmp_path / "second.nii.gz")
    code = main(["compare", "--first", str(first), "--second", str(second), "--no-hd95",
                 "--json", str(tmp_path / "report.json")])
    assert code == EXIT_ERROR and "outside the label table" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.nii.gz", "second.nii.gz"]


def test_a_compare_report_never_replaces_an_input(tmp_path, capsys):
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[3:8, 3:8, 3:8] = 1
    first = write_volume(volume_module.Volume(labels, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0)), tmp_path / "first.nii.gz")
    before = first.read_bytes()
    code = main(["compare", "--first", str(first), "--second", str(first), "--json", str(first), "--overwrite"])
    assert code == EXIT_ERROR and "would replace the input" in capsys.readouterr().err
    assert first.read_bytes() == before


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_a_zipped_bundle_imports_from_the_command_line_and_bad_archives_are_refused(tmp_path, monkeypatch,
                                                                                     capsys):
    bundle = make_bundle(tmp_path / "made" / "shared-student").path
    members = {f"shared-student/{p.relative_to(bundle)}": p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    models = tmp_path / "models"
    models.mkdir()
    good = _zip(tmp_path / "good.zip", members)
    assert main(["import-bundle", str(good), "--models-dir", str(tmp_path / "missing")]) == EXIT_ERROR
    assert "does not exist" in capsys.readouterr().err
    assert main(["import-bundle", str(good), "--models-dir", str(models)]) == 0
    assert (models / "shared-student" / "models" / "model.pt").is_file()
    assert main(["import-bundle", str(good), "--models-dir", str(models)]) == EXIT_ERROR  # never replaced
    loose = _zip(tmp_path / "loose.zip", {"configs/metadata.json": b"{}", "models/model.pt": b"x"})
    bomb = _zip(tmp_path / "bomb.zip", {"big/models/model.pt": b"\0" * (3 * 1024**2)})
    monkeypatch.setattr(bundle_module, "MAX_ARCHIVE_BYTES", 1024**2)
    for archive, problem in ((loose, "must hold one bundle folder"), (bomb, "would expand to")):
        capsys.readouterr()
        assert main(["import-bundle", str(archive), "--models-dir", str(models)]) == EXIT_ERROR
        assert problem in capsys.readouterr().err
    assert sorted(p.name for p in models.iterdir()) == ["shared-student"]  # nothing partial left


def test_an_interrupted_pair_of_outputs_leaves_neither(model, scan, tmp_path, monkeypatch, capsys):
    from MedKDSegmentLib.engine import segfile

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the .seg.nrrd is written, after the .nii.gz

    monkeypatch.setattr(segfile, "write_image", interrupted)
    before = snapshot(tmp_path)
    assert segment(model, scan, tmp_path / "out") != 0
    assert "nothing partial was written" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_two_runs_never_write_one_model_and_crash_leftovers_are_cleared(tmp_path, capsys):
    import subprocess
    import sys

    image, labels = generate_phantom("CT", 7, size=(32, 32, 16), spacing=(8.0, 8.0, 8.0))
    write_volume(image, tmp_path / "data" / "images" / "case.nii.gz")
    write_volume(labels, tmp_path / "data" / "labels" / "case.nii.gz")
    run = ["--quiet", "train-teacher", "--modality", "CT", "--data", str(tmp_path / "data"), "--output",
           str(tmp_path / "model"), "--device", "cpu", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size",
           "1", "--patch-size", "16", "16", "16"]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "model.checkpoint").mkdir()
        (tmp_path / "model.checkpoint" / "run.lock").write_text(str(other.pid))  # a run that is still going
        assert main(run) == EXIT_ERROR and "Another run" in capsys.readouterr().err
        assert not (tmp_path / "model").exists()
    finally:
        other.kill()
        other.wait()
    leftover = tmp_path / ".partial-model-k1ll9"  # what kill -9 during the bundle write leaves
    (leftover / "models").mkdir(parents=True)
    assert main(run) == 0  # the dead run's lock is taken over
    assert (tmp_path / "model" / "models" / "model.pt").is_file()
    assert not leftover.exists() and not (tmp_path / "model.checkpoint").exists()


@pytest.mark.parametrize("damage", [
    lambda m: m["medkdsegment"].update(architecture={"name": "os.system", "kwargs": {}}),
    lambda m: m["medkdsegment"].update(architecture={"name": "FastStudent", "kwargs": {"features": [10**6, 8, 8]}}),
    lambda m: m["medkdsegment"].update(architecture={"name": "FastStudent", "kwargs": {"features": "x" * 10}}),
    lambda m: m["medkdsegment"].update(architecture={"name": "FastStudent", "kwargs": {"colour": 3}}),
    lambda m: m["medkdsegment"].update(format_version="1"),
    lambda m: m["medkdsegment"].update(role=["student"]),
    lambda m: m["network_data_format"]["outputs"]["pred"].update(channel_def={"zero": "background"}),
], ids=["unknown network", "huge setting", "wrong type", "unknown setting", "version as text", "role as list",
        "channel not a number"])
def test_damaged_bundle_metadata_is_refused_before_anything_is_built(tmp_path, damage, capsys):
    import json

    bundle = make_bundle(tmp_path / "models" / "damaged").path
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    damage(metadata)
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    assert main(["info", str(bundle)]) == EXIT_ERROR
    assert "error:" in capsys.readouterr().err


def test_training_matches_a_slicer_segmentation_by_segment_name_and_refuses_an_unknown_one(tmp_path, capsys):
    from MedKDSegmentLib.engine.data import load_cases
    from MedKDSegmentLib.engine.labels import label_names
    from MedKDSegmentLib.engine.profiles import CT_PROFILE
    from MedKDSegmentLib.engine.segfile import write_seg_nrrd

    image, labels = generate_phantom("CT", 9, size=(32, 32, 16), spacing=(8.0, 8.0, 8.0))
    write_volume(image, tmp_path / "data" / "images" / "case.nii.gz")
    liver = labels.with_array((labels.array == 1).astype(np.uint8) * 7)  # value 7, named "Liver"
    write_seg_nrrd(liver, tmp_path / "data" / "labels" / "case.seg.nrrd", {7: "Liver"})
    case = load_cases(tmp_path / "data", CT_PROFILE, label_names())[0]
    assert set(np.unique(case.labels).tolist()) == {0, 1}  # 7 "Liver" became the table's liver, 1
    write_seg_nrrd(liver, tmp_path / "data" / "labels" / "case.seg.nrrd", {7: "Tumour"})
    run = ["--quiet", "train-teacher", "--modality", "CT", "--data", str(tmp_path / "data"), "--output",
           str(tmp_path / "model"), "--device", "cpu", "--epochs", "1"]
    assert main(run) == EXIT_ERROR
    assert "'Tumour' do not match any label" in capsys.readouterr().err and not (tmp_path / "model").exists()


def test_a_layered_segmentation_is_named_as_such(tmp_path):
    layers = sitk.Compose([sitk.Image([16, 16, 8], sitk.sitkUInt8)] * 2)
    layers.SetMetaData("Segment0_Name", "liver")
    sitk.WriteImage(layers, str(tmp_path / "case.seg.nrrd"))
    with pytest.raises(InvalidInputError, match="overlapping segments"):
        read_volume(tmp_path / "case.seg.nrrd")


@pytest.mark.parametrize("where", ["parent is a file", "name too long", "not UTF-8", "empty"])
def test_an_output_path_no_file_can_have_is_refused_before_any_work(model, scan, tmp_path, where, capsys):
    (tmp_path / "afile").write_text("x")
    output = {"parent is a file": str(tmp_path / "afile" / "out"), "name too long": str(tmp_path / ("n" * 300)),
              "not UTF-8": os.fsdecode(bytes(tmp_path) + b"/\xff\xfe"), "empty": ""}[where]
    before = snapshot(tmp_path)
    assert segment(model, scan, Path(output)) == EXIT_ERROR if output else main(
        ["--quiet", "phantom", "--modality", "CT", "--size", "8", "8", "8", "--spacing", "8", "8", "8",
         "--output", ""]) == EXIT_ERROR
    assert "fix:" in capsys.readouterr().err and snapshot(tmp_path) == before
    if where != "empty":
        assert main(["--quiet", "phantom", "--modality", "CT", "--size", "8", "8", "8", "--spacing", "8", "8", "8",
                     "--output", output]) == EXIT_ERROR
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("option, value", [("--seed", "-5"), ("--patch-size", "100000"), ("--learning-rate", "inf"),
                                           ("--kd-weight", "nan"), ("--kd-weight", "-1")])
def test_distillation_settings_no_run_can_use_are_refused(tmp_path, option, value, capsys):
    image, labels = generate_phantom("CT", 7, size=(32, 32, 16), spacing=(8.0, 8.0, 8.0))
    write_volume(image, tmp_path / "data" / "images" / "case.nii.gz")
    values = [value] * 3 if option == "--patch-size" else [value]
    code = main(["--quiet", "distill", "--teacher", "phantom-abdomen-ct-teacher", "--data", str(tmp_path / "data"),
                 "--output", str(tmp_path / "model"), "--device", "cpu", option, *values])
    assert code == EXIT_ERROR and "fix:" in capsys.readouterr().err and not (tmp_path / "model").exists()


@pytest.mark.parametrize("option, value", [("--seed", "-1"), ("--kd-weight", "nan"), ("--learning-rate", "inf")])
def test_fine_tuning_settings_no_run_can_use_are_refused(scan, tmp_path, option, value, capsys):
    image = read_volume(scan)
    labels = image.with_array((image.array > 100).astype(np.uint8))
    write_volume(labels, tmp_path / "labels.nii.gz")
    code = main(["--quiet", "finetune", "--model", "phantom-abdomen-ct-student", "--image", str(scan), "--labels",
                 str(tmp_path / "labels.nii.gz"), "--output", str(tmp_path / "tuned"), "--device", "cpu",
                 option, value])
    assert code == EXIT_ERROR and "fix:" in capsys.readouterr().err and not (tmp_path / "tuned").exists()


def test_a_misspelt_map_name_is_refused_not_ignored(model, scan, tmp_path, capsys):
    from MedKDSegmentLib.engine.segfile import write_seg_nrrd

    image = read_volume(scan)
    segmentation = write_seg_nrrd(image.with_array((image.array > 0).astype(np.uint8)), tmp_path / "case.seg.nrrd",
                                  {1: "Liver"})
    run = ["--quiet", "finetune", "--model", str(model), "--image", str(scan), "--labels", str(segmentation),
           "--output", str(tmp_path / "v2"), "--device", "cpu", "--epochs", "1"]
    assert main([*run, "--map", "Livr=liver"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "'Livr' matches no segment of any case (segments: Liver)" in err and not (tmp_path / "v2").exists()


def test_a_teacher_of_the_other_modality_is_refused_before_training(tmp_path, capsys):
    from tiny import TINY_MR, TINY_TEACHER

    teacher = make_bundle(tmp_path / "models" / "mr-teacher", architecture=TINY_TEACHER, profile=TINY_MR,
                          role="teacher").path
    image, _ = generate_phantom("CT", 12, size=(32, 32, 16), spacing=(8.0, 8.0, 8.0))
    write_volume(image, tmp_path / "ct" / "images" / "case.nii.gz")
    run = ["--quiet", "distill", "--teacher", str(teacher), "--data", str(tmp_path / "ct"), "--output",
           str(tmp_path / "student"), "--device", "cpu", "--epochs", "1"]
    assert main(run) == EXIT_ERROR
    assert "looks like CT, but the model is for MR" in capsys.readouterr().err
    assert not (tmp_path / "student").exists()
