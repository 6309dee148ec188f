"""The bundled models: valid, checksummed, distilled from their teacher, small, and accurate on a phantom."""

from __future__ import annotations

import numpy as np
import pytest

from MedKDSegmentLib.engine.bundle import BUNDLED_MODELS, find_bundles, resolve_bundle
from MedKDSegmentLib.engine.demo import model_name
from MedKDSegmentLib.engine.inference import segment
from MedKDSegmentLib.engine.metrics import dice_per_label
from MedKDSegmentLib.engine.phantom import generate_phantom
from MedKDSegmentLib.engine.volume import read_volume

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


BRAIN_STUDENT = "hdbet-brain-mr-student"


def test_bundled_brain_student_records_its_published_teacher_licence_and_research_use():
    student = resolve_bundle(BRAIN_STUDENT)
    assert student.role == "student" and student.labels == {1: "brain"} and student.modality == "MR"
    assert student.info["teacher"]["name"] == "hd-bet" and len(student.info["teacher"]["weights_sha256"]) == 64
    assert student.info["licence"] == "Apache-2.0" and "Hum Brain Mapp" in student.info["citation"]
    assert student.info["intended_use"] == "research use only"
    assert student.info["domain"]["count"] == 3
    assert student.parameters < 16_349_655 / 100  # >= 100x fewer than one HD-BET fold
    assert (student.path / "models" / "model.pt").stat().st_size < 1e6


def test_bundled_brain_student_finds_a_brain_in_a_real_head_and_flags_an_abdomen(shared_data):
    student = resolve_bundle(BRAIN_STUDENT)
    head = read_volume(shared_data / "mr-brain-itk" / "t1_head.nii.gz", "MR")
    result = segment(head, student, "cpu")
    millilitres = (result.labels.array > 0).sum() * np.prod(head.spacing) / 1000
    assert 800 < millilitres < 2000 and result.warnings == []  # one of its own three heads
    assert np.median(head.array[result.labels.array > 0]) > np.percentile(head.array, 60)
    abdomen = segment(read_volume(shared_data / "ct-mr-abdomen-totalseg" / "mr.nii.gz", "MR"), student, "cpu")
    assert abdomen.warnings, "an abdominal MR is outside a brain model's world"


def test_demo_compares_both_modalities_and_shows_the_real_student_on_a_head(shared_data, tmp_path):
    from MedKDSegmentLib.engine.demo import run_demo

    lines = []
    head = shared_data / "mr-brain-itk" / "t1_head.nii.gz"
    summary = run_demo(tmp_path, "cpu", log=lines.append, head=head)
    assert set(summary["modalities"]) == {"CT", "MR"}
    for modality in MODALITIES:
        assert summary["modalities"][modality]["mean_dice_student"] > 0.5
    assert summary["head"]["model"] == BRAIN_STUDENT and summary["head"]["teacher"] == "hd-bet"
    assert 800 < summary["head"]["brain_ml"] < 2000
    assert (tmp_path / "head_brain.nii.gz").is_file() and (tmp_path / "head_brain.seg.nrrd").is_file()
    assert "Real head" in (tmp_path / "report.md").read_text(encoding="utf-8")
    assert any("ml of brain" in line for line in lines)
