"""Segmentation: labels on the input's exact grid, real progress, cancel, modality checks."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tiny import TINY_CT

from MedKDSegmentLib.engine.argmax_resample import resample_to_input
from MedKDSegmentLib.engine.errors import CancelledError, InvalidInputError
from MedKDSegmentLib.engine.inference import count_windows, predict_scores, segment
from MedKDSegmentLib.engine.phantom import generate_phantom
from MedKDSegmentLib.engine.profiles import model_grid, to_model_grid
from MedKDSegmentLib.engine.volume import Volume, read_volume


@pytest.fixture(scope="module")
def phantom_ct():
    return generate_phantom("CT", seed=5, size=(64, 56, 40), spacing=(6.0, 6.0, 6.0))


def test_labels_lie_on_the_input_grid(phantom_ct, tiny_bundle_session):
    image, _ = phantom_ct
    result = segment(image, tiny_bundle_session, "cpu")
    assert result.labels.same_grid(image, tolerance=0)
    assert result.labels.array.dtype == np.uint8
    assert result.labels.array.max() < 9
    assert set(result.seconds) == {"preprocess", "inference", "postprocess", "total"}


@pytest.mark.parametrize(
    "relative, modality",
    [
        ("ct-mr-abdomen-totalseg/ct.nii.gz", "CT"),
        ("ct-mr-abdomen-totalseg/ct_dicom", "CT"),
        ("ct-mr-abdomen-totalseg/mr.nii.gz", "MR"),
        ("mr-brain-tumor-pyradiomics/brain1_image.nrrd", "MR"),
    ],
)
def test_real_cases_come_back_on_their_grid(shared_data, tiny_bundle_session, tiny_mr_bundle, relative, modality):
    volume = read_volume(shared_data / relative)
    volume.modality = modality
    bundle = tiny_bundle_session if modality == "CT" else tiny_mr_bundle
    result = segment(volume, bundle, "cpu")
    source = sitk.ReadImage(str(shared_data / relative)) if not relative.endswith("ct_dicom") else None
    assert result.labels.same_grid(volume, tolerance=0)
    if source is not None:
        assert result.labels.shape == tuple(source.GetSize()[::-1])
        assert result.labels.spacing == source.GetSpacing()
        assert result.labels.direction == source.GetDirection()


def test_resampling_round_trip_reproduces_labels(phantom_ct):
    """One-hot scores taken to the model grid and back give the original labels almost everywhere."""
    image, labels = phantom_ct
    _, grid = to_model_grid(image, TINY_CT)
    fine = model_grid(grid, (3.0, 3.0, 3.0))
    on_model = sitk.Resample(labels.to_sitk(), fine, sitk.Transform(), sitk.sitkNearestNeighbor)
    one_hot = np.eye(9, dtype=np.float32)[sitk.GetArrayFromImage(on_model)].transpose(3, 0, 1, 2)
    back = resample_to_input(one_hot, fine, image)
    assert back.shape == labels.shape
    assert (back == labels.array).mean() > 0.97


def test_flipped_orientation_gives_the_same_physical_answer(phantom_ct, tiny_bundle_session):
    image, _ = phantom_ct
    flipped = Volume(
        image.array[:, :, ::-1].copy(),
        image.spacing,
        tuple(np.array(image.origin) + np.array([(image.shape[2] - 1) * image.spacing[0], 0, 0])),
        (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
        image.modality,
    )
    normal = segment(image, tiny_bundle_session, "cpu").labels.array
    mirrored = segment(flipped, tiny_bundle_session, "cpu").labels.array[:, :, ::-1]
    assert (normal == mirrored).mean() > 0.99


def test_progress_is_the_fraction_of_windows_done(tiny_bundle_session):
    network = tiny_bundle_session.load_network()
    image = np.random.default_rng(0).normal(size=(100, 110, 120)).astype(np.float32)
    fractions = []
    scores, _, padded = predict_scores(network, image, torch.device("cpu"), lambda f, s: fractions.append(f))
    windows = count_windows(padded)
    assert windows > 1
    assert fractions == pytest.approx([(i + 1) / windows for i in range(windows)])
    assert scores.shape == (9, *(s // 2 for s in padded))  # the student's half-resolution output


def test_cancel_stops_between_windows(tiny_bundle_session):
    network = tiny_bundle_session.load_network()
    image = np.random.default_rng(0).normal(size=(100, 110, 120)).astype(np.float32)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(CancelledError):
        predict_scores(network, image, torch.device("cpu"), None, cancel)
    assert len(calls) == 3


def test_modality_mismatch_is_explained(phantom_ct, tiny_mr_bundle):
    image, _ = phantom_ct
    with pytest.raises(InvalidInputError, match="The volume is CT but model .* is for MR"):
        segment(image, tiny_mr_bundle, "cpu")


def test_unavailable_device_is_explained(phantom_ct, tiny_bundle_session):
    image, _ = phantom_ct
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InvalidInputError, match="Device 'cuda' was asked for but is not available"):
        segment(image, tiny_bundle_session, "cuda")


def test_out_of_memory_on_cuda_falls_back_to_cpu_stitching_then_cpu(monkeypatch):
    """The fallback order is exercised without a GPU by making the first attempts run out of memory."""
    from MedKDSegmentLib.engine import inference

    attempts = []

    def fake_sliding_window(network, image, compute, stitch, windows, report, cancel):
        attempts.append((compute.type, stitch.type))
        if len(attempts) < 3:
            raise torch.cuda.OutOfMemoryError("simulated")
        return np.zeros((9, *image.shape), np.float32)

    class Network(torch.nn.Module):
        def to(self, device):  # no GPU here; the device is only recorded
            return self

    monkeypatch.setattr(inference, "_sliding_window", fake_sliding_window)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    stages = []
    _, used, _ = predict_scores(
        Network(), np.zeros((8, 8, 8), np.float32), torch.device("cuda"), lambda f, s: stages.append(s)
    )
    assert attempts == [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cpu")]
    assert used.type == "cpu"
    assert sum("out of memory" in s for s in stages) == 2
