"""Volume I/O: exact geometry round trips (synthetic and real headers) and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from MedKDSegmentLib.engine.errors import InvalidInputError
from MedKDSegmentLib.engine.volume import (
    Volume,
    check_image,
    check_labels_match,
    detect_modality,
    normalize_modality,
    read_volume,
    write_volume,
)

OBLIQUE = tuple(np.array(sitk.VersorTransform((0.2, 0.1, 0.3), 0.4).GetMatrix()).round(12))


def oblique_volume() -> Volume:
    array = np.random.default_rng(0).normal(size=(7, 9, 11)).astype(np.float32)
    return Volume(array, (0.7, 1.3, 4.5), (-12.5, 30.25, 7.0), OBLIQUE)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_write_read_keeps_array_and_geometry(tmp_path, suffix):
    volume = oblique_volume()
    path = write_volume(volume, tmp_path / f"v{suffix}")
    back = read_volume(path)
    assert back.same_grid(volume, tolerance=1e-5)
    np.testing.assert_array_equal(back.array, volume.array)
    assert not list(tmp_path.glob(".partial-*"))


def test_failed_write_leaves_nothing(tmp_path):
    volume = oblique_volume()
    with pytest.raises(RuntimeError):
        write_volume(volume, tmp_path / "v.unknown-format")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "relative",
    [
        "ct-mr-abdomen-totalseg/ct.nii.gz",
        "ct-mr-abdomen-totalseg/mr.nii.gz",
        "mr-brain-tumor-pyradiomics/brain1_image.nrrd",
        "mr-brain-aseg/t1.nii.gz",
    ],
)
def test_real_headers_round_trip(shared_data, tmp_path, relative):
    source = sitk.ReadImage(str(shared_data / relative))
    volume = read_volume(shared_data / relative)
    assert volume.shape == tuple(source.GetSize()[::-1])
    for suffix in (".nii.gz", ".nrrd"):
        back = read_volume(write_volume(volume, tmp_path / f"copy{suffix}"))
        assert back.same_grid(volume, tolerance=1e-5), suffix
        np.testing.assert_array_equal(back.array, volume.array)


def test_dicom_series_reads_with_modality(shared_data):
    volume = read_volume(shared_data / "ct-mr-abdomen-totalseg" / "ct_dicom")
    labels = read_volume(shared_data / "ct-mr-abdomen-totalseg" / "ct_dicom_labels.nii.gz")
    assert volume.modality == "CT"
    assert volume.shape == (20, 512, 512)
    # The labels cover the same voxels stored with y flipped (NIfTI tools): they are reoriented.
    assert not volume.same_grid(labels)
    aligned = check_labels_match(volume, labels)
    assert aligned.same_grid(volume)
    assert np.array_equal(aligned.array, labels.array[:, ::-1, :])


def test_modality_detection_from_intensities(shared_data):
    ct = read_volume(shared_data / "ct-mr-abdomen-totalseg" / "ct.nii.gz")
    mr = read_volume(shared_data / "ct-mr-abdomen-totalseg" / "mr.nii.gz")
    assert detect_modality(ct) == "CT"
    assert detect_modality(mr) == "MR"


def test_modality_names():
    assert normalize_modality("ct") == "CT"
    assert normalize_modality("MRI") == "MR"
    with pytest.raises(InvalidInputError, match="Unknown modality 'PET'"):
        normalize_modality("PET")


def test_2d_and_4d_images_are_rejected(tmp_path):
    two_d = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkFloat32), str(two_d))
    with pytest.raises(InvalidInputError, match="2D .* a 3D volume is needed"):
        read_volume(two_d)
    four_d = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8, 8, 3], sitk.sitkFloat32), str(four_d))
    with pytest.raises(InvalidInputError, match="4D"):
        read_volume(four_d)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        read_volume(tmp_path / "nothing.nii.gz")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    with pytest.raises(InvalidInputError, match="could not be read"):
        read_volume(broken)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InvalidInputError, match="without a DICOM series"):
        read_volume(tmp_path / "empty_dir")


def test_constant_and_nan_images_are_rejected():
    volume = oblique_volume()
    with pytest.raises(InvalidInputError, match="constant"):
        check_image(volume.with_array(np.zeros_like(volume.array)))
    broken = volume.array.copy()
    broken[0, 0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        check_image(volume.with_array(broken))
    check_image(volume)  # a normal volume passes


def test_label_grid_mismatch_is_named():
    image = oblique_volume()
    shifted = Volume(np.zeros(image.shape, np.uint8), image.spacing, (0.0, 0.0, 0.0), image.direction)
    with pytest.raises(InvalidInputError, match="does not lie on its image's grid"):
        check_labels_match(image, shifted)
