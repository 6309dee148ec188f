"""Check statically what the Widget and the .ui promise each other: the .ui file against the code, and
every Slicer-facing file against Slicer's real API (../shared/tools/check_slicer_api.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from scene_helpers import REPO

MODULE = REPO / "MedKDSegment" / "MedKDSegment.py"
WIDGET = REPO / "MedKDSegment" / "MedKDSegmentLib" / "widget.py"
PARAMETERS = REPO / "MedKDSegment" / "MedKDSegmentLib" / "scene" / "parameters.py"
UI = REPO / "Resources" / "UI" / "MedKDSegment.ui"
SCENE_LAYER = sorted((REPO / "MedKDSegment" / "MedKDSegmentLib" / "scene").glob("*.py"))
# Qt's own widgets need no <customwidget> declaration; every other class does.
QT_CLASSES = {"QWidget", "QLabel", "QComboBox", "QPushButton", "QCheckBox", "QProgressBar", "QTableWidget",
              "QVBoxLayout", "QHBoxLayout", "QFormLayout", "QGridLayout", "QLineEdit", "QSpinBox", "QGroupBox",
              "QDoubleSpinBox"}


@pytest.fixture(scope="module")
def ui():
    return ET.parse(UI).getroot()


def widget_names(ui) -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ui.iter("widget")}


def ui_attributes_used(source: Path) -> set[str]:
    """Every ``self.ui.<name>`` in the Widget."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def test_every_widget_the_code_uses_exists_in_the_ui(ui):
    used = ui_attributes_used(WIDGET)
    assert len(used) > 15  # the check would be empty if the Widget stopped using self.ui
    missing = used - set(widget_names(ui))
    assert not missing, f"self.ui.<name> without a widget in {UI.name}: {sorted(missing)}"


def test_custom_widget_classes_are_declared(ui):
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    used = {cls for cls in widget_names(ui).values() if cls not in QT_CLASSES}
    assert used, "no Slicer/CTK widgets found"
    assert used <= declared, f"undeclared custom widgets: {sorted(used - declared)}"
    assert declared <= used | {"qMRMLWidget"}, f"declared but unused: {sorted(declared - used)}"


def test_connections_name_existing_widgets(ui):
    names = set(widget_names(ui))
    connections = list(ui.iter("connection"))
    assert connections
    for connection in connections:
        assert connection.findtext("sender") in names
        assert connection.findtext("receiver") in names


def test_parameter_names_in_the_ui_are_parameter_node_fields(ui):
    """Widgets bound with the SlicerParameterName dynamic property must name a parameter node field."""
    tree = ast.parse(PARAMETERS.read_text(encoding="utf-8"))
    wrapped = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedKDSegmentParameterNode")
    assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in wrapped.decorator_list)
    fields = {n.target.id for n in wrapped.body if isinstance(n, ast.AnnAssign)}
    bound = {p.findtext("string") for p in ui.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound == {"inputVolume", "referenceSegmentation", "modality", "device", "keepWorkerWarm",
                     "fineTuneEpochs", "fineTuneMinutes", "skipUnknownSegments", "trainTask", "trainModality",
                     "trainEpochs", "trainMinutes", "trainTemperature", "trainAssistantChain"}
    assert bound <= fields


def test_buttons_a_user_needs_are_there(ui):
    texts = {w.get("name"): (w.findtext("property[@name='text']/string") or "") for w in ui.iter("widget")}
    assert texts["segmentStudentButton"] == "Segment with student"
    assert texts["segmentTeacherButton"] == "Segment with teacher"
    assert texts["compareButton"] == "Compare teacher and student"
    assert texts["cancelButton"] == "Cancel"
    assert texts["fineTuneCollapsibleButton"] == "Fine-tune"
    assert texts["addPairButton"] == "Add pair"
    assert texts["startFineTuneButton"] == "Start fine-tuning"
    assert texts["resumeFineTuneButton"] == "Resume"
    assert texts["fineTuneCancelButton"] == "Cancel"
    assert texts["deleteModelButton"] == "Delete selected model"
    assert texts["trainCollapsibleButton"] == "Train / distil"
    assert texts["trainAdvancedCollapsibleButton"] == "Advanced: distillation methods"
    assert texts["startTrainingButton"] == "Start training"
    assert texts["resumeTrainingButton"] == "Resume"
    assert texts["trainCancelButton"] == "Cancel"
    assert texts["importTeacherButton"] == "Import teacher…"


def test_fine_tune_section_binds_its_budget_to_the_parameter_node(ui):
    """The budget widgets follow the parameter node, with the defaults the Logic documents."""
    widgets = {w.get("name"): w for w in ui.iter("widget")}
    epochs, minutes = widgets["fineTuneEpochsSpinBox"], widgets["fineTuneMinutesSpinBox"]
    assert epochs.findtext("property[@name='value']/number") == "15"
    assert minutes.findtext("property[@name='specialValueText']/string") == "none"  # 0 minutes = no limit
    tree = ast.parse(PARAMETERS.read_text(encoding="utf-8"))
    wrapped = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedKDSegmentParameterNode")
    defaults = {n.target.id: ast.literal_eval(n.value) for n in wrapped.body if isinstance(n, ast.AnnAssign) and n.value
                is not None and isinstance(n.value, ast.Constant)}
    assert defaults["fineTuneEpochs"] == 15 and defaults["fineTuneMinutes"] == 0


def test_slicer_api_checker_reports_nothing(shared_dir):
    """Names in the module, the scene layer and the .ui are checked against Slicer's real API."""
    checker = shared_dir / "tools" / "check_slicer_api.py"
    if not checker.is_file():
        pytest.skip(f"the Slicer API checker is not available ({checker} is absent)")
    files = [MODULE, WIDGET, *SCENE_LAYER, REPO / "MedKDSegment" / "MedKDSegmentLib" / "catalog.py", UI]
    result = subprocess.run([sys.executable, str(checker), *map(str, files)], capture_output=True, text=True,
                            timeout=300, cwd=REPO, check=False)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
