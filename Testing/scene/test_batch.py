"""The headless batch script on a small folder: the engine fallback (plain Python) and the Slicer path (MRML)."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from scene_helpers import REPO

from MedKDSegmentLib.engine.segfile import read_seg_nrrd_names
from MedKDSegmentLib.engine.volume import read_volume, write_volume

SCRIPT = REPO / "scripts" / "slicer_batch.py"
STRUCTURES = ["liver", "spleen", "right kidney", "left kidney", "aorta", "vertebral bodies", "pancreas",
              "inferior vena cava"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory, ct_volume):
    folder = tmp_path_factory.mktemp("cases")
    write_volume(ct_volume, folder / "case_a.nii.gz")
    write_volume(ct_volume.with_array(ct_volume.array[:, :, ::-1].copy()), folder / "case_b.nrrd")
    (folder / "notes.txt").write_text("not a volume")
    return folder


@pytest.fixture(scope="module")
def batch():
    spec = importlib.util.spec_from_file_location("slicer_batch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_rows(folder):
    with open(folder / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def check_segmentation_files(cases, output, model):
    for case in ("case_a", "case_b"):
        path = output / f"{case}_{model}.seg.nrrd"
        assert path.is_file()
        assert list(read_seg_nrrd_names(path).values()) == STRUCTURES
        labels = read_volume(path)
        source = read_volume(next(cases.glob(f"{case}.*")))
        assert labels.same_grid(source)
        assert labels.array.max() <= 8
    assert not list(output.glob(".partial-*"))


def test_plain_python_runs_the_engine(cases, tmp_path, models_dir):
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--input", str(cases), "--output", str(output), "--model",
         "selftest-ct-student", "--models-dir", str(models_dir), "--device", "cpu"],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert "2/2 cases" in result.stdout and "(engine)" in result.stdout
    check_segmentation_files(cases, output, "selftest-ct-student")
    rows = read_rows(output)
    assert [r["structure"] for r in rows if r["case"] == "case_a"] == STRUCTURES
    liver = next(r for r in rows if r["case"] == "case_a" and r["structure"] == "liver")
    assert liver["model"] == "selftest-ct-student" and liver["device"].startswith("cpu")
    assert float(liver["seconds"]) > 0 and int(liver["parameters"]) > 0 and float(liver["volume_ml"]) >= 0


def test_compare_in_the_slicer_path_on_mrml(batch, cases, tmp_path, models_dir, scene):
    """The Slicer branch (Logic + storage nodes) on the real MRML scene; the scene is left as found."""
    output = tmp_path / "out"
    nodes_before = scene.GetNumberOfNodes()
    code = batch.main(["--", "--input", str(cases), "--output", str(output), "--model", "selftest-ct-student",
                       "--models-dir", str(models_dir), "--device", "cpu", "--compare"], use_slicer=True)
    assert code == 0
    check_segmentation_files(cases, output, "selftest-ct-student")
    check_segmentation_files(cases, output, "selftest-ct-teacher")
    assert list(read_seg_nrrd_names(output / "case_a_disagreement.seg.nrrd").values()) == \
        ["teacher only", "student only", "different structure"]
    rows = read_rows(output)
    compared = [r for r in rows if r["mode"] == "compare" and r["case"] == "case_b"]
    assert [r["structure"] for r in compared] == STRUCTURES
    for row in compared:
        assert row["teacher"] == "selftest-ct-teacher" and row["student"] == "selftest-ct-student"
        assert row["dice_teacher_student"] == "" or 0.0 <= float(row["dice_teacher_student"]) <= 1.0
        assert float(row["teacher_seconds"]) > 0 and float(row["student_seconds"]) > 0
    per_model = {r["model"] for r in rows if r["mode"] == "segment"}
    assert per_model == {"selftest-ct-teacher", "selftest-ct-student"}
    assert scene.GetNumberOfNodes() == nodes_before


def test_a_failing_case_is_reported_and_the_others_still_run(batch, tmp_path, models_dir, ct_volume):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_volume(ct_volume, folder / "good.nii.gz")
    write_volume(ct_volume.with_array(np.zeros_like(ct_volume.array)), folder / "blank.nii.gz")
    output = tmp_path / "out"
    code = batch.main(["--input", str(folder), "--output", str(output), "--model", "selftest-ct-student",
                       "--models-dir", str(models_dir), "--device", "cpu"], use_slicer=False)
    assert code == 1
    rows = read_rows(output)
    assert any(r["case"] == "blank" and "constant" in r["error"] for r in rows)
    assert (output / "good_selftest-ct-student.seg.nrrd").is_file()
    assert not (output / "blank_selftest-ct-student.seg.nrrd").exists()
