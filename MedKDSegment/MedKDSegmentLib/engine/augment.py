"""Training-time augmentation of a batch of patches: intensity, and geometry applied to everything a patch carries.

The geometric part is co-transformed (function matching, Beyer et al. 2022): the labels (nearest) and a
cached teacher's outputs (linearly, as logits or log-probabilities) undergo the very transform of the
image, so the teacher's target stays on the voxel it describes; an online teacher simply sees the
transformed image. MONAI's dictionary transforms do this per sample on the CPU; here a whole batch of
patches is warped on its own device with one ``grid_sample`` per tensor.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

# nnU-Net's 3-D defaults: rotation about each axis within ±30°, scaling within 0.7–1.4. No mirroring:
# labels have sides (left and right kidney).
MAX_DEGREES = 30.0
SCALES = (0.7, 1.4)


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


def rotate_and_scale(
    images: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor | None,
    rng: np.random.Generator,
    probability: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each item rotated with ``probability`` and, independently, scaled with ``probability`` about the
    patch centre (in voxel space: model grids are isotropic); its labels and cached teacher outputs
    (N, C, *patch) go through the same transform. Beyond the patch the edge values continue."""
    chosen = []
    theta = np.tile(np.eye(3, 4), (len(images), 1, 1))
    # affine_grid works in [-1, 1] per axis (x, y, z = the last three dims reversed): to rotate in voxels,
    # go to voxel units, rotate, and come back.
    half = np.diag(np.array(images.shape[2:][::-1], dtype=float) / 2)
    for item in range(len(images)):
        matrix = np.eye(3)
        if rng.random() < probability:
            matrix = _rotation(np.radians(rng.uniform(-MAX_DEGREES, MAX_DEGREES, 3))) @ matrix
        if rng.random() < probability:
            matrix = matrix / rng.uniform(*SCALES)  # output voxel -> input voxel: > 1 zooms in
        if not np.allclose(matrix, np.eye(3)):
            theta[item, :, :3] = np.linalg.inv(half) @ matrix @ half
            chosen.append(item)
    if not chosen:
        return images, labels, teacher
    index = torch.tensor(chosen)

    def warp(tensor: torch.Tensor, mode: str) -> torch.Tensor:
        grid = F.affine_grid(torch.from_numpy(theta[chosen]).float().to(tensor.device),
                             [len(chosen), 1, *tensor.shape[2:]], align_corners=False)
        out = tensor.clone()
        out[index.to(tensor.device)] = F.grid_sample(tensor[index.to(tensor.device)].float(), grid, mode=mode,
                                                     padding_mode="border", align_corners=False).to(tensor.dtype)
        return out

    return warp(images, "bilinear"), warp(labels, "nearest"), (warp(teacher, "bilinear") if teacher is not None
                                                               else None)


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor | None,
    rng: np.random.Generator,
    spatial_probability: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A training batch augmented: co-transformed geometry (when ``spatial_probability`` > 0), then intensity.
    Without geometry the random stream is used exactly as before it existed (earlier runs reproduce)."""
    if spatial_probability > 0:
        images, labels, teacher = rotate_and_scale(images, labels, teacher, rng, spatial_probability)
    return intensity(images, rng), labels, teacher
