"""Segment names -> a model's label values: what the user painted, matched to what the model knows.

Torch-free on purpose: the Slicer module previews the matching in its own process before any
training (and before torch is imported); ``engine.finetune`` uses the same functions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidInputError


def normalize_name(name: str) -> str:
    """'Right_Kidney', 'right-kidney ' and 'right kidney' all become 'right kidney'."""
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


@dataclass
class SegmentMatch:
    matched: dict[str, int]  # segment name -> model label value
    unknown: list[str]
    skipped: list[str]
    labels: dict[int, str] = field(default_factory=dict)  # the model's labels, for messages

    def raise_if_unknown(self) -> None:
        if not self.unknown:
            return
        names = ", ".join(f"'{n}'" for n in self.unknown)
        known = ", ".join(f"'{n}'" for n in self.labels.values())
        example = self.unknown[0]
        raise InvalidInputError(
            f"Segment(s) {names} do not match any label of the model (its labels: {known}).",
            f'Map them to a label (console: mapping={{"{example}": "liver"}}; CLI: --map "{example}=liver") '
            f'or skip them (mapping={{"{example}": None}}; --skip "{example}").',
        )


def label_value(value: int | str, labels: dict[int, str], what: str) -> int:
    """A label given by value (int or digit string) or by name."""
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.strip().isdigit()):
        number = int(value)
        if number in labels:
            return number
    else:
        by_name = {normalize_name(n): v for v, n in labels.items()}
        if normalize_name(value) in by_name:
            return by_name[normalize_name(value)]
    known = ", ".join(f"{v} ({n})" for v, n in sorted(labels.items()))
    raise InvalidInputError(f"{what} '{value}' is not a label of the model.", f"Use one of: {known}.")


def match_segment_names(
    segment_names: Iterable[str],
    labels: dict[int, str],
    mapping: dict[str, int | str | None] | None = None,
) -> SegmentMatch:
    """Match segment names to the model's ``labels`` (value -> name).

    ``mapping`` (segment name -> label value, label name, or None to skip) wins over name
    matching; its keys are compared exactly first, then case/space/underscore/hyphen-insensitively.
    Mapping entries for segments that are not present are ignored (one mapping may serve several
    segmentations).
    """
    mapping = dict(mapping or {})
    normalized_mapping = {normalize_name(k): v for k, v in mapping.items()}
    by_name = {normalize_name(n): v for v, n in labels.items()}
    result = SegmentMatch({}, [], [], dict(labels))
    for name in segment_names:
        if name in mapping or normalize_name(name) in normalized_mapping:
            target = mapping[name] if name in mapping else normalized_mapping[normalize_name(name)]
            if target is None:
                result.skipped.append(name)
            else:
                result.matched[name] = label_value(target, labels, f"The mapping of segment '{name}' names label")
        elif normalize_name(name) in by_name:
            result.matched[name] = by_name[normalize_name(name)]
        else:
            result.unknown.append(name)
    return result


def labels_by_segment_name(
    array: np.ndarray,
    segment_names: dict[int, str],
    model_labels: dict[int, str],
    mapping: dict[str, int | str | None] | None = None,
    what: str = "The labels",
) -> np.ndarray:
    """A segmentation's label values (``segment_names``: value -> segment name) turned into the model's by
    name (``match_segment_names``): unknown names and values of no named segment are refused, skipped
    segments become background."""
    match = match_segment_names([segment_names[v] for v in sorted(segment_names)], model_labels, mapping)
    match.raise_if_unknown()
    source = np.asarray(array).astype(np.int64)
    target = np.zeros(source.shape, np.uint8)
    for value, segment in segment_names.items():
        if segment in match.matched:
            target[source == value] = match.matched[segment]
    stray = sorted(set(np.unique(source).tolist()) - set(segment_names) - {0})
    if stray:
        raise InvalidInputError(
            f"{what} hold values {stray[:8]} that belong to no named segment.",
            "Save the segmentation from Slicer again, or give a label map with the model's values.",
        )
    return target


def unmatched_mapping(mapping: dict[str, int | str | None], names: Iterable[str]) -> list[str]:
    """The ``mapping`` entries (``--map``/``--skip`` names) that match none of ``names`` (all cases' segment
    names): a misspelt name would otherwise be ignored silently."""
    present = {normalize_name(n) for n in names}
    return [key for key in mapping if normalize_name(key) not in present]


def parse_mapping(maps: Iterable[str] = (), skips: Iterable[str] = ()) -> dict[str, str | None]:
    """CLI ``--map NAME=LABEL`` and ``--skip NAME`` options as a ``mapping`` dict."""
    mapping: dict[str, str | None] = {}
    for item in maps:
        name, sep, label = item.partition("=")
        if not sep or not name.strip() or not label.strip():
            raise InvalidInputError(
                f"--map '{item}' is not NAME=LABEL.", 'Write it as --map "Segment name=liver" (or =1 for a value).'
            )
        mapping[name.strip()] = label.strip()
    for name in skips:
        mapping[name.strip()] = None
    return mapping
