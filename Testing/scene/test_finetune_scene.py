"""Fine-tuning from segments annotated in Slicer: segment names -> structures, labels on the volume's grid,
the job in-process and in the worker (live loss curve, cancel, resume), model versions, delete, before/after."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import slicer
from scene_helpers import cancel_during_epoch, node_content, scene_state

from MedKDSegmentLib import catalog
from MedKDSegmentLib.engine.errors import BundleError, CancelledError, InvalidInputError
from MedKDSegmentLib.engine.labels import ABDOMEN_STRUCTURES
from MedKDSegmentLib.engine.phantom import generate_phantom
from MedKDSegmentLib.engine.volume import Volume
from MedKDSegmentLib.scene import comparison, finetune, segmentations, volumes
from MedKDSegmentLib.scene import logic as scene_logic
from MedKDSegmentLib.scene.comparison import table_rows
from MedKDSegmentLib.scene.logic import SceneLogic

LABELS = {s.value: s.name for s in ABDOMEN_STRUCTURES}
PARENT = "selftest-ct-student"
# A few tiny steps: these tests check the plumbing (the engine's tests check that fine-tuning learns).
TINY = {"steps_per_epoch": 2, "batch_size": 1, "patch_size": (16, 24, 24)}
# The user's segment names: case and '_' differ from the model's, one name is unknown.
USER_NAMES = {1: "Liver", 2: "spleen", 3: "right_kidney", 4: "Tumour"}


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom("CT", 4242, size=(48, 40, 24), spacing=(6.0, 6.0, 6.0))


def parent_copy(models_dir: Path, folder: Path) -> Path:
    """A private copy of the tiny student: new versions land beside it, not in the shared models folder."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / PARENT
    if not target.exists():
        shutil.copytree(models_dir / PARENT, target)
    return target


def user_pair(phantom, name: str = "patient 7"):
    """A volume and a segmentation the user drew on it (liver, spleen, right kidney and a 'Tumour')."""
    image, truth = phantom
    volume_node = volumes.add_volume_node(image, name)
    labels = np.where(np.isin(truth.array, [1, 2, 3]), truth.array, 0).astype(np.uint8)
    labels[2:5, 2:6, 2:6] = 4  # a small region named like no structure of the model
    segmentation_node = segmentations.segmentation_from_labels(labels, volume_node, f"{name} annotations",
                                                               USER_NAMES)
    return volume_node, segmentation_node


@pytest.fixture
def private_logic(models_dir, tmp_path):
    folder = tmp_path / "my-models"
    parent_copy(models_dir, folder)
    logic = SceneLogic([folder], includeBundledModels=False)
    yield logic
    logic.shutdownWorker()


# --- names, labels ---------------------------------------------------------------------------------


def test_segment_names_are_matched_unknown_ones_reported_then_mapped_or_skipped(scene, phantom):
    _, segmentation_node = user_pair(phantom)
    before = node_content(segmentation_node)
    match = finetune.match_segments(segmentation_node, LABELS)
    assert match.matched == {"Liver": 1, "spleen": 2, "right_kidney": 3}
    assert match.unknown == ["Tumour"]
    with pytest.raises(InvalidInputError) as caught:
        match.raise_if_unknown()
    assert "Tumour" in caught.value.problem and "mapping" in caught.value.fix
    mapped = finetune.match_segments(segmentation_node, LABELS, mapping={"Tumour": "pancreas"})
    assert mapped.matched["Tumour"] == 7 and not mapped.unknown
    for skip in (["Tumour"], True):
        skipped = finetune.match_segments(segmentation_node, LABELS, skip=skip)
        assert skipped.skipped == ["Tumour"] and not skipped.unknown and len(skipped.matched) == 3
    assert node_content(segmentation_node) == before


def test_unknown_names_stop_a_run_before_anything_is_written(scene, phantom, private_logic):
    volume_node, segmentation_node = user_pair(phantom)
    state = scene_state(scene)
    folder = private_logic.modelsFolder()
    with pytest.raises(InvalidInputError, match="'Tumour' do not match"):
        private_logic.fineTune([(volume_node, segmentation_node)], model=PARENT, epochs=1, device="cpu",
                               settings=TINY)
    with pytest.raises(InvalidInputError, match=r"1 \(liver\), 2 \(spleen\)"):  # names the model's labels
        private_logic.fineTune((volume_node, segmentation_node), model=PARENT, mapping={"Tumour": "kidney stone"})
    assert scene_state(scene) == state
    assert sorted(p.name for p in folder.iterdir()) == [PARENT]


