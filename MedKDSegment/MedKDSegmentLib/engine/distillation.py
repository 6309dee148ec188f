"""Distillation methods as combinable loss terms: a registry, a method-string parser, and the
pieces the training loop needs (feature taps, mixtures of teachers, the EMA co-teacher).

A method string such as ``"kd:1+cwd:0.5"`` selects terms and their weights. The training
loss is Dice + CE on labelled items plus Σ weight · term over *all* items, labelled or not
(every term here needs only the teacher, the student or the co-teacher, never labels).
Terms are ``nn.Module``s so that their learnable parts (CTKD's temperature, hint adapters)
join the student's optimiser and their whole state (the co-teacher too) goes into the
checkpoint. Formulas and sources: docs/distillation.md.

Teacher outputs reach a term as a list of tensors, one per teacher: logits, from the offline cache or from
running the teacher (a published teacher's pipeline gives probabilities, whose log serves as its logits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .errors import InvalidInputError
from .losses import (
    ChannelWiseKD,
    PixelKD,
    SupervisedLoss,
    attention_transfer,
    channel_distribution,
    cwd_to_target,
    dist_loss,
    kd_to_target,
    soft_probability_mse,
)
from .methods import DEFAULT_METHODS, METHODS, MethodSpec, parse_methods, resolve_weight
from .networks import feature_layer, full_resolution


def _check(value: float, name: str, low: float, high: float = math.inf, low_open: bool = True) -> float:
    """A hyperparameter within its range, else an error naming it."""
    value = float(value)
    inside = (value > low if low_open else value >= low) and value <= high
    if not math.isfinite(value) or not inside:
        bound = f"{'>' if low_open else '≥'} {low:g}" + (f" and ≤ {high:g}" if high != math.inf else "")
        raise InvalidInputError(f"{name} is {value:g}; it must be {bound}.", f"Set {name} within that range.")
    return value


# --- teachers ---------------------------------------------------------------------------------


def validate_teacher_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Weights for ``count`` teachers, normalised to sum to 1 (equal when none are given)."""
    if not weights:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise InvalidInputError(
            f"{len(weights)} teacher weights for {count} teachers.", "Give one --teacher-weight per --teacher, or none."
        )
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise InvalidInputError(
            f"Teacher weights {weights} must be numbers ≥ 0 with a positive sum.", "Give e.g. 0.7 and 0.3."
        )
    return [w / sum(weights) for w in weights]


def teacher_sample_weights(
    teacher_logits: Sequence[torch.Tensor], weights: Sequence[float], confidence: bool = False
) -> torch.Tensor:
    """Per-item teacher weights (N, K), rows summing to 1: the user's weights, optionally multiplied
    by each teacher's confidence on that item (mean over voxels of its largest class probability)."""
    n = teacher_logits[0].shape[0]
    w = torch.tensor(list(weights), dtype=torch.float32, device=teacher_logits[0].device).expand(n, -1)
    if confidence:
        confidences = torch.stack(
            [F.softmax(z.float(), dim=1).amax(dim=1).flatten(1).mean(1) for z in teacher_logits], 1
        )
        w = w * confidences
    return w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)


