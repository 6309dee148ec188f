"""Distillation losses. Each class's docstring gives its formula (see docs/distillation.md).

Logits are (N, C, D, H, W); "per voxel" means averaged over N·D·H·W.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.nn import functional as F


class PixelKD(nn.Module):
    """Pixel-wise KD (Hinton): T² · mean over voxels of KL(p_t ‖ p_s), p = softmax(z / T) over classes.

    ``mask`` (N, 1, D, H, W), optional, restricts the mean to selected voxels.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        t = self.temperature
        log_p_s = F.log_softmax(student / t, dim=1)
        log_p_t = F.log_softmax(teacher.detach() / t, dim=1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1, keepdim=True)
        if mask is not None:
            return t * t * (kl * mask).sum() / mask.sum().clamp_min(1)
        return t * t * kl.mean()


class SupervisedLoss(nn.Module):
    """Dice + cross-entropy on integer labels (N, 1, D, H, W), MONAI's DiceCELoss."""

    def __init__(self) -> None:
        super().__init__()
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=False, smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, labels)
