"""Jobs: the functions behind every door. Console and batch call them in-process on ``Volume``s;
the worker process (``worker.py``) calls the same functions on volumes read from temporary NRRD files.

Engine side: torch, MONAI, SimpleITK and numpy only (through ``engine``); never slicer or Qt.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .catalog import find_model
from .engine import runs
from .engine.errors import InvalidInputError
from .engine.volume import Volume, detect_modality, normalize_modality, read_volume, write_volume

Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]
# Share of a comparison's progress bar: teacher, student, then the metrics.
COMPARE_SPLIT = (0.0, 0.5, 0.92, 1.0)


class NetworkCache:
    """Loaded networks (``inference.load_runner``: an ONNX copy or a torch network) by (bundle folder, weights
    sha256, device asked for): a warm process skips loading them."""

    def __init__(self, max_items: int = 4) -> None:
        self.max_items = max_items
        self._items: OrderedDict = OrderedDict()

    def get(self, bundle, device: str):
        from .engine.inference import load_runner

        key = (str(Path(bundle.path).resolve()), bundle.weights_sha256, device)
        if key not in self._items:
            self._items[key] = load_runner(bundle, device)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        self._items.move_to_end(key)
        return self._items[key]

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class ModelRun:
    """One model's result on one volume, with what the comparison table reports."""

    model: str
    role: str
    labels: Volume
    names: dict[int, str]
    colors: dict[int, tuple[float, float, float]]
    device: str
    seconds: float  # end to end in this process, network loading included
    stage_seconds: dict[str, float] = field(default_factory=dict)
    parameters: int = 0
    windows: int = 0
    warnings: list[str] = field(default_factory=list)  # the scan looks outside the model's world
    trained_on: str = ""  # the model's own volumes (``Bundle.trained_on``): a phantom model says so

    def summary(self) -> dict:
        """Everything but the labels, JSON-ready (label keys become strings in JSON)."""
        return {
            "model": self.model, "role": self.role, "device": self.device, "seconds": self.seconds,
            "stage_seconds": self.stage_seconds, "parameters": self.parameters, "windows": self.windows,
            "warnings": list(self.warnings), "trained_on": self.trained_on,
            "names": {str(k): v for k, v in self.names.items()},
            "colors": {str(k): list(v) for k, v in self.colors.items()},
        }


def _scaled(progress: Progress | None, start: float, end: float, prefix: str) -> Progress:
    def report(fraction: float, stage: str) -> None:
        if progress is not None:
            progress(start + (end - start) * min(max(fraction, 0.0), 1.0), f"{prefix}{stage}")

    return report


def load_model(model: str | os.PathLike, user_folders: tuple | list = ()):
    """An engine ``Bundle`` by name or folder (bundled and user models)."""
    from .engine.bundle import load_bundle

    return load_bundle(find_model(model, user_folders).path)


def segment_volume(
    volume: Volume,
    model: str | os.PathLike,
    device: str = "auto",
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    cache: NetworkCache | None = None,
    user_folders: tuple | list = (),
) -> ModelRun:
    """Segment ``volume`` (its ``modality`` set, or detected here) with one model."""
    from .engine.inference import segment

    started = time.perf_counter()
    if volume.modality is None:
        volume.modality = detect_modality(volume)
    bundle = load_model(model, user_folders)
    network = (cache or NetworkCache()).get(bundle, device)
    result = segment(volume, bundle, device, progress, cancel, network=network)
    return ModelRun(
        model=bundle.name, role=bundle.role, labels=result.labels, names=bundle.labels, colors=bundle.colors,
        device=result.device, seconds=time.perf_counter() - started,
        stage_seconds={k: round(v, 4) for k, v in result.seconds.items()},
        parameters=bundle.parameters, windows=result.windows, warnings=list(result.warnings),
        trained_on=bundle.trained_on or "",
    )


