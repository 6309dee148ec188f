"""The module's Widget, built from the real .ui with the Qt stand-ins (``Testing/stubs/qt.py``) on a real MRML scene,
driven by its buttons with a Logic whose worker jobs are fakes the tests finish, fail or cancel."""

from __future__ import annotations

import logging
import shutil
import types

import pytest
import qt
import slicer
from tiny import TINY_TEACHER, make_bundle

from MedKDSegmentLib.engine.errors import InvalidInputError
from MedKDSegmentLib.scene.finetune import FineTuneReport, LossCurve
from MedKDSegmentLib.scene.logic import ComparisonResult
from MedKDSegmentLib.scene.training import METHOD_NAMES, TrainingCurve, TrainingReport


class FakeJob:
    """What the Widget reads of a ``BackgroundJob``; the test decides how it ends."""

    def __init__(self, kind: str, description: str) -> None:
        self.kind, self.description = kind, description
        self.state, self.fraction, self.stage = "running", 0.0, "queued"
        self.result = self.outputs = self.error = None
        self.seconds = 2.0

    @property
    def running(self) -> bool:
        return self.state == "running"

    def poll(self) -> bool:
        return self.running

    def cancel(self) -> None:
        self.state = "cancelled"

    def finish(self, result=None, outputs=None) -> None:
        self.state, self.result, self.outputs, self.fraction = "done", result, outputs or {}, 1.0

    def fail(self, problem: str, fix: str = "") -> None:
        self.state, self.error = "error", {"problem": problem, "fix": fix, "message": problem}


@pytest.fixture
def logic_class():
    import MedKDSegment

    class FakeLogic(MedKDSegment.MedKDSegmentLogic):
        """The module's Logic, except that worker jobs are ``FakeJob``s, recorded with their arguments."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.calls: list[tuple[str, tuple, dict]] = []
            self.jobs: list[FakeJob] = []
            self.info = None

        def _job(self, kind: str, *args, **kwargs) -> FakeJob:
            self.calls.append((kind, args, kwargs))
            self.jobs.append(FakeJob(kind, f"{kind} job"))
            return self.jobs[-1]

        def startSegment(self, *args, **kwargs):
            return self._job("segment", *args, **kwargs)

        def startCompare(self, *args, **kwargs):
            return self._job("compare", *args, **kwargs)

        def startFineTune(self, *args, **kwargs):
            return self._job("finetune", *args, **kwargs)

        def startTrainTeacher(self, *args, **kwargs):
            return self._job("train_teacher", *args, **kwargs)

        def startDistillStudent(self, *args, **kwargs):
            return self._job("distill", *args, **kwargs)

        def startDistillUnpaired(self, *args, **kwargs):
            return self._job("distill_unpaired", *args, **kwargs)

        def startResumeTraining(self, *args, **kwargs):
            return self._job("train_teacher", *args, **kwargs)

        def startInstallTeacher(self, *args, **kwargs):
            return self._job("install-teacher", *args, **kwargs)

        def startImportTeacher(self, *args, **kwargs):
            return self._job("import-teacher", *args, **kwargs)

        def warmUpWorker(self) -> bool:
            self.info = {"devices": ["cpu"]}
            return True

        def workerInfo(self):
            return self.info

        def shutdownWorker(self) -> None:
            self.calls.append(("shutdown", (), {}))

    return FakeLogic


@pytest.fixture
def app(monkeypatch):
    """Slicer's application object as far as ``slicer.util`` needs it: testing mode (message boxes are only
    logged). Confirmations answer from ``app.confirm`` (yes unless a test says otherwise)."""
    app = types.SimpleNamespace(testingEnabled=lambda: True, applicationName="Slicer", topLevelWidgets=lambda: [],
                                setOverrideCursor=lambda cursor: None, restoreOverrideCursor=lambda: None,
                                confirm=True, questions=[])

    def confirm(text, *args, **kwargs):
        app.questions.append(text)
        return app.confirm

    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm)
    return app


@pytest.fixture
def user_models(tmp_path, models_dir):
    """The tiny models in a folder of the test's own (a test may delete one)."""
    folder = tmp_path / "models"
    shutil.copytree(models_dir, folder)
    return folder


