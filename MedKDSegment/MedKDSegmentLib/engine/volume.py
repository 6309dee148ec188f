"""Volumes: a voxel array with its physical geometry, read and written through SimpleITK.

Arrays are (z, y, x) as SimpleITK returns them; spacing, origin and direction are
in SimpleITK's (x, y, z) LPS convention, so a volume round-trips exactly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InvalidInputError

MODALITIES = ("CT", "MR")
# Suffixes SimpleITK writes; a folder is read as a DICOM series.
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    array: np.ndarray  # (z, y, x)
    spacing: tuple[float, float, float]  # (x, y, z) mm
    origin: tuple[float, float, float]  # (x, y, z) mm, LPS
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # row-major 3x3
    modality: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def with_array(self, array: np.ndarray) -> Volume:
        """The same grid holding another array (for example labels on an image's grid)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return replace(self, array=array, metadata={})

    def same_grid(self, other: Volume, tolerance: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tolerance)
            and np.allclose(self.origin, other.origin, atol=tolerance)
            and np.allclose(self.direction, other.direction, atol=tolerance)
        )

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        image.SetSpacing([float(v) for v in self.spacing])
        image.SetOrigin([float(v) for v in self.origin])
        image.SetDirection([float(v) for v in self.direction])
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, modality: str | None = None) -> Volume:
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=tuple(image.GetSpacing()),
            origin=tuple(image.GetOrigin()),
            direction=tuple(image.GetDirection()),
            modality=modality,
        )


def normalize_modality(modality: str | None) -> str | None:
    """'ct', 'CT' -> 'CT'; 'MRI', 'mr' -> 'MR'; None stays None."""
    if modality is None:
        return None
    key = modality.strip().upper()
    key = {"MRI": "MR"}.get(key, key)
    if key not in MODALITIES:
        raise InvalidInputError(f"Unknown modality '{modality}'.", f"Use one of {', '.join(MODALITIES)} (or 'auto').")
    return key


