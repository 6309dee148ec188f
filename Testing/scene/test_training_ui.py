"""The Train / distil section: the method string from the Advanced section's state, output names that never
overwrite, clear errors that write nothing, and the jobs (teacher, distilled student with several teachers,
a teacher-assistant chain, a CT+MR student) in-process and in the worker, with cancel and resume.

Tiny networks on 8 mm phantoms and a few steps: these tests check the plumbing and what the bundles
record (the engine's tests check that training and each distillation method learn).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from scene_helpers import REPO, cancel_during_epoch, scene_state

from MedKDSegmentLib.engine.errors import CancelledError, InvalidInputError
from MedKDSegmentLib.scene import training
from MedKDSegmentLib.scene.logic import SceneLogic
from MedKDSegmentLib.selftest import SPACING, STUDENT, TEACHER

UI = REPO / "Resources" / "UI" / "MedKDSegment.ui"
# Tiny student and assistant, tiny patches, two steps an epoch.
TINY = {"steps_per_epoch": 2, "batch_size": 1, "patch_size": (16, 24, 24), "architecture": STUDENT,
        "assistant_architecture": TEACHER}
CT_PROFILE = {"modality": "CT", "spacing": list(SPACING), "clip": [-200.0, 400.0]}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Two labelled 8 mm phantoms per modality (on the tiny models' grid)."""
    from MedKDSegmentLib.engine.phantom import write_phantom_dataset

    folder = tmp_path_factory.mktemp("training-data")
    for modality, seed in (("CT", 11), ("MR", 12)):
        write_phantom_dataset(folder / modality.lower(), modality, 2, seed=seed, size=(48, 48, 32), spacing=SPACING)
    return {"CT": folder / "ct", "MR": folder / "mr"}


@pytest.fixture(scope="module")
def teachers(models_dir, tmp_path_factory) -> dict[str, Path]:
    """The self-test CT and MR teachers, and a second CT teacher (another name, other weights)."""
    import torch

    from MedKDSegmentLib.engine.bundle import save_bundle
    from MedKDSegmentLib.engine.labels import ABDOMEN_STRUCTURES
    from MedKDSegmentLib.engine.networks import build_network
    from MedKDSegmentLib.engine.profiles import Profile

    second = tmp_path_factory.mktemp("teachers") / "second-ct-teacher"
    torch.manual_seed(1)
    save_bundle(second, build_network(TEACHER, len(ABDOMEN_STRUCTURES) + 1), name=second.name, role="teacher",
                architecture=TEACHER, profile=Profile.from_dict(CT_PROFILE), structures=ABDOMEN_STRUCTURES,
                method={"name": "untrained (test)"}, description="test teacher")
    return {"CT": models_dir / "selftest-ct-teacher", "MR": models_dir / "selftest-mr-teacher", "CT2": second}


def metadata(path: Path) -> dict:
    return json.loads((Path(path) / "configs" / "metadata.json").read_text(encoding="utf-8"))["medkdsegment"]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- the Advanced section ---------------------------------------------------------------------------------


def test_method_widgets_match_the_engine_registry():
    """One tick box and one weight per method of the engine's registry; kd ticked by default."""
    from MedKDSegmentLib.engine.methods import METHODS, MethodSpec, resolve_weight
    from MedKDSegmentLib.engine.training import TrainingConfig

    assert training.METHOD_NAMES == tuple(METHODS)
    widgets = {w.get("name"): w for w in ET.parse(UI).getroot().iter("widget")}
    advanced = widgets["trainAdvancedCollapsibleButton"]
    inside = {w.get("name") for w in advanced.iter("widget")}
    for name in training.METHOD_NAMES:
        stem = training.method_widget_name(name)
        box, weight = f"method{stem}CheckBox", f"method{stem}WeightSpinBox"
        assert {box, weight} <= inside, name
        assert widgets[box].findtext("property[@name='text']/string") == name
        assert widgets[box].findtext("property[@name='checked']/bool") == ("true" if name == "kd" else "false")
        # The weight box starts where the CLI would without a weight (cwd and at below 1: measured).
        default = resolve_weight(MethodSpec(name), TrainingConfig())
        assert float(widgets[weight].findtext("property[@name='value']/double")) == pytest.approx(default), name
    assert METHODS["cwd"].default_weight < 1  # at 1 CWD's gradient swamps Dice + CE's
    assert training.method_widget_name("ctkd_instance") == "CtkdInstance"
    assert {"trainTemperatureSpinBox", "trainAssistantCheckBox"} <= inside
    assert advanced.findtext("property[@name='collapsed']/bool") == "true"  # collapsed by default


