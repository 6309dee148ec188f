"""``.seg.nrrd`` files read back by SimpleITK and by Slicer's own segmentation storage node."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from MedKDSegmentLib.engine.labels import ABDOMEN_STRUCTURES, label_names
from MedKDSegmentLib.engine.phantom import generate_phantom
from MedKDSegmentLib.engine.segfile import read_seg_nrrd_names, write_seg_nrrd
from MedKDSegmentLib.engine.volume import read_volume


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    _, labels = generate_phantom("CT", seed=1, size=(48, 40, 32), spacing=(7.0, 7.0, 7.0))
    path = tmp_path_factory.mktemp("seg") / "phantom.seg.nrrd"
    colors = {s.value: s.color for s in ABDOMEN_STRUCTURES}
    write_seg_nrrd(labels, path, label_names(), colors)
    return labels, path


def test_simpleitk_reads_labels_and_names(written):
    labels, path = written
    back = read_volume(path)
    assert back.same_grid(labels)
    np.testing.assert_array_equal(back.array, labels.array)
    assert read_seg_nrrd_names(path) == label_names()
    assert sitk.ReadImage(str(path)).GetMetaData("Segment0_Layer") == "0"


def test_slicer_reads_segments_with_names_colours_and_voxels(written):
    slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed")
    labels, path = written
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(ABDOMEN_STRUCTURES)
    for structure in ABDOMEN_STRUCTURES:
        segment = segmentation.GetSegment(f"Segment_{structure.value}")
        assert segment.GetName() == structure.name
        assert segment.GetColor() == pytest.approx(structure.color, abs=1e-3)
        assert segment.GetLabelValue() == structure.value
