"""One training loop for teachers and distilled students: seeded, checkpointed every epoch, resumable.

A run keeps its checkpoint in ``<output>.checkpoint/``; the bundle is written only when
the run completes, so a killed or cancelled run never leaves a half-written model.
"""

from __future__ import annotations

import copy
import hashlib
import math
import numbers
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed
from .augment import training_batch
from .bundle import Bundle, load_bundle, resolve_bundle, save_bundle
from .data import Case, load_cases
from .device import select_device
from .distillation import (
    CTKD_SGD,
    DistillContext,
    DistillTerm,
    FeatureTap,
    TermSetup,
    build_terms,
    teacher_sample_weights,
    validate_teacher_weights,
)
from .domain import record
from .errors import CancelledError, InvalidInputError
from .labels import ABDOMEN_STRUCTURES, label_names
from .losses import SupervisedLoss
from .methods import DEFAULT_METHODS, METHODS, format_methods, parse_methods
from .metrics import dice_per_label
from .networks import (
    ASSISTANT_CONFIG,
    STUDENT_CONFIG,
    TEACHER_CONFIG,
    build_network,
    full_resolution,
    input_channels,
    output_stride,
)
from .pipelines import PipelineTeacher
from .prediction import as_batch, predict_labels, scan_statistics, sliding_window_inferer
from .profiles import DEFAULT_PROFILES, Profile
from .runs import CHECKPOINT_FILE, TEACHER_CACHE, checkpoint_dir_for, epoch_message
from .runs import assistant_output as runs_assistant_output
from .volume import check_output_path, normalize_modality
from .windowing import pad_to_multiple_of_8

Progress = Callable[[float, str], None]
# fit's ``teacher``: one network, several, or several with weights.
Teachers = nn.Module | Sequence[nn.Module] | Sequence[tuple[nn.Module, float]] | None


