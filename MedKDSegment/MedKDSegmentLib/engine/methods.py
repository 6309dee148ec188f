"""Distillation methods by name, without torch: what each does, its default weight, what it needs, and the
method-string grammar (``"kd:1+cwd:0.5"``). The GUI lists them from here; ``distillation`` builds their terms.
Formulas and sources: docs/distillation.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInputError

DEFAULT_METHODS = "kd"
NO_METHODS = "none"  # no distillation term: Dice + CE only (a from-scratch baseline, even with a teacher)


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    default_weight: float | None = 1.0  # the weight when a method string gives none; None: the run's kd_weight
    needs_teacher: bool = True  # the co-teacher alone needs none (its consistency part is the student's own EMA)
    needs_features: bool = False  # feature maps: the teachers then run on every batch, not from the cache


METHODS: dict[str, Method] = {method.name: method for method in (
    Method("kd", "pixel-wise KD (Hinton): T²·KL(p_t ‖ p_s) per voxel, p = softmax(z/T) over classes",
           default_weight=None),
    Method("ctkd", "curriculum temperature KD (Li et al. 2023): learnable T = 1+20·sigmoid(θ) behind a gradient "
                   "reversal, λ rising 0→1 by a cosine over ctkd_epochs; θ starts at 1 (T ≈ 15.6) and steps by SGD"),
    Method("ctkd_instance", "CTKD, instance-wise: a tiny MLP on each patch's pooled student and teacher outputs "
                            "predicts θ per patch"),
    # A KL over every voxel of a 3D patch: at weight 1 its gradient was 31x that of Dice + CE and the student
    # lost 5 Dice points on phantom CT, 3 on MR and on BRATS; at 0.05 one MR seed in four lost 10.
    Method("cwd", "channel-wise KD (Shu et al. 2021): per (n, c) softmax over space of z/T; T²·Σ KL(t ‖ s)/(N·C)",
           default_weight=0.02),
    Method("dist", "DIST (Huang et al. 2022): τ²·[(1 − Pearson across classes per voxel) + (1 − Pearson per class)]"),
    Method("hint", "feature hints (FitNets): L2 between a 1×1×1-adapted student feature and the teacher's "
                   "(resampled), the teacher's scaled to unit RMS per item", needs_features=True),
    # At weight 1 its gradient was 3.8x that of Dice + CE and cost 1.5 Dice points on phantom CT.
    Method("at", "attention transfer (Zagoruyko & Komodakis): L2 between L2-normalised Σ_c |F|² maps",
           default_weight=0.2, needs_features=True),
    Method("coteacher", "ACT-Net's co-teacher, its mean-teacher part (Zhao et al. 2022): coteacher_kd_weight·"
                        "‖σ(z_s/τ) − σ(z_t/τ)‖² + w(t)·‖f_s(x+ξ) − f_c(x+ξ′)‖², f_c = EMA of the student, w ramped "
                        "up as exp(−5(1−t)²); the paper's alternating student/teacher roles are not built; without "
                        "a teacher: mean-teacher consistency", needs_teacher=False),
    Method("pseudo", "the teacher's hard pseudo-labels: Dice + CE against the arg-max of its (mixed) probabilities"),
)}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    weight: float | None = None  # None: the method's default weight


def parse_methods(text: str) -> list[MethodSpec]:
    """``"kd:1+cwd:0.5"`` → [MethodSpec("kd", 1.0), MethodSpec("cwd", 0.5)]; names are case- and
    dash-insensitive (``ctkd-instance`` = ``ctkd_instance``); ``"none"`` → [] (no distillation term)."""
    known = (
        f"Known methods: {', '.join(METHODS)} (or '{NO_METHODS}'). "
        "Combine them as 'kd:1+cwd:0.5' (see 'medkd methods')."
    )
    if str(text).strip().lower() == NO_METHODS:
        return []
    specs: list[MethodSpec] = []
    for part in str(text).replace(" ", "").split("+"):
        name, colon, weight_text = part.partition(":")
        name = name.lower().replace("-", "_")
        if not name:
            raise InvalidInputError(f"The method string '{text}' has an empty method name.", known)
        if name not in METHODS:
            raise InvalidInputError(f"Unknown distillation method '{name}'.", known)
        weight = None
        if colon:
            try:
                weight = float(weight_text)
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight) or weight < 0:
                raise InvalidInputError(
                    f"The weight '{weight_text}' of method '{name}' is not a number ≥ 0.", "Write e.g. 'kd:1+cwd:0.5'."
                )
        if any(spec.name == name for spec in specs):
            raise InvalidInputError(f"Method '{name}' is given twice in '{text}'.", "Name each method once.")
        specs.append(MethodSpec(name, weight))
    return specs


def resolve_weight(spec: MethodSpec, config: Any) -> float:
    """The weight a method runs at: the string's, else its default (``config.kd_weight`` for ``kd``)."""
    if spec.weight is not None:
        return spec.weight
    default = METHODS[spec.name].default_weight
    return float(config.kd_weight) if default is None else default


def format_methods(specs: list[MethodSpec], config: Any) -> str:
    """The canonical method string with resolved weights, e.g. ``"kd:1+cwd:0.5"``."""
    return "+".join(f"{spec.name}:{resolve_weight(spec, config):g}" for spec in specs) or NO_METHODS
