"""Labels back on the input grid: equal to interpolating every class everywhere (SimpleITK), on phantoms,
oblique and flipped grids, ties, and the bundled models' real outputs on the real cases."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tiny import TINY_CT

from MedKDSegmentLib.engine.argmax_resample import resample_every_class, resample_to_input
from MedKDSegmentLib.engine.bundle import resolve_bundle
from MedKDSegmentLib.engine.demo import model_name
from MedKDSegmentLib.engine.inference import _output_grid
from MedKDSegmentLib.engine.networks import output_stride
from MedKDSegmentLib.engine.phantom import generate_phantom
from MedKDSegmentLib.engine.prediction import predict_scores
from MedKDSegmentLib.engine.profiles import Profile, to_model_grid
from MedKDSegmentLib.engine.volume import Volume, read_volume


def body_scores(labels: Volume, grid: sitk.Image, seed: int = 0) -> np.ndarray:
    """Random, peaked class scores inside the body on ``grid``, confident background outside it."""
    on_model = sitk.GetArrayFromImage(sitk.Resample(labels.to_sitk(), grid, sitk.Transform(),
                                                    sitk.sitkNearestNeighbor))
    rng = np.random.default_rng(seed)
    scores = rng.dirichlet(np.full(9, 0.05), size=on_model.shape).astype(np.float32).transpose(3, 0, 1, 2)
    scores[:, on_model == 0] = np.eye(9, dtype=np.float32)[0][:, None]
    return scores


def rotated(volume: Volume, permutation: tuple[int, int, int], flips: tuple[bool, bool, bool],
            degrees: float) -> Volume:
    """The same voxels stored with permuted, flipped array axes under an oblique direction (a rotation
    about z by ``degrees``), so input and model axes differ in order, sign and angle."""
    array = volume.array.transpose(permutation)
    for axis, flip in enumerate(flips):
        if flip:
            array = np.flip(array, axis)
    angle = np.radians(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    columns = np.eye(3)[:, [2 - permutation[2 - axis] for axis in range(3)]]  # array (z, y, x) -> xyz axes
    signs = np.array([-1.0 if flips[2 - axis] else 1.0 for axis in range(3)])
    direction = rotation @ columns * signs
    spacing = tuple(float(volume.spacing[2 - permutation[2 - axis]]) for axis in range(3))
    return Volume(np.ascontiguousarray(array), spacing, (-40.0, 25.0, 130.0), tuple(direction.ravel()), "CT")


@pytest.fixture(scope="module")
def fine_phantom():
    """Sub-millimetre in-plane, as clinical CT: a model cell holds tens of input voxels."""
    return generate_phantom("CT", seed=11, size=(96, 80, 36), spacing=(1.6, 1.9, 2.5))


def test_equals_interpolating_every_class_on_a_phantom(fine_phantom):
    image, labels = fine_phantom
    _, grid = to_model_grid(image, TINY_CT)
    scores = body_scores(labels, grid)
    result = resample_to_input(scores, grid, image)
    assert result.dtype == np.uint8 and result.shape == image.shape
    np.testing.assert_array_equal(result, resample_every_class(scores, grid, image))
    assert len(np.unique(result)) == 9  # every class wins somewhere: the test can tell classes apart


@pytest.mark.parametrize("permutation, flips, degrees", [
    ((0, 1, 2), (False, True, False), 0.0),
    ((2, 0, 1), (True, False, True), 0.0),
    ((1, 2, 0), (False, False, False), 25.0),
    ((0, 2, 1), (True, True, True), -60.0),
])
def test_equals_interpolating_every_class_on_oblique_and_flipped_grids(fine_phantom, permutation, flips, degrees):
    image, labels = fine_phantom
    image, labels = (rotated(v, permutation, flips, degrees) for v in (image, labels))
    _, grid = to_model_grid(image, Profile("CT", (7.0, 5.0, 6.0), clip=(-200.0, 400.0)))
    scores = body_scores(labels, grid, seed=1)
    np.testing.assert_array_equal(resample_to_input(scores, grid, image),
                                  resample_every_class(scores, grid, image))


def test_ties_go_to_the_first_class_and_beyond_the_grid_is_background(fine_phantom):
    image, _ = fine_phantom
    _, grid = to_model_grid(image, TINY_CT)
    size = grid.GetSize()[::-1]
    scores = np.zeros((9, *size), dtype=np.float32)
    scores[[1, 3], :, :, : size[2] // 2] = 0.5  # one half a tie of classes 1 and 3, the other class 5
    scores[5, :, :, size[2] // 2:] = 1.0
    shrunk = sitk.Image(grid)  # the grid ends inside the volume: the rest is beyond it
    shrunk.SetOrigin(grid.TransformIndexToPhysicalPoint((2, 0, 0)))
    result = resample_to_input(scores, shrunk, image)
    np.testing.assert_array_equal(result, resample_every_class(scores, shrunk, image))
    assert set(np.unique(result)) == {0, 1, 5}
    source = image.to_sitk()
    before = sum(shrunk.TransformPhysicalPointToContinuousIndex(source.TransformIndexToPhysicalPoint((i, 0, 0)))[0]
                 < -0.5 for i in range(image.shape[2]))  # input columns before the shifted grid (ITK's buffer test)
    assert before >= 5 and (result[:, :, :before] == 0).all() and (result[:, :, before] != 0).any()


@pytest.mark.parametrize("relative, modality", [
    ("ct-mr-abdomen-totalseg/ct.nii.gz", "CT"),
    ("ct-mr-abdomen-totalseg/ct_dicom", "CT"),
    ("ct-mr-abdomen-totalseg/mr.nii.gz", "MR"),
])
@pytest.mark.parametrize("role", ["student", "teacher"])
def test_equals_interpolating_every_class_for_the_bundled_models_on_real_cases(shared_data, relative, modality,
                                                                               role):
    volume = read_volume(shared_data / relative, modality)
    bundle = resolve_bundle(model_name(modality, role))
    network = bundle.load_network()
    image, grid = to_model_grid(volume, bundle.profile)
    scores, _, padded = predict_scores(network, image, torch.device("cpu"))
    output = _output_grid(grid, padded, output_stride(network))
    result = resample_to_input(scores, output, volume)
    np.testing.assert_array_equal(result, resample_every_class(scores, output, volume))
    assert len(np.unique(result)) > 2
