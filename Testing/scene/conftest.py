"""Scene-layer fixtures: a real MRML scene from the slicer-core wheel, wired the way Slicer wires it.

Test-only stand-ins for the Qt-only parts of Slicer (``ScriptedLoadableModule``, ``i18n``,
``parameterNodeWrapper``, ``qt``, ``ctk``) live in ``Testing/stubs``; its ``slicer/`` folder has no
``__init__.py`` so that the wheel's ``slicer`` package picks them up beside its own modules.
Everything else is real: MRML nodes, storage nodes, the volumes, segmentations, colour and layout
logics, and Slicer's own ``slicer/util.py``.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

TESTING = Path(__file__).resolve().parents[1]
REPO = TESTING.parent
STUBS = TESTING / "stubs"
if "slicer" in sys.modules and not hasattr(sys.modules["slicer"], "ScriptedLoadableModule"):
    raise RuntimeError("slicer was imported before Testing/stubs was on sys.path")
sys.path.insert(0, str(STUBS))
sys.path.insert(0, str(REPO / "MedKDSegment"))

import slicer  # noqa: E402 (after the stand-ins are on sys.path)
import vtk  # noqa: E402

SHARED = REPO.parent / "shared"


class _Application:
    """The non-Qt logics the Slicer application owns, connected to one scene at a time."""

    def __init__(self) -> None:
        self.app = slicer.vtkSlicerApplicationLogic()
        self.colors = self.app.GetColorLogic()
        self.volumes = slicer.vtkSlicerVolumesLogic()
        self.segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
        self.plots = slicer.vtkSlicerPlotsLogic()
        for logic in (self.volumes, self.segmentations, self.plots):
            logic.SetMRMLApplicationLogic(self.app)
        self.app.SetModuleLogic("Colors", self.colors)
        self.app.SetModuleLogic("Volumes", self.volumes)
        self.app.SetModuleLogic("Segmentations", self.segmentations)
        self.app.SetModuleLogic("Plots", self.plots)
        self.app.SetSliceLogics(vtk.vtkCollection())
        self.app.SetViewLogics(vtk.vtkCollection())
        self.layouts = {}

    def new_scene(self):
        scene = slicer.vtkMRMLScene()
        self.use(scene)
        self.colors.AddDefaultColorNodes()
        # The layout logic creates the layout node and the views named in a layout, as in Slicer.
        self.layouts[scene] = slicer.vtkMRMLLayoutLogic()
        self.layouts[scene].SetMRMLScene(scene)
        return scene

    def use(self, scene):
        """Make ``scene`` the application's scene again (tests sharing one expensive result)."""
        self.app.SetMRMLScene(scene)
        self.colors.SetMRMLScene(scene)
        self.volumes.SetMRMLScene(scene)
        self.segmentations.SetMRMLScene(scene)
        self.plots.SetMRMLScene(scene)
        slicer.mrmlScene = scene
        slicer.modules = types.SimpleNamespace(
            volumes=types.SimpleNamespace(logic=lambda: self.volumes),
            segmentations=types.SimpleNamespace(logic=lambda: self.segmentations),
            plots=types.SimpleNamespace(logic=lambda: self.plots),
        )


@pytest.fixture(scope="session")
def application() -> _Application:
    return _Application()


@pytest.fixture(scope="session", autouse=True)
def default_models_folder(tmp_path_factory):
    """The default user-models folder (used when none is set) is a temporary one: tests never write to,
    or list, the models of the person running them."""
    import os

    from MedKDSegmentLib.scene.logic import MODELS_DIR_ENV

    folder = tmp_path_factory.mktemp("default-models")
    previous = os.environ.get(MODELS_DIR_ENV)
    os.environ[MODELS_DIR_ENV] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop(MODELS_DIR_ENV, None)
    else:
        os.environ[MODELS_DIR_ENV] = previous


@pytest.fixture
def scene(application):
    """A fresh real MRML scene as ``slicer.mrmlScene`` (cheap: ~20 ms)."""
    return application.new_scene()  # Clear(True) with a layout logic attached crashes VTK; a new scene is enough


# --- tiny models and volumes --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """Untrained tiny CT teacher + student (and an MR student) in a user-model folder."""
    from MedKDSegmentLib.selftest import make_test_models

    folder = tmp_path_factory.mktemp("models")
    make_test_models(folder, "CT")
    make_test_models(folder, "MR")
    return folder


@pytest.fixture(scope="session")
def ct_volume():
    from MedKDSegmentLib.selftest import test_volume

    return test_volume("CT")


@pytest.fixture(scope="session")
def mr_volume():
    from MedKDSegmentLib.selftest import test_volume

    return test_volume("MR")


@pytest.fixture
def logic(models_dir):
    """The scene logic with the tiny models only (the bundled ones may be training right now)."""
    from MedKDSegmentLib.scene.logic import SceneLogic

    logic = SceneLogic([models_dir], includeBundledModels=False)
    yield logic
    logic.shutdownWorker()


@pytest.fixture
def ct_node(scene, ct_volume):
    from MedKDSegmentLib.scene.volumes import add_volume_node

    return add_volume_node(ct_volume, "phantom CT")


@pytest.fixture
def shared_dir() -> Path:
    return SHARED


@pytest.fixture
def real_ct_dir() -> Path:
    folder = SHARED / "data" / "ct-mr-abdomen-totalseg"
    if not folder.is_dir():
        pytest.skip(f"the real CT is not available ({folder} is absent: ../shared/data beside the repository)")
    return folder
