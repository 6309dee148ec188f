"""Preprocessing profiles per modality and resampling to the model grid and exactly back.

A profile is stored in every bundle, so a model always sees data prepared the way it
was trained. The model grid keeps the input's orientation (after reorienting to LPS)
and physical extent; ``argmax_resample.resample_to_input`` brings labels back onto the input's exact grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

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
# BRATS FLAIR at 2 mm (the methods benchmark's real MRI). The volumes are already z-scored in the brain
# and lesions are their brightest ~1 %: no upper clipping, or the tumour contrast would be cut off.
BRATS_FLAIR_PROFILE = Profile("MR", (2.0, 2.0, 2.0), percentiles=(0.0, 100.0))


def intensity_window(array: np.ndarray, profile: Profile) -> tuple[np.ndarray, float, float]:
    """The clipped intensities and the (centre, scale) that normalise them, ``(clipped - centre) / scale``:
    the scaling is linear, so it can wait until the image is on the (smaller) model grid."""
    if profile.clip is not None:
        low, high = profile.clip
        if array.dtype.kind in "iu" and float(low).is_integer() and float(high).is_integer() \
                and np.iinfo(array.dtype).min <= low and high <= np.iinfo(array.dtype).max:
            clipped = np.clip(array, array.dtype.type(low), array.dtype.type(high))  # integers stay integers
        else:
            clipped = np.clip(array.astype(np.float32, copy=False), np.float32(low), np.float32(high))
        return clipped, (low + high) / 2, (high - low) / 2
    converted = array.astype(np.float32, copy=False)
    low, high = np.percentile(converted, profile.percentiles)
    clipped = np.clip(converted, low, high, out=None if converted is array else converted)
    # Statistics over the body only: air or empty background would dominate them otherwise.
    foreground = clipped > low + 0.1 * (high - low)
    values = clipped[foreground] if foreground.sum() > 100 else clipped
    return clipped, float(values.mean()), max(float(values.std()), 1e-6)


def canonical(image: sitk.Image) -> sitk.Image:
    """Reorient to LPS so models see every scan the same way up (phantoms are LPS)."""
    return sitk.DICOMOrient(image, "LPS")


@dataclass(frozen=True)
class Geometry:
    """A grid without its voxels, in SimpleITK's (x, y, z) order."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))


# Where each of DICOM's orientation letters points: (physical axis, sign).
_LETTERS = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def canonical_geometry(volume: Volume) -> Geometry:
    """The grid ``canonical`` would give ``volume``, without copying its voxels: SimpleITK's orientation
    letters say which physical axis each array axis runs along; LPS order permutes the axes and flips
    those that run the other way (the first voxel then lies at the far end)."""
    direction = np.array(volume.direction, dtype=float).reshape(3, 3)
    letters = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(v) for v in volume.direction])
    size, spacing = np.zeros(3, dtype=int), np.zeros(3)
    columns = np.zeros((3, 3))
    origin = np.array(volume.origin, dtype=float)
    for axis, letter in enumerate(letters):
        target, sign = _LETTERS[letter]
        size[target], spacing[target] = volume.shape[2 - axis], volume.spacing[axis]
        columns[:, target] = sign * direction[:, axis]
        if sign < 0:
            origin = origin + direction[:, axis] * volume.spacing[axis] * (volume.shape[2 - axis] - 1)
    return Geometry(tuple(int(v) for v in size), tuple(float(v) for v in spacing), tuple(origin.tolist()),
                    tuple(columns.ravel().tolist()))


# A scan spans more than a few millimetres and less than a whole body: outside this, its spacing is wrong.
EXTENT_MM = (5.0, 2500.0)
MAX_GRID_VOXELS = 2**30  # 4 GB as float32, before any network runs


def model_grid(image: sitk.Image | Geometry, spacing: tuple[float, float, float]) -> sitk.Image:
    """An empty image covering the same physical box as ``image`` at ``spacing``."""
    geometry = Geometry.of(image) if isinstance(image, sitk.Image) else image
    old_spacing = np.array(geometry.spacing)
    new_spacing = np.array(spacing, dtype=float)
    extent = old_spacing * np.array(geometry.size)
    if extent.min() < EXTENT_MM[0] or extent.max() > EXTENT_MM[1]:
        raise InvalidInputError(
            f"The volume spans {np.round(extent, 1).tolist()} mm ({list(geometry.size)} voxels of "
            f"{np.round(old_spacing, 4).tolist()} mm): no scan is this {'small' if extent.min() < 5 else 'large'}.",
            f"Check the voxel spacing in the file's header (a scan spans {EXTENT_MM[0]:g} to {EXTENT_MM[1]:g} mm).")
    size = np.maximum(np.round(extent / new_spacing).astype(int), 1)
    if np.prod(size.astype(float)) > MAX_GRID_VOXELS:
        raise InvalidInputError(
            f"At {new_spacing.tolist()} mm the volume would need a {size.tolist()} model grid, too large to hold.",
            "Crop the volume to the region of interest first.")
    direction = np.array(geometry.direction).reshape(3, 3)
    # Keep the box centre: corner of the first voxel stays where it was.
    origin = np.array(geometry.origin) + direction @ ((new_spacing - old_spacing) / 2)
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing(new_spacing.tolist())
    grid.SetOrigin(origin.tolist())
    grid.SetDirection([float(v) for v in geometry.direction])
    return grid


