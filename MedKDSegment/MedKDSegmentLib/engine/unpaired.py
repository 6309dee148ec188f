"""Unpaired CT + MR student (Dou et al., IEEE TMI 2020): one network segments both modalities.

Every convolution kernel is shared between CT and MR; only the normalisation layers are
separate, one copy per modality (``modality_norm.ModalityNorm``), because intensity statistics differ far
more between modalities than the anatomy does. Training draws one CT batch and one MR batch
(from different patients: unpaired) per step, runs each through the network with its own
normalisation layers, and adds to the per-modality Dice + cross-entropy a symmetric KL term
that aligns per-class "prototype" predictions across the two modalities (``PrototypeKL``).
The distillation methods of ``config.methods`` (pixel KD by default, or e.g. "cwd+coteacher") can be
added per modality, each modality learning from its own teacher.

A bundle made here records, per modality, its preprocessing profile and which normalisation
layers to use (``medkdsegment.modalities``, see README "Model bundle format"); inference picks
them from the volume's modality on every call, so one cached network serves both modalities.

Like-for-like baseline (same architecture, same budget): distil each modality on its own with
``training.distill_student(data, teacher, output, config, architecture)`` and the *same*
``TrainingConfig``: each then sees as many patches of its modality per step (``batch_size``)
and as many steps as the shared student sees of that modality here; segment the same held-out
volumes with both (``inference.segment``; one CT+MR bundle serves both modalities).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import distributed
from .augment import augment_batch, sampling_shape
from .bundle import Bundle, load_bundle, resolve_bundle, save_bundle
from .data import Case, load_cases, sample_batch
from .device import select_device
from .distillation import DistillContext, FeatureTap, TermSetup, build_terms, probe_channels
from .errors import CancelledError, InvalidInputError
from .labels import ABDOMEN_STRUCTURES, label_names
from .losses import SupervisedLoss
from .methods import format_methods, parse_methods
from .modality_norm import make_modality_specific, modality_norms, network_modalities, use_modality
from .networks import STUDENT_CONFIG, build_network, full_resolution
from .profiles import DEFAULT_PROFILES, Profile
from .runs import CHECKPOINT_FILE, TEACHER_CACHE, checkpoint_dir_for, epoch_message
from .training import (
    Optimisation,
    TrainingConfig,
    cache_teacher_outputs,
    data_parallel,
    distillation_loss,
    epoch_stream,
    evaluate,
    mean_dice,
    recalibrate_batch_norm,
    recalibrate_if_better,
    resume_from,
    resumed_message,
    save_checkpoint,
    seed_everything,
    split_cases,
)
from .volume import normalize_modality

Progress = Callable[[float, str], None]
PROTOTYPE_WEIGHT = 0.5  # λ of the paper
PROTOTYPE_TEMPERATURE = 2.0  # τ of the paper


# --- the prototype loss -----------------------------------------------------------------------------------


def class_prototypes(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class k, the mean logit vector over voxels labelled k: (K, C), and which classes occur: (K,).

    ``logits`` (N, C, D, H, W), ``labels`` (N, 1, D, H, W) integers in 0..C-1, on the same grid.
    Sums with ``index_add`` rather than a one-hot product: memory stays O(voxels), not O(voxels·C).
    """
    classes = logits.shape[1]
    flat = logits.movedim(1, -1).reshape(-1, classes)
    index = labels.reshape(-1).long()
    counts = torch.bincount(index, minlength=classes)[:classes]
    sums = flat.new_zeros(classes, classes).index_add(0, index, flat)
    return sums / counts.clamp_min(1).unsqueeze(1).to(flat.dtype), counts > 0


