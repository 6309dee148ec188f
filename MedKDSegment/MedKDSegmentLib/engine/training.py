"""One training loop for teachers and distilled students: seeded, checkpointed every epoch, resumable.

A run keeps its checkpoint in ``<output>.checkpoint/``; the bundle is written only when
the run completes, so a killed or cancelled run never leaves a half-written model.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .bundle import Bundle, resolve_bundle, save_bundle
from .data import Case, load_cases, sample_batch
from .device import select_device
from .errors import CancelledError, InvalidInputError
from .inference import pad_to_multiple_of_8, predict_scores
from .labels import ABDOMEN_STRUCTURES
from .losses import PixelKD, SupervisedLoss
from .metrics import dice_per_label
from .networks import STUDENT_CONFIG, TEACHER_CONFIG, build_network, full_resolution, output_stride
from .profiles import DEFAULT_PROFILES, Profile
from .volume import normalize_modality

Progress = Callable[[float, str], None]


@dataclass
class TrainingConfig:
    epochs: int = 20
    steps_per_epoch: int = 25
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (64, 64, 64)
    learning_rate: float = 2e-3
    seed: int = 0
    kd_temperature: float = 4.0
    kd_weight: float = 1.0
    validation_fraction: float = 0.2
    validate_every: int = 0  # epochs between validation passes (0: only at the end)
    device: str = "auto"
    time_budget_s: float | None = None  # stop cleanly (checkpoint kept) once this much wall time has passed


@dataclass
class History:
    epoch_loss: list[float] = field(default_factory=list)
    validation_dice: list[float] = field(default_factory=list)
    first_step_loss: float = math.nan
    stopped_by_budget: bool = False


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def split_cases(cases: list[Case], fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Hold out a fraction of the labelled cases for validation (at least one if there are three or more)."""
    labelled = [i for i, c in enumerate(cases) if c.labels is not None]
    count = int(round(len(labelled) * fraction)) if len(labelled) >= 3 else 0
    held = set(np.random.default_rng(seed).permutation(labelled)[:count].tolist())
    return [c for i, c in enumerate(cases) if i not in held], [c for i, c in enumerate(cases) if i in held]


def evaluate(network: nn.Module, cases: list[Case], num_classes: int, device: torch.device) -> dict[int, float]:
    """Mean Dice per label on the model grid over labelled ``cases``."""
    network.eval()
    per_label: dict[int, list[float]] = {label: [] for label in range(1, num_classes)}
    for case in cases:
        scores, _, padded = predict_scores(network, case.image, device)
        prediction = full_resolution(torch.from_numpy(scores)[None], padded)[0].argmax(0).numpy()
        z, y, x = case.image.shape
        dice = dice_per_label(prediction[:z, :y, :x].astype(np.uint8), case.labels, list(per_label))
        for label, value in dice.items():
            if not math.isnan(value):
                per_label[label].append(value)
    return {label: float(np.mean(v)) if v else math.nan for label, v in per_label.items()}


