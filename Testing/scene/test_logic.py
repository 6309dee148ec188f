"""The Logic in-process: model list, segment, compare (layout, per-view display, tables); errors leave the
scene alone."""

from __future__ import annotations

import json
import math
import shutil
import types

import numpy as np
import pytest
import slicer
from scene_helpers import node_content, scene_state

from MedKDSegmentLib import catalog, jobs
from MedKDSegmentLib.engine.errors import CancelledError, InvalidInputError
from MedKDSegmentLib.scene import comparison, volumes

STRUCTURES = ["liver", "spleen", "right kidney", "left kidney", "aorta", "vertebral bodies", "pancreas",
              "inferior vena cava"]


def test_model_list_shows_modality_labels_size_and_skips_broken_bundles(logic, models_dir, tmp_path):
    models = {m.name: m for m in logic.listModels()}
    assert set(models) == {"selftest-ct-teacher", "selftest-ct-student", "selftest-mr-teacher", "selftest-mr-student"}
    student = models["selftest-ct-student"]
    assert (student.role, student.modality, student.source) == ("student", "CT", "user")
    assert list(student.labels.values()) == STRUCTURES
    assert student.size_mb > 0 and student.parameters > 0
    assert student.teacher == "selftest-ct-teacher"
    assert "CT" in student.describe() and "8 labels" in student.describe()
    assert [m.name for m in logic.listModels(modality="mr", role="student")] == ["selftest-mr-student"]
    # A damaged bundle is skipped, not fatal; a half-written one is never offered.
    broken = tmp_path / "models"
    shutil.copytree(models_dir / "selftest-ct-student", broken / "damaged")
    (broken / "damaged" / catalog.METADATA).write_text("{not json")
    shutil.copytree(models_dir / "selftest-ct-student", broken / ".partial-x")
    assert catalog.list_models([broken], include_bundled=False) == []


def test_defaults_pair_a_student_with_its_teacher(logic):
    student, teacher = logic.defaultModels("CT")
    assert (student.name, teacher.name) == ("selftest-ct-student", "selftest-ct-teacher")


def test_segment_makes_a_new_named_node_on_the_input_grid_and_leaves_the_input_alone(logic, scene, ct_node):
    before_volume, before_nodes = node_content(ct_node), scene.GetNumberOfNodes()
    fractions = []
    node = logic.segment(ct_node, model="selftest-ct-student", device="cpu",
                         progress=lambda fraction, stage: fractions.append(fraction))
    assert node.GetName() == "phantom CT - selftest-ct-student"
    assert node.IsA("vtkMRMLSegmentationNode")
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == STRUCTURES
    labelmap = segmentation.GetNthSegment(0).GetRepresentation("Binary labelmap")
    assert labelmap.GetDimensions() == ct_node.GetImageData().GetDimensions()
    assert node.GetAttribute("MedKDSegment.Model") == "selftest-ct-student"
    assert node.GetAttribute("MedKDSegment.Device").startswith("cpu")
    assert float(node.GetAttribute("MedKDSegment.Seconds")) > 0
    assert fractions and fractions[-1] == 1.0
    assert node_content(ct_node) == before_volume
    assert scene.GetNumberOfNodes() > before_nodes


def test_modality_mismatch_and_cancel_leave_the_scene_exactly_as_it_was(logic, scene, ct_node):
    state = scene_state(scene)
    with pytest.raises(InvalidInputError, match="is CT but model 'selftest-mr-student' is for MR"):
        logic.segment(ct_node, model="selftest-mr-student", device="cpu")
    with pytest.raises(CancelledError):
        logic.segment(ct_node, model="selftest-ct-student", device="cpu", cancel=lambda: True)
    with pytest.raises(InvalidInputError, match="No input volume"):
        logic.segment(None)
    assert scene_state(scene) == state


def test_forced_modality_overrides_detection(logic, ct_node):
    # Detection says CT; forcing MR selects the MR student (which then runs on this volume).
    node = logic.segment(ct_node, device="cpu", modality="MR")
    assert node.GetAttribute("MedKDSegment.Model") == "selftest-mr-student"


