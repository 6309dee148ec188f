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

    def __init__(self, temperature: float = 1.0) -> None:
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


def kd_to_target(student: torch.Tensor, target: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """T² · mean over voxels of KL(target ‖ softmax(student / T)), for a target given as probabilities
    (a mixture of teachers, or a learnable temperature). ``temperature`` is a number or a tensor that
    broadcasts against (N, 1, D, H, W), e.g. one temperature per item."""
    # ``target`` is not detached: with a learnable temperature it carries the temperature's gradient.
    log_p_s = F.log_softmax(student / temperature, dim=1)
    kl = (torch.xlogy(target, target) - target * log_p_s).sum(dim=1, keepdim=True)
    return (temperature * temperature * kl).mean()


def channel_distribution(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """CWD's per-channel distribution: for each (n, c), softmax over *space* of z / T; shape (N, C, D·H·W)."""
    return F.softmax(logits.flatten(2) / temperature, dim=2)


class ChannelWiseKD(nn.Module):
    """CWD (Shu et al., ICCV 2021): T² · Σ_{n,c} KL(φ(z_t^{n,c}) ‖ φ(z_s^{n,c})) / (N·C), φ = softmax over
    space of z / T. Each channel becomes a spatial distribution: the student learns *where* each
    class is most salient, not the per-voxel class balance. Needs true logits: unlike the class
    softmax, the spatial softmax is not invariant to a per-voxel constant.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return cwd_to_target(student, channel_distribution(teacher.detach(), self.temperature), self.temperature)


def cwd_to_target(student: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """CWD against a given per-channel spatial distribution ``target`` (N, C, D·H·W)."""
    log_p_s = F.log_softmax(student.flatten(2) / temperature, dim=2)
    kl = (torch.xlogy(target, target) - target * log_p_s).sum(dim=2)  # (N, C)
    return temperature * temperature * kl.mean()


def _pearson(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation along ``dim``: the cosine of the mean-centred vectors."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def dist_loss(p_student: torch.Tensor, p_teacher: torch.Tensor) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022) on probabilities (N, C, D, H, W): (1 − Pearson across classes,
    averaged over voxels) + (1 − Pearson across all voxels of the batch, averaged over classes).
    Matching relations rather than values tolerates a student that cannot reach the teacher's
    confidence; any positive affine map of either input leaves it unchanged."""
    s = p_student.movedim(1, -1).reshape(-1, p_student.shape[1])  # (voxels, C)
    t = p_teacher.detach().movedim(1, -1).reshape(-1, p_teacher.shape[1])
    inter = 1 - _pearson(s, t, dim=1).mean()
    intra = 1 - _pearson(s, t, dim=0).mean()
    return inter + intra


def attention_map(features: torch.Tensor, size: tuple[int, ...] | None = None) -> torch.Tensor:
    """Attention transfer's map (Zagoruyko & Komodakis): Σ_c |F_c|², optionally resampled to
    ``size``, flattened per item and L2-normalised; shape (N, D·H·W)."""
    energy = features.float().pow(2).sum(dim=1, keepdim=True)
    if size is not None and tuple(energy.shape[2:]) != tuple(size):
        energy = F.interpolate(energy, size=size, mode="trilinear", align_corners=False)
    return F.normalize(energy.flatten(1), dim=1)


def attention_transfer(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per item ‖a_s − a_t‖² between normalised attention maps (student map resampled to the
    teacher's size); shape (N,). Channel counts may differ: the map sums over channels."""
    a_t = attention_map(teacher.detach())
    a_s = attention_map(student, tuple(teacher.shape[2:]))
    return (a_s - a_t).pow(2).sum(dim=1)


def soft_probability_mse(student: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """ACT-Net's KD term: mean over voxels of ‖softmax(z_s / τ) − p_t‖² (sum over classes), with the
    teacher's probabilities ``target`` already softened at τ."""
    p_s = F.softmax(student / temperature, dim=1)
    return (p_s - target.detach()).pow(2).sum(dim=1).mean()
