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


def nibabel_files(folder):
    """NIfTI files as other tools write them: RAS int16, plain float, uint8, big-endian, scaled, two gzip
    members, a plain file named .nii.gz, sform only."""
    import gzip

    import nibabel

    rng = np.random.default_rng(3)
    affine = np.eye(4)
    rotation = np.array(sitk.VersorTransform((0, 0, 1), 0.2).GetMatrix()).reshape(3, 3)
    affine[:3, :3] = rotation @ np.diag([-0.8, -0.75, 2.5])
    affine[:3, 3] = (120.0, 90.0, -40.0)
    def save(name, array, **header):
        image = nibabel.Nifti1Image(array, affine)
        for key, value in header.items():
            image.header[key] = value
        if header.get("sform_code") == 0:
            image.set_qform(None, code=0)
        nibabel.save(image, folder / name)
        return folder / name
    ints = rng.integers(-1024, 2000, size=(13, 11, 7)).astype(np.int16)
    files = [
        save("ras_int16.nii.gz", ints),
        save("float.nii", rng.normal(size=(9, 8, 6)).astype(np.float32)),
        save("uint8.nii.gz", rng.integers(0, 255, size=(9, 8, 6)).astype(np.uint8)),
        save("big_endian.nii.gz", ints.astype(">i2")),
        save("scaled.nii.gz", ints, scl_slope=2.0, scl_inter=-1024.0),
    ]
    nibabel.save(nibabel.Nifti1Image(ints, affine), folder / "plain.nii")
    raw = (folder / "plain.nii").read_bytes()
    (folder / "members.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    (folder / "named_gz.nii.gz").write_bytes(raw)
    return files + [folder / "members.nii.gz", folder / "named_gz.nii.gz"]


def test_nifti_reads_exactly_as_simpleitk_reads_it(tmp_path):
    """The voxels are decompressed once and checked, then handed to SimpleITK's geometry: the result must
    be what SimpleITK's own reader gives, for every kind of file other tools write."""
    for path in nibabel_files(tmp_path):
        expected = sitk.ReadImage(str(path))
        volume = read_volume(path)
        assert volume.array.dtype == sitk.GetArrayViewFromImage(expected).dtype, path.name
        np.testing.assert_array_equal(volume.array, sitk.GetArrayViewFromImage(expected), err_msg=path.name)
        assert volume.array.flags.c_contiguous and volume.array.flags.writeable
        assert (volume.spacing, volume.origin, volume.direction) == (
            expected.GetSpacing(), expected.GetOrigin(), expected.GetDirection()), path.name


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


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("cut", [1, 5000])
def test_a_nifti_write_cut_short_by_any_amount_is_refused(tmp_path, monkeypatch, suffix, cut):
    """The written length is checked against the header (not the whole file decompressed again): one byte
    missing is enough."""
    from MedKDSegmentLib.engine import volume as volume_module

    real = volume_module.sitk.WriteImage

    def short(image, path, *args):
        real(image, path, *args)
        data = open(path, "rb").read()
        open(path, "wb").write(data[:-cut])

    volume = Volume(np.random.default_rng(1).integers(0, 9, size=(40, 50, 60)).astype(np.uint8),
                    (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    write_volume(volume, tmp_path / f"whole{suffix}")  # the unshortened write passes the same check
    monkeypatch.setattr(volume_module.sitk, "WriteImage", short)
    with pytest.raises(InvalidInputError, match="came out incomplete"):
        write_volume(volume, tmp_path / f"short{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"whole{suffix}"]
