"""MedKDSegment: segment CT and MR volumes with knowledge-distilled students, compare them with their teachers,
fine-tune them on segmentations drawn in Slicer (new model versions with a parent link), and train teachers
and distil new students from folders of data (combinable distillation methods, several teachers, an assistant).

The Slicer shell over ``MedKDSegmentLib``: the Module's metadata, the Widget host (the panel itself is
``MedKDSegmentLib.widget.Widget``, given its Logic), the Logic (the scene logic, ``scene.logic.SceneLogic``, with
the module's parameter node) and the Test (``scene.self_test``). Nothing heavy (torch, MONAI) is imported here:
dependencies are checked when a job first needs them.
"""

import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from MedKDSegmentLib.engine.locations import resources_dir
from MedKDSegmentLib.scene.logic import SceneLogic
from MedKDSegmentLib.scene.parameters import MedKDSegmentParameterNode
from MedKDSegmentLib.scene.self_test import SelfTest


def moduleResourcePath(filename: str) -> str:
    """``Resources/`` sits beside the module folder (source tree and installed extension alike)."""
    return str(resources_dir() / filename)


class MedKDSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedKD Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # PyTorch is optional: pip installs torch when the extension is absent
        self.parent.contributors = ["MedKDSegment contributors"]
        self.parent.helpText = _(
            "Segment abdominal CT and MR volumes with compact, knowledge-distilled student networks, run their "
            "teachers, and compare the two side by side (Dice, HD95, volumes, run time). Fine-tune a student on "
            "segmentations you drew: the result is a new model version you can keep, roll back or delete. Train "
            "teachers and distil students (distillation methods, several teachers, a teacher-assistant chain, one "
            "CT+MR student) from folders of images and labels. Results are new nodes and new models; your own "
            "nodes are never changed. See docs/slicer-module.md."
        )
        self.parent.acknowledgementText = _("Built on 3D Slicer, PyTorch, MONAI and SimpleITK.")
        # Slicer looks for the icon inside the module folder; ours lives in the shared Resources/ beside it.
        self.parent.icon = qt.QIcon(moduleResourcePath("Icons/MedKDSegment.png"))
        # Scenes do not save layout descriptions: registered at start-up, a reopened comparison scene shows its
        # views before any Compare.
        slicer.app.connect("startupCompleted()", registerComparisonLayout)


def registerComparisonLayout() -> None:
    from MedKDSegmentLib.scene import comparison

    comparison.register_comparison_layout()


class MedKDSegmentWidget(ScriptedLoadableModuleWidget):
    """Hosts ``MedKDSegmentLib.widget.Widget`` in the module panel, with ``logic`` (a new Logic by default)."""

    def __init__(self, parent=None, logic=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = logic
        self.widget = None

    def setup(self) -> None:
        from MedKDSegmentLib.widget import Widget

        ScriptedLoadableModuleWidget.setup(self)
        self.logic = self.logic or MedKDSegmentLogic()
        self.widget = Widget(self.logic, moduleResourcePath("UI/MedKDSegment.ui"))
        self.layout.addWidget(self.widget)

    def enter(self) -> None:
        self.widget.enter()

    def exit(self) -> None:
        self.widget.exit()

    def cleanup(self) -> None:
        if self.widget is not None:
            self.widget.cleanup()


class MedKDSegmentLogic(ScriptedLoadableModuleLogic, SceneLogic):
    """The module's API for the GUI, the Python console and batch scripts (see docs/slicer-module.md): the scene
    logic itself. Every method takes and returns MRML nodes; results are always NEW nodes."""

    def __init__(self, userModelFolders=(), includeBundledModels: bool = True) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        SceneLogic.__init__(self, userModelFolders, includeBundledModels)

    def getParameterNode(self) -> MedKDSegmentParameterNode:
        return MedKDSegmentParameterNode(super().getParameterNode())


class MedKDSegmentTest(SelfTest, ScriptedLoadableModuleTest):
    """Runs unchanged in Slicer (Reload and Test, or ``Slicer --python-code``) and under pytest."""

    logicClass = MedKDSegmentLogic
