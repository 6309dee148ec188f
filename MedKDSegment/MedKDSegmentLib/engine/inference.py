"""Segmentation of a volume with a bundle: preprocess, sliding window, back to the input grid.

Progress is the real fraction of windows done; a ``cancel`` callable stops between
windows. A network whose output at a voxel depends only on the voxels around it (no instance,
group or layer normalisation) runs in one pass over the whole image when its activations fit
``WHOLE_VOLUME_BYTES``: no overlapping windows to compute twice and blend, and the domain check
reads the same pass. On CUDA the network runs under autocast (float16); if the GPU runs out of
memory the volume is stitched on the CPU, and as a last resort the whole job moves to the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer

from .argmax_resample import resample_to_input
from .bundle import Bundle
from .device import describe_device, select_device
from .distillation import FeatureTap
from .domain import domain_warnings, scan_statistics, statistics_of
from .errors import CancelledError, InvalidInputError
from .networks import feature_layer, full_resolution, output_stride
from .pipelines import run_pipeline
from .profiles import model_grid, to_model_grid
from .unpaired import use_modality
from .volume import Volume, check_image, detect_modality

Progress = Callable[[float, str], None]
ROI_SIZE = (96, 96, 96)
OVERLAP = 0.25
# Activations of one whole-volume pass, estimated from the first convolution's output (times a few live maps).
WHOLE_VOLUME_BYTES = 1e9
# Layers whose statistics span the whole input: a window sees different ones than the whole volume.
WINDOW_DEPENDENT = (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d, torch.nn.GroupNorm,
                    torch.nn.LayerNorm, torch.nn.LocalResponseNorm)


@dataclass
class Segmentation:
    labels: Volume  # uint8 label values on the input's grid
    bundle_name: str
    device: str
    seconds: dict[str, float]  # per stage: preprocess, inference, postprocess, total
    windows: int
    warnings: list[str] = field(default_factory=list)  # e.g. the scan lies outside the model's world


def count_windows(shape: tuple[int, ...], roi: tuple[int, ...] = ROI_SIZE, overlap: float = OVERLAP) -> int:
    """How many windows MONAI's sliding window visits for an image of ``shape``: it steps by
    (1 - overlap) x the window, or by the whole axis where the window spans it."""
    roi = tuple(min(r, s) for r, s in zip(roi, shape))
    interval = tuple(r if r == s else max(int(r * (1 - overlap)), 1) for r, s in zip(roi, shape))
    return len(dense_patch_slices(shape, roi, interval))


def segment(
    volume: Volume,
    bundle: Bundle,
    device: str = "auto",
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    network: torch.nn.Module | None = None,
    pipeline_options: dict | None = None,
) -> Segmentation:
    """Segment ``volume`` with ``bundle``; labels lie exactly on the input's grid.

    A published teacher (``bundle.pipeline``) runs its own pipeline; ``pipeline_options`` override its
    recorded settings (HD-BET: ``folds=1`` for its fast mode, ``mirror=True`` for test-time mirroring).

    A CT+MR bundle takes the profile and normalisation layers of the volume's modality
    (detected from intensities when not set), chosen on every call: a cached ``network``
    serves both modalities.
    """
    check_image(volume, "the input volume")
    if pipeline_options and bundle.pipeline is None:
        raise InvalidInputError(
            f"Options {sorted(pipeline_options)} apply to published teachers; '{bundle.name}' is not one.",
            "Leave them out for this model.",
        )
    if bundle.pipeline is not None:
        return _segment_with_pipeline(volume, bundle, device, progress, cancel, network, pipeline_options or {})
    modality = volume.modality
    if modality is None and bundle.modality_specific:
        modality = detect_modality(volume)
    profile = bundle.profile_for(modality) if modality else bundle.profile  # raises for a modality not served
    report = progress or (lambda fraction, stage: None)
    started = time.perf_counter()
    seconds = {}
    torch_device = select_device(device)

    report(0.0, "preprocessing")
    image, grid = to_model_grid(volume, profile)
    seconds["preprocess"] = time.perf_counter() - started

    network = network if network is not None else bundle.load_network(torch_device)
    step = time.perf_counter()
    domain = bundle.info.get("domain") if not bundle.modality_specific else None
    tap = DomainTap(network) if domain else None
    with use_modality(network, modality) if bundle.modality_specific else nullcontext(), tap or nullcontext():
        scores, used, padded_shape = predict_scores(network, image, torch_device, report, cancel, tap)
    windows = 1 if whole_volume_fits(network, padded_shape) else count_windows(padded_shape)
    stride = output_stride(network)
    seconds["inference"] = time.perf_counter() - step

    warnings = []
    if domain:
        statistics = tap.statistics  # None when the sliding window ran: then one more pass, over the whole image
        statistics = statistics or scan_statistics(network, pad_to_multiple_of_8(image), image.shape)
        warnings = domain_warnings(domain, *statistics, bundle.name)
    step = time.perf_counter()
    report(1.0, "resampling to the input grid")
    labels = resample_to_input(scores, _output_grid(grid, padded_shape, stride), volume)
    seconds["postprocess"] = time.perf_counter() - step
    seconds["total"] = time.perf_counter() - started
    return Segmentation(
        labels=volume.with_array(labels),
        bundle_name=bundle.name,
        device=describe_device(used),
        seconds=seconds,
        windows=windows,
        warnings=warnings,
    )


def _segment_with_pipeline(volume, bundle, device, progress, cancel, network, options) -> Segmentation:
    """A published teacher's own pipeline (``bundle.pipeline``), which does its own preprocessing."""
    report = progress or (lambda fraction, stage: None)
    started = time.perf_counter()
    torch_device = select_device(device)
    network = network if network is not None else bundle.load_network(torch_device)
    report(0.0, f"{bundle.pipeline['name']} pipeline")
    result = run_pipeline(bundle, network, volume, torch_device, cancel, **options)
    report(1.0, "done")
    seconds = {**result.seconds, "total": time.perf_counter() - started}
    used = next(network.parameters()).device
    warnings = [] if used.type == torch_device.type else [
        f"The GPU ran out of memory for {bundle.name}'s pipeline: it ran on the CPU instead."]
    return Segmentation(volume.with_array(result.labels), bundle.name, describe_device(used), seconds, 1,
                        warnings=warnings)