def compare_volume(
    volume: Volume,
    teacher: str | os.PathLike,
    student: str | os.PathLike,
    reference: Volume | None = None,
    device: str = "auto",
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    cache: NetworkCache | None = None,
    user_folders: tuple | list = (),
    hd95: bool = True,
) -> dict:
    """Teacher and student on the same volume, and per-structure agreement (and against ``reference``)."""
    from .engine.metrics import compare_labels

    cache = cache or NetworkCache()
    first, second, metrics, _ = COMPARE_SPLIT
    runs = {}
    for role, model, start, end in (("teacher", teacher, first, second), ("student", student, second, metrics)):
        runs[role] = segment_volume(volume, model, device, _scaled(progress, start, end, f"{role}: "), cancel, cache,
                                    user_folders)
    if runs["teacher"].names != runs["student"].names:
        raise InvalidInputError(
            f"Teacher '{runs['teacher'].model}' and student '{runs['student'].model}' label different structures.",
            "Compare a student with a teacher that has the same label table (e.g. the one it was distilled from).",
        )
    if cancel is not None and cancel():
        from .engine.errors import CancelledError

        raise CancelledError()
    _scaled(progress, metrics, 1.0, "")(0.0, "metrics (Dice, HD95)")
    rows = compare_labels(runs["teacher"].labels, runs["student"].labels, runs["student"].names, reference, hd95=hd95)
    _scaled(progress, metrics, 1.0, "")(1.0, "metrics (Dice, HD95)")
    return {"teacher": runs["teacher"], "student": runs["student"], "rows": rows}


DISAGREEMENT_NAMES = {1: "teacher only", 2: "student only", 3: "different structure"}
DISAGREEMENT_COLORS = {1: (0.95, 0.55, 0.10), 2: (0.15, 0.60, 0.95), 3: (0.90, 0.15, 0.60)}


def disagreement(teacher, student):
    """Where two label arrays (same shape) differ: 1 only the teacher found a structure, 2 only the
    student, 3 both did but not the same one (values of ``DISAGREEMENT_NAMES``)."""
    import numpy as np

    a, b = np.asarray(teacher), np.asarray(student)
    if a.shape != b.shape:
        raise InvalidInputError("The teacher's and the student's labels are on different grids.",
                                "Segment the same volume with both models.")
    result = np.zeros(a.shape, np.uint8)
    result[(a > 0) & (b == 0)] = 1
    result[(a == 0) & (b > 0)] = 2
    result[(a > 0) & (b > 0) & (a != b)] = 3
    return result


# --- fine-tuning: a new model version from annotated cases -----------------------------------------------

# FineTuneConfig fields a caller may set (JSON-ready; patch_size as a list).
FINETUNE_SETTINGS = ("epochs", "steps_per_epoch", "batch_size", "patch_size", "learning_rate", "kd_temperature",
                     "kd_weight", "seed", "time_budget_s", "device", "holdout_fraction", "freeze_batch_norm")


def finetune_config(settings: dict | None = None):
    """An engine ``FineTuneConfig`` from a settings dict; unknown keys are refused with their names."""
    from .engine.finetune import FineTuneConfig

    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(FINETUNE_SETTINGS))
    if unknown:
        raise InvalidInputError(f"Unknown fine-tuning setting(s): {', '.join(unknown)}.",
                                f"Use: {', '.join(FINETUNE_SETTINGS)}.")
    if settings.get("patch_size") is not None:
        settings["patch_size"] = tuple(int(v) for v in settings["patch_size"])
    return FineTuneConfig(**{k: v for k, v in settings.items() if v is not None})  # None: the default


def finetune_summary(result) -> dict:
    """An engine ``FineTuneResult`` as JSON-ready outputs (what the worker sends back)."""
    bundle = result.bundle
    parent = bundle.info.get("parent") or {}
    return {
        "bundle": str(bundle.path), "name": bundle.name, "version": bundle.metadata.get("version"),
        "parent": parent.get("name"), "parent_version": parent.get("version"),
        "before": result.before, "after": result.after, "worse": list(result.worse),
        "mean_before": result.mean_before, "mean_after": result.mean_after, "held_out": result.held_out,
        "epoch_loss": list(result.history.epoch_loss), "stopped_by_budget": result.history.stopped_by_budget,
        "seconds_per_epoch": result.seconds_per_epoch,
    }


