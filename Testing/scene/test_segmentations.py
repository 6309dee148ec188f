"""Labels -> new segmentation nodes (names, colours, label values, geometry) and a user's segmentation -> labels."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk
from scene_helpers import node_content, scene_state

from MedKDSegmentLib import jobs
from MedKDSegmentLib.engine.errors import InvalidInputError
from MedKDSegmentLib.engine.volume import Volume
from MedKDSegmentLib.scene import segmentations, volumes

NAMES = {1: "liver", 2: "spleen", 3: "right kidney"}
COLORS = {1: (0.9, 0.5, 0.4), 2: (0.6, 0.4, 0.6), 3: (0.7, 0.5, 0.3)}
BINARY = "Binary labelmap"


def labels_for(node) -> np.ndarray:
    shape = tuple(reversed(node.GetImageData().GetDimensions()))
    labels = np.zeros(shape, np.uint8)
    labels[1:4, 1:4, 1:4] = 1
    labels[4:6, 2:5, 0:2] = 3  # "spleen" (2) is absent: it must still get an (empty) segment
    return labels


@pytest.fixture
def oblique_node(scene):
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    volume = Volume(np.arange(7 * 6 * 5, dtype=np.int16).reshape(7, 6, 5), (0.8, 1.2, 2.0), (5.0, -3.0, 40.0),
                    direction)
    return volumes.add_volume_node(volume, "patient 1")


def test_new_node_has_name_segments_colours_and_label_values(oblique_node):
    node = segmentations.segmentation_from_labels(labels_for(oblique_node), oblique_node, "patient 1 - tiny-student",
                                                  NAMES, COLORS, {"Model": "tiny-student", "Device": "cpu"})
    assert node.GetName() == "patient 1 - tiny-student"
    segmentation = node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    found = {segmentation.GetSegment(i).GetName(): segmentation.GetSegment(i) for i in ids}
    assert list(found) == ["liver", "spleen", "right kidney"]
    for value, name in NAMES.items():
        assert found[name].GetLabelValue() == value
        np.testing.assert_allclose(found[name].GetColor(), COLORS[value])
    assert segmentation.GetNumberOfLayers() == 1  # one shared labelmap, as a .seg.nrrd loads
    assert node.GetAttribute("MedKDSegment.Model") == "tiny-student"
    assert node.GetDisplayNode() is not None


def test_labelmap_lies_on_the_input_grid_and_reference_geometry_is_set(oblique_node):
    labels = labels_for(oblique_node)
    node = segmentations.segmentation_from_labels(labels, oblique_node, "result", NAMES, COLORS)
    image = node.GetSegmentation().GetNthSegment(0).GetRepresentation(BINARY)
    assert image.GetDimensions() == oblique_node.GetImageData().GetDimensions()
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), volumes.ijk_to_ras(oblique_node), atol=1e-9)
    reference = node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    assert reference is oblique_node
    for value, name in NAMES.items():  # exported on the volume's grid, every voxel where it was
        exported = slicer.util.arrayFromSegmentBinaryLabelmap(node, name, oblique_node)
        np.testing.assert_array_equal(exported > 0, labels == value)


def test_result_follows_the_volumes_transform_and_does_not_change_it(oblique_node, scene):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    oblique_node.SetAndObserveTransformNodeID(transform.GetID())
    before = node_content(oblique_node)
    node = segmentations.segmentation_from_labels(labels_for(oblique_node), oblique_node, "r", NAMES, COLORS)
    assert node.GetTransformNodeID() == transform.GetID()
    assert node_content(oblique_node) == before


def test_names_are_made_unique_and_wrong_shapes_leave_no_node(oblique_node, scene):
    first = segmentations.segmentation_from_labels(labels_for(oblique_node), oblique_node, "same", NAMES)
    second = segmentations.segmentation_from_labels(labels_for(oblique_node), oblique_node, "same", NAMES)
    assert first.GetName() == "same" and second.GetName() != "same"
    state = scene_state(scene)
    with pytest.raises(InvalidInputError, match="do not fit"):
        segmentations.segmentation_from_labels(np.zeros((2, 2, 2), np.uint8), oblique_node, "bad", NAMES)
    assert scene_state(scene) == state


def test_reference_segmentation_becomes_labels_by_name_without_touching_it(oblique_node, scene):
    truth = labels_for(oblique_node)
    user = segmentations.segmentation_from_labels(truth, oblique_node, "my truth",
                                                  {1: "Liver", 3: "right_kidney", 2: "something else"})
    user_state, nodes_before = node_content(user), scene.GetNumberOfNodes()
    labels = segmentations.labels_from_segmentation(user, oblique_node, NAMES)
    # Liver -> 1, right_kidney -> 3 (names matched ignoring case and '_'); "something else" is ignored.
    np.testing.assert_array_equal(labels.array, truth)
    assert labels.same_grid(volumes.volume_from_node(oblique_node))
    assert node_content(user) == user_state
    assert user.GetSegmentation().GetNumberOfSegments() == 3
    assert scene.GetNumberOfNodes() == nodes_before  # temporary nodes are gone


def test_reference_without_matching_names_is_explained(oblique_node):
    user = segmentations.segmentation_from_labels(labels_for(oblique_node), oblique_node, "other", {1: "tumour"})
    with pytest.raises(InvalidInputError, match="liver, spleen, right kidney"):
        segmentations.labels_from_segmentation(user, oblique_node, NAMES)


def test_disagreement_marks_each_kind_of_difference():
    teacher = np.array([[[0, 1, 1, 2, 0]]], np.uint8)
    student = np.array([[[0, 1, 0, 3, 4]]], np.uint8)
    np.testing.assert_array_equal(jobs.disagreement(teacher, student), [[[0, 0, 1, 3, 2]]])
    assert jobs.DISAGREEMENT_NAMES == {1: "teacher only", 2: "student only", 3: "different structure"}
    with pytest.raises(InvalidInputError):
        jobs.disagreement(teacher, student[..., :3])


def test_segments_carry_their_coded_terminology_in_the_scene_and_in_a_seg_nrrd_slicer_reads(oblique_node, tmp_path):
    """Known structures get their SNOMED CT category, type and laterality as Slicer's terminology entry: set on
    the segments made in the scene, and written into the engine's .seg.nrrd, which Slicer's own storage node
    reads back with the same entry."""
    from MedKDSegmentLib.engine.labels import ABDOMEN_STRUCTURES, known_structure
    from MedKDSegmentLib.engine.segfile import write_seg_nrrd

    names = {s.value: s.name for s in ABDOMEN_STRUCTURES}
    node = segmentations.segmentation_from_labels(labels_for(oblique_node), oblique_node, "coded", names)
    tag = slicer.vtkSegment.GetTerminologyEntryTagName()
    labels = Volume(labels_for(oblique_node), (0.8, 1.2, 2.0), (5.0, -3.0, 40.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    path = write_seg_nrrd(labels, tmp_path / "coded.seg.nrrd", names)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    loaded = slicer.vtkMRMLSegmentationNode()
    assert storage.ReadData(loaded)
    for made in (node.GetSegmentation(), loaded.GetSegmentation()):
        segments = [made.GetNthSegment(i) for i in range(made.GetNumberOfSegments())]
        assert [s.GetName() for s in segments] == list(names.values())
        for segment in segments:
            entry = vtk.mutable("")
            assert segment.GetTag(tag, entry)
            assert str(entry) == known_structure(segment.GetName()).terminology.serialized()
    right = known_structure("right kidney").terminology.serialized().split("~")
    assert len(right) == 7 and right[2] == "SCT^64033007^Kidney" and right[3] == "SCT^24028007^Right"


def test_each_abdominal_structure_has_a_distinct_colour_and_a_terminology_entry():
    import itertools
    import math

    from MedKDSegmentLib.engine.labels import ABDOMEN_STRUCTURES

    assert min(math.dist(a.color, b.color) for a, b in itertools.combinations(ABDOMEN_STRUCTURES, 2)) > 0.25
    for structure in ABDOMEN_STRUCTURES:
        parts = structure.terminology.serialized().split("~")
        assert len(parts) == 7 and parts[1] == "SCT^123037004^Anatomical Structure"
        assert all(len(code.split("^")) == 3 for code in parts[1:4] + parts[5:])