@pytest.fixture
def panel(scene, app, logic_class, user_models):
    """(Widget, Logic) as a user first sees them, with the tiny models' folder picked."""
    import MedKDSegment
    from MedKDSegmentLib.widget import Widget

    logic = logic_class(includeBundledModels=False)
    widget = Widget(logic, MedKDSegment.moduleResourcePath("UI/MedKDSegment.ui"))
    widget.ui.userModelsPathLineEdit.currentPath = str(user_models)
    widget.enter()
    yield widget, logic
    widget.exit()
    widget.cleanup()


def combo_items(comboBox) -> list[str]:
    return [comboBox.itemText(i) for i in range(comboBox.count)]


def click(button) -> None:
    assert button.enabled, f"{button.name} is disabled"
    button.emit("clicked", False)


def poll(widget) -> None:
    widget._timer.emit("timeout")


def test_the_panel_lists_the_models_for_the_volume_and_enables_what_can_run(panel, ct_node):
    widget, logic = panel
    assert not widget.ui.segmentStudentButton.enabled  # no volume yet
    widget.ui.inputVolumeSelector.setCurrentNode(ct_node)
    assert logic.getParameterNode().inputVolume is ct_node  # the selector is bound to the parameter node
    assert widget.ui.detectedModalityLabel.text == "detected: CT (from intensities)"
    assert [item.split(" ")[0] for item in combo_items(widget.ui.studentModelComboBox)] == ["selftest-ct-student"]
    assert [item.split(" ")[0] for item in combo_items(widget.ui.teacherModelComboBox)] == ["selftest-ct-teacher"]
    assert widget.ui.modelsTableWidget.rowCount == 4  # CT and MR teachers and students
    assert widget.ui.segmentStudentButton.enabled and widget.ui.compareButton.enabled
    assert widget.ui.deviceLabel.text == "found: cpu"
    assert "New versions are saved in: " in widget.ui.fineTuneOutputLabel.text

    widget.ui.modalityComboBox.currentText = "MR"  # forced: the MR models
    assert [item.split(" ")[0] for item in combo_items(widget.ui.studentModelComboBox)] == ["selftest-mr-student"]
    assert [item.split(" ")[0] for item in combo_items(widget.ui.teacherModelComboBox)] == ["selftest-mr-teacher"]
    widget.ui.userModelsPathLineEdit.currentPath = str(widget.ui.userModelsPathLineEdit.currentPath) + "-none"
    assert widget.ui.studentModelComboBox.count == 0 and not widget.ui.compareButton.enabled  # no models there


def test_segmenting_runs_a_worker_job_and_shows_its_progress_and_result(panel, ct_node, caplog):
    widget, logic = panel
    widget.ui.inputVolumeSelector.setCurrentNode(ct_node)
    widget.ui.deviceComboBox.currentText = "cpu"
    click(widget.ui.segmentStudentButton)
    kind, args, kwargs = logic.calls[-1]
    assert (kind, args[0], kwargs["model"], kwargs["device"], kwargs["modality"]) == (
        "segment", ct_node, "selftest-ct-student", "cpu", "CT")
    assert widget._timer.active and widget.ui.statusLabel.text == "segment job: running"
    assert widget.ui.cancelButton.enabled and not widget.ui.segmentTeacherButton.enabled  # one job at a time

    job = logic.jobs[-1]
    job.fraction, job.stage = 0.5, "inference"
    poll(widget)
    assert (widget.ui.progressBar.value, widget.ui.progressBar.format) == (50, "%p% – inference")
    job.finish(outputs={"seconds": 0.4, "device": "cpu", "warnings": ["spacing far from the training data"]})
    with caplog.at_level(logging.WARNING):
        poll(widget)
    assert not widget._timer.active and widget.ui.segmentStudentButton.enabled
    assert widget.ui.statusLabel.text.startswith("segment job: done in 2.0 s (network 0.4 s on cpu)")
    assert "Warning: spacing far from the training data" in widget.ui.statusLabel.text
    assert "spacing far from the training data" in caplog.text  # the warning dialog (logged in testing mode)