def finetune_model(
    cases: list,
    parent: str | os.PathLike,
    output: str | os.PathLike,
    settings: dict | None = None,
    teacher: str | os.PathLike | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    user_folders: tuple | list = (),
) -> dict:
    """Fine-tune ``parent`` (name or folder) on ``AnnotatedCase``s into a new bundle at ``output``."""
    from .engine.finetune import fine_tune

    parent_bundle = load_model(parent, user_folders)
    teacher_bundle = load_model(teacher, user_folders) if teacher else None
    result = fine_tune(parent_bundle, cases, Path(output), finetune_config(settings), teacher=teacher_bundle,
                       resume=resume, progress=progress, cancel=cancel)
    return finetune_summary(result)


def _read_cases(spec: dict) -> list:
    from .engine.finetune import AnnotatedCase

    cases = []
    for item in spec["cases"]:
        image = read_volume(item["image"])
        image.modality = normalize_modality(item["modality"]) if item.get("modality") else detect_modality(image)
        cases.append(AnnotatedCase(name=item["name"], image=image, labels=read_volume(item["labels"]),
                                   annotated=frozenset(int(v) for v in item["annotated"])))
    return cases


# --- training: teachers, distilled students, one CT+MR student from unpaired data ------------------------

# Worker job kinds of the training jobs (``train_model`` runs all three).
TRAINING_JOBS = ("train_teacher", "distill", "distill_unpaired")
# Settings that are not ``TrainingConfig`` fields: networks, the teacher's preprocessing profile (a dict as
# in a bundle), the CT+MR prototype-KL weight. JSON-ready like the rest, so a job spec travels as it is.
TRAINING_EXTRAS = ("architecture", "assistant_architecture", "profile", "prototype_weight")


def training_config(settings: dict | None = None):
    """(engine ``TrainingConfig``, extras) from a settings dict; unknown keys are refused with their names."""
    from dataclasses import fields

    from .engine.training import TrainingConfig

    settings = dict(settings or {})
    names = [f.name for f in fields(TrainingConfig)]
    unknown = sorted(set(settings) - set(names) - set(TRAINING_EXTRAS))
    if unknown:
        raise InvalidInputError(f"Unknown training setting(s): {', '.join(unknown)}.",
                                f"Use: {', '.join(names + list(TRAINING_EXTRAS))}.")
    for key in ("patch_size", "teacher_weights"):
        if settings.get(key) is not None:
            settings[key] = tuple(settings[key])
    extras = {key: settings.pop(key) for key in TRAINING_EXTRAS if key in settings}
    return TrainingConfig(**{k: v for k, v in settings.items() if v is not None}), extras  # None: the default


def check_training_spec(spec: dict) -> None:
    """Refuse a bad spec before any data is read or anything is written: unknown settings, a typo in the
    method string, teacher weights that do not fit the teachers."""
    from .engine.distillation import validate_teacher_weights
    from .engine.methods import parse_methods

    config, _ = training_config(spec.get("settings"))
    if spec.get("processes", 1) != "auto":
        training_processes(spec)
    if spec.get("job") in ("distill", "distill_unpaired"):
        parse_methods(config.methods)
    if spec.get("job") == "distill":
        teachers = spec.get("teachers") or []
        if not teachers:
            raise InvalidInputError("No teacher was given.", "Pick at least one teacher model to distil from.")
        validate_teacher_weights(spec.get("weights") or config.teacher_weights, len(teachers))
    elif spec.get("job") not in TRAINING_JOBS:
        raise InvalidInputError(f"Unknown training job '{spec.get('job')}'.",
                                f"Use one of: {', '.join(TRAINING_JOBS)}.")


