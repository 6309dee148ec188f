"""NeuroModex VNet brain tissue segmentation, rebuilt in torch with its own pipeline.

``neuromodex-vnet-dbs`` 0.2.2 ships one state dict (``best.pth``, 7.62 M parameters) of a spacing-aware
VNet: residual 5³ convolutions, strided down-sampling, trilinear up-sampling, and FiLM layers that scale
and shift each encoder level by an MLP of the voxel spacing. ``SpacingVNet`` below has its module names,
so the state dict loads strictly. ``segment_tissue_vnet`` reproduces the package's
``SegmentationPipeline.segment_fast`` step by step (no library ships this pipeline):

1. the bounding box of the voxels >= 0.1, cut out (the package's result lives on that box);
2. curvature anisotropic diffusion (5 iterations, time step 0.01, conductance 0.5), then every voxel < 1 set
   to 0: the network expects raw T1 intensities in the hundreds or thousands, skull-stripped;
3. bright outliers removed: the brightest histogram peak (2048 bins, prominence >= 10 % of the highest
   bin) and a Gaussian over 0.5–1.5× its centre give a cut-off mean + 3 SD, voxels above it set to 0;
4. the voxels > 0 scaled to [0, 1] by their minimum and maximum; padded (centred, zeros) to a multiple of
   16 voxels; the network runs once at the volume's own spacing;
5. background probability set to 0 inside the twice-eroded (6-connected) foreground, the most probable
   class kept, the padding cut off; outside the box, background.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage, signal
from torch import nn

from .errors import InvalidInputError
from .profiles import resample_probabilities
from .volume import Volume

DIVISOR = 16


class _FiLM(nn.Module):
    """Per-channel scale and shift predicted from the voxel spacing (x, y, z in mm)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, 2 * channels))

    def forward(self, x: torch.Tensor, spacing: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.mlp(spacing)[:, :, None, None, None].chunk(2, dim=1)
        return x * gamma + beta


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv3d(cin, cout, 5, padding=2), nn.BatchNorm3d(cout)
        self.conv2, self.bn2 = nn.Conv3d(cout, cout, 5, padding=2), nn.BatchNorm3d(cout)
        self.relu = nn.PReLU()  # one PReLU for both activations, as published
        self.shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + self.shortcut(x))


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.PReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x)


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True)
        self.conv, self.bn, self.relu = nn.Conv3d(cin, cout, 1), nn.BatchNorm3d(cout), nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(self.up(x))))


