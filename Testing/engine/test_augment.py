"""Augmentation: geometry applied alike to a patch, its labels and its cached teacher outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MedKDSegmentLib.engine import augment
from MedKDSegmentLib.engine.errors import InvalidInputError
from MedKDSegmentLib.engine.training import TrainingConfig

PATCH = (24, 32, 40)


def _ball(shape: tuple[int, ...], radius: float, centre=None) -> torch.Tensor:
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    centre = (np.array(shape) - 1) / 2 if centre is None else np.array(centre)
    inside = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < radius**2
    return torch.from_numpy(inside.astype(np.float32))


def test_the_sampled_region_holds_every_allowed_rotation_and_scaling_of_the_patch():
    region = augment.sampling_shape(PATCH, 0.2)
    assert augment.sampling_shape(PATCH, 0.0) == PATCH
    assert all((r - p) % 2 == 0 and r > p for r, p in zip(region, PATCH))
    corners = np.array(np.meshgrid(*[[-p / 2, p / 2] for p in PATCH[::-1]])).reshape(3, -1)
    rng = np.random.default_rng(0)
    for _ in range(200):
        turn = augment._rotation(np.radians(rng.uniform(-augment.MAX_DEGREES, augment.MAX_DEGREES, 3)))
        reach = np.abs(turn @ corners / min(augment.SCALES)).max(axis=1)
        assert (reach <= np.array(region[::-1]) / 2 + 1e-6).all()


def test_labels_and_teacher_outputs_move_exactly_with_the_image():
    region = augment.sampling_shape(PATCH, 1.0)
    centre = np.array(region) // 2 + np.array([4, -6, 7])  # off-centre: moving it shows
    images = torch.stack([3 * _ball(region, 9, centre), 3 * _ball(region, 7, centre + 2)])[:, None]
    images += torch.linspace(-0.5, 0.5, region[2]).expand(*region)
    labels = (images > 1.5).long()
    teacher = torch.cat([torch.zeros_like(images), 3 * images + 1], dim=1)  # a teacher linear in the image
    moved, moved_labels, moved_teacher = augment.rotate_and_scale(images, labels, teacher, np.random.default_rng(0),
                                                                  1.0, PATCH)
    assert moved.shape == (2, 1, *PATCH) and moved_teacher.shape == (2, 2, *PATCH)
    # linear interpolation of a linear function of the image is that function of the interpolated image
    torch.testing.assert_close(moved_teacher[:, 1:], 3 * moved + 1, rtol=1e-4, atol=1e-4)
    assert (moved_teacher[:, :1] == 0).all()
    assert moved_labels.dtype == torch.long and set(moved_labels.unique().tolist()) <= {0, 1}
    found = moved_labels.bool() & (moved > 1.5)
    assert 2 * found.sum() / (moved_labels.sum() + (moved > 1.5).sum()) > 0.97
    unmoved = augment.rotate_and_scale(images, labels, None, np.random.default_rng(0), 0.0, PATCH)[1]
    assert 2 * (unmoved.bool() & (moved > 1.5)).sum() / (unmoved.sum() + (moved > 1.5).sum()) < 0.8


def test_rotation_is_rigid_in_voxels_even_for_a_patch_that_is_not_a_cube(monkeypatch):
    monkeypatch.setattr(augment, "SCALES", (1.0, 1.0))
    region = augment.sampling_shape(PATCH, 1.0)
    ball = _ball(region, 8)[None, None]
    for seed in range(3):
        turned = augment.rotate_and_scale(ball, ball.long(), None, np.random.default_rng(seed), 1.0, PATCH)[0]
        turned = turned[0, 0] > 0.5
        extents = [int(turned.any(dim=tuple(a for a in range(3) if a != axis)).sum()) for axis in range(3)]
        assert max(extents) - min(extents) <= 1, extents  # still a ball, not an ellipsoid
        assert abs(int(turned.sum()) - int(ball.sum())) < 0.03 * ball.sum()


def test_untransformed_items_are_the_regions_centre_exactly():
    region = augment.sampling_shape(PATCH, 0.5)
    images = torch.randn(2, 1, *region)
    out = augment.rotate_and_scale(images, images.long(), None, np.random.default_rng(1), 0.0, PATCH)[0]
    margin = [(r - p) // 2 for r, p in zip(region, PATCH)]
    expected = images[:, :, margin[0]:margin[0] + PATCH[0], margin[1]:margin[1] + PATCH[1], margin[2]:margin[2] + 40]
    assert torch.equal(out, expected)


def test_without_geometry_the_batch_and_random_stream_are_as_before():
    images = torch.randn(2, 1, *PATCH)
    labels, teacher = (images > 0).long(), torch.randn(2, 3, *PATCH)
    torch.manual_seed(0)
    out, out_labels, out_teacher = augment.augment_batch(images, labels, teacher, np.random.default_rng(5), 0.0,
                                                         PATCH)
    torch.manual_seed(0)
    torch.testing.assert_close(out, augment.intensity(images, np.random.default_rng(5)))
    assert out_labels is labels and out_teacher is teacher


def test_a_probability_outside_0_1_is_refused():
    with pytest.raises(InvalidInputError, match="from 0 to 1"):
        TrainingConfig(spatial_augmentation=1.5)
