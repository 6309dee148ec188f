"""Losses and metrics: the defining properties, on values small enough to check by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from MedKDSegmentLib.engine.losses import PixelKD, SupervisedLoss
from MedKDSegmentLib.engine.metrics import compare_labels, dice_per_label, hd95_per_label
from MedKDSegmentLib.engine.volume import Volume


def test_kd_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 4, 4, 4)
    kd = PixelKD(temperature=3.0)
    assert float(kd(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd(logits, torch.randn_like(logits))) > 0.01


def test_kd_matches_the_formula():
    student, teacher = torch.randn(1, 3, 2, 2, 2), torch.randn(1, 3, 2, 2, 2)
    t = 2.5
    p_t = torch.softmax(teacher / t, 1)
    expected = t * t * (p_t * (torch.log(p_t) - torch.log_softmax(student / t, 1))).sum(1).mean()
    assert float(PixelKD(t)(student, teacher)) == pytest.approx(float(expected), rel=1e-5)


def test_kd_gradient_reaches_only_the_student():
    student = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    teacher = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    PixelKD(4.0)(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_kd_mask_restricts_the_mean():
    student, teacher = torch.randn(1, 3, 2, 2, 2), torch.randn(1, 3, 2, 2, 2)
    mask = torch.zeros(1, 1, 2, 2, 2)
    mask[..., 0, 0, 0] = 1
    full = PixelKD(1.0)(student, teacher, torch.ones_like(mask))
    assert float(full) == pytest.approx(float(PixelKD(1.0)(student, teacher)), rel=1e-5)
    single = PixelKD(1.0)(student[..., :1, :1, :1], teacher[..., :1, :1, :1])
    assert float(PixelKD(1.0)(student, teacher, mask)) == pytest.approx(float(single), rel=1e-5)


def test_supervised_loss_prefers_the_right_answer():
    labels = torch.randint(0, 3, (1, 1, 4, 4, 4))
    right = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 4, 1, 2, 3).float() * 10
    assert float(SupervisedLoss()(right, labels)) < float(SupervisedLoss()(-right, labels))


def test_dice_and_hd95_on_known_shapes():
    reference = np.zeros((20, 20, 20), np.uint8)
    reference[5:15, 5:15, 5:15] = 1
    shifted = np.roll(reference, 2, axis=2)
    dice = dice_per_label(shifted, reference, [1, 2])
    assert dice[1] == pytest.approx(2 * 8 * 100 / 2000)
    assert math.isnan(dice[2])  # absent from both
    assert dice_per_label(reference, reference, [1])[1] == pytest.approx(1.0)
    distance = hd95_per_label(shifted, reference, [1], (1.0, 1.0, 3.0))
    assert distance[1] == pytest.approx(6.0)  # two voxels of 3 mm along x


def test_compare_labels_rows():
    grid = dict(spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0))
    first = np.zeros((10, 10, 10), np.uint8)
    first[2:6, 2:6, 2:6] = 1
    second = first.copy()
    second[2:6, 2:6, 2:4] = 2
    rows = compare_labels(Volume(first, **grid), Volume(second, **grid), {1: "a", 2: "b"}, Volume(first, **grid))
    assert [r["structure"] for r in rows] == ["a", "b"]
    assert rows[0]["dice_first_vs_second"] == pytest.approx(2 * 32 / (64 + 32))
    assert rows[0]["dice_first_vs_reference"] == pytest.approx(1.0)
    assert rows[0]["volume_ml_first"] == pytest.approx(64 * 8 / 1000)
    assert rows[1]["volume_ml_second"] == pytest.approx(32 * 8 / 1000)
