"""Segmentation: labels on the input's exact grid, real progress, cancel, modality checks."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tiny import TINY_CT

from MedKDSegmentLib.engine.argmax_resample import resample_to_input
from MedKDSegmentLib.engine.errors import CancelledError, InvalidInputError
from MedKDSegmentLib.engine.inference import segment
from MedKDSegmentLib.engine.phantom import generate_phantom
from MedKDSegmentLib.engine.prediction import count_windows, predict_scores
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


@pytest.fixture
def sliding_window(monkeypatch):
    """No whole-volume pass: the window-by-window path, as for large volumes and window-dependent networks."""
    from MedKDSegmentLib.engine import windowing

    monkeypatch.setattr(windowing, "WHOLE_VOLUME_BYTES", 0)


def test_progress_is_the_fraction_of_windows_done(tiny_bundle_session, sliding_window):
    network = tiny_bundle_session.load_network()
    image = np.random.default_rng(0).normal(size=(100, 110, 120)).astype(np.float32)
    fractions = []
    scores, _, padded = predict_scores(network, image, torch.device("cpu"), lambda f, s: fractions.append(f))
    windows = count_windows(padded)
    assert windows > 1
    assert fractions == pytest.approx([(i + 1) / windows for i in range(windows)])
    assert scores.shape == (9, *(s // 2 for s in padded))  # the student's half-resolution output


def test_cancel_stops_between_windows(tiny_bundle_session, sliding_window):
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
    from MedKDSegmentLib.engine import prediction

    attempts = []

    def fake_sliding_window(network, image, compute, stitch, windows, report, cancel):
        attempts.append((compute.type, stitch.type))
        if len(attempts) < 3:
            raise torch.cuda.OutOfMemoryError("simulated")
        return np.zeros((9, *image.shape), np.float32)

    class Network(torch.nn.Module):
        def to(self, device):  # no GPU here; the device is only recorded
            return self

    monkeypatch.setattr(prediction, "_sliding_window", fake_sliding_window)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    stages = []
    _, used, _ = predict_scores(
        Network(), np.zeros((8, 8, 8), np.float32), torch.device("cuda"), lambda f, s: stages.append(s)
    )
    assert attempts == [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cpu")]
    assert used.type == "cpu"
    assert sum("out of memory" in s for s in stages) == 2


def test_a_whole_volume_pass_out_of_gpu_memory_falls_back_to_windows_stitched_on_the_cpu(monkeypatch,
                                                                                          tiny_bundle_session):
    """The whole-volume pass is the first attempt on CUDA; running out of memory there goes on to the sliding
    window with results kept on the CPU (simulated without a GPU)."""
    from MedKDSegmentLib.engine import prediction

    attempts = []

    def whole_out_of_memory(network, padded, compute, size, cancel, domain):
        attempts.append(("whole", compute.type))
        raise torch.cuda.OutOfMemoryError("simulated")

    def windows(network, image, compute, stitch, count, report, cancel):
        attempts.append(("windows", compute.type, stitch.type))
        return np.zeros((9, *image.shape), np.float32)

    network = tiny_bundle_session.load_network()
    monkeypatch.setattr(network, "to", lambda device: network)  # no GPU here: the device is only recorded
    monkeypatch.setattr(prediction, "_whole_volume", whole_out_of_memory)
    monkeypatch.setattr(prediction, "_sliding_window", windows)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    _, used, _, count, _ = prediction.predict(network, np.zeros((16, 16, 16), np.float32), torch.device("cuda"))
    assert attempts == [("whole", "cuda"), ("windows", "cuda", "cpu")]
    assert used.type == "cuda" and count == prediction.count_windows((16, 16, 16))


def test_whole_volume_pass_agrees_with_the_sliding_window_and_serves_the_domain_check(monkeypatch):
    """The bundled CT student (batch norm) on a held-out phantom: one pass over the whole image instead of
    overlapping windows, the domain evidence read from the same pass."""
    from MedKDSegmentLib.engine import prediction, windowing
    from MedKDSegmentLib.engine.bundle import resolve_bundle
    from MedKDSegmentLib.engine.demo import model_name
    from MedKDSegmentLib.engine.distillation import FeatureTap
    from MedKDSegmentLib.engine.networks import feature_layer

    bundle = resolve_bundle(model_name("CT", "student"))
    network = bundle.load_network()
    image, truth = generate_phantom("CT", seed=4242, size=(128, 128, 80), spacing=(3.0, 3.0, 3.0))
    prepared, _ = to_model_grid(image, bundle.profile)
    padded = windowing.pad_to_multiple_of_8(prepared)
    assert prediction.whole_volume_fits(network, padded.shape)
    fractions = []
    scores, _, _, windows, (statistics, entropy) = prediction.predict(
        network, prepared, torch.device("cpu"), lambda f, s: fractions.append(f), domain=True)
    assert fractions == [1.0] and windows == 1
    # The evidence by its definition: the deepest features' channel means and spreads, and the mean
    # normalised entropy of the full-resolution prediction inside the unpadded image.
    with FeatureTap(network, [feature_layer(network)]) as tap, torch.inference_mode():
        logits = network(torch.from_numpy(padded)[None, None])
        features = next(iter(tap.features.values()))[0]
    np.testing.assert_allclose(statistics[:len(statistics) // 2], features.mean((1, 2, 3)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(statistics[len(statistics) // 2:], features.std((1, 2, 3)).numpy(), rtol=1e-5)
    full = torch.softmax(torch.nn.functional.interpolate(logits, size=padded.shape, mode="trilinear"), 1)[0]
    full = full[:, : prepared.shape[0], : prepared.shape[1], : prepared.shape[2]].numpy().astype(np.float64)
    assert entropy == pytest.approx(float((-(full * np.log(np.maximum(full, 1e-12))).sum(0) / np.log(9)).mean()),
                                    rel=1e-4)
    np.testing.assert_allclose(scores, torch.softmax(logits, 1)[0].numpy(), atol=1e-6)

    whole = segment(image, bundle, "cpu", network=network)
    monkeypatch.setattr(windowing, "WHOLE_VOLUME_BYTES", 0)
    windowed = segment(image, bundle, "cpu", network=network)
    assert (whole.windows, windowed.windows) == (1, count_windows(padded.shape))
    assert (whole.labels.array == windowed.labels.array).mean() > 0.995
    assert whole.warnings == windowed.warnings == []
    body = truth.array > 0
    assert (whole.labels.array[body] == truth.array[body]).mean() > 0.8


def test_window_dependent_networks_keep_the_sliding_window(tiny_bundle_session):
    from monai.networks.nets import UNet

    from MedKDSegmentLib.engine.prediction import whole_volume_fits

    student = tiny_bundle_session.load_network()
    assert whole_volume_fits(student, (104, 144, 144))
    assert not whole_volume_fits(student, (512, 512, 512))  # beyond the activation budget
    instance_norm = UNet(3, 1, 9, channels=(4, 8), strides=(2,))  # MONAI's default: instance normalisation
    assert not whole_volume_fits(instance_norm, (32, 32, 32))
    assert not whole_volume_fits(torch.jit.script(student), (32, 32, 32))  # cannot be inspected


def test_the_device_names_its_threads_in_plain_english(monkeypatch):
    from MedKDSegmentLib.engine.device import describe_device

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert describe_device(torch.device("cpu")) == "cpu (1 thread)"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert describe_device(torch.device("cpu")) == "cpu (2 threads)"