class SpacingVNet(nn.Module):
    """The published spacing-aware VNet ("S", 8 base channels); logits for background, CSF, GM, WM."""

    feature_layer = "enc4"

    def __init__(self, in_channels: int = 1, out_channels: int = 4, base: int = 8) -> None:
        super().__init__()
        widths = [base * 2**level for level in range(5)]
        self.enc0 = _Residual(in_channels, widths[0])
        for level in range(1, 5):
            setattr(self, f"down{level}", _Down(widths[level - 1], widths[level]))
            setattr(self, f"enc{level}", _Residual(widths[level], widths[level]))
        for level in range(5):
            setattr(self, f"film{level}", _FiLM(widths[level]))
        for step in range(1, 5):
            wide, narrow = widths[5 - step], widths[4 - step]
            setattr(self, f"up{step}", _Up(wide, narrow))
            setattr(self, f"dec{step}", _Residual(2 * narrow, narrow))
        self.outc = nn.Conv3d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor, spacing: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``x`` (B, 1, z, y, x) with voxel ``spacing`` (B, 3: x, y, z mm; its pipeline always
        gives it, 1 mm otherwise, e.g. when counting operations)."""
        if spacing is None:
            spacing = x.new_ones(len(x), 3)
        skips = [self.film0(self.enc0(x), spacing)]
        for level in range(1, 5):
            down = getattr(self, f"down{level}")(skips[-1])
            skips.append(getattr(self, f"film{level}")(getattr(self, f"enc{level}")(down), spacing))
        y = skips.pop()
        for step in range(1, 5):
            y = getattr(self, f"dec{step}")(torch.cat([getattr(self, f"up{step}")(y), skips.pop()], dim=1))
        return self.outc(y)


@dataclass
class TissueVNetResult:
    labels: np.ndarray  # uint8 0 background, 1 CSF, 2 GM, 3 WM on the input's array (z, y, x)
    probabilities: np.ndarray  # float32 (4, z, y, x) on the input's array, background suppressed as the labels
    seconds: dict[str, float]

    def probabilities_on(self, volume: Volume, target: sitk.Image) -> np.ndarray:
        """The probabilities (C, z, y, x) resampled linearly onto ``target``; background beyond the volume."""
        return resample_probabilities(self.probabilities, volume.to_sitk(), target)


def _foreground_box(image: sitk.Image) -> tuple[slice, slice, slice]:
    """(z, y, x) slices of the bounding box of the voxels >= 0.1."""
    nonzero = np.nonzero(sitk.GetArrayViewFromImage(image) >= 0.1)
    if not nonzero[0].size:
        raise InvalidInputError("The volume has no voxel >= 0.1: there is no brain to segment.",
                                "Give a skull-stripped T1 MR with its raw intensities.")
    return tuple(slice(int(axis.min()), int(axis.max()) + 1) for axis in nonzero)  # type: ignore[return-value]


def _without_bright_outliers(array: np.ndarray) -> np.ndarray:
    """Voxels above mean + 3 SD of a Gaussian around the brightest histogram peak set to 0."""
    histogram, edges = np.histogram(array[array > 0], bins=2048)
    centres = (edges[:-1] + edges[1:]) / 2
    peaks, _ = signal.find_peaks(histogram, prominence=np.max(histogram) * 0.1)
    peak = centres[peaks[-1] if len(peaks) else len(centres) // 2]
    window = (centres > 0.5 * peak) & (centres < 1.5 * peak)
    if histogram[window].sum() == 0:  # the package fails here too
        raise InvalidInputError("The intensity histogram has no tissue peak to fit.",
                                "Give a skull-stripped T1 MR with its raw intensities.")
    mean = np.average(centres[window], weights=histogram[window])
    sd = np.sqrt(np.average((centres[window] - mean) ** 2, weights=histogram[window]))
    out = array.copy()
    out[(array > mean + 3 * sd) & (array > 0)] = 0
    return out


def preprocess(image: sitk.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Steps 2–4 on the cut-out box: the network's input (z, y, x) and the padding before each axis."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    smooth = sitk.CurvatureAnisotropicDiffusion(image, timeStep=0.01, conductanceParameter=0.5,
                                                numberOfIterations=5)
    array = sitk.GetArrayFromImage(smooth) * (sitk.GetArrayViewFromImage(image) >= 1)
    if not (array > 0).any():
        raise InvalidInputError(
            "All intensities are below 1: the tissue VNet expects raw T1 intensities (hundreds or thousands).",
            "Give the T1 before any 0–1 normalisation, or multiply it by 1000.")
    array = _without_bright_outliers(array.astype(np.float32))
    foreground = array > 0
    low, high = array[foreground].min(), array[foreground].max()
    if high == low:
        raise InvalidInputError("The brain has one intensity only: there is no contrast to segment.",
                                "Give a skull-stripped T1 MR with its raw intensities.")
    scaled = np.zeros_like(array)
    scaled[foreground] = (array[foreground] - low) / (high - low)
    shape = np.array(array.shape)
    before = (-(-shape // DIVISOR) * DIVISOR - shape) // 2
    after = -(-shape // DIVISOR) * DIVISOR - shape - before
    return np.pad(scaled, list(zip(before, after))), tuple(int(b) for b in before)  # type: ignore[return-value]


def segment_tissue_vnet(volume: Volume, network: SpacingVNet, device: torch.device | str = "cpu") -> TissueVNetResult:
    """The package's ``segment_fast`` on ``volume`` (see the module docstring); labels on its array."""
    device = torch.device(device)
    network = network.to(device).eval()
    started = time.perf_counter()
    image = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    box = _foreground_box(image)
    roi = image[box[2], box[1], box[0]]
    array, before = preprocess(roi)
    spacing = torch.tensor([volume.spacing], dtype=torch.float32, device=device)
    with torch.inference_mode():
        probabilities = torch.softmax(network(torch.from_numpy(array)[None, None].to(device), spacing), 1)[0]
    probabilities = probabilities.cpu().numpy()
    probabilities[0][ndimage.binary_erosion(array > 0, iterations=2)] = 0
    inner = tuple(slice(b, b + n) for b, n in zip(before, roi.GetSize()[::-1]))
    labels = np.zeros(volume.shape, np.uint8)
    labels[box] = np.argmax(probabilities[(slice(None), *inner)], axis=0)
    # The soft output agrees with the labels: background suppressed where they suppress it, renormalised.
    full = np.zeros((len(probabilities), *volume.shape), np.float32)
    full[0] = 1.0
    kept = probabilities[(slice(None), *inner)]
    full[(slice(None), *box)] = kept / np.maximum(kept.sum(axis=0, keepdims=True), 1e-12)
    return TissueVNetResult(labels, full, {"total": time.perf_counter() - started})
