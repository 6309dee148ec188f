"""Training on tiny phantoms: teachers and students learn, runs resume exactly, cancel writes nothing."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from tiny import TINY_CT, TINY_STUDENT, TINY_TEACHER
from torch import nn

from MedKDSegmentLib.engine.data import Case, load_cases, sample_batch
from MedKDSegmentLib.engine.errors import CancelledError, InvalidInputError
from MedKDSegmentLib.engine.inference import segment
from MedKDSegmentLib.engine.labels import label_names
from MedKDSegmentLib.engine.metrics import dice_per_label
from MedKDSegmentLib.engine.networks import STUDENT_CONFIG, build_network
from MedKDSegmentLib.engine.phantom import generate_phantom, write_phantom_dataset
from MedKDSegmentLib.engine.training import (
    TrainingConfig,
    cache_teacher_outputs,
    checkpoint_dir_for,
    distill_student,
    fit,
    train_teacher,
)

SIZE, SPACING = (64, 56, 40), (6.0, 6.0, 6.0)
FAST = dict(batch_size=2, patch_size=(32, 32, 32), device="cpu", validation_fraction=0.25)


def chance_dice(labels: np.ndarray) -> float:
    """Mean foreground Dice of a prediction drawn at random with the true class frequencies."""
    rng = np.random.default_rng(0)
    random = rng.permutation(labels.ravel()).reshape(labels.shape)
    return float(np.nanmean(list(dice_per_label(random, labels, list(range(1, 9))).values())))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom-ct")
    write_phantom_dataset(folder, "CT", 4, seed=7, size=SIZE, spacing=SPACING)
    return folder


@pytest.fixture(scope="module")
def held_out():
    return generate_phantom("CT", seed=424242, size=SIZE, spacing=SPACING)


@pytest.fixture(scope="module")
def teacher(dataset, tmp_path_factory):
    config = TrainingConfig(epochs=8, steps_per_epoch=25, learning_rate=1e-2, **FAST)
    output = tmp_path_factory.mktemp("models") / "teacher"
    return train_teacher(dataset, output, "CT", config, TINY_TEACHER, TINY_CT)


def test_teacher_learns(teacher, held_out):
    losses = teacher.info["metrics"]["train_loss"]
    assert losses[-1] < 0.7 * losses[0]
    image, truth = held_out
    labels = segment(image, teacher, "cpu").labels.array
    dice = dice_per_label(labels, truth.array, list(range(1, 9)))
    mean = float(np.nanmean(list(dice.values())))
    assert mean > chance_dice(truth.array) + 0.15
    assert dice[1] > 0.7  # the liver, the largest structure
    assert set(teacher.info["metrics"]["validation_dice"]) >= {"liver", "spleen"}


def test_student_distils_from_unlabelled_volumes(dataset, teacher, held_out, tmp_path):
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(dataset / "images", unlabelled / "images")
    # Distillation steps are cheap (cached teacher outputs): the real student architecture, more steps.
    config = TrainingConfig(epochs=12, steps_per_epoch=25, learning_rate=1e-2, **FAST)
    student = distill_student(unlabelled, teacher, tmp_path / "student", config, STUDENT_CONFIG)
    assert student.role == "student"
    assert student.info["teacher"]["weights_sha256"] == teacher.weights_sha256
    assert student.info["method"]["name"] == "pixel_kd"
    assert student.info["metrics"]["train_loss"][-1] < student.info["metrics"]["train_loss"][0]
    image, truth = held_out
    labels = segment(image, student, "cpu").labels.array
    taught = segment(image, teacher, "cpu").labels.array
    structures = list(range(1, 9))
    versus_truth = float(np.nanmean(list(dice_per_label(labels, truth.array, structures).values())))
    versus_teacher = float(np.nanmean(list(dice_per_label(labels, taught, structures).values())))
    # Learned from the teacher's soft targets alone: it agrees with its teacher, and beats chance on the truth.
    assert versus_teacher > chance_dice(taught) + 0.05
    assert versus_truth > chance_dice(truth.array) + 0.05


def test_training_needs_labels_without_a_teacher(dataset, tmp_path):
    shutil.copytree(dataset / "images", tmp_path / "data" / "images")
    with pytest.raises(InvalidInputError, match="No labelled cases"):
        train_teacher(tmp_path / "data", tmp_path / "t", "CT", TrainingConfig(epochs=1, **FAST), TINY_TEACHER, TINY_CT)
    assert not (tmp_path / "t").exists()


def test_bad_labels_are_rejected_before_training(dataset, tmp_path):
    import SimpleITK as sitk

    shutil.copytree(dataset, tmp_path / "data")
    label_file = sorted((tmp_path / "data" / "labels").iterdir())[0]
    image = sitk.ReadImage(str(label_file))
    image.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(image, str(label_file))
    with pytest.raises(InvalidInputError, match="does not lie on its image's grid"):
        train_teacher(tmp_path / "data", tmp_path / "t", "CT", TrainingConfig(epochs=1, **FAST), TINY_TEACHER, TINY_CT)
    assert not (tmp_path / "t").exists() and not checkpoint_dir_for(tmp_path / "t").exists()


def test_resumed_run_equals_an_uninterrupted_one(dataset, tmp_path):
    cases = load_cases(dataset, TINY_CT, label_names())
    config = TrainingConfig(epochs=4, steps_per_epoch=3, learning_rate=5e-3, **FAST)

    torch.manual_seed(0)
    reference = build_network(TINY_STUDENT, 9)
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    fit(reference, 9, cases, config, tmp_path / "full")

    interrupted = build_network(TINY_STUDENT, 9)
    interrupted.load_state_dict(start)
    steps = []

    def cancel_in_epoch_three():
        steps.append(1)
        return len(steps) > 2 * config.steps_per_epoch + 1

    with pytest.raises(CancelledError):
        fit(interrupted, 9, cases, config, tmp_path / "run", cancel=cancel_in_epoch_three)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2

    with pytest.raises(InvalidInputError, match="--resume"):
        fit(build_network(TINY_STUDENT, 9), 9, cases, config, tmp_path / "run")

    resumed = build_network(TINY_STUDENT, 9)
    history = fit(resumed, 9, cases, config, tmp_path / "run", resume=True)
    assert len(history.epoch_loss) == 4
    for key, value in reference.state_dict().items():
        assert torch.allclose(value.float(), resumed.state_dict()[key].float(), atol=1e-5), key


def test_cancelled_training_leaves_no_bundle(dataset, tmp_path):
    config = TrainingConfig(epochs=2, steps_per_epoch=3, **FAST)
    calls = []
    with pytest.raises(CancelledError):
        train_teacher(
            dataset,
            tmp_path / "never",
            "CT",
            config,
            TINY_TEACHER,
            TINY_CT,
            cancel=lambda: calls.append(1) or len(calls) > 4,
        )
    assert not (tmp_path / "never").exists()
    assert not list(tmp_path.glob(".partial-*"))
    assert checkpoint_dir_for(tmp_path / "never").exists()  # so that --resume can continue
    assert not math.isnan(len(calls))


def test_unlabelled_volumes_are_sampled_where_the_teacher_sees_structures():
    # A small structure in a large empty volume: random centres would almost never reach it.
    image = np.zeros((40, 40, 40), np.float32)
    teacher = np.full((3, 40, 40, 40), -10.0, np.float16)
    teacher[0] = 0.0
    teacher[0, 30:34, 30:34, 30:34], teacher[2, 30:34, 30:34, 30:34] = -10.0, 0.0
    case = Case("unlabelled", image, None, teacher, teacher_source=("log_probs", "t"))
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(30):
        _, _, labelled, cached = sample_batch([case], 1, (8, 8, 8), rng)
        assert not labelled.any()
        hits += int((cached[0].argmax(0) == 2).any())
    assert hits >= 15  # about two thirds of patches are centred on the teacher's structure
    assert (case.guide_labels()[30:34, 30:34, 30:34] == 2).all() and case.guide_labels().sum() == 2 * 4**3


def test_semi_supervised_batches_keep_a_labelled_share():
    rng = np.random.default_rng(1)
    volume = np.zeros((16, 16, 16), np.float32)
    cases = [Case("labelled", volume, np.ones((16, 16, 16), np.uint8))]
    cases += [Case(f"unlabelled-{i}", volume, None) for i in range(9)]
    for _ in range(20):
        _, labels, labelled, _ = sample_batch(cases, 4, (8, 8, 8), rng)
        assert labelled.tolist() == [True, True, False, False]  # random draws would give ~0.4 labelled items
        assert all(labels[i].eq(1).any() for i in range(2)) and labels[2:].eq(0).all()


def test_teacher_targets_beyond_the_volume_edge_are_the_teachers_answer_for_the_padding():
    """Patches reach past the edge (the image is padded with its minimum). The cached targets there
    must be the teacher's output on that value, not zeros: zero log-probabilities are a uniform class
    distribution, and zero logits would be CWD's most salient place for every class."""
    torch.manual_seed(0)
    teacher = build_network(TINY_TEACHER, 3).eval()
    rng = np.random.default_rng(0)
    image = rng.normal(size=(12, 16, 16)).astype(np.float32)
    case = Case("edge", image, np.zeros(image.shape, np.uint8))
    cache_teacher_outputs(teacher, [case], torch.device("cpu"), lambda f, m: None)
    blank = torch.full((1, 1, 32, 32, 32), float(image.min()))
    with torch.no_grad():
        expected = teacher(blank)[0, :, 16, 16, 16]
    torch.testing.assert_close(torch.from_numpy(case.teacher_fill).float(), expected, atol=0.02, rtol=0.02)
    _, _, _, cached = sample_batch([case], 2, (16, 24, 24), rng)  # larger than the volume: every patch leaves it
    outside = (cached == torch.from_numpy(case.teacher_fill).float().view(1, -1, 1, 1, 1)).all(dim=1)
    assert outside.float().mean() > 0.3
    assert not (cached == 0).all(dim=1).any()



