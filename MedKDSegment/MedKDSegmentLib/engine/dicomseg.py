"""DICOM SEG output: a segmentation of a DICOM series as a DICOM Segmentation object that references it.

Written with highdicom (the maintained library for DICOM SEG): one binary segment per label, with its coded
terminology (SNOMED CT or, where DICOM's own lists use it, NCI Thesaurus) and colour, the model named as the
segmentation algorithm. Frames follow the source series slice for slice, in the order the volume was read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InvalidInputError
from .labels import Structure, Terminology
from .volume import Volume, atomic_path, series_files

SERIES_NUMBER = 901  # a series number clear of the scanner's (which count from 1)
# A label without terminology still needs a category and type: DICOM's most general ones.
UNCODED = Terminology("", ("SCT", "85756007", "Tissue"), category=("SCT", "85756007", "Tissue"))


def write_dicom_seg(labels: Volume, source: str | os.PathLike, structures: tuple[Structure, ...],
                    path: str | os.PathLike, algorithm: tuple[str, str], series: str | None = None) -> Path:
    """Write ``labels`` (read from the DICOM series in ``source``) as a DICOM SEG file at ``path``.

    Args:
        labels: label values on the series' own grid, one slice per file.
        source: the DICOM folder the segmented volume was read from.
        structures: the label values to describe, numbered 1..N (a bundle's ``structures``).
        path: the new file (written beside its final name and renamed into place).
        algorithm: (name, version) of the model, recorded as the segmentation algorithm.
        series: the series' UID, where the folder holds several.
    """
    import highdicom as hd

    images = source_images(source, series)
    _check_frames_match(images, labels)
    numbers = [s.value for s in structures]
    if sorted(numbers) != list(range(1, len(numbers) + 1)):
        raise InvalidInputError(f"DICOM SEG numbers segments 1..N; these labels are {numbers}.",
                                "Write .seg.nrrd or NIfTI for this model.")
    descriptions = [_description(hd, s, algorithm) for s in sorted(structures, key=lambda s: s.value)]
    segmentation = hd.seg.Segmentation(
        source_images=images,
        pixel_array=np.ascontiguousarray(labels.array, dtype=np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="MedKDSegment",
        manufacturer_model_name=algorithm[0][:64],
        software_versions=algorithm[1][:64],
        device_serial_number="none",
        series_description=f"{algorithm[0]} segmentation"[:64],
        content_label="MEDKDSEGMENT",
        content_description=f"Automatic segmentation by {algorithm[0]}"[:64],
    )
    with atomic_path(path) as staged:
        segmentation.save_as(staged)
    return Path(path)


def source_images(source: str | os.PathLike, series: str | None = None) -> list:
    """The headers of the series' files (no pixel data: a DICOM SEG references its sources, it does not copy them),
    in the order the volume is read, once they are checked to carry the UIDs a DICOM SEG references (SOP class
    and instance may come from the file meta, where DICOM keeps a copy); checked before segmenting, so a series
    that cannot be referenced costs the user no wait.

    Args:
        source: the DICOM folder.
        series: the series' UID, where the folder holds several.
    """
    import pydicom

    images = []
    for file in series_files(Path(source), series):
        image = pydicom.dcmread(file, stop_before_pixels=True)
        meta = getattr(image, "file_meta", {})
        for key, copy in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not image.get(key) and meta.get(copy):
                setattr(image, key, meta[copy].value)
        images.append(image)
    missing = sorted({key for image in images for key in
                      ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")
                      if not image.get(key)})
    if missing:
        raise InvalidInputError(
            f"The series in '{source}' has no {', '.join(missing)} (removed when it was anonymised?): a DICOM SEG "
            "must reference them.", "Export the series again with its UIDs, or write --format nifti or seg.nrrd.")
    return images


def _description(hd, structure: Structure, algorithm: tuple[str, str]):
    from pydicom.sr.codedict import codes

    terminology = structure.terminology or UNCODED
    description = hd.seg.SegmentDescription(
        segment_number=structure.value,
        segment_label=structure.name[:64],
        segmented_property_category=hd.sr.CodedConcept(terminology.category[1], terminology.category[0],
                                                        terminology.category[2]),
        segmented_property_type=hd.sr.CodedConcept(terminology.type[1], terminology.type[0], terminology.type[2]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm[0][:64], version=algorithm[1][:64], family=codes.cid7162.ArtificialIntelligence),
        display_color=hd.color.CIELabColor.from_rgb(*structure.color),
    )
    if terminology.modifier:  # e.g. left or right kidney
        scheme, value, meaning = terminology.modifier
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept(value, scheme, meaning)]
    return description


def _check_frames_match(images: list, labels: Volume) -> None:
    """The labels must lie on the series' slices, in their order: one per file, at each file's position."""
    positions = np.array([[float(v) for v in image.ImagePositionPatient] for image in images])
    expected = np.array(labels.origin) + np.outer(np.arange(labels.shape[0]),
                                                  np.array(labels.direction).reshape(3, 3)[:, 2] * labels.spacing[2])
    rows, columns = labels.shape[1:]
    if len(images) != labels.shape[0] or any((image.Rows, image.Columns) != (rows, columns) for image in images) \
            or not np.allclose(positions, expected, atol=1e-2 * max(labels.spacing)):
        raise InvalidInputError("The labels do not lie on the DICOM series' slices (other slices, sizes or positions).",
                                "Segment the series itself, then write DICOM SEG from that result.")