def teacher_mixture(
    teacher_logits: Sequence[torch.Tensor],
    weights: torch.Tensor | None,
    transform: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Σ_k w_k · transform(z_k): the weighted mixture of the teachers' distributions (``transform``
    softens one teacher's logits, e.g. a softmax at temperature T); one teacher: transform(z)."""
    if len(teacher_logits) == 1:
        return transform(teacher_logits[0])
    if weights is None:
        raise ValueError("several teachers need weights")
    mixture = None
    for k, z in enumerate(teacher_logits):
        part = transform(z)
        part = weights[:, k].view(-1, *([1] * (part.dim() - 1))) * part
        mixture = part if mixture is None else mixture + part
    return mixture


def _weighted_mean(per_teacher: list[torch.Tensor], weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over items of Σ_k w_k · loss_k per item (each loss (N,)); one teacher: the plain mean."""
    if len(per_teacher) == 1:
        return per_teacher[0].mean()
    return (torch.stack(per_teacher, dim=1) * weights).sum(dim=1).mean()


# --- feature taps -----------------------------------------------------------------------------


class FeatureTap:
    """Keeps the latest outputs of named submodules, via forward hooks, so that feature-based
    terms read intermediate maps without changing the network classes. Use as a context manager
    or call ``remove()``."""

    def __init__(self, network: nn.Module, layers: Sequence[str]) -> None:
        modules = dict(network.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            names = [name for name in modules if name][:30]
            raise InvalidInputError(
                f"{type(network).__name__} has no layer named {missing}.",
                f"Name one of its layers, e.g. {', '.join(names)}.",
            )
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in layers]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.features[name] = output

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.features = {}

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def probe_channels(network: nn.Module, layer: str, size: int = 32) -> int:
    """Channel count of ``layer``'s output, from one small forward pass in eval mode."""
    in_channels = next(m for m in network.modules() if isinstance(m, nn.Conv3d)).in_channels
    device = next(network.parameters()).device
    was_training = network.training
    network.eval()
    try:
        with FeatureTap(network, [layer]) as tap, torch.no_grad():
            network(torch.zeros(1, in_channels, size, size, size, device=device))
            return int(tap.features[layer].shape[1])
    finally:
        network.train(was_training)


# --- the context and the terms ----------------------------------------------------------------


@dataclass
class TermSetup:
    """What a term may look at when it is built."""

    config: Any  # TrainingConfig (not imported: training imports this module)
    num_classes: int
    student: nn.Module
    teachers: list[nn.Module] = field(default_factory=list)


@dataclass
class DistillContext:
    """One training step as the terms see it."""

    images: torch.Tensor  # the student's input (N, 1, *patch)
    logits: torch.Tensor  # student logits at the patch's resolution, float32
    labels: torch.Tensor  # (N, 1, *patch); meaningful where ``labelled``
    labelled: torch.Tensor  # bool (N,)
    student: nn.Module
    teacher_logits: list[torch.Tensor] = field(default_factory=list)  # per teacher (N, C, *patch)
    teacher_weights: torch.Tensor | None = None  # (N, K) per-item teacher weights; None for one teacher
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per teacher
    # The image with its privileged channels (KD-Net), of which each teacher takes its own; None: ``images``.
    teacher_images: torch.Tensor | None = None
    epoch: int = 0
    step: int = 0

    def teacher_mixture(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return teacher_mixture(self.teacher_logits, self.teacher_weights, transform)

    def teacher_probabilities(self, temperature: float | torch.Tensor) -> torch.Tensor:
        """The (mixture of the) teachers' class probabilities softened at ``temperature``."""
        return self.teacher_mixture(lambda z: F.softmax(z / temperature, dim=1))


class DistillTerm(nn.Module):
    """One distillation loss term: ``name`` is its method's (``methods.METHODS`` says what it needs), and
    subclasses implement ``forward(context)``."""

    name: ClassVar[str] = ""

    def __init__(self, weight: float, setup: TermSetup) -> None:
        super().__init__()
        self.weight = float(weight)
        self.student_layers: list[str] = []
        self.teacher_layers: list[str] = []  # one per teacher

    @property
    def needs_features(self) -> bool:
        """Whether the term reads feature maps (the teachers then run on every batch)."""
        return METHODS[self.name].needs_features

    @classmethod
    def defaults(cls, config: Any) -> dict:
        """Hyperparameters as ``medkd methods`` lists them (TrainingConfig fields)."""
        return {}

    def forward(self, context: DistillContext) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, student: nn.Module) -> None:
        """Called after each optimiser step (the co-teacher's EMA update)."""

    def temperature_parameters(self) -> list[nn.Parameter]:
        """Parameters that set a temperature (CTKD's): stepped by their own SGD (``CTKD_SGD``), not AdamW."""
        return []

    def describe(self) -> dict:
        """What the bundle's method section records about this term."""
        return {"name": self.name, "weight": self.weight, **self.settings()}

    def settings(self) -> dict:
        return {}


class KDTerm(DistillTerm):
    name = "kd"

    def __init__(self, weight: float, setup: TermSetup) -> None:
        super().__init__(weight, setup)
        self.temperature = _check(setup.config.kd_temperature, "kd_temperature", 0.0)
        self.kd = PixelKD(self.temperature)

    @classmethod
    def defaults(cls, config: Any) -> dict:
        return {"kd_temperature": config.kd_temperature}  # its default weight is kd_weight

    def forward(self, context: DistillContext) -> torch.Tensor:
        if len(context.teacher_logits) == 1:  # exactly the single-teacher loss the bundled students used
            return self.kd(context.logits, context.teacher_logits[0])
        t = self.temperature
        return kd_to_target(context.logits, context.teacher_probabilities(t), t)

    def settings(self) -> dict:
        return {"temperature": self.temperature}


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by −scale. torch has no such layer,
    and CTKD needs one so the temperature *ascends* the loss that the student descends."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def gradient_reversal(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _GradientReversal.apply(x, scale)


def ctkd_lambda(epoch: int, epochs: int) -> float:
    """CTKD's cosine curriculum λ_i = 1 − (cos(iπ/N) + 1)/2: 0 at epoch 0, 1 from epoch N on."""
    if epochs <= 0:
        return 1.0
    i = min(max(epoch, 0), epochs)
    return 1.0 - (math.cos(i * math.pi / epochs) + 1.0) / 2.0


CTKD_T_MIN, CTKD_T_RANGE = 1.0, 20.0
# The official code starts θ at 1 (T = 1 + 20·sigmoid(1) ≈ 15.6), where the sigmoid still has a slope: at the
# KD temperature of 1 it would be saturated, its gradient 2,900x smaller than at T = 4.
CTKD_INITIAL_THETA = 1.0
# θ's own optimiser, as in the official code: SGD (an adaptive optimiser would normalise away λ's scaling).
CTKD_SGD = {"momentum": 0.9, "weight_decay": 5e-4}


def ctkd_temperature(theta: torch.Tensor) -> torch.Tensor:
    """T = 1 + 20·sigmoid(θ): always within (1, 21)."""
    return CTKD_T_MIN + CTKD_T_RANGE * torch.sigmoid(theta)


class CTKDTerm(DistillTerm):
    name = "ctkd"

    def __init__(self, weight: float, setup: TermSetup) -> None:
        super().__init__(weight, setup)
        self.epochs = int(_check(setup.config.ctkd_epochs, "ctkd_epochs", 0.0, low_open=False))
        self.initial_temperature = float(ctkd_temperature(torch.tensor(CTKD_INITIAL_THETA)))
        self.theta = nn.Parameter(torch.tensor(CTKD_INITIAL_THETA))

    @classmethod
    def defaults(cls, config: Any) -> dict:
        return {"initial T": round(float(ctkd_temperature(torch.tensor(CTKD_INITIAL_THETA))), 2),
                "ctkd_epochs": config.ctkd_epochs}

    def temperature_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def temperature(self, context: DistillContext) -> torch.Tensor:
        return ctkd_temperature(gradient_reversal(self.theta, ctkd_lambda(context.epoch, self.epochs)))

    def forward(self, context: DistillContext) -> torch.Tensor:
        t = self.temperature(context)
        return kd_to_target(context.logits, context.teacher_probabilities(t), t)

    def final_temperature(self) -> float:
        return float(ctkd_temperature(self.theta.detach()))

    def settings(self) -> dict:
        return {
            "initial_temperature": self.initial_temperature,
            "final_temperature": self.final_temperature(),
            "lambda_epochs": self.epochs,
        }


class InstanceCTKDTerm(CTKDTerm):
    name = "ctkd_instance"

    def __init__(self, weight: float, setup: TermSetup) -> None:
        super().__init__(weight, setup)
        del self.theta  # θ comes from the MLP instead
        c = setup.num_classes
        self.mlp = nn.Sequential(nn.Linear(2 * c, 32), nn.ReLU(), nn.Linear(32, 1))
        # Zero last weights and a bias at the initial θ: every patch starts at the global term's temperature.
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.constant_(self.mlp[2].bias, CTKD_INITIAL_THETA)
        self.register_buffer("last_temperature", torch.tensor(self.initial_temperature))

    def temperature(self, context: DistillContext) -> torch.Tensor:
        dims = tuple(range(2, context.logits.dim()))
        teacher = context.teacher_mixture(lambda z: F.log_softmax(z.float(), dim=1))
        pooled = torch.cat([context.logits.detach().mean(dims), teacher.detach().mean(dims)], dim=1)
        theta = self.mlp(pooled.float()).float()  # (N, 1)
        t = ctkd_temperature(gradient_reversal(theta, ctkd_lambda(context.epoch, self.epochs)))
        if self.training:
            self.last_temperature.copy_(t.detach().mean())
        return t.view(-1, *([1] * (context.logits.dim() - 1)))

    def final_temperature(self) -> float:
        return float(self.last_temperature)  # mean over the last batch's patches


class CWDTerm(DistillTerm):
    name = "cwd"

    def __init__(self, weight: float, setup: TermSetup) -> None:
        super().__init__(weight, setup)
        self.temperature = _check(setup.config.cwd_temperature, "cwd_temperature", 0.0)
        self.cwd = ChannelWiseKD(self.temperature)

    @classmethod
    def defaults(cls, config: Any) -> dict:
        return {"cwd_temperature": config.cwd_temperature}

    def forward(self, context: DistillContext) -> torch.Tensor:
        if len(context.teacher_logits) == 1:
            return self.cwd(context.logits, context.teacher_logits[0])
        t = self.temperature
        return cwd_to_target(context.logits, context.teacher_mixture(lambda z: channel_distribution(z, t)), t)

    def settings(self) -> dict:
        return {"temperature": self.temperature}


class DISTTerm(DistillTerm):
    name = "dist"

    def __init__(self, weight: float, setup: TermSetup) -> None:
        super().__init__(weight, setup)
        self.temperature = _check(setup.config.dist_temperature, "dist_temperature", 0.0)

    @classmethod
    def defaults(cls, config: Any) -> dict:
        return {"dist_temperature": config.dist_temperature}

    def forward(self, context: DistillContext) -> torch.Tensor:
        t = self.temperature
        p_s = F.softmax(context.logits / t, dim=1)
        return t * t * dist_loss(p_s, context.teacher_probabilities(t))

    def settings(self) -> dict:
        return {"temperature": self.temperature}


class PseudoLabelTerm(DistillTerm):
    name = "pseudo"

    def __init__(self, weight: float, setup: TermSetup) -> None:
        super().__init__(weight, setup)
        self.loss = SupervisedLoss()

    def forward(self, context: DistillContext) -> torch.Tensor:
        with torch.no_grad():
            labels = context.teacher_probabilities(1.0).argmax(dim=1, keepdim=True)
        return self.loss(context.logits, labels)


class _FeatureTerm(DistillTerm):
    """Shared set-up of feature terms: which student and teacher layers to tap."""


    def __init__(self, weight: float, setup: TermSetup) -> None:
        super().__init__(weight, setup)
        config = setup.config
        try:
            self.student_layers = [config.hint_student_layer or feature_layer(setup.student)]
            self.teacher_layers = [config.hint_teacher_layer or feature_layer(t) for t in setup.teachers]
        except ValueError as error:
            raise InvalidInputError(
                f"Method '{self.name}': {error}.", "Set hint_student_layer / hint_teacher_layer (--hint-layers)."
            ) from error

    @classmethod
    def defaults(cls, config: Any) -> dict:
        return {
            "hint_student_layer": config.hint_student_layer or "(deepest encoder output)",
            "hint_teacher_layer": config.hint_teacher_layer or "(bottleneck)",
        }

    def pairs(self, context: DistillContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
        student = context.student_features[self.student_layers[0]].float()
        return [
            (student, features[layer].float()) for features, layer in zip(context.teacher_features, self.teacher_layers)
        ]

    def settings(self) -> dict:
        return {"student_layer": self.student_layers[0], "teacher_layers": self.teacher_layers}


class HintTerm(_FeatureTerm):
    name = "hint"

    def __init__(self, weight: float, setup: TermSetup) -> None:
        super().__init__(weight, setup)
        student_channels = probe_channels(setup.student, self.student_layers[0])
        self.adapters = nn.ModuleList(
            nn.Conv3d(student_channels, probe_channels(t, layer), kernel_size=1)
            for t, layer in zip(setup.teachers, self.teacher_layers)
        )

    def forward(self, context: DistillContext) -> torch.Tensor:
        losses = []
        for adapter, (student, teacher) in zip(self.adapters, self.pairs(context)):
            projected = full_resolution(adapter(student).float(), tuple(teacher.shape[2:]))
            # FitNets' L2 against the teacher feature scaled to unit RMS per item. Raw, the UNet teacher's
            # bottleneck (RMS in the thousands) made even hint:0.01 swamp Dice + CE, and no adapter learns
            # that scale in a few hundred steps; scaled, the weight means the same for any teacher.
            target = teacher.detach().flatten(1)
            target = target / target.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-6)
            losses.append((projected.flatten(1) - target).pow(2).mean(1))
        return _weighted_mean(losses, context.teacher_weights)


class ATTerm(_FeatureTerm):
    name = "at"

    def forward(self, context: DistillContext) -> torch.Tensor:
        losses = [attention_transfer(student, teacher) for student, teacher in self.pairs(context)]
        return _weighted_mean(losses, context.teacher_weights)


def consistency_rampup(step: int, rampup_steps: float) -> float:
    """The mean-teacher consistency weight exp(−5(1−t)²), t = step / ``rampup_steps`` up to 1 (Laine & Aila 2017,
    Tarvainen & Valpola 2017): about 0.007 at the start, 1 from ``rampup_steps`` on (always 1 without a ramp)."""
    if rampup_steps <= 0:
        return 1.0
    t = min(max(step / rampup_steps, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class CoTeacherTerm(DistillTerm):
    name = "coteacher"

    def __init__(self, weight: float, setup: TermSetup) -> None:
        super().__init__(weight, setup)
        config = setup.config
        self.alpha = _check(config.coteacher_alpha, "coteacher_alpha", 0.0, 1.0, low_open=False)
        self.tau = _check(config.coteacher_tau, "coteacher_tau", 0.0)
        self.noise = _check(config.coteacher_noise, "coteacher_noise", 0.0, low_open=False)
        self.kd_weight = _check(config.coteacher_kd_weight, "coteacher_kd_weight", 0.0, low_open=False)
        rampup = _check(config.coteacher_rampup, "coteacher_rampup", 0.0, 1.0, low_open=False)
        self.rampup_steps = rampup * config.epochs * config.steps_per_epoch
        # AveragedModel with use_buffers=True averages the batch-norm statistics too, so the co-teacher
        # can run in eval mode with statistics that follow the student's (no separate copy step).
        self.coteacher = AveragedModel(setup.student, multi_avg_fn=get_ema_multi_avg_fn(self.alpha), use_buffers=True)
        # AveragedModel's first update copies instead of averaging; spend it now on the identical
        # initial weights, so that every update during training is exactly θ_c ← αθ_c + (1−α)θ_s.
        self.coteacher.update_parameters(setup.student)
        self.coteacher.requires_grad_(False)
        self.coteacher.eval()

    @classmethod
    def defaults(cls, config: Any) -> dict:
        return {
            "coteacher_alpha": config.coteacher_alpha,
            "coteacher_tau": config.coteacher_tau,
            "coteacher_noise": config.coteacher_noise,
            "coteacher_kd_weight": config.coteacher_kd_weight,
            "coteacher_rampup": config.coteacher_rampup,
        }

    def train(self, mode: bool = True) -> CoTeacherTerm:
        super().train(mode)
        self.coteacher.eval()  # the co-teacher only ever predicts
        return self

    def forward(self, context: DistillContext) -> torch.Tensor:
        size = tuple(context.images.shape[2:])
        loss = context.logits.new_zeros(())
        if context.teacher_logits:
            target = context.teacher_probabilities(self.tau)
            loss = loss + self.kd_weight * soft_probability_mse(context.logits, target, self.tau)
        images = context.images
        noisy_student = images + self.noise * torch.randn_like(images)
        noisy_coteacher = images + self.noise * torch.randn_like(images)
        student = F.softmax(full_resolution(context.student(noisy_student), size).float(), dim=1)
        with torch.no_grad():
            coteacher = F.softmax(full_resolution(self.coteacher(noisy_coteacher), size).float(), dim=1)
        # Summed over classes and averaged over voxels, as the KD part is.
        consistency = (student - coteacher).pow(2).sum(dim=1).mean()
        return loss + consistency_rampup(context.step, self.rampup_steps) * consistency

    def after_step(self, student: nn.Module) -> None:
        self.coteacher.update_parameters(student)

    def settings(self) -> dict:
        return {"alpha": self.alpha, "tau": self.tau, "noise_std": self.noise, "kd_weight": self.kd_weight,
                "rampup_steps": self.rampup_steps}


# Each method's term, in the methods' order.
TERMS: dict[str, type[DistillTerm]] = {
    term.name: term
    for term in sorted((KDTerm, CTKDTerm, InstanceCTKDTerm, CWDTerm, DISTTerm, HintTerm, ATTerm, CoTeacherTerm,
                        PseudoLabelTerm), key=lambda term: list(METHODS).index(term.name))
}


def build_terms(methods: str | Sequence[MethodSpec], setup: TermSetup) -> nn.ModuleList:
    """The terms of a method string, built for ``setup``. Without a teacher, the default ``"kd"``
    gives no terms (plain supervised training, as before); other teacher-needing methods are refused."""
    specs = parse_methods(methods) if isinstance(methods, str) else list(methods)
    terms = nn.ModuleList()
    for spec in specs:
        if METHODS[spec.name].needs_teacher and not setup.teachers:
            if isinstance(methods, str) and methods.strip() == DEFAULT_METHODS:
                continue
            teacherless = [name for name, method in METHODS.items() if not method.needs_teacher]
            raise InvalidInputError(
                f"Method '{spec.name}' needs a teacher.",
                f"Give a teacher, or use methods that need none: {', '.join(teacherless)}.",
            )
        terms.append(TERMS[spec.name](resolve_weight(spec, setup.config), setup))
    return terms


def describe_methods(config: Any) -> list[dict]:
    """One row per method: name, description, default weight and hyperparameters (``medkd methods``)."""
    return [
        {
            "name": name,
            "description": method.description,
            "default_weight": resolve_weight(MethodSpec(name), config),
            "needs_teacher": method.needs_teacher,
            "defaults": TERMS[name].defaults(config),
        }
        for name, method in METHODS.items()
    ]
