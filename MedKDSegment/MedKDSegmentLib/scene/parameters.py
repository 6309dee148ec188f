"""The module's GUI state, saved with the scene (Slicer's parameter node wrapper over a scripted module node)."""

from __future__ import annotations

from typing import Annotated

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from ..engine.device import DEVICE_CHOICES

MODALITY_CHOICES = ["auto", "CT", "MR"]
# The Train / distil section's task list (parameter node values) -> the Logic's task.
TRAIN_TASK_CHOICES = {"distil student": "student", "train teacher": "teacher", "distil CT+MR student": "unpaired"}
TRAIN_MODALITY_CHOICES = ["CT", "MR"]


@parameterNodeWrapper
class MedKDSegmentParameterNode:
    """GUI state, saved with the scene.

    inputVolume - the CT or MR volume to segment.
    referenceSegmentation - optional ground truth for the comparison table.
    modality - 'auto' (DICOM modality, else intensities) or a forced CT / MR.
    device - where networks run: auto (cuda, then mps, then cpu), or one of them.
    studentModel, teacherModel - model names picked in the lists.
    keepWorkerWarm - keep the worker process (torch already imported) between jobs.
    fineTuneEpochs, fineTuneMinutes - the fine-tuning budget (minutes: 0 = no time limit).
    skipUnknownSegments - fine-tuning leaves out segments whose names match no structure.
    trainTask, trainModality - Train / distil: what to train, and a teacher's modality.
    trainEpochs, trainMinutes - the training budget (minutes: 0 = no time limit).
    trainTemperature, trainAssistantChain - KD temperature; teacher -> assistant -> student.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    referenceSegmentation: vtkMRMLSegmentationNode
    modality: Annotated[str, Choice(MODALITY_CHOICES)] = "auto"
    device: Annotated[str, Choice(list(DEVICE_CHOICES))] = "auto"
    studentModel: str = ""
    teacherModel: str = ""
    keepWorkerWarm: bool = True
    skipUnknownSegments: bool = False
    # Bounded: the parameter node's spin-box connectors replace the .ui's range with the annotated one.
    fineTuneEpochs: Annotated[int, WithinRange(1, 10000)] = 15
    fineTuneMinutes: Annotated[int, WithinRange(0, 10080)] = 0
    trainTask: Annotated[str, Choice(list(TRAIN_TASK_CHOICES))] = "distil student"
    trainModality: Annotated[str, Choice(TRAIN_MODALITY_CHOICES)] = "CT"
    trainEpochs: Annotated[int, WithinRange(1, 10000)] = 20
    trainMinutes: Annotated[int, WithinRange(0, 10080)] = 0
    trainTemperature: Annotated[float, WithinRange(0.1, 50.0)] = 1.0
    trainAssistantChain: bool = False
