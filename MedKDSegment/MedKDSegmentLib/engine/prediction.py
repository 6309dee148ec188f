"""Running a torch network over a prepared image: one pass over the whole image, or a sliding window.

A network whose output at a voxel depends only on the voxels around it (no instance, group or layer
normalisation) runs in one pass over the whole image when its activations fit
``windowing.WHOLE_VOLUME_BYTES``: no overlapping windows to compute twice and blend, and the domain
check reads the same pass (``WholeVolumeOutputs``, which is also what its ONNX copy computes). Otherwise
MONAI's sliding window runs; progress is the real fraction of windows done and a ``cancel`` callable stops
between windows. On CUDA the network runs under autocast (float16); if the GPU runs out of memory the
volume is stitched on the CPU, and as a last resort the whole job moves to the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer
from torch import nn

from . import windowing
from .distillation import FeatureTap
from .domain import evidence
from .errors import CancelledError
from .networks import feature_layer, full_resolution
from .windowing import pad_to_multiple_of_8

ROI_SIZE = (96, 96, 96)
OVERLAP = 0.25
# Layers whose statistics span the whole input: a window sees different ones than the whole volume.
WINDOW_DEPENDENT = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm,
                    nn.LocalResponseNorm)

Progress = Callable[[float, str], None]


def count_windows(shape: tuple[int, ...], roi: tuple[int, ...] = ROI_SIZE, overlap: float = OVERLAP) -> int:
    """How many windows MONAI's sliding window visits for an image of ``shape``: it steps by
    (1 - overlap) x the window, or by the whole axis where the window spans it."""
    roi = tuple(min(r, s) for r, s in zip(roi, shape))
    interval = tuple(r if r == s else max(int(r * (1 - overlap)), 1) for r, s in zip(roi, shape))
    return len(dense_patch_slices(shape, roi, interval))


class WholeVolumeOutputs(nn.Module):
    """``network`` on a whole padded image, returning what segmentation and the domain check need, in one
    graph (run here, or exported to ONNX): softmax scores at the network's output resolution, the deepest
    features' per-channel mean and std (``networks.feature_layer``), and the normalised entropy of the
    prediction at the image's resolution."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.layer = feature_layer(network)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with FeatureTap(self.network, [self.layer]) as tap:
            logits = self.network(image).float()
            features = tap.features[self.layer][0].float()
        statistics = torch.cat([features.mean((1, 2, 3)), features.std((1, 2, 3))])
        probabilities = _softmax_over_classes(full_resolution(logits, tuple(image.shape[2:])))
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(1) / math.log(probabilities.shape[1])
        return _softmax_over_classes(logits), statistics, entropy