def test_method_string_from_the_ui_state():
    from MedKDSegmentLib.engine.methods import MethodSpec, parse_methods

    ticked = {"cwd": 1.0, "coteacher": 0.5}
    state = [(name, name in ticked, ticked.get(name, 1.0)) for name in training.METHOD_NAMES]  # (name, on, weight)
    assert training.method_string(state) == "cwd:1.0+coteacher:0.5"
    assert parse_methods("cwd:1.0+coteacher:0.5") == [MethodSpec("cwd", 1.0), MethodSpec("coteacher", 0.5)]
    assert training.method_string({"coteacher": 0.5, "CWD": 2}) == "cwd:2.0+coteacher:0.5"  # registry order
    assert training.method_string({"kd": None}) == "kd"  # the method's default weight
    assert training.method_string([("kd", True, 0.3), ("dist", False, 5.0)]) == "kd:0.3"
    with pytest.raises(InvalidInputError, match="No distillation method is selected") as caught:
        training.method_string([(name, False, 1.0) for name in training.METHOD_NAMES])
    assert "Tick" in caught.value.fix
    with pytest.raises(InvalidInputError, match="Unknown distillation method"):
        training.method_string({"fitnet": 1.0})
    with pytest.raises(InvalidInputError, match="weight of method 'cwd'"):
        training.method_string({"cwd": -1.0})


def test_output_names_are_new_and_models_never_overwritten(tmp_path):
    folder = tmp_path / "models"
    assert training.output_path(folder, None, "ct-student") == folder / "ct-student"
    (folder / "ct-student").mkdir(parents=True)
    (folder / "ct-student-2.checkpoint").mkdir()  # an interrupted run owns that name
    assert training.output_path(folder, None, "ct-student") == folder / "ct-student-3"
    (folder / "ct-student-3-assistant").mkdir()  # a chain also needs '<name>-assistant'
    assert training.output_path(folder, None, "ct-student", assistant=True) == folder / "ct-student-4"
    assert training.output_path(folder, "My CT model!", "x") == folder / "my-ct-model"
    with pytest.raises(InvalidInputError, match="already exists") as caught:
        training.output_path(folder, "ct-student", "x")
    assert "never" in caught.value.problem and "another output name" in caught.value.fix
    with pytest.raises(InvalidInputError, match="interrupted training run"):
        training.output_path(folder, "ct-student-2", "x")
    assert listing(folder) == ["ct-student", "ct-student-2.checkpoint", "ct-student-3-assistant"]


def test_bad_inputs_give_a_clear_error_and_write_nothing(scene, data, teachers, tmp_path):
    from MedKDSegmentLib.engine.volume import read_volume, write_volume

    mine = tmp_path / "mine"
    logic = SceneLogic([mine], includeBundledModels=False)
    state = scene_state(scene)
    (tmp_path / "no-images").mkdir()
    (tmp_path / "empty" / "images").mkdir(parents=True)
    for folder, problem in ((tmp_path / "missing", "does not exist"), (tmp_path / "no-images", "no 'images' folder"),
                            (tmp_path / "empty", "holds no volumes"), ("", "No (MR )?data folder")):
        for call in (lambda f=folder: logic.distillStudent(f, teachers=teachers["CT"], settings=TINY),
                     lambda f=folder: logic.startTrainTeacher(f, "CT"),
                     lambda f=folder: logic.distillUnpaired(data["CT"], f)):
            with pytest.raises(InvalidInputError, match=problem) as caught:
                call()
            assert "images/" in caught.value.fix or "NIfTI" in caught.value.fix
    with pytest.raises(InvalidInputError, match="Unknown distillation method 'fitnet'"):
        logic.distillStudent(data["CT"], teachers=teachers["CT"], methods="kd+fitnet", settings=TINY)
    with pytest.raises(InvalidInputError, match="2 teacher weights for 1 teachers"):
        logic.distillStudent(data["CT"], teachers=[teachers["CT"]], weights=[0.5, 0.5], settings=TINY)
    with pytest.raises(InvalidInputError, match="No teacher was given"):
        logic.startDistillStudent(data["CT"], teachers=[])
    with pytest.raises(InvalidInputError, match="Unknown training setting"):
        logic.trainTeacher(data["CT"], "CT", settings={"epoch": 3})
    with pytest.raises(InvalidInputError, match="not a CT teacher"):
        logic.distillUnpaired(data["CT"], data["MR"], ctTeacher=teachers["MR"])
    assert logic._worker is None  # refused before the worker was even started

    # A label file the engine refuses when it reads the cases: the run stops and leaves no trace.
    bad = tmp_path / "bad"
    for sub in ("images", "labels"):
        (bad / sub).mkdir(parents=True)
    source = sorted((data["CT"] / "images").iterdir())[0]
    write_volume(read_volume(source), bad / "images" / source.name)
    labels = read_volume(data["CT"] / "labels" / source.name)
    labels.array = (labels.array.astype(np.int16) + 40).astype(labels.array.dtype)
    write_volume(labels, bad / "labels" / source.name)
    with pytest.raises(InvalidInputError, match="label values") as caught:
        logic.distillStudent(bad, teachers=teachers["CT"], epochs=1, device="cpu", settings=TINY, showChart=False)
    assert "label table" in caught.value.fix
    assert listing(mine) == [] and logic.interruptedTrainings() == []
    assert scene_state(scene) == state  # the loss curve went with the failed run (showChart=False keeps the layout)