def to_model_grid(volume: Volume, profile: Profile) -> tuple[np.ndarray, sitk.Image]:
    """Normalised image on the model grid, and that grid (for resampling back).

    Only the clipped intensities are copied at full resolution: the grid comes from the volume's geometry
    (no reoriented copy; resampling reads any orientation), and the linear scaling is applied on the model
    grid, where it gives the same values as before the resampling (to float32 rounding)."""
    grid = model_grid(canonical_geometry(volume), profile.spacing)
    clipped, centre, scale = intensity_window(volume.array, profile)
    image = sitk.GetImageFromArray(clipped)
    del clipped
    image.SetSpacing([float(v) for v in volume.spacing])
    image.SetOrigin([float(v) for v in volume.origin])
    image.SetDirection([float(v) for v in volume.direction])
    # Beyond the volume lies the normalised value 0, as when the image was normalised first.
    resampled = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, centre, sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(resampled)
    array -= np.float32(centre)
    array /= np.float32(scale)
    return array, grid


def resize(array: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """scikit-image's ``resize(array, shape, order, mode="edge", anti_aliasing=False)``, without the
    dependency: a spline zoom with ``grid_mode=True``, clipped to the input's range."""
    zoom = [1 / f for f in np.divide(array.shape, shape)]  # as scikit-image computes it
    out = ndimage.zoom(array, zoom, order=order, mode="nearest", grid_mode=True)
    if order > 0:
        np.clip(out, array.min(), array.max(), out=out)
    return out


def new_shape(shape: tuple[int, ...], old_spacing: tuple[float, ...], new_spacing: tuple[float, ...]) -> tuple:
    return tuple(int(np.round(o / n * float(s))) for s, o, n in zip(shape, old_spacing, new_spacing))


def zoomed_grid(origin, spacing, direction, start_xyz, count_xyz, size_xyz) -> sitk.Image:
    """The physical grid of the voxel box ``start_xyz`` + ``count_xyz`` of a grid (``origin``, ``spacing``,
    ``direction``) zoomed to ``size_xyz`` voxels as ``resize`` zooms (``grid_mode=True``): the box's outer voxel
    corners stay where they are and the spacing is exactly old extent / new count."""
    old = np.array(spacing, dtype=float)
    new_spacing = old * np.array(count_xyz, dtype=float) / np.array(size_xyz, dtype=float)
    rotation = np.array(direction, dtype=float).reshape(3, 3)
    corner = np.array(origin, dtype=float) + rotation @ (np.array(start_xyz, dtype=float) * old)
    grid = sitk.Image([int(s) for s in size_xyz], sitk.sitkFloat32)
    grid.SetSpacing(new_spacing.tolist())
    grid.SetOrigin((corner + rotation @ ((new_spacing - old) / 2)).tolist())
    grid.SetDirection([float(v) for v in direction])
    return grid


def resample_probabilities(channels: np.ndarray, source: sitk.Image, target: sitk.Image) -> np.ndarray:
    """Class probabilities (C, z, y, x) on ``source``'s grid, linearly onto ``target``'s; beyond the source
    lies background (1 for channel 0, 0 for the others)."""
    out = []
    for index, channel in enumerate(channels):
        image = sitk.GetImageFromArray(np.ascontiguousarray(channel, dtype=np.float32))
        image.CopyInformation(source)
        outside = 1.0 if index == 0 else 0.0
        out.append(sitk.GetArrayFromImage(
            sitk.Resample(image, target, sitk.Transform(), sitk.sitkLinear, outside, sitk.sitkFloat32)))
    return np.stack(out)


def labels_to_model_grid(labels: Volume, grid: sitk.Image) -> np.ndarray:
    """Training labels on the model grid (nearest neighbour keeps label values)."""
    image = canonical(labels.to_sitk())
    return sitk.GetArrayFromImage(
        sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    )