def _output_grid(grid: sitk.Image, padded_shape: tuple[int, ...], stride: int) -> sitk.Image:
    """The physical grid of the network's output: the padded model grid, ``stride`` times coarser."""
    padded = sitk.Image([int(s) for s in padded_shape[::-1]], sitk.sitkFloat32)
    padded.SetSpacing(grid.GetSpacing())
    padded.SetOrigin(grid.GetOrigin())
    padded.SetDirection(grid.GetDirection())
    if stride == 1:
        return padded
    return model_grid(padded, tuple(s * stride for s in grid.GetSpacing()))


def pad_to_multiple_of_8(image: np.ndarray) -> np.ndarray:
    """Pad at the far end with the image minimum so every stride-2 stage halves exactly."""
    shape = tuple(int(np.ceil(max(s, 8) / 8) * 8) for s in image.shape)
    padded = np.full(shape, float(image.min()), dtype=np.float32)
    padded[: image.shape[0], : image.shape[1], : image.shape[2]] = image
    return padded


def predict_labels(
    network: torch.nn.Module, image: np.ndarray, device: torch.device, cancel: Callable[[], bool] | None = None
) -> np.ndarray:
    """Arg-max labels (uint8) of a prepared image on the model grid (no resampling back)."""
    network.eval()
    scores, _, padded = predict_scores(network, image, device, cancel=cancel)
    labels = full_resolution(torch.from_numpy(scores)[None], padded)[0].argmax(0).numpy().astype(np.uint8)
    z, y, x = image.shape
    return labels[:z, :y, :x]