def training_summary(bundle, assistant=None, epochs: int | None = None) -> dict:
    """A trained bundle as JSON-ready outputs (what the worker sends back)."""
    info = bundle.info
    method = info.get("method") or {}
    metrics = info.get("metrics") or {}
    losses = [float(v) for v in metrics.get("train_loss") or []]
    terms = method.get("methods") or []
    teachers = [{"name": t.get("name"), "weight": t.get("weight")} for t in method.get("teachers") or []]
    if not teachers:  # a CT+MR student records one teacher per modality
        teachers = [{"name": entry["teacher"]["name"], "modality": modality}
                    for modality, entry in (info.get("modalities") or {}).items() if entry.get("teacher")]
    if not teachers and (info.get("teacher") or {}).get("name"):
        teachers = [{"name": info["teacher"]["name"], "weight": 1.0}]
    outputs = {
        "bundle": str(bundle.path), "name": bundle.name, "role": bundle.role, "modality": bundle.modality,
        "method": method.get("name"),
        # A CT+MR student records each term once per modality.
        "methods": "+".join(dict.fromkeys(f"{t['name']}:{t['weight']:g}" for t in terms)) or method.get("name"),
        "teachers": teachers, "chain": method.get("chain"), "epoch_loss": losses,
        "validation_dice": metrics.get("validation_dice") or {},
        "stopped_by_budget": bool(metrics.get("stopped_by_budget")) or (epochs is not None and len(losses) < epochs),
        "assistant": None,
    }
    if assistant is not None:
        outputs["assistant"] = {"bundle": str(assistant.path), "name": assistant.name,
                                "epoch_loss": [float(v) for v in (assistant.info.get("metrics") or {}).get(
                                    "train_loss") or []]}
    return outputs


def _teacher_paths(names, user_folders) -> list[str]:
    return [str(find_model(name, user_folders).path) for name in names]


def train_model(spec: dict, progress: Progress | None = None, cancel: Cancel | None = None) -> dict:
    """Run one training job spec (``train_teacher``, ``distill`` or ``distill_unpaired``; JSON-ready, the
    same in-process and in the worker) and return ``training_summary`` of the new bundle.

    Every job writes ``spec['output']`` (never overwritten) and checkpoints every epoch to
    ``<output>.checkpoint/``, where ``training.json`` records the spec so that an interrupted run can be
    resumed exactly (``resume``). A run that fails or is cancelled before its first epoch ends leaves nothing.
    """
    check_training_spec(spec)
    job, output = spec["job"], Path(spec["output"])
    user_folders = spec.get("user_folders") or ()
    resume, chain = bool(spec.get("resume")), bool(spec.get("assistant"))
    if output.exists():
        raise InvalidInputError(f"'{output}' already exists; models are never overwritten.",
                                "Choose a new output name.")
    if not resume and runs.started(output, chain):
        raise InvalidInputError(
            f"An interrupted training run of '{output.name}' exists (in '{runs.checkpoint_dir_for(output)}').",
            "Resume it, discard it, or choose another output name.")
    processes = training_processes(spec)
    record = {k: v for k, v in spec.items() if k not in ("id", "resume")}
    with runs.recorded_run(output, runs.TRAINING_RUN_FILE, record, resume, chain):
        if processes == 1:
            bundle, assistant, epochs = _train(job, spec, output, user_folders, resume, progress, cancel)
        else:
            from .engine.bundle import load_bundle

            _train_in_processes(spec, processes, progress, cancel)
            bundle = load_bundle(output)
            assistant = load_bundle(runs.assistant_output(output)) if chain else None
            epochs = training_config(spec.get("settings"))[0].epochs
    return training_summary(bundle, assistant, epochs)


