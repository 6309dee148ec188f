"""Preprocessing profiles per modality and resampling to the model grid and exactly back.

A profile is stored in every bundle, so a model always sees data prepared the way it
was trained. The model grid keeps the input's orientation (after reorienting to LPS) and first voxel, as
MONAI's ``Spacing`` does; ``argmax_resample.resample_to_input`` brings labels back onto the input's exact grid.
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


def intensity_window(array: np.ndarray, profile: Profile,
                     pad: tuple = ((0, 0),) * 3) -> tuple[np.ndarray, float, float]:
    """The clipped intensities and the (centre, scale) that normalise them, ``(clipped - centre) / scale``:
    the scaling is linear, so it can wait until the image is on the (smaller) model grid.

    Args:
        array: the volume's voxels.
        profile: its preprocessing profile (a CT window, or MR percentiles and statistics over the body).
        pad: (before, after) voxels per array axis to add around the result as copies of its edge voxels;
            the statistics are those of ``array`` alone.
    """
    if profile.clip is not None:
        low, high = profile.clip
        if array.dtype.kind in "iu" and float(low).is_integer() and float(high).is_integer() \
                and np.iinfo(array.dtype).min <= low and high <= np.iinfo(array.dtype).max:
            clipped, inner = _padded_like(array, array.dtype, pad)  # integers stay integers
            np.clip(array, array.dtype.type(low), array.dtype.type(high), out=inner)
        else:
            clipped, inner = _padded_like(array, np.float32, pad)
            np.clip(array, np.float32(low), np.float32(high), out=inner)
        return _replicate_edges(clipped, pad), (low + high) / 2, (high - low) / 2
    converted = array.astype(np.float32, copy=False)
    low, high = np.percentile(converted, profile.percentiles)
    clipped, inner = _padded_like(array, np.float32, pad)
    np.clip(converted, low, high, out=inner)
    # Statistics over the body only: air or empty background would dominate them otherwise.
    foreground = inner > low + 0.1 * (high - low)
    values = inner[foreground] if foreground.sum() > 100 else inner
    return _replicate_edges(clipped, pad), float(values.mean()), max(float(values.std()), 1e-6)


def _padded_like(array: np.ndarray, dtype, pad) -> tuple[np.ndarray, np.ndarray]:
    """An empty array ``pad`` larger than ``array``, and the view of its interior."""
    padded = np.empty([size + before + after for size, (before, after) in zip(array.shape, pad)], dtype=dtype)
    return padded, padded[tuple(slice(before, before + size) for size, (before, _) in zip(array.shape, pad))]


def _replicate_edges(padded: np.ndarray, pad) -> np.ndarray:
    """Fill the ``pad`` margins of ``padded`` with copies of its interior's edge voxels (axis by axis, so the
    corners too), in place: ``np.pad(mode="edge")`` without a second copy of the volume."""
    for axis, (before, after) in enumerate(pad):
        moved = np.moveaxis(padded, axis, 0)
        if before:
            moved[:before] = moved[before]
        if after:
            moved[-after:] = moved[-after - 1]
    return padded


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
    """An empty image at ``spacing`` over ``image``'s box, laid out as MONAI's ``Spacing`` lays it out by default
    (``scale_extent=False``): the first voxel centre stays where it is, and the grid spans the distance from the
    first to the last centre rounded to whole voxels. A bundle's ``configs/inference.json`` (``monai_config``)
    then prepares the same grid with MONAI's own transforms."""
    geometry = Geometry.of(image) if isinstance(image, sitk.Image) else image
    old_spacing = np.array(geometry.spacing)
    new_spacing = np.array(spacing, dtype=float)
    extent = old_spacing * np.array(geometry.size)
    if extent.min() < EXTENT_MM[0] or extent.max() > EXTENT_MM[1]:
        raise InvalidInputError(
            f"The volume spans {np.round(extent, 1).tolist()} mm ({list(geometry.size)} voxels of "
            f"{np.round(old_spacing, 4).tolist()} mm): no scan is this {'small' if extent.min() < 5 else 'large'}.",
            f"Check the voxel spacing in the file's header (a scan spans {EXTENT_MM[0]:g} to {EXTENT_MM[1]:g} mm).")
    size = np.round((np.array(geometry.size) - 1) * old_spacing / new_spacing).astype(int) + 1
    if np.prod(size.astype(float)) > MAX_GRID_VOXELS:
        raise InvalidInputError(
            f"At {new_spacing.tolist()} mm the volume would need a {size.tolist()} model grid, too large to hold.",
            "Crop the volume to the region of interest first.")
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing(new_spacing.tolist())
    grid.SetOrigin([float(v) for v in geometry.origin])
    grid.SetDirection([float(v) for v in geometry.direction])
    return grid


def edge_margins(volume: Volume, grid: sitk.Image) -> tuple[tuple[int, int], ...]:
    """(before, after) voxels per array axis (z, y, x) that ``volume`` needs as copies of its edge voxels so that
    every point of ``grid`` lies inside it: the last plane of a model grid can lie up to half a model voxel
    beyond the last input voxel, where MONAI samples the edge (``padding_mode="border"``), and so do we."""
    direction = np.array(volume.direction, dtype=float).reshape(3, 3)
    size = np.array(grid.GetSize())
    far = np.array(grid.GetOrigin()) + np.array(grid.GetDirection()).reshape(3, 3) @ ((size - 1) * grid.GetSpacing())
    ends = [np.linalg.solve(direction, point - np.array(volume.origin)) / np.array(volume.spacing)
            for point in (np.array(grid.GetOrigin()), far)]
    low, high = np.minimum(*ends), np.maximum(*ends)
    count = np.array(volume.shape[::-1])  # x, y, z
    # ITK's buffer ends half a voxel beyond the last centre, that point excluded: pad at (or near) it too.
    before = np.maximum(np.ceil(-0.5 - low + 1e-6), 0).astype(int)
    after = np.maximum(np.ceil(high - (count - 0.5) + 1e-6), 0).astype(int)
    return tuple((int(b), int(a)) for b, a in zip(before[::-1], after[::-1]))


def to_model_grid(volume: Volume, profile: Profile) -> tuple[np.ndarray, sitk.Image]:
    """Normalised image on the model grid, and that grid (for resampling back).

    Only the clipped intensities are copied at full resolution: the grid comes from the volume's geometry
    (no reoriented copy; resampling reads any orientation), and the linear scaling is applied on the model
    grid, where it gives the same values as before the resampling (to float32 rounding)."""
    grid = model_grid(canonical_geometry(volume), profile.spacing)
    pad = edge_margins(volume, grid)
    clipped, centre, scale = intensity_window(volume.array, profile, pad)
    image = sitk.GetImageFromArray(clipped)
    del clipped
    direction = np.array(volume.direction, dtype=float).reshape(3, 3)
    before_xyz = np.array([before for before, _ in pad[::-1]], dtype=float)
    image.SetSpacing([float(v) for v in volume.spacing])
    image.SetOrigin((np.array(volume.origin) - direction @ (before_xyz * volume.spacing)).tolist())
    image.SetDirection([float(v) for v in volume.direction])
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
