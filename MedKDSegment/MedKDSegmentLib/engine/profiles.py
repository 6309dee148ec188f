"""Preprocessing profiles per modality and resampling to the model grid and exactly back.

A profile is stored in every bundle, so a model always sees data prepared the way it
was trained. The model grid keeps the input's orientation (after reorienting to LPS)
and physical extent; ``resample_to_input`` returns values on the input's exact grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

from .errors import InvalidInputError
from .volume import Volume, normalize_modality


@dataclass(frozen=True)
class Profile:
    modality: str
    spacing: tuple[float, float, float]  # model spacing (x, y, z) mm
    clip: tuple[float, float] | None = None  # CT: HU window
    percentiles: tuple[float, float] | None = None  # MR: robust intensity range

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        try:
            return cls(
                modality=normalize_modality(data["modality"]),
                spacing=tuple(float(v) for v in data["spacing"]),
                clip=tuple(data["clip"]) if data.get("clip") else None,
                percentiles=tuple(data["percentiles"]) if data.get("percentiles") else None,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidInputError(f"Invalid preprocessing profile {data!r}: {error}.") from error


# The one place where preprocessing defaults live.
CT_PROFILE = Profile("CT", (3.0, 3.0, 3.0), clip=(-200.0, 400.0))
MR_PROFILE = Profile("MR", (3.0, 3.0, 3.0), percentiles=(0.5, 99.5))
DEFAULT_PROFILES = {"CT": CT_PROFILE, "MR": MR_PROFILE}


def normalize_intensities(array: np.ndarray, profile: Profile) -> np.ndarray:
    """CT: clip the HU window and scale to about [-1, 1]; MR: percentile clip, z-score in the body."""
    array = array.astype(np.float32, copy=False)
    if profile.clip is not None:
        low, high = profile.clip
        return (np.clip(array, low, high) - (low + high) / 2) / ((high - low) / 2)
    low, high = np.percentile(array, profile.percentiles)
    clipped = np.clip(array, low, high)
    # Foreground: above the midpoint between background and the median of bright tissue.
    foreground = clipped > low + 0.1 * (high - low)
    values = clipped[foreground] if foreground.sum() > 100 else clipped
    return (clipped - values.mean()) / max(float(values.std()), 1e-6)


def canonical(image: sitk.Image) -> sitk.Image:
    """Reorient to LPS so models see every scan the same way up (phantoms are LPS)."""
    return sitk.DICOMOrient(image, "LPS")


def model_grid(image: sitk.Image, spacing: tuple[float, float, float]) -> sitk.Image:
    """An empty image covering the same physical box as ``image`` at ``spacing``."""
    old_spacing = np.array(image.GetSpacing())
    new_spacing = np.array(spacing, dtype=float)
    extent = old_spacing * np.array(image.GetSize())
    size = np.maximum(np.round(extent / new_spacing).astype(int), 1)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # Keep the box centre: corner of the first voxel stays where it was.
    origin = np.array(image.GetOrigin()) + direction @ ((new_spacing - old_spacing) / 2)
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing(new_spacing.tolist())
    grid.SetOrigin(origin.tolist())
    grid.SetDirection(image.GetDirection())
    return grid


def to_model_grid(volume: Volume, profile: Profile) -> tuple[np.ndarray, sitk.Image]:
    """Normalised image on the model grid, and that grid (for resampling back)."""
    image = canonical(volume.to_sitk())
    grid = model_grid(image, profile.spacing)
    normalized = sitk.GetImageFromArray(normalize_intensities(sitk.GetArrayFromImage(image), profile))
    normalized.CopyInformation(image)
    resampled = sitk.Resample(normalized, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled), grid


def resample_to_input(channels: np.ndarray, grid: sitk.Image, volume: Volume) -> np.ndarray:
    """Arg-max labels on the input's exact grid from per-class scores (C, z, y, x) on the model grid.

    Scores are interpolated linearly class by class (smoother than resampling labels)
    and reduced with a running maximum so memory stays at two input-sized arrays.
    """
    reference = volume.to_sitk()
    best = labels = None
    for index, channel in enumerate(channels):
        image = sitk.GetImageFromArray(np.ascontiguousarray(channel, dtype=np.float32))
        image.CopyInformation(grid)
        # Outside the model grid (never, up to rounding) counts as background.
        default = 1.0 if index == 0 else 0.0
        score = sitk.GetArrayFromImage(
            sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32)
        )
        if best is None:
            best, labels = score, np.zeros(score.shape, dtype=np.uint8)
        else:
            better = score > best
            best[better] = score[better]
            labels[better] = index
    return labels


def labels_to_model_grid(labels: Volume, grid: sitk.Image) -> np.ndarray:
    """Training labels on the model grid (nearest neighbour keeps label values)."""
    image = canonical(labels.to_sitk())
    return sitk.GetArrayFromImage(
        sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    )