def test_compare_shows_the_table_and_a_failed_or_cancelled_job_says_so(panel, ct_node, caplog):
    widget, logic = panel
    widget.ui.inputVolumeSelector.setCurrentNode(ct_node)
    click(widget.ui.compareButton)
    kind, args, kwargs = logic.calls[-1]
    assert (kind, kwargs["teacher"], kwargs["student"]) == ("compare", "selftest-ct-teacher", "selftest-ct-student")
    table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "structures")
    result = ComparisonResult(None, None, None, table, None, [], {})
    logic.jobs[-1].finish(result, {"student": {"seconds": 0.2, "device": "cpu"}, "teacher": {}})
    widget.ui.resultsCollapsibleButton.collapsed = True
    poll(widget)
    assert widget.ui.resultsTableView.tableNode is table and not widget.ui.resultsCollapsibleButton.collapsed

    click(widget.ui.segmentTeacherButton)
    logic.jobs[-1].fail("The model file is damaged.", "Reinstall it.")
    with caplog.at_level(logging.ERROR):
        poll(widget)
    assert widget.ui.statusLabel.text == "segment job failed."
    assert "The model file is damaged." in caplog.text and "Reinstall it." in caplog.text

    click(widget.ui.segmentStudentButton)
    click(widget.ui.cancelButton)
    assert logic.jobs[-1].state == "cancelled"
    assert widget.ui.statusLabel.text == "Cancelled; the scene was not changed."
    assert widget.ui.progressBar.value == 0 and widget.ui.segmentStudentButton.enabled


def test_a_job_that_cannot_start_shows_the_problem_and_leaves_the_panel_usable(panel, ct_node, caplog, monkeypatch):
    widget, logic = panel
    widget.ui.inputVolumeSelector.setCurrentNode(ct_node)

    def refuse(*args, **kwargs):
        raise InvalidInputError("The volume is 2D.", "Pick a 3D volume.")

    monkeypatch.setattr(logic, "startSegment", refuse)
    with pytest.raises(InvalidInputError, match="The volume is 2D."):
        click(widget.ui.segmentStudentButton)  # tryWithErrorDisplay shows it in Slicer (not in testing mode)
    assert widget._job is None and widget.ui.segmentStudentButton.enabled


def test_the_models_table_uses_and_deletes_a_version(panel, ct_node, app):
    widget, logic = panel
    widget.ui.inputVolumeSelector.setCurrentNode(ct_node)
    table = widget.ui.modelsTableWidget
    names = [table.item(row, 0).text() for row in range(table.rowCount)]
    assert not widget.ui.useModelButton.enabled
    table.selectRow(names.index("selftest-mr-student"))
    assert widget.ui.useModelButton.enabled and widget.ui.deleteModelButton.enabled
    click(widget.ui.useModelButton)  # an MR model: the modality follows
    assert widget.ui.modalityComboBox.currentText == "MR"
    assert logic.getParameterNode().studentModel == "selftest-mr-student"

    table.selectRow(names.index("selftest-mr-student"))
    app.confirm = False
    click(widget.ui.deleteModelButton)
    assert table.rowCount == 4 and "Delete model selftest-mr-student" in app.questions[-1]
    table.selectRow(names.index("selftest-mr-student"))
    app.confirm = True
    click(widget.ui.deleteModelButton)
    assert "selftest-mr-student" not in [table.item(row, 0).text() for row in range(table.rowCount)]
    assert widget.ui.fineTuneStatusLabel.text.startswith("Deleted selftest-mr-student.")


def add_annotation(ct_node):
    import numpy as np

    from MedKDSegmentLib.scene.segmentations import segmentation_from_labels

    labels = np.zeros(slicer.util.arrayFromVolume(ct_node).shape, np.uint8)
    labels[4:8, 10:20, 10:20] = 1
    labels[10:14, 10:20, 10:20] = 2
    return segmentation_from_labels(labels, ct_node, "my annotations", {1: "Liver", 2: "tumour"})