@pytest.fixture(scope="module")
def shared_comparison(application, models_dir, ct_volume):
    """One comparison (the expensive part) shared by the tests below, with the phantom's own truth as
    the user's reference segmentation."""
    from MedKDSegmentLib.engine.phantom import generate_phantom
    from MedKDSegmentLib.scene.logic import SceneLogic
    from MedKDSegmentLib.scene.segmentations import segmentation_from_labels
    from MedKDSegmentLib.selftest import SEED

    scene = application.new_scene()
    ct_node = volumes.add_volume_node(ct_volume, "phantom CT")
    _, truth = generate_phantom("CT", SEED, size=ct_volume.shape[::-1], spacing=ct_volume.spacing)
    reference = segmentation_from_labels(truth.array, ct_node, "truth", dict(enumerate(STRUCTURES, start=1)))
    before = {n.GetID(): node_content(n) for n in (ct_node, reference)}
    result = SceneLogic([models_dir], includeBundledModels=False).compare(ct_node, referenceSegmentationNode=reference,
                                                                    device="cpu")
    return types.SimpleNamespace(result=result, reference=reference, before=before, scene=scene, ct_node=ct_node)


@pytest.fixture
def compared(application, shared_comparison):
    application.use(shared_comparison.scene)
    return shared_comparison


def test_compare_makes_two_segmentations_and_a_disagreement(compared):
    result, reference, before, ct_node = compared.result, compared.reference, compared.before, compared.ct_node
    assert result.teacherSegmentation.GetName() == "phantom CT - selftest-ct-teacher"
    assert result.studentSegmentation.GetName() == "phantom CT - selftest-ct-student"
    disagreement = result.disagreementSegmentation
    assert disagreement.GetName() == "phantom CT - teacher vs student disagreement"
    names = [disagreement.GetSegmentation().GetNthSegment(i).GetName() for i in range(3)]
    assert names == ["teacher only", "student only", "different structure"]
    # Each result is one shared labelmap layer holding the model's label values.
    layers = [slicer.util.arrayFromSegmentInternalBinaryLabelmap(node, node.GetSegmentation().GetNthSegmentID(0))
              for node in (result.teacherSegmentation, result.studentSegmentation, disagreement)]
    assert layers[0].shape == layers[2].shape == volumes.volume_from_node(ct_node).shape
    np.testing.assert_array_equal(layers[2], jobs.disagreement(layers[0], layers[1]))
    assert set(np.unique(layers[0])) <= set(range(9))
    assert before == {n.GetID(): node_content(n) for n in (ct_node, reference)}  # user's nodes untouched


def test_compare_table_has_dice_hd95_reference_and_volumes_per_structure(compared):
    result = compared.result
    rows = comparison.table_rows(result.structuresTable)
    assert [r["Structure"] for r in rows] == STRUCTURES + ["mean"]
    for column in ("Dice teacher-student", "HD95 teacher-student", "Dice teacher-reference",
                   "Dice student-reference", "Volume teacher", "Volume student", "Volume reference"):
        assert column in rows[0], column
    for row, engine_row in zip(rows, result.rows):
        assert row["Dice teacher-student"] == pytest.approx(engine_row["dice_first_vs_second"], nan_ok=True)
        dice = row["Dice student-reference"]
        assert math.isnan(dice) or 0.0 <= dice <= 1.0
    liver_ml = rows[0]["Volume reference"]
    assert 100 < liver_ml < 5000  # the phantom's liver is a liver-sized structure (ml, not voxels or mm³)
    mean = rows[-1]  # Dice and HD95 average over structures; volumes of different organs do not
    assert mean["Dice teacher-student"] == pytest.approx(
        np.nanmean([r["Dice teacher-student"] for r in rows[:-1]]))
    assert all(math.isnan(mean[c]) for c in ("Volume teacher", "Volume student", "Volume reference"))
    table = result.structuresTable
    assert table.GetColumnUnitLabel("Volume teacher") == "ml"
    assert table.GetColumnUnitLabel("HD95 teacher-student") == "mm"


def test_compare_models_table_has_run_time_parameters_and_device(compared, models_dir):
    result = compared.result
    rows = comparison.table_rows(result.modelsTable)
    assert [r["Role"] for r in rows] == ["teacher", "student"]
    for row, role in zip(rows, ("teacher", "student")):
        metadata = json.loads((models_dir / f"selftest-ct-{role}" / catalog.METADATA).read_text(encoding="utf-8"))
        assert row["Parameters"] == metadata["medkdsegment"]["parameters"]
        assert row["Run time"] > 0
        assert row["Device"].startswith("cpu")
        assert row["Warning"] == ""  # phantoms are these tiny models' own world (they record none)
    assert rows[0]["Speed-up"] == 1.0
    assert rows[1]["Speed-up"] == pytest.approx(rows[0]["Run time"] / rows[1]["Run time"])


