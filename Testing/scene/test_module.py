"""MedKDSegment.py itself: the module's own self-test, the parameter node saved with the scene, the console API."""

from __future__ import annotations

import importlib
import sys

import pytest
import slicer


@pytest.fixture
def module():
    sys.modules.pop("MedKDSegment", None)  # a fresh import, as Slicer's "Reload" does
    return importlib.import_module("MedKDSegment")


def test_importing_the_module_does_not_import_torch():
    """Dependencies are checked on first use, never at import time."""
    import subprocess

    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import MedKDSegment; "
            "print('torch' in sys.modules, 'monai' in sys.modules)")
    from scene_helpers import REPO, STUBS

    result = subprocess.run([sys.executable, "-c", code, str(STUBS), str(REPO / "MedKDSegment")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_self_test_runs_under_pytest_as_in_slicer(module, scene):
    """``MedKDSegmentTest`` is written for Slicer's Reload-and-Test; here it runs on the real MRML scene."""
    test = module.MedKDSegmentTest()
    test.setUp()  # what runTest does, one part at a time
    test.test_SegmentCompareAndWorker()
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") >= 5  # segment, compare (3), worker
    test.setUp()
    test.test_FineTune()
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1  # the annotations fine-tuned on
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 1  # the loss curve


def test_self_test_distils_a_student_from_a_data_folder(module, scene):
    test = module.MedKDSegmentTest()
    test.setUp()
    test.test_TrainAndDistil()
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 1  # the loss curve


def test_parameter_node_is_saved_and_restored_with_the_scene(module, scene, ct_node):
    logic = module.MedKDSegmentLogic()
    parameters = logic.getParameterNode()
    assert parameters.modality == "auto" and parameters.device == "auto" and parameters.keepWorkerWarm is True
    parameters.inputVolume = ct_node
    parameters.modality = "MR"
    parameters.device = "cpu"
    parameters.studentModel = "selftest-ct-student"
    scene.SetSaveToXMLString(1)
    scene.Commit()
    xml = scene.GetSceneXMLString()

    restored = slicer.vtkMRMLScene()
    restored.SetLoadFromXMLString(1)
    restored.SetSceneXMLString(xml)
    restored.Connect()
    node = restored.GetSingletonNode("MedKDSegment", "vtkMRMLScriptedModuleNode")
    assert node is not None and node.GetAttribute("ModuleName") == "MedKDSegment"
    again = module.MedKDSegmentParameterNode(node)
    assert (again.modality, again.device, again.studentModel) == ("MR", "cpu", "selftest-ct-student")
    assert again.inputVolume.GetName() == "phantom CT"
    assert logic.getParameterNode().parameterNode is parameters.parameterNode  # one per scene


def test_console_api_delegates_to_the_scene_logic(module, scene, ct_node, models_dir):
    logic = module.MedKDSegmentLogic(userModelFolders=[models_dir], includeBundledModels=False)
    assert [m.name for m in logic.listModels(modality="CT", role="student")] == ["selftest-ct-student"]
    assert logic.detectModality(ct_node) == ("CT", "intensities")
    node = logic.segment(ct_node, model="selftest-ct-student", device="cpu")
    assert node.GetName() == "phantom CT - selftest-ct-student"
    logic.setUserModelFolders([])
    assert logic.listModels() == []