def training_processes(spec: dict) -> int:
    """How many local processes a training job runs in: ``spec["processes"]``, a number or "auto" (one per GPU
    when the job may run on CUDA and this machine has several; else one)."""
    wanted = spec.get("processes", 1)
    if wanted == "auto":
        import torch

        device = (spec.get("settings") or {}).get("device", "auto")
        gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
        return gpus if gpus > 1 else 1
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
        raise InvalidInputError(f"The number of training processes is {wanted!r}.",
                                'Give a whole number of 1 or more, or "auto" (one per GPU).')
    return wanted


def _train_in_processes(spec: dict, processes: int, progress: Progress | None, cancel: Cancel | None) -> None:
    """Run a training job under torchrun in ``processes`` local processes (the module training on several GPUs):
    each runs ``_train`` data-parallel (``python -m MedKDSegmentLib.jobs``), and the main one's progress comes
    back as JSON lines. ``cancel`` terminates torchrun, which stops its processes; the checkpoint stays."""
    import json
    import subprocess
    import sys
    import tempfile

    from .engine.errors import CancelledError, MedKDError

    report = progress or (lambda fraction, stage: None)
    with tempfile.TemporaryDirectory(prefix="medkd-train-") as folder:
        spec_file, log = Path(folder) / "spec.json", Path(folder) / "stderr.txt"
        spec_file.write_text(json.dumps({**spec, "processes": 1}), encoding="utf-8")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "MedKDSegmentLib.jobs", str(spec_file)]
        library = str(Path(__file__).resolve().parents[1])
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join([library, *filter(None, [os.environ.get(
            "PYTHONPATH")])])}
        error = None
        with log.open("w") as errors, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True,
                                                       env=environment) as process:
            for line in process.stdout:
                event = json.loads(line) if line.startswith("{") else {}
                if event.get("event") == "progress":
                    report(event["fraction"], event["stage"])
                elif event.get("event") == "error":
                    error = event
                if cancel is not None and cancel():
                    process.terminate()  # torchrun forwards it to its processes
                    process.wait()
                    raise CancelledError()
        if error is not None:
            raise MedKDError(error["problem"], error["fix"])
        if process.returncode != 0:
            raise RuntimeError(f"Training in {processes} processes failed (exit {process.returncode}): "
                               f"{log.read_text(errors='replace')[-2000:]}")


def _train_in_this_process(spec_file: str) -> int:
    """One of ``_train_in_processes``'s processes (started by torchrun): the job data-parallel; the main process
    prints progress and a bad input's error as JSON lines."""
    import json

    from .engine.distributed import current, process_group
    from .engine.errors import MedKDError

    spec = json.loads(Path(spec_file).read_text(encoding="utf-8"))

    def send(event: dict) -> None:
        if current().main:
            print(json.dumps(event), flush=True)

    with process_group((spec.get("settings") or {}).get("device", "auto")):
        try:
            _train(spec["job"], spec, Path(spec["output"]), spec.get("user_folders") or (), bool(spec.get("resume")),
                   lambda fraction, stage: send({"event": "progress", "fraction": fraction, "stage": stage}), None)
        except MedKDError as error:
            send({"event": "error", "problem": error.problem, "fix": error.fix})
            return 2
    return 0


def _train(job, spec, output, user_folders, resume, progress, cancel):
    from .engine.profiles import Profile

    config, extras = training_config(spec.get("settings"))
    if job == "train_teacher":
        from .engine.training import train_teacher

        profile = Profile.from_dict(extras["profile"]) if extras.get("profile") else None
        bundle = train_teacher(spec["data"], output, spec["modality"], config, extras.get("architecture"), profile,
                               resume, progress, cancel, privileged=spec.get("privileged"))
        return bundle, None, config.epochs
    if job == "distill":
        from .engine.training import distill_chain, distill_student

        teachers = _teacher_paths(spec["teachers"], user_folders)
        weights = spec.get("weights") or None
        if spec.get("assistant"):
            from .engine.bundle import load_bundle

            bundle = distill_chain(spec["data"], teachers, output, config, extras.get("architecture"),
                                   extras.get("assistant_architecture"), assistant_output=runs.assistant_output(output),
                                   weights=weights, resume=resume, progress=progress, cancel=cancel)
            return bundle, load_bundle(runs.assistant_output(output)), config.epochs
        bundle = distill_student(spec["data"], teachers, output, config, extras.get("architecture"), resume,
                                 progress, cancel, weights=weights, privileged=spec.get("privileged"))
        return bundle, None, config.epochs
    from .engine.unpaired import PROTOTYPE_WEIGHT, distill_unpaired

    ct_teacher, mr_teacher = (_teacher_paths([spec[key]], user_folders)[0] if spec.get(key) else None
                              for key in ("ct_teacher", "mr_teacher"))
    bundle = distill_unpaired(spec["ct_data"], spec["mr_data"], output, ct_teacher, mr_teacher, config,
                              extras.get("architecture"), resume, progress, cancel,
                              prototype_weight=extras.get("prototype_weight", PROTOTYPE_WEIGHT))
    return bundle, None, config.epochs



