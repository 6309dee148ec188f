"""deepbet brain extraction (Fisch et al., 2024), rebuilt in torch with its own pipeline.

deepbet ships two TorchScript files of one network, a 3D LinkNet (2.13 M parameters): a bounding-box
model at 128³ and the brain model at 256³. ``medkd teachers get deepbet`` reads their weights out of the
pinned, verified files into ``LinkNet3d`` below (same module names; no library ships this network), so
a deepbet bundle is a plain state dict like any other. ``segment_deepbet`` reproduces ``deepbet`` 1.0.2's
``BrainExtraction.run`` step by step:

1. the volume in the closest canonical (RAS) orientation, as nibabel's ``as_closest_canonical``;
2. resized to 128³ (``nearest-exact``), clipped to its 0.5–99.5 % quantiles, scaled to [0, 1], z-scored,
   then ``0.226 x + 0.449``; the box model's brain probability > 0.5, largest 26-connected component;
3. that component's bounding box (extent of the slabs whose mean exceeds 0.02) grown by 10 % a side, on
   the full grid; the box resized to 256³ (``nearest-exact``), normalised with the same quantiles;
4. the brain model's probability resized back into the box (``nearest-exact``), > 0.5; in the box the
   largest 26-connected component with its holes filled; back to the input's orientation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

from .errors import InvalidInputError
from .profiles import resample_probabilities
from .volume import Volume

BOX_SHAPE = (128, 128, 128)
SHAPE = (256, 256, 256)
BOX_MARGIN = 0.1
THRESHOLD = 0.5


def _norm_relu(channels: int) -> list[nn.Module]:
    return [nn.InstanceNorm3d(channels), nn.ReLU()]


class _Block(nn.Module):
    """Residual block: conv, norm, ReLU, conv, norm, + input (1×1 strided projection when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv3d(cin, cout, 3, stride, 1, bias=False), *_norm_relu(cout),
            nn.Conv3d(cout, cout, 3, 1, 1, bias=False), nn.InstanceNorm3d(cout),
        )
        self.downsample = (nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), nn.InstanceNorm3d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(self.double_conv(x) + residual)


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.block1 = _Block(cin, cout, stride)
        self.block2 = _Block(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        mid = cin // 4
        self.conv1 = nn.Sequential(nn.Conv3d(cin, mid, 1, bias=False), *_norm_relu(mid))
        self.tp_conv = nn.Sequential(
            nn.ConvTranspose3d(mid, mid, 3, stride, 1, output_padding=stride - 1, bias=False), *_norm_relu(mid))
        self.conv2 = nn.Sequential(nn.Conv3d(mid, cout, 1, bias=False), *_norm_relu(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.tp_conv(self.conv1(x)))


class LinkNet3d(nn.Module):
    """deepbet's network; returns logits (deepbet's file ends in a softmax, applied by the pipeline)."""

    feature_layer = "down3"

    def __init__(self, in_channels: int = 1, out_channels: int = 2) -> None:
        super().__init__()
        self.init = nn.Sequential(nn.Conv3d(in_channels, 16, 7, 2, 3, bias=False), *_norm_relu(16),
                                  nn.MaxPool3d(3, 2, 1))
        self.down0, self.down1 = _Down(16, 16, 1), _Down(16, 32, 2)
        self.down2, self.down3 = _Down(32, 64, 2), _Down(64, 128, 2)
        self.up0, self.up1 = _Up(128, 64, 2), _Up(64, 32, 2)
        self.up2, self.up3 = _Up(32, 16, 2), _Up(16, 16, 1)
        self.tp_conv1 = nn.Sequential(nn.ConvTranspose3d(16, 8, 3, 2, 1, output_padding=1), *_norm_relu(8))
        self.conv = nn.Sequential(nn.Conv3d(8, 8, 3, 1, 1), *_norm_relu(8))
        self.tp_conv2 = nn.ConvTranspose3d(8, out_channels, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.init(x)
        x1 = self.down0(x0)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        y = self.up0(self.down3(x3)) + x3
        y = self.up1(y) + x2
        y = self.up2(y) + x1
        y = self.up3(y) + x0
        return self.tp_conv2(self.conv(self.tp_conv1(y)))


class DeepBETModels(nn.Module):
    """The box model and the brain model as one teacher; ``forward`` is the brain model's logits."""

    feature_layer = "brain.down3"

    def __init__(self, in_channels: int = 1, out_channels: int = 2) -> None:
        super().__init__()
        self.box = LinkNet3d(in_channels, out_channels)
        self.brain = LinkNet3d(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.brain(x)


@dataclass
class DeepBETResult:
    labels: np.ndarray  # uint8 brain mask on the input's array (z, y, x)
    probability: np.ndarray  # float32 brain probability on the input's array, before the threshold
    seconds: dict[str, float]

    def probabilities_on(self, volume: Volume, target: sitk.Image) -> np.ndarray:
        """Background and brain probabilities (2, z, y, x) resampled linearly onto ``target``."""
        return resample_probabilities(np.stack([1 - self.probability, self.probability]), volume.to_sitk(), target)


def _normalize(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    x = ((x - low) / (high - low)).clamp(0, 1)
    return 0.226 * (x - x.mean()) / x.std() + 0.449


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return mask
    return components == int(np.argmax(np.bincount(components.ravel())[1:])) + 1


def _box(mask: torch.Tensor, shape: tuple[int, ...], margin: float = BOX_MARGIN) -> tuple[slice, ...]:
    """deepbet's bounding box of the small mask, scaled to ``shape`` and grown by ``margin`` a side."""
    ranges = [torch.where(mask.mean(dims) > 0.02)[0] for dims in ((1, 2), (0, 2), (0, 1))]
    if any(r.numel() == 0 for r in ranges):
        raise ValueError("no brain found")
    center = torch.tensor([(r.max() + 1 + r.min()) / 2 for r in ranges])
    size = torch.tensor([float((r.max() + 1) - r.min()) for r in ranges])
    scale = torch.tensor(shape) / torch.tensor(mask.shape)
    center, size = (scale * center).round(), ((1 + 2 * margin) * scale * size).round()
    return tuple(slice(max(0, int(c - s / 2)), min(n, int(c + s / 2))) for c, s, n in zip(center, size, shape))


def segment_deepbet(volume: Volume, network: DeepBETModels, device: torch.device | str = "cpu") -> DeepBETResult:
    """deepbet's published pipeline on ``volume`` (see the module docstring); labels on its array."""
    device = torch.device(device)
    network = network.to(device).eval()
    started = time.perf_counter()
    canonical = sitk.DICOMOrient(volume.to_sitk(), "RAS")  # nibabel's as_closest_canonical, same array
    x = torch.from_numpy(sitk.GetArrayFromImage(canonical).transpose(2, 1, 0).astype(np.float32).copy())
    x = torch.nan_to_num(x.to(device))
    seconds = {}
    with torch.inference_mode():
        small = F.interpolate(x[None, None], BOX_SHAPE, mode="nearest-exact")[0, 0]
        low, high = small.quantile(0.005), small.quantile(0.995)
        box_probability = torch.softmax(network.box(_normalize(small, low, high)[None, None]), 1)[0, 1]
        box_mask = _largest_component((box_probability > THRESHOLD).cpu().numpy())
        try:
            box = _box(torch.from_numpy(box_mask.astype(np.float32)), tuple(x.shape))
        except ValueError:
            raise InvalidInputError(
                "deepbet found no brain in this volume.", "Give a T1-weighted MR of the head.") from None
        crop = F.interpolate(x[box][None, None], SHAPE, mode="nearest-exact")[0, 0]
        probability_box = torch.softmax(network.brain(_normalize(crop, low, high)[None, None]), 1)[0, 1]
        probability = torch.zeros_like(x)
        probability[box] = F.interpolate(probability_box[None, None], probability[box].shape,
                                         mode="nearest-exact")[0, 0]
    seconds["inference"] = time.perf_counter() - started
    probability = probability.cpu().numpy()
    mask = probability > THRESHOLD
    mask[box] = ndimage.binary_fill_holes(_largest_component(mask[box]))
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(v) for v in volume.direction])
    labels, probability = (_from_canonical(array, canonical, orientation) for array in (mask.astype(np.uint8),
                                                                                         probability))
    seconds["total"] = time.perf_counter() - started
    return DeepBETResult(labels=labels, probability=probability, seconds=seconds)


def _from_canonical(array: np.ndarray, canonical: sitk.Image, orientation: str) -> np.ndarray:
    """An (i, j, k) array on the canonical grid, back in the volume's own orientation as (z, y, x)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.CopyInformation(canonical)
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, orientation))
