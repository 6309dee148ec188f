"""Importing an nnU-Net v2 model as a teacher: the real format (``Testing/data/nnunet``, made by
``scripts/nnunet_fixture.py`` with nnU-Net's own planner, network builder and checkpoint layout), labels equal to
nnU-Net's own predictor, and bad folders refused with nothing written and the source untouched."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedKDSegmentLib.engine import nnunet
from MedKDSegmentLib.engine.errors import BundleError, InvalidInputError
from MedKDSegmentLib.engine.imported import import_teacher
from MedKDSegmentLib.engine.pipelines import PipelineTeacher, run_pipeline
from MedKDSegmentLib.engine.volume import read_volume

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "nnunet"
MODEL = FIXTURE / "Dataset901_Phantom" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
TEST_IMAGE = FIXTURE / "test_image.nii.gz"


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    before = tree_digest(FIXTURE)
    bundle = import_teacher(FIXTURE / "Dataset901_Phantom", models, name="phantom-nnunet")
    assert tree_digest(FIXTURE) == before  # the source is only read
    return bundle


def reference(name: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(FIXTURE / f"reference_{name}.nii.gz")))


def test_import_records_labels_source_and_pipeline(imported):
    assert imported.role == "teacher"
    assert imported.labels == {1: "liver", 2: "spleen", 3: "kidneys"}
    assert imported.modality == "CT"
    source = imported.info["source"]
    assert source["framework"] == "nnU-Net v2" and source["folds"] == ["0", "1"]
    assert source["files"]["fold_1/checkpoint_final.pth"] == hashlib.sha256(
        (MODEL / "fold_1" / "checkpoint_final.pth").read_bytes()).hexdigest()
    assert imported.pipeline["name"] == "nnunet-v2" and imported.pipeline["spacing"] == [4.0, 3.0, 3.0]
    # the students of a CT nnU-Net teacher clip to the plan's foreground percentiles
    assert imported.student_profile.clip == (34.0, 207.0)


@pytest.mark.parametrize("setting, overrides", [("folds_0_1", {}), ("fold_0_nomirror", {"folds": 1, "mirror": False})])
def test_labels_equal_nnunet_predictor(imported, setting, overrides):
    volume = read_volume(TEST_IMAGE, "CT")
    result = run_pipeline(imported, imported.load_network(), volume, torch.device("cpu"), **overrides)
    expected = reference(setting)
    assert result.labels.shape == expected.shape
    assert int((result.labels != expected).sum()) == 0
    assert set(np.unique(expected)) >= {0, 1}  # the model segments (it is not random)


def test_teacher_outputs_on_a_student_grid(imported):
    """As a distillation teacher: log-probabilities on another grid, agreeing with its labels there."""
    from MedKDSegmentLib.engine.data import Case

    image = sitk.ReadImage(str(TEST_IMAGE))
    grid = sitk.Resample(image, [30, 25, 18], sitk.Transform(), sitk.sitkLinear,
                         image.GetOrigin(), [4.0, 4.0, 7.0], image.GetDirection())
    case = Case(name="test", image=np.zeros((18, 25, 30), np.float32), labels=None, source=TEST_IMAGE, grid=grid)
    teacher = PipelineTeacher(imported, imported.load_network())
    outputs = teacher.outputs_on(case, torch.device("cpu"))
    assert outputs.shape == (4, 18, 25, 30)
    probabilities = np.exp(outputs)
    assert np.allclose(probabilities.sum(0), 1, atol=1e-3)
    labels = sitk.Resample(sitk.ReadImage(str(FIXTURE / "reference_folds_0_1.nii.gz")), grid,
                           sitk.Transform(), sitk.sitkNearestNeighbor)
    agreement = (probabilities.argmax(0) == sitk.GetArrayFromImage(labels)).mean()
    assert agreement > 0.95


@pytest.mark.skipif(importlib.util.find_spec("nnunetv2") is None,
                    reason="nnunetv2 is not installed here (the stored reference is its output; "
                           "scripts/nnunet_fixture.py makes it)")
def test_labels_equal_a_live_nnunet_run(imported, tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(MODEL), use_folds=(0, 1))
    image = sitk.ReadImage(str(TEST_IMAGE))
    array = sitk.GetArrayFromImage(image).astype(np.float32)[None]
    expected = predictor.predict_single_npy_array(array, {"spacing": list(image.GetSpacing())[::-1]})
    result = run_pipeline(imported, imported.load_network(), read_volume(TEST_IMAGE, "CT"), torch.device("cpu"))
    assert int((result.labels != expected).sum()) == 0


def copy_model(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    return folder


class Unsafe:
    """Anything a checkpoint would need code to rebuild."""


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "plans.json").unlink(), "plans.json"),
    (lambda f: (f / "dataset.json").unlink(), "dataset.json is missing"),
    (lambda f: shutil.rmtree(f / "fold_0") or shutil.rmtree(f / "fold_1"), "has no checkpoint_final.pth"),
    (lambda f: (f / "plans.json").write_text("{not json"), "not valid JSON"),
    (lambda f: torch.save({"network_weights": {}, "trainer": Unsafe()}, f / "fold_0" / "checkpoint_final.pth"),
     "could not be read safely"),
])
def test_bad_folders_are_refused_with_nothing_written(tmp_path, damage, message):
    folder = copy_model(tmp_path)
    damage(folder)
    before = tree_digest(folder)
    models = tmp_path / "models"
    with pytest.raises((InvalidInputError, BundleError), match=message) as caught:
        import_teacher(folder, models, name="bad")
    assert caught.value.fix
    assert tree_digest(folder) == before
    assert not (models / "bad").exists() and not list(models.glob(".partial-*")) if models.exists() else True


def test_unsafe_checkpoint_names_the_code_it_needs(tmp_path):
    folder = copy_model(tmp_path)
    torch.save({"network_weights": {}, "x": Unsafe()}, folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(InvalidInputError, match="Unsafe"):
        import_teacher(folder, tmp_path / "models", name="bad")


def test_a_missing_fold_and_an_unknown_configuration_are_named(tmp_path):
    with pytest.raises(InvalidInputError, match="fold 3 has no checkpoint_final.pth.*folds with one: 0, 1"):
        import_teacher(MODEL, tmp_path, name="x", folds=["3"])
    with pytest.raises(InvalidInputError, match="3d_lowres"):
        import_teacher(FIXTURE / "Dataset901_Phantom", tmp_path, name="x", configuration="3d_lowres")


def test_plans_naming_code_outside_the_allow_list_are_refused(tmp_path):
    folder = copy_model(tmp_path)
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin"] = "os.system"
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(InvalidInputError, match="os.system"):
        import_teacher(folder, tmp_path / "models", name="bad")
    assert not (tmp_path / "models" / "bad").exists()


def test_none_of_the_formats_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InvalidInputError, match="none of the models") as caught:
        import_teacher(tmp_path, tmp_path / "models")
    assert "nnU-Net" in caught.value.fix and "MONAI" in caught.value.fix and "TorchScript" in caught.value.fix


def test_an_existing_model_is_never_replaced(imported):
    with pytest.raises(BundleError, match="already exists"):
        import_teacher(MODEL, imported.path.parent, name=imported.name)


@pytest.mark.parametrize("size, patch, step", [(37, 32, 0.5), (32, 32, 0.5), (110, 64, 0.5), (200, 96, 0.5)])
def test_window_starts_follow_nnunet(size, patch, step):
    starts = nnunet.window_starts(size, patch, step)
    assert starts[0] == 0 and starts[-1] == size - patch
    assert all(b - a <= patch * step for a, b in zip(starts, starts[1:]))
    if (size, patch) == (110, 64):
        assert starts == [0, 23, 46]  # nnU-Net's own example


def test_a_student_distils_from_the_imported_teacher(imported, tmp_path):
    """Everything distillation does with a published teacher works with an imported one: unlabelled phantoms,
    the teacher's own pipeline per volume, a student that learns its targets and segments a volume."""
    from MedKDSegmentLib.engine.inference import segment
    from MedKDSegmentLib.engine.phantom import generate_phantom
    from MedKDSegmentLib.engine.training import TrainingConfig, distill_student
    from MedKDSegmentLib.engine.volume import write_volume

    data = tmp_path / "unlabelled"
    for seed in range(2):
        image, _ = generate_phantom("CT", 100 + seed, size=(48, 40, 32), spacing=(3.0, 3.0, 4.0))
        write_volume(image, data / "images" / f"case{seed}.nii.gz")
    config = TrainingConfig(epochs=8, steps_per_epoch=4, batch_size=2, patch_size=(16, 16, 16), device="cpu",
                            learning_rate=1e-2)
    student = distill_student(data, imported, tmp_path / "student", config)
    assert student.labels == imported.labels and student.profile == imported.student_profile
    assert student.info["teacher"]["weights_sha256"] == imported.weights_sha256
    losses = student.info["metrics"]["train_loss"]
    assert np.mean(losses[-2:]) < 0.85 * np.mean(losses[:2])  # it learns the teacher's targets
    volume = read_volume(TEST_IMAGE, "CT")
    assert segment(volume, student, "cpu").labels.same_grid(volume)
