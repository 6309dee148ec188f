"""Volume nodes <-> engine volumes: geometry (IJK/RAS <-> LPS), arrays, storage nodes, modality."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
from scene_helpers import array_checksum

from MedKDSegmentLib.engine.errors import InvalidInputError
from MedKDSegmentLib.engine.volume import Volume, read_volume, write_volume
from MedKDSegmentLib.scene import volumes

# An oblique, anisotropic grid: any mix-up of axes, signs or LPS/RAS shows.
ANGLE = np.deg2rad(20)
OBLIQUE = (np.cos(ANGLE), -np.sin(ANGLE), 0.0, np.sin(ANGLE), np.cos(ANGLE), 0.0, 0.0, 0.0, 1.0)


def oblique_volume() -> Volume:
    array = np.arange(7 * 6 * 5, dtype=np.int16).reshape(7, 6, 5) - 100
    return Volume(array, spacing=(0.7, 1.1, 2.5), origin=(-12.5, 30.25, 101.0), direction=OBLIQUE, modality="CT")


def test_geometry_conversion_is_exact_both_ways():
    spacing, origin, direction = (0.7, 1.1, 2.5), (-12.5, 30.25, 101.0), OBLIQUE
    matrix = volumes.ijk_to_ras_from_geometry(spacing, origin, direction)
    # RAS flips the first two axes of LPS: voxel (0,0,0) sits at (12.5, -30.25, 101) in RAS.
    np.testing.assert_allclose(matrix[:3, 3], [12.5, -30.25, 101.0])
    back = volumes.geometry_from_ijk_to_ras(matrix)
    np.testing.assert_allclose(back[0], spacing, atol=1e-12)
    np.testing.assert_allclose(back[1], origin, atol=1e-12)
    np.testing.assert_allclose(back[2], direction, atol=1e-12)


def test_volume_node_round_trip_keeps_array_and_geometry(scene):
    volume = oblique_volume()
    node = volumes.add_volume_node(volume, "oblique")
    again = volumes.volume_from_node(node)
    np.testing.assert_array_equal(again.array, volume.array)
    assert again.array.shape == (7, 6, 5)
    assert again.same_grid(volume, tolerance=1e-9)


def test_node_geometry_agrees_with_slicers_own_file_reader(scene, tmp_path):
    """A NIfTI written by the engine and read by Slicer's storage node gives back the engine's geometry."""
    volume = oblique_volume()
    path = write_volume(volume, tmp_path / "oblique.nii.gz")
    node = volumes.load_volume_node(path)
    from_node = volumes.volume_from_node(node)
    reference = read_volume(path)
    np.testing.assert_array_equal(from_node.array, reference.array)
    assert from_node.same_grid(reference, tolerance=1e-4), (from_node.origin, reference.origin)
    assert node.GetStorageNode().GetFileName() == str(path)


def test_volume_from_node_is_a_read_only_view(scene):
    node = volumes.add_volume_node(oblique_volume(), "guarded")
    before = array_checksum(node)
    view = volumes.volume_from_node(node).array
    with pytest.raises(ValueError):
        view[0, 0, 0] = 1  # the engine cannot change a user's volume by accident
    assert array_checksum(node) == before


def test_volume_without_image_data_is_refused(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InvalidInputError, match="no image data"):
        volumes.volume_from_node(node)


def test_modality_from_intensities(scene, ct_volume, mr_volume):
    ct = volumes.add_volume_node(ct_volume, "ct")
    mr = volumes.add_volume_node(mr_volume, "mr")
    assert volumes.detect_node_modality(ct) == ("CT", "intensities")
    assert volumes.detect_node_modality(mr) == ("MR", "intensities")


def test_modality_from_the_dicom_database_wins_over_intensities(scene, ct_volume, monkeypatch):
    """Volumes loaded by Slicer's DICOM module carry their instance UIDs; the database knows the modality."""
    asked = []

    class Database:
        def instanceValue(self, uid, tag):
            asked.append((uid, tag))
            return "MR"

    monkeypatch.setattr(slicer, "dicomDatabase", Database(), raising=False)
    node = volumes.add_volume_node(ct_volume, "from dicom")
    node.SetAttribute("DICOM.instanceUIDs", "1.2.3.4 1.2.3.5")
    assert volumes.detect_node_modality(node) == ("MR", "DICOM")
    assert asked == [("1.2.3.4", "0008,0060")]


def test_unsupported_dicom_modality_falls_back_to_intensities(scene, ct_volume, monkeypatch):
    class Database:
        def instanceValue(self, uid, tag):
            return "PT"

    monkeypatch.setattr(slicer, "dicomDatabase", Database(), raising=False)
    node = volumes.add_volume_node(ct_volume, "pet?")
    node.SetAttribute("DICOM.instanceUIDs", "9.8.7")
    modality, source = volumes.detect_node_modality(node)
    assert modality == "CT" and "PT" in source