class PrototypeKL(nn.Module):
    """Dou et al.'s cross-modal prototype loss (IEEE TMI 2020, docs/distillation.md).

    Per class k and modality, the prototype z̄_k is the mean logit vector over the voxels labelled
    k (``class_prototypes``); q_k = softmax(z̄_k / τ), τ = 2; the loss is
    L = (1/K) Σ_k ½ [KL(q_k^a ‖ q_k^b) + KL(q_k^b ‖ q_k^a)], symmetric in the two modalities.

    - Classes absent from either batch are skipped: K counts only the classes present in both
      (background included); with none in common the loss is 0 (with a gradient graph, so a
      step still runs).
    - Both sides receive gradients (nothing is detached): each modality is pulled toward the other.
    - No T² factor: the paper's and the formula's scale, weighted by λ = 0.5 in the total loss.
    """

    def __init__(self, temperature: float = PROTOTYPE_TEMPERATURE) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self, logits_a: torch.Tensor, labels_a: torch.Tensor, logits_b: torch.Tensor, labels_b: torch.Tensor
    ) -> torch.Tensor:
        prototypes_a, present_a = class_prototypes(logits_a.float(), labels_a)
        prototypes_b, present_b = class_prototypes(logits_b.float(), labels_b)
        both = present_a & present_b
        if not bool(both.any()):
            return prototypes_a.sum() * 0.0 + prototypes_b.sum() * 0.0
        log_a = F.log_softmax(prototypes_a[both] / self.temperature, dim=1)
        log_b = F.log_softmax(prototypes_b[both] / self.temperature, dim=1)
        kl_ab = (log_a.exp() * (log_a - log_b)).sum(dim=1)
        kl_ba = (log_b.exp() * (log_b - log_a)).sum(dim=1)
        return (0.5 * (kl_ab + kl_ba)).mean()


# --- training ---------------------------------------------------------------------------------------------


@dataclass
class UnpairedHistory:
    epoch_loss: list[float] = field(default_factory=list)  # total loss per epoch
    # Per epoch, None where a term never ran: Dice+CE per modality, PrototypeKL (both unweighted), and per
    # modality the weighted sum of the distillation terms (config.methods) learnt from that modality's teacher.
    supervised: dict[str, list[float | None]] = field(default_factory=dict)
    prototype: list[float | None] = field(default_factory=list)
    kd: dict[str, list[float | None]] = field(default_factory=dict)
    terms: dict[str, list[dict]] = field(default_factory=dict)  # per modality, each term's record at the end
    first_step_loss: float = math.nan
    stopped_by_budget: bool = False


Data = str | os.PathLike | list[Case]


