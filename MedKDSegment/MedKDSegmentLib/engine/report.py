"""Reports: Markdown and JSON tables and PNG figures of slices with label overlays."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .volume import Volume, atomic_path


def fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict], columns: dict[str, str]) -> str:
    """``columns`` maps row keys to headers, in order."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(key, "")) for key in columns) + " |" for row in rows]
    return "\n".join(lines)


def text_table(rows: list[dict], columns: dict[str, str]) -> str:
    """The same table aligned for a terminal."""
    cells = [list(columns.values())] + [[fmt(row.get(key, "")) for key in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells)


def write_json(data: object, path: str | os.PathLike) -> Path:
    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, np.generic):
            return clean(value.item())
        return value

    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(clean(data), indent=2), encoding="utf-8")
    return Path(path)


def read_json_object(path: Path, fail: Callable[[str], Exception]) -> dict:
    """The JSON object in ``path`` (UTF-8); ``fail(problem)`` makes the error raised for text that is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise fail(f"{path.name} is not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise fail(f"{path.name} is not a JSON object")
    return data


def write_text(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def overlay_figure(
    panels: list[tuple[str, Volume, dict[str, Volume]]],
    colors: dict[int, tuple[float, float, float]],
    path: str | os.PathLike,
    window: dict[str, tuple[float, float]] | None = None,
) -> Path:
    """One row per (title, image, {column title: labels}): an axial slice through the labels'
    centre of mass with each label volume overlaid, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = max(len(overlays) for _, _, overlays in panels)
    figure, axes = plt.subplots(len(panels), columns, figsize=(4 * columns, 4 * len(panels)), squeeze=False)
    lut = np.zeros((256, 4))
    for value, color in colors.items():
        lut[value] = (*color, 0.45)
    for row, (title, image, overlays) in enumerate(panels):
        first = next(iter(overlays.values())).array
        z = int(np.argwhere(first > 0)[:, 0].mean()) if first.any() else first.shape[0] // 2
        low, high = (window or {}).get(image.modality or "", np.percentile(image.array, (1, 99)))
        aspect = image.spacing[1] / image.spacing[0]
        for column, (name, labels) in enumerate(overlays.items()):
            axis = axes[row, column]
            axis.imshow(image.array[z], cmap="gray", vmin=low, vmax=high, aspect=aspect)
            axis.imshow(lut[labels.array[z]], aspect=aspect, interpolation="nearest")
            axis.set_title(f"{title}: {name}", fontsize=10)
            axis.axis("off")
        for axis in axes[row, len(overlays):]:  # a row with fewer overlays leaves its other cells blank
            axis.axis("off")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=90, format="png")
    plt.close(figure)
    return Path(path)
