"""Volume nodes <-> engine ``Volume``s, loading through storage nodes, and modality detection.

Slicer keeps a volume's geometry in the node's IJK-to-RAS matrix (the image data has origin 0 and
spacing 1); the engine uses SimpleITK's LPS convention. LPS = diag(-1, -1, 1) · RAS, so the
IJK-to-LPS matrix's columns are the axis directions scaled by the spacing, and its last column
the origin. Arrays are (k, j, i) = (z, y, x) on both sides.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from ..engine.errors import InvalidInputError
from ..engine.volume import MODALITIES, VOLUME_SUFFIXES, Volume, detect_modality

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
DICOM_MODALITY_TAG = "0008,0060"


def ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def geometry_from_ijk_to_ras(matrix: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, row-major direction) in LPS from a 4x4 IJK-to-RAS matrix."""
    ijk_to_lps = RAS_TO_LPS @ np.asarray(matrix, dtype=float)
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    direction = axes / spacing
    return tuple(float(s) for s in spacing), tuple(float(o) for o in ijk_to_lps[:3, 3]), \
        tuple(float(d) for d in direction.ravel())


def ijk_to_ras_from_geometry(spacing, origin, direction) -> np.ndarray:
    """The inverse of ``geometry_from_ijk_to_ras``."""
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.asarray(direction, dtype=float).reshape(3, 3) @ np.diag(np.asarray(spacing, dtype=float))
    ijk_to_lps[:3, 3] = origin
    return RAS_TO_LPS @ ijk_to_lps


def volume_from_node(node, modality: str | None = None) -> Volume:
    """The node's voxels and geometry as an engine ``Volume``.

    The array is a read-only view of the node's memory: nothing is copied, and nothing in the
    engine can change the user's volume by accident.
    """
    if node is None or node.GetImageData() is None:
        raise InvalidInputError("The input volume has no image data.", "Select a loaded scalar volume.")
    if node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise InvalidInputError(f"'{node.GetName()}' has several components per voxel.",
                                "Select a grey-scale (scalar) volume.")
    array = slicer.util.arrayFromVolume(node).view()
    array.flags.writeable = False
    spacing, origin, direction = geometry_from_ijk_to_ras(ijk_to_ras(node))
    return Volume(array=array, spacing=spacing, origin=origin, direction=direction, modality=modality)


def add_volume_node(volume: Volume, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node holding a copy of ``volume`` (labels: ``vtkMRMLLabelMapVolumeNode``)."""
    matrix = ijk_to_ras_from_geometry(volume.spacing, volume.origin, volume.direction)
    return slicer.util.addVolumeFromArray(np.ascontiguousarray(volume.array), matrix, name, class_name)


def dicom_series_files(folder: str | os.PathLike) -> list[str]:
    """The files of the first DICOM series in ``folder``, sorted along the slice normal (GDCM's order)."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InvalidInputError(f"'{folder}' holds no DICOM series.", "Give a volume file or a DICOM series folder.")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))


def load_volume_node(path: str | os.PathLike, name: str | None = None):
    """Load a NIfTI/NRRD/MHA file or a DICOM series folder into a new scalar volume node.

    Uses storage nodes, which work in the Slicer application, in ``--no-main-window`` batch runs
    and on a plain MRML scene alike. A DICOM series is given to the reader as an explicit,
    sorted file list, as Slicer's DICOM plugin does.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"'{path}' does not exist.", "Check the path.")
    scene = slicer.mrmlScene
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    if path.is_dir():
        files = dicom_series_files(path)
        storage.SetFileName(files[0])
        storage.ResetFileNameList()
        for file in files:
            storage.AddFileName(file)
        storage.SetSingleFile(False)
        default_name = path.name
    else:
        storage.SetFileName(str(path))
        storage.SetSingleFile(True)
        default_name = path.name.split(".")[0]
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(scene.GenerateUniqueName(name or default_name))
    scene.AddNode(storage)
    scene.AddNode(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node) or node.GetImageData() is None:
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise InvalidInputError(f"'{path}' could not be read as a volume.", "Use NIfTI, NRRD, MHA or a DICOM folder.")
    node.CreateDefaultDisplayNodes()
    return node


def dicom_modality(node) -> str | None:
    """The DICOM Modality (0008,0060) of the series a volume came from, if it came from DICOM.

    In Slicer, volumes loaded through the DICOM module carry their instance UIDs and the DICOM
    database answers; a volume read straight from DICOM files by a storage node has its files.
    """
    uids = node.GetAttribute("DICOM.instanceUIDs")
    database = getattr(slicer, "dicomDatabase", None)
    if uids and database is not None:
        value = database.instanceValue(uids.split()[0], DICOM_MODALITY_TAG)
        if value and value.strip():
            return value.strip().upper()
    storage = node.GetStorageNode()
    filename = storage.GetFileName() if storage is not None else None
    if filename and os.path.isfile(filename) and not filename.lower().endswith(VOLUME_SUFFIXES):
        reader = sitk.ImageFileReader()
        reader.SetFileName(filename)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return None
        key = DICOM_MODALITY_TAG.replace(",", "|")
        if reader.HasMetaDataKey(key) and reader.GetMetaData(key).strip():
            return reader.GetMetaData(key).strip().upper()
    return None


def detect_node_modality(node) -> tuple[str, str]:
    """(modality, how it was found): the DICOM modality when the volume came from DICOM, else a
    guess from the intensities (Hounsfield-like values mean CT)."""
    tag = dicom_modality(node)
    if tag in MODALITIES:
        return tag, "DICOM"
    guess = detect_modality(volume_from_node(node))
    return guess, ("intensities" if tag is None else f"intensities (DICOM modality {tag} is not CT or MR)")
