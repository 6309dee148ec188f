"""Training in the scene: teachers, distilled students (methods, several teachers, an assistant chain)
and one CT+MR student, from folders of images/labels; the live loss curve and the result.

MRML only (never qt), and no torch at import: the GUI builds method strings, names outputs and finds
interrupted runs without loading the engine. The engine trains (``engine.training``,
``engine.unpaired``) through ``jobs.train_model``; the scene logic (``scene/logic.py``) runs it
in-process or in the worker and calls these helpers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..engine import runs
from ..engine.errors import InvalidInputError
from ..engine.methods import METHODS
from ..engine.volume import VOLUME_SUFFIXES
from .finetune import LossCurve

METHOD_NAMES = tuple(METHODS)  # the distillation methods, in the engine's order (torch-free)
# What each task trains (the Logic's ``trainTeacher``, ``distillStudent``, ``distillUnpaired``).
TASKS = {"teacher": "train_teacher", "student": "distill", "unpaired": "distill_unpaired"}
ASSISTANT_COLOR = (0.15, 0.45, 0.80)


def method_widget_name(method: str) -> str:
    """The camel-case stem of a method's widgets in the .ui: 'ctkd_instance' -> 'CtkdInstance'
    (``method<Stem>CheckBox`` and ``method<Stem>WeightSpinBox``)."""
    return "".join(part.capitalize() for part in method.split("_"))


def method_string(choices: Mapping | Iterable) -> str:
    """The engine's method string from the Advanced section's state, in registry order.

    ``choices``: {method: weight} for the ticked methods (weight None: the method's default), or
    (method, ticked, weight) triples, e.g. {"cwd": 1.0, "coteacher": 0.5} -> "cwd:1.0+coteacher:0.5".
    """
    if isinstance(choices, Mapping):
        ticked = {str(name): weight for name, weight in choices.items()}
    else:
        ticked = {str(name): weight for name, on, weight in choices if on}
    ticked = {name.strip().lower().replace("-", "_"): weight for name, weight in ticked.items()}
    unknown = [name for name in ticked if name not in METHOD_NAMES]
    if unknown:
        raise InvalidInputError(f"Unknown distillation method(s): {', '.join(unknown)}.",
                                f"Use: {', '.join(METHOD_NAMES)}.")
    if not ticked:
        raise InvalidInputError("No distillation method is selected.",
                                "Tick at least one method in 'Advanced: distillation methods' (kd is the usual).")
    parts = []
    for name in METHOD_NAMES:
        if name not in ticked:
            continue
        weight = ticked[name]
        if weight is None:
            parts.append(name)
            continue
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise InvalidInputError(f"The weight of method '{name}' is {weight}.", "Give a number ≥ 0.")
        parts.append(f"{name}:{round(weight, 6)!r}")  # 1 -> '1.0', 0.5 -> '0.5': the spin box's value, exactly
    return "+".join(parts)


# --- inputs and outputs ------------------------------------------------------------------------------------


def check_data_folder(folder, what: str = "data folder") -> Path:
    """A training folder (``images/`` and, for labelled cases, ``labels/`` with the same file names), checked
    before anything starts; the engine checks every case in detail when it reads them."""
    layout = "Pick a folder with images/ (and labels/ with the same file names), as 'medkd phantom' writes."
    if not folder or not str(folder).strip():
        raise InvalidInputError(f"No {what} was given.", layout)
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise InvalidInputError(f"The {what} '{path}' does not exist or is not a folder.", layout)
    images = path / "images"
    if not images.is_dir():
        raise InvalidInputError(f"The {what} '{path}' has no 'images' folder.", layout)
    volumes = [p for p in images.iterdir() if not p.name.startswith(".") and
               (p.is_dir() or p.name.lower().endswith(VOLUME_SUFFIXES))]
    if not volumes:
        raise InvalidInputError(f"'{images}' holds no volumes.", "Add NIfTI, NRRD or MHA files, or DICOM folders.")
    return path


def slug(text: str) -> str:
    """A model-name-safe version of ``text`` (letters, digits, '-', '.')."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-.").lower() or "model"


def taken(path: Path, assistant: bool = False) -> bool:
    """Whether a new run cannot write ``path``: a model, a run's checkpoint or (chain) its assistant is there."""
    paths = [path] + ([runs.assistant_output(path)] if assistant else [])
    return any(p.exists() or runs.checkpoint_dir_for(p).exists() for p in paths)


def output_path(models_folder, output, default_name: str, assistant: bool = False, resume: bool = False) -> Path:
    """Where a run writes its model. ``output``: a name (in ``models_folder``) or a folder path; refused when
    taken (models are never overwritten). None: ``default_name``, else ``-2``, ``-3``... until one is free."""
    folder = Path(models_folder)
    if output:
        text = str(output)
        path = Path(text).expanduser() if ("/" in text or "\\" in text) else folder / slug(text)
        if path.exists():
            raise InvalidInputError(f"A model '{path.name}' already exists in '{path.parent}'; models are never "
                                    "overwritten.", "Choose another output name (or leave it empty for a new one).")
        if not resume and taken(path, assistant):
            raise InvalidInputError(f"An interrupted training run of '{path.name}' is in '{path.parent}'.",
                                    "Resume it, discard it, or choose another output name.")
        return path
    base = slug(default_name)
    for index in range(1, 10_000):
        path = folder / (base if index == 1 else f"{base}-{index}")
        if not taken(path, assistant):
            return path
    raise InvalidInputError(f"No free model name like '{base}' in '{folder}'.", "Give an output name.")


