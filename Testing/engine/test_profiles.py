"""Preprocessing onto the model grid: the lean path (no reoriented copy, scaling after resampling) gives
what reorienting, normalising at full resolution and resampling gives, for every orientation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from MedKDSegmentLib.engine.phantom import generate_phantom
from MedKDSegmentLib.engine.profiles import (
    CT_PROFILE,
    MR_PROFILE,
    Geometry,
    Profile,
    canonical,
    canonical_geometry,
    model_grid,
    to_model_grid,
)
from MedKDSegmentLib.engine.volume import Volume, read_volume


def straightforward(volume: Volume, profile: Profile) -> tuple[np.ndarray, sitk.Image]:
    """The textbook order: reorient to LPS, normalise every voxel in float32, resample; beyond the volume its
    edge voxels repeat (SimpleITK's zero-flux Neumann padding), as MONAI's ``padding_mode="border"`` samples."""
    image = canonical(volume.to_sitk())
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if profile.clip is not None:
        low, high = profile.clip
        normalised = (np.clip(array, low, high) - (low + high) / 2) / ((high - low) / 2)
    else:
        low, high = np.percentile(array, profile.percentiles)
        clipped = np.clip(array, low, high)
        values = clipped[clipped > low + 0.1 * (high - low)]
        normalised = (clipped - values.mean()) / max(float(values.std()), 1e-6)
    normalised_image = sitk.GetImageFromArray(normalised.astype(np.float32))
    normalised_image.CopyInformation(image)
    grid = model_grid(image, profile.spacing)
    normalised_image = sitk.ZeroFluxNeumannPad(normalised_image, [4] * 3, [4] * 3)
    resampled = sitk.Resample(normalised_image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled), grid


def signed_permutations():
    for permutation in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            yield np.eye(3)[:, permutation] * np.array(signs)


def test_canonical_geometry_is_that_of_the_reoriented_image():
    tilt = np.array(sitk.VersorTransform((0.3, -0.2, 1.0), 0.35).GetMatrix()).reshape(3, 3)
    array = np.zeros((5, 6, 7), dtype=np.uint8)
    for index, rotation in enumerate(signed_permutations()):
        for direction in (rotation, tilt @ rotation):
            volume = Volume(array, (0.7, 1.1, 2.5), (10.0, -20.0, 35.0 + index), tuple(direction.ravel()))
            expected = Geometry.of(canonical(volume.to_sitk()))
            found = canonical_geometry(volume)
            assert found.size == expected.size and found.spacing == pytest.approx(expected.spacing)
            np.testing.assert_allclose(found.origin, expected.origin, atol=1e-9)
            np.testing.assert_allclose(found.direction, expected.direction, atol=1e-12)


@pytest.fixture(scope="module")
def phantoms():
    ct, _ = generate_phantom("CT", seed=21, size=(90, 70, 30), spacing=(1.7, 1.9, 4.0))
    mr, _ = generate_phantom("MR", seed=22, size=(90, 70, 30), spacing=(1.7, 1.9, 4.0))
    return ct, mr


def flipped_ras(volume: Volume) -> Volume:
    """The same scan stored as NIfTI tools store it: x and y running to the right and front."""
    array = volume.array[:, ::-1, ::-1].copy()
    far = np.array(volume.origin) + np.array(volume.spacing) * (np.array(volume.shape[::-1]) - 1) * [1, 1, 0]
    return Volume(array, volume.spacing, tuple(far), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0), volume.modality)


@pytest.mark.parametrize("case", ["CT int16", "CT float", "CT RAS", "MR", "MR RAS"])
def test_lean_preprocessing_equals_the_straightforward_one(phantoms, case):
    ct, mr = phantoms
    volume = {"CT int16": ct, "CT float": Volume(ct.array.astype(np.float32), ct.spacing, ct.origin, ct.direction),
              "CT RAS": flipped_ras(ct), "MR": mr, "MR RAS": flipped_ras(mr)}[case]
    profile = CT_PROFILE if case.startswith("CT") else MR_PROFILE
    before = volume.array.copy()
    array, grid = to_model_grid(volume, profile)
    expected, expected_grid = straightforward(volume, profile)
    assert Geometry.of(grid) == Geometry.of(expected_grid)
    np.testing.assert_allclose(array, expected, atol=2e-6, rtol=0)
    assert array.dtype == np.float32 and array.std() > 0.3  # the test sees real contrast
    np.testing.assert_array_equal(volume.array, before)  # the user's voxels are not touched


@pytest.mark.parametrize("relative, profile", [
    ("ct-mr-abdomen-totalseg/ct.nii.gz", CT_PROFILE),
    ("ct-mr-abdomen-totalseg/ct_dicom", CT_PROFILE),
    ("ct-mr-abdomen-totalseg/mr.nii.gz", MR_PROFILE),
])
def test_lean_preprocessing_equals_the_straightforward_one_on_real_cases(shared_data, relative, profile):
    volume = read_volume(shared_data / relative)
    array, _ = to_model_grid(volume, profile)
    np.testing.assert_allclose(array, straightforward(volume, profile)[0], atol=2e-6, rtol=0)
