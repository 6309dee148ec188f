"""How a volume meets a network, without torch: padding to whole stride-2 stages, and whether one pass over the
whole padded volume fits the memory budget (else a sliding window). Shared by inference (torch-free) and
prediction, training and export (torch)."""

from __future__ import annotations

import numpy as np

# Activations one whole-volume pass may hold (``prediction.activation_bytes_per_voxel`` x padded voxels).
WHOLE_VOLUME_BYTES = 1e9


def fits_one_pass(shape: tuple[int, ...], bytes_per_voxel: float) -> bool:
    """Whether a whole-volume pass over a (padded) image of ``shape`` stays within ``WHOLE_VOLUME_BYTES``."""
    return float(np.prod(shape)) * bytes_per_voxel <= WHOLE_VOLUME_BYTES


def padded_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` rounded up to a multiple of 8 (at least 8) along each axis."""
    return tuple(int(np.ceil(max(s, 8) / 8) * 8) for s in shape)


def pad_to_multiple_of_8(image: np.ndarray) -> np.ndarray:
    """Pad the spatial axes (the last three) at their far end so every stride-2 stage halves exactly: a
    (z, y, x) image with its minimum, a (C, z, y, x) one channel by channel with each channel's minimum."""
    if image.ndim == 4:
        return np.stack([pad_to_multiple_of_8(channel) for channel in image])
    padded = np.full(padded_shape(image.shape), float(image.min()), dtype=np.float32)
    padded[: image.shape[0], : image.shape[1], : image.shape[2]] = image
    return padded