def test_segment_drawn_on_another_grid_comes_back_at_the_right_voxels_of_an_oblique_anisotropic_volume(scene):
    angle = math.radians(30)
    direction = (math.cos(angle), -math.sin(angle), 0.0, math.sin(angle), math.cos(angle), 0.0, 0.0, 0.0, 1.0)
    oblique = volumes.add_volume_node(Volume(np.zeros((14, 20, 16), np.int16), (1.5, 0.9, 2.5), (10.0, -4.0, 30.0),
                                             direction), "oblique")
    matrix = volumes.ijk_to_ras(oblique)
    centre = matrix @ np.array([7.5, 9.5, 6.5, 1.0])  # the middle of the oblique volume, in RAS
    # The user drew a ball of radius 7 mm on a fine axis-aligned grid (0.5 mm), not on the volume's grid.
    grid = Volume(np.zeros((80, 80, 80), np.int16), (0.5, 0.5, 0.5), (0.0, 0.0, 0.0))
    drawing = volumes.add_volume_node(grid, "drawing grid")
    drawing_matrix = volumes.ijk_to_ras(drawing)
    drawing_matrix[:3, 3] = centre[:3] - drawing_matrix[:3, :3] @ np.array([39.5, 39.5, 39.5])
    drawing.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(drawing_matrix))
    k, j, i = np.indices(grid.shape)
    ras = np.einsum("ab,bzyx->azyx", drawing_matrix[:3, :3], np.stack([i, j, k]).astype(float))
    ras += drawing_matrix[:3, 3, None, None, None]
    ball = (np.linalg.norm(ras - centre[:3, None, None, None], axis=0) <= 7.0).astype(np.uint8)
    user = segmentations.segmentation_from_labels(ball, drawing, "ball", {1: "Spleen"})
    before = node_content(user)

    labels = finetune.annotated_labels(user, oblique, {"Spleen": 2})
    assert labels.same_grid(volumes.volume_from_node(oblique))
    k, j, i = np.indices(labels.shape)
    ras = np.einsum("ab,bzyx->azyx", matrix[:3, :3], np.stack([i, j, k]).astype(float))
    ras += matrix[:3, 3, None, None, None]
    distance = np.linalg.norm(ras - centre[:3, None, None, None], axis=0)
    assert set(np.unique(labels.array).tolist()) == {0, 2}  # valued by the model's label table
    assert np.all(labels.array[distance <= 6.5] == 2)  # every voxel whose centre is well inside
    assert np.all(labels.array[distance >= 7.5] == 0)  # none well outside
    assert node_content(user) == before


def test_prepared_pair_is_on_the_volume_grid_with_only_the_matched_structures_annotated(scene, phantom):
    volume_node, segmentation_node = user_pair(phantom)
    _, truth = phantom
    pair = finetune.prepare_pair(volume_node, segmentation_node, LABELS, "CT", skip=True)
    assert pair.annotated == frozenset({1, 2, 3})
    np.testing.assert_array_equal(pair.labels.array, np.where(np.isin(truth.array, [1, 2, 3]), truth.array, 0))
    assert pair.labels.same_grid(pair.image) and pair.image.modality == "CT"
    with pytest.raises(InvalidInputError, match="all were skipped"):
        finetune.prepare_pair(volume_node, segmentation_node, LABELS, "CT",
                              mapping={"Liver": None, "spleen": None, "right_kidney": None}, skip=True)


# --- loss curve, before/after ----------------------------------------------------------------------