def test_fine_tuning_pairs_a_volume_with_its_segments_maps_their_names_and_starts(panel, ct_node, caplog):
    widget, logic = panel
    widget.ui.inputVolumeSelector.setCurrentNode(ct_node)
    segmentation = add_annotation(ct_node)
    with caplog.at_level(logging.ERROR):
        widget.onAddPair()  # nothing picked yet
    assert "Pick a volume and the segmentation" in caplog.text
    widget.ui.fineTuneVolumeSelector.setCurrentNode(ct_node)
    widget.ui.fineTuneSegmentationSelector.setCurrentNode(segmentation)
    click(widget.ui.addPairButton)
    assert widget.ui.pairsTableWidget.rowCount == 1
    mapping = widget.ui.segmentMappingTableWidget
    assert [mapping.item(row, 0).text() for row in range(mapping.rowCount)] == ["Liver", "tumour"]
    assert mapping.cellWidget(0, 1).currentText == "liver"  # matched by name
    assert mapping.cellWidget(1, 1).currentText == "(unknown: choose or skip)"
    mapping.cellWidget(1, 1).currentText = "(skip)"
    assert widget.segmentMapping() == {"Liver": "liver", "tumour": None}

    click(widget.ui.startFineTuneButton)
    kind, args, kwargs = logic.calls[-1]
    assert kind == "finetune" and args[0] == [(ct_node, segmentation)]
    assert kwargs["model"] == "selftest-ct-student" and kwargs["mapping"] == {"Liver": "liver", "tumour": None}
    assert kwargs["epochs"] == 15 and kwargs["minutes"] is None and not kwargs["resume"]
    assert widget.ui.fineTuneCancelButton.enabled and not widget.ui.cancelButton.enabled
    click(widget.ui.fineTuneCancelButton)
    assert widget.ui.fineTuneStatusLabel.text.startswith("Cancelled; no model was written")

    click(widget.ui.startFineTuneButton)
    parent = logic.findModel("selftest-ct-student")
    report = FineTuneReport(parent, parent, LossCurve("run"), slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode"),
                            [], {}, {}, ["liver"], 0.8, 0.7, "case 1", [0.5], 1.0, False, "Worse than its parent.")
    logic.jobs[-1].finish(report)
    with caplog.at_level(logging.WARNING):
        poll(widget)
    assert widget.ui.fineTuneStatusLabel.text.startswith("Worse than its parent.")
    assert "font-weight: bold" in widget.ui.fineTuneStatusLabel.styleSheet
    assert widget.ui.fineTuneResultsTableView.tableNode is report.diceTable

    table = widget.ui.pairsTableWidget
    table.selectRow(0)
    click(widget.ui.removePairButton)
    assert table.rowCount == 0 and not widget.ui.startFineTuneButton.enabled


def test_a_better_fine_tuned_version_becomes_the_active_student(panel, ct_node):
    widget, logic = panel
    widget.ui.inputVolumeSelector.setCurrentNode(ct_node)
    parent = logic.findModel("selftest-ct-student")
    report = FineTuneReport(parent, parent, LossCurve("run"), slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode"),
                            [], {}, {}, [], 0.6, 0.7, "case 1", [0.5], 1.0, False, "")
    widget._job = FakeJob("finetune", "fine-tune")
    widget._job.finish(report)
    poll(widget)
    assert widget.ui.fineTuneStatusLabel.text.startswith("selftest-ct-student") and not \
        widget.ui.fineTuneStatusLabel.styleSheet


def test_the_train_section_follows_its_task_and_distils_from_the_ticked_teachers(panel, ct_node, tmp_path):
    widget, logic = panel
    ui = widget.ui
    ui.trainTaskComboBox.currentText = "train teacher"
    assert ui.trainModalityComboBox.visible and not ui.trainTeachersTableWidget.visible
    assert not ui.trainAdvancedCollapsibleButton.enabled
    assert not ui.startTrainingButton.enabled  # no data yet
    ui.trainDataPathLineEdit.currentPath = str(tmp_path)
    click(ui.startTrainingButton)
    kind, args, kwargs = logic.calls[-1]
    assert (kind, args[0], kwargs["modality"], kwargs["epochs"]) == ("train_teacher", str(tmp_path), "CT", 20)
    assert ui.trainCancelButton.enabled and ui.trainStatusLabel.text == "train_teacher job: running"
    click(ui.trainCancelButton)
    assert ui.trainStatusLabel.text.startswith("Cancelled; no model was written")

    ui.trainTaskComboBox.currentText = "distil student"
    teachers = ui.trainTeachersTableWidget
    names = [teachers.item(row, 0).text() for row in range(teachers.rowCount)]
    assert teachers.visible and names == ["selftest-ct-teacher", "selftest-mr-teacher"]
    ct = names.index("selftest-ct-teacher")
    assert teachers.item(ct, 0).checkState() == qt.Qt.Checked  # the teacher picked above
    teachers.item(1 - ct, 0).setCheckState(qt.Qt.Checked)
    teachers.emit("itemChanged", teachers.item(1 - ct, 0))
    teachers.cellWidget(1 - ct, 2).value = 0.5
    widget.refreshModels()  # ticks and weights survive a refresh
    assert [teachers.cellWidget(row, 2).value for row in range(2)] == [1.0, 0.5]
    teachers.item(1 - ct, 0).setCheckState(qt.Qt.Unchecked)
    widget._methodCheckBox("kd").checked = True
    widget._methodCheckBox("cwd").checked = True
    widget._methodWeightSpinBox("cwd").value = 0.5
    assert ui.trainMethodsLabel.text == "methods: kd:1.0+cwd:0.5"
    ui.trainAssistantCheckBox.checked = True
    assert ui.trainMethodsLabel.text.endswith("(teacher → assistant → student)")
    click(ui.startTrainingButton)
    kind, args, kwargs = logic.calls[-1]
    assert kind == "distill" and [t.name for t in kwargs["teachers"]] == ["selftest-ct-teacher"]
    assert kwargs["methods"] == "kd:1.0+cwd:0.5" and kwargs["assistant"] and kwargs["weights"] is None

    model = logic.findModel("selftest-ct-student")
    report = TrainingReport(model, "student", "kd:1+cwd:0.5", [{"name": "selftest-ct-teacher", "weight": 1.0}],
                            TrainingCurve("run"), [0.9, 0.5], False, {})
    logic.jobs[-1].finish(report)
    poll(widget)
    assert ui.trainStatusLabel.text.startswith("selftest-ct-student (student, CT) distilled from selftest-ct-teacher")
    assert ui.trainStatusLabel.text.endswith("Done in 2 s.")


