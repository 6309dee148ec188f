"""A bundle's ``configs/inference.json``, run by MONAI's own runner (``python -m monai.bundle run``), labels a
volume as ``medkd segment`` does: the same model grid, intensities, padding, network pass and interpolation
back onto the input's grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tiny import NUM_CLASSES, TINY_CT, TINY_MR, TINY_STUDENT

from MedKDSegmentLib.engine.bundle import find_bundles, resolve_bundle, save_bundle
from MedKDSegmentLib.engine.inference import segment
from MedKDSegmentLib.engine.labels import ABDOMEN_STRUCTURES
from MedKDSegmentLib.engine.modality_norm import make_modality_specific
from MedKDSegmentLib.engine.monai_config import CONFIG, LOGGING, inference_config
from MedKDSegmentLib.engine.networks import build_network
from MedKDSegmentLib.engine.phantom import generate_phantom
from MedKDSegmentLib.engine.volume import Volume, read_volume, write_volume

MODULE_FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["MedKDSegmentLib"].__file__)))
# The labels may differ only where two classes' scores tie to float rounding (MONAI interpolates in float32,
# MedKDSegment in double): at most 1 voxel in 100,000 (measured: 0 or 1 voxel per volume).
MAX_DIFFERING = 1e-5


def monai_run(bundle_path, volume: Volume, folder, *overrides: str) -> sitk.Image:
    """Labels MONAI's runner writes for ``volume`` with the bundle's own config (only MedKDSegment's network
    class importable from it)."""
    inputs, outputs = folder / "input", folder / "output"
    inputs.mkdir(parents=True)
    write_volume(volume, inputs / "case.nii.gz")
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle_path / CONFIG),
                    "--bundle_root", str(bundle_path), "--dataset_dir", str(inputs), "--output_dir", str(outputs),
                    *overrides], check=True, capture_output=True, env={**os.environ, "PYTHONPATH": MODULE_FOLDER})
    return sitk.ReadImage(str(outputs / "case_seg.nii.gz"))


def assert_same_labels(written: sitk.Image, expected: Volume) -> None:
    assert written.GetSize() == expected.to_sitk().GetSize()
    np.testing.assert_allclose(written.GetOrigin(), expected.origin, atol=1e-3)
    np.testing.assert_allclose(written.GetSpacing(), expected.spacing, atol=1e-5)
    np.testing.assert_allclose(written.GetDirection(), expected.direction, atol=1e-5)
    labels = sitk.GetArrayFromImage(written)
    assert (expected.array > 0).mean() > 0.01  # something was segmented
    assert (labels != expected.array).mean() <= MAX_DIFFERING


def oblique(volume: Volume) -> Volume:
    """``volume`` tilted and flipped, off the origin: a grid neither axis-aligned nor LPS."""
    tilt = np.array(sitk.VersorTransform((0.2, -0.1, 1.0), 0.3).GetMatrix()).reshape(3, 3) @ np.diag([-1.0, 1, -1])
    return Volume(volume.array, volume.spacing, (40.0, -25.0, 130.0), tuple(tilt.ravel()), volume.modality)


def test_every_bundled_model_carries_its_current_config():
    for bundle in find_bundles():
        config = inference_config(bundle.metadata)
        assert config is not None, bundle.name
        assert json.loads((bundle.path / CONFIG).read_text()) == config, f"{bundle.name}: run build_models.py --upgrade"
        assert (bundle.path / LOGGING).is_file()


def test_a_published_pipeline_or_an_imported_network_gets_no_config():
    metadata = resolve_bundle("phantom-abdomen-ct-teacher").metadata
    pipeline = {**metadata, "medkdsegment": {**metadata["medkdsegment"], "pipeline": {"name": "hd-bet"}}}
    scripted = {**metadata, "medkdsegment": {**metadata["medkdsegment"], "architecture": {"name": "TorchScript"}}}
    assert inference_config(pipeline) is None and inference_config(scripted) is None


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_monai_runner_labels_an_oblique_phantom_as_medkd_does(role, tmp_path):
    """A CT phantom at 2.5 mm (the models' grid is 3 mm), tilted: resampling both ways, and the student's
    half-resolution output, all happen."""
    image, _ = generate_phantom("CT", seed=7, size=(96, 80, 40), spacing=(2.5, 2.5, 4.0))
    volume = oblique(image)
    bundle = resolve_bundle(f"phantom-abdomen-ct-{role}")
    assert_same_labels(monai_run(bundle.path, volume, tmp_path), segment(volume, bundle, "cpu").labels)


@pytest.mark.parametrize("relative, model", [
    ("ct-mr-abdomen-totalseg/ct_dicom", "phantom-abdomen-ct-student"),  # 512 x 512 at 0.98 mm, 2 mm slices
    ("ct-mr-abdomen-totalseg/mr.nii.gz", "phantom-abdomen-mr-student"),
    ("mr-brain-itk/t1_head.nii.gz", "hdbet-brain-mr-student"),  # oblique, 2 x 2 x 3 mm onto 1.5 mm
])
def test_monai_runner_labels_real_scans_as_medkd_does(shared_data, relative, model, tmp_path):
    bundle = resolve_bundle(model)
    volume = read_volume(shared_data / relative, bundle.modality)
    assert_same_labels(monai_run(bundle.path, volume, tmp_path), segment(volume, bundle, "cpu").labels)


def test_a_ct_mr_bundle_runs_each_modality_with_its_own_norms(tmp_path):
    torch.manual_seed(3)
    network = make_modality_specific(build_network(TINY_STUDENT, NUM_CLASSES))
    bundle = save_bundle(tmp_path / "ct-mr", network, name="ct-mr", role="student", architecture=TINY_STUDENT,
                         profiles={"CT": TINY_CT, "MR": TINY_MR}, structures=ABDOMEN_STRUCTURES,
                         method={"name": "untrained"})
    assert (bundle.path / CONFIG).is_file()  # written with the bundle
    image, _ = generate_phantom("MR", seed=4, size=(64, 56, 40), spacing=(6.0, 6.0, 6.0))
    volume = oblique(image)
    expected = segment(volume, bundle, "cpu").labels
    assert_same_labels(monai_run(bundle.path, volume, tmp_path / "mr", "--modality", "MR"), expected)
    as_ct = sitk.GetArrayFromImage(monai_run(bundle.path, volume, tmp_path / "ct"))  # CT's norms and window
    assert (as_ct != expected.array).mean() > 0.01