def distill_unpaired(
    ct_data: Data,
    mr_data: Data,
    output: str | os.PathLike,
    ct_teacher: str | os.PathLike | Bundle | None = None,
    mr_teacher: str | os.PathLike | Bundle | None = None,
    config: TrainingConfig | None = None,
    architecture: dict | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    *,
    profiles: dict[str, Profile] | None = None,
    prototype_weight: float = PROTOTYPE_WEIGHT,
    prototype_temperature: float = PROTOTYPE_TEMPERATURE,
) -> Bundle:
    """Train one CT + MR student and write it as a new bundle (never overwriting ``output``).

    Loss per step: Dice+CE(CT batch) + Dice+CE(MR batch) + ``prototype_weight`` · PrototypeKL
    + Σ_m Σ_terms weight · term(m's batch, m's teacher), the terms being those of ``config.methods``
    (default "kd": ``kd_weight`` · pixel-wise KL at ``kd_temperature``). A modality without a teacher
    gets only the terms that need none (co-teacher consistency); without any teacher and with the
    default methods this is Dou et al.'s own loss. ``methods="none"`` trains without distillation terms
    while still recording the teachers.

    ``*_data``: a folder (``DIR/images``, ``DIR/labels``) or a list of ``Case``s already on the
    model grid (benchmarks). Profiles: ``profiles[m]`` if given, else the teacher's, else the
    default; a teacher must be given data prepared its own way. Teacher outputs are cached on the
    cases (``Case.teacher``, by ``training.cache_teacher_outputs``).
    Checkpoints go to ``training.checkpoint_dir_for(output)`` every epoch; ``resume`` continues
    them; ``cancel`` raises ``CancelledError`` and leaves no bundle.
    """

    output = Path(output)
    if output.exists():
        raise InvalidInputError(
            f"'{output}' already exists; models are never overwritten.", "Choose a new output name."
        )
    config = config or TrainingConfig()
    architecture = architecture or STUDENT_CONFIG
    report = progress or (lambda fraction, stage: None)
    structures = ABDOMEN_STRUCTURES
    num_classes = len(structures) + 1
    modalities = ("CT", "MR")
    data = {"CT": ct_data, "MR": mr_data}
    given = {"CT": ct_teacher, "MR": mr_teacher}
    teachers = {m: t if t is None or isinstance(t, Bundle) else resolve_bundle(t) for m, t in given.items()}
    chosen = _choose_profiles(teachers, {normalize_modality(k): v for k, v in (profiles or {}).items()}, num_classes)

    cases: dict[str, list[Case]] = {}
    for position, modality in enumerate(modalities):
        source = data[modality]
        if isinstance(source, list):
            cases[modality] = source
        else:
            cases[modality] = load_cases(
                source, chosen[modality], label_names(structures), lambda f, m, p=position: report(0.025 * (p + f), m)
            )
        if not cases[modality]:
            raise InvalidInputError(f"No {modality} cases were given.", f"Give a folder of {modality} images/labels.")
        if teachers[modality] is None and not any(c.labels is not None for c in cases[modality]):
            raise InvalidInputError(
                f"No labelled {modality} cases to train on, and no {modality} teacher.",
                f"Add labels in DIR/labels (same file names as images), or give --{modality.lower()}-teacher.",
            )
    split = {m: split_cases(cases[m], config.validation_fraction, config.seed) for m in modalities}
    train = {m: split[m][0] for m in modalities}
    validation = {m: split[m][1] for m in modalities}

    seed_everything(config.seed)
    network = make_modality_specific(build_network(architecture, num_classes), modalities)
    teacher_networks = {m: _teacher_network(b, m) for m, b in teachers.items() if b is not None}
    checkpoint_dir = checkpoint_dir_for(output)
    history = train_unpaired(
        network,
        train,
        config,
        checkpoint_dir,
        teacher_networks,
        resume,
        lambda f, m: report(0.05 + 0.9 * f, m),
        cancel,
        prototype_weight=prototype_weight,
        prototype_temperature=prototype_temperature,
    )
    def write_bundle() -> Bundle:  # in the main process; the others read it back (written_by_main)
        device = select_device(config.device)
        report(0.96, "recalibrating batch-norm statistics per modality, if that helps on validation")

        def validation_dice() -> float:  # the mean over both modalities' validation cases
            scores = []
            for modality in modalities:
                with use_modality(network, modality):
                    scores.append(mean_dice(evaluate(network, validation[modality], num_classes, device)))
            return float(np.mean(scores))

        recalibration = recalibrate_if_better(network, lambda: recalibrate_per_modality(network, train, device),
                                              validation_dice if all(validation.values()) else None)
        metrics: dict = {
            "batch_norm_recalibration": recalibration,
            "train_loss": history.epoch_loss,
            "train_supervised": history.supervised,
            "train_prototype_kl": history.prototype,
            "train_kd": history.kd,
            "stopped_by_budget": history.stopped_by_budget,
        }
        validation_dice = {}
        for modality in modalities:
            if validation[modality]:
                with use_modality(network, modality):
                    dice = evaluate(network, validation[modality], num_classes, device)
                validation_dice[modality] = {structures[label - 1].name: value for label, value in dice.items()}
        if validation_dice:
            metrics["validation_dice"] = validation_dice
        records = [record | {"modality": m} for m in modalities for record in history.terms.get(m, [])]
        plain_kd = bool(teacher_networks) and {r["name"] for r in records} == {"kd"}
        method = {
            # The names the CT+MR bundles were first made with when the methods are plain pixel KD (or none).
            "name": ("unpaired_kd" if plain_kd else f"unpaired+{format_methods(parse_methods(config.methods), config)}")
            if records
            else "unpaired",
            "reference": "Dou et al., IEEE TMI 2020 (shared kernels, per-modality normalisation, prototype KL)",
            "prototype_weight": prototype_weight,
            "prototype_temperature": prototype_temperature,
            "training": asdict(config),
        }
        if records:
            method["methods"] = records
        kd = next((r for r in records if r["name"] == "kd"), None)
        if kd is not None:
            method |= {"kd_temperature": kd["temperature"], "kd_weight": kd["weight"]}
        report(0.98, "writing the bundle")
        counts = ", ".join(f"{len(train[m])} {m}" for m in modalities)
        bundle = save_bundle(
            output,
            network.cpu(),
            name=output.name,
            role="student",
            architecture=architecture,
            profile=chosen["CT"],
            profiles=chosen,
            teachers=teachers,
            structures=structures,
            method=method,
            teacher=teachers["CT"] or teachers["MR"],
            metrics=metrics,
            description=f"CT+MR phantom-abdomen student ({method['name']}) trained on {counts} unpaired cases",
        )
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        report(1.0, "done")
        return bundle

    return distributed.written_by_main(write_bundle, lambda: load_bundle(output))