def test_an_interrupted_training_run_resumes_from_the_panel(panel, monkeypatch, user_models):
    widget, logic = panel
    assert not widget.ui.resumeTrainingButton.enabled
    monkeypatch.setattr(logic, "interruptedTrainings", lambda: [user_models / "my-student"])
    widget._updateTrainButtons()
    assert "my-student" in widget.ui.resumeTrainingButton.toolTip
    click(widget.ui.resumeTrainingButton)
    assert logic.calls[-1][0] == "train_teacher" and widget.ui.trainCancelButton.enabled


def test_nothing_ticked_says_so_and_tooltips_come_from_the_engine(panel):
    widget, logic = panel
    for name in METHOD_NAMES:
        widget._methodCheckBox(name).checked = False
    assert widget.ui.trainMethodsLabel.text == "No distillation method is selected."
    widget.ui.trainAdvancedCollapsibleButton.collapsed = True
    widget.ui.trainAdvancedCollapsibleButton.collapsed = False  # opened: descriptions from the engine
    assert widget._methodCheckBox("cwd").toolTip.lower().startswith("channel-wise")


def test_a_ct_mr_student_refuses_two_teachers_of_one_modality(panel, tmp_path, user_models):
    widget, logic = panel
    make_bundle(user_models / "second-ct-teacher", TINY_TEACHER, role="teacher")
    widget.refreshModels()
    ui = widget.ui
    ui.trainTaskComboBox.currentText = "distil CT+MR student"
    assert ui.trainMrDataPathLineEdit.visible and ui.trainDataLabel.text == "CT data folder:"
    ui.trainDataPathLineEdit.currentPath = str(tmp_path)
    ui.trainMrDataPathLineEdit.currentPath = str(tmp_path)
    teachers = ui.trainTeachersTableWidget
    rows = {teachers.item(row, 0).text(): row for row in range(teachers.rowCount)}
    for row in rows.values():
        teachers.item(row, 0).setCheckState(qt.Qt.Checked)
    with pytest.raises(Exception, match="More than one CT teacher"):
        click(ui.startTrainingButton)
    teachers.item(rows["second-ct-teacher"], 0).setCheckState(qt.Qt.Unchecked)
    click(ui.startTrainingButton)
    kind, args, kwargs = logic.calls[-1]
    assert kind == "distill_unpaired" and (kwargs["ctTeacher"].name, kwargs["mrTeacher"].name) == (
        "selftest-ct-teacher", "selftest-mr-teacher")