def fit(
    network: nn.Module,
    num_classes: int,
    cases: list[Case],
    config: TrainingConfig,
    checkpoint_dir: Path,
    teacher: nn.Module | None = None,
    validation: list[Case] | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> History:
    """Train ``network`` in place. With a ``teacher``: supervised Dice+CE on labelled items plus
    ``kd_weight`` · pixel-wise KD on all items; without: Dice+CE only (labelled cases needed)."""
    report = progress or (lambda fraction, stage: None)
    device = select_device(config.device)
    if teacher is None and not any(c.labels is not None for c in cases):
        raise InvalidInputError(
            "No labelled cases to train on.", "Add labels in DIR/labels (same file names as images)."
        )
    network.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=1e-5)
    total_steps = config.epochs * config.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))
    )
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    supervised, distill = SupervisedLoss(), PixelKD(config.kd_temperature)
    history, start_epoch = History(), 0

    checkpoint = checkpoint_dir / "checkpoint.pt"
    if checkpoint.exists():
        if not resume:
            raise InvalidInputError(
                f"An interrupted run left a checkpoint in '{checkpoint_dir}'.",
                "Add --resume to continue it, or delete that folder to start again.",
            )
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = History(**state["history"])
        start_epoch = int(state["epoch"])
        report(start_epoch / config.epochs, f"resumed after epoch {start_epoch}")

    if teacher is not None:
        cache_teacher_outputs(teacher, cases, device, report)
    started = time.monotonic()
    for epoch in range(start_epoch, config.epochs):
        if config.time_budget_s is not None and time.monotonic() - started > config.time_budget_s:
            history.stopped_by_budget = True
            report(epoch / config.epochs, f"time budget reached after epoch {epoch}")
            break
        # Seeding each epoch from (seed, epoch) makes a resumed run identical to an uninterrupted one.
        rng = seed_everything(config.seed * 100_003 + epoch)
        network.train()
        losses = []
        for step in range(config.steps_per_epoch):
            if cancel is not None and cancel():
                raise CancelledError()
            images, labels, labelled, cached = sample_batch(cases, config.batch_size, config.patch_size, rng)
            images, labels = images.to(device), labels.to(device)
            images = _augment(images, rng)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                logits = full_resolution(network(images), images.shape[2:]).float()
                loss = logits.new_zeros(())
                if labelled.any():
                    loss = loss + supervised(logits[labelled], labels[labelled])
                if teacher is not None:
                    if cached is not None:
                        target = cached.to(device)
                    else:
                        with torch.no_grad():
                            target = full_resolution(teacher(images), images.shape[2:]).float()
                    loss = loss + config.kd_weight * distill(logits, target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(float(loss.detach()))
            if math.isnan(history.first_step_loss):
                history.first_step_loss = losses[0]
            done = (epoch * config.steps_per_epoch + step + 1) / total_steps
            report(done, f"epoch {epoch + 1}/{config.epochs} loss {np.mean(losses):.4f}")
        history.epoch_loss.append(float(np.mean(losses)))
        if validation and config.validate_every and (epoch + 1) % config.validate_every == 0:
            dice = evaluate(network, validation, num_classes, device)
            history.validation_dice.append(float(np.nanmean(list(dice.values()))))
        _save_checkpoint(checkpoint, network, optimizer, scheduler, history, epoch + 1)
    network.eval()
    return history


def cache_teacher_outputs(teacher: nn.Module, cases: list[Case], device: torch.device, report: Progress) -> None:
    """Teacher log-probabilities on every whole case, computed once.

    Offline distillation: a training step then costs only the student, several times
    cheaper on a CPU than running the teacher on every patch. Log-probabilities differ
    from logits by a per-voxel constant, which the temperature softmax ignores.
    """
    if output_stride(teacher) != 1:
        return  # coarse teacher outputs would need upsampling per patch; distil on the fly
    teacher.eval()
    for index, case in enumerate(cases):
        if case.teacher is None:
            scores, _, _ = predict_scores(teacher, case.image, device)
            z, y, x = case.image.shape
            case.teacher = np.log(np.clip(scores[:, :z, :y, :x], 1e-6, 1.0)).astype(np.float16)
        report(0.0, f"teacher outputs cached for {index + 1}/{len(cases)} cases")


def recalibrate_batch_norm(network: nn.Module, cases: list[Case], device: torch.device, limit: int = 8) -> None:
    """Re-estimate batch-norm statistics over whole volumes (torch's ``update_bn``).

    Training patches are cropped around structures, so their running statistics differ
    from those of the whole volumes seen at inference; a pass over whole volumes fixes that.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules()):
        return
    volumes = [torch.from_numpy(pad_to_multiple_of_8(case.image))[None, None] for case in cases[:limit]]
    with torch.no_grad():
        torch.optim.swa_utils.update_bn(volumes, network, device)
    network.eval()


def _augment(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random intensity scale, shift and noise per item: cheap robustness to scanner differences."""
    n = images.shape[0]
    scale = torch.from_numpy(rng.uniform(0.9, 1.1, n)).float().to(images.device).view(n, 1, 1, 1, 1)
    shift = torch.from_numpy(rng.uniform(-0.1, 0.1, n)).float().to(images.device).view(n, 1, 1, 1, 1)
    noise = torch.randn_like(images) * float(rng.uniform(0, 0.05))
    return images * scale + shift + noise


def _save_checkpoint(path: Path, network, optimizer, scheduler, history: History, epoch: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".partial")
    torch.save(
        {
            "network": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": asdict(history),
            "epoch": epoch,
        },
        temporary,
    )
    os.replace(temporary, path)


def checkpoint_dir_for(output: Path) -> Path:
    return output.parent / f"{output.name}.checkpoint"


def train_teacher(
    data: str | Path,
    output: str | Path,
    modality: str,
    config: TrainingConfig | None = None,
    architecture: dict | None = None,
    profile: Profile | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    half_precision: bool = False,
) -> Bundle:
    """Train a teacher on a folder of image/label pairs and write it as a new bundle."""
    modality = normalize_modality(modality)
    profile = profile or DEFAULT_PROFILES[modality]
    architecture = architecture or TEACHER_CONFIG
    return _train_bundle(
        data,
        Path(output),
        "teacher",
        architecture,
        profile,
        config or TrainingConfig(),
        None,
        resume,
        progress,
        cancel,
        half_precision,
    )


def distill_student(
    data: str | Path,
    teacher: str | Path | Bundle,
    output: str | Path,
    config: TrainingConfig | None = None,
    architecture: dict | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Bundle:
    """Distil a student from ``teacher``: Dice+CE where labels exist plus T²-scaled pixel-wise KD."""
    teacher_bundle = teacher if isinstance(teacher, Bundle) else resolve_bundle(teacher)
    return _train_bundle(
        data,
        Path(output),
        "student",
        architecture or STUDENT_CONFIG,
        teacher_bundle.profile,
        config or TrainingConfig(),
        teacher_bundle,
        resume,
        progress,
        cancel,
        False,
    )


def _train_bundle(
    data, output: Path, role, architecture, profile, config, teacher_bundle, resume, progress, cancel, half
) -> Bundle:
    if output.exists():
        raise InvalidInputError(
            f"'{output}' already exists; models are never overwritten.", "Choose a new output name."
        )
    report = progress or (lambda fraction, stage: None)
    structures = ABDOMEN_STRUCTURES
    num_classes = len(structures) + 1
    if teacher_bundle is not None and teacher_bundle.num_classes != num_classes:
        raise InvalidInputError(
            f"Teacher '{teacher_bundle.name}' has {teacher_bundle.num_classes} classes, expected {num_classes}."
        )
    cases = load_cases(data, profile, num_classes, lambda f, m: report(0.05 * f, m))
    train_cases, validation = split_cases(cases, config.validation_fraction, config.seed)
    seed_everything(config.seed)
    network = build_network(architecture, num_classes)
    teacher = teacher_bundle.load_network() if teacher_bundle is not None else None
    checkpoint_dir = checkpoint_dir_for(output)
    history = fit(
        network,
        num_classes,
        train_cases,
        config,
        checkpoint_dir,
        teacher,
        validation,
        resume,
        lambda f, m: report(0.05 + 0.9 * f, m),
        cancel,
    )
    device = select_device(config.device)
    report(0.96, "recalibrating batch-norm statistics on whole volumes")
    recalibrate_batch_norm(network, train_cases, device)
    metrics = {"train_loss": history.epoch_loss, "validation_mean_dice": history.validation_dice}
    if validation:
        dice = evaluate(network, validation, num_classes, device)
        metrics["validation_dice"] = {structures[label - 1].name: value for label, value in dice.items()}
    method = {"name": "supervised" if teacher is None else "pixel_kd", "training": asdict(config)}
    if teacher is not None:
        method |= {"kd_temperature": config.kd_temperature, "kd_weight": config.kd_weight}
    report(0.98, "writing the bundle")
    bundle = save_bundle(
        output,
        network.cpu(),
        name=output.name,
        role=role,
        architecture=architecture,
        profile=profile,
        structures=structures,
        method=method,
        teacher=teacher_bundle,
        metrics=metrics,
        description=f"{profile.modality} phantom-abdomen {role} ({method['name']}) trained on {len(train_cases)} cases",
        half_precision=half,
    )
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    report(1.0, "done")
    return bundle
