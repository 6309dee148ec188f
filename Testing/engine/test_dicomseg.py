"""``medkd segment --format dicom-seg``: a DICOM SEG that references its source series slice for slice, with the
bundle's coded terminology, read back with highdicom and pydicom."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_series import write_series
from pydicom.uid import generate_uid

from MedKDSegmentLib.engine.bundle import resolve_bundle
from MedKDSegmentLib.engine.cli import EXIT_ERROR, main
from MedKDSegmentLib.engine.dicomseg import write_dicom_seg
from MedKDSegmentLib.engine.errors import InvalidInputError
from MedKDSegmentLib.engine.volume import Volume, dicom_series, read_volume

MODEL = "phantom-abdomen-ct-student"


def segment(source: Path, output: Path, fmt: str) -> int:
    return main(["--quiet", "segment", "--model", MODEL, "--input", str(source), "--output", str(output),
                 "--device", "cpu", "--format", fmt])


def with_uids(source: Path, folder: Path) -> Path:
    """A copy of a series anonymised without its study and series UIDs, as a PACS would export it with them
    (SOP class and instance from each file's meta header, new study and series UIDs)."""
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    for file in sorted(source.iterdir()):
        image = pydicom.dcmread(file)
        image.SOPClassUID = image.file_meta.MediaStorageSOPClassUID
        image.SOPInstanceUID = image.file_meta.MediaStorageSOPInstanceUID
        image.StudyInstanceUID, image.SeriesInstanceUID = study, series
        image.save_as(folder / file.name)
    return folder


def assert_round_trip(source: Path, tmp_path: Path) -> None:
    assert segment(source, tmp_path / "labels", "nifti") == 0
    assert segment(source, tmp_path / "labels", "dicom-seg") == 0
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels.nii.gz")))
    images = [pydicom.dcmread(file) for file in next(iter(dicom_series(source).values()))]
    seg = hd.seg.segread(tmp_path / "labels.dcm")

    assert seg.StudyInstanceUID == images[0].StudyInstanceUID
    assert {uids[1] for uids in seg.get_source_image_uids()} == {images[0].SeriesInstanceUID}
    assert seg.FrameOfReferenceUID == images[0].FrameOfReferenceUID
    by_instance = {image.SOPInstanceUID: image for image in images}
    for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame lies on the slice it references
        instance = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(frame.PlanePositionSequence[0].ImagePositionPatient,
                                   by_instance[instance].ImagePositionPatient, atol=1e-3)
    labels = seg.get_pixels_by_source_instance([image.SOPInstanceUID for image in images], combine_segments=True,
                                               skip_overlap_checks=True)
    np.testing.assert_array_equal(labels, expected)
    assert expected.max() > 0

    bundle = resolve_bundle(MODEL)
    for structure, description in zip(bundle.structures, seg.SegmentSequence, strict=True):
        coded = description.SegmentedPropertyTypeCodeSequence[0]
        assert (description.SegmentNumber, description.SegmentLabel) == (structure.value, structure.name)
        assert (coded.CodingSchemeDesignator, coded.CodeValue) == structure.terminology.type[:2]
        assert description.SegmentedPropertyCategoryCodeSequence[0].CodeValue == structure.terminology.category[1]
        modifier = coded.get("SegmentedPropertyTypeModifierCodeSequence")
        assert (modifier[0].CodeValue if modifier else None) == (structure.terminology.modifier or (0, None))[1]
        assert description.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == bundle.name


def test_dicom_seg_of_a_series_round_trips(tmp_path):
    source = tmp_path / "series"
    write_series(source, "1.2.826.0.1.3680043.2.1125.30", "abdomen")
    assert_round_trip(source, tmp_path)


def test_dicom_seg_of_the_real_ct_series_round_trips(shared_data, tmp_path):
    assert_round_trip(with_uids(shared_data / "ct-mr-abdomen-totalseg" / "ct_dicom", tmp_path / "series"), tmp_path)


def test_a_series_without_its_uids_is_refused_before_any_work(shared_data, tmp_path, capsys):
    """The shared series was anonymised without study and series UIDs: a SEG could reference nothing."""
    assert segment(shared_data / "ct-mr-abdomen-totalseg" / "ct_dicom", tmp_path / "labels", "dicom-seg") == EXIT_ERROR
    assert "no SeriesInstanceUID, StudyInstanceUID" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_dicom_seg_needs_a_series_input_and_the_labels_on_its_slices(tmp_path, capsys):
    source = tmp_path / "series"
    write_series(source, "1.2.826.0.1.3680043.2.1125.31", "abdomen")
    volume_file = tmp_path / "volume.nii.gz"
    sitk.WriteImage(read_volume(source).to_sitk(), str(volume_file))
    assert segment(volume_file, tmp_path / "labels", "dicom-seg") == EXIT_ERROR
    assert "not a series" in capsys.readouterr().err
    labels = read_volume(source)
    shifted = Volume(labels.array, labels.spacing, tuple(np.add(labels.origin, (0, 0, 3.0))), labels.direction)
    with pytest.raises(InvalidInputError, match="do not lie on the DICOM series"):
        write_dicom_seg(shifted, source, resolve_bundle(MODEL).structures, tmp_path / "x.dcm", ("m", "1"))
    shutil.rmtree(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume.nii.gz"]
