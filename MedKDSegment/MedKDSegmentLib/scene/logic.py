"""The module Logic's substance: MRML nodes in, NEW MRML nodes out.

Jobs run in-process (console, batch: ``segment``/``compare``/``fineTune``) or in the warm worker
process (GUI: ``startSegment``/``startCompare``/``startFineTune`` return a ``BackgroundJob`` that a
timer polls). Both use the same job functions (``jobs.py``). The scene is touched only when a job
has finished (fine-tuning adds its live loss curve when it starts): a failed or cancelled job
leaves it exactly as it was, and the user's nodes are only ever read.
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
from ..engine.errors import BundleError, CancelledError, InvalidInputError, MedKDError
from ..engine.locations import MODELS_DIR_ENV, user_models_dir
from ..engine.volume import Volume, normalize_modality, read_volume, write_volume
from ..worker import WorkerClient, WorkerError
from . import comparison, dependencies, finetune, segmentations, training, volumes
from .finetune import FineTuneReport
from .training import TrainingReport

Progress = Callable[[float, str], None]
logger = logging.getLogger(__name__)


def default_models_folder() -> Path:
    """Where the user's own models (fine-tuned versions, fetched teachers) go when no *User models* folder
    is set. ``$MEDKDSEGMENT_MODELS_DIR`` if set; in Slicer ``MedKDSegment/Models`` beside the user settings
    file (per user, kept across Slicer versions); else the engine's ``user_models_dir``."""
    if os.environ.get(MODELS_DIR_ENV) or not dependencies.in_slicer_application():
        return user_models_dir()
    return Path(slicer.app.slicerUserSettingsFilePath).parent / "MedKDSegment" / "Models"


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
    return f"{volume_node.GetName()} - {model_name}"


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
                 description: str, on_progress: Progress | None = None,
                 on_abort: Callable[[], None] | None = None) -> None:
        self.client = client
        self.spec = spec
        self.kind = str(spec.get("job", ""))
        self.finish = finish
        self.folder = folder
        self.description = description
        self.on_progress = on_progress  # e.g. the live loss curve (called in the polling thread)
        self.on_abort = on_abort  # undoes what the job added at its start, on error or cancel
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
            if self.on_progress is not None:
                try:
                    self.on_progress(self.fraction, self.stage)
                except Exception:  # a display problem must not break the job
                    logger.exception("MedKDSegment: progress display failed")
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
        if self.state != "done" and self.on_abort is not None:
            try:
                self.on_abort()
            except Exception:
                logger.exception("MedKDSegment: could not clean up after the job")

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

    def __init__(self, userModelFolders: list | tuple = (), includeBundledModels: bool = True) -> None:
        self.userModelFolders = [str(f) for f in userModelFolders]
        self.includeBundledModels = includeBundledModels
        self._cache: jobs.NetworkCache | None = None
        self._worker: WorkerClient | None = None

    # models and devices ------------------------------------------------------------------------------

    def setUserModelFolders(self, folders) -> None:
        """Where the user's models live (the first one also receives new models); empty: the default folder."""
        self.userModelFolders = [str(folder) for folder in folders if folder]

    def modelFolders(self) -> list[str]:
        """The user model folders, or the default one (``default_models_folder``) when none is set."""
        return list(self.userModelFolders) or [str(default_models_folder())]

    def modelsFolder(self) -> Path:
        """Where new model versions are written: the first user model folder (else the default one)."""
        return Path(self.modelFolders()[0])

    def listModels(self, modality: str | None = None, role: str | None = None) -> list[catalog.ModelInfo]:
        models = catalog.list_models(self.modelFolders(), self.includeBundledModels)
        if modality:  # a CT+MR model serves both
            return catalog.models_for(normalize_modality(modality), models, role)
        return [m for m in models if role is None or m.role == role]

    def modelsFor(self, modality: str, role: str, models: list[catalog.ModelInfo]) -> list[catalog.ModelInfo]:
        """The models of ``role`` among ``models`` that segment ``modality`` (a CT+MR model serves both)."""
        return catalog.models_for(modality, models, role)

    def findModel(self, nameOrPath) -> catalog.ModelInfo:
        return catalog.find_model(nameOrPath, self.modelFolders(), self.includeBundledModels)

    def defaultModels(self, modality: str) -> tuple[catalog.ModelInfo | None, catalog.ModelInfo | None]:
        """(student, teacher) offered for a modality: the first student and the teacher it learned from."""
        models = self.listModels()
        student = catalog.default_model(normalize_modality(modality), "student", models)
        teacher = catalog.teacher_of(student, models, modality) if student else \
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
        if run.get("warnings"):  # the scan looks outside the model's world: kept with the result
            attributes["Warning"] = " ".join(run["warnings"])
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
                f"{volumeNode.GetName()} - teacher vs student disagreement",
                jobs.DISAGREEMENT_NAMES, jobs.DISAGREEMENT_COLORS,
                {"Teacher": runs["teacher"]["model"], "Student": runs["student"]["model"]})
            created.append(disagreement)
            pair = f"{runs['teacher']['model']} vs {runs['student']['model']}"
            structures = comparison.structures_table(f"{volumeNode.GetName()} - structures, {pair}", rows)
            created.append(structures)
            models = comparison.models_table(f"{volumeNode.GetName()} - models, {pair}",
                                             [runs["teacher"], runs["student"]])
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
        run = jobs.segment_volume(volume, info.path, device, progress, cancel, self.cache, self.modelFolders())
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
                                     self.cache, self.modelFolders())
        labels = {role: result[role].labels.array for role in ("teacher", "student")}
        runs = {role: result[role].summary() for role in ("teacher", "student")}
        return self._comparisonNodes(volumeNode, labels, runs, result["rows"], showLayout, surfaces)

    def _pair(self, modality: str, teacher, student) -> tuple[catalog.ModelInfo, catalog.ModelInfo]:
        studentInfo = self._model(student, modality, "student")
        if teacher:
            return studentInfo, self._model(teacher, modality, "teacher")
        teacherInfo = catalog.teacher_of(studentInfo, self.listModels(), modality)
        if teacherInfo is None:
            raise InvalidInputError(
                f"No {modality} teacher that labels the structures of '{studentInfo.name}' is installed "
                f"(it learned from '{studentInfo.teacher}').",
                "Pick a teacher model, or get its teacher ('Get teacher models…', 'medkd teachers get').")
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
                "user_folders": self.modelFolders()}

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
                "output_dir": folder, "user_folders": self.modelFolders()}

        def finish(outputs: dict) -> ComparisonResult:
            labels = {role: read_volume(outputs[role]["labels"]).array for role in ("teacher", "student")}
            runs = {role: outputs[role] for role in ("teacher", "student")}
            return self._comparisonNodes(volumeNode, labels, runs, outputs["rows"], showLayout, surfaces)

        return self._submit(spec, finish, folder, f"Comparison of {teacherInfo.name} and {studentInfo.name}")

    def _submit(self, spec: dict, finish, folder: str, description: str, on_progress: Progress | None = None,
                on_abort: Callable[[], None] | None = None) -> BackgroundJob:
        try:
            return BackgroundJob(self.worker, spec, finish, folder, description, on_progress, on_abort)
        except (WorkerError, RuntimeError) as error:
            shutil.rmtree(folder, ignore_errors=True)
            if on_abort is not None:
                on_abort()
            raise MedKDError(f"{description} could not start: {error}", "Retry; if it persists, restart Slicer.") \
                from error

    # published teachers ------------------------------------------------------------------------------

    def publishedTeachers(self) -> list[dict]:
        """The published teachers MedKDSegment can fetch (name, title, task, modality, labels, download
        size, licence, citation, whether installed in the models folder); no torch needed."""
        from ..engine.published import PUBLISHED_TEACHERS

        folder = self.modelsFolder()
        return [{**teacher.row(folder), "title": teacher.title, "citation": teacher.citation,
                 "folder": str(folder)} for teacher in PUBLISHED_TEACHERS.values()]

    def startInstallTeacher(self, name: str, packageFile=None) -> BackgroundJob:
        """Fetch (or take ``packageFile``), verify and convert a published teacher into the models folder,
        in the worker; the job's ``result`` is the new model's ``ModelInfo``."""
        dependencies.ensure_dependencies()
        return self._submit(self._installSpec(name, packageFile), lambda outputs: self.findModel(outputs["path"]),
                            self._jobFolder(), f"Installing teacher {name}")

    def installTeacher(self, name: str, packageFile=None, progress: Progress | None = None) -> catalog.ModelInfo:
        """``startInstallTeacher`` in this process (blocking): the console's and batch scripts' way."""
        dependencies.ensure_dependencies()
        return self.findModel(jobs.run_spec(self._installSpec(name, packageFile), progress)["path"])

    def _installSpec(self, name: str, packageFile) -> dict:
        return {"job": "install-teacher", "name": name, "models_dir": str(self.modelsFolder()),
                "package_file": str(packageFile) if packageFile else None}

    def startImportTeacher(self, path, name: str | None = None, **options) -> BackgroundJob:
        """Make a teacher of the user's nnU-Net v2 folder, MONAI bundle or TorchScript file (``options``:
        ``configuration``, ``folds``, ``checkpoint``; ``modality``; ``config`` and ``sha256``) in the worker;
        the job's ``result`` is the new model's ``ModelInfo``. The source is only read."""
        dependencies.ensure_dependencies()
        return self._submit(self._importSpec(path, name, options), lambda outputs: self.findModel(outputs["path"]),
                            self._jobFolder(), f"Importing teacher {Path(path).name}")

    def importTeacher(self, path, name: str | None = None, progress: Progress | None = None,
                      **options) -> catalog.ModelInfo:
        """``startImportTeacher`` in this process (blocking): the console's and batch scripts' way."""
        dependencies.ensure_dependencies()
        return self.findModel(jobs.run_spec(self._importSpec(path, name, options), progress)["path"])

    def _importSpec(self, path, name: str | None, options: dict) -> dict:
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
        return {"job": "import-teacher", "path": str(path), "name": name, "models_dir": str(self.modelsFolder()),
                "options": options}

    def importBundle(self, archive) -> catalog.ModelInfo:
        """Import a zipped model bundle into the models folder (checked before it lands; never replaces)."""
        dependencies.ensure_dependencies()
        from ..engine.bundle import extract_bundle_archive

        folder = self.modelsFolder()
        folder.mkdir(parents=True, exist_ok=True)
        return self.findModel(extract_bundle_archive(archive, folder).path)

    # fine-tuning -------------------------------------------------------------------------------------

    def matchSegments(self, segmentationNode, model=None, mapping: dict | None = None, skip=(),
                      modality: str = "CT"):
        """How the segments of ``segmentationNode`` map to ``model``'s structures (``SegmentMatch``:
        ``matched`` name -> label value, ``unknown`` and ``skipped`` names); nothing is changed."""
        dependencies.ensure_dependencies()
        info = self._model(model, normalize_modality(modality), "student")
        return finetune.match_segments(segmentationNode, info.labels, mapping, skip)

    def segmentNames(self, segmentationNode) -> list[str]:
        """The names of a segmentation's segments, in order (the node is only read)."""
        return list(segmentations.segment_names(segmentationNode).values())

    def matchSegmentNames(self, names, model) -> dict[str, str]:
        """{segment name: structure name} for the ``names`` that match ``model``'s structures by name."""
        names = list(names)
        if not names:
            return {}
        dependencies.ensure_dependencies()
        info = self._modelInfo(model)
        match = finetune.match_names(names, info.labels)
        return {name: info.labels[value] for name, value in match.matched.items()}

    def newVersionPath(self, model) -> Path:
        """Where ``fineTune`` writes the next version of ``model`` by default (in ``modelsFolder()``)."""
        dependencies.ensure_dependencies()
        from ..engine.finetune import default_version_path

        return default_version_path(jobs.load_model(self._modelInfo(model).path), self.modelsFolder())

    def interruptedFineTune(self, model) -> Path | None:
        """The output of a killed or cancelled fine-tuning run of ``model`` that can be resumed (its
        checkpoint is in a models folder), the newest if several; None if there is none. No torch needed."""
        runs = finetune.interrupted_runs(self.modelFolders(), self._modelInfo(model).sha256)
        return runs[0] if runs else None

    def discardInterruptedFineTune(self, model) -> bool:
        """Delete the checkpoint of ``model``'s interrupted run (the next *Start* begins afresh)."""
        output = self.interruptedFineTune(model)
        if output is None:
            return False
        from ..engine.finetune import discard_checkpoint

        return discard_checkpoint(output)

    def listModelVersions(self, model) -> list[catalog.ModelInfo]:
        """``model``'s family: its first installed ancestor and every version fine-tuned from it
        (parents before children). Each entry has ``name``, ``version``, ``parent`` and ``source``."""
        models = self.listModels()
        return catalog.model_versions(self._modelInfo(model), models)

    def deleteModel(self, model) -> list[str]:
        """Delete one of the user's own model versions (bundled models are refused with a clear message).
        Returns warnings (versions fine-tuned from it keep working; their lineage ends here)."""
        info = self._modelInfo(model)
        if self.isBundled(info):
            raise BundleError(f"'{info.name}' is a bundled model; bundled models cannot be deleted.",
                              "Delete only models you made (fine-tuned versions); pick another model instead.")
        dependencies.ensure_dependencies()
        from ..engine.finetune import delete_user_model

        return delete_user_model(info.path, catalog.bundled_models_dir())

    def isBundled(self, model) -> bool:
        info = self._modelInfo(model)
        return info.source == "bundled" or Path(info.path).resolve().is_relative_to(
            catalog.bundled_models_dir().resolve())

    def _modelInfo(self, model) -> catalog.ModelInfo:
        if model is None:
            raise InvalidInputError("No model was given.", "Pick a model (name or bundle folder).")
        return model if isinstance(model, catalog.ModelInfo) else self.findModel(model)

    def fineTune(self, pairs, model=None, output=None, epochs: int | None = None, minutes: float | None = None,
                 mapping: dict | None = None, skip=(), device: str = "auto", useWorker: bool = False,
                 progress: Progress | None = None, cancel: Callable[[], bool] | None = None, resume: bool = False,
                 teacher=None, modality: str = "auto", settings: dict | None = None,
                 showChart: bool = True) -> FineTuneReport:
        """Fine-tune ``model`` (default: the student for the volumes' modality) on the user's
        annotations and write a NEW model version with a parent link (blocking).

        ``pairs``: ``[(volumeNode, segmentationNode), ...]`` (one pair alone is fine). Segments are
        matched to the model's structures by name; ``mapping`` (segment name -> structure name or
        label value, or None to skip) and ``skip`` (names, or True for every unknown name) handle the
        rest. Only matched structures count as annotated. ``epochs`` and ``minutes`` bound the run;
        ``output`` is the new bundle folder (default: ``newVersionPath(model)``); ``resume`` continues
        the interrupted run (``interruptedFineTune(model)``); ``settings`` sets other ``FineTuneConfig``
        fields. Returns a ``FineTuneReport`` (new version, loss curve, before/after Dice table, warning).
        """
        if useWorker:
            return self.startFineTune(pairs, model, output, epochs, minutes, mapping, skip, device, resume, teacher,
                                      modality, settings, showChart).wait(progress=progress)
        dependencies.ensure_dependencies()
        plan = self._fineTunePlan(pairs, model, output, epochs, minutes, mapping, skip, device, resume, teacher,
                                  modality, settings)
        curve = finetune.LossCurve(plan["title"])
        try:
            if showChart:
                curve.show()

            def report(fraction: float, stage: str) -> None:
                curve.update(stage)
                if progress is not None:
                    progress(fraction, stage)

            outputs = jobs.finetune_model([pair.case() for pair in plan["pairs"]], plan["parent"].path,
                                          plan["output"], plan["settings"], plan["teacher"], resume, report, cancel,
                                          self.modelFolders())
            return self._fineTuneReport(plan, curve, outputs)
        except BaseException:
            curve.remove()  # a failed or cancelled run leaves no node and no model
            raise

    def startFineTune(self, pairs, model=None, output=None, epochs: int | None = None, minutes: float | None = None,
                      mapping: dict | None = None, skip=(), device: str = "auto", resume: bool = False, teacher=None,
                      modality: str = "auto", settings: dict | None = None, showChart: bool = True) -> BackgroundJob:
        """``fineTune`` in the worker process: poll the returned job (its loss curve fills in as epochs
        end); its ``result`` is a ``FineTuneReport``. Cancel kills the worker: no model is written, the
        checkpoint of the last full epoch stays for ``resume=True``."""
        dependencies.ensure_dependencies()
        self.worker.start()  # a cold worker imports torch while the inputs are being written
        plan = self._fineTunePlan(pairs, model, output, epochs, minutes, mapping, skip, device, resume, teacher,
                                  modality, settings)
        folder = self._jobFolder()
        cases = []
        try:
            for index, pair in enumerate(plan["pairs"]):
                image, labels = Path(folder) / f"image-{index}.nrrd", Path(folder) / f"labels-{index}.nrrd"
                write_volume(pair.image, image, compress=False)
                write_volume(pair.labels, labels, compress=False)
                cases.append({"name": pair.name, "image": str(image), "labels": str(labels),
                              "annotated": sorted(pair.annotated), "modality": pair.image.modality})
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        spec = {"job": "finetune", "parent": str(plan["parent"].path), "output": str(plan["output"]),
                "cases": cases, "settings": plan["settings"], "resume": bool(resume),
                "teacher": str(plan["teacher"]) if plan["teacher"] else None, "user_folders": self.modelFolders()}
        curve = finetune.LossCurve(plan["title"])
        if showChart:
            curve.show()

        def finish(outputs: dict) -> FineTuneReport:
            return self._fineTuneReport(plan, curve, outputs)

        return self._submit(spec, finish, folder, f"Fine-tuning of {plan['parent'].name}",
                            on_progress=lambda fraction, stage: curve.update(stage), on_abort=curve.remove)

    def _fineTunePlan(self, pairs, model, output, epochs, minutes, mapping, skip, device, resume, teacher, modality,
                      settings) -> dict:
        """Check everything and export the annotations before any training starts."""
        if isinstance(pairs, tuple) and len(pairs) == 2 and not isinstance(pairs[0], (tuple, list)):
            pairs = [pairs]  # one (volume, segmentation) pair
        pairs = list(pairs or [])
        if not pairs:
            raise InvalidInputError("No (volume, segmentation) pair was given.",
                                    "Add at least one volume with a segmentation drawn on it.")
        first = pairs[0][0]
        if first is None:
            raise InvalidInputError("A fine-tuning pair has no volume.", "Pick the volume of each segmentation.")
        if not modality or modality == "auto":
            modality = self.detectModality(first)[0]
        modality = normalize_modality(modality)
        parent = self._model(model, modality, "student")
        teacherInfo = self._modelInfo(teacher) if teacher else None
        if resume and output is None:
            output = self.interruptedFineTune(parent)
            if output is None:
                raise InvalidInputError(f"There is no interrupted fine-tuning run of '{parent.name}' to resume.",
                                        "Start a new run instead.")
        output = Path(output) if output else self.newVersionPath(parent)
        prepared = [finetune.prepare_pair(volume, segmentation, parent.labels, modality, mapping, skip)
                    for volume, segmentation in pairs]
        for pair in prepared:
            if pair.empty:
                logger.warning("MedKDSegment: in '%s', %s matched but hold no voxel on the volume", pair.name,
                               ", ".join(pair.empty))
        options = {"epochs": epochs, "device": device,
                   "time_budget_s": None if not minutes else float(minutes) * 60.0, **(settings or {})}
        jobs.finetune_config(options)  # unknown settings are refused now, not in the worker
        return {"parent": parent, "teacher": teacherInfo.path if teacherInfo else None, "output": output,
                "pairs": prepared, "settings": options, "title": f"{output.name} (from {parent.name})"}

    def _fineTuneReport(self, plan: dict, curve: finetune.LossCurve, outputs: dict) -> FineTuneReport:
        curve.replace(list(outputs["epoch_loss"]))  # exactly one row per epoch, a resumed run's earlier ones too
        rows = finetune.dice_rows(outputs["before"], outputs["after"], outputs["worse"])
        title = f"{outputs['name']} vs {plan['parent'].name} - held-out Dice"
        table = finetune.dice_table(title, rows, outputs["mean_before"], outputs["mean_after"])
        warning = finetune.worse_warning(outputs["worse"], outputs["mean_before"], outputs["mean_after"])
        table.SetAttribute("MedKDSegment.HeldOut", outputs["held_out"])
        if warning:
            table.SetAttribute("MedKDSegment.Warning", warning)
            logger.warning("MedKDSegment: %s", warning)
        model = catalog.read_model_info(outputs["bundle"], "user")
        return FineTuneReport(
            model=model, parent=plan["parent"], lossCurve=curve, diceTable=table, rows=rows,
            before=outputs["before"], after=outputs["after"], worse=list(outputs["worse"]),
            meanBefore=outputs["mean_before"], meanAfter=outputs["mean_after"], heldOut=outputs["held_out"],
            epochLoss=list(outputs["epoch_loss"]), secondsPerEpoch=outputs["seconds_per_epoch"],
            stoppedByBudget=bool(outputs.get("stopped_by_budget")), warning=warning, outputs=outputs)

    # training: teachers, distilled students, one CT+MR student ---------------------------------------

    def distillationMethods(self, install: bool = True) -> list[dict]:
        """The engine's distillation methods (``medkd methods``): one dict per method with ``name``,
        ``description``, ``default_weight``, ``needs_teacher`` and ``defaults``. Imports torch;
        ``install=False`` returns [] instead of offering to install missing dependencies."""
        if not install and dependencies.missing_requirements():
            return []
        dependencies.ensure_dependencies()
        from ..engine.distillation import describe_methods
        from ..engine.training import TrainingConfig

        return describe_methods(TrainingConfig())

    def trainTeacher(self, dataFolder, modality: str = "CT", output=None, epochs: int | None = None,
                     minutes: float | None = None, device: str = "auto", useWorker: bool = False,
                     progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
                     settings: dict | None = None, showChart: bool = True) -> TrainingReport:
        """Train a teacher (supervised Dice + CE) on a folder of ``images/`` and ``labels/`` (blocking).

        The new model goes to ``modelsFolder()`` as ``output`` (a name; default: a new name from the
        folder's) and is never written over an existing one. ``epochs`` and ``minutes`` bound the run;
        ``settings`` sets other ``TrainingConfig`` fields (and ``architecture``, ``profile``). Returns a
        ``TrainingReport`` (the new model, now in ``listModels()``, and the loss curve)."""
        spec = self._teacherSpec(dataFolder, modality, output, epochs, minutes, device, settings)
        return self._train(spec, useWorker, progress, cancel, showChart)

    def startTrainTeacher(self, dataFolder, modality: str = "CT", output=None, epochs: int | None = None,
                          minutes: float | None = None, device: str = "auto", settings: dict | None = None,
                          showChart: bool = True) -> BackgroundJob:
        """``trainTeacher`` in the worker process; poll the returned job (its loss curve fills in)."""
        return self._startTraining(self._teacherSpec(dataFolder, modality, output, epochs, minutes, device,
                                                     settings), showChart)

    def distillStudent(self, dataFolder, teachers=None, weights=None, methods="kd", assistant: bool = False,
                       output=None, epochs: int | None = None, minutes: float | None = None,
                       temperature: float | None = None, device: str = "auto", useWorker: bool = False,
                       progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
                       settings: dict | None = None, showChart: bool = True) -> TrainingReport:
        """Distil a student from one or several teachers on a folder of ``images/`` (+ ``labels/``) (blocking).

        ``teachers``: model names, folders or ``ModelInfo``s (one alone is fine), mixed with ``weights``
        (default: equal). ``methods``: an engine method string ("kd", "cwd+coteacher", "kd:1+dist:0.5",
        see ``distillationMethods()``) or {method: weight}. ``assistant``: teacher(s) -> a mid-size
        assistant (saved as ``<output>-assistant``) -> the student. ``temperature``: the KD temperature.
        The bundle records the methods, the teachers with their weights and the chain."""
        spec = self._studentSpec(dataFolder, teachers, weights, methods, assistant, output, epochs, minutes,
                                 temperature, device, settings)
        return self._train(spec, useWorker, progress, cancel, showChart)

    def startDistillStudent(self, dataFolder, teachers=None, weights=None, methods="kd", assistant: bool = False,
                            output=None, epochs: int | None = None, minutes: float | None = None,
                            temperature: float | None = None, device: str = "auto", settings: dict | None = None,
                            showChart: bool = True) -> BackgroundJob:
        """``distillStudent`` in the worker process; poll the returned job (its loss curve fills in)."""
        return self._startTraining(self._studentSpec(dataFolder, teachers, weights, methods, assistant, output,
                                                     epochs, minutes, temperature, device, settings), showChart)

    def distillUnpaired(self, ctFolder, mrFolder, ctTeacher=None, mrTeacher=None, output=None,
                        epochs: int | None = None, minutes: float | None = None, temperature: float | None = None,
                        device: str = "auto", useWorker: bool = False, progress: Progress | None = None,
                        cancel: Callable[[], bool] | None = None, settings: dict | None = None,
                        showChart: bool = True, methods="kd") -> TrainingReport:
        """One student for CT and MR from unpaired CT and MR folders (Dou et al. 2020: shared kernels,
        normalisation per modality), each modality also learning from its teacher when given, with the
        distillation ``methods`` (as for ``distillStudent``; default pixel KD) (blocking)."""
        spec = self._unpairedSpec(ctFolder, mrFolder, ctTeacher, mrTeacher, output, epochs, minutes, temperature,
                                  device, settings, methods)
        return self._train(spec, useWorker, progress, cancel, showChart)

    def startDistillUnpaired(self, ctFolder, mrFolder, ctTeacher=None, mrTeacher=None, output=None,
                             epochs: int | None = None, minutes: float | None = None,
                             temperature: float | None = None, device: str = "auto", settings: dict | None = None,
                             showChart: bool = True, methods="kd") -> BackgroundJob:
        """``distillUnpaired`` in the worker process; poll the returned job (its loss curve fills in)."""
        return self._startTraining(self._unpairedSpec(ctFolder, mrFolder, ctTeacher, mrTeacher, output, epochs,
                                                      minutes, temperature, device, settings, methods), showChart)

    def interruptedTrainings(self) -> list[Path]:
        """Outputs of killed or cancelled training runs in the models folders, newest first (no torch needed)."""
        return training.interrupted_trainings(self.modelFolders())

    def resumeTraining(self, output=None, useWorker: bool = False, progress: Progress | None = None,
                       cancel: Callable[[], bool] | None = None, showChart: bool = True) -> TrainingReport:
        """Continue an interrupted run (default: the newest) from its last finished epoch, with the data,
        teachers and settings it was started with; the result equals an uninterrupted run."""
        return self._train(self._resumeSpec(output), useWorker, progress, cancel, showChart)

    def startResumeTraining(self, output=None, showChart: bool = True) -> BackgroundJob:
        """``resumeTraining`` in the worker process."""
        return self._startTraining(self._resumeSpec(output), showChart)

    def discardInterruptedTraining(self, output=None) -> bool:
        """Delete an interrupted run's checkpoints (default: the newest run); finished models are kept."""
        runs = self.interruptedTrainings()
        output = Path(output) if output else (runs[0] if runs else None)
        return training.discard_run(output) if output is not None else False

    def _resumeSpec(self, output) -> dict:
        runs = self.interruptedTrainings()
        if output is None:
            if not runs:
                raise InvalidInputError("There is no interrupted training run to resume.", "Start a new run instead.")
            output = runs[0]
        output = Path(output) if "/" in str(output) or "\\" in str(output) else self.modelsFolder() / str(output)
        spec = training.training_record(output)
        spec.update(resume=True, output=str(output), user_folders=self.modelFolders())
        dependencies.ensure_dependencies()
        jobs.check_training_spec(spec)
        return spec

    def _trainingSpec(self, job: str, output, defaultName: str, epochs, minutes, temperature, device, settings,
                      chain: bool = False, **fields) -> dict:
        """Check everything before anything is written, and name the output (a new name in ``modelsFolder()``)."""
        options = {"epochs": epochs, "device": device, "kd_temperature": temperature,
                   "time_budget_s": float(minutes) * 60.0 if minutes else None, **(settings or {})}
        path = training.output_path(self.modelsFolder(), output, defaultName, chain)
        # "auto": one process per GPU when the machine has several (torchrun, engine.distributed), else one.
        spec = {"job": job, "output": str(path), "settings": {k: v for k, v in options.items() if v is not None},
                "user_folders": self.modelFolders(), "processes": "auto", **fields}
        dependencies.ensure_dependencies()
        jobs.check_training_spec(spec)  # unknown settings, method typos, weights: refused now, not in the worker
        return spec

    def _teacherSpec(self, dataFolder, modality, output, epochs, minutes, device, settings) -> dict:
        data = training.check_data_folder(dataFolder)
        modality = normalize_modality(modality)
        return self._trainingSpec("train_teacher", output, self._defaultName(data, modality, "teacher"), epochs,
                                  minutes, None, device, settings, data=str(data), modality=modality)

    def _studentSpec(self, dataFolder, teachers, weights, methods, assistant, output, epochs, minutes, temperature,
                     device, settings) -> dict:
        data = training.check_data_folder(dataFolder)
        if teachers is None or isinstance(teachers, (str, os.PathLike, catalog.ModelInfo)):
            teachers = [teachers] if teachers else []
        infos = [self._modelInfo(t) for t in teachers]
        if not infos:
            raise InvalidInputError("No teacher was given.", "Pick at least one teacher model to distil from.")
        modalities = {info.modality for info in infos}
        if len(modalities) > 1:
            raise InvalidInputError(f"The teachers are for different modalities ({', '.join(sorted(modalities))}).",
                                    "Mix only teachers of one modality (for CT and MR, distil a CT+MR student).")
        if weights is not None and len(list(weights)) != len(infos):
            raise InvalidInputError(f"{len(list(weights))} teacher weights for {len(infos)} teachers.",
                                    "Give one weight per teacher, or none (equal weights).")
        if not isinstance(methods, str):
            methods = training.method_string(methods)
        return self._trainingSpec(
            "distill", output, self._defaultName(data, infos[0].modality, "student"), epochs, minutes, temperature,
            device, {"methods": methods, **(settings or {})}, bool(assistant), data=str(data),
            teachers=[str(info.path) for info in infos], weights=[float(w) for w in weights] if weights else None,
            assistant=bool(assistant))

    def _unpairedSpec(self, ctFolder, mrFolder, ctTeacher, mrTeacher, output, epochs, minutes, temperature, device,
                      settings, methods="kd") -> dict:
        ct = training.check_data_folder(ctFolder, "CT data folder")
        mr = training.check_data_folder(mrFolder, "MR data folder")
        paths = {}
        for key, teacher, modality in (("ct_teacher", ctTeacher, "CT"), ("mr_teacher", mrTeacher, "MR")):
            info = self._modelInfo(teacher) if teacher else None
            if info is not None and not info.serves(modality):
                raise InvalidInputError(f"'{info.name}' is a {info.modality} model, not a {modality} teacher.",
                                        f"Pick a {modality} teacher (or none) for the {modality} data.")
            paths[key] = str(info.path) if info is not None else None
        if not isinstance(methods, str):
            methods = training.method_string(methods)
        return self._trainingSpec("distill_unpaired", output, self._defaultName(ct, "CT+MR", "student"), epochs,
                                  minutes, temperature, device, {"methods": methods, **(settings or {})},
                                  ct_data=str(ct), mr_data=str(mr), **paths)

    @staticmethod
    def _defaultName(data: Path, modality: str, role: str) -> str:
        """'<data folder>-<modality>-<role>', each modality named once: 'abdomen-ct-teacher', 'ct-mr-student'."""
        tags = [training.slug(m) for m in modality.split("+")]
        return "-".join([p for p in training.slug(data.name).split("-") if p not in tags] + tags + [role])

    def _train(self, spec: dict, useWorker: bool, progress, cancel, showChart: bool) -> TrainingReport:
        if useWorker:
            return self._startTraining(spec, showChart).wait(progress=progress)
        curve = training.TrainingCurve(Path(spec["output"]).name, bool(spec.get("assistant")))
        try:
            if showChart:
                curve.show()

            def report(fraction: float, stage: str) -> None:
                curve.update(stage)
                if progress is not None:
                    progress(fraction, stage)

            return self._trainingReport(spec, curve, jobs.train_model(spec, report, cancel))
        except BaseException:
            curve.remove()  # a failed or cancelled run leaves no node and no model
            raise

    def _startTraining(self, spec: dict, showChart: bool) -> BackgroundJob:
        self.worker.start()  # a cold worker imports torch while the scene is prepared
        folder = self._jobFolder()  # the job's private folder (training needs no temporary files)
        output = Path(spec["output"])
        curve = training.TrainingCurve(output.name, bool(spec.get("assistant")))
        if showChart:
            curve.show()

        def finish(outputs: dict) -> TrainingReport:
            return self._trainingReport(spec, curve, outputs)

        def abort() -> None:
            curve.remove()
            training.discard_if_unstarted(output, bool(spec.get("assistant")))  # a killed worker cannot clean up

        what = {"train_teacher": "Training of teacher", "distill": "Distillation of",
                "distill_unpaired": "CT+MR distillation of"}[spec["job"]]
        return self._submit(spec, finish, folder, f"{what} {output.name}",
                            on_progress=lambda fraction, stage: curve.update(stage), on_abort=abort)

    def _trainingReport(self, spec: dict, curve: training.TrainingCurve, outputs: dict) -> TrainingReport:
        assistant = outputs.get("assistant") or {}
        curve.replace(list(outputs["epoch_loss"]), assistant.get("epoch_loss"))
        task = {job: task for task, job in training.TASKS.items()}[spec["job"]]
        return TrainingReport(
            model=catalog.read_model_info(outputs["bundle"], "user"), task=task, methods=str(outputs["methods"]),
            teachers=list(outputs["teachers"]), lossCurve=curve, epochLoss=list(outputs["epoch_loss"]),
            stoppedByBudget=bool(outputs["stopped_by_budget"]), validationDice=dict(outputs["validation_dice"]),
            assistant=catalog.read_model_info(assistant["bundle"], "user") if assistant else None, outputs=outputs)
