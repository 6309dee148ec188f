"""Fine-tuning in the scene: the user's (volume, segmentation) pairs -> annotated cases, the live loss
curve (table + plot series + chart, shown in a plot view), and the before/after Dice table.

MRML only (never qt). The engine does the training (``engine.finetune``); the scene logic
(``scene/logic.py``) runs it in-process or in the worker and calls these helpers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import slicer
import vtk

from ..engine import runs
from ..engine.errors import InvalidInputError
from ..engine.volume import Volume
from . import comparison, segmentations, volumes

EPOCH_COLUMN, LOSS_COLUMN = "Epoch", "Loss"
LOSS_COLOR = (0.85, 0.33, 0.10)


def interrupted_runs(folders: Iterable, parent_sha256: str | None) -> list[Path]:
    """Outputs of killed or cancelled fine-tuning runs of a parent (by weights checksum) in ``folders``,
    newest first: their checkpoint holds at least one finished epoch and no bundle was written."""
    return [output for output, record in runs.interrupted_runs(folders, runs.FINETUNE_RUN_FILE)
            if parent_sha256 and record.get("parent_sha256") == parent_sha256 and runs.has_checkpoint(output)]


def match_names(segment_names: Iterable[str], labels: dict[int, str], mapping: dict | None = None):
    """The engine's name matching (``engine.finetune.match_segment_names``) on plain names."""
    from ..engine.segment_names import match_segment_names

    return match_segment_names(list(segment_names), labels, mapping)


# --- the user's pairs -> what the engine trains on -----------------------------------------------------


def match_segments(segmentation_node, labels: dict[int, str], mapping: dict | None = None,
                   skip: Iterable[str] | bool = ()):
    """Match a segmentation's segment names to a model's structures (``engine.finetune.SegmentMatch``).

    ``mapping``: segment name -> structure name or label value (or None: skip it); ``skip``: segment
    names to leave out, or True to leave out every segment whose name matches no structure.
    """
    names = list(segmentations.segment_names(segmentation_node).values())
    mapping = dict(mapping or {})
    if skip is True:
        unknown = match_names(names, labels, mapping).unknown
        mapping.update({name: None for name in unknown})
    elif skip:
        mapping.update({name: None for name in skip})
    return match_names(names, labels, mapping)


def annotated_labels(segmentation_node, volume_node, matched: dict[str, int]) -> Volume:
    """The matched segments (segment name -> model label value) as labels on the volume's grid."""
    values = {segment_id: matched[name] for segment_id, name in segmentations.segment_names(segmentation_node).items()
              if name in matched}
    return segmentations.labels_from_segments(segmentation_node, volume_node, values)


@dataclass
class PreparedPair:
    """One (volume, segmentation) pair made ready for the engine."""

    name: str
    image: Volume
    labels: Volume
    annotated: frozenset[int]
    match: object  # engine.finetune.SegmentMatch
    empty: list[str] = field(default_factory=list)  # matched structures without a single voxel

    def case(self):
        from ..engine.finetune import AnnotatedCase

        return AnnotatedCase(name=self.name, image=self.image, labels=self.labels, annotated=self.annotated)


def prepare_pair(volume_node, segmentation_node, labels: dict[int, str], modality: str,
                 mapping: dict | None = None, skip: Iterable[str] | bool = ()) -> PreparedPair:
    """Check and export one pair: unknown segment names raise (with a mapping/skip fix), the matched
    segments are exported on the volume's grid, the user's nodes are only read."""
    import numpy as np

    if volume_node is None or segmentation_node is None:
        raise InvalidInputError("A fine-tuning pair lacks its volume or its segmentation.",
                                "Pick both a volume and the segmentation drawn on it.")
    match = match_segments(segmentation_node, labels, mapping, skip)
    match.raise_if_unknown()
    if not match.matched:
        raise InvalidInputError(
            f"No segment of '{segmentation_node.GetName()}' is used for fine-tuning (all were skipped).",
            f"Name or map segments to the model's structures: {', '.join(labels.values())}.")
    image = volumes.volume_from_node(volume_node, modality)  # a read-only view: the node cannot change
    label_volume = annotated_labels(segmentation_node, volume_node, match.matched)
    present = set(np.unique(label_volume.array).tolist()) - {0}
    annotated = frozenset(int(v) for v in match.matched.values())
    if not present:
        raise InvalidInputError(
            f"The segments of '{segmentation_node.GetName()}' do not overlap volume '{volume_node.GetName()}'.",
            "Pair each segmentation with the volume it was drawn on.")
    empty = [labels[v] for v in sorted(annotated - present)]
    return PreparedPair(volume_node.GetName(), image, label_volume, annotated, match, empty)