# --- the same jobs on files (the worker's side of the protocol) ------------------------------------------


def _read_input(spec: dict) -> Volume:
    volume = read_volume(spec["input"])
    modality = spec.get("modality")
    volume.modality = normalize_modality(modality) if modality and modality != "auto" else detect_modality(volume)
    return volume


def run_spec(spec: dict, progress: Progress | None = None, cancel: Cancel | None = None,
             cache: NetworkCache | None = None) -> dict:
    """Execute one job spec (see ``worker.py``); outputs are written atomically, uncompressed (speed)."""
    job = spec.get("job")
    cache = cache if cache is not None else NetworkCache()
    user_folders = spec.get("user_folders") or ()
    if job == "segment":
        run = segment_volume(_read_input(spec), spec["model"], spec.get("device", "auto"), progress, cancel, cache,
                             user_folders)
        write_volume(run.labels, spec["output"], compress=False)
        return {"labels": str(spec["output"]), **run.summary()}
    if job == "compare":
        reference = read_volume(spec["reference"]) if spec.get("reference") else None
        result = compare_volume(_read_input(spec), spec["teacher"], spec["student"], reference,
                                spec.get("device", "auto"), progress, cancel, cache, user_folders,
                                hd95=spec.get("hd95", True))
        outputs: dict = {"rows": result["rows"]}
        for role in ("teacher", "student"):
            path = Path(spec["output_dir"]) / f"{role}.nrrd"
            write_volume(result[role].labels, path, compress=False)
            outputs[role] = {"labels": str(path), **result[role].summary()}
        return outputs
    if job == "finetune":
        return finetune_model(_read_cases(spec), spec["parent"], spec["output"], spec.get("settings"),
                              spec.get("teacher"), bool(spec.get("resume")), progress, cancel, user_folders)
    if job in TRAINING_JOBS:
        return train_model({**spec, "user_folders": user_folders}, progress, cancel)
    if job == "install-teacher":
        from .engine.published import install_teacher

        bundle = install_teacher(spec["name"], spec["models_dir"], spec.get("package_file"), progress)
        return {"name": bundle.name, "path": str(bundle.path), "parameters": bundle.parameters}
    if job == "import-teacher":
        from .engine.imported import import_teacher

        bundle = import_teacher(spec["path"], spec["models_dir"], spec.get("name"), progress, **spec.get("options", {}))
        return {"name": bundle.name, "path": str(bundle.path), "parameters": bundle.parameters}
    if job == "devices":
        from .engine.device import available_devices, describe_device, select_device

        return {"devices": available_devices(), "auto": describe_device(select_device("auto"))}
    known = ", ".join(["segment", "compare", "finetune", *TRAINING_JOBS, "install-teacher", "import-teacher",
                       "devices"])
    raise InvalidInputError(f"Unknown job '{job}'.", f"Use one of: {known}.")


if __name__ == "__main__":  # a process of a multi-process training job (``_train_in_processes``)
    import sys

    sys.exit(_train_in_this_process(sys.argv[1]))
