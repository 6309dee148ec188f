"""Class scores on the model grid to arg-max labels on the input's exact grid, at the cost of the output.

The labels equal those of interpolating every class linearly onto the input grid (SimpleITK's
``Resample``, as ITK's linear interpolator computes it: nested lerps in double precision, cast to float32)
and taking the first maximum, but without interpolating 9 classes at every one of a CT's 80 million voxels:

- Where the 8 model voxels around a point share their arg-max class, that class wins at the point too
  (each class's interpolated score is a weighted mean of its corner scores, with the same weights for all
  classes), so a whole cell of the model grid is labelled at once.
- In the few mixed cells, only the classes that can win are interpolated: a class whose best corner is
  below another class's worst corner never wins inside the cell.

The model grid is the input's box reoriented to LPS (``profiles.model_grid``), so each input axis runs along
one model axis and the mapping is separable: per axis, every input index has a cell and a fraction.
Written by hand because no library interpolates only where an arg-max can change (scipy's and ITK's
resampling interpolate every class at every voxel, 40x slower on a CT).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .volume import Volume

# Values interpolated per chunk of mixed cells: small enough for the CPU cache, large enough to vectorise.
CHUNK_VALUES = 2**15


def resample_to_input(channels: np.ndarray, grid: sitk.Image, volume: Volume) -> np.ndarray:
    """Arg-max labels (uint8, z, y, x) on ``volume``'s grid of per-class scores (C, z, y, x) on ``grid``.

    Args:
        channels: class scores on ``grid`` (probabilities or logits; C <= 255).
        grid: the model grid, with the input's axes up to order and sign (``profiles.model_grid``).
        volume: the input, whose grid the labels come back on. Points beyond the model grid are background.
    """
    axes = _axis_maps(grid, volume)
    # Scores with their axes in the input's array order, padded by one edge voxel so the far corner of the
    # last cell exists (ITK clamps there the same way).
    scores = np.transpose(channels, [0] + [1 + model_axis for model_axis, _ in axes])
    scores = np.pad(scores, [(0, 0), (0, 1), (0, 1), (0, 1)], mode="edge")
    cell_shape = scores.shape[1:]
    cells, fractions, inside = [], [], []
    for (_, coordinate), size in zip(axes, cell_shape):
        size -= 1  # model voxels along the axis, before the padding
        inside.append((coordinate >= -0.5) & (coordinate < size - 0.5))  # ITK's buffer test
        clamped = np.clip(coordinate, 0, size - 1)
        cell = np.floor(clamped).astype(np.intp)
        cells.append(cell)
        fractions.append(clamped - cell)

    winner = scores.argmax(0).astype(np.uint8)
    corner = winner[:-1, :-1, :-1]
    uniform = np.ones(corner.shape, dtype=bool)
    for dz, dy, dx in _CORNERS[1:]:
        uniform &= winner[dz:dz + corner.shape[0], dy:dy + corner.shape[1], dx:dx + corner.shape[2]] == corner

    labels = np.take(np.take(np.take(np.where(uniform, corner, 0), cells[2], axis=2), cells[1], axis=1),
                     cells[0], axis=0)
    _label_mixed_cells(labels, scores, np.nonzero(~uniform), cells, fractions)
    for axis, keep in enumerate(inside):  # beyond the grid: background (monotone, so a run at each end)
        index = np.flatnonzero(keep)
        edges = [slice(None)] * 3
        edges[axis] = slice(0, index[0] if len(index) else None)
        labels[tuple(edges)] = 0
        if len(index):
            edges[axis] = slice(index[-1] + 1, None)
            labels[tuple(edges)] = 0
    return labels


def resample_every_class(channels: np.ndarray, grid: sitk.Image, volume: Volume) -> np.ndarray:
    """The straightforward method ``resample_to_input`` equals: every class linearly onto the whole input
    grid, then the first maximum. 40x slower on a CT; the reference for tests and benchmarks."""
    reference = volume.to_sitk()
    best, labels = None, None
    for index, channel in enumerate(channels):
        image = sitk.GetImageFromArray(np.ascontiguousarray(channel, dtype=np.float32))
        image.CopyInformation(grid)
        outside = 1.0 if index == 0 else 0.0  # beyond the grid: background
        score = sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, outside,
                                                     sitk.sitkFloat32))
        if best is None:
            best, labels = score, np.zeros(score.shape, dtype=np.uint8)
        else:
            better = score > best
            best[better] = score[better]
            labels[better] = index
    return labels


_CORNERS = [(dz, dy, dx) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]


def _axis_maps(grid: sitk.Image, volume: Volume) -> list[tuple[int, np.ndarray]]:
    """Per input array axis (z, y, x): the model array axis it runs along, and the model grid's continuous
    index of every input index along it."""
    input_direction = np.array(volume.direction, dtype=float).reshape(3, 3)
    grid_direction = np.array(grid.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.array(grid.GetSpacing(), dtype=float)
    # continuous model index (x, y, z) = scale @ input index (x, y, z) + offset
    scale = grid_direction.T @ input_direction * np.array(volume.spacing, dtype=float) / spacing[:, None]
    offset = grid_direction.T @ (np.array(volume.origin, dtype=float) - np.array(grid.GetOrigin())) / spacing
    maps = []
    for input_axis in (2, 1, 0):
        model_axis = int(np.argmax(np.abs(scale[:, input_axis])))
        others = np.delete(scale[:, input_axis], model_axis)
        if np.abs(others).max() > 1e-6 * abs(scale[model_axis, input_axis]):
            raise ValueError("the model grid is not the input's grid up to axis order and sign")
        count = volume.shape[2 - input_axis]
        maps.append((2 - model_axis, scale[model_axis, input_axis] * np.arange(count) + offset[model_axis]))
    return maps


def _label_mixed_cells(labels, scores, mixed, cells, fractions) -> None:
    """Interpolate the classes that can win, inside each mixed cell, and write their arg-max into ``labels``."""
    if len(mixed[0]) == 0:
        return
    corners = np.stack([scores[:, mixed[0] + dz, mixed[1] + dy, mixed[2] + dx] for dz, dy, dx in _CORNERS])
    can_win = corners.max(0) >= corners.min(0).max(0)  # (C, cells): best corner reaches the best worst corner
    candidates = np.sort(np.where(can_win, np.arange(len(can_win))[:, None], len(can_win)), axis=0)
    counts = can_win.sum(0)
    members = [_members(cell, scores.shape[1 + axis] - 1) for axis, cell in enumerate(cells)]
    member_fractions = [np.where(table >= 0, fraction[table], 0.0) for table, fraction in zip(members, fractions)]
    flat = labels.reshape(-1)
    per_cell = np.prod([table.shape[1] for table in members])
    for count in np.unique(counts):
        group = np.flatnonzero(counts == count)
        step = max(1, CHUNK_VALUES // int(count * per_cell))
        for start in range(0, len(group), step):
            chosen = group[start:start + step]
            where = [mixed[axis][chosen] for axis in range(3)]
            classes = candidates[:count, chosen]
            values = np.take_along_axis(corners[:, :, chosen], np.broadcast_to(classes, (8, *classes.shape)), axis=1)
            score = _trilinear(values.astype(np.float64)[..., None, None, None], *_boxes(member_fractions, where))
            best = score[0]
            winner = np.broadcast_to(classes[0, :, None, None, None], score.shape[1:]).astype(np.uint8)
            for rank in range(1, count):  # first maximum wins, as in an arg-max over all classes
                better = score[rank] > best
                best = np.where(better, score[rank], best)
                winner = np.where(better, classes[rank, :, None, None, None].astype(np.uint8), winner)
            zz, yy, xx = _boxes(members, where)
            valid = np.broadcast_to((zz >= 0) & (yy >= 0) & (xx >= 0), winner.shape)
            index = np.broadcast_to((zz * labels.shape[1] + yy) * labels.shape[2] + xx, winner.shape)
            flat[index[valid]] = winner[valid]


def _boxes(tables: list[np.ndarray], where: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Per-axis rows of ``tables`` for the cells at ``where``, shaped to broadcast to (cells, z, y, x)."""
    z, y, x = (table[cells] for table, cells in zip(tables, where))
    return z[:, :, None, None], y[:, None, :, None], x[:, None, None, :]


def _trilinear(corners: np.ndarray, fz: np.ndarray, fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
    """ITK's order of lerps (x, then y, then z) in double precision, cast to float32 as Resample returns."""
    c000, c001, c010, c011, c100, c101, c110, c111 = corners
    low = c000 + (c001 - c000) * fx
    low = low + ((c010 + (c011 - c010) * fx) - low) * fy
    high = c100 + (c101 - c100) * fx
    high = high + ((c110 + (c111 - c110) * fx) - high) * fy
    return (low + (high - low) * fz).astype(np.float32)


def _members(cell: np.ndarray, cell_count: int) -> np.ndarray:
    """(cell_count, most) table of the input indices lying in each cell along one axis, padded with -1."""
    counts = np.bincount(cell, minlength=cell_count)
    table = np.full((cell_count, max(int(counts.max()), 1)), -1, dtype=np.intp)
    order = np.argsort(cell, kind="stable")
    rank = np.arange(len(cell)) - np.repeat(np.cumsum(counts) - counts, counts)
    table[cell[order], rank] = order
    return table