class DomainTap(FeatureTap):
    """The deepest features of ``network`` (``networks.feature_layer``); when the image runs in one pass,
    ``statistics`` keeps that pass's domain statistics (``domain.statistics_of``), sparing a second pass."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__(network, [feature_layer(network)])
        self.statistics: tuple[np.ndarray, float] | None = None

    def record(self, logits: torch.Tensor, padded_shape: tuple[int, ...], size: tuple[int, ...]) -> None:
        self.statistics = statistics_of(logits, next(iter(self.features.values())), padded_shape, size)


def whole_volume_fits(network: torch.nn.Module, padded_shape: tuple[int, ...]) -> bool:
    """Whether one pass over the whole (padded) image replaces the sliding window: the network's output at a
    voxel must not depend on the window (no layer in ``WINDOW_DEPENDENT``; TorchScript cannot be inspected)
    and its activations must fit ``WHOLE_VOLUME_BYTES``."""
    if isinstance(network, torch.jit.ScriptModule):
        return False
    first = None
    for module in network.modules():
        if isinstance(module, WINDOW_DEPENDENT):
            return False
        if first is None and isinstance(module, torch.nn.Conv3d):
            first = module
    if first is None:
        return False
    voxels = float(np.prod(padded_shape)) / float(np.prod(first.stride))
    return voxels * first.out_channels * 4 * 6 <= WHOLE_VOLUME_BYTES


def predict_scores(
    network: torch.nn.Module,
    image: np.ndarray,
    device: torch.device,
    report: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    domain_tap: DomainTap | None = None,
) -> tuple[np.ndarray, torch.device, tuple[int, ...]]:
    """Softmax scores (C, z, y, x) of a prepared image at the network's output resolution.

    The image is padded at its far end to a multiple of 8 so every stride-2 stage halves
    exactly; returns the scores of the padded image, the device used and the padded shape.
    One pass over the whole image when ``whole_volume_fits`` (``domain_tap``, attached to ``network``,
    then keeps its domain statistics), else a sliding window. Falls back to CPU stitching (the sliding
    window), then CPU compute, when CUDA runs out of memory.
    """
    report = report or (lambda fraction, stage: None)
    padded = pad_to_multiple_of_8(image)
    padded_shape = padded.shape
    windows = count_windows(padded_shape)
    whole = whole_volume_fits(network, padded_shape)
    attempts = [(device, device)]
    if device.type == "cuda":
        attempts += [(device, torch.device("cpu")), (torch.device("cpu"), torch.device("cpu"))]
    for index, (compute, stitch) in enumerate(attempts):
        try:
            if whole and compute == stitch:
                scores = _whole_volume(network.to(compute), padded, compute, image.shape, report, cancel, domain_tap)
            else:
                scores = _sliding_window(network.to(compute), padded, compute, stitch, windows, report, cancel)
            return scores, compute, padded_shape
        except torch.cuda.OutOfMemoryError:
            if index == len(attempts) - 1:
                raise
            torch.cuda.empty_cache()
            report(0.0, f"out of memory on {compute.type}; retrying with results kept on the CPU")
    raise AssertionError("unreachable")


def _whole_volume(network, padded, compute, size, report, cancel, domain_tap) -> np.ndarray:
    if cancel is not None and cancel():
        raise CancelledError()
    with torch.inference_mode(), torch.autocast(compute.type, dtype=torch.float16, enabled=compute.type == "cuda"):
        logits = network(torch.from_numpy(padded)[None, None].to(compute))
        if domain_tap is not None:
            domain_tap.record(logits, padded.shape, size)
        scores = torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
    report(1.0, "inference")
    return scores


def _sliding_window(
    network: torch.nn.Module,
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

    # Windows never exceed the (padded) image: MONAI would pad them with zeros, which are not
    # background after normalisation and skew instance-normalised networks.
    inferer = SlidingWindowInferer(
        roi_size=tuple(min(r, s) for r, s in zip(ROI_SIZE, image.shape)),
        sw_batch_size=1,
        overlap=OVERLAP,
        mode="gaussian",
        sw_device=compute,
        device=stitch,
    )
    tensor = torch.from_numpy(image)[None, None]
    with torch.inference_mode():
        scores = inferer(tensor, predictor)
    return scores[0].float().cpu().numpy()
