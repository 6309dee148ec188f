"""Students' ONNX copies: written with every bundle of a window-independent network, verified before use, the
same labels and domain evidence as torch, and a command-line job that imports neither torch nor MONAI."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny import TINY_TEACHER, make_bundle

from MedKDSegmentLib.engine import windowing
from MedKDSegmentLib.engine.bundle import resolve_bundle
from MedKDSegmentLib.engine.demo import model_name
from MedKDSegmentLib.engine.errors import BundleError
from MedKDSegmentLib.engine.inference import load_runner, segment
from MedKDSegmentLib.engine.onnx_network import ONNX_WEIGHTS, OnnxNetwork
from MedKDSegmentLib.engine.phantom import generate_phantom
from MedKDSegmentLib.engine.prediction import predict
from MedKDSegmentLib.engine.profiles import to_model_grid
from MedKDSegmentLib.engine.volume import read_volume, write_volume
from MedKDSegmentLib.engine.windowing import pad_to_multiple_of_8

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_student_bundle_carries_a_verified_onnx_copy_and_a_window_dependent_teacher_none(tmp_path):
    student = make_bundle(tmp_path / "student")
    assert student.onnx is not None and (student.path / ONNX_WEIGHTS).is_file()
    assert isinstance(load_runner(student, "cpu"), OnnxNetwork)
    teacher = make_bundle(tmp_path / "teacher", architecture=TINY_TEACHER, role="teacher")  # instance norm
    assert teacher.onnx is None and not (teacher.path / ONNX_WEIGHTS).exists()
    assert isinstance(load_runner(teacher, "cpu"), torch.nn.Module)


def test_without_the_onnx_package_a_bundle_is_saved_without_a_copy_and_runs_in_torch(tmp_path, monkeypatch):
    from MedKDSegmentLib.engine import bundle as bundle_module

    monkeypatch.setattr(bundle_module, "onnx_exporter_installed", lambda: False)
    student = make_bundle(tmp_path / "student")
    assert student.onnx is None and not (student.path / ONNX_WEIGHTS).exists()
    assert isinstance(load_runner(student, "cpu"), torch.nn.Module)


def test_a_changed_onnx_copy_is_refused(tmp_path):
    bundle = make_bundle(tmp_path / "student")
    with open(bundle.path / ONNX_WEIGHTS, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="does not match its recorded sha256"):
        bundle.load_onnx()


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_onnx_copy_gives_the_torch_labels_and_evidence_on_held_out_phantoms(modality):
    bundle = resolve_bundle(model_name(modality, "student"))
    onnx, network = bundle.load_onnx(), bundle.load_network()
    image, truth = generate_phantom(modality, seed=4243, size=(128, 128, 80), spacing=(3.0, 3.0, 3.0))
    prepared, _ = to_model_grid(image, bundle.profile)
    scores, statistics, entropy = onnx(pad_to_multiple_of_8(prepared))
    torch_scores, _, _, _, (torch_statistics, torch_entropy) = predict(network, prepared, torch.device("cpu"),
                                                                       domain=True)
    np.testing.assert_allclose(scores, torch_scores, atol=2e-5)
    np.testing.assert_allclose(statistics, torch_statistics, rtol=1e-4, atol=1e-5)
    assert float(entropy[0, :prepared.shape[0], :prepared.shape[1], :prepared.shape[2]].mean()) == pytest.approx(
        torch_entropy, rel=1e-4)
    fast, slow = segment(image, bundle, "cpu", network=onnx), segment(image, bundle, "cpu", network=network)
    assert fast.device == "cpu (ONNX Runtime)" and fast.windows == 1
    np.testing.assert_array_equal(fast.labels.array, slow.labels.array)
    assert fast.warnings == slow.warnings
    body = truth.array > 0
    assert (fast.labels.array[body] == truth.array[body]).mean() > 0.8


@pytest.mark.parametrize("relative, modality", [
    ("ct-mr-abdomen-totalseg/ct.nii.gz", "CT"),
    ("ct-mr-abdomen-totalseg/ct_dicom", "CT"),
    ("ct-mr-abdomen-totalseg/mr.nii.gz", "MR"),
])
def test_onnx_copy_gives_the_torch_labels_on_real_cases(shared_data, relative, modality):
    bundle = resolve_bundle(model_name(modality, "student"))
    volume = read_volume(shared_data / relative, modality)
    fast = segment(volume, bundle, "cpu", network=bundle.load_onnx())
    slow = segment(volume, bundle, "cpu", network=bundle.load_network())
    np.testing.assert_array_equal(fast.labels.array, slow.labels.array)
    assert fast.warnings == slow.warnings


def test_a_volume_too_large_for_one_pass_goes_to_the_sliding_window(monkeypatch):
    bundle = resolve_bundle(model_name("CT", "student"))
    image, _ = generate_phantom("CT", seed=4244, size=(160, 160, 64), spacing=(3.0, 3.0, 3.0))
    monkeypatch.setattr(windowing, "WHOLE_VOLUME_BYTES", 0)
    result = segment(image, bundle, "cpu", network=bundle.load_onnx())
    assert result.windows > 1 and "ONNX" not in result.device


def test_the_command_line_segments_with_a_student_without_torch_or_monai(tmp_path):
    image, _ = generate_phantom("CT", seed=4245, size=(96, 96, 64), spacing=(3.0, 3.0, 3.0))
    scan = write_volume(image, tmp_path / "scan.nii.gz")
    code = ("import runpy, sys\ntry:\n    runpy.run_module('MedKDSegmentLib', run_name='__main__')\nfinally:\n"
            "    print('loaded:', sorted(m for m in ('torch', 'monai') if m in sys.modules), file=sys.stderr)")
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "MedKDSegment"))
    run = subprocess.run([sys.executable, "-c", code, "--quiet", "segment", "--input", str(scan), "--output",
                          str(tmp_path / "out"), "--model", model_name("CT", "student"), "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "loaded: []" in run.stderr
    expected = segment(image, resolve_bundle(model_name("CT", "student")), "cpu")
    np.testing.assert_array_equal(read_volume(tmp_path / "out.nii.gz").array, expected.labels.array)