def test_loss_curve_has_one_row_per_epoch_and_is_shown_in_a_plot_view(scene):
    curve = finetune.LossCurve("tiny-v2")
    for stage in ("loading the parent model", "epoch 1/3 loss 0.9000", "epoch 1/3 loss 0.8000",
                  "resumed after epoch 1", "epoch 2/3 loss 0.7000", "epoch 3/3 loss nan"):
        curve.update(stage)
    assert curve.epochs() == [(1, 0.8), (2, 0.7)]  # a step's running mean updates its epoch's row
    curve.replace([0.8, 0.7, 0.6])
    assert curve.epochs() == [(1, 0.8), (2, 0.7), (3, 0.6)]
    assert curve.series.GetTableNode() is curve.table and curve.chart.GetPlotSeriesNode() is curve.series
    assert (curve.series.GetXColumnName(), curve.series.GetYColumnName()) == ("Epoch", "Loss")
    layout = comparison.layout_node()
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)  # no plot view in it
    curve.show()
    views = [scene.GetNthNodeByClass(i, "vtkMRMLPlotViewNode")
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLPlotViewNode"))]
    assert views and all(view.GetPlotChartNodeID() == curve.chart.GetID() for view in views)
    assert layout.GetViewArrangement() != slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView  # switched to show it
    curve.remove()  # a cancelled run
    assert scene.GetNodeByID(curve.chart.GetID()) is None
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView  # given back


def test_before_after_table_and_warning_when_the_new_version_is_worse(scene):
    rows = finetune.dice_rows({"liver": 0.8, "spleen": 0.5}, {"liver": 0.9, "spleen": 0.3}, ["spleen"])
    table = finetune.dice_table("v2 vs v1", rows, 0.65, 0.6)
    content = table_rows(table)
    assert [r["Structure"] for r in content] == ["liver", "spleen", "mean"]
    assert content[0]["Dice parent"] == pytest.approx(0.8) and content[0]["Dice new version"] == pytest.approx(0.9)
    assert [r["Verdict"] for r in content] == ["better", "worse", "worse"]
    assert content[1]["Change"] == pytest.approx(-0.2)
    warning = finetune.worse_warning(["spleen"], 0.65, 0.6)
    assert warning.startswith("WARNING") and "spleen" in warning and "0.650 -> 0.600" in warning
    assert finetune.worse_warning([], 0.6, 0.7) == ""


# --- the job -------------------------------------------------------------------------------------------


def test_fine_tune_in_process_writes_a_new_version_with_its_parent(scene, phantom, private_logic):
    volume_node, segmentation_node = user_pair(phantom)
    user_before = [node_content(volume_node), node_content(segmentation_node)]
    expected = private_logic.newVersionPath(PARENT)
    assert expected == private_logic.modelsFolder() / f"{PARENT}-v2"
    stages = []
    report = private_logic.fineTune([(volume_node, segmentation_node)], model=PARENT, epochs=3, skip=["Tumour"],
                                    device="cpu", settings=TINY, progress=lambda f, s: stages.append(s))
    assert report.model.path == expected and report.model.parent == PARENT and report.model.version == "1.1.0"
    assert any(s.startswith("epoch 3/3 loss") for s in stages)
    # The model list shows the version with its parent; the family lists parent then child.
    listed = {m.name: m for m in private_logic.listModels()}
    assert listed[expected.name].parent == PARENT and listed[expected.name].source == "user"
    assert [m.name for m in private_logic.listModelVersions(expected.name)] == [PARENT, expected.name]
    assert [m.name for m in private_logic.listModelVersions(PARENT)] == [PARENT, expected.name]
    # Loss curve: one row per epoch, the engine's epoch losses.
    assert len(report.epochLoss) == 3
    np.testing.assert_allclose([loss for _, loss in report.lossCurve.epochs()], report.epochLoss, rtol=1e-6)
    assert [epoch for epoch, _ in report.lossCurve.epochs()] == [1, 2, 3]
    # Before/after on held-out data, in a table (structures scored, then the mean).
    content = table_rows(report.diceTable)
    assert content[-1]["Structure"] == "mean" and len(content) == len(report.before) + 1
    assert set(report.before) <= {"liver", "spleen", "right kidney"} and report.heldOut
    assert content[-1]["Dice new version"] == pytest.approx(report.meanAfter, nan_ok=True)
    assert bool(report.warning) == bool(report.worse or report.meanAfter < report.meanBefore)
    # Nothing else was written, and the user's nodes are as they were.
    assert sorted(p.name for p in private_logic.modelsFolder().iterdir()) == sorted([PARENT, expected.name])
    assert [node_content(volume_node), node_content(segmentation_node)] == user_before


def test_resume_without_an_interrupted_run_is_explained(scene, phantom, private_logic):
    volume_node, segmentation_node = user_pair(phantom)
    assert private_logic.interruptedFineTune(PARENT) is None
    with pytest.raises(InvalidInputError, match="no interrupted fine-tuning run"):
        private_logic.fineTune([(volume_node, segmentation_node)], model=PARENT, skip=True, resume=True)


@pytest.fixture(scope="module")
def worker_logic(models_dir, tmp_path_factory):
    """One warm worker for the worker tests (its start-up imports torch and MONAI once)."""
    folder = tmp_path_factory.mktemp("worker-models")
    parent_copy(models_dir, folder)
    logic = SceneLogic([folder], includeBundledModels=False)
    logic.warmUpWorker()
    yield logic
    logic.shutdownWorker()


def test_fine_tune_in_the_worker_fills_the_loss_curve_live(scene, phantom, worker_logic):
    volume_node, segmentation_node = user_pair(phantom)
    user_before = [node_content(volume_node), node_content(segmentation_node)]
    expected = worker_logic.newVersionPath(PARENT)
    job = worker_logic.startFineTune([(volume_node, segmentation_node)], model=PARENT, epochs=3, skip=True,
                                     device="cpu", settings=TINY)
    assert job.kind == "finetune"
    folder = Path(job.folder)
    assert sorted(p.name for p in folder.iterdir()) == ["image-0.nrrd", "labels-0.nrrd"]
    curve_table = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLPlotChartNode")
    assert curve_table is not None  # the chart exists (and is shown) from the start
    live = []
    show = job.on_progress
    job.on_progress = lambda fraction, stage: (show(fraction, stage), live.append(len(_curve_rows(scene))))
    report = job.wait(timeout=300)
    assert job.state == "done"
    assert live[0] == 0 and {1, 2, 3} <= set(live)  # rows arrived while the worker trained
    assert report.model.path == expected and report.model.parent == PARENT
    assert [e for e, _ in report.lossCurve.epochs()] == [1, 2, 3]
    assert expected.name in [m.name for m in worker_logic.listModels()]
    assert not folder.exists()
    assert [node_content(volume_node), node_content(segmentation_node)] == user_before


def _curve_rows(scene) -> list:
    table = scene.GetFirstNodeByClass("vtkMRMLPlotChartNode").GetPlotSeriesNode().GetTableNode()
    return [r for r in range(table.GetNumberOfRows())]


def test_cancel_leaves_no_model_and_the_run_resumes_where_it_stopped(scene, phantom, worker_logic):
    volume_node, segmentation_node = user_pair(phantom)
    state = scene_state(scene)
    folder = worker_logic.modelsFolder()
    models_before = sorted(p.name for p in folder.iterdir())
    output = worker_logic.newVersionPath(PARENT)
    settings = {**TINY, "steps_per_epoch": 3}
    job = worker_logic.startFineTune([(volume_node, segmentation_node)], model=PARENT, epochs=4, skip=True,
                                     device="cpu", settings=settings, showChart=False)
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 1
    cancel_during_epoch(job, 2, 4)  # epoch 1 is complete (and checkpointed) when epoch 2 starts
    with pytest.raises(CancelledError):
        job.raise_for_state()
    assert scene_state(scene) == state  # the loss curve (table, series, chart) went with the job
    assert not output.exists() and not list(folder.glob(".partial-*"))
    assert worker_logic.interruptedFineTune(PARENT) == output
    assert [p for p in sorted(p.name for p in folder.iterdir()) if not p.endswith(".checkpoint")] == models_before

    stages = []
    report = worker_logic.fineTune([(volume_node, segmentation_node)], model=PARENT, epochs=4, skip=True,
                                   device="cpu", settings=settings, resume=True,
                                   progress=lambda f, s: stages.append(s))
    assert report.model.path == output
    assert any(s.startswith("resumed after epoch") for s in stages)
    assert not any(s.startswith("epoch 1/4") for s in stages)  # the finished epoch was not trained again
    assert len(report.epochLoss) == 4 and [e for e, _ in report.lossCurve.epochs()] == [1, 2, 3, 4]
    assert worker_logic.interruptedFineTune(PARENT) is None


# --- versions ------------------------------------------------------------------------------------------


def test_delete_refuses_bundled_models_and_removes_a_users_version(models_dir, tmp_path, monkeypatch):
    bundled = tmp_path / "Resources" / "Models"
    shutil.copytree(models_dir / "selftest-ct-teacher", bundled / "selftest-ct-teacher")
    monkeypatch.setattr(catalog, "bundled_models_dir", lambda: bundled)
    mine = tmp_path / "mine"
    parent_copy(models_dir, mine)
    logic = SceneLogic([mine], includeBundledModels=True)
    teacher = next(m for m in logic.listModels() if m.name == "selftest-ct-teacher")
    assert teacher.source == "bundled" and logic.isBundled(teacher)
    for given in (teacher.name, str(teacher.path), teacher):
        with pytest.raises(BundleError, match="bundled models cannot be deleted") as caught:
            logic.deleteModel(given)
        assert caught.value.fix
    assert (teacher.path / "models" / "model.pt").is_file()
    assert not logic.isBundled(PARENT)
    assert logic.deleteModel(PARENT) == []
    assert PARENT not in [m.name for m in logic.listModels()] and not (mine / PARENT).exists()


def test_without_a_user_folder_new_versions_go_to_the_default_folder(models_dir, default_models_folder):
    logic = SceneLogic([], includeBundledModels=False)
    assert scene_logic.default_models_folder() == default_models_folder  # conftest points it at a temporary one
    assert logic.modelsFolder() == default_models_folder
    parent_copy(models_dir, default_models_folder)
    try:
        assert [m.name for m in logic.listModels()] == [PARENT]
        assert logic.newVersionPath(PARENT) == default_models_folder / f"{PARENT}-v2"
    finally:
        shutil.rmtree(default_models_folder / PARENT)