def _choose_profiles(teachers: dict, explicit: dict[str, Profile], num_classes: int) -> dict[str, Profile]:
    """Per modality: the explicit profile, else the teacher's, else the default; teachers are checked."""
    chosen = {}
    for modality, teacher in teachers.items():
        profile = explicit.get(modality)
        if teacher is not None:
            if modality not in teacher.modalities:
                raise InvalidInputError(
                    f"The {modality} teacher '{teacher.name}' is a {teacher.modality} model.",
                    f"Give a {modality} teacher for --{modality.lower()}-teacher.",
                )
            if teacher.num_classes != num_classes:
                raise InvalidInputError(
                    f"Teacher '{teacher.name}' has {teacher.num_classes} classes, expected {num_classes}.",
                    "Use a teacher with the phantom-abdomen label table.",
                )
            if profile is not None and profile != teacher.profile_for(modality):
                raise InvalidInputError(
                    f"The {modality} profile given differs from that of teacher '{teacher.name}'.",
                    "Leave the profile out (the teacher's is used) or give the teacher's.",
                )
            profile = teacher.profile_for(modality)
        profile = profile or DEFAULT_PROFILES[modality]
        if profile.modality != modality:
            raise InvalidInputError(f"The profile given for {modality} is a {profile.modality} profile.")
        chosen[modality] = profile
    return chosen


def _teacher_network(bundle: Bundle, modality: str) -> nn.Module:
    network = bundle.load_network()
    if bundle.modality_specific:  # a CT+MR teacher: its own network, fixed to this modality
        use_modality(network, modality)
    return network