# --- the jobs, in-process ---------------------------------------------------------------------------------


def test_distil_in_process_records_methods_and_teachers_and_lists_the_model(scene, data, teachers, tmp_path):
    mine = tmp_path / "mine"
    logic = SceneLogic([mine], includeBundledModels=False)
    stages = []
    report = logic.distillStudent(data["CT"], teachers=[teachers["CT"], teachers["CT2"]], weights=[0.7, 0.3],
                                  methods={"cwd": 1.0, "coteacher": 0.5}, epochs=2, device="cpu", settings=TINY,
                                  progress=lambda fraction, stage: stages.append(stage))
    assert report.model.path == mine / "ct-student"  # named after the data folder, in the models folder
    method = metadata(report.model.path)["method"]
    assert method["name"] == report.methods == "cwd:1+coteacher:0.5"
    assert [(term["name"], term["weight"]) for term in method["methods"]] == [("cwd", 1.0), ("coteacher", 0.5)]
    assert [(t["name"], round(t["weight"], 6)) for t in method["teachers"]] == [("selftest-ct-teacher", 0.7),
                                                                                ("second-ct-teacher", 0.3)]
    assert method["training"]["kd_temperature"] == 1.0
    assert [t["name"] for t in report.teachers] == ["selftest-ct-teacher", "second-ct-teacher"]
    listed = {m.name: m for m in logic.listModels()}
    assert listed["ct-student"].role == "student" and listed["ct-student"].source == "user"
    assert listed["ct-student"].teacher == "selftest-ct-teacher"
    # The live loss curve: one row per epoch, the epoch losses the bundle records.
    assert any(stage.startswith("epoch 2/2 loss") for stage in stages)
    assert [epoch for epoch, _ in report.lossCurve.epochs()] == [1, 2]
    np.testing.assert_allclose([loss for _, loss in report.lossCurve.epochs()], report.epochLoss, rtol=1e-6)
    assert report.lossChart is scene.GetFirstNodeByClass("vtkMRMLPlotChartNode")
    assert "cwd:1+coteacher:0.5" in report.summary() and "second-ct-teacher ×0.3" in report.summary()
    assert listing(mine) == ["ct-student"]  # the checkpoints went once the bundle was written


def test_teacher_and_ct_mr_student_in_process(scene, data, teachers, tmp_path):
    mine = tmp_path / "mine"
    logic = SceneLogic([mine], includeBundledModels=False)
    teacher = logic.trainTeacher(data["MR"], "MR", epochs=1, device="cpu",
                                 settings={**TINY, "architecture": TEACHER, "profile": {**CT_PROFILE, "modality": "MR",
                                                                                        "clip": None,
                                                                                        "percentiles": [0.5, 99.5]}})
    assert (teacher.model.name, teacher.model.role, teacher.model.modality) == ("mr-teacher", "teacher", "MR")
    assert teacher.methods == "supervised" and teacher.teachers == [] and len(teacher.epochLoss) == 1
    both = logic.distillUnpaired(data["CT"], data["MR"], ctTeacher=teachers["CT"], mrTeacher=teacher.model,
                                 epochs=1, device="cpu", settings=TINY, methods={"kd": 1.0, "coteacher": 0.5})
    assert (both.model.name, both.model.modality, both.task) == ("ct-mr-student", "CT+MR", "unpaired")
    assert both.model.teachers == {"CT": "selftest-ct-teacher", "MR": "mr-teacher"}
    assert both.methods == "kd:1+coteacher:0.5"  # each term once, though each modality has its own
    assert metadata(both.model.path)["method"]["name"] == "unpaired+kd:1+coteacher:0.5"
    assert {m.name for m in logic.listModels()} == {"mr-teacher", "ct-mr-student"}


# --- the jobs, in the worker ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_logic(tmp_path_factory):
    """One warm worker for these tests (its start-up imports torch and MONAI once)."""
    logic = SceneLogic([tmp_path_factory.mktemp("worker-models")], includeBundledModels=False)
    logic.warmUpWorker()
    yield logic
    logic.shutdownWorker()