def dicom_series(folder: Path) -> dict[str, list[str]]:
    """The DICOM series in ``folder`` (found by content, whatever the file names): UID -> its files, in
    GDCM's slice order."""
    reader = sitk.ImageSeriesReader()
    return {uid: list(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in reader.GetGDCMSeriesIDs(str(folder))}


def _describe_series(uid: str, files: list[str]) -> str:
    header = sitk.ImageFileReader()
    header.SetFileName(files[0])
    header.ReadImageInformation()
    modality, description = (header.GetMetaData(key).strip() if header.HasMetaDataKey(key) else "?"
                             for key in ("0008|0060", "0008|103e"))
    return f"{uid} ({modality}, '{description}', {len(files)} slices)"


def series_files(folder: Path, series: str | None = None) -> list[str]:
    """The files of the DICOM series in ``folder`` (``series``: its UID, needed where the folder holds several),
    in GDCM's slice order; a folder without one, or with several and no choice, is refused listing them."""
    found = dicom_series(folder)
    if not found:
        raise InvalidInputError(
            f"'{folder}' is a folder without a DICOM series.",
            "Give a NIfTI/NRRD/MHA file or a folder holding one DICOM series.",
        )
    if series is None and len(found) > 1:
        listed = "; ".join(_describe_series(uid, files) for uid, files in found.items())
        raise InvalidInputError(f"'{folder}' holds {len(found)} DICOM series: {listed}.",
                                "Choose one with --series UID.")
    if series is not None and series not in found:
        raise InvalidInputError(f"'{folder}' holds no DICOM series '{series}'.",
                                f"Choose one of: {', '.join(found)}.")
    return found[series or next(iter(found))]


def check_slice_positions(files: list[str], name: str) -> None:
    """Refuse a series whose slices are not evenly spaced (a missing or corrupt slice): ITK would read it with
    one mean spacing and misplace every slice past the gap, with only a warning."""
    positions = []
    for file in files:
        header = sitk.ImageFileReader()
        header.SetFileName(file)
        header.ReadImageInformation()
        if not header.HasMetaDataKey("0020|0032"):
            return  # no positions to check (a single-file volume, or a series without them)
        positions.append([float(v) for v in header.GetMetaData("0020|0032").split("\\")])
    if len(positions) < 3:
        return
    steps = np.linalg.norm(np.diff(np.array(positions), axis=0), axis=1)
    typical = float(np.median(steps))
    uneven = np.flatnonzero(np.abs(steps - typical) > max(0.01 * typical, 1e-3))
    if typical == 0 or len(uneven):
        where = int(uneven[0]) if len(uneven) else 0
        raise InvalidInputError(
            f"The slices of {name} are not evenly spaced: {steps[where]:.3f} mm between slices {where} and "
            f"{where + 1}, {typical:.3f} mm elsewhere (a missing, duplicated or corrupt slice).",
            "Export the complete series again; reading it would misplace the slices past the gap.")


def read_volume(path: str | os.PathLike, modality: str | None = None, series: str | None = None) -> Volume:
    """Read a NIfTI, NRRD or MHA file, or a DICOM series folder, as a 3D volume. A folder holding several
    series needs ``series`` (a series UID)."""
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"'{path}' does not exist.", "Check the path.")
    dicom_modality = None
    try:
        if path.is_dir():
            files = series_files(path, series)
            check_slice_positions(files, f"'{path}'")
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            reader.MetaDataDictionaryArrayUpdateOn()
            image = reader.Execute()
            if reader.HasMetaDataKey(0, "0008|0060"):
                dicom_modality = reader.GetMetaData(0, "0008|0060").strip()
        else:
            if series is not None:  # a file holds one image: a series choice means the wrong input was given
                raise InvalidInputError(f"'{path}' is a file, so --series {series} cannot apply.",
                                        "Give the DICOM folder holding that series, or leave --series out.")
            if path.name.lower().endswith(NIFTI_SUFFIXES):
                volume = _nifti_volume(path, read_nifti_voxels(path))
                if volume is not None:
                    volume.modality = normalize_modality(modality)
                    return volume
            image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InvalidInputError(
            f"'{path}' could not be read as an image ({str(error).splitlines()[0][:200]}).",
            "Use a NIfTI, NRRD or MHA file or a DICOM series folder.",
        ) from error
    if image.GetNumberOfComponentsPerPixel() != 1 and path.name.lower().endswith(".seg.nrrd"):
        raise InvalidInputError(
            f"'{path}' is a segmentation with overlapping segments ({image.GetNumberOfComponentsPerPixel()} "
            "layers); one label per voxel is needed.",
            "In Slicer, remove the overlaps (or export the segments you want as a labelmap) and save again.",
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidInputError(
            f"'{path}' has {image.GetNumberOfComponentsPerPixel()} components per voxel.",
            "Give a single-channel (grey-scale) volume.",
        )
    check_dimension(image.GetDimension(), image.GetSize(), str(path))
    volume = Volume.from_sitk(image)
    if modality is None and dicom_modality in MODALITIES:
        modality = dicom_modality
    volume.modality = normalize_modality(modality)
    return volume


def read_nifti_voxels(path: Path) -> np.ndarray | None:
    """The voxels a NIfTI file stores, unscaled and in its (x, y, z) order, checked: SimpleITK's NIfTI reader
    fills a payload shorter than its header promises with zeros, and reads NaN and infinity as 0, without a
    word. The file is decompressed once (SimpleITK takes the voxels from here, see ``_nifti_volume``); nibabel
    parses it, and a short payload fails there. None when the header scales the voxels: SimpleITK then reads
    the file itself and applies the scaling."""
    import nibabel

    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":  # by content: some tools write plain NIfTI named .nii.gz
            data = _gunzip(data)
        kind = nibabel.Nifti2Image if 540 in (int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big")) \
            else nibabel.Nifti1Image
        stored = kind.from_bytes(data).dataobj
        raw = np.asanyarray(stored.get_unscaled() if hasattr(stored, "get_unscaled") else stored)
    except (EOFError, OSError, ValueError, zlib.error, nibabel.filebasedimages.ImageFileError,
            nibabel.wrapstruct.WrapStructError, nibabel.spatialimages.HeaderDataError) as error:
        raise InvalidInputError(
            f"'{path}' could not be read: it is cut short or damaged ({str(error)[:160]}).",
            "Copy or export the file again from its source.",
        ) from error
    if raw.dtype.kind in "fc" and not np.isfinite(raw).all():
        raise InvalidInputError(f"'{path}' contains NaN or infinite values.",
                                "Fix or mask those voxels before segmenting.")
    scaled = (getattr(stored, "slope", 1.0), getattr(stored, "inter", 0.0)) != (1.0, 0.0)
    return None if scaled else raw


def _gunzip(data: bytes) -> bytes:
    """Every member of a gzip stream, which must be complete."""
    parts = []
    while data:
        decompressor = zlib.decompressobj(wbits=31)
        parts.append(decompressor.decompress(data))
        if not decompressor.eof:
            raise EOFError("the compressed stream ends early")
        data = decompressor.unused_data
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _nifti_volume(path: Path, voxels: np.ndarray | None) -> Volume | None:
    """The volume SimpleITK would read, from already read ``voxels`` and SimpleITK's reading of the header
    (its geometry), without decompressing the file again; None when SimpleITK would change the voxels
    (scaled, vector or not 3D), so it reads the file itself."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if voxels is None or voxels.ndim != 3 or reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        return None
    dtype = sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], reader.GetPixelID())).dtype
    if voxels.dtype.newbyteorder("=") != dtype or tuple(reader.GetSize()) != voxels.shape:
        return None
    check_dimension(3, reader.GetSize(), str(path))
    return Volume(np.ascontiguousarray(voxels.T, dtype=dtype), tuple(reader.GetSpacing()),
                  tuple(reader.GetOrigin()), tuple(reader.GetDirection()))


def check_output_path(path: Path) -> None:
    """Refuse a path no file can be written to, before any work: a parent that is a file, a name longer than
    the file system allows, or a name SimpleITK cannot take (not UTF-8)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(f"The output path {str(path)!r} is not valid UTF-8.",
                                "Give an output path in plain characters.") from None
    if not str(path):
        raise InvalidInputError("The output path is empty.", "Give an output path.")
    long = [part for part in path.parts if len(os.fsencode(part)) > 255]  # NAME_MAX of every common file system
    if long:
        raise InvalidInputError(f"The name '{long[0][:40]}…' is longer than file systems allow (255 bytes).",
                                "Give a shorter output name.")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InvalidInputError(f"'{parent}' is a file, so '{path}' cannot be made.",
                                        "Give an output in a folder.")
            break


def check_outputs(inputs: list[Path], outputs: list[Path], overwrite: bool = False) -> None:
    """Before any work: refuse an output that cannot be written (``check_output_path``), one that is an
    input (the same file, a link to it, or a file inside an input DICOM folder), and one that exists
    unless ``overwrite``."""
    for output in outputs:
        check_output_path(output)
        for source in inputs:
            if source.is_dir() and output.resolve().is_relative_to(source.resolve()):
                raise InvalidInputError(f"The output '{output}' would be written inside the input folder '{source}'.",
                                        "Give an --output elsewhere; inputs are never written to.")
            if output.exists() and source.exists() and os.path.samefile(output, source):
                raise InvalidInputError(f"The output '{output}' would replace the input '{source}'.",
                                        "Give an --output elsewhere; inputs are never written to.")
        if output.exists() and not overwrite:
            raise InvalidInputError(f"'{output}' exists already.",
                                    "Choose another --output, or add --overwrite to replace it.")
        folder = next((p for p in (output.parent, *output.parent.parents) if p.exists()), Path("."))
        if not os.access(folder, os.W_OK):
            raise InvalidInputError(f"'{folder}' cannot be written to, so '{output}' cannot be made.",
                                    "Give an --output in a folder you can write to.")


def check_dimension(dimension: int, size: tuple[int, ...], name: str) -> None:
    if dimension != 3 or min(size) < 2:
        raise InvalidInputError(
            f"'{name}' is {dimension}D with size {tuple(size)}; a 3D volume is needed.",
            "Give a 3D volume with at least 2 voxels along each axis (split 4D series first).",
        )


def check_image(volume: Volume, name: str = "the image") -> None:
    """Reject what no model can segment: NaNs, infinities, empty or constant volumes."""
    check_dimension(volume.array.ndim, volume.array.shape, name)
    if not np.all(np.isfinite(volume.array)):
        raise InvalidInputError(
            f"{name} contains NaN or infinite values.", "Fix or mask those voxels before segmenting."
        )
    if volume.array.min() == volume.array.max():
        raise InvalidInputError(
            f"{name} is constant (every voxel is {volume.array.flat[0]}).",
            "Check that the right file was given; an empty or blank scan cannot be segmented.",
        )


def check_label_values(labels: Volume, known: set[int], name: str = "the label volume") -> None:
    """Refuse label values that are not whole numbers or not in ``known`` (0, background, always is): they
    would be truncated, dropped or used to size arrays."""
    values = np.unique(labels.array)
    unknown = [v for v in values.tolist() if v != int(v) or (int(v) != 0 and int(v) not in known)]
    if unknown:
        raise InvalidInputError(
            f"{name} holds label values {unknown[:12]}{'…' if len(unknown) > 12 else ''} outside the label table "
            f"(0, {', '.join(str(v) for v in sorted(known))}).",
            "Map the labels to the model's label table (see 'medkd info MODEL'), or give --model for its names.",
        )


def check_labels_match(image: Volume, labels: Volume, name: str = "the label volume") -> Volume:
    """``labels`` on ``image``'s grid. Labels stored in another axis order or flip of the same
    voxels (common between DICOM and NIfTI tools) are reoriented; any other grid is an error."""
    if not image.same_grid(labels):
        orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.direction)
        reoriented = Volume.from_sitk(sitk.DICOMOrient(labels.to_sitk(), orientation), labels.modality)
        if image.same_grid(reoriented):
            return reoriented
        raise InvalidInputError(
            f"{name} does not lie on its image's grid (image {image.shape}, spacing "
            f"{np.round(image.spacing, 3).tolist()}, origin {np.round(image.origin, 3).tolist()}, direction "
            f"{np.round(image.direction, 3).tolist()}; labels {labels.shape}, spacing "
            f"{np.round(labels.spacing, 3).tolist()}, origin {np.round(labels.origin, 3).tolist()}, direction "
            f"{np.round(labels.direction, 3).tolist()}).",
            "Resample the labels onto the image (same size, spacing, origin and direction).",
        )
    return labels


def usual_permissions(path: Path) -> None:
    """Give ``path`` the mode a plain file or folder gets under the user's umask: mkstemp and mkdtemp make
    private ones (0600, 0700), and colleagues must be able to read outputs in a shared folder."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    handle, temporary = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        usual_permissions(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_volume(volume: Volume, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write atomically and verified (``write_image``)."""
    return write_image(volume.to_sitk(), path, compress)


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``image`` to a temporary file beside ``path``, read it back, and only when it holds the same
    voxels move it into place: SimpleITK does not report every failed write (a full disk leaves a short
    NIfTI file), and a failed write must leave nothing behind."""
    path = Path(path)
    with atomic_path(path) as temporary:
        sitk.WriteImage(image, str(temporary), compress)
        complete = _written_completely(temporary, image)
        if not complete:
            free = shutil.disk_usage(path.parent).free / 1e6
            raise InvalidInputError(
                f"Writing '{path}' failed: the file came out incomplete ({free:.0f} MB free on that disk).",
                "Free space on that disk, or write the output elsewhere.",
            )
    return path


def _written_completely(path: Path, image: sitk.Image) -> bool:
    """Whether the file SimpleITK just wrote holds all of ``image``. A NIfTI file's stored length (the gzip
    trailer's length field, or the file size) must be the header's voxel offset plus every voxel: SimpleITK
    leaves a short NIfTI file on a full disk without a word, and a short file cannot end in the right length
    field (but for a 2^-32 chance), so the file need not be decompressed again. Other formats are read back
    and compared (their readers refuse short files)."""
    expected = sitk.GetArrayViewFromImage(image)
    try:
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            with open(path, "rb") as handle:
                start = handle.read(1 << 16)
                handle.seek(-4, os.SEEK_END)
                tail = handle.read(4)
            gzipped = start[:2] == b"\x1f\x8b"
            header = zlib.decompressobj(wbits=31).decompress(start, 352) if gzipped else start[:352]
            order = "<" if int.from_bytes(header[:4], "little") == 348 else ">"
            stored = int(np.frombuffer(header[108:112], dtype=f"{order}f4")[0]) + expected.nbytes
            length = int.from_bytes(tail, "little") if gzipped else path.stat().st_size
            return length == stored % (1 << 32 if gzipped else 1 << 64)
        reread = sitk.ReadImage(str(path))  # kept: the view below borrows its buffer
        written = sitk.GetArrayViewFromImage(reread)
        return written.shape == expected.shape and np.array_equal(written, expected)
    except (OSError, ValueError, IndexError, zlib.error, RuntimeError):
        return False


def check_modality(volume: Volume, expected: str, what: str) -> None:
    """Refuse a volume that is surely not ``expected``: its DICOM modality says otherwise, or an MR model is
    given Hounsfield units (air near -1000, which no MR intensity has). Intensities alone never refuse a
    volume as not CT: a tightly cropped CT can lack air."""
    found = volume.modality
    if found in MODALITIES and found != expected:
        raise InvalidInputError(f"{what} is {found} (its DICOM modality), but the model is for {expected}.",
                                f"Use {expected} volumes, or a model for {found}.")
    if expected == "MR" and detect_modality(replace(volume, modality=None)) == "CT":
        raise InvalidInputError(f"{what} holds Hounsfield units (air near -1000): it looks like CT, but the "
                                "model is for MR.", "Use MR volumes, or a model for CT.")


def detect_modality(volume: Volume) -> str:
    """The DICOM modality when known; otherwise CT if intensities look like Hounsfield units
    (air near -1000 and soft tissue around 0-100), else MR."""
    if volume.modality:
        return volume.modality
    sample = volume.array[:: max(1, volume.array.shape[0] // 16)].astype(np.float32)
    low, median = np.percentile(sample, (1, 50))
    return "CT" if low < -500 and -1100 < median < 1500 else "MR"
