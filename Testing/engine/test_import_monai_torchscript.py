"""Importing a MONAI Model Zoo bundle (written with MONAI's own ``init_bundle``, run by ``python -m monai.bundle
run`` for the reference) and a TorchScript file (an export of a MedKDSegment teacher) as teachers."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from zoo_bundle import INFERENCE, write_zoo_bundle

from MedKDSegmentLib.engine.bundle import load_bundle
from MedKDSegmentLib.engine.errors import InvalidInputError
from MedKDSegmentLib.engine.imported import import_teacher
from MedKDSegmentLib.engine.inference import segment
from MedKDSegmentLib.engine.phantom import generate_phantom
from MedKDSegmentLib.engine.pipelines import PipelineTeacher, run_pipeline
from MedKDSegmentLib.engine.volume import read_volume


@pytest.fixture(scope="module")
def monai_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    return write_zoo_bundle(root / "phantom_ct_organs")


@pytest.fixture(scope="module")
def test_image(tmp_path_factory) -> Path:
    image, _ = generate_phantom("CT", 11, size=(40, 36, 20), spacing=(2.5, 2.5, 5.0))
    folder = tmp_path_factory.mktemp("data")
    sitk.WriteImage(image.to_sitk(), str(folder / "case.nii.gz"))
    return folder / "case.nii.gz"


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_monai_bundle_labels_equal_monai_bundle_run(monai_bundle, test_image, tmp_path):
    before = digest(monai_bundle)
    teacher = import_teacher(monai_bundle, tmp_path / "models")
    assert digest(monai_bundle) == before
    assert teacher.labels == {1: "liver", 2: "spleen"} and teacher.modality == "CT"
    assert teacher.info["source"]["framework"] == "MONAI bundle"
    result = run_pipeline(teacher, teacher.load_network(), read_volume(test_image, "CT"), torch.device("cpu"))

    output = tmp_path / "reference"
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(monai_bundle / "configs" / "inference.json"),
         "--meta_file", str(monai_bundle / "configs" / "metadata.json"), "--bundle_root", str(monai_bundle),
         "--dataset_dir", str(test_image.parent), "--output_dir", str(output)],
        check=True, capture_output=True, timeout=300,
    )
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(next(output.rglob("*.nii.gz")))))
    assert result.labels.shape == expected.shape
    assert int((result.labels != expected).sum()) == 0
    assert {1} <= set(np.unique(expected))  # it segments


def test_monai_bundle_teaches_on_a_student_grid(monai_bundle, test_image, tmp_path):
    from MedKDSegmentLib.engine.data import Case

    teacher = import_teacher(monai_bundle, tmp_path / "models")
    image = sitk.ReadImage(str(test_image))
    grid = sitk.Resample(image, [25, 22, 25], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                         [4.0, 4.0, 4.0], image.GetDirection())
    case = Case(name="c", image=np.zeros((25, 22, 25), np.float32), labels=None, source=test_image, grid=grid)
    outputs = PipelineTeacher(teacher, teacher.load_network()).outputs_on(case, torch.device("cpu"))
    assert outputs.shape == (3, 25, 22, 25)
    assert np.allclose(np.exp(outputs).sum(0), 1, atol=1e-3)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["network_def"].update({"_target_": "mypackage.EvilNet"}), "neither MONAI nor torch"),
    (lambda c: c["network_def"].update({"_target_": "NoSuchNet"}), "MONAI does not know"),
    (lambda c: c["preprocessing"]["transforms"].append({"_target_": "Lambdad", "keys": "image",
                                                          "func": "$lambda x: __import__('os').system('true')"}),
     "evaluates"),
    (lambda c: c["imports"].append("$import subprocess"), "imports something other"),
    (lambda c: c.pop("inferer"), "defines no inferer"),
])
def test_unsafe_or_incomplete_bundles_are_refused(monai_bundle, tmp_path, change, message):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(monai_bundle, bundle)
    config = copy.deepcopy(INFERENCE)
    change(config)
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match=message):
        import_teacher(bundle, tmp_path / "models", name="bad")
    assert not (tmp_path / "models" / "bad").exists()


def test_a_changed_copy_of_the_config_is_refused(monai_bundle, tmp_path):
    from MedKDSegmentLib.engine.errors import BundleError

    teacher = import_teacher(monai_bundle, tmp_path / "models")
    copied = teacher.path / "source" / "configs" / "inference.json"
    copied.write_text(copied.read_text().replace('"overlap": 0.5', '"overlap": 0.25'))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(teacher.path).load_network()


@pytest.fixture(scope="module")
def own_teacher(tmp_path_factory):
    """A MedKDSegment teacher (UNet on the CT profile) to export as TorchScript."""
    from MedKDSegmentLib.engine.bundle import save_bundle
    from MedKDSegmentLib.engine.labels import ABDOMEN_STRUCTURES
    from MedKDSegmentLib.engine.networks import build_network
    from MedKDSegmentLib.engine.profiles import CT_PROFILE

    architecture = {"name": "UNet", "kwargs": {"spatial_dims": 3, "in_channels": 1, "channels": [4, 8, 16],
                                               "strides": [2, 2], "num_res_units": 1, "norm": "batch"}}
    torch.manual_seed(1)
    network = build_network(architecture, 3).eval()
    for module in network.modules():  # non-trivial batch-norm statistics, so eval mode matters
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return save_bundle(tmp_path_factory.mktemp("own") / "teacher", network, name="teacher", role="teacher",
                       architecture=architecture, profile=CT_PROFILE, structures=ABDOMEN_STRUCTURES[:2],
                       method={"name": "test"})


def export(bundle, folder: Path) -> tuple[Path, Path, str]:
    scripted = torch.jit.script(bundle.load_network())
    path = folder / "teacher.pt"
    torch.jit.save(scripted, str(path))
    profile = bundle.profile
    config = folder / "teacher.json"
    config.write_text(json.dumps({"labels": {str(k): v for k, v in bundle.labels.items()}, "modality": "CT",
                                  "spacing": list(profile.spacing), "clip": list(profile.clip)}))
    return path, config, hashlib.sha256(path.read_bytes()).hexdigest()


def test_torchscript_export_gives_the_original_labels(own_teacher, test_image, tmp_path):
    path, config, sha256 = export(own_teacher, tmp_path)
    imported = import_teacher(path, tmp_path / "models", name="scripted", config=config, sha256=sha256)
    assert imported.info["architecture"]["name"] == "TorchScript"
    assert imported.labels == own_teacher.labels and imported.profile == own_teacher.profile
    volume = read_volume(test_image, "CT")
    original = segment(volume, own_teacher, device="cpu").labels
    scripted = segment(volume, imported, device="cpu").labels
    assert np.array_equal(original.array, scripted.array)


def test_torchscript_needs_the_confirmed_sha256(own_teacher, tmp_path):
    path, config, sha256 = export(own_teacher, tmp_path)
    with pytest.raises(InvalidInputError, match="--sha256 and --config"):
        import_teacher(path, tmp_path / "models", name="x", config=config)
    with pytest.raises(InvalidInputError, match="not the 0000"):
        import_teacher(path, tmp_path / "models", name="x", config=config, sha256="0" * 64)
    assert not (tmp_path / "models" / "x").exists()
    imported = import_teacher(path, tmp_path / "models", name="x", config=config, sha256=sha256)
    weights = imported.path / "models" / "model.ts"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    from MedKDSegmentLib.engine.errors import BundleError

    with pytest.raises(BundleError, match="sha256"):
        imported.load_network()


def test_torchscript_whose_outputs_do_not_fit_the_labels_is_refused(own_teacher, tmp_path):
    path, config, sha256 = export(own_teacher, tmp_path)
    settings = json.loads(config.read_text())
    settings["labels"]["3"] = "extra"
    config.write_text(json.dumps(settings))
    with pytest.raises(InvalidInputError, match="3 labels"):
        import_teacher(path, tmp_path / "models", name="x", config=config, sha256=sha256)


def test_options_of_another_format_are_refused(monai_bundle, tmp_path):
    with pytest.raises(InvalidInputError, match="takes no configuration"):
        import_teacher(monai_bundle, tmp_path, configuration="3d_fullres")


def test_feature_hints_from_a_torchscript_teacher_are_refused_before_training(own_teacher, tmp_path):
    from MedKDSegmentLib.engine.training import TrainingConfig, distill_student

    path, config, sha256 = export(own_teacher, tmp_path)
    imported = import_teacher(path, tmp_path / "models", name="scripted", config=config, sha256=sha256)
    with pytest.raises(InvalidInputError, match="TorchScript.*hint or at"):
        distill_student(tmp_path / "nowhere", imported, tmp_path / "student",
                        TrainingConfig(epochs=1, steps_per_epoch=1, methods="hint", device="cpu"))
    assert not (tmp_path / "student").exists()
