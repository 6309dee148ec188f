"""The module Logic's substance: MRML nodes in, NEW MRML nodes out.

Jobs run in-process (console, batch: ``segment``/``compare``) or in the warm worker process
(GUI: ``startSegment``/``startCompare`` return a ``BackgroundJob`` that a timer polls). Both use
the same job functions (``jobs.py``). The scene is touched only when a job has finished: a
failed or cancelled job leaves it exactly as it was, and the user's nodes are only ever read.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import slicer

from .. import catalog, jobs
from ..engine.errors import CancelledError, InvalidInputError, MedKDError
from ..engine.volume import Volume, normalize_modality, read_volume, write_volume
from ..worker import WorkerClient, WorkerError
from . import comparison, dependencies, segmentations, volumes

Progress = Callable[[float, str], None]
logger = logging.getLogger(__name__)


def worker_python() -> str:
    """The interpreter for the worker: ``MEDKD_WORKER_PYTHON`` if set; inside Slicer the real Python
    behind the ``PythonSlicer`` launcher (Slicer's environment is already set up, and stdin/stdout
    and cancel then reach the interpreter directly), else this interpreter."""
    override = os.environ.get("MEDKD_WORKER_PYTHON")
    if override:
        return override
    if dependencies.in_slicer_application():
        launcher = shutil.which("PythonSlicer")
        if launcher:
            real = Path(launcher).with_name("python-real" + (".exe" if os.name == "nt" else ""))
            return str(real if real.is_file() else launcher)
    return sys.executable


def result_name(volume_node, model_name: str) -> str:
    return f"{volume_node.GetName()} – {model_name}"


@dataclass
class ComparisonResult:
    """What *Compare* made (all new nodes) and the numbers behind the table."""

    teacherSegmentation: object
    studentSegmentation: object
    disagreementSegmentation: object
    structuresTable: object
    modelsTable: object
    rows: list[dict]
    runs: dict[str, dict]
    viewNodeIds: dict[str, str] = field(default_factory=dict)

    def nodes(self) -> list:
        return [self.teacherSegmentation, self.studentSegmentation, self.disagreementSegmentation,
                self.structuresTable, self.modelsTable]


class BackgroundJob:
    """One job in the worker. ``poll()`` (from a GUI timer) or ``wait()`` (console) drives it; the
    result nodes are created in the caller's thread, only after the worker is done."""

    def __init__(self, client: WorkerClient, spec: dict, finish: Callable[[dict], object], folder: str,
                 description: str) -> None:
        self.client = client
        self.spec = spec
        self.finish = finish
        self.folder = folder
        self.description = description
        self.state = "running"
        self.fraction = 0.0
        self.stage = "starting the worker" if client.ready is None else "queued"
        self.result = None
        self.error: dict | None = None
        self.outputs: dict | None = None
        self.history: collections.deque = collections.deque(maxlen=500)  # (fraction, stage) as reported
        self.started = time.perf_counter()
        self.seconds = 0.0
        self.id = client.submit(spec)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def poll(self) -> bool:
        """Handle what the worker sent; True while the job is still running."""
        if not self.running:
            return False
        for event in self.client.events():
            self._handle(event)
            if not self.running:
                break
        return self.running

    def _handle(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "ready":
            self.stage = "worker ready"
        elif kind == "progress" and event.get("id") == self.id:
            self.fraction, self.stage = float(event.get("fraction", 0.0)), str(event.get("stage", ""))
            self.history.append((self.fraction, self.stage))
        elif kind == "done" and event.get("id") == self.id:
            self.outputs = event.get("outputs", {})
            try:
                self.result = self.finish(self.outputs)
                self.state, self.fraction, self.stage = "done", 1.0, "done"
            except Exception as error:  # turning outputs into nodes failed: report like a worker error
                logger.exception("MedKDSegment: could not load the results")
                self.state = "error"
                self.error = _error_event(error)
            self._end()
        elif kind == "error" and event.get("id") in (self.id, None):
            self.state, self.error = "error", event
            self._end()
        elif kind == "cancelled" and event.get("id") == self.id:
            self.state = "cancelled"
            self._end()

    def _end(self) -> None:
        self.seconds = time.perf_counter() - self.started
        shutil.rmtree(self.folder, ignore_errors=True)  # inputs and outputs: nothing partial stays

    def cancel(self) -> None:
        """Stop now: the worker's process tree is killed; the scene stays exactly as it was."""
        if self.running:
            self.client.cancel()
            self.state, self.stage = "cancelled", "cancelled"
            self._end()

    def wait(self, timeout: float | None = None, progress: Progress | None = None):
        """Block until the job ends (console use); returns the result or raises ``MedKDError``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if progress is not None:
                progress(self.fraction, self.stage)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise MedKDError(f"{self.description} did not finish in {timeout} s.", "It was cancelled.")
            time.sleep(0.005)
        return self.raise_for_state()

    def raise_for_state(self):
        if self.state == "cancelled":
            raise CancelledError()
        if self.state == "error":
            raise MedKDError(self.error.get("problem") or self.error.get("message", "The job failed."),
                             self.error.get("fix", ""))
        return self.result


def _error_event(error: Exception) -> dict:
    if isinstance(error, MedKDError):
        return {"event": "error", "message": str(error), "problem": error.problem, "fix": error.fix,
                "type": type(error).__name__}
    return {"event": "error", "message": f"{type(error).__name__}: {error}", "type": type(error).__name__}


class SceneLogic:
    """Segment and compare MRML volume nodes with bundled or user models."""

    def __init__(self, userModelFolders: list | tuple = (), includeBundled: bool = True) -> None:
        self.userModelFolders = [str(f) for f in userModelFolders]
        self.includeBundled = includeBundled
        self._cache: jobs.NetworkCache | None = None
        self._worker: WorkerClient | None = None

    # models and devices ------------------------------------------------------------------------------

    def listModels(self, modality: str | None = None, role: str | None = None) -> list[catalog.ModelInfo]:
        models = catalog.list_models(self.userModelFolders, self.includeBundled)
        if modality:
            models = [m for m in models if m.modality == normalize_modality(modality)]
        return [m for m in models if role is None or m.role == role]

    def findModel(self, nameOrPath) -> catalog.ModelInfo:
        return catalog.find_model(nameOrPath, self.userModelFolders, self.includeBundled)

    def defaultModels(self, modality: str) -> tuple[catalog.ModelInfo | None, catalog.ModelInfo | None]:
        """(student, teacher) offered for a modality: the first student and the teacher it learned from."""
        models = self.listModels()
        student = catalog.default_model(normalize_modality(modality), "student", models)
        teacher = catalog.teacher_of(student, models) if student else \
            catalog.default_model(normalize_modality(modality), "teacher", models)
        return student, teacher

    def detectModality(self, volumeNode) -> tuple[str, str]:
        """(modality, source): 'DICOM' when the volume came from DICOM, else 'intensities'."""
        return volumes.detect_node_modality(volumeNode)

    def availableDevices(self) -> list[str]:
        """Devices torch can use here (imports torch: call it on demand, not at start-up)."""
        dependencies.ensure_dependencies()
        from ..engine.device import available_devices

        return available_devices()

    # preparing ---------------------------------------------------------------------------------------

    def _volume(self, volumeNode, modality: str | None) -> Volume:
        if volumeNode is None:
            raise InvalidInputError("No input volume is selected.", "Select a CT or MR volume.")
        if not modality or modality == "auto":
            modality, source = self.detectModality(volumeNode)
            logger.info("MedKDSegment: %s detected as %s from its %s", volumeNode.GetName(), modality, source)
        return volumes.volume_from_node(volumeNode, normalize_modality(modality))

    def _model(self, model, modality: str, role: str) -> catalog.ModelInfo:
        if model:
            return model if isinstance(model, catalog.ModelInfo) else self.findModel(model)
        found = catalog.default_model(modality, role, self.listModels())
        if found is None:
            raise InvalidInputError(f"No {modality} {role} model is installed.",
                                    "Add a model folder (Advanced) or reinstall the extension's models.")
        return found

    def _reference(self, referenceSegmentationNode, volumeNode, volume: Volume, names: dict) -> Volume | None:
        if referenceSegmentationNode is None:
            return None
        reference = segmentations.labels_from_segmentation(referenceSegmentationNode, volumeNode, names)
        if not reference.same_grid(volume):
            raise InvalidInputError("The reference segmentation could not be placed on the input volume's grid.",
                                    "Use a reference segmentation of this volume.")
        return reference

    @property
    def cache(self) -> jobs.NetworkCache:
        if self._cache is None:
            self._cache = jobs.NetworkCache()
        return self._cache

    # results -> nodes --------------------------------------------------------------------------------

    def _segmentationNode(self, volumeNode, labels, run: dict):
        names = {int(k): v for k, v in run["names"].items()}
        colors = {int(k): tuple(v) for k, v in run["colors"].items()}
        attributes = {"Model": run["model"], "Role": run["role"], "Device": run["device"],
                      "Seconds": f"{run['seconds']:.3f}", "Parameters": run["parameters"]}
        return segmentations.segmentation_from_labels(labels, volumeNode, result_name(volumeNode, run["model"]),
                                                      names, colors, attributes)

    def _comparisonNodes(self, volumeNode, labels: dict, runs: dict, rows: list, showLayout: bool,
                         surfaces: bool) -> ComparisonResult:
        created = []
        try:
            teacher = self._segmentationNode(volumeNode, labels["teacher"], runs["teacher"])
            created.append(teacher)
            student = self._segmentationNode(volumeNode, labels["student"], runs["student"])
            created.append(student)
            disagreement = segmentations.segmentation_from_labels(
                jobs.disagreement(labels["teacher"], labels["student"]), volumeNode,
                f"{volumeNode.GetName()} – teacher vs student disagreement",
                jobs.DISAGREEMENT_NAMES, jobs.DISAGREEMENT_COLORS,
                {"Teacher": runs["teacher"]["model"], "Student": runs["student"]["model"]})
            created.append(disagreement)
            title = f"{volumeNode.GetName()} – {runs['teacher']['model']} vs {runs['student']['model']}"
            structures = comparison.structures_table(title, rows)
            created.append(structures)
            models = comparison.models_table(f"{title} (models)", [runs["teacher"], runs["student"]])
            created.append(models)
            viewIds = comparison.show_comparison(volumeNode, teacher, student, disagreement, showLayout, surfaces) \
                if showLayout else {}
        except Exception:
            for node in created:
                slicer.mrmlScene.RemoveNode(node)
            raise
        return ComparisonResult(teacher, student, disagreement, structures, models, rows, runs, viewIds)

    # in-process (console, batch) ---------------------------------------------------------------------

    def segment(self, volumeNode, model=None, device: str = "auto", modality: str = "auto", useWorker: bool = False,
                progress: Progress | None = None, cancel: Callable[[], bool] | None = None):
        """Segment ``volumeNode`` and return a NEW segmentation node (blocking).

        ``model``: a name or bundle folder (default: the student for the volume's modality);
        ``device``: auto, cuda, mps or cpu; ``useWorker``: run in the worker process instead of here.
        """
        if useWorker:
            return self.startSegment(volumeNode, model, device, modality).wait(progress=progress)
        dependencies.ensure_dependencies()
        volume = self._volume(volumeNode, modality)
        info = self._model(model, volume.modality, "student")
        run = jobs.segment_volume(volume, info.path, device, progress, cancel, self.cache, self.userModelFolders)
        return self._segmentationNode(volumeNode, run.labels.array, run.summary())

    def compare(self, volumeNode, teacher=None, student=None, referenceSegmentationNode=None, device: str = "auto",
                modality: str = "auto", useWorker: bool = False, progress: Progress | None = None,
                cancel: Callable[[], bool] | None = None, showLayout: bool = True,
                surfaces: bool = True) -> ComparisonResult:
        """Teacher and student on one volume: two segmentation nodes, a disagreement segmentation, a
        per-structure table (and a models table), and the side-by-side layout (blocking)."""
        if useWorker:
            return self.startCompare(volumeNode, teacher, student, referenceSegmentationNode, device, modality,
                                     showLayout, surfaces).wait(progress=progress)
        dependencies.ensure_dependencies()
        volume = self._volume(volumeNode, modality)
        studentInfo, teacherInfo = self._pair(volume.modality, teacher, student)
        reference = self._reference(referenceSegmentationNode, volumeNode, volume, studentInfo.labels)
        result = jobs.compare_volume(volume, teacherInfo.path, studentInfo.path, reference, device, progress, cancel,
                                     self.cache, self.userModelFolders)
        labels = {role: result[role].labels.array for role in ("teacher", "student")}
        runs = {role: result[role].summary() for role in ("teacher", "student")}
        return self._comparisonNodes(volumeNode, labels, runs, result["rows"], showLayout, surfaces)

    def _pair(self, modality: str, teacher, student) -> tuple[catalog.ModelInfo, catalog.ModelInfo]:
        studentInfo = self._model(student, modality, "student")
        if teacher:
            return studentInfo, self._model(teacher, modality, "teacher")
        teacherInfo = catalog.teacher_of(studentInfo, self.listModels())
        if teacherInfo is None:
            raise InvalidInputError(f"No teacher model for {modality} is installed.", "Pick a teacher model.")
        return studentInfo, teacherInfo

    # in the worker (GUI) -----------------------------------------------------------------------------

    @property
    def worker(self) -> WorkerClient:
        if self._worker is None:
            self._worker = WorkerClient(python=worker_python())
        return self._worker

    def warmUpWorker(self) -> bool:
        """Start the worker in the background (when the dependencies are installed) so that the first job
        does not wait for torch's import; returns whether it was started."""
        if dependencies.missing_requirements():
            return False
        self.worker.start()
        return True

    def workerInfo(self) -> dict | None:
        """The worker's ``ready`` event (devices found, torch version), once it has started."""
        return self._worker.ready if self._worker is not None else None

    def shutdownWorker(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def _jobFolder(self) -> str:
        return tempfile.mkdtemp(prefix="MedKDSegment-")

    def startSegment(self, volumeNode, model=None, device: str = "auto", modality: str = "auto") -> BackgroundJob:
        """Start a segmentation in the worker; poll the returned job, its ``result`` is the new node."""
        dependencies.ensure_dependencies()
        self.worker.start()  # a cold worker imports torch while the input is being written
        volume = self._volume(volumeNode, modality)
        info = self._model(model, volume.modality, "student")
        folder = self._jobFolder()
        try:
            write_volume(volume, Path(folder) / "input.nrrd", compress=False)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        spec = {"job": "segment", "input": str(Path(folder) / "input.nrrd"), "modality": volume.modality,
                "model": str(info.path), "device": device, "output": str(Path(folder) / "labels.nrrd"),
                "user_folders": self.userModelFolders}

        def finish(outputs: dict):
            labels = read_volume(outputs["labels"])
            return self._segmentationNode(volumeNode, labels.array, outputs)

        return self._submit(spec, finish, folder, f"Segmentation with {info.name}")

    def startCompare(self, volumeNode, teacher=None, student=None, referenceSegmentationNode=None,
                     device: str = "auto", modality: str = "auto", showLayout: bool = True,
                     surfaces: bool = True) -> BackgroundJob:
        """Start a teacher/student comparison in the worker; the job's ``result`` is a ``ComparisonResult``."""
        dependencies.ensure_dependencies()
        self.worker.start()  # a cold worker imports torch while the input is being written
        volume = self._volume(volumeNode, modality)
        studentInfo, teacherInfo = self._pair(volume.modality, teacher, student)
        reference = self._reference(referenceSegmentationNode, volumeNode, volume, studentInfo.labels)
        folder = self._jobFolder()
        try:
            write_volume(volume, Path(folder) / "input.nrrd", compress=False)
            if reference is not None:
                write_volume(reference, Path(folder) / "reference.nrrd", compress=False)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        spec = {"job": "compare", "input": str(Path(folder) / "input.nrrd"), "modality": volume.modality,
                "teacher": str(teacherInfo.path), "student": str(studentInfo.path), "device": device,
                "reference": str(Path(folder) / "reference.nrrd") if reference is not None else None,
                "output_dir": folder, "user_folders": self.userModelFolders}

        def finish(outputs: dict) -> ComparisonResult:
            labels = {role: read_volume(outputs[role]["labels"]).array for role in ("teacher", "student")}
            runs = {role: outputs[role] for role in ("teacher", "student")}
            return self._comparisonNodes(volumeNode, labels, runs, outputs["rows"], showLayout, surfaces)

        return self._submit(spec, finish, folder, f"Comparison of {teacherInfo.name} and {studentInfo.name}")

    def _submit(self, spec: dict, finish, folder: str, description: str) -> BackgroundJob:
        try:
            return BackgroundJob(self.worker, spec, finish, folder, description)
        except (WorkerError, RuntimeError) as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise MedKDError(f"{description} could not start: {error}", "Retry; if it persists, restart Slicer.") \
                from error
