"""A CT phantom written as a DICOM series, as scanners export them (one file per slice, positions and UIDs in
the headers), for tests of DICOM input and DICOM SEG output."""

from __future__ import annotations

import locale
from pathlib import Path

import SimpleITK as sitk

from MedKDSegmentLib.engine.phantom import generate_phantom

STUDY_UID = "1.2.826.0.1.3680043.2.1125.1"


def write_series(folder: Path, uid: str, description: str, skip: tuple[int, ...] = (), names=None) -> int:
    """A CT phantom as a DICOM series (one file per slice, positions in the headers); returns its slices.
    GDCM's writer sets the process's locale to "C" (text would then read as ASCII): it is restored."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_series(folder, uid, description, skip, names)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_series(folder: Path, uid: str, description: str, skip: tuple[int, ...], names) -> int:
    image = sitk.Cast(generate_phantom("CT", 4, size=(32, 32, 10), spacing=(8.0, 8.0, 6.0))[0].to_sitk(),
                      sitk.sitkInt16)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    kept = [i for i in range(image.GetDepth()) if i not in skip]
    for index in kept:
        slice_image = image[:, :, index]
        position = image.TransformIndexToPhysicalPoint((0, 0, index))
        for tag, value in {"0008|0060": "CT", "0008|103e": description, "0020|000d": STUDY_UID,
                           "0020|000e": uid, "0020|0052": f"{STUDY_UID}.9", "0020|0013": str(index),
                           "0020|0037": "1\\0\\0\\0\\1\\0",
                           "0020|0032": "\\".join(f"{v:.3f}" for v in position), "0018|0050": "6",
                           "0028|0030": "8\\8"}.items():
            slice_image.SetMetaData(tag, value)
        path = folder / f"{uid[-4:]}-{index:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(slice_image)
        if names:  # as scanners export them: named by UID, no suffix
            path.rename(folder / names(index))
    return len(kept)
