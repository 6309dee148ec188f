"""The bundled models: valid, checksummed, distilled from their teacher, small, and accurate on a phantom."""

from __future__ import annotations

import numpy as np
import pytest

from MedKDSegmentLib.engine.bundle import BUNDLED_MODELS, find_bundles, resolve_bundle
from MedKDSegmentLib.engine.demo import model_name
from MedKDSegmentLib.engine.inference import segment
from MedKDSegmentLib.engine.metrics import dice_per_label
from MedKDSegmentLib.engine.phantom import generate_phantom

MODALITIES = ["CT", "MR"]


def test_all_four_bundles_are_present():
    names = {b.name for b in find_bundles(BUNDLED_MODELS)}
    assert names >= {model_name(m, r) for m in MODALITIES for r in ("teacher", "student")}


@pytest.mark.parametrize("modality", MODALITIES)
def test_student_is_distilled_from_its_teacher_and_100x_smaller(modality):
    teacher = resolve_bundle(model_name(modality, "teacher"))
    student = resolve_bundle(model_name(modality, "student"))
    assert (teacher.role, student.role) == ("teacher", "student")
    assert teacher.modality == student.modality == modality
    assert student.info["teacher"]["weights_sha256"] == teacher.weights_sha256
    assert student.info["method"]["name"] == "pixel_kd"
    assert teacher.parameters >= 2_000_000
    assert teacher.parameters / student.parameters >= 100
    assert student.labels == teacher.labels
    for bundle in (teacher, student):
        bundle.load_network()  # checksum and architecture agree
        assert (bundle.path / "models" / "model.pt").stat().st_size < 12e6


@pytest.mark.parametrize("modality", MODALITIES)
def test_student_segments_a_held_out_phantom(modality):
    student = resolve_bundle(model_name(modality, "student"))
    image, truth = generate_phantom(modality, seed=123_456, size=(96, 80, 48), spacing=(4.0, 4.0, 5.0))
    labels = segment(image, student, "cpu").labels
    assert labels.same_grid(image)
    dice = dice_per_label(labels.array, truth.array, sorted(student.labels))
    assert dice[1] > 0.85  # liver
    assert float(np.nanmean(list(dice.values()))) > 0.6
