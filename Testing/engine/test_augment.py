"""Augmentation: geometry applied alike to a patch, its labels and its cached teacher outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MedKDSegmentLib.engine import augment
from MedKDSegmentLib.engine.errors import InvalidInputError
from MedKDSegmentLib.engine.training import TrainingConfig


def _ball(shape: tuple[int, int, int], radius: float) -> torch.Tensor:
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    centre = (np.array(shape) - 1) / 2
    inside = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < radius**2
    return torch.from_numpy(inside.astype(np.float32))


def _batch(shape=(24, 32, 40)):
    ramp = torch.linspace(-0.5, 0.5, shape[2]).expand(*shape)
    images = torch.stack([3 * _ball(shape, 8) + ramp, 3 * _ball(shape, 6) - ramp])[:, None]
    labels = (images > 1.5).long()
    teacher = torch.cat([torch.zeros_like(images), 3 * images + 1], dim=1)  # a teacher that is linear in the image
    return images, labels, teacher


def test_labels_and_teacher_outputs_move_exactly_with_the_image():
    images, labels, teacher = _batch()
    rng = np.random.default_rng(0)
    moved, moved_labels, moved_teacher = augment.rotate_and_scale(images, labels, teacher, rng, 1.0)
    assert not torch.allclose(moved, images)  # something happened
    # linear interpolation of a linear function of the image is that function of the interpolated image
    torch.testing.assert_close(moved_teacher[:, 1:], 3 * moved + 1, rtol=1e-4, atol=1e-4)
    assert (moved_teacher[:, :1] == 0).all()
    agree = (moved_labels == (moved > 1.5).long()).float().mean()
    assert agree > 0.95 and moved_labels.dtype == torch.long and set(moved_labels.unique().tolist()) <= {0, 1}


def test_rotation_is_rigid_in_voxels_even_for_a_patch_that_is_not_a_cube(monkeypatch):
    monkeypatch.setattr(augment, "SCALES", (1.0, 1.0))
    shape = (24, 32, 40)
    ball = _ball(shape, 8)[None, None]
    for seed in range(3):
        turned = augment.rotate_and_scale(ball, ball.long(), None, np.random.default_rng(seed), 1.0)[0][0, 0] > 0.5
        extents = [int(turned.any(dim=tuple(a for a in range(3) if a != axis)).sum()) for axis in range(3)]
        assert max(extents) - min(extents) <= 1, extents  # still a ball, not an ellipsoid
        assert abs(int(turned.sum()) - int(ball.sum())) < 0.03 * ball.sum()


def test_without_geometry_the_batch_and_random_stream_are_as_before():
    images, labels, teacher = _batch()
    torch.manual_seed(0)
    out, out_labels, out_teacher = augment.augment_batch(images, labels, teacher, np.random.default_rng(5), 0.0)
    torch.manual_seed(0)
    torch.testing.assert_close(out, augment.intensity(images, np.random.default_rng(5)))
    assert out_labels is labels and out_teacher is teacher


def test_a_probability_outside_0_1_is_refused():
    with pytest.raises(InvalidInputError, match="from 0 to 1"):
        TrainingConfig(spatial_augmentation=1.5)