def _softmax_over_classes(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over axis 1; written out when exported, because ONNX Runtime's Softmax on a middle axis transposes
    the volume twice (25x slower than these element-wise steps on a CT). The values agree to float rounding."""
    if not torch.jit.is_tracing():
        return torch.softmax(logits, 1)
    shifted = (logits - logits.amax(1, keepdim=True)).exp()
    return shifted / shifted.sum(1, keepdim=True)


def scan_statistics(network: nn.Module, padded: np.ndarray, size: tuple[int, ...]) -> tuple[np.ndarray, float]:
    """One whole-volume pass: the domain evidence (``domain.evidence``) of a prepared, padded image whose
    unpadded part is ``size`` (z, y, x)."""
    network.eval()
    device = next(network.parameters()).device
    with torch.inference_mode():
        _, statistics, entropy = WholeVolumeOutputs(network)(as_batch(padded).to(device))
    return evidence(statistics.cpu().numpy(), entropy.cpu().numpy(), size)


def as_batch(image: np.ndarray) -> torch.Tensor:
    """A (z, y, x) or (C, z, y, x) array as a batch of one: (1, C, z, y, x)."""
    tensor = torch.from_numpy(image)
    return tensor[None, None] if image.ndim == 3 else tensor[None]


def window_independent(network: nn.Module) -> bool:
    """Whether the network's output at a voxel depends only on the voxels around it: no layer in
    ``WINDOW_DEPENDENT`` (a TorchScript module cannot be inspected, so it does not count)."""
    if isinstance(network, torch.jit.ScriptModule):
        return False
    return any(isinstance(m, nn.Conv3d) for m in network.modules()) and not any(
        isinstance(m, WINDOW_DEPENDENT) for m in network.modules())


def activation_bytes_per_voxel(network: nn.Module) -> float:
    """Bytes a whole-volume pass holds per input voxel, estimated from the first convolution's output
    (channels over its stride's volume, float32, times a few maps alive at once)."""
    first = next(m for m in network.modules() if isinstance(m, nn.Conv3d))
    return first.out_channels * 4 * 6 / float(np.prod(first.stride))


def whole_volume_fits(network: nn.Module, padded_shape: tuple[int, ...]) -> bool:
    """Whether one pass over the whole (padded) image replaces the sliding window: the network is
    ``window_independent`` and its activations fit ``windowing.WHOLE_VOLUME_BYTES``."""
    return window_independent(network) and windowing.fits_one_pass(padded_shape, activation_bytes_per_voxel(network))


def device_attempts(device: torch.device) -> list[tuple[torch.device, torch.device]]:
    """The (compute, stitch) devices ``predict`` tries in turn when CUDA runs out of memory: everything on the GPU,
    then windows computed there and stitched on the CPU, then everything on the CPU. Elsewhere there is one."""
    cpu = torch.device("cpu")
    return [(device, device), (device, cpu), (cpu, cpu)] if device.type == "cuda" else [(device, device)]


def predict(
    network: nn.Module,
    image: np.ndarray,
    device: torch.device,
    report: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    domain: bool = False,
) -> tuple[np.ndarray, torch.device, tuple[int, ...], int, tuple[np.ndarray, float] | None]:
    """Softmax scores (C, z, y, x) of a prepared image at the network's output resolution, with the device
    used, the padded shape (the image is padded at its far end to a multiple of 8 so every stride-2 stage
    halves exactly), the windows run (1 for a whole-volume pass) and, when ``domain``, the domain evidence.

    One pass over the whole image when ``whole_volume_fits``, else a sliding window (and, for the domain
    evidence, one more pass). Falls back to CPU stitching (the sliding window), then CPU compute, when CUDA
    runs out of memory.
    """
    report = report or (lambda fraction, stage: None)
    padded = pad_to_multiple_of_8(image)
    size, spatial = image.shape[-3:], padded.shape[-3:]
    windows = count_windows(spatial)
    whole = whole_volume_fits(network, spatial)
    attempts = device_attempts(device)
    for index, (compute, stitch) in enumerate(attempts):
        try:
            if whole and compute == stitch:
                scores, found = _whole_volume(network.to(compute), padded, compute, size, cancel, domain)
                report(1.0, "inference")
                return scores, compute, spatial, 1, found
            scores = _sliding_window(network.to(compute), padded, compute, stitch, windows, report, cancel)
            found = scan_statistics(network, padded, size) if domain else None
            return scores, compute, spatial, windows, found
        except torch.cuda.OutOfMemoryError:
            if index == len(attempts) - 1:
                raise
            torch.cuda.empty_cache()
            report(0.0, f"out of memory on {compute.type}; retrying with results kept on the CPU")
    raise AssertionError("unreachable")


def predict_scores(
    network: nn.Module,
    image: np.ndarray,
    device: torch.device,
    report: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, torch.device, tuple[int, ...]]:
    """``predict``'s scores, device used and padded shape."""
    return predict(network, image, device, report, cancel)[:3]


def predict_labels(
    network: nn.Module, image: np.ndarray, device: torch.device, cancel: Callable[[], bool] | None = None
) -> np.ndarray:
    """Arg-max labels (uint8) of a prepared image on the model grid (no resampling back)."""
    network.eval()
    scores, _, padded = predict_scores(network, image, device, cancel=cancel)
    labels = full_resolution(torch.from_numpy(scores)[None], padded)[0].argmax(0).numpy().astype(np.uint8)
    z, y, x = image.shape[-3:]
    return labels[:z, :y, :x]


def _whole_volume(network, padded, compute, size, cancel, domain) -> tuple[np.ndarray, tuple | None]:
    if cancel is not None and cancel():
        raise CancelledError()
    tensor = as_batch(padded).to(compute)
    with torch.inference_mode(), torch.autocast(compute.type, dtype=torch.float16, enabled=compute.type == "cuda"):
        if not domain:
            return torch.softmax(network(tensor).float(), 1)[0].cpu().numpy(), None
        scores, statistics, entropy = WholeVolumeOutputs(network)(tensor)
    return scores[0].cpu().numpy(), evidence(statistics.float().cpu().numpy(), entropy.float().cpu().numpy(), size)


def sliding_window_inferer(shape: tuple[int, ...], compute: torch.device, stitch: torch.device) -> SlidingWindowInferer:
    """MONAI's sliding window as every caller here runs it (96³ windows, 25 % overlap, Gaussian blending).
    Windows never exceed the (padded) image: MONAI would pad them with zeros, which are not background after
    normalisation and skew instance-normalised networks."""
    return SlidingWindowInferer(roi_size=tuple(min(r, s) for r, s in zip(ROI_SIZE, shape)), sw_batch_size=1,
                                overlap=OVERLAP, mode="gaussian", sw_device=compute, device=stitch)


def _sliding_window(
    network: nn.Module,
    image: np.ndarray,
    compute: torch.device,
    stitch: torch.device,
    windows: int,
    report: Progress,
    cancel: Callable[[], bool] | None,
) -> np.ndarray:
    done = 0

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        nonlocal done
        if cancel is not None and cancel():
            raise CancelledError()
        with torch.autocast(compute.type, dtype=torch.float16, enabled=compute.type == "cuda"):
            logits = network(batch)
        done += batch.shape[0]
        report(done / windows, "inference")
        return torch.softmax(logits.float(), dim=1)

    inferer = sliding_window_inferer(image.shape[-3:], compute, stitch)
    tensor = as_batch(image)
    with torch.inference_mode():
        scores = inferer(tensor, predictor)
    return scores[0].float().cpu().numpy()
