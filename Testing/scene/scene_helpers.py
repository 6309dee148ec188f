"""Helpers shared by the scene-layer tests (a uniquely named module: every test folder has a conftest)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import slicer
import vtk

TESTING = Path(__file__).resolve().parents[1]
REPO = TESTING.parent
STUBS = TESTING / "stubs"


def scene_state(scene) -> dict:
    """Enough to tell whether anything in a scene was added, removed or changed."""
    nodes = {}
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        nodes[node.GetID()] = (node.GetName(), node.GetMTime())
    return nodes


def node_content(node) -> dict:
    """What a user would call the node's content (MTime also moves on harmless event traffic)."""
    content = {"name": node.GetName(), "class": node.GetClassName(), "transform": node.GetTransformNodeID(),
               "attributes": {n: node.GetAttribute(n) for n in node.GetAttributeNames() or ()},
               "display": node.GetDisplayNodeID() if hasattr(node, "GetDisplayNodeID") else None}
    if node.IsA("vtkMRMLVolumeNode"):
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        content["ijk_to_ras"] = slicer.util.arrayFromVTKMatrix(matrix).tolist()
        content["voxels"] = array_checksum(node)
    if node.IsA("vtkMRMLSegmentationNode"):
        segmentation = node.GetSegmentation()
        segments = [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]
        content["segments"] = [(s.GetName(), s.GetLabelValue(), tuple(s.GetColor()),
                                s.GetRepresentation("Binary labelmap") is not None,
                                s.GetRepresentation("Closed surface") is not None) for s in segments]
        content["source"] = segmentation.GetSourceRepresentationName()
    return content


def array_checksum(node) -> tuple:
    array = slicer.util.arrayFromVolume(node)
    return array.shape, str(array.dtype), float(np.asarray(array, dtype=np.float64).sum())


def cancel_during_epoch(job, epoch: int, epochs: int, timeout_s: float = 300.0) -> None:
    """Wait until ``job`` starts epoch ``epoch`` of ``epochs`` (the ones before it are complete and
    checkpointed), then cancel it; the job must still have been running."""
    deadline = time.monotonic() + timeout_s
    while job.poll() and not any(stage.startswith(f"epoch {epoch}/{epochs}") for _, stage in job.history):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert job.running, job.error
    job.cancel()
