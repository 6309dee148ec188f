"""Test-only stand-in for ``slicer.ScriptedLoadableModule`` (needs Qt in Slicer).

What the module's classes rely on outside Slicer: the parameter node (a real
``vtkMRMLScriptedModuleNode`` in the real scene), ``delayDisplay``, and a module panel with a layout
for the Widget host (on the Qt stand-ins). ``slicer`` is imported lazily because the wheel's ``slicer``
package imports this file while it is itself being imported.
"""

import logging
import unittest

logger = logging.getLogger(__name__)

__all__ = [
    "ScriptedLoadableModule",
    "ScriptedLoadableModuleLogic",
    "ScriptedLoadableModuleTest",
    "ScriptedLoadableModuleWidget",
]


class _Parent:
    """What ``qSlicerScriptedLoadableModule`` offers a module's ``__init__``."""

    def __init__(self, path: str = "") -> None:
        self.path = path
        self.title = ""
        self.categories = []
        self.dependencies = []
        self.contributors = []
        self.helpText = ""
        self.acknowledgementText = ""


class ScriptedLoadableModule:
    def __init__(self, parent=None):
        self.parent = parent if parent is not None else _Parent()
        self.moduleName = self.__class__.__name__


class ScriptedLoadableModuleWidget:
    """The module panel: a widget with a vertical layout (the Qt stand-ins of ``Testing/stubs/qt.py``)."""

    def __init__(self, parent=None):
        import qt

        self.parent = parent if parent is not None else qt.QWidget()
        self.layout = qt.QVBoxLayout(self.parent)
        self.developerMode = False

    def setup(self):
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__.removesuffix("Logic")
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        import slicer

        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.AddNode(self.createParameterNode())
        return node

    def createParameterNode(self):
        import slicer

        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, requestedDelay=None, msec=None):
        logger.info(message)