def test_the_cache_keeps_the_teacher_s_softened_distribution():
    """At T = 4 the cached targets give the teacher's own softened class distribution (a cache of
    log(max(p, 1e-6)) was 0.042 total-variation away, and tied a third of the classes at the clip)."""
    torch.manual_seed(1)

    class Confident(nn.Module):  # logits scaled up: as sure of itself as a trained teacher
        def __init__(self) -> None:
            super().__init__()
            self.network = build_network(TINY_TEACHER, 9)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 40 * self.network(x)

    teacher = Confident().eval()
    image = np.random.default_rng(2).normal(size=(16, 24, 24)).astype(np.float32)
    case = Case("soft", image, None)
    cache_teacher_outputs(teacher, [case], torch.device("cpu"), lambda f, m: None)
    with torch.no_grad():
        logits = teacher(torch.from_numpy(image)[None, None])[0]
    target = torch.softmax(torch.from_numpy(case.teacher).float() / 4, 0)
    truth = torch.softmax(logits / 4, 0)
    assert torch.softmax(logits, 0).amax(0).mean() > 0.9  # the teacher is confident: clipping would bite
    assert (target - truth).abs().sum(0).max() / 2 < 0.01
    clipped = torch.softmax(torch.log(torch.softmax(logits, 0).clamp_min(1e-6)) / 4, 0)
    assert (clipped - truth).abs().sum(0).mean() / 2 > 5 * (target - truth).abs().sum(0).mean() / 2