# --- the live loss curve -------------------------------------------------------------------------------


class LossCurve:
    """A table (Epoch, Loss), a line series and a chart: Slicer's plot view redraws as rows arrive."""

    def __init__(self, title: str) -> None:
        scene = slicer.mrmlScene
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{title} - loss"))
        epochs = vtk.vtkIntArray()
        epochs.SetName(EPOCH_COLUMN)
        losses = vtk.vtkDoubleArray()
        losses.SetName(LOSS_COLUMN)
        self.table.AddColumn(epochs)
        self.table.AddColumn(losses)
        self.table.SetColumnDescription(LOSS_COLUMN, "mean training loss of the epoch")
        self.table.SetUseColumnTitleAsColumnHeader(True)
        self.series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{title} - loss"))
        self.series.SetAndObserveTableNodeID(self.table.GetID())
        self.series.SetXColumnName(EPOCH_COLUMN)
        self.series.SetYColumnName(LOSS_COLUMN)
        self.series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)  # scatter + line = a curve
        self.series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        self.series.SetColor(*LOSS_COLOR)
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(f"{title} - loss"))
        self.chart.AddAndObservePlotSeriesNodeID(self.series.GetID())
        self.chart.SetTitle(f"{title}: training loss")
        self.chart.SetXAxisTitle("epoch")
        self.chart.SetYAxisTitle("loss")
        self.chart.SetLegendVisibility(False)
        self._layout_before: int | None = None  # the view arrangement that show() replaced

    def nodes(self) -> list:
        return [self.table, self.series, self.chart]

    def epochs(self) -> list[tuple[int, float]]:
        table = self.table.GetTable()
        return [(int(table.GetValue(r, 0).ToInt()), float(table.GetValue(r, 1).ToDouble()))
                for r in range(table.GetNumberOfRows())]

    def set(self, epoch: int, loss: float) -> None:
        """The loss of ``epoch`` (1-based): updates that epoch's row, or adds it."""
        table = self.table.GetTable()
        row = next((r for r in range(table.GetNumberOfRows()) if table.GetValue(r, 0).ToInt() == epoch), None)
        if row is None:
            row = table.InsertNextBlankRow()
        table.SetValue(row, 0, vtk.vtkVariant(int(epoch)))
        table.SetValue(row, 1, vtk.vtkVariant(float(loss)))
        table.Modified()
        self.table.Modified()  # the node's Modified makes the plot view redraw

    def replace(self, losses: list[float]) -> None:
        """Exactly one row per epoch of a finished run (a resumed run's earlier epochs included)."""
        table = self.table.GetTable()
        table.SetNumberOfRows(0)
        for epoch, loss in enumerate(losses, start=1):
            self.set(epoch, loss)

    def update(self, stage: str) -> bool:
        """Take a progress message; True when it carried an epoch's loss."""
        parsed = runs.parse_epoch_loss(stage)
        if parsed is None or math.isnan(parsed[2]):
            return False
        self.set(parsed[0], parsed[2])
        return True

    def show(self) -> None:
        """Show the chart in a plot view: Slicer's Plots logic switches to a layout with one if needed."""
        plots = getattr(getattr(slicer, "modules", None), "plots", None)
        if plots is not None:
            layout = comparison.layout_node()
            before = layout.GetViewArrangement()
            plots.logic().ShowChartInLayout(self.chart)
            if layout.GetViewArrangement() != before:
                self._layout_before = before
            return
        # Without the Plots module (a bare scene): point every plot view at the chart.
        scene = slicer.mrmlScene
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLPlotViewNode")):
            scene.GetNthNodeByClass(index, "vtkMRMLPlotViewNode").SetPlotChartNodeID(self.chart.GetID())

    def remove(self) -> None:
        """Remove the nodes (a failed or cancelled run) and give back the view layout that show() replaced."""
        for node in self.nodes():
            if node is not None and node.GetScene() is not None:
                slicer.mrmlScene.RemoveNode(node)
        if self._layout_before is not None:
            comparison.layout_node().SetViewArrangement(self._layout_before)
            self._layout_before = None


# --- before / after ------------------------------------------------------------------------------------

