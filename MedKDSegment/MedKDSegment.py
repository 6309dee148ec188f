"""MedKDSegment: segment CT and MR volumes with knowledge-distilled students, compare them with their teachers.

A thin shell, as Slicer's scripted modules should be: the Module holds metadata, the Widget maps
the GUI to the parameter node and buttons to the Logic, the Logic delegates to
``MedKDSegmentLib`` (scene layer + engine), and the Test exercises the Logic. Nothing heavy
(torch, MONAI) is imported here: dependencies are checked when a job first needs them.
"""

from typing import Annotated

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MedKDSegmentLib.catalog import resources_dir
from MedKDSegmentLib.scene.logic import ComparisonResult, SceneLogic

MODALITY_CHOICES = ["auto", "CT", "MR"]
DEVICE_CHOICES = ["auto", "cuda", "mps", "cpu"]
POLL_INTERVAL_MS = 100


def moduleResourcePath(filename: str) -> str:
    """``Resources/`` sits beside the module folder (source tree and installed extension alike)."""
    return str(resources_dir() / filename)


#
# MedKDSegment
#


class MedKDSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedKD Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # PyTorch is optional: pip installs torch when the extension is absent
        self.parent.contributors = ["MedKDSegment contributors"]
        self.parent.helpText = _(
            "Segment abdominal CT and MR volumes with compact, knowledge-distilled student networks, run their "
            "teachers, and compare the two side by side (Dice, HD95, volumes, run time). Results are new "
            "segmentation nodes; your own nodes are never changed. See docs/slicer-module.md."
        )
        self.parent.acknowledgementText = _("Built on 3D Slicer, PyTorch, MONAI and SimpleITK.")
        # Slicer looks for the icon inside the module folder; ours lives in the shared Resources/ beside it.
        self.parent.icon = qt.QIcon(moduleResourcePath("Icons/MedKDSegment.png"))


#
# MedKDSegmentParameterNode
#


