"""Segmentation of a volume with a bundle: preprocess, run the network, back to the input grid.

A bundle with an ONNX copy runs in ONNX Runtime when the job runs on the CPU and the whole image fits
``windowing.WHOLE_VOLUME_BYTES`` (``load_runner``): then no torch or MONAI module is imported at all. Otherwise torch
runs it (``prediction``: one whole-volume pass or a sliding window, on CUDA with fallbacks). Published
teachers run their own pipelines (``pipelines``).
"""

from __future__ import annotations

import ctypes.util
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import SimpleITK as sitk

from .argmax_resample import resample_to_input
from .bundle import Bundle
from .domain import domain_warnings, evidence
from .errors import CancelledError, InvalidInputError
from .onnx_network import OnnxNetwork, onnx_runtime_installed
from .profiles import to_model_grid, zoomed_grid
from .volume import Volume, check_image, detect_modality
from .windowing import fits_one_pass, pad_to_multiple_of_8, padded_shape

if TYPE_CHECKING:
    import torch

Progress = Callable[[float, str], None]


@dataclass
class Segmentation:
    labels: Volume  # uint8 label values on the input's grid
    bundle_name: str
    device: str
    seconds: dict[str, float]  # per stage: preprocess, inference, postprocess, total
    windows: int
    warnings: list[str] = field(default_factory=list)  # e.g. the scan lies outside the model's world


def load_runner(bundle: Bundle, device: str = "auto") -> OnnxNetwork | torch.nn.Module:
    """What runs ``bundle`` on ``device``: its ONNX copy in ONNX Runtime when it has one, ONNX Runtime is
    installed and the job runs on the CPU ('cpu', or 'auto' on a machine without NVIDIA's driver); else the
    torch network on the device torch selects."""
    on_cpu = device == "cpu" or (device == "auto" and ctypes.util.find_library("cuda") is None)
    if bundle.onnx is not None and on_cpu and onnx_runtime_installed():
        return bundle.load_onnx()
    from .device import select_device

    return bundle.load_network(select_device(device))


def segment(
    volume: Volume,
    bundle: Bundle,
    device: str = "auto",
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    network: OnnxNetwork | torch.nn.Module | None = None,
    pipeline_options: dict | None = None,
) -> Segmentation:
    """Segment ``volume`` with ``bundle``; labels lie exactly on the input's grid.

    ``network`` is what ``load_runner`` gives (loaded when not given). A published teacher
    (``bundle.pipeline``) runs its own pipeline; ``pipeline_options`` override its recorded settings
    (HD-BET: ``folds=1`` for its fast mode, ``mirror=True`` for test-time mirroring).

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
    if bundle.privileged:
        raise InvalidInputError(
            f"'{bundle.name}' is a KD-Net teacher: it takes {', '.join(bundle.privileged)} scans of the same "
            "subject besides the volume, so it cannot segment one scan.",
            "Segment with a student distilled from it (medkd distill --teacher ... --privileged ...).")
    if bundle.pipeline is not None:
        return _segment_with_pipeline(volume, bundle, device, progress, cancel, network, pipeline_options or {})
    modality = volume.modality
    if modality is None and bundle.modality_specific:
        modality = detect_modality(volume)
    profile = bundle.profile_for(modality) if modality else bundle.profile  # raises for a modality not served
    report = progress or (lambda fraction, stage: None)
    started = time.perf_counter()
    seconds = {}

    report(0.0, "preprocessing")
    image, grid = to_model_grid(volume, profile)
    seconds["preprocess"] = time.perf_counter() - started

    network = network if network is not None else load_runner(bundle, device)
    shape = padded_shape(image.shape)
    if isinstance(network, OnnxNetwork) and not fits_one_pass(shape, network.bytes_per_voxel):
        from .device import select_device  # too large for one pass: torch's sliding window

        network = bundle.load_network(select_device(device))
    step = time.perf_counter()
    domain = bundle.info.get("domain") if not bundle.modality_specific else None
    if isinstance(network, OnnxNetwork):
        if cancel is not None and cancel():
            raise CancelledError()
        scores, statistics, entropy = network(pad_to_multiple_of_8(image))
        found = evidence(statistics, entropy, image.shape) if domain else None
        stride, windows, used = network.output_stride, 1, "cpu (ONNX Runtime)"
        report(1.0, "inference")
    else:
        scores, stride, windows, used, found = _predict_with_torch(network, image, bundle, modality, device,
                                                                    report, cancel, bool(domain))
    seconds["inference"] = time.perf_counter() - step

    warnings = domain_warnings(domain, *found, bundle.name) if domain else []
    step = time.perf_counter()
    report(1.0, "resampling to the input grid")
    labels = resample_to_input(scores, _output_grid(grid, shape, stride), volume)
    seconds["postprocess"] = time.perf_counter() - step
    seconds["total"] = time.perf_counter() - started
    return Segmentation(
        labels=volume.with_array(labels),
        bundle_name=bundle.name,
        device=used,
        seconds=seconds,
        windows=windows,
        warnings=warnings,
    )


def _predict_with_torch(network, image, bundle, modality, device, report, cancel, domain):
    """Scores, output stride, windows, device description and domain evidence from the torch network."""
    from .device import describe_device, select_device
    from .modality_norm import use_modality
    from .networks import output_stride
    from .prediction import predict

    with use_modality(network, modality) if bundle.modality_specific else nullcontext():
        scores, used, _, windows, found = predict(network, image, select_device(device), report, cancel, domain)
    return scores, output_stride(network), windows, describe_device(used), found


def _segment_with_pipeline(volume, bundle, device, progress, cancel, network, options) -> Segmentation:
    """A published teacher's own pipeline (``bundle.pipeline``), which does its own preprocessing."""
    from .device import describe_device, select_device
    from .pipelines import run_pipeline

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


def _output_grid(grid: sitk.Image, shape: tuple[int, ...], stride: int) -> sitk.Image:
    """The physical grid of the network's output: the padded model grid (``shape``), ``stride`` times coarser
    (a strided network's output voxel covers ``stride`` input voxels: their outer corners stay in place)."""
    size = tuple(int(s) for s in shape[::-1])
    return zoomed_grid(grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection(), (0, 0, 0), size,
                       tuple(s // stride for s in size))