def test_getting_and_importing_teachers_ask_first(panel, monkeypatch, tmp_path, app):
    widget, logic = panel
    published = [{"name": "hd-bet", "title": "HD-BET", "task": "brain extraction", "download_mb": 64.0,
                  "installed": "no", "licence": "Apache-2.0", "citation": "Isensee 2019", "folder": "models"}]
    monkeypatch.setattr(logic, "publishedTeachers", lambda: published)
    qt.QInputDialog.answers = []
    click(widget.ui.getTeachersButton)  # the choice was cancelled
    assert not logic.jobs
    qt.QInputDialog.answers, app.confirm = ["HD-BET: brain extraction (64 MB)"], False
    click(widget.ui.getTeachersButton)  # declined after reading the licence
    assert not logic.jobs
    qt.QInputDialog.answers, app.confirm = ["HD-BET: brain extraction (64 MB)"], True
    click(widget.ui.getTeachersButton)
    assert logic.calls[-1][:2] == ("install-teacher", ("hd-bet",)) and "Licence: Apache-2.0" in app.questions[-1]
    logic.jobs[-1].finish(types.SimpleNamespace(name="hd-bet-teacher", parameters=1000, path=str(tmp_path)))
    poll(widget)
    assert widget.ui.statusLabel.text.startswith("Added teacher hd-bet-teacher (1,000 parameters)")

    qt.QInputDialog.answers = ["TorchScript file (.pt)", "ab" * 32]
    qt.QFileDialog.answers = [str(tmp_path / "model.pt"), str(tmp_path / "model.json")]
    click(widget.ui.importTeacherButton)
    kind, args, kwargs = logic.calls[-1]
    assert (kind, args[0], kwargs) == ("import-teacher", str(tmp_path / "model.pt"),
                                       {"config": str(tmp_path / "model.json"), "sha256": "ab" * 32})
    logic.jobs[-1].cancel()
    poll(widget)
    for answers, files in ([], []), (["TorchScript file (.pt)", ""], ["model.pt", "model.json"]):
        qt.QInputDialog.answers, qt.QFileDialog.answers = answers, files
        click(widget.ui.importTeacherButton)  # no kind chosen; no sha256 given
    qt.QInputDialog.answers = ["nnU-Net v2 model folder or MONAI bundle folder"]
    qt.QFileDialog.answers = [""]  # no folder picked
    click(widget.ui.importTeacherButton)
    assert logic.calls[-1][0] == "import-teacher" and len(logic.jobs) == 2

    monkeypatch.setattr(logic, "publishedTeachers", lambda: [dict(published[0], installed="yes")])
    click(widget.ui.getTeachersButton)  # all installed: says so, starts nothing
    assert len(logic.jobs) == 2


def test_closing_the_scene_cancels_the_job_and_forgets_its_pairs(panel, ct_node):
    widget, logic = panel
    widget.ui.inputVolumeSelector.setCurrentNode(ct_node)
    click(widget.ui.segmentStudentButton)
    widget._pairs = [(ct_node.GetID(), ct_node.GetID())]
    widget.onSceneStartClose(None, None)
    assert logic.jobs[-1].state == "cancelled" and widget._parameterNode is None
    widget.onSceneEndClose(None, None)
    assert widget._pairs == [] and widget._parameterNode is not None


def test_a_cold_worker_is_watched_until_ready_and_shut_down_unless_kept_warm(panel, ct_node):
    widget, logic = panel
    logic.info = None
    widget._timer.active = True
    poll(widget)
    assert widget._timer.active and widget.ui.deviceLabel.text == "found: checked when the worker starts"
    logic.info = {"devices": ["cuda", "cpu"]}
    poll(widget)
    assert not widget._timer.active and widget.ui.deviceLabel.text == "found: cuda, cpu"

    widget.ui.inputVolumeSelector.setCurrentNode(ct_node)
    logic.getParameterNode().keepWorkerWarm = False
    click(widget.ui.segmentStudentButton)
    logic.jobs[-1].finish(outputs={})
    poll(widget)
    assert logic.calls[-1][0] == "shutdown"


def test_the_module_registers_its_layout_at_start_up_and_hosts_the_widget(scene, app, logic_class, user_models,
                                                                          application):
    import MedKDSegment
    from MedKDSegmentLib.scene.comparison import LAYOUT_ID, layout_node

    started = []
    app.connect = lambda signal, slot: started.append((signal, slot))
    module = MedKDSegment.MedKDSegment(None)
    assert module.parent.title == "MedKD Segment" and module.parent.icon.path.endswith("MedKDSegment.png")
    [(signal, slot)] = started
    assert signal == "startupCompleted()" and not layout_node().IsLayoutDescription(LAYOUT_ID)
    slot()  # Slicer started: a saved comparison scene can show its views
    assert layout_node().IsLayoutDescription(LAYOUT_ID)

    host = MedKDSegment.MedKDSegmentWidget(logic=logic_class(userModelFolders=[user_models],
                                                             includeBundledModels=False))
    host.setup()
    assert host.widget in host.parent.children() and host.widget.logic is host.logic
    host.enter()
    assert host.widget._entered
    host.exit()
    host.cleanup()
    assert host.logic.calls[-1][0] == "shutdown"