@parameterNodeWrapper
class MedKDSegmentParameterNode:
    """GUI state, saved with the scene.

    inputVolume - the CT or MR volume to segment.
    referenceSegmentation - optional ground truth for the comparison table.
    modality - 'auto' (DICOM modality, else intensities) or a forced CT / MR.
    device - where networks run: auto (cuda, then mps, then cpu), or one of them.
    studentModel, teacherModel - model names picked in the lists.
    keepWorkerWarm - keep the worker process (torch already imported) between jobs.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    referenceSegmentation: vtkMRMLSegmentationNode
    modality: Annotated[str, Choice(MODALITY_CHOICES)] = "auto"
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    studentModel: str = ""
    teacherModel: str = ""
    keepWorkerWarm: bool = True


#
# MedKDSegmentWidget
#


class MedKDSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = None
        self._students = []
        self._teachers = []
        self._detected = ("", "")

    def resourcePath(self, filename):
        return moduleResourcePath(filename)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedKDSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedKDSegmentLogic()

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
        self.ui.segmentStudentButton.connect("clicked(bool)", self.onSegmentStudent)
        self.ui.segmentTeacherButton.connect("clicked(bool)", self.onSegmentTeacher)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)

        self.ui.cancelButton.enabled = False
        self.ui.progressBar.value = 0
        self.ui.progressBar.format = _("idle")
        self.logic.setUserModelFolders([self.ui.userModelsPathLineEdit.currentPath])
        self.initializeParameterNode()
        self.refreshModels()

    def cleanup(self) -> None:
        if self._timer:
            self._timer.stop()
        if self._job is not None and self._job.running:
            self._job.cancel()
        if self.logic:
            self.logic.shutdownWorker()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        if self._parameterNode.keepWorkerWarm and self.logic.warmUpWorker():
            self._timer.start()  # torch loads in the background; the timer shows the devices once it is ready
        self._updateDeviceLabel()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None and self._job.running:
            self._job.cancel()  # its results would belong to a scene that is going away
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
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
        if not self.logic:
            return
        models = self.logic.listModels()
        table = self.ui.modelsTableWidget
        headers = [_("Name"), _("Role"), _("Modality"), _("Labels"), _("Parameters"), _("Size (MB)"), _("Source")]
        table.clear()
        table.setColumnCount(len(headers))
        table.setHorizontalHeaderLabels(headers)
        table.setRowCount(len(models))
        for row, model in enumerate(models):
            cells = [model.name, model.role, model.modality, str(len(model.labels)), f"{model.parameters:,}",
                     f"{model.size_mb:.1f}", model.source]
            for column, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(", ".join(model.labels.values()) if column == 3 else str(model.path))
                table.setItem(row, column, item)
        table.resizeColumnsToContents()

        modality = self.effectiveModality()
        self._students = [m for m in models if m.modality == modality and m.role == "student"]
        self._teachers = [m for m in models if m.modality == modality and m.role == "teacher"]
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
        self.onModelChoiceChanged()

    def onModelChoiceChanged(self, index=None) -> None:
        student, teacher = self._selectedModel("student"), self._selectedModel("teacher")
        if self._parameterNode:
            self._parameterNode.studentModel = student or ""
            self._parameterNode.teacherModel = teacher or ""
        self._updateButtons()

    def _selectedModel(self, role: str):
        comboBox = self.ui.studentModelComboBox if role == "student" else self.ui.teacherModelComboBox
        choices = self._students if role == "student" else self._teachers
        index = comboBox.currentIndex
        return choices[index].name if 0 <= index < len(choices) else None

    def _updateButtons(self) -> None:
        idle = self._job is None or not self._job.running
        hasInput = bool(self._parameterNode and self._parameterNode.inputVolume)
        student, teacher = self._selectedModel("student"), self._selectedModel("teacher")
        self.ui.segmentStudentButton.enabled = idle and hasInput and student is not None
        self.ui.segmentTeacherButton.enabled = idle and hasInput and teacher is not None
        self.ui.compareButton.enabled = idle and hasInput and student is not None and teacher is not None
        self.ui.cancelButton.enabled = not idle

    def _updateDeviceLabel(self) -> None:
        info = self.logic.workerInfo() if self.logic else None
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
        self.ui.progressBar.value = round(100 * job.fraction)
        self.ui.progressBar.format = f"%p% – {job.stage}"
        if running:
            return
        self._timer.stop()
        self._job = None
        self._updateButtons()
        if job.state == "done":
            self._showResult(job)
        elif job.state == "cancelled":
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
        else:
            error = job.error or {}
            self.ui.statusLabel.text = _("{job} failed.").format(job=job.description)
            slicer.util.errorDisplay(
                _("{job} failed:\n\n{problem}\n\n{fix}").format(
                    job=job.description, problem=error.get("problem") or error.get("message", ""),
                    fix=error.get("fix", "")),
                detailedText=error.get("traceback") or error.get("message", ""))
        if self._parameterNode and not self._parameterNode.keepWorkerWarm:
            self.logic.shutdownWorker()

    def _showResult(self, job) -> None:
        outputs = job.outputs or {}
        run = outputs.get("student", outputs)
        self.ui.statusLabel.text = _("{job}: done in {seconds:.1f} s (network {network:.1f} s on {device})").format(
            job=job.description, seconds=job.seconds, network=run.get("seconds", 0.0), device=run.get("device", "?"))
        if isinstance(job.result, ComparisonResult):
            self.ui.resultsTableView.setMRMLTableNode(job.result.structuresTable)
            self.ui.resultsCollapsibleButton.collapsed = False
        else:
            slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume, fit=False)

    def onCancel(self) -> None:
        if self._job is not None and self._job.running:
            self._job.cancel()
            self.onPollJob()


#
# MedKDSegmentLogic
#


class MedKDSegmentLogic(ScriptedLoadableModuleLogic):
    """The module's API for the GUI, the Python console and batch scripts (see docs/slicer-module.md).

    Every method takes and returns MRML nodes; results are always NEW nodes.
    """

    def __init__(self, userModelFolders=(), includeBundledModels: bool = True) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.sceneLogic = SceneLogic(userModelFolders, includeBundledModels)

    def getParameterNode(self):
        return MedKDSegmentParameterNode(super().getParameterNode())

    def setUserModelFolders(self, folders) -> None:
        self.sceneLogic.userModelFolders = [str(folder) for folder in folders if folder]

    def listModels(self, modality=None, role=None):
        """Bundled and user models (``ModelInfo``: name, role, modality, labels, parameters, size_mb, path)."""
        return self.sceneLogic.listModels(modality, role)

    def detectModality(self, volumeNode):
        """(modality, source): from the DICOM Modality tag when the volume came from DICOM, else intensities."""
        return self.sceneLogic.detectModality(volumeNode)

    def segment(self, volumeNode, model=None, device="auto", modality="auto", useWorker=False, progress=None):
        """Segment a volume node with a model (name or folder); returns the new segmentation node."""
        return self.sceneLogic.segment(volumeNode, model, device, modality, useWorker, progress)

    def compare(self, volumeNode, teacher=None, student=None, referenceSegmentationNode=None, device="auto",
                modality="auto", useWorker=False, progress=None, showLayout=True):
        """Teacher vs student: two segmentations, a disagreement segmentation, tables, side-by-side views."""
        return self.sceneLogic.compare(volumeNode, teacher, student, referenceSegmentationNode, device, modality,
                                       useWorker, progress, showLayout=showLayout)

    def startSegment(self, volumeNode, model=None, device="auto", modality="auto"):
        """Non-blocking ``segment`` in the worker process; poll the returned job."""
        return self.sceneLogic.startSegment(volumeNode, model, device, modality)

    def startCompare(self, volumeNode, teacher=None, student=None, referenceSegmentationNode=None, device="auto",
                     modality="auto"):
        """Non-blocking ``compare`` in the worker process; poll the returned job."""
        return self.sceneLogic.startCompare(volumeNode, teacher, student, referenceSegmentationNode, device, modality)

    def workerInfo(self):
        """The worker's start-up report (devices found, torch version), once it is running."""
        return self.sceneLogic.workerInfo()

    def warmUpWorker(self) -> bool:
        """Start the worker in the background if the dependencies are installed (never installs anything)."""
        return self.sceneLogic.warmUpWorker()

    def shutdownWorker(self) -> None:
        self.sceneLogic.shutdownWorker()