def test_compare_layout_shows_each_model_only_in_its_own_linked_view(compared):
    """And after switching back to Slicer's usual layout, its slice views show the student's result."""
    result, scene, ct_node = compared.result, compared.scene, compared.ct_node
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    assert layout.GetViewArrangement() == comparison.LAYOUT_ID
    assert layout.IsLayoutDescription(comparison.LAYOUT_ID)
    assert "MedKDTeacher" in layout.GetLayoutDescription(comparison.LAYOUT_ID)
    ids = result.viewNodeIds
    teacher_view = scene.GetNodeByID(ids["MedKDTeacher"])
    student_view = scene.GetNodeByID(ids["MedKDStudent"])
    three_d = scene.GetNodeByID(ids["1"])
    assert teacher_view.IsA("vtkMRMLSliceNode") and student_view.IsA("vtkMRMLSliceNode")
    assert three_d.IsA("vtkMRMLViewNode")
    assert teacher_view.GetViewGroup() == student_view.GetViewGroup()
    teacher_display = result.teacherSegmentation.GetDisplayNode()
    student_display = result.studentSegmentation.GetDisplayNode()
    assert teacher_display.GetViewNodeIDs() == (teacher_view.GetID(),)
    standard = tuple(v for v in comparison.STANDARD_SLICE_VIEWS if scene.GetNodeByID(v) is not None)
    assert standard  # the usual views exist in this scene, as in Slicer
    assert student_display.GetViewNodeIDs() == (student_view.GetID(), *standard)
    assert teacher_display.IsDisplayableInView(teacher_view.GetID())
    assert not teacher_display.IsDisplayableInView(student_view.GetID())
    assert not student_display.IsDisplayableInView(teacher_view.GetID())
    # The disagreement: outlined on both slice views (the models' fills stay readable), translucent in 3D.
    disagreement = result.disagreementSegmentation.GetDisplayNode()
    assert disagreement.GetViewNodeIDs() == (teacher_view.GetID(), student_view.GetID(), three_d.GetID())
    assert disagreement.GetVisibility2DOutline() and not disagreement.GetVisibility2DFill()
    assert disagreement.GetVisibility3D() and disagreement.GetOpacity3D() < 1
    for view in (teacher_view, student_view):  # both show the input volume, with linked navigation
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLScene(scene)
        logic.SetSliceNode(view)  # Slicer's slice logic adopts the composite node prepared for the view
        composite = logic.GetSliceCompositeNode()
        assert composite.GetBackgroundVolumeID() == ct_node.GetID()
        assert composite.GetLinkedControl()


def test_compare_rejects_a_reference_without_known_structures(logic, scene, ct_node):
    from MedKDSegmentLib.scene.segmentations import segmentation_from_labels

    other = segmentation_from_labels(np.zeros(volumes.volume_from_node(ct_node).shape, np.uint8), ct_node, "x",
                                     {1: "tumour"})
    state = scene_state(scene)
    with pytest.raises(InvalidInputError, match="named like a structure"):
        logic.compare(ct_node, referenceSegmentationNode=other, device="cpu")
    assert scene_state(scene) == state


def test_models_table_carries_the_speed_up_and_each_models_warning(scene):
    runs = [{"role": "teacher", "model": "t", "seconds": 12.0, "parameters": 10, "device": "cpu", "windows": 1},
            {"role": "student", "model": "s", "seconds": 0.5, "parameters": 1, "device": "cpu", "windows": 8,
             "warnings": ["This scan looks unlike what 's' was trained on."]}]
    rows = comparison.table_rows(comparison.models_table("models", runs))
    assert [r["Speed-up"] for r in rows] == [1.0, 24.0]
    assert rows[0]["Warning"] == "" and rows[1]["Warning"].startswith("This scan looks unlike")


def test_phantom_trained_models_say_so_in_the_model_list_and_the_comparison_table(scene, real_ct_dir):
    """Until real models exist, a user must see which models were trained on phantoms (they fail on real scans)."""
    from MedKDSegmentLib.engine.bundle import resolve_bundle
    from MedKDSegmentLib.engine.demo import model_name
    from MedKDSegmentLib.scene.logic import SceneLogic

    bundled = {m.name: m for m in catalog.list_models()}
    for role in ("teacher", "student"):
        info = bundled[model_name("CT", role)]
        assert "phantom" in info.trained_on and info.describe().endswith(f"trained on {info.trained_on}")
        assert info.colors == resolve_bundle(info.name).colors  # one rule for colours: the label table's
    node = volumes.load_volume_node(real_ct_dir / "ct.nii.gz")
    result = SceneLogic().compare(node, teacher=model_name("CT", "teacher"), student=model_name("CT", "student"),
                                  device="cpu", showLayout=False)
    rows = comparison.table_rows(result.modelsTable)
    assert [r["Trained on"] for r in rows] == [bundled[model_name("CT", r)].trained_on for r in ("teacher", "student")]
    assert all("phantom" in r["Trained on"] for r in rows)
