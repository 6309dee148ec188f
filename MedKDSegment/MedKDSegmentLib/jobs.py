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
from .engine.errors import InvalidInputError
from .engine.volume import Volume, detect_modality, normalize_modality, read_volume, write_volume

Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]
# Share of a comparison's progress bar: teacher, student, then the metrics.
COMPARE_SPLIT = (0.0, 0.5, 0.92, 1.0)


class NetworkCache:
    """Loaded networks by (bundle folder, weights sha256, device): a warm process skips loading them."""

    def __init__(self, max_items: int = 4) -> None:
        self.max_items = max_items
        self._items: OrderedDict = OrderedDict()

    def get(self, bundle, device: str):
        from .engine.device import select_device

        torch_device = select_device(device)
        key = (str(Path(bundle.path).resolve()), bundle.weights_sha256, str(torch_device))
        if key not in self._items:
            self._items[key] = bundle.load_network(torch_device)
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

    def summary(self) -> dict:
        """Everything but the labels, JSON-ready (label keys become strings in JSON)."""
        return {
            "model": self.model, "role": self.role, "device": self.device, "seconds": self.seconds,
            "stage_seconds": self.stage_seconds, "parameters": self.parameters, "windows": self.windows,
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
        parameters=bundle.parameters, windows=result.windows,
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
    if job == "devices":
        from .engine.device import available_devices, describe_device, select_device

        return {"devices": available_devices(), "auto": describe_device(select_device("auto"))}
    raise InvalidInputError(f"Unknown job '{job}'.", "Use one of: segment, compare, devices.")