#
# MedKDSegmentTest
#


class MedKDSegmentTest(ScriptedLoadableModuleTest):
    """Runs unchanged in Slicer (Reload and Test, or ``Slicer --python-code``) and under pytest.

    It builds its own tiny untrained models, so it checks plumbing (nodes, names, geometry, tables,
    layout, the worker), not accuracy, and does not depend on the bundled models.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentCompareAndWorker()

    def test_SegmentCompareAndWorker(self):
        import shutil
        import tempfile

        self.delayDisplay("Building tiny test models and a CT phantom")
        folder = tempfile.mkdtemp(prefix="MedKDSegmentTest-")
        logic = MedKDSegmentLogic(userModelFolders=[folder], includeBundledModels=False)
        try:
            self._segmentCompareAndWorker(logic, folder)
        finally:
            logic.shutdownWorker()
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Test passed")

    def _segmentCompareAndWorker(self, logic, folder):
        import numpy as np

        from MedKDSegmentLib.scene.comparison import LAYOUT_ID, table_rows
        from MedKDSegmentLib.scene.volumes import add_volume_node
        from MedKDSegmentLib.selftest import make_test_models, test_volume

        models = make_test_models(folder)
        volumeNode = add_volume_node(test_volume("CT"), "phantom CT")
        before = np.array(slicer.util.arrayFromVolume(volumeNode))
        self.assertEqual({m.name for m in logic.listModels()}, set(models.values()))
        self.assertEqual(logic.detectModality(volumeNode)[0], "CT")

        self.delayDisplay("Segmenting in-process")
        segmentationNode = logic.segment(volumeNode, model=models["student"], device="cpu")
        self.assertEqual(segmentationNode.GetName(), f"phantom CT – {models['student']}")
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 8)
        self.assertEqual(segmentation.GetNthSegment(0).GetName(), "liver")
        labelmap = segmentation.GetNthSegment(0).GetRepresentation("Binary labelmap")
        self.assertEqual(labelmap.GetDimensions(), volumeNode.GetImageData().GetDimensions())
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volumeNode), before)  # input untouched

        self.delayDisplay("Comparing teacher and student")
        result = logic.compare(volumeNode, teacher=models["teacher"], student=models["student"], device="cpu")
        rows = table_rows(result.structuresTable)
        self.assertEqual([row["Structure"] for row in rows][:2], ["liver", "spleen"])
        self.assertEqual(rows[-1]["Structure"], "mean")
        self.assertEqual(slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLLayoutNode").GetViewArrangement(), LAYOUT_ID)

        self.delayDisplay("Segmenting in the worker process")
        job = logic.startSegment(volumeNode, model=models["student"], device="cpu")
        workerNode = job.wait(timeout=600)
        self.assertEqual(workerNode.GetSegmentation().GetNumberOfSegments(), 8)