def train_unpaired(
    network: nn.Module,
    cases: dict[str, list[Case]],
    config: TrainingConfig,
    checkpoint_dir: Path,
    teachers: dict[str, nn.Module] | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    *,
    prototype_weight: float = PROTOTYPE_WEIGHT,
    prototype_temperature: float = PROTOTYPE_TEMPERATURE,
) -> UnpairedHistory:
    """Train a modality-specific ``network`` in place on ``cases[modality]`` (exactly two modalities).

    This is not ``training.fit``: every step needs one batch *per modality*, each forwarded with
    its own normalisation layers, and a loss (PrototypeKL) that couples the two forward passes;
    fit draws one batch from one list of cases. The loop reuses fit's conventions and helpers:
    per-epoch seeding from (seed, epoch) so a resumed run equals an uninterrupted one, an atomic
    checkpoint every epoch, the cosine schedule, AMP on CUDA, the time budget and cancel.

    Each modality gets its own set of ``config.methods`` terms, built with that modality's teacher:
    learnt parts (CTKD's temperature, hint adapters) are per modality, like the normalisation layers,
    and the co-teacher's copy of the network runs with that modality's normalisation layers.
    """

    report = progress or (lambda fraction, stage: None)
    teachers = teachers or {}
    modalities = network_modalities(network)
    if len(modalities) != 2 or set(cases) != set(modalities):
        raise ValueError(f"need cases for the network's two modalities {modalities}, got {tuple(cases)}")
    device = select_device(config.device)
    network.to(device).train()
    for teacher in teachers.values():
        teacher.to(device).eval()
    terms = _modality_terms(network, teachers, config).to(device)
    optimisation = Optimisation(network, terms, config)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    supervised = SupervisedLoss()
    prototype_kl = PrototypeKL(prototype_temperature)
    methods = format_methods(parse_methods(config.methods), config)
    history, start_epoch = UnpairedHistory(), 0

    checkpoint = checkpoint_dir / CHECKPOINT_FILE
    state = resume_from(checkpoint, resume, methods, network, terms, optimisation)
    if state is not None:
        history, start_epoch = UnpairedHistory(**state["history"]), int(state["epoch"])
        report(start_epoch / config.epochs, resumed_message(state))

    for modality, teacher in teachers.items():
        if len(terms[modality]):
            cache_teacher_outputs(teacher, cases[modality], device,
                                  lambda f, m, mod=modality: report(0.0, f"{mod}: {m}"), checkpoint_dir / TEACHER_CACHE)
    # Feature terms (hint, at) read intermediate maps through forward hooks; their teacher then runs per step.
    student_layers = sorted({layer for group in terms.values() for term in group for layer in term.student_layers})
    student_tap = FeatureTap(network, student_layers) if student_layers else None
    teacher_taps = {
        m: [FeatureTap(teachers[m], sorted({t.teacher_layers[0] for t in group if t.needs_features}))]
        for m, group in terms.items()
        if m in teachers and any(t.needs_features for t in group)
    }
    main = distributed.current().main
    try:
        with data_parallel(network, terms, device) as model:
            started = time.monotonic()
            for epoch in range(start_epoch, config.epochs):
                rng = epoch_stream(config, epoch, started, history, report)
                if rng is None:
                    break
                network.train()
                totals: list[float] = []
                parts: dict[str, list[float]] = {}
                for step in range(config.steps_per_epoch):
                    if cancel is not None and cancel():
                        raise CancelledError()
                    # Both batches are drawn before any forward pass so the random stream is fixed per step.
                    region = sampling_shape(config.patch_size, config.spatial_augmentation)
                    batches = {m: sample_batch(cases[m], config.batch_size, region, rng) for m in modalities}
                    outputs = {}
                    with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                        loss = torch.zeros((), device=device)
                        for modality in modalities:
                            images, labels, labelled, cached = batches[modality]
                            cached = cached.to(device) if cached is not None else None
                            images, labels, cached = augment_batch(images.to(device), labels.to(device), cached, rng,
                                                                   config.spatial_augmentation, config.patch_size)
                            use_modality(network, modality)
                            logits = full_resolution(model(images), images.shape[2:]).float()
                            outputs[modality] = (logits[labelled.to(device)], labels[labelled.to(device)])
                            if labelled.any():
                                term = supervised(*outputs[modality])
                                loss = loss + term
                                parts.setdefault(f"supervised_{modality}", []).append(float(term.detach()))
                            group = terms[modality]
                            if len(group):
                                context = DistillContext(
                                    images,
                                    logits,
                                    labels,
                                    labelled,
                                    network,
                                    epoch=epoch,
                                    step=epoch * config.steps_per_epoch + step,
                                )
                                own = [teachers[modality]] if modality in teachers else []
                                term = distillation_loss(
                                    group,
                                    context,
                                    student_tap,
                                    own,
                                    [1.0],
                                    cached,
                                    teacher_taps.get(modality, []),
                                    config,
                                    device,
                                )
                                loss = loss + term
                                parts.setdefault(f"kd_{modality}", []).append(float(term.detach()))
                        term = prototype_kl(*outputs[modalities[0]], *outputs[modalities[1]])
                        loss = loss + prototype_weight * term
                        parts.setdefault("prototype", []).append(float(term.detach()))
                    optimisation.step(loss, scaler)
                    for group in terms.values():
                        for term in group:
                            term.after_step(network)
                    totals.append(float(loss.detach()))
                    if math.isnan(history.first_step_loss):
                        history.first_step_loss = totals[0]
                    done = (epoch * config.steps_per_epoch + step + 1) / (config.epochs * config.steps_per_epoch)
                    report(done, epoch_message(epoch + 1, config.epochs, float(np.mean(totals))))
                history.epoch_loss.append(distributed.mean(float(np.mean(totals))))
                history.prototype.append(_mean(parts.get("prototype")))
                for modality in modalities:
                    history.supervised.setdefault(modality, []).append(_mean(parts.get(f"supervised_{modality}")))
                    if len(terms[modality]):
                        history.kd.setdefault(modality, []).append(_mean(parts.get(f"kd_{modality}")))
                if main:
                    save_checkpoint(checkpoint, network, optimisation, history, epoch + 1, terms=terms.state_dict(),
                                    methods=methods, processes=distributed.current().world_size)
    finally:
        for tap in [student_tap, *(tap for taps in teacher_taps.values() for tap in taps)]:
            if tap is not None:
                tap.remove()
    history.terms = {m: [term.describe() for term in group] for m, group in terms.items() if len(group)}
    use_modality(network, modalities[0])
    network.eval()
    return history


