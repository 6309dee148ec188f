"""The command line: every subcommand's help, the main flows, and bad input giving exit 2 and no output."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from tiny import make_bundle

from MedKDSegmentLib.engine.segfile import read_seg_nrrd_names
from MedKDSegmentLib.engine.volume import read_volume

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMANDS = ["phantom", "train-teacher", "distill", "segment", "compare", "info", "demo"]


def medkd(*args, check_exit: int | None = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "MedKDSegment"))
    result = subprocess.run(
        [sys.executable, "-m", "MedKDSegmentLib", "--quiet", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if check_exit is not None:
        assert result.returncode == check_exit, result.stderr
    return result


@pytest.fixture(scope="module")
def phantom_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "ct"
    medkd(
        "phantom",
        "--modality",
        "CT",
        "--count",
        "2",
        "--size",
        48,
        40,
        32,
        "--spacing",
        7,
        7,
        7,
        "--seed",
        3,
        "--output",
        folder,
    )
    return folder


def test_every_subcommand_has_help():
    for command in COMMANDS:
        result = medkd(command, "--help")
        assert "usage: medkd" in result.stdout and "--" in result.stdout, command


def test_help_imports_neither_torch_nor_monai():
    """``medkd --help`` answers at once: the parser is built without the engine's heavy modules."""
    code = ("import sys\nfrom MedKDSegmentLib.engine.cli import build_parser\nbuild_parser().format_help()\n"
            "print(sorted(name for name in ('torch', 'monai', 'SimpleITK', 'scipy') if name in sys.modules))")
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "MedKDSegment"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"


def test_left_out_training_options_keep_the_config_defaults():
    from MedKDSegmentLib.engine.cli import _training_config, build_parser
    from MedKDSegmentLib.engine.training import TrainingConfig

    args = build_parser().parse_args(["distill", "--data", "d", "--teacher", "t", "--output", "o", "--epochs", "3"])
    assert _training_config(args) == TrainingConfig(epochs=3)


def test_phantom_writes_pairs_on_the_same_grid(phantom_folder):
    images = sorted((phantom_folder / "images").iterdir())
    assert [p.name for p in images] == ["case_000.nii.gz", "case_001.nii.gz"]
    image, labels = read_volume(images[0]), read_volume(phantom_folder / "labels" / images[0].name)
    assert image.same_grid(labels) and image.shape == (32, 40, 48)
    assert json.loads((phantom_folder / "dataset.json").read_text(encoding="utf-8"))["modality"] == "CT"


def test_segment_file_and_folder_then_compare(phantom_folder, tmp_path):
    bundle = make_bundle(tmp_path / "tiny")
    single = tmp_path / "out" / "case0"
    medkd(
        "segment",
        "--model",
        bundle.path,
        "--input",
        phantom_folder / "images" / "case_000.nii.gz",
        "--output",
        single,
        "--device",
        "cpu",
    )
    nifti, seg = read_volume(f"{single}.nii.gz"), f"{single}.seg.nrrd"
    assert nifti.same_grid(read_volume(phantom_folder / "images" / "case_000.nii.gz"))
    assert read_seg_nrrd_names(seg)[1] == "liver"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(seg)), nifti.array)

    medkd(
        "segment",
        "--model",
        bundle.path,
        "--input",
        phantom_folder / "images",
        "--output",
        tmp_path / "batch",
        "--format",
        "nifti",
    )
    assert sorted(p.name for p in (tmp_path / "batch").iterdir()) == [
        "case_000_tiny.nii.gz", "case_001_tiny.nii.gz", "summary.csv"]
    rows = list(csv.DictReader((tmp_path / "batch" / "summary.csv").open()))
    assert [(row["input"], row["status"]) for row in rows] == [("case_000.nii.gz", "done"), ("case_001.nii.gz", "done")]

    report = tmp_path / "compare.json"
    result = medkd(
        "compare",
        "--first",
        f"{single}.nii.gz",
        "--second",
        tmp_path / "batch" / "case_000_tiny.nii.gz",
        "--reference",
        phantom_folder / "labels" / "case_000.nii.gz",
        "--json",
        report,
        "--no-hd95",
    )
    rows = json.loads(report.read_text(encoding="utf-8"))
    assert [r["structure"] for r in rows][:2] == ["liver", "spleen"]
    assert all(r["dice_first_vs_second"] in (1.0, None) for r in rows)  # same model, same input
    assert "mean" in result.stdout


def test_info_lists_and_verifies(tmp_path):
    bundle = make_bundle(tmp_path / "models" / "tiny")
    listing = medkd("info", "--models-dir", tmp_path / "models").stdout
    assert "tiny" in listing and "student" in listing
    assert "sha256 verified" in medkd("info", bundle.path).stdout
    weights = bundle.path / "models" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = medkd("info", bundle.path, check_exit=2)
    assert "sha256" in result.stderr and "fix:" in result.stderr and "Traceback" not in result.stderr


def write(path, array, spacing=(2.0, 2.0, 2.0)):
    image = sitk.GetImageFromArray(array, isVector=False)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("2d", "a 3D volume is needed"),
        ("4d", "4D"),
        ("constant", "constant"),
        ("nan", "NaN"),
        ("missing", "does not exist"),
        ("modality", "Unknown modality"),
        ("model", "No model bundle named"),
    ],
)
def test_bad_input_exits_2_with_a_fix_and_no_output(tmp_path, case, message):
    bundle = make_bundle(tmp_path / "tiny")
    rng = np.random.default_rng(0)
    inputs = {
        "2d": lambda: write(tmp_path / "in.nrrd", rng.normal(size=(16, 16)).astype(np.float32), (1.0, 1.0)),
        "4d": lambda: write(tmp_path / "in.nii.gz", rng.normal(size=(2, 8, 8, 8)).astype(np.float32), (1, 1, 1, 1)),
        "constant": lambda: write(tmp_path / "in.nrrd", np.zeros((8, 8, 8), np.float32)),
        "nan": lambda: write(tmp_path / "in.nrrd", np.full((8, 8, 8), np.nan, np.float32)),
        "missing": lambda: tmp_path / "absent.nii.gz",
        "modality": lambda: write(tmp_path / "in.nrrd", rng.normal(size=(8, 8, 8)).astype(np.float32)),
        "model": lambda: write(tmp_path / "in.nrrd", rng.normal(size=(8, 8, 8)).astype(np.float32)),
    }
    source = inputs[case]()
    extra = ["--modality", "PET"] if case == "modality" else []
    model = "no-such-model" if case == "model" else bundle.path
    output = tmp_path / "out" / "result"
    result = medkd("segment", "--model", model, "--input", source, "--output", output, *extra, check_exit=2)
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_label_grid_mismatch_in_training_data_exits_2(phantom_folder, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantom_folder, data)
    label = data / "labels" / "case_001.nii.gz"
    image = sitk.ReadImage(str(label))
    sitk.WriteImage(image[:, :, :-2], str(label))
    result = medkd(
        "train-teacher",
        "--data",
        data,
        "--modality",
        "CT",
        "--output",
        tmp_path / "teacher",
        "--epochs",
        1,
        "--steps-per-epoch",
        1,
        check_exit=2,
    )
    assert "case_001.nii.gz' does not lie on its image's grid" in result.stderr
    assert not (tmp_path / "teacher").exists()
