"""Per-structure agreement between label volumes: Dice, HD95 and volumes (MONAI metrics)."""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

from .volume import Volume, check_label_values, check_labels_match


def dice_per_label(prediction: np.ndarray, reference: np.ndarray, labels: list[int]) -> dict[int, float]:
    """Dice per label value; NaN where the label is absent from both."""
    num_classes = int(max(labels + [int(prediction.max()), int(reference.max())])) + 1
    pred = one_hot(torch.from_numpy(prediction.astype(np.int64))[None, None], num_classes)
    ref = one_hot(torch.from_numpy(reference.astype(np.int64))[None, None], num_classes)
    scores = compute_dice(pred, ref, include_background=True, ignore_empty=True)[0]
    return {label: float(scores[label]) for label in labels}


def hd95_per_label(
    prediction: np.ndarray, reference: np.ndarray, labels: list[int], spacing_zyx: tuple[float, ...]
) -> dict[int, float]:
    """95th-percentile Hausdorff distance in mm per label; NaN if either side lacks the label."""
    result = {}
    for label in labels:
        a, b = prediction == label, reference == label
        if not a.any() or not b.any():
            result[label] = math.nan
            continue
        pred = torch.from_numpy(a)[None, None]
        ref = torch.from_numpy(b)[None, None]
        distance = compute_hausdorff_distance(pred, ref, percentile=95, spacing=list(spacing_zyx))
        result[label] = float(distance[0, 0])
    return result


def compare_labels(
    first: Volume,
    second: Volume,
    names: dict[int, str],
    reference: Volume | None = None,
    hd95: bool = True,
) -> list[dict]:
    """One row per structure: Dice (and HD95) first↔second, each against ``reference``, volumes in ml."""
    second = check_labels_match(first, second, "the second label volume")
    if reference is not None:
        reference = check_labels_match(first, reference, "the reference label volume")
    for volume, name in ((first, "the first label volume"), (second, "the second label volume"),
                         (reference, "the reference label volume")):
        if volume is not None:
            check_label_values(volume, set(names), name)
    labels = sorted(names)
    voxel_ml = float(np.prod(first.spacing)) / 1000.0
    spacing_zyx = tuple(first.spacing[::-1])
    pairs = {"first_vs_second": second}
    if reference is not None:
        pairs |= {"first_vs_reference": reference, "second_vs_reference": reference}
    rows = [{"label": label, "structure": names[label]} for label in labels]
    for key, other in pairs.items():
        source = second if key.startswith("second") else first
        dice = dice_per_label(source.array, other.array, labels)
        distance = hd95_per_label(source.array, other.array, labels, spacing_zyx) if hd95 else {}
        for row in rows:
            row[f"dice_{key}"] = dice[row["label"]]
            if hd95:
                row[f"hd95_mm_{key}"] = distance[row["label"]]
    for row in rows:
        row["volume_ml_first"] = float((first.array == row["label"]).sum()) * voxel_ml
        row["volume_ml_second"] = float((second.array == row["label"]).sum()) * voxel_ml
        if reference is not None:
            row["volume_ml_reference"] = float((reference.array == row["label"]).sum()) * voxel_ml
    return rows


def mean_of(rows: list[dict], key: str) -> float:
    values = [row[key] for row in rows if key in row and not math.isnan(row[key])]
    return float(np.mean(values)) if values else math.nan