DICE_COLUMNS = ("Dice parent", "Dice new version", "Change")


def dice_rows(before: dict[str, float], after: dict[str, float], worse: Iterable[str]) -> list[dict]:
    """One row per structure scored on the held-out data: parent's and new version's Dice, change, verdict."""
    worse = set(worse)
    rows = []
    for structure in list(before) + [s for s in after if s not in before]:
        first, second = float(before.get(structure, math.nan)), float(after.get(structure, math.nan))
        change = second - first
        verdict = "worse" if structure in worse else ("n/a" if math.isnan(change) else
                                                      ("better" if change > 0 else "same" if change == 0 else "worse"))
        rows.append({"structure": structure, "before": first, "after": second, "change": change, "verdict": verdict})
    return rows


def dice_table(name: str, rows: list[dict], mean_before: float, mean_after: float):
    """Structure | Dice parent | Dice new version | Change | Verdict, then a mean row."""
    table = comparison.new_table(name)
    structure, verdict = vtk.vtkStringArray(), vtk.vtkStringArray()
    structure.SetName("Structure")
    verdict.SetName("Verdict")
    for row in rows:
        structure.InsertNextValue(str(row["structure"]))
        verdict.InsertNextValue(row["verdict"])
    structure.InsertNextValue("mean")
    change = mean_after - mean_before
    verdict.InsertNextValue("worse" if change < 0 else ("n/a" if math.isnan(change) else "better" if change > 0
                                                        else "same"))
    table.AddColumn(structure)
    for column, key, mean, description in (
            (DICE_COLUMNS[0], "before", mean_before, "Dice of the parent model on the held-out annotated data"),
            (DICE_COLUMNS[1], "after", mean_after, "Dice of the fine-tuned version on the same data"),
            (DICE_COLUMNS[2], "change", change, "new version minus parent")):
        array = vtk.vtkDoubleArray()
        array.SetName(column)
        for row in rows:
            array.InsertNextValue(float(row[key]))
        array.InsertNextValue(float(mean))
        table.AddColumn(array)
        table.SetColumnDescription(column, description)
    table.AddColumn(verdict)
    table.SetColumnDescription("Verdict", "worse: the new version scores lower than its parent")
    table.SetUseColumnTitleAsColumnHeader(True)
    return table


def worse_warning(worse: Iterable[str], mean_before: float, mean_after: float) -> str:
    """'' when the new version is at least as good; else a WARNING naming what got worse."""
    worse = list(worse)
    parts = []
    if not math.isnan(mean_before) and not math.isnan(mean_after) and mean_after < mean_before:
        parts.append(f"mean Dice {mean_before:.3f} -> {mean_after:.3f}")
    if worse:
        parts.append("worse on " + ", ".join(worse))
    if not parts:
        return ""
    return ("WARNING: the new version is worse than its parent on the held-out data (" + "; ".join(parts)
            + "). Keep using the parent (select it as the student) or delete this version.")


# --- the result in the scene ---------------------------------------------------------------------------


@dataclass
class FineTuneReport:
    """What a fine-tuning run made: a new model version (``model``, a catalog entry with its parent link),
    the loss curve (table, series, chart) and the before/after Dice table, plus the numbers behind them."""

    model: object  # catalog.ModelInfo of the new version
    parent: object  # catalog.ModelInfo it was fine-tuned from
    lossCurve: LossCurve
    diceTable: object
    rows: list[dict]
    before: dict[str, float]
    after: dict[str, float]
    worse: list[str]
    meanBefore: float
    meanAfter: float
    heldOut: str
    epochLoss: list[float]
    secondsPerEpoch: float
    stoppedByBudget: bool
    warning: str  # '' unless the new version is worse than its parent (mean or any structure)
    outputs: dict = field(default_factory=dict)

    @property
    def lossTable(self):
        return self.lossCurve.table

    @property
    def lossChart(self):
        return self.lossCurve.chart

    def nodes(self) -> list:
        return [*self.lossCurve.nodes(), self.diceTable]

    def summary(self) -> str:
        """One line for a status bar or the console."""
        text = (f"{self.model.name} {self.model.version or ''} (from {self.parent.name}): held-out mean Dice "
                f"{self.meanBefore:.3f} -> {self.meanAfter:.3f} on {self.heldOut}; {len(self.epochLoss)} epochs")
        if self.stoppedByBudget:
            text += " (stopped by the time budget)"
        return text
