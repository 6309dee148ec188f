"""The real abdominal CT (NIfTI and its DICOM series) through Slicer's storage nodes, segmented by a student."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk

from MedKDSegmentLib import catalog
from MedKDSegmentLib.engine.volume import read_volume
from MedKDSegmentLib.scene import volumes

STRUCTURES = ["liver", "spleen", "right kidney", "left kidney", "aorta", "vertebral bodies", "pancreas",
              "inferior vena cava"]


def assert_result_on_grid(node, volume_node, names):
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == names
    labelmap = segmentation.GetNthSegment(0).GetRepresentation("Binary labelmap")
    assert labelmap.GetDimensions() == volume_node.GetImageData().GetDimensions()
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), volumes.ijk_to_ras(volume_node), atol=1e-6)
    assert node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) \
        is volume_node


@pytest.mark.parametrize("source", ["ct.nii.gz", "ct_dicom"])
def test_real_ct_loads_through_storage_nodes_and_is_segmented_on_its_grid(source, real_ct_dir, scene, logic):
    path = real_ct_dir / source
    node = volumes.load_volume_node(path)
    loaded = volumes.volume_from_node(node)
    reference = read_volume(path)  # SimpleITK's reading of the same file or series
    np.testing.assert_array_equal(loaded.array, reference.array)
    assert loaded.same_grid(reference, tolerance=1e-4)
    modality, how = logic.detectModality(node)
    assert modality == "CT"
    assert how == ("DICOM" if source == "ct_dicom" else "intensities")
    result = logic.segment(node, model="selftest-ct-student", device="cpu")
    assert result.GetName() == f"{node.GetName()} - selftest-ct-student"
    assert_result_on_grid(result, node, STRUCTURES)


def test_bundled_student_on_the_real_ct(real_ct_dir, scene):
    """With the bundled models installed, the real student segments the real CT (validity, not accuracy)."""
    from MedKDSegmentLib.scene.logic import SceneLogic

    logic = SceneLogic()
    students = logic.listModels(modality="CT", role="student")
    bundled = [m for m in students if m.source == "bundled"]
    if not bundled:
        pytest.skip(f"no bundled CT student in {catalog.bundled_models_dir()} yet")
    node = volumes.load_volume_node(real_ct_dir / "ct.nii.gz")
    result = logic.segment(node, model=bundled[0].name, device="cpu")
    assert_result_on_grid(result, node, list(bundled[0].labels.values()))
    assert result.GetAttribute("MedKDSegment.Model") == bundled[0].name


def test_comparison_views_show_the_real_ct_which_lies_far_from_the_origin(real_ct_dir, scene):
    """The real CT spans S 92.8-182.8 mm, outside MRML's default slice plane: the views are fitted to it."""
    from MedKDSegmentLib.scene import comparison

    node = volumes.load_volume_node(real_ct_dir / "ct.nii.gz")
    first, second = (slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode") for _ in range(2))
    ids = comparison.show_comparison(node, first, second)
    bounds = [0.0] * 6
    node.GetRASBounds(bounds)
    assert bounds[4] > 50  # the volume does not contain the default plane S = 0
    for name in (comparison.TEACHER_VIEW, comparison.STUDENT_VIEW):
        view = slicer.mrmlScene.GetNodeByID(ids[name])
        centre = slicer.util.arrayFromVTKMatrix(view.GetSliceToRAS())[:3, 3]
        assert all(bounds[2 * i] <= centre[i] <= bounds[2 * i + 1] for i in range(3)), (name, centre, bounds)
        field = view.GetFieldOfView()
        assert field[0] >= bounds[1] - bounds[0] - 1e-3 or field[1] >= bounds[3] - bounds[2] - 1e-3


def test_the_comparison_on_the_real_ct_is_saved_and_reopened_with_each_overlay_in_its_fitted_view(
        real_ct_dir, scene, application, tmp_path):
    """Compare with the bundled models on the real CT, save the scene (.mrb), reopen it: each model's overlay is
    shown in its own view, and each view's plane lies in the volume. MEDKDSEGMENT_COMPARISON_SCENE keeps the saved
    scene (for ../shared/tools/render_scene.py, which draws docs/comparison_real_ct.png from it)."""
    import os
    from pathlib import Path

    from MedKDSegmentLib.engine.demo import model_name
    from MedKDSegmentLib.scene import comparison
    from MedKDSegmentLib.scene.logic import SceneLogic

    node = volumes.load_volume_node(real_ct_dir / "ct.nii.gz")
    result = SceneLogic().compare(node, teacher=model_name("CT", "teacher"), student=model_name("CT", "student"),
                                  device="cpu")
    path = Path(os.environ.get("MEDKDSEGMENT_COMPARISON_SCENE") or tmp_path / "comparison.mrb")
    assert scene.WriteToMRB(str(path))
    reopened = application.new_scene()
    cache, io, messages = slicer.vtkCacheManager(), slicer.vtkDataIOManager(), slicer.vtkMRMLMessageCollection()
    cache.SetRemoteCacheDirectory(str(tmp_path / "cache"))  # where ReadFromMRB unpacks, as Slicer sets it up
    io.SetCacheManager(cache)
    reopened.SetCacheManager(cache)
    reopened.SetDataIOManager(io)
    assert reopened.ReadFromMRB(str(path), False, messages), messages.GetAllMessagesAsString()
    layout = reopened.GetFirstNodeByClass("vtkMRMLLayoutNode")
    assert layout.GetViewArrangement() == comparison.LAYOUT_ID
    volume = reopened.GetFirstNodeByName(node.GetName())
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    for name, segmentation in ((comparison.TEACHER_VIEW, result.teacherSegmentation),
                               (comparison.STUDENT_VIEW, result.studentSegmentation)):
        view = reopened.GetNodeByID(result.viewNodeIds[name])
        centre = slicer.util.arrayFromVTKMatrix(view.GetSliceToRAS())[:3, 3]
        assert all(bounds[2 * i] <= centre[i] <= bounds[2 * i + 1] for i in range(3)), name
        display = reopened.GetNodeByID(segmentation.GetID()).GetDisplayNode()
        other = result.viewNodeIds[next(v for v in comparison.SLICE_VIEWS if v != name)]
        assert display.IsDisplayableInView(view.GetID()) and not display.IsDisplayableInView(other)
    camera = next(reopened.GetNthNodeByClass(i, "vtkMRMLCameraNode")
                  for i in range(reopened.GetNumberOfNodesByClass("vtkMRMLCameraNode"))
                  if reopened.GetNthNodeByClass(i, "vtkMRMLCameraNode").GetLayoutName() == comparison.THREE_D_VIEW)
    focal = camera.GetFocalPoint()
    assert all(bounds[2 * i] <= focal[i] <= bounds[2 * i + 1] for i in range(3))  # the 3D view looks at the scan
