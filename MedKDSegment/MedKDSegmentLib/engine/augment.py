"""Training batches: patches drawn from the cases and augmented (intensity, and geometry applied to everything
a patch carries).

The geometric part is co-transformed (function matching, Beyer et al. 2022): the labels (nearest) and a
cached teacher's logits (linearly) undergo the very transform of the
image, so the teacher's target stays on the voxel it describes; an online teacher simply sees the
transformed image. As in nnU-Net, a region wide enough for any allowed transform is cropped first and the
patch sampled from it, so nothing beyond the region is smeared in. MONAI's dictionary transforms do this
per sample on the CPU; here a batch is warped on its own device with one ``grid_sample`` per tensor.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from .data import Case, sample_batch

# nnU-Net's 3-D defaults: rotation about each axis within ±30°, scaling within 0.7–1.4. No mirroring:
# labels have sides (left and right kidney).
MAX_DEGREES = 30.0
SCALES = (0.7, 1.4)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


def intensity(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random intensity scale, shift and noise per item: cheap robustness to scanner differences."""
    n = images.shape[0]
    scale = torch.from_numpy(rng.uniform(0.9, 1.1, n)).float().to(images.device).view(n, 1, 1, 1, 1)
    shift = torch.from_numpy(rng.uniform(-0.1, 0.1, n)).float().to(images.device).view(n, 1, 1, 1, 1)
    noise = torch.randn_like(images) * float(rng.uniform(0, 0.05))
    return images * scale + shift + noise


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation about the x, y and z axes by ``angles`` (radians), composed."""
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        turn = np.eye(3)
        i, j = [a for a in range(3) if a != axis]
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        matrix = turn @ matrix
    return matrix


def sampling_shape(patch: tuple[int, ...], probability: float) -> tuple[int, ...]:
    """The region (z, y, x) to crop around a patch before warping it: wide enough for every allowed
    rotation and scaling, with the same margin on both sides."""
    if probability <= 0:
        return tuple(patch)
    corners = np.array(np.meshgrid(*[[-p / 2, p / 2] for p in patch[::-1]])).reshape(3, -1)  # x, y, z
    steps = np.radians(np.linspace(-MAX_DEGREES, MAX_DEGREES, 7))
    angles = np.array(np.meshgrid(steps, steps, steps)).reshape(3, -1).T
    reach = np.max([np.abs(_rotation(a) @ corners).max(axis=1) for a in angles], axis=0) / min(SCALES)
    return tuple(p + 2 * math.ceil((2 * r - p) / 2) for p, r in zip(patch, reach[::-1]))


def rotate_and_scale(
    images: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor | None,
    rng: np.random.Generator,
    probability: float,
    patch: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``patch``-sized centres of regions (from ``sampling_shape``): each item rotated with ``probability``
    and, independently, scaled with ``probability`` about the centre (in voxels: model grids are isotropic),
    the others cut out as they are; labels and cached teacher outputs (N, C, *region) alike."""
    region = images.shape[2:]
    # affine_grid maps the output's [-1, 1] (x, y, z = the last three dims reversed) into the input's:
    # through voxel units, where the transform is a rotation and a scaling.
    to_output = np.diag(np.array(patch[::-1], dtype=float) / 2)
    from_input = np.diag(2 / np.array(region[::-1], dtype=float))
    theta = []
    for _ in range(len(images)):
        matrix = np.eye(3)
        if rng.random() < probability:
            matrix = _rotation(np.radians(rng.uniform(-MAX_DEGREES, MAX_DEGREES, 3))) @ matrix
        if rng.random() < probability:
            matrix = matrix / rng.uniform(*SCALES)  # output voxel -> input voxel: > 1 zooms in
        theta.append(None if np.allclose(matrix, np.eye(3)) else
                     np.concatenate([from_input @ matrix @ to_output, np.zeros((3, 1))], axis=1))
    centre = tuple(slice((r - p) // 2, (r - p) // 2 + p) for r, p in zip(region, patch))

    def warp(tensor: torch.Tensor, mode: str) -> torch.Tensor:
        out = tensor[(slice(None), slice(None), *centre)].clone()
        chosen = [i for i, t in enumerate(theta) if t is not None]
        if chosen:
            grid = F.affine_grid(torch.from_numpy(np.stack([theta[i] for i in chosen])).float().to(tensor.device),
                                 [len(chosen), 1, *patch], align_corners=False)
            out[chosen] = F.grid_sample(tensor[chosen].float(), grid, mode=mode, padding_mode="border",
                                        align_corners=False).to(tensor.dtype)
        return out

    return warp(images, "bilinear"), warp(labels, "nearest"), warp(teacher, "bilinear") if teacher is not None else None


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor | None,
    rng: np.random.Generator,
    spatial_probability: float,
    patch: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Regions from ``sample_batch(..., sampling_shape(patch, spatial_probability), ...)`` as training
    patches: co-transformed geometry (when ``spatial_probability`` > 0), then intensity. Without geometry
    the random stream is used exactly as before it existed, so earlier runs reproduce."""
    if spatial_probability > 0:
        images, labels, teacher = rotate_and_scale(images, labels, teacher, rng, spatial_probability, patch)
    return intensity(images, rng), labels, teacher


def training_batch(
    cases: list[Case],
    batch_size: int,
    patch: tuple[int, int, int],
    rng: np.random.Generator,
    device: torch.device,
    spatial_probability: float = 0.0,
) -> Batch:
    """Images, labels, labelled flags and cached teacher outputs (when the cases have them) of one training
    step, on ``device``: patches drawn by ``sample_batch`` and augmented by ``augment_batch``."""
    images, labels, labelled, teacher = sample_batch(cases, batch_size, sampling_shape(patch, spatial_probability), rng)
    teacher = teacher.to(device) if teacher is not None else None
    images, labels, teacher = augment_batch(images.to(device), labels.to(device), teacher, rng, spatial_probability,
                                            patch)
    return images, labels, labelled, teacher
