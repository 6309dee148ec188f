"""Fine-tuning a model from a user's annotations: a new model version with a parent link.

A fine-tuning run takes a parent bundle (usually a distilled student) and one or more
annotated cases, and writes a *new* bundle; the parent is never touched.

- **Names**: segment names are matched to the model's label names ignoring case, spaces,
  underscores and hyphens; an explicit mapping wins (``match_segment_names``).
- **Partial labels**: a case lists the structures the user annotated. The training target
  of a voxel is (``merged_targets``)

  1. the user's label where the user painted an annotated structure;
  2. otherwise the parent's (or teacher's) prediction there, if that prediction is a structure
     the user did *not* annotate, so unannotated structures are learned from the parent
     instead of being taught as background;
  3. otherwise background (an annotated structure is taken to be complete: where the user
     did not paint it, it is absent).

- **Loss**: Dice + cross-entropy on those targets plus ``kd_weight`` · T² · KL(parent ‖ new)
  per voxel (``training.fit`` with the frozen parent, or a teacher, as its teacher), so
  fine-tuning on one case does not wipe out what the model knew.
- **Held-out check**: per-structure Dice of parent and new version on annotated data that
  was not trained on (given validation cases; else one of several annotated cases; else a
  slab along z of the only case, cut from its training copy).
- **Safety**: checkpoints every epoch in ``<output>.checkpoint/`` (``resume=True`` continues
  a killed run); the bundle is written atomically only at the end, so cancel or a crash
  leaves no model and no ``.partial-*`` folder.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from . import distributed
from .bundle import BUNDLED_MODELS, Bundle, load_bundle, resolve_bundle, save_bundle
from .data import Case
from .device import select_device
from .errors import BundleError, CancelledError, InvalidInputError
from .labels import Structure
from .metrics import dice_per_label
from .prediction import predict_labels
from .profiles import labels_to_model_grid, to_model_grid
from .runs import CHECKPOINT_FILE, FINETUNE_RUN_FILE, checkpoint_dir_for, read_record, write_record
from .segment_names import (  # noqa: F401
    SegmentMatch,
    label_value,
    labels_by_segment_name,
    match_segment_names,
    normalize_name,
    parse_mapping,
)
from .training import History, TrainingConfig, check_run_settings, fit, recalibrate_batch_norm
from .volume import Volume, check_image, check_labels_match

Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]
WORSE_MARGIN = 0.01  # a structure is "worse" when its held-out Dice drops by more than this
PARTIAL_LABEL_RULE = (
    "user label where an annotated structure is painted; else the parent's prediction if it is "
    "an unannotated structure; else background"
)


# --------------------------------------------------------------------------------------------
# Annotated cases
# --------------------------------------------------------------------------------------------


@dataclass
class AnnotatedCase:
    name: str
    image: Volume
    labels: Volume  # model label values; 0 = nothing annotated there
    annotated: frozenset[int]  # label values the user annotated; the others come from the parent


def annotated_case(
    name: str,
    image: Volume,
    labelmap: Volume,
    model_labels: dict[int, str],
    segment_names: dict[int, str] | None = None,
    mapping: dict[str, int | str | None] | None = None,
    annotated: Iterable[int | str] | None = None,
) -> AnnotatedCase:
    """An ``AnnotatedCase`` from a user's labelmap.

    With ``segment_names`` (labelmap value -> segment name, as in a Slicer segmentation) the
    values are translated to the model's by name (``match_segment_names``; unknown names are an
    error, skipped segments count as not painted). Without, the values must be the model's.
    ``annotated`` (label values or names) defaults to the structures that have voxels.
    A labelmap on another grid than the image (a cropped Slicer segmentation) is resampled onto it.
    """
    check_image(image, f"the image of case '{name}'")
    labelmap = _on_image_grid(image, labelmap, name)
    values = np.unique(labelmap.array)
    if not np.all(values == np.round(values)) or values.min() < 0:
        raise InvalidInputError(
            f"The labels of case '{name}' hold values that are not label numbers ({values[:8].tolist()}).",
            "Give a label map (whole numbers, 0 = background) or a segmentation.",
        )
    source = labelmap.array.astype(np.int64)
    target = np.zeros(source.shape, np.uint8)
    if segment_names is not None:
        target = labels_by_segment_name(source, segment_names, model_labels, mapping, f"The labels of case '{name}'")
    else:
        unknown = sorted(set(values.astype(int).tolist()) - set(model_labels) - {0})
        if unknown:
            known = ", ".join(f"{v} ({n})" for v, n in sorted(model_labels.items()))
            raise InvalidInputError(
                f"The labels of case '{name}' hold values {unknown[:8]} that the model does not have.",
                f"Relabel them to the model's values ({known}) or use a segmentation with segment names.",
            )
        target = source.astype(np.uint8)
    painted = {int(v) for v in np.unique(target) if v != 0}
    if annotated is None:
        chosen = painted
    else:
        chosen = {label_value(a, model_labels, "Annotated structure") for a in annotated}
        # Paint of structures not listed as annotated is ignored: those come from the parent.
        target[~np.isin(target, sorted(chosen))] = 0
    if not chosen:
        raise InvalidInputError(
            f"Case '{name}' has no annotated structure.",
            "Paint at least one structure (or list the annotated ones explicitly).",
        )
    return AnnotatedCase(name, image, labelmap.with_array(target), frozenset(chosen))


# Nearest-neighbour resampling onto another voxel size changes a painted volume by a few per cent at most.
LABELS_OUTSIDE_TOLERANCE = 0.1


def _on_image_grid(image: Volume, labelmap: Volume, name: str) -> Volume:
    if image.same_grid(labelmap):
        return labelmap
    try:
        return check_labels_match(image, labelmap, f"the labels of case '{name}'")
    except InvalidInputError:
        pass
    # Slicer crops segmentations to their extent: resample by physical position, nearest neighbour.
    resampled = sitk.Resample(
        labelmap.to_sitk(), image.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16
    )
    array = sitk.GetArrayFromImage(resampled)
    if labelmap.array.any() and not array.any():
        raise InvalidInputError(
            f"The labels of case '{name}' do not overlap its image.",
            "Give the segmentation that was drawn on this image.",
        )
    # Painted volume (mm³) that would fall outside the image: a crop never loses any, another scan's does.
    painted = np.count_nonzero(labelmap.array) * float(np.prod(labelmap.spacing))
    kept = np.count_nonzero(array) * float(np.prod(image.spacing))
    if painted and kept < (1 - LABELS_OUTSIDE_TOLERANCE) * painted:
        raise InvalidInputError(
            f"{100 * (1 - kept / painted):.0f} % of the painted labels of case '{name}' lie outside its image.",
            "Give the segmentation that was drawn on this image (a segmentation of another scan does not fit).",
        )
    return image.with_array(array)


def read_annotated_case(
    image_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    model_labels: dict[int, str],
    modality: str | None = None,
    mapping: dict[str, int | str | None] | None = None,
    annotated: Iterable[int | str] | None = None,
) -> AnnotatedCase:
    """Read an image and its labels; a Slicer ``.seg.nrrd`` is matched by segment names.

    ``modality`` None: the DICOM tag, else detected from the intensities (checked against the model's).
    """
    from .segfile import read_seg_nrrd_names
    from .volume import detect_modality, normalize_modality, read_volume

    image = read_volume(image_path, normalize_modality(modality))
    image.modality = detect_modality(image)
    labels = read_volume(labels_path)
    names = read_seg_nrrd_names(labels_path) if str(labels_path).endswith(".seg.nrrd") else None
    return annotated_case(
        Path(image_path).name.split(".")[0], image, labels, model_labels, names or None, mapping, annotated
    )


# --------------------------------------------------------------------------------------------
# Configuration and result
# --------------------------------------------------------------------------------------------


@dataclass
class FineTuneConfig:
    epochs: int = 15
    steps_per_epoch: int = 20
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (32, 64, 80)  # (z, y, x) on the model grid
    # 2e-3: scripts/benchmark_finetune.py (MR shift, 1-3 cases) recovered 78-86 % of the lost Dice at
    # 1e-3 and 82-91 % at 2e-3 in the same 15 epochs.
    learning_rate: float = 2e-3
    kd_temperature: float = 2.0
    # 0.5: on shifted scans the parent's soft targets are partly wrong. With an earlier build of the
    # bundled CT student, scripts/benchmark_finetune.py (+100 HU shift, 1-3 cases) recovered 78-79 %
    # of the lost Dice at weight 1 and 93-95 % at 0.5, without loss on the original domain at either.
    kd_weight: float = 0.5
    seed: int = 0
    time_budget_s: float | None = None  # stop cleanly between epochs after this much training time
    device: str = "auto"
    holdout_fraction: float = 0.25  # slab along z held out when there is only one case
    # Batch-norm statistics stay the parent's: training patches from a case or two would replace
    # statistics gathered over many volumes, and the running statistics are what inference uses.
    # (Re-estimating them on the fine-tuning case instead recovered about half as much of the CT shift.)
    freeze_batch_norm: bool = True

    def __post_init__(self) -> None:
        check_run_settings(self)

    def to_training_config(self) -> TrainingConfig:
        return TrainingConfig(
            epochs=self.epochs,
            steps_per_epoch=self.steps_per_epoch,
            batch_size=self.batch_size,
            patch_size=tuple(self.patch_size),
            learning_rate=self.learning_rate,
            seed=self.seed,
            kd_temperature=self.kd_temperature,
            kd_weight=self.kd_weight,
            validation_fraction=0.0,
            validate_every=0,
            device=self.device,
            time_budget_s=self.time_budget_s,
        )


@dataclass
class FineTuneResult:
    bundle: Bundle
    before: dict[str, float]  # structure name -> held-out Dice of the parent
    after: dict[str, float]  # structure name -> held-out Dice of the new version
    worse: list[str]  # structures whose Dice dropped by more than WORSE_MARGIN
    mean_before: float
    mean_after: float
    held_out: str  # what the Dice was measured on
    history: History
    seconds_per_epoch: float  # wall seconds per training epoch in this run

    def table(self) -> list[dict]:
        """Rows for a before/after table (structure, parent, new, change)."""
        rows = [
            {"structure": n, "before": self.before[n], "after": self.after[n], "change": self.after[n] - self.before[n]}
            for n in self.before
        ]
        rows.append(
            {
                "structure": "mean",
                "before": self.mean_before,
                "after": self.mean_after,
                "change": self.mean_after - self.mean_before,
            }
        )
        return rows


# --------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------


def _parse_version(version: str | None) -> tuple[int, int, int]:
    parts = [int(p) for p in re.findall(r"\d+", str(version or ""))[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def next_version(parent: Bundle, siblings: Iterable[Bundle] = ()) -> str:
    """The parent's version with the minor number bumped past every version already taken in its
    family (``siblings`` that descend from the same root model), so versions never repeat."""
    known = {b.weights_sha256: b for b in siblings}
    known.setdefault(parent.weights_sha256, parent)

    def root(bundle: Bundle) -> str:
        seen = set()
        while True:
            seen.add(bundle.weights_sha256)
            reference = (bundle.info.get("parent") or {}).get("weights_sha256")
            if reference is None or reference in seen:
                return bundle.weights_sha256
            if reference not in known:
                return reference  # the chain leaves the known bundles: that parent is the root
            bundle = known[reference]

    family = root(parent)
    major, minor, _ = _parse_version(parent.metadata.get("version"))
    taken = [_parse_version(b.metadata.get("version")) for b in known.values() if root(b) == family]
    minor = max([minor] + [m for a, m, _ in taken if a == major]) + 1
    return f"{major}.{minor}.0"


def default_version_path(parent: Bundle, folder: str | os.PathLike) -> Path:
    """``<folder>/<parent name without -vN>-vK``, K the first free number from 2."""
    folder = Path(folder)
    base = re.sub(r"-v\d+$", "", parent.name)
    number = 2
    while True:
        candidate = folder / f"{base}-v{number}"
        if not candidate.exists() and not checkpoint_dir_for(candidate).exists():
            return candidate
        number += 1


def _search_folders(bundle: Bundle, folders: Iterable[str | os.PathLike] = ()) -> list[Path]:
    found = [Path(f) for f in folders] + [Path(bundle.path).parent, BUNDLED_MODELS]
    unique = []
    for folder in found:
        if folder.is_dir() and folder.resolve() not in [u.resolve() for u in unique]:
            unique.append(folder)
    return unique


def model_lineage(bundle: Bundle, folders: Iterable[str | os.PathLike] = ()) -> list[dict]:
    """The bundle and its parent chain (newest first) as {name, version, weights_sha256, path}.

    Parents are looked up by weights sha256 beside the bundle, in ``folders`` and among the
    bundled models; a parent that cannot be found ends the chain with ``path: None``.
    """
    known: dict[str, Bundle] = {}
    for folder in _search_folders(bundle, folders):
        for candidate in _quiet_find(folder):
            known.setdefault(candidate.weights_sha256, candidate)
    chain = []
    current: Bundle | None = bundle
    reference = None
    while True:
        if current is None:
            chain.append({**reference, "path": None})
            break
        if any(item["weights_sha256"] == current.weights_sha256 for item in chain):
            break  # a cycle could only come from hand-edited metadata
        chain.append(
            {
                "name": current.name,
                "version": current.metadata.get("version"),
                "weights_sha256": current.weights_sha256,
                "path": str(current.path),
            }
        )
        reference = current.info.get("parent")
        if not reference:
            break
        current = known.get(reference.get("weights_sha256"))
    return chain


def _quiet_find(folder: Path) -> list[Bundle]:
    """Valid bundles in ``folder``; damaged ones are left out of version lists instead of failing them."""
    bundles = []
    for candidate in sorted(folder.glob("*/configs/metadata.json")):
        if candidate.parents[1].name.startswith(".partial-"):
            continue
        try:
            bundles.append(load_bundle(candidate.parents[1]))
        except BundleError:
            continue
    return bundles


def is_bundled(path: str | os.PathLike, bundled_dir: str | os.PathLike = BUNDLED_MODELS) -> bool:
    return Path(path).resolve().is_relative_to(Path(bundled_dir).resolve())


def model_versions(*folders: str | os.PathLike, bundled_dir: str | os.PathLike = BUNDLED_MODELS) -> list[dict]:
    """Every bundle in the bundled models and ``folders``, with version, parent and deletability."""
    rows = []
    seen = set()
    for folder in [Path(bundled_dir), *map(Path, folders)]:
        if not folder.is_dir():
            continue
        for bundle in _quiet_find(folder):
            if bundle.path.resolve() in seen:
                continue
            seen.add(bundle.path.resolve())
            parent = bundle.info.get("parent") or {}
            bundled = is_bundled(bundle.path, bundled_dir)
            rows.append(
                {
                    "name": bundle.name,
                    "version": bundle.metadata.get("version"),
                    "role": bundle.role,
                    "modality": bundle.modality,
                    "method": (bundle.info.get("method") or {}).get("name"),
                    "parent": f"{parent['name']} {parent.get('version')}" if parent else "",
                    "parent_sha256": parent.get("weights_sha256"),
                    "weights_sha256": bundle.weights_sha256,
                    "bundled": bundled,
                    "deletable": not bundled,
                    "created": bundle.info.get("created"),
                    "path": str(bundle.path),
                }
            )
    return rows


def delete_user_model(path: str | os.PathLike, bundled_dir: str | os.PathLike = BUNDLED_MODELS) -> list[str]:
    """Delete a user's bundle atomically (renamed to ``.partial-deleting-*``, then removed).

    Refuses bundled models and folders that are not bundles. Returns warnings: the names of
    bundles beside it that name it as their parent (they keep working; their lineage ends here).
    """
    path = Path(path)
    if is_bundled(path, bundled_dir):
        raise BundleError(
            f"'{path}' is a bundled model; bundled models cannot be deleted.",
            "Delete only models you made (fine-tuned versions); switch to another model instead.",
        )
    try:
        bundle = load_bundle(path)
    except BundleError as error:
        raise BundleError(
            f"'{path}' is not a MedKDSegment model bundle ({error.problem}); nothing was deleted.",
            "Give the folder of a model you made ('medkd models' lists them).",
        ) from error
    warnings = [
        f"'{other.name}' was fine-tuned from '{bundle.name}'; it keeps working but its lineage ends here."
        for other in _quiet_find(path.parent)
        if (other.info.get("parent") or {}).get("weights_sha256") == bundle.weights_sha256
        and other.path.resolve() != path.resolve()
    ]
    trash = Path(tempfile.mkdtemp(prefix=f".partial-deleting-{path.name}-", dir=path.parent))
    os.rename(path, trash / path.name)  # atomic: the model disappears from lists at once
    shutil.rmtree(trash, ignore_errors=True)
    return warnings


def discard_checkpoint(output: str | os.PathLike) -> bool:
    """Remove the checkpoint of an interrupted run (so the next run starts afresh)."""
    folder = checkpoint_dir_for(Path(output))
    if folder.is_dir():
        shutil.rmtree(folder)
        return True
    return False


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """A case on the model grid."""

    name: str
    image: np.ndarray
    labels: np.ndarray  # user labels (annotated structures only)
    annotated: frozenset[int]


@dataclass
class _HeldOut:
    name: str
    image: np.ndarray
    labels: np.ndarray
    annotated: frozenset[int]
    region: slice = field(default_factory=lambda: slice(None))  # z range scored (the whole case, or a held-out slab)


class _FrozenNorm(nn.Module):
    """Keeps batch-norm layers in eval mode while ``fit`` trains the rest (``fit`` calls ``train()``)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.net = network
        self.output_stride = getattr(network, "output_stride", 1)

    def train(self, mode: bool = True) -> _FrozenNorm:
        super().train(mode)
        for module in self.net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def merged_targets(user: np.ndarray, annotated: Iterable[int], parent_prediction: np.ndarray) -> np.ndarray:
    """Training targets under partial annotation (see the module docstring for the rule)."""
    annotated = sorted(annotated)
    painted = np.isin(user, annotated)
    from_parent = ~np.isin(parent_prediction, annotated) & (parent_prediction != 0)
    return np.where(painted, user, np.where(from_parent, parent_prediction, 0)).astype(np.uint8)


def _prepare(case: AnnotatedCase, parent: Bundle) -> _Prepared:
    if case.image.modality and case.image.modality != parent.modality:
        raise InvalidInputError(
            f"Case '{case.name}' is {case.image.modality} but model '{parent.name}' is for {parent.modality}.",
            f"Fine-tune a {case.image.modality} model, or give {parent.modality} cases.",
        )
    unknown = sorted(set(case.annotated) - set(parent.labels))
    if unknown:
        raise InvalidInputError(
            f"Case '{case.name}' lists annotated label values {unknown} that model '{parent.name}' does not have.",
            "Use the model's label values (see 'medkd info MODEL').",
        )
    check_image(case.image, f"the image of case '{case.name}'")
    labels = _on_image_grid(case.image, case.labels, case.name)
    image, grid = to_model_grid(case.image, parent.profile)
    user = labels_to_model_grid(labels, grid)
    user[~np.isin(user, sorted(case.annotated))] = 0
    return _Prepared(case.name, image, user, frozenset(case.annotated))


def _holdout_slab(case: _Prepared, fraction: float) -> tuple[slice, slice]:
    """(training z-range, held-out z-range): the end slab holding the most annotated structures."""
    depth = case.image.shape[0]
    size = min(max(1, int(math.ceil(fraction * depth))), depth - 1)
    candidates = [(slice(size, depth), slice(0, size)), (slice(0, depth - size), slice(depth - size, depth))]

    def score(held: slice) -> tuple[int, int]:
        part = case.labels[held]
        return len({int(v) for v in np.unique(part)} - {0}), int((part != 0).sum())

    return max(candidates, key=lambda pair: score(pair[1]))


def _evaluate(
    network: nn.Module, held_out: list[_HeldOut], device: torch.device, names: dict[int, str], cancel: Cancel | None
) -> dict[str, float]:
    """Mean held-out Dice per annotated structure present in the scored region."""
    scores: dict[int, list[float]] = {}
    for item in held_out:
        prediction = predict_labels(network, item.image, device, cancel)[item.region]
        truth = item.labels[item.region]
        present = sorted(v for v in item.annotated if (truth == v).any())
        if not present:
            continue
        # Only annotated structures are scored: the truth of the others is unknown.
        dice = dice_per_label(prediction, truth, present)
        for label, value in dice.items():
            scores.setdefault(label, []).append(value)
    return {names[label]: float(np.mean(values)) for label, values in sorted(scores.items())}


def _teacher_reference(parent: Bundle, teacher: Bundle | None) -> Bundle | None:
    """The teacher recorded in the new bundle: the given one, else the parent's own teacher."""
    if teacher is not None:
        return teacher
    reference = parent.info.get("teacher")
    if not reference:
        return None
    # save_bundle records name, version and sha256 of a Bundle; keep the parent's record as it is.
    return Bundle(
        Path(),
        {
            "name": reference.get("name"),
            "version": reference.get("version"),
            "medkdsegment": {"weights_sha256": reference.get("weights_sha256")},
        },
    )


def _run_record(parent: Bundle, teacher: Bundle | None, cases: list[AnnotatedCase], config: FineTuneConfig) -> dict:
    settings = asdict(config)
    for volatile in ("time_budget_s", "device"):
        settings.pop(volatile)
    settings["patch_size"] = list(settings["patch_size"])
    return {
        "parent_sha256": parent.weights_sha256,
        "teacher_sha256": teacher.weights_sha256 if teacher is not None else None,
        "cases": [c.name for c in cases],
        "annotated": [sorted(c.annotated) for c in cases],
        "config": settings,
    }


def fine_tune(
    parent: str | Path | Bundle,
    cases: list[AnnotatedCase],
    output: str | Path,
    config: FineTuneConfig | None = None,
    validation: list[AnnotatedCase] | None = None,
    teacher: str | Path | Bundle | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> FineTuneResult:
    """Fine-tune ``parent`` on annotated ``cases`` and write a new version at ``output``.

    Progress messages during training read ``epoch E/N loss L`` (``runs.parse_epoch_loss`` reads
    them). ``cancel()`` returning True stops between steps with ``CancelledError``: no bundle is
    written, and the checkpoint of the last complete epoch stays for ``resume=True``.
    """
    config = config or FineTuneConfig()
    report = progress or (lambda fraction, stage: None)
    output = Path(output)
    parent_bundle = parent if isinstance(parent, Bundle) else resolve_bundle(parent)
    teacher_bundle = None if teacher is None else teacher if isinstance(teacher, Bundle) else resolve_bundle(teacher)
    if not cases:
        raise InvalidInputError("No annotated cases were given.", "Give at least one image with its segmentation.")
    if output.exists():
        raise InvalidInputError(
            f"'{output}' already exists; models are never overwritten.", "Choose a new name for the new version."
        )
    for bundle in (parent_bundle, teacher_bundle):
        if bundle is not None and len(getattr(bundle, "modalities", ())) > 1:
            raise InvalidInputError(
                f"Model '{bundle.name}' segments several modalities ({bundle.modality}); fine-tuning such "
                "models is not supported yet.",
                "Fine-tune a single-modality student (for example phantom-abdomen-ct-student).",
            )
    if teacher_bundle is not None and teacher_bundle.labels != parent_bundle.labels:
        raise InvalidInputError(
            f"Teacher '{teacher_bundle.name}' labels other structures than '{parent_bundle.name}'.",
            "Use the teacher the model was distilled from, or none.",
        )
    checkpoint_dir = checkpoint_dir_for(output)
    record = _run_record(parent_bundle, teacher_bundle, cases, config)
    recorded = read_record(output, FINETUNE_RUN_FILE)
    if (checkpoint_dir / CHECKPOINT_FILE).exists():
        if not resume:
            raise InvalidInputError(
                f"An interrupted fine-tuning run left a checkpoint in '{checkpoint_dir}'.",
                "Resume it (--resume / resume=True), or delete that folder to start again.",
            )
        if recorded is not None and recorded != record:
            raise InvalidInputError(
                f"The checkpoint in '{checkpoint_dir}' belongs to another fine-tuning run "
                "(other parent, cases, annotated structures or settings).",
                "Resume with the same inputs, or delete that folder to start again.",
            )
    device = select_device(config.device)
    names = parent_bundle.labels

    # 1. Cases on the model grid, merged targets from the parent's (or teacher's) predictions.
    report(0.0, "loading the parent model")
    network = parent_bundle.load_network(device)
    guide = teacher_bundle.load_network(device) if teacher_bundle is not None else parent_bundle.load_network(device)
    prepared = []
    for index, case in enumerate(cases):
        report(0.08 * index / len(cases), f"preparing case {case.name}")
        prepared.append(_prepare(case, parent_bundle))
    held_out: list[_HeldOut] = []
    train_ranges: dict[int, slice] = {}  # training index -> z range kept for training
    if validation:
        held_out = [
            _HeldOut(p.name, p.image, p.labels, p.annotated) for p in (_prepare(c, parent_bundle) for c in validation)
        ]
        training = prepared
        description = f"{len(validation)} validation case(s): {', '.join(c.name for c in validation)}"
    elif len(prepared) >= 2:
        training, last = prepared[:-1], prepared[-1]
        held_out = [_HeldOut(last.name, last.image, last.labels, last.annotated)]
        description = f"annotated case '{last.name}', held out from training"
    else:
        only = prepared[0]
        train_range, held_range = _holdout_slab(only, config.holdout_fraction)
        held_out = [_HeldOut(only.name, only.image, only.labels, only.annotated, held_range)]
        training, train_ranges[0] = [only], train_range
        description = (
            f"a slab of case '{only.name}' (model-grid z {held_range.start}-{held_range.stop - 1} of "
            f"{only.image.shape[0]}, {config.holdout_fraction:.0%}), cut from its training copy"
        )
    training_cases = []
    for index, item in enumerate(training):
        report(0.08 + 0.04 * index / len(training), f"parent predictions for unannotated structures in {item.name}")
        guess = predict_labels(guide, item.image, device, cancel)
        targets = merged_targets(item.labels, item.annotated, guess)
        keep = train_ranges.get(index, slice(None))  # a held-out slab is never trained on
        training_cases.append(Case(item.name, np.ascontiguousarray(item.image[keep]), targets[keep]))

    # 2. Train a copy of the parent; the frozen parent (or teacher) keeps what it knew.
    if recorded is None and distributed.current().main:
        write_record(output, FINETUNE_RUN_FILE, record)
    epochs_before = 0
    if resume and (checkpoint_dir / CHECKPOINT_FILE).exists():
        epochs_before = int(torch.load(checkpoint_dir / CHECKPOINT_FILE, weights_only=True)["epoch"])
    trainee = _FrozenNorm(network) if config.freeze_batch_norm else network
    for parameter in guide.parameters():
        parameter.requires_grad_(False)
    started = time.perf_counter()
    try:
        history = fit(
            trainee,
            parent_bundle.num_classes,
            training_cases,
            config.to_training_config(),
            checkpoint_dir,
            teacher=guide,
            resume=resume,
            progress=lambda f, m: report(0.12 + 0.78 * f, m),
            cancel=cancel,
        )
    except BaseException:
        # Stopped before a first epoch was saved: nothing worth resuming, so nothing is left behind.
        if not (checkpoint_dir / CHECKPOINT_FILE).exists():
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        raise
    trained_epochs = len(history.epoch_loss) - epochs_before
    seconds_per_epoch = (time.perf_counter() - started) / trained_epochs if trained_epochs > 0 else math.nan
    if not config.freeze_batch_norm:
        report(0.89, "recalibrating batch-norm statistics on whole volumes")
        recalibrate_batch_norm(network, training_cases, device)
    network.eval()

    # 3. Before/after on held-out data.
    report(0.9, "held-out Dice of the parent")
    reference = parent_bundle.load_network(device)
    before = _evaluate(reference, held_out, device, names, cancel)
    report(0.94, "held-out Dice of the new version")
    after = _evaluate(network, held_out, device, names, cancel)
    worse = [n for n in before if after[n] < before[n] - WORSE_MARGIN]
    mean_before = float(np.mean(list(before.values()))) if before else math.nan
    mean_after = float(np.mean(list(after.values()))) if after else math.nan
    if not before:
        description += " (no annotated structure in it, so nothing could be scored)"

    # 4. The new version: atomically written, parent linked, nothing overwritten.
    if cancel is not None and cancel():
        raise CancelledError()
    report(0.98, "writing the new version")
    annotated_names = sorted({names[v] for c in cases for v in c.annotated})
    family = [b for folder in {output.parent, Path(parent_bundle.path).parent} for b in _quiet_find(folder)]
    version = next_version(parent_bundle, family)
    training_config = asdict(config.to_training_config())
    method = {
        "name": "fine_tune",
        "annotated": annotated_names,
        "cases": [c.name for c in cases],
        "partial_labels": PARTIAL_LABEL_RULE,
        "kd_source": teacher_bundle.name if teacher_bundle is not None else f"parent {parent_bundle.name}",
        "kd_temperature": config.kd_temperature,
        "kd_weight": config.kd_weight,
        "freeze_batch_norm": config.freeze_batch_norm,
        "training": training_config,
    }
    metrics = {
        "before": before,
        "after": after,
        "mean_before": mean_before,
        "mean_after": mean_after,
        "worse": worse,
        "held_out": description,
        "train_loss": history.epoch_loss,
        "stopped_by_budget": history.stopped_by_budget,
    }
    colors = parent_bundle.colors
    structures = tuple(Structure(v, n, colors.get(v, (0.5, 0.5, 0.5))) for v, n in sorted(names.items()))
    def write_bundle() -> Bundle:  # in the main process; the others read it back (written_by_main)
        written = save_bundle(
            output,
            network.cpu(),
            name=output.name,
            role=parent_bundle.role,
            architecture=parent_bundle.info["architecture"],
            profile=parent_bundle.profile,
            structures=structures,
            method=method,
            teacher=_teacher_reference(parent_bundle, teacher_bundle),
            parent=parent_bundle,
            metrics=metrics,
            description=f"{parent_bundle.name} {parent_bundle.metadata.get('version')} fine-tuned on "
            f"{len(cases)} annotated case(s) ({', '.join(annotated_names)})",
            version=version,
            half_precision=parent_bundle.info.get("weights_dtype") == "float16",
        )
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        return written

    bundle = distributed.written_by_main(write_bundle, lambda: load_bundle(output))
    report(1.0, "done")
    return FineTuneResult(
        bundle=bundle,
        before=before,
        after=after,
        worse=worse,
        mean_before=mean_before,
        mean_after=mean_after,
        held_out=description,
        history=history,
        seconds_per_epoch=seconds_per_epoch,
    )