@dataclass
class TrainingConfig:
    epochs: int = 20
    steps_per_epoch: int = 25
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (64, 64, 64)
    learning_rate: float = 2e-3
    seed: int = 0
    kd_temperature: float = 1.0
    kd_weight: float = 1.0
    validation_fraction: float = 0.2
    validate_every: int = 0  # epochs between validation passes (0: only at the end)
    device: str = "auto"
    time_budget_s: float | None = None  # stop cleanly (checkpoint kept) once this much wall time has passed
    # Distillation methods (engine/distillation.py, 'medkd methods'): e.g. "kd", "cwd+coteacher", "kd:1+cwd:0.5".
    methods: str = DEFAULT_METHODS
    cwd_temperature: float = 4.0
    dist_temperature: float = 1.0
    ctkd_epochs: int = 10  # CTKD: epochs over which the gradient-reversal λ rises from 0 to 1
    coteacher_alpha: float = 0.99  # ACT-Net: co-teacher θ_c ← α θ_c + (1−α) θ_s after every step
    coteacher_tau: float = 20.0
    coteacher_noise: float = 0.1  # std of the input noise ξ, ξ′ (images are normalised)
    # λ_kd, relative to the consistency term. Probabilities softened at τ = 20 are close together, so at
    # λ_kd = 1 the teacher's term is ~1e-4 of the loss and the student ignores the teacher; λ_kd = τ² = 400
    # swamps the supervised loss (phantom MR, 600 steps: Dice 0.56); 10 and 40 both gave 0.76.
    coteacher_kd_weight: float = 10.0
    # The consistency weight's ramp-up, exp(−5(1−t)²) with t reaching 1 after this share of the run's steps
    # (the mean-teacher recipe ACT-Net builds on: a young co-teacher is no better than the student).
    coteacher_rampup: float = 0.3
    hint_student_layer: str = ""  # feature terms (hint, at): module names; "" = networks.feature_layer
    hint_teacher_layer: str = ""
    teacher_weights: tuple[float, ...] = ()  # several teachers: their weights (equal when empty)
    teacher_confidence: bool = False  # several teachers: also weight each patch by each teacher's confidence
    # Per-item probability of a rotation and of a scaling, co-transformed with labels and cached teacher
    # outputs (engine/augment.py; nnU-Net uses 0.2). 0 keeps the intensity augmentation alone.
    spatial_augmentation: float = 0.0

    def __post_init__(self) -> None:
        check_run_settings(self)
        for name in ("ctkd_epochs",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise InvalidInputError(f"{name.replace('_', ' ')} is {value!r}.", "Give a whole number of 1 or more.")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise InvalidInputError(f"The validation fraction is {self.validation_fraction}.",
                                    "Give 0 or more, below 1.")
        if not 0.0 <= self.spatial_augmentation <= 1.0:
            raise InvalidInputError(f"The spatial augmentation probability is {self.spatial_augmentation}.",
                                    "Give a probability from 0 to 1 (nnU-Net uses 0.2).")


def check_run_settings(settings) -> None:
    """Refuse settings no training run can use, before anything is built (exit code 2 on the command line):
    the fields every run's settings share (training, distillation, fine-tuning). A method's own settings are
    checked where the method is built."""
    for name in ("epochs", "steps_per_epoch", "batch_size"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise InvalidInputError(f"{name.replace('_', ' ')} is {value!r}.", "Give a whole number of 1 or more.")
    patch = settings.patch_size
    if len(patch) != 3 or any(not isinstance(p, numbers.Integral) or not 8 <= p <= 512 for p in patch):
        raise InvalidInputError(f"The patch size is {patch!r}.", "Give three whole numbers from 8 to 512.")
    if isinstance(settings.seed, bool) or not isinstance(settings.seed, numbers.Integral) or settings.seed < 0:
        raise InvalidInputError(f"The seed is {settings.seed!r}.", "Give a whole number of 0 or more.")
    if not (math.isfinite(settings.learning_rate) and settings.learning_rate > 0):
        raise InvalidInputError(f"The learning rate is {settings.learning_rate!r}.", "Give a finite number above 0.")
    if not (math.isfinite(settings.kd_weight) and settings.kd_weight >= 0):
        raise InvalidInputError(f"The KD weight is {settings.kd_weight!r}.", "Give a finite number of 0 or more.")
    budget = settings.time_budget_s
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise InvalidInputError(f"The time budget is {budget} s.", "Give a number of seconds above 0.")


@dataclass
class History:
    epoch_loss: list[float] = field(default_factory=list)
    validation_dice: list[float] = field(default_factory=list)
    first_step_loss: float = math.nan
    stopped_by_budget: bool = False
    terms: list[dict] = field(default_factory=list)  # each distillation term's record at the end (CTKD's final T)


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
    per_label: dict[int, list[float]] = {label: [] for label in range(1, num_classes)}
    for case in cases:
        dice = dice_per_label(predict_labels(network, case.inputs(input_channels(network)), device), case.labels,
                              list(per_label))
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
    teacher: Teachers = None,
    validation: list[Case] | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> History:
    """Train ``network`` in place: Dice+CE on labelled items plus, for each term of
    ``config.methods``, weight · term on all items (labelled or not).

    ``teacher`` is one network, a list of networks (weighted by ``config.teacher_weights``,
    equal if empty) or a list of (network, weight). With the default ``methods="kd"`` this is
    Dice+CE plus ``kd_weight`` · pixel-wise KD, or Dice+CE only without a teacher.
    """
    report = progress or (lambda fraction, stage: None)
    device = select_device(config.device)
    teachers, weights = _teacher_list(teacher, config)
    if not teachers and not any(c.labels is not None for c in cases):
        raise InvalidInputError(
            "No labelled cases to train on.", "Add labels in DIR/labels (same file names as images)."
        )
    network.to(device).train()
    for model in teachers:
        model.to(device).eval()
    # Terms' learnable parts start from config.seed, whatever the caller did with the global RNG before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        terms = build_terms(config.methods, TermSetup(config, num_classes, network, teachers)).to(device)
    optimisation = Optimisation(network, terms, config)
    total_steps = config.epochs * config.steps_per_epoch
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    supervised = SupervisedLoss()
    methods = format_methods(parse_methods(config.methods), config)
    history, start_epoch = History(), 0

    checkpoint = checkpoint_dir / CHECKPOINT_FILE
    state = resume_from(checkpoint, resume, methods, network, terms, optimisation)
    if state is not None:
        history, start_epoch = History(**state["history"]), int(state["epoch"])
        report(start_epoch / config.epochs, resumed_message(state))

    if teachers and terms:
        cache_teacher_outputs(teachers if len(teachers) > 1 else teachers[0], cases, device, report,
                              checkpoint_dir / TEACHER_CACHE)
    main = distributed.current().main
    student_tap, teacher_taps = feature_taps(network, teachers, terms)
    started = time.monotonic()
    try:
        with data_parallel(network, terms, device) as model:
            for epoch in range(start_epoch, config.epochs):
                rng = epoch_stream(config, epoch, started, history, report)
                if rng is None:
                    break
                network.train()
                terms.train()
                losses = []
                for step in range(config.steps_per_epoch):
                    if cancel is not None and cancel():
                        raise CancelledError()
                    channels, labels, labelled, cached = training_batch(
                        cases, config.batch_size, config.patch_size, rng, device, config.spatial_augmentation)
                    images = channels[:, :input_channels(network)]  # privileged channels are the teachers' alone
                    with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                        logits = full_resolution(model(images), images.shape[2:]).float()
                        loss = logits.new_zeros(())
                        if labelled.any():
                            loss = loss + supervised(logits[labelled], labels[labelled])
                        if terms:
                            context = DistillContext(
                                images,
                                logits,
                                labels,
                                labelled,
                                network,
                                epoch=epoch,
                                step=epoch * config.steps_per_epoch + step,
                                teacher_images=channels,
                            )
                            loss = loss + distillation_loss(
                                terms, context, student_tap, teachers, weights, cached, teacher_taps, config, device
                            )
                    optimisation.step(loss, scaler)
                    for term in terms:
                        term.after_step(network)
                    losses.append(float(loss.detach()))
                    if math.isnan(history.first_step_loss):
                        history.first_step_loss = losses[0]
                    done = (epoch * config.steps_per_epoch + step + 1) / total_steps
                    report(done, epoch_message(epoch + 1, config.epochs, float(np.mean(losses))))
                history.epoch_loss.append(distributed.mean(float(np.mean(losses))))
                if main and validation and config.validate_every and (epoch + 1) % config.validate_every == 0:
                    dice = evaluate(network, validation, num_classes, device)
                    history.validation_dice.append(float(np.nanmean(list(dice.values()))))
                if main:
                    save_checkpoint(checkpoint, network, optimisation, history, epoch + 1, terms=terms.state_dict(),
                                    methods=methods, processes=distributed.current().world_size)
    finally:
        for tap in [student_tap, *teacher_taps]:
            if tap is not None:
                tap.remove()
    history.terms = [term.describe() for term in terms]
    network.eval()
    return history


class Trainee(nn.Module):
    """A network together with its distillation terms' learnt parts (hint adapters, CTKD's temperature): one
    module, so ``DistributedDataParallel`` averages all their gradients. Calling it runs the network."""

    def __init__(self, network: nn.Module, terms: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.terms = terms

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)


@contextmanager
def data_parallel(network: nn.Module, terms: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """What a training step calls to run ``network``: the network itself in one process; across processes,
    ``DistributedDataParallel`` over it and ``terms`` (gradients averaged in backward, rank 0's weights
    broadcast first). On GPUs batch norm is synchronised across processes while training (``SyncBatchNorm``,
    as nnU-Net's DDP does) and made plain again afterwards, for evaluation in the main process alone; on CPUs
    each process keeps its own statistics (``SyncBatchNorm`` runs on GPUs only)."""
    if not distributed.current().parallel:
        yield network
        return
    synchronised = device.type == "cuda"
    if synchronised:
        nn.SyncBatchNorm.convert_sync_batchnorm(network)  # in place below the top module
    try:
        ids = [device.index if device.index is not None else torch.cuda.current_device()] if synchronised else None
        yield nn.parallel.DistributedDataParallel(Trainee(network, terms), device_ids=ids)
    finally:
        if synchronised:
            local_batch_norm(network)


def local_batch_norm(module: nn.Module) -> None:
    """Replace ``SyncBatchNorm`` layers below ``module`` by plain 3-D batch norm with the same state (torch
    converts one way only)."""
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            plain = nn.BatchNorm3d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats).to(next(child.buffers(), torch.empty(0)).device)
            plain.load_state_dict(child.state_dict())
            plain.train(child.training)
            setattr(module, name, plain)
        else:
            local_batch_norm(child)


def epoch_stream(config: TrainingConfig, epoch: int, started: float, history, report: Progress
                 ) -> np.random.Generator | None:
    """The start of an epoch of a training loop: its random stream or, once the time budget is spent (by the main
    process's clock, so that all processes stop after the same epoch), None with the history marked.

    Seeding each epoch from (seed, epoch) makes a resumed run identical to an uninterrupted one; each process
    draws its own patches (random sampling with replacement, so no DistributedSampler)."""
    if distributed.from_main(config.time_budget_s is not None and time.monotonic() - started > config.time_budget_s):
        history.stopped_by_budget = True
        report(epoch / config.epochs, f"time budget reached after epoch {epoch}")
        return None
    return seed_everything(distributed.process_seed(config.seed * 100_003 + epoch))


def feature_taps(
    student: nn.Module, teachers: list[nn.Module], terms: nn.ModuleList
) -> tuple[FeatureTap | None, list[FeatureTap]]:
    """Forward hooks on the layers the feature terms read: one tap on the student (None if no term reads
    it) and one per teacher (none without feature terms; the teachers then also run on the fly).
    The caller removes them."""
    student_layers = sorted({layer for term in terms for layer in term.student_layers})
    student_tap = FeatureTap(student, student_layers) if student_layers else None
    if not any(term.needs_features for term in terms):
        return student_tap, []
    return student_tap, [
        FeatureTap(model, sorted({t.teacher_layers[k] for t in terms if t.needs_features}))
        for k, model in enumerate(teachers)
    ]


def _teacher_list(teacher: Teachers, config: TrainingConfig) -> tuple[list[nn.Module], list[float]]:
    """fit's ``teacher`` argument as (networks, normalised weights)."""
    if teacher is None:
        return [], []
    if isinstance(teacher, nn.Module):
        return [teacher], [1.0]
    items = list(teacher)
    if not items:
        return [], []
    if all(isinstance(item, tuple) for item in items):
        networks, given = [item[0] for item in items], [item[1] for item in items]
    else:
        networks, given = items, list(config.teacher_weights)
    return networks, validate_teacher_weights(given, len(networks))


def distillation_loss(
    terms: nn.ModuleList,
    context: DistillContext,
    student_tap: FeatureTap | None,
    teachers: list[nn.Module],
    weights: list[float],
    cached: torch.Tensor | None,
    teacher_taps: list[FeatureTap],
    config: TrainingConfig,
    device: torch.device,
) -> torch.Tensor:
    """Σ weight · term for one step's ``context``, after filling in the student's tapped features and the
    teachers' outputs (none without teachers): the step shared by ``fit`` and the CT+MR loop."""
    context.student_features = dict(student_tap.features) if student_tap else {}
    if teachers:
        _teacher_outputs(context, teachers, weights, cached, teacher_taps, config, device)
    return sum(term.weight * term(context) for term in terms)


def _teacher_outputs(
    context: DistillContext,
    teachers: list[nn.Module],
    weights: list[float],
    cached: torch.Tensor | None,
    taps: list[FeatureTap],
    config: TrainingConfig,
    device: torch.device,
) -> None:
    """Fill the teachers' outputs into ``context``: logits from the offline cache when there is one
    (K teachers stacked along channels), else from running the teachers; features from the taps."""
    size = context.images.shape[2:]
    given = context.teacher_images if context.teacher_images is not None else context.images
    if cached is None or taps:
        with torch.no_grad():
            online = [full_resolution(model(given[:, :input_channels(model)]), size).float() for model in teachers]
        context.teacher_features = [dict(tap.features) for tap in taps]
    context.teacher_logits = list(cached.to(device).chunk(len(teachers), dim=1)) if cached is not None else online
    if len(teachers) > 1:
        context.teacher_weights = teacher_sample_weights(context.teacher_logits, weights, config.teacher_confidence)


PADDING_PROBE = 32  # edge of the constant block on which a teacher's output beyond the volume's edge is taken


def cache_teacher_outputs(
    teacher: nn.Module | Sequence[nn.Module],
    cases: list[Case],
    device: torch.device,
    report: Progress,
    folder: Path | None = None,
) -> None:
    """Teacher logits on every whole case, computed once into ``Case.teacher`` (float16); several teachers are
    stacked along the channel axis.

    Offline distillation: a training step then costs only the student, several times cheaper on a CPU than
    running the teacher on every patch. Logits, not clipped log-probabilities: softened at T = 4, a target
    rebuilt from log(max(p, 1e-6)) was 0.042 total-variation away from the teacher's own, with a third of the
    classes tied at the clip. (A published teacher's pipeline gives probabilities; their log is its logits.)
    Each case remembers which teachers filled it, so cases reused with another teacher are recomputed.

    Under torchrun each process runs the teachers on its share of the cases and the processes exchange the
    outputs. With a ``folder`` (the run's ``runs.TEACHER_CACHE``) every output is also kept there, keyed by
    teachers and image, so a run killed while caching resumes with the cases already done.
    """
    teachers = [teacher] if isinstance(teacher, nn.Module) else list(teacher)
    if any(output_stride(model) != 1 for model in teachers):
        return  # coarse teacher outputs would need upsampling per patch; distil on the fly
    key = ("logits", *(_fingerprint(model) for model in teachers))
    for model in teachers:
        model.eval()
    missing = [case for case in cases if case.teacher is None or case.teacher_source != key]
    fills: dict[tuple[int, tuple], np.ndarray] = {}  # (teacher, padding values) -> its output there (C,)
    processes = distributed.current()
    for start in range(0, len(missing), processes.world_size):  # one case per process per round
        share = missing[start:start + processes.world_size]
        own = share[processes.rank] if processes.rank < len(share) else None
        computed = _stored_outputs(teachers, own, key, device, fills, folder) if own is not None else None
        for case, (outputs, fill) in zip(share, distributed.gather(computed)):
            case.teacher, case.teacher_fill, case.teacher_source = outputs, fill, key
        report(0.0, f"teacher outputs cached for {start + len(share)}/{len(missing)} cases")


def _stored_outputs(
    teachers: list[nn.Module], case: Case, key: tuple, device: torch.device, fills: dict, folder: Path | None
) -> tuple[np.ndarray, np.ndarray]:
    """The teachers' (logits, padding logits) on ``case``, as float16: read back from ``folder`` when an
    earlier run stored them there, else computed (and stored)."""
    path = None
    if folder is not None:
        digest = hashlib.sha1(repr(key).encode())
        for array in (case.image, *(() if case.privileged is None else case.privileged)):
            digest.update(np.ascontiguousarray(array).tobytes())
        path = Path(folder) / f"{digest.hexdigest()}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as stored:
                return stored["logits"], stored["fill"]
    z, y, x = case.image.shape
    outputs = [_case_output(model, case, device)[:, :z, :y, :x] for model in teachers]
    fill = []
    for k, model in enumerate(teachers):
        # Patches are padded channel by channel with each channel's minimum (``sample_batch``).
        inputs = case.inputs(input_channels(model)).reshape(-1, *case.image.shape)
        pad = tuple(float(channel.min()) for channel in inputs)
        if (k, pad) not in fills:  # cases normalised alike share their padding values: probe once
            fills[(k, pad)] = (model.padding_output() if isinstance(model, PipelineTeacher)
                               else _padding_output(model, pad, device))
        fill.append(fills[(k, pad)])
    logits, fill = np.concatenate(outputs).astype(np.float16), np.concatenate(fill).astype(np.float16)
    if path is not None:  # atomically: a kill never leaves half a file to read back
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
        np.savez(partial, logits=logits, fill=fill)
        os.replace(partial, path)
    return logits, fill


def _case_output(model: nn.Module, case: Case, device: torch.device) -> np.ndarray:
    """A teacher's logits on a whole case: a published teacher through its own pipeline, else on the image and
    the privileged channels it takes."""
    if isinstance(model, PipelineTeacher):
        return model.outputs_on(case, device)
    return _predict_logits(model, case.inputs(input_channels(model)), device)


def _padding_output(model: nn.Module, values: tuple[float, ...], device: torch.device) -> np.ndarray:
    """The teacher's logits (C,) for patch voxels beyond the volume's edge, where sample_batch pads each input
    channel with its value in ``values``: its output at the centre of a constant block of those values."""
    blank = np.stack([np.full((PADDING_PROBE,) * 3, value, dtype=np.float32) for value in values])
    centre = PADDING_PROBE // 2
    return _predict_logits(model, blank if len(values) > 1 else blank[0], device)[:, centre, centre, centre]


def _fingerprint(network: nn.Module) -> str:
    """A digest of a network's weights: which teacher filled a cache."""
    digest = hashlib.sha1()
    for name, value in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _predict_logits(network: nn.Module, image: np.ndarray, device: torch.device) -> np.ndarray:
    """Logits (C, z, y, x) of the padded whole image, stitched like inference's sliding window
    (prediction.predict_scores returns softmax scores, whose logits cannot be recovered)."""
    padded = pad_to_multiple_of_8(image)
    inferer = sliding_window_inferer(padded.shape[-3:], device, torch.device("cpu"))

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            return network(batch).float()

    with torch.inference_mode():
        return inferer(as_batch(padded), predictor)[0].float().cpu().numpy()


def recalibrate_batch_norm(network: nn.Module, cases: list[Case], device: torch.device, limit: int = 8) -> None:
    """Re-estimate batch-norm statistics over whole volumes (torch's ``update_bn``).

    Training patches are cropped around structures, so their running statistics differ
    from those of the whole volumes seen at inference; a pass over whole volumes fixes that.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules()):
        return
    channels = input_channels(network)
    volumes = [as_batch(pad_to_multiple_of_8(case.inputs(channels))) for case in cases[:limit]]
    with torch.no_grad():
        torch.optim.swa_utils.update_bn(volumes, network, device)
    network.eval()


def recalibrate_if_better(
    network: nn.Module, recalibrate: Callable[[], None], validation_dice: Callable[[], float] | None
) -> dict:
    """Run ``recalibrate`` (batch-norm statistics re-estimated over whole volumes) and keep its statistics only if
    the mean validation Dice rises: over whole volumes they lowered test Dice by 0.5-1.2 points on every student
    checked (scratch and KD, two seeds). Without validation cases (``validation_dice`` None) the training
    statistics stay. Returns the record of the decision, for the bundle's metrics."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules()):
        return {"kept": False, "why": "no batch norm"}
    if validation_dice is None:
        return {"kept": False, "why": "no validation cases to check it on"}
    saved = copy.deepcopy(network.state_dict())
    before = validation_dice()
    recalibrate()
    after = validation_dice()
    kept = bool(after > before)
    if not kept:
        network.load_state_dict(saved)
    network.eval()
    return {"kept": kept, "validation_mean_dice_before": before, "validation_mean_dice_after": after}


def mean_dice(dice: dict[int, float]) -> float:
    values = [v for v in dice.values() if not math.isnan(v)]
    return float(np.mean(values)) if values else 0.0


def cosine_schedule(optimizer: torch.optim.Optimizer, config: TrainingConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """A cosine decay of the learning rate over the run's steps."""
    total_steps = config.epochs * config.steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))


class Optimisation:
    """A run's optimisers, stepped, scheduled and saved together: AdamW with a cosine decay for the student and
    its terms' own parts (hint adapters, without weight decay), and SGD for temperatures (CTKD's θ), as CTKD's
    official code steps it: AdamW's normalised step would cancel the curriculum's λ scaling of the reversed
    gradient."""

    def __init__(self, network: nn.Module, terms: nn.Module, config: TrainingConfig) -> None:
        temperatures = [p for term in terms.modules() if isinstance(term, DistillTerm)
                        for p in term.temperature_parameters()]
        chosen = {id(p) for p in temperatures}
        extra = [p for p in terms.parameters() if p.requires_grad and id(p) not in chosen]
        groups = [{"params": list(network.parameters())}, *([{"params": extra, "weight_decay": 0.0}] if extra else [])]
        self.optimizers = [torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=1e-5)]
        if temperatures:
            self.optimizers.append(torch.optim.SGD(temperatures, lr=config.learning_rate, **CTKD_SGD))
        self.schedulers = [cosine_schedule(optimizer, config) for optimizer in self.optimizers]

    def step(self, loss: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
        """One step through the gradient scaler (a no-op unless mixed precision is on), then the schedules."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        for optimizer in self.optimizers:
            scaler.step(optimizer)
        scaler.update()
        for scheduler in self.schedulers:
            scheduler.step()

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)


def resume_from(
    checkpoint: Path, resume: bool, methods: str, network: nn.Module, terms: nn.Module, optimisation: Optimisation
) -> dict | None:
    """An interrupted run's checkpoint restored into these objects (its ``history`` and ``epoch`` are for the
    caller), or None when there is none. Refused when it was made with other methods."""
    state = read_checkpoint(checkpoint, resume)
    if state is None:
        return None
    if state.get("methods", methods) != methods:
        raise InvalidInputError(
            f"The checkpoint in '{checkpoint.parent}' was made with methods '{state['methods']}', not '{methods}'.",
            "Resume with the same --method, or delete that folder to start again.",
        )
    if "optimisation" not in state:
        raise InvalidInputError(f"The checkpoint in '{checkpoint.parent}' was made by an older MedKDSegment.",
                                "Delete that folder to start the run again.")
    network.load_state_dict(state["network"])
    terms.load_state_dict(state.get("terms", {}))
    optimisation.load_state_dict(state["optimisation"])
    return state


def resumed_message(state: dict) -> str:
    """What resuming from checkpoint ``state`` says, including a change in the number of processes."""
    before, now = int(state.get("processes", 1)), distributed.current().world_size
    change = (f" (it ran in {before} processes, now {now}: the effective batch changes with them)"
              if before != now else "")
    return f"resumed after epoch {int(state['epoch'])}{change}"


def read_checkpoint(path: Path, resume: bool) -> dict | None:
    """An interrupted run's checkpoint, or None; refused unless ``resume`` (a run never silently restarts)."""
    if not path.exists():
        return None
    if not resume:
        raise InvalidInputError(
            f"An interrupted run left a checkpoint in '{path.parent}'.",
            "Add --resume to continue it, or delete that folder to start again.",
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def save_checkpoint(path: Path, network, optimisation: Optimisation, history, epoch: int, **extra) -> None:
    """Atomically (a temporary file, then a rename): a kill never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".partial")
    state = {
        "network": network.state_dict(),
        "optimisation": optimisation.state_dict(),
        "history": asdict(history),
        "epoch": epoch,
        **extra,
    }
    torch.save(state, temporary)
    os.replace(temporary, path)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def exclusive_output(output: Path) -> Iterator[None]:
    """One run at a time writes the model ``output``: a lock in its checkpoint folder (where an interrupted
    run's state lives) refuses a second run while the first lives (a lock whose process has died is taken
    over), and the staging folders of bundle writes that crashed (``.partial-NAME-*``, which nothing else
    can own while the lock is held) are removed."""
    output = Path(output)
    check_output_path(output)
    folder = checkpoint_dir_for(output)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "run.lock"
    while True:
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                owner = int(lock.read_text(encoding="utf-8").strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and _running(owner):
                raise InvalidInputError(f"Another run (process {owner}) is writing '{output}'.",
                                        "Wait for it to finish, or choose another output name.") from None
            lock.unlink(missing_ok=True)
    os.write(handle, str(os.getpid()).encode())
    os.close(handle)
    try:
        for leftover in output.parent.glob(f".partial-{output.name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        yield
    finally:
        lock.unlink(missing_ok=True)
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # a run refused before training leaves nothing behind


def train_teacher(
    data: str | Path | list[Case],
    output: str | Path,
    modality: str,
    config: TrainingConfig | None = None,
    architecture: dict | None = None,
    profile: Profile | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    half_precision: bool = False,
    privileged: Mapping[str, str | Path] | None = None,
) -> Bundle:
    """Train a teacher on a folder of image/label pairs and write it as a new bundle.

    ``privileged`` (KD-Net, Hu et al. 2020) maps other modalities of the same subjects to their folders
    (``images/`` with the same file names, on the images' grids): the teacher then takes them as extra input
    channels after the image, and distils into a student that sees the image alone."""
    modality = normalize_modality(modality)
    profile = profile or DEFAULT_PROFILES[modality]
    inputs = [PrivilegedInput(normalize_modality(m), DEFAULT_PROFILES[normalize_modality(m)], Path(folder))
              for m, folder in (privileged or {}).items()]
    architecture = with_input_channels(architecture or TEACHER_CONFIG, 1 + len(inputs))
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
        privileged=inputs,
    )


@dataclass(frozen=True)
class PrivilegedInput:
    """A teacher-only input channel (KD-Net): its modality, how it is prepared, and where its scans are."""

    modality: str
    profile: Profile
    folder: Path | None = None

    def record(self) -> dict:
        return {"modality": self.modality, "preprocessing": self.profile.to_dict()}


def with_input_channels(architecture: dict, channels: int) -> dict:
    """``architecture`` taking ``channels`` input channels (the image, then privileged ones)."""
    return {**architecture, "kwargs": {**architecture.get("kwargs", {}), "in_channels": channels}}


def privileged_inputs(bundles: Sequence[Bundle], folders: Mapping[str, str | Path] | None) -> list[PrivilegedInput]:
    """The privileged inputs the teachers take, in channel order, with the user's folder for each: every
    teacher's recorded list must begin the longest one (each takes the first channels it needs)."""
    recorded = [bundle.info.get("privileged") or [] for bundle in bundles]
    longest = max(recorded, key=len, default=[])
    for bundle, own in zip(bundles, recorded):
        if own != longest[: len(own)]:
            raise InvalidInputError(f"Teacher '{bundle.name}' takes other privileged inputs than the other teachers.",
                                    "Distil from teachers trained with the same privileged scans.")
    folders = {normalize_modality(m): Path(f) for m, f in (folders or {}).items()}
    wanted = [normalize_modality(entry["modality"]) for entry in longest]
    if set(folders) != set(wanted):
        raise InvalidInputError(
            f"The teachers take privileged {', '.join(wanted) or 'inputs: none'}; given: "
            f"{', '.join(folders) or 'none'}.",
            "Give --privileged MODALITY=FOLDER once for each modality the teachers were trained with."
            if wanted else "Leave out --privileged: no teacher takes privileged scans.")
    return [PrivilegedInput(m, Profile.from_dict(entry["preprocessing"]), folders[m])
            for m, entry in zip(wanted, longest)]


TeacherRef = str | Path | Bundle


def distill_student(
    data: str | Path | list[Case],
    teacher: TeacherRef | Sequence[TeacherRef],
    output: str | Path,
    config: TrainingConfig | None = None,
    architecture: dict | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    weights: Sequence[float] | None = None,
    role: str = "student",
    half_precision: bool = False,
    profile: Profile | None = None,
    privileged: Mapping[str, str | Path] | None = None,
) -> Bundle:
    """Distil a student (``role="assistant"``: a teacher assistant) from one or several teachers
    with ``config.methods``: Dice+CE where labels exist plus each method's term on all items.

    The student learns the teachers' label table and prepares its input with ``profile`` (default:
    the first teacher's ``student_profile``). A published teacher with its own pipeline (HD-BET) runs
    once per whole volume of a folder; its outputs are resampled onto the student's grid and cached.

    ``data`` is a folder (images/, labels/) or a list of ``Case`` already on the teachers' model
    grid (a script's in-memory data; their cached teacher outputs are filled in place and reused
    while the teachers are the same). Several teachers are mixed with ``weights`` (default
    ``config.teacher_weights``, else equal); all must share the model grid and label table.
    A teacher trained with privileged inputs (KD-Net) needs their folders in ``privileged`` (modality -> folder);
    the student sees the image alone.
    """
    config = config or TrainingConfig()
    if weights is not None:
        config = replace(config, teacher_weights=tuple(float(w) for w in weights))
    bundles = _resolve_teachers(teacher)
    validate_teacher_weights(config.teacher_weights, len(bundles))
    inputs = privileged_inputs(bundles, privileged)
    return _train_bundle(
        data,
        Path(output),
        role,
        architecture or STUDENT_CONFIG,
        profile or bundles[0].student_profile,
        config,
        bundles,
        resume,
        progress,
        cancel,
        half_precision,
        privileged=inputs,
    )


def distill_chain(
    data: str | Path | list[Case],
    teacher: TeacherRef | Sequence[TeacherRef],
    output: str | Path,
    config: TrainingConfig | None = None,
    architecture: dict | None = None,
    assistant_architecture: dict | None = None,
    assistant_config: TrainingConfig | None = None,
    assistant_output: str | Path | None = None,
    weights: Sequence[float] | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Bundle:
    """Teacher(s) → assistant → student (Mirzadeh et al.): a mid-size assistant (role "assistant",
    ``ASSISTANT_CONFIG`` by default) is distilled from the teacher(s) and written to
    ``assistant_output`` (default ``<output>-assistant``), then the student from the assistant.
    The student's bundle names the assistant as its teacher and records the whole chain.
    With ``resume``, an assistant bundle already written by an interrupted chain is reused.
    Returns the student bundle.
    """
    output = Path(output)
    assistant_output = Path(assistant_output) if assistant_output else runs_assistant_output(output)
    if output.exists():
        raise InvalidInputError(
            f"'{output}' already exists; models are never overwritten.", "Choose a new output name."
        )
    config = config or TrainingConfig()
    if weights is not None:
        config = replace(config, teacher_weights=tuple(float(w) for w in weights))
    report = progress or (lambda fraction, stage: None)
    bundles = _resolve_teachers(teacher)
    validate_teacher_weights(config.teacher_weights, len(bundles))
    if not isinstance(data, (list, tuple)):  # read once, for both stages
        data = load_cases(data, bundles[0].student_profile, bundles[0].labels, lambda f, m: report(0.02 * f, m))
    if assistant_output.exists():
        if not resume:
            raise InvalidInputError(
                f"'{assistant_output}' already exists.",
                "Add --resume to use it as the assistant, or choose another output.",
            )
        assistant = load_bundle(assistant_output)
        if assistant.role != "assistant":
            raise InvalidInputError(
                f"'{assistant_output}' is a {assistant.role}, not an assistant.", "Choose another output."
            )
    else:
        assistant = _train_bundle(
            data,
            assistant_output,
            "assistant",
            assistant_architecture or ASSISTANT_CONFIG,
            bundles[0].student_profile,
            assistant_config or config,
            bundles,
            resume,
            lambda f, m: report(0.02 + 0.48 * f, f"assistant: {m}"),
            cancel,
            False,
        )
    chain = {"chain": [*(_bundle_reference(b) for b in bundles), _bundle_reference(assistant)]}
    student_config = replace(config, teacher_weights=())
    return _train_bundle(
        data,
        output,
        "student",
        architecture or STUDENT_CONFIG,
        assistant.profile,
        student_config,
        [assistant],
        resume,
        lambda f, m: report(0.5 + 0.5 * f, f"student: {m}"),
        cancel,
        False,
        chain,
    )


def _resolve_teachers(teacher: TeacherRef | Sequence[TeacherRef]) -> list[Bundle]:
    items = [teacher] if isinstance(teacher, (str, Path, Bundle)) else list(teacher)
    if not items:
        raise InvalidInputError("No teacher was given.", "Give at least one teacher bundle (--teacher).")
    bundles = [item if isinstance(item, Bundle) else resolve_bundle(item) for item in items]
    for bundle in bundles[1:]:
        if bundle.student_profile.to_dict() != bundles[0].student_profile.to_dict():
            raise InvalidInputError(
                f"Teachers '{bundles[0].name}' and '{bundle.name}' use different preprocessing (model grid, "
                "modality or intensity profile).",
                "Mix only teachers made for the same modality and model grid.",
            )
    return bundles


def _bundle_reference(bundle: Bundle) -> dict:
    return {"name": bundle.name, "version": bundle.metadata.get("version"), "weights_sha256": bundle.weights_sha256}


def _train_bundle(data, output: Path, *args, **kwargs) -> Bundle:
    """``_train_unlocked`` while holding ``output`` (``exclusive_output``; under torchrun the main process holds
    it for all)."""
    if not distributed.current().main:
        return _train_unlocked(data, output, *args, **kwargs)
    with exclusive_output(output):
        return _train_unlocked(data, output, *args, **kwargs)


def _train_unlocked(
    data,
    output: Path,
    role,
    architecture,
    profile,
    config,
    teacher_bundle,
    resume,
    progress,
    cancel,
    half,
    extra_method: dict | None = None,
    privileged: list[PrivilegedInput] = (),
) -> Bundle:
    if output.exists():
        raise InvalidInputError(
            f"'{output}' already exists; models are never overwritten.", "Choose a new output name."
        )
    report = progress or (lambda fraction, stage: None)
    if teacher_bundle is None:
        teacher_bundles = []
    elif isinstance(teacher_bundle, Bundle):
        teacher_bundles = [teacher_bundle]
    else:
        teacher_bundles = list(teacher_bundle)
    # A student learns its (first) teacher's label table; phantom abdomen when trained from labels alone.
    structures = teacher_bundles[0].structures if teacher_bundles else ABDOMEN_STRUCTURES
    num_classes = len(structures) + 1
    for bundle in teacher_bundles:
        if bundle.labels != teacher_bundles[0].labels:
            raise InvalidInputError(
                f"Teacher '{bundle.name}' labels {list(bundle.labels.values())}, but "
                f"'{teacher_bundles[0].name}' labels {list(teacher_bundles[0].labels.values())}.",
                "Mix only teachers with the same label table.",
            )
    specs = parse_methods(config.methods)  # a typo fails now, before any data is read
    published = [b for b in teacher_bundles if b.pipeline is not None]
    featureless = [b for b in teacher_bundles if not b.reads_features]
    if featureless and any(METHODS[spec.name].needs_features for spec in specs):
        why = ("runs through its own pipeline on whole volumes, so it has no features on the student's input"
               if featureless[0].pipeline is not None else "is a TorchScript model, whose inner layers cannot be read")
        raise InvalidInputError(f"Teacher '{featureless[0].name}' {why} for hint or at.",
                                "Use output-based methods with it: kd, ctkd, dist or cwd.")
    if published and isinstance(data, (list, tuple)) and any(c.source is None for c in data):
        raise InvalidInputError(
            f"Teacher '{published[0].name}' needs each training volume's file.",
            "Give a data folder (images/, labels optional).",
        )
    if isinstance(data, (list, tuple)):
        cases = list(data)
        if not cases:
            raise InvalidInputError("No training cases were given.", "Give a folder with images/ or a list of cases.")
    else:
        cases = load_cases(data, profile, label_names(structures), lambda f, m: report(0.05 * f, m),
                           [(p.folder, p.profile) for p in privileged])
    train_cases, validation = split_cases(cases, config.validation_fraction, config.seed)
    seed_everything(config.seed)
    network = build_network(architecture, num_classes)
    teachers = [
        PipelineTeacher(bundle, bundle.load_network()) if bundle.pipeline else bundle.load_network()
        for bundle in teacher_bundles
    ]
    weights = validate_teacher_weights(config.teacher_weights, len(teachers)) if teachers else []
    teacher = teachers[0] if len(teachers) == 1 else list(zip(teachers, weights)) or None
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

    def write_bundle() -> Bundle:  # in the main process; the others read the bundle back (written_by_main)
        device = select_device(config.device)
        report(0.96, "recalibrating batch-norm statistics on whole volumes, if that helps on validation")
        recalibration = recalibrate_if_better(
            network, lambda: recalibrate_batch_norm(network, train_cases, device),
            (lambda: mean_dice(evaluate(network, validation, num_classes, device))) if validation else None)
        metrics = {"train_loss": history.epoch_loss, "validation_mean_dice": history.validation_dice,
                   "batch_norm_recalibration": recalibration}
        if validation:
            dice = evaluate(network, validation, num_classes, device)
            metrics["validation_dice"] = {structures[label - 1].name: value for label, value in dice.items()}
        method = _method_record(config, specs, history, teacher_bundles, weights) | (extra_method or {})
        report(0.97, "recording the model's domain")
        inherited = _inherited_from(teacher_bundles)
        if role == "teacher" and privileged:  # the channels it takes after the image, for its students
            inherited["extra"] = {**inherited.get("extra", {}), "privileged": [p.record() for p in privileged]}
        kind = inherited.get("task") or f"{profile.modality} phantom abdomen"
        domain = domain_record(network, cases, f"{len(cases)} {profile.modality} volumes: {kind}", device)
        inherited["extra"] = {**inherited.get("extra", {}), "domain": domain}
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
            teacher=teacher_bundles[0] if teacher_bundles else None,
            metrics=metrics,
            description=f"{profile.modality} {role} ({method['name']}) trained on {len(train_cases)} cases"
            + (f" from {teacher_bundles[0].name}" if teacher_bundles else ""),
            half_precision=half,
            **inherited,
        )
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        report(1.0, "done")
        return bundle

    return distributed.written_by_main(write_bundle, lambda: load_bundle(output))


def domain_record(network: nn.Module, cases: list[Case], volumes: str, device: torch.device) -> dict:
    """``domain.record`` over ``cases`` (the model's own volumes, training and validation)."""
    statistics, entropies = [], []
    network.to(device)
    for case in cases:
        features, entropy = scan_statistics(network, pad_to_multiple_of_8(case.inputs(input_channels(network))),
                                            case.image.shape)
        statistics.append(features)
        entropies.append(entropy)
    return record(statistics, entropies, volumes)


def _inherited_from(teachers: list[Bundle]) -> dict:
    """What a student of published teachers carries from them: task, licences, citations, research use."""
    published = [b for b in teachers if b.info.get("citation")]
    if not teachers or not published:
        return {}
    return {
        "task": teachers[0].metadata.get("task"),
        "extra": {
            "licence": " + ".join(dict.fromkeys(b.info.get("licence", "unknown") for b in published)),
            "citation": " | ".join(dict.fromkeys(b.info["citation"] for b in published)),
            "intended_use": "research use only",
        },
        "references": list(dict.fromkeys(b.info["citation"] for b in published)),
    }


def _method_record(
    config: TrainingConfig, specs, history: History, teachers: list[Bundle], weights: list[float]
) -> dict:
    """The bundle's method section: the method string, each term's record (weights, temperatures,
    CTKD's final T, layers), and the teachers with their weights."""
    canonical = format_methods(specs, config)
    if not specs:  # "none": no distillation term, whatever teachers were given
        return {"name": "supervised", "training": asdict(config)}
    if not teachers:
        name = f"supervised+{canonical}" if history.terms else "supervised"
        return {"name": name, "training": asdict(config)} | ({"methods": history.terms} if history.terms else {})
    # One teacher and plain KD keeps the name the bundled students were made with.
    plain = len(teachers) == 1 and [spec.name for spec in specs] == ["kd"]
    method = {"name": "pixel_kd" if plain else canonical, "training": asdict(config)}
    kd = next((term for term in history.terms if term["name"] == "kd"), None)
    if kd is not None:
        method |= {"kd_temperature": kd["temperature"], "kd_weight": kd["weight"]}
    method["methods"] = history.terms
    method["teachers"] = [_bundle_reference(b) | {"weight": w} for b, w in zip(teachers, weights)]
    return method