def test_distil_through_an_assistant_in_the_worker(scene, data, teachers, worker_logic):
    job = worker_logic.startDistillStudent(data["CT"], teachers=teachers["CT"], methods="kd:1+cwd:0.5",
                                           assistant=True, epochs=2, temperature=3.0, device="cpu", settings=TINY)
    assert job.kind == "distill" and job.spec["assistant"] is True
    chart = scene.GetFirstNodeByClass("vtkMRMLPlotChartNode")
    assert chart.GetNumberOfPlotSeriesNodes() == 2  # the student's and the assistant's loss, in one chart
    report = job.wait(timeout=300)
    assert job.state == "done"
    student, assistant = report.model, report.assistant
    assert (student.name, assistant.name, assistant.role) == ("ct-student", "ct-student-assistant", "assistant")
    method = metadata(student.path)["method"]
    assert method["name"] == report.methods == "kd:1+cwd:0.5"
    assert [term["name"] for term in method["methods"]] == ["kd", "cwd"] and method["kd_temperature"] == 3.0
    assert [t["name"] for t in method["teachers"]] == [assistant.name] and student.teacher == assistant.name
    assert [link["name"] for link in method["chain"]] == ["selftest-ct-teacher", assistant.name]
    assert metadata(assistant.path)["method"]["teachers"][0]["name"] == "selftest-ct-teacher"
    assert {m.name: m.role for m in worker_logic.listModels()} == {student.name: "student", assistant.name: "assistant"}
    assert [e for e, _ in report.lossCurve.epochs()] == [1, 2]
    assert [e for e, _ in report.lossCurve.assistant.epochs()] == [1, 2]
    assert not Path(job.folder).exists()


def test_cancel_leaves_no_model_and_resume_finishes_the_run(scene, data, teachers, worker_logic):
    folder = worker_logic.modelsFolder()
    before = listing(folder)
    state = scene_state(scene)
    job = worker_logic.startDistillStudent(data["CT"], teachers=teachers["CT"], methods="kd+coteacher:0.5",
                                           epochs=3, device="cpu", settings={**TINY, "steps_per_epoch": 3},
                                           showChart=False)
    output = Path(job.spec["output"])
    cancel_during_epoch(job, 2, 3)  # epoch 1 is complete (and checkpointed) when epoch 2 starts
    with pytest.raises(CancelledError):
        job.raise_for_state()
    assert scene_state(scene) == state  # the loss curve went with the job
    assert not output.exists() and not list(folder.glob(".partial-*"))
    assert output.name not in [m.name for m in worker_logic.listModels()]
    assert listing(folder) == sorted(before + [output.name + ".checkpoint"])
    assert worker_logic.interruptedTrainings() == [output]

    stages = []
    report = worker_logic.resumeTraining(progress=lambda fraction, stage: stages.append(stage), showChart=False)
    assert report.model.path == output and report.methods == "kd:1+coteacher:0.5"
    assert any(stage.startswith("resumed after epoch") for stage in stages)
    assert not any(stage.startswith("epoch 1/3") for stage in stages)  # the finished epoch was not trained again
    assert len(report.epochLoss) == 3 and worker_logic.interruptedTrainings() == []
    assert listing(folder) == sorted(before + [output.name])


def test_a_run_interrupted_on_the_command_line_resumes_in_slicer(scene, data, tmp_path, monkeypatch):
    """The CLI records its run as the job spec Slicer's *Resume* runs (``engine.runs``), so a teacher whose
    training was interrupted in a terminal after its first epoch is offered and finished in Slicer."""
    from MedKDSegmentLib.engine import training as engine_training
    from MedKDSegmentLib.engine.cli import EXIT_INTERRUPTED, main

    folder = tmp_path / "models"
    output = folder / "cli-teacher"
    real_save = engine_training.save_checkpoint

    def interrupted_after_the_first_epoch(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C in the terminal, once epoch 1 is saved

    monkeypatch.setattr(engine_training, "save_checkpoint", interrupted_after_the_first_epoch)
    code = main(["--quiet", "train-teacher", "--modality", "CT", "--data", str(data["CT"]), "--output", str(output),
                 "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "1", "--patch-size", "16", "24", "24",
                 "--device", "cpu"])
    assert code == EXIT_INTERRUPTED and not output.exists()
    monkeypatch.undo()

    logic = SceneLogic([folder], includeBundledModels=False)
    assert training.interrupted_trainings([folder]) == [output]
    record = training.training_record(output)
    assert record["job"] == "train_teacher" and record["settings"]["epochs"] == 2
    stages = []
    report = logic.resumeTraining(output, progress=lambda fraction, stage: stages.append(stage), showChart=False)
    assert report.model.path == output and len(report.epochLoss) == 2
    assert any(stage.startswith("resumed after epoch 1") for stage in stages)
    assert training.interrupted_trainings([folder]) == [] and output.exists()