def interrupted_trainings(folders: Iterable) -> list[Path]:
    """Outputs of killed or cancelled training runs in ``folders`` (newest first) that can be resumed, from
    Slicer or the command line alike: their checkpoint folder holds the run record and no model was written."""
    return [output for output, _ in runs.interrupted_runs(folders, runs.TRAINING_RUN_FILE)]


def training_record(output) -> dict:
    """The job spec an interrupted run at ``output`` was started with (``engine.runs.recorded_run`` wrote it)."""
    record = runs.read_record(output, runs.TRAINING_RUN_FILE)
    if record is None:
        raise InvalidInputError(f"There is no interrupted training run at '{output}'.", "Start a new run instead.")
    return record


def discard_run(output) -> bool:
    """Delete an interrupted run's checkpoints (and an unfinished chain's assistant checkpoints); the
    finished models are never touched. True if something was deleted."""
    return runs.discard(output, chain=True)


def discard_if_unstarted(output, assistant: bool = False) -> None:
    """After a worker run was cancelled or failed: drop its record if no epoch finished (nothing to resume)."""
    if not runs.started(output, assistant):
        runs.discard(output)


# --- the live loss curve ---------------------------------------------------------------------------------


class TrainingCurve:
    """The fine-tuning loss curve (``finetune.LossCurve``: table, series, chart in a plot view); a
    teacher-assistant chain adds the assistant's series to the same chart (its stages read
    ``assistant: epoch E/N loss L``, the student's ``student: ...``)."""

    def __init__(self, title: str, assistant: bool = False) -> None:
        self.main = LossCurve(title)
        self.assistant = None
        if assistant:
            import slicer

            self.assistant = LossCurve(f"{title} (assistant)")
            slicer.mrmlScene.RemoveNode(self.assistant.chart)  # one chart: the assistant's series joins the main one
            self.assistant.chart = None
            self.assistant.series.SetColor(*ASSISTANT_COLOR)
            self.assistant.series.SetName(f"{title}: assistant")
            self.main.series.SetName(f"{title}: student")
            self.main.chart.AddAndObservePlotSeriesNodeID(self.assistant.series.GetID())
            self.main.chart.SetLegendVisibility(True)

    @property
    def table(self):
        return self.main.table

    @property
    def chart(self):
        return self.main.chart

    def nodes(self) -> list:
        return self.main.nodes() + ([self.assistant.table, self.assistant.series] if self.assistant else [])

    def epochs(self) -> list[tuple[int, float]]:
        return self.main.epochs()

    def update(self, stage: str) -> bool:
        if self.assistant is not None and (stage or "").startswith("assistant: "):
            return self.assistant.update(stage)
        return self.main.update(stage)

    def replace(self, losses: list[float], assistant_losses: list[float] | None = None) -> None:
        self.main.replace(losses)
        if self.assistant is not None and assistant_losses is not None:
            self.assistant.replace(assistant_losses)

    def show(self) -> None:
        self.main.show()

    def remove(self) -> None:
        self.main.remove()
        if self.assistant is not None:
            self.assistant.remove()


# --- the result ------------------------------------------------------------------------------------------


@dataclass
class TrainingReport:
    """What a training run made: a new model (``model``, a catalog entry now in the model list) and, for a
    chain, its assistant; the methods and teachers recorded in its bundle; the loss curve."""

    model: object  # catalog.ModelInfo
    task: str  # teacher, student or unpaired
    methods: str  # e.g. 'cwd:1+coteacher:0.5' (the bundle's record), 'supervised' for a teacher
    teachers: list[dict]  # name and weight (CT+MR: name and modality) as recorded in the bundle
    lossCurve: TrainingCurve
    epochLoss: list[float]
    stoppedByBudget: bool
    validationDice: dict
    assistant: object | None = None  # catalog.ModelInfo of a chain's assistant
    outputs: dict = field(default_factory=dict)

    @property
    def lossTable(self):
        return self.lossCurve.table

    @property
    def lossChart(self):
        return self.lossCurve.chart

    def nodes(self) -> list:
        return self.lossCurve.nodes()

    def summary(self) -> str:
        """One line for a status bar or the console."""
        text = f"{self.model.name} ({self.model.role}, {self.model.modality})"
        if self.task != "teacher":
            teachers = ", ".join(t["name"] + (f" ×{t['weight']:.2g}" if len(self.teachers) > 1 and
                                               t.get("weight") is not None else "") for t in self.teachers)
            text += f" distilled from {teachers or 'no teacher'}"
            if self.assistant is not None:
                text += f" through {self.assistant.name}"
            text += f" with {self.methods}"
        losses = [v for v in self.epochLoss if not math.isnan(v)]
        text += f"; {len(self.epochLoss)} epochs" + (f", final loss {losses[-1]:.4f}" if losses else "")
        if self.stoppedByBudget:
            text += " (stopped by the time budget)"
        return text