def _modality_terms(network: nn.Module, teachers: dict[str, nn.Module], config: TrainingConfig) -> nn.ModuleDict:
    """Per modality, the terms of ``config.methods`` built with that modality's teacher (if any)."""
    terms = nn.ModuleDict()
    # Learnt parts of terms start from config.seed, as in training.fit.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for modality in network_modalities(network):
            teacher = teachers.get(modality)
            with use_modality(network, modality):
                try:
                    group = build_terms(
                        config.methods,
                        TermSetup(config, probe_channels(network, ""), network, [teacher] if teacher else []),
                    )
                except InvalidInputError as error:
                    raise InvalidInputError(
                        f"{modality}: {error.problem}",
                        error.fix.replace("Give a teacher", f"Give a {modality} teacher"),
                    ) from error
            if modality_norms(group):  # the co-teacher's copy: always this modality's normalisation
                use_modality(group, modality)
            terms[modality] = group
    return terms


def _mean(values: list[float] | None) -> float | None:
    """Mean of an epoch's values; None (valid JSON, unlike NaN) when a term never ran, e.g. no labels."""
    return float(np.mean(values)) if values else None


def recalibrate_per_modality(network: nn.Module, cases: dict[str, list[Case]], device: torch.device) -> None:
    """``training.recalibrate_batch_norm`` once per modality, each over that modality's whole volumes.

    torch's ``update_bn`` resets *every* batch-norm layer it finds, the other modality's copies
    included; those are saved before and restored after, so each copy only sees its own modality.
    """
    layers = modality_norms(network)
    for modality, modality_cases in cases.items():
        if not modality_cases:
            continue
        index = layers[0].modalities.index(normalize_modality(modality))
        kept = [
            (norm, copy.deepcopy(norm.state_dict()))
            for layer in layers
            for position, norm in enumerate(layer.norms)
            if position != index
        ]
        with use_modality(network, modality):
            recalibrate_batch_norm(network, modality_cases, device)
        for norm, state in kept:
            norm.load_state_dict(state)
    network.eval()