def test_while_a_job_runs_no_other_starts(panel, ct_node, tmp_path, app):
    widget, logic = panel
    widget.ui.inputVolumeSelector.setCurrentNode(ct_node)
    click(widget.ui.segmentStudentButton)
    qt.QInputDialog.answers, qt.QFileDialog.answers = ["anything"], ["anything"]
    widget.ui.trainDataPathLineEdit.currentPath = str(tmp_path)
    for start in (widget.onGetTeachers, widget.onImportTeacher, widget.onSegmentTeacher, widget.onStartFineTune,
                  widget.onResumeFineTune, widget.onStartTraining, widget.onResumeTraining):
        start()  # a button disabled while a job runs, reached some other way
    assert len(logic.jobs) == 1 and qt.QInputDialog.answers == ["anything"]


def test_the_panel_picks_the_scene_s_volume_and_resumes_an_interrupted_fine_tuning(scene, app, logic_class, user_models,
                                                                                   ct_node, monkeypatch):
    import MedKDSegment
    from MedKDSegmentLib.widget import Widget

    logic = logic_class(includeBundledModels=False)
    widget = Widget(logic, MedKDSegment.moduleResourcePath("UI/MedKDSegment.ui"))
    widget.ui.userModelsPathLineEdit.currentPath = str(user_models)
    assert logic.getParameterNode().inputVolume is ct_node  # the scene's only volume
    widget.ui.fineTuneVolumeSelector.setCurrentNode(ct_node)
    widget.ui.fineTuneSegmentationSelector.setCurrentNode(add_annotation(ct_node))
    click(widget.ui.addPairButton)
    assert not widget.ui.resumeFineTuneButton.enabled
    assert widget.ui.resumeFineTuneButton.toolTip == "No interrupted run of this student."
    monkeypatch.setattr(logic, "interruptedFineTune", lambda student: user_models / "selftest-ct-student-v2")
    widget._updateButtons()
    assert "selftest-ct-student-v2" in widget.ui.resumeFineTuneButton.toolTip
    click(widget.ui.resumeFineTuneButton)
    assert logic.calls[-1][0] == "finetune" and logic.calls[-1][2]["resume"]

    def gone(student):
        raise InvalidInputError("The model is gone.", "")

    monkeypatch.setattr(logic, "interruptedFineTune", gone)
    logic.jobs[-1].cancel()
    poll(widget)
    assert not widget.ui.resumeFineTuneButton.enabled  # nothing to resume from a model that disappeared
    widget.cleanup()


def test_names_that_cannot_be_matched_yet_are_all_unknown_and_say_why(panel, ct_node, monkeypatch):
    widget, logic = panel

    def missing(names, model):
        raise InvalidInputError("PyTorch is not installed yet.", "Install it from the module.")

    monkeypatch.setattr(logic, "matchSegmentNames", missing)
    widget.ui.fineTuneVolumeSelector.setCurrentNode(ct_node)
    widget.ui.fineTuneSegmentationSelector.setCurrentNode(add_annotation(ct_node))
    click(widget.ui.addPairButton)
    mapping = widget.ui.segmentMappingTableWidget
    assert [mapping.cellWidget(row, 1).currentText for row in range(2)] == ["(unknown: choose or skip)"] * 2
    assert widget.ui.fineTuneStatusLabel.text == "PyTorch is not installed yet."


def test_use_without_a_selection_does_nothing_and_method_tooltips_wait_for_the_engine(panel, monkeypatch):
    widget, logic = panel
    widget.onUseModel()
    assert logic.getParameterNode().studentModel == widget._selectedModel("student")

    def not_installed(install=True):
        raise InvalidInputError("PyTorch is not installed yet.", "")

    monkeypatch.setattr(logic, "distillationMethods", not_installed)
    widget.ui.trainAdvancedCollapsibleButton.collapsed = False
    widget.ui.trainAdvancedCollapsibleButton.collapsed = True  # closing it reads nothing
    assert widget._methodDescriptions == {}
