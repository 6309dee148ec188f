"""Scans outside a model's world are flagged with a reason, and the result is still written."""

from __future__ import annotations

import numpy as np
import pytest
from test_cli import medkd

from MedKDSegmentLib.engine import domain
from MedKDSegmentLib.engine.bundle import resolve_bundle
from MedKDSegmentLib.engine.inference import segment
from MedKDSegmentLib.engine.phantom import case_seed, generate_phantom
from MedKDSegmentLib.engine.volume import Volume, read_volume, write_volume


def head_ct() -> Volume:
    """A skull (bone) around brain-density tissue in air: a CT of another body region."""
    z, y, x = np.mgrid[:60, :64, :64]
    radius = np.sqrt(((z - 30) / 26) ** 2 + ((y - 32) / 28) ** 2 + ((x - 32) / 24) ** 2)
    array = np.where(radius < 0.9, 35.0, np.where(radius < 1.0, 900.0, -1000.0))
    array += np.random.default_rng(0).normal(0, 8, array.shape)
    return Volume(array.astype(np.float32), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0), modality="CT")


def test_record_puts_own_volumes_near_one_spread_and_floors_tiny_spreads():
    rng = np.random.default_rng(0)
    statistics = [rng.normal(10, 1, 8) for _ in range(6)]
    entry = domain.record(statistics, [0.01] * 6, "six volumes")
    assert entry["count"] == 6 and entry["own_distance_max"] < 2
    assert domain.distance(entry, np.full(8, 10.0)) < 1
    twins = domain.record([np.full(4, 5.0), np.full(4, 5.0)], [0.02, 0.02], "two identical volumes")
    # zero spread: the floor (5 % of the mean) keeps a 1 % change from looking like a different world
    assert domain.distance(twins, np.full(4, 5.05)) < 1 and domain.distance(twins, np.full(4, 7.0)) > 3


def test_bundled_student_accepts_phantoms_it_never_saw_and_flags_a_head_ct():
    student = resolve_bundle("phantom-abdomen-ct-student")
    assert student.info["domain"]["count"] >= 10
    for index in range(2):
        image, _ = generate_phantom("CT", case_seed(4242, index), size=(96, 80, 48), spacing=(4.0, 4.0, 5.0))
        assert segment(image, student, "cpu").warnings == []
    flagged = segment(head_ct(), student, "cpu")
    assert len(flagged.warnings) == 1 and "phantom-abdomen-ct-student" in flagged.warnings[0]
    assert "spreads" in flagged.warnings[0] and flagged.labels.same_grid(head_ct())


def test_real_brain_mr_is_flagged_by_the_abdominal_mr_student(shared_data):
    student = resolve_bundle("phantom-abdomen-mr-student")
    for path in (shared_data / "mr-brain-itk" / "t1_head.nii.gz", shared_data / "mr-brain-aseg" / "t1.nii.gz"):
        assert segment(read_volume(path, "MR"), student, "cpu").warnings, path


def test_cli_warns_on_stderr_and_still_writes_the_result(tmp_path):
    write_volume(head_ct(), tmp_path / "head.nii.gz")
    result = medkd("segment", "--model", "phantom-abdomen-ct-student", "--input", tmp_path / "head.nii.gz",
                   "--output", tmp_path / "out" / "head", "--modality", "CT")
    assert "warning: head.nii.gz: This scan looks unlike" in result.stderr
    assert (tmp_path / "out" / "head.nii.gz").is_file() and (tmp_path / "out" / "head.seg.nrrd").is_file()


@pytest.mark.parametrize("name", ["phantom-abdomen-ct-teacher", "phantom-abdomen-mr-teacher"])
def test_every_bundled_model_records_its_domain(name):
    info = resolve_bundle(name).info
    assert info["domain"]["distance_limit"] == domain.DISTANCE_LIMIT and len(info["domain"]["feature_mean"]) > 0
