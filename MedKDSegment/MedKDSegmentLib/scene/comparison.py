"""Teacher versus student in Slicer's views: a registered side-by-side layout, per-view display, tables.

All of it is MRML (layout node, view nodes, display nodes' view lists, table nodes), so it works
the same in the application and on a plain scene; Slicer's layout manager builds the widgets from
the layout node when there is a GUI.
"""

from __future__ import annotations

import math

import slicer
import vtk

LAYOUT_ID = 51701  # far above Slicer's built-in layout numbers
TEACHER_VIEW = "MedKDTeacher"
STUDENT_VIEW = "MedKDStudent"
THREE_D_VIEW = "1"  # Slicer's first 3D view
# Slicer's usual slice views: after switching back from the comparison layout they show the student's result
# (the model a user runs), so that no overlay is lost.
STANDARD_SLICE_VIEWS = ("vtkMRMLSliceNodeRed", "vtkMRMLSliceNodeYellow", "vtkMRMLSliceNodeGreen")
DISAGREEMENT_OPACITY_3D = 0.5  # the disagreement's surfaces must not hide one another
VIEW_GROUP = 7  # the two slice views link with each other only
# View labels that cannot be read as anatomical directions (Slicer shows "S: 136 mm" beside them).
SLICE_VIEWS = {TEACHER_VIEW: ("Tch", (0.88, 0.51, 0.23)), STUDENT_VIEW: ("Stu", (0.23, 0.60, 0.88))}


def _slice_view_xml(layout_name: str) -> str:
    label, color = SLICE_VIEWS[layout_name]
    hex_color = "#" + "".join(f"{round(c * 255):02X}" for c in color)
    return f"""   <item>
    <view class="vtkMRMLSliceNode" singletontag="{layout_name}">
     <property name="orientation" action="default">Axial</property>
     <property name="viewlabel" action="default">{label}</property>
     <property name="viewcolor" action="default">{hex_color}</property>
     <property name="viewgroup" action="default">{VIEW_GROUP}</property>
    </view>
   </item>"""


LAYOUT_XML = f"""<layout type="vertical" split="true">
 <item splitSize="600">
  <layout type="horizontal" split="true">
{_slice_view_xml(TEACHER_VIEW)}
{_slice_view_xml(STUDENT_VIEW)}
  </layout>
 </item>
 <item splitSize="400">
  <view class="vtkMRMLViewNode" singletontag="{THREE_D_VIEW}">
   <property name="viewlabel" action="default">1</property>
  </view>
 </item>
</layout>"""


def layout_node():
    """The scene's layout node (Slicer keeps one singleton; a plain scene gets one)."""
    scene = slicer.mrmlScene
    node = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if node is None:
        node = slicer.vtkMRMLLayoutNode()
        node.SetSingletonTag("vtkMRMLLayoutNode")
        node = scene.AddNode(node)
    return node


def register_comparison_layout(node=None) -> int:
    """Add the teacher | student (+ 3D) layout to the layout node once; returns its id."""
    node = node or layout_node()
    if not node.IsLayoutDescription(LAYOUT_ID):
        node.AddLayoutDescription(LAYOUT_ID, LAYOUT_XML)
    return LAYOUT_ID


def _view_node(class_name: str, layout_name: str):
    scene = slicer.mrmlScene
    for index in range(scene.GetNumberOfNodesByClass(class_name)):
        node = scene.GetNthNodeByClass(index, class_name)
        if node.GetLayoutName() == layout_name:
            return node
    return None


def ensure_view_nodes() -> dict[str, object]:
    """The layout's view nodes, created the way Slicer's layout logic creates them if they are missing
    (on a scene without a GUI, or before the layout was ever shown)."""
    scene = slicer.mrmlScene
    views = {}
    for layout_name, (label, color) in SLICE_VIEWS.items():
        node = _view_node("vtkMRMLSliceNode", layout_name)
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLSliceNode")
            node.UnRegister(None)  # the Python variable owns it
            node.SetLayoutName(layout_name)
            node.SetName(layout_name)
            node.SetLayoutLabel(label)
            node.SetLayoutColor(*color)
            node.SetOrientation("Axial")
            node.SetViewGroup(VIEW_GROUP)
            node = scene.AddNode(node)
        views[layout_name] = node
    node = _view_node("vtkMRMLViewNode", THREE_D_VIEW)
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLViewNode")
        node.UnRegister(None)
        node.SetLayoutName(THREE_D_VIEW)
        node.SetName("View" + THREE_D_VIEW)
        node = scene.AddNode(node)
    views[THREE_D_VIEW] = node
    return views


def _composite_node(layout_name: str):
    """The slice composite node of a view (Slicer's slice logic adopts one that already exists)."""
    node = _view_node("vtkMRMLSliceCompositeNode", layout_name)
    if node is None:
        scene = slicer.mrmlScene
        node = scene.CreateNodeByClass("vtkMRMLSliceCompositeNode")
        node.UnRegister(None)
        node.SetLayoutName(layout_name)
        node = scene.AddNode(node)
    return node


def fit_slice_views(volume_node, view_nodes) -> None:
    """Show the whole volume in each slice view, as a view's "Reset field of view" does: a new slice node keeps
    MRML's default plane (250 mm around RAS 0, 0, 0), which misses a scan lying elsewhere (a black view)."""
    for view in view_nodes:
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLScene(slicer.mrmlScene)
        logic.SetSliceNode(view)
        width, height, _ = view.GetDimensions()
        logic.FitSliceToVolume(volume_node, width, height)
        logic.SetMRMLScene(None)


def centre_3d_view(volume_node) -> None:
    """Aim the 3D view's camera at the volume's centre, from the front, far enough to see all of it (MRML's default
    camera looks at RAS 0, 0, 0, which leaves a scan elsewhere at the edge or out of sight)."""
    bounds = [0.0] * 6
    volume_node.GetRASBounds(bounds)
    centre = [(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)]
    extent = max(bounds[2 * i + 1] - bounds[2 * i] for i in range(3))
    camera = _view_node("vtkMRMLCameraNode", THREE_D_VIEW)
    if camera is None:
        camera = slicer.mrmlScene.CreateNodeByClass("vtkMRMLCameraNode")
        camera.UnRegister(None)
        camera.SetLayoutName(THREE_D_VIEW)
        camera = slicer.mrmlScene.AddNode(camera)
    camera.SetFocalPoint(*centre)
    camera.SetPosition(centre[0], centre[1] + 2.5 * extent, centre[2])  # anterior, as Slicer's default view
    camera.SetViewUp(0.0, 0.0, 1.0)


def show_only_in(segmentation_node, view_node_ids: list[str], visible_3d: bool | None = None) -> None:
    """Show a segmentation only in the given views (an empty view list would mean every view)."""
    segmentation_node.CreateDefaultDisplayNodes()
    display = segmentation_node.GetDisplayNode()
    display.RemoveAllViewNodeIDs()
    for view_id in view_node_ids:
        display.AddViewNodeID(view_id)
    if visible_3d is not None:
        display.SetVisibility3D(visible_3d)


def show_comparison(volume_node, teacher_node, student_node, disagreement_node=None, switch_layout: bool = True,
                    surfaces: bool = True) -> dict[str, str]:
    """Switch to the comparison layout: the volume in two linked slice views, the teacher's overlay only
    in one and the student's in the other (and in Slicer's usual slice views), the disagreement outlined on
    both slice views and as translucent surfaces in the 3D view. Returns view node IDs."""
    node = layout_node()
    register_comparison_layout(node)
    if switch_layout:
        node.SetViewArrangement(LAYOUT_ID)  # Slicer's layout manager rebuilds the views from this
    views = ensure_view_nodes()
    ids = {name: view.GetID() for name, view in views.items()}
    for layout_name in SLICE_VIEWS:
        composite = _composite_node(layout_name)
        composite.SetBackgroundVolumeID(volume_node.GetID())
        composite.SetLinkedControl(True)
    fit_slice_views(volume_node, [views[name] for name in SLICE_VIEWS])
    centre_3d_view(volume_node)
    standard = [view for view in STANDARD_SLICE_VIEWS if slicer.mrmlScene.GetNodeByID(view) is not None]
    show_only_in(teacher_node, [ids[TEACHER_VIEW]], visible_3d=False)
    show_only_in(student_node, [ids[STUDENT_VIEW], *standard], visible_3d=False)
    if disagreement_node is not None:
        show_only_in(disagreement_node, [ids[TEACHER_VIEW], ids[STUDENT_VIEW], ids[THREE_D_VIEW]], visible_3d=True)
        display = disagreement_node.GetDisplayNode()
        display.SetVisibility2DFill(False)  # outlines: the models' own fills stay readable beneath
        display.SetOpacity3D(DISAGREEMENT_OPACITY_3D)
        if surfaces:
            disagreement_node.CreateClosedSurfaceRepresentation()
    return ids


# --- tables -------------------------------------------------------------------------------------------

STRUCTURE_COLUMNS = (
    # key in the engine's rows, column name, unit, description
    ("dice_first_vs_second", "Dice teacher-student", "", "Dice between the teacher's and the student's structure"),
    ("hd95_mm_first_vs_second", "HD95 teacher-student", "mm", "95th percentile Hausdorff distance"),
    ("dice_first_vs_reference", "Dice teacher-reference", "", "teacher against the reference segmentation"),
    ("dice_second_vs_reference", "Dice student-reference", "", "student against the reference segmentation"),
    ("hd95_mm_first_vs_reference", "HD95 teacher-reference", "mm", "teacher against the reference segmentation"),
    ("hd95_mm_second_vs_reference", "HD95 student-reference", "mm", "student against the reference segmentation"),
    ("volume_ml_first", "Volume teacher", "ml", "structure volume found by the teacher"),
    ("volume_ml_second", "Volume student", "ml", "structure volume found by the student"),
    ("volume_ml_reference", "Volume reference", "ml", "structure volume in the reference segmentation"),
)
MODEL_COLUMNS = (
    ("role", "Role", "", "teacher or student", str),
    ("model", "Model", "", "model bundle name", str),
    ("seconds", "Run time", "s", "from the start of the job to labels on the input grid", float),
    ("parameters", "Parameters", "", "trainable parameters of the network", int),
    ("device", "Device", "", "where the network ran", str),
    ("windows", "Windows", "", "sliding-window patches evaluated", int),
    ("speedup", "Speed-up", "x", "the teacher's run time divided by this model's", float),
    ("warning", "Warning", "", "why the scan looks outside this model's world (empty: nothing found)", str),
    ("trained_on", "Trained on", "", "the model's own volumes (phantom-trained models fail on real scans)", str),
)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def new_table(name: str):
    scene = slicer.mrmlScene
    return scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))


def structures_table(name: str, rows: list[dict]):
    """One row per structure (then a mean row): Dice and HD95 teacher-student (and against a reference
    when the rows have it), volumes in ml. The mean row leaves volumes out (NaN): a mean volume of different
    organs means nothing."""
    table = new_table(name)
    columns = [c for c in STRUCTURE_COLUMNS if rows and c[0] in rows[0]]
    structure = vtk.vtkStringArray()
    structure.SetName("Structure")
    for row in rows:
        structure.InsertNextValue(str(row["structure"]))
    structure.InsertNextValue("mean")
    table.AddColumn(structure)
    for key, column, unit, description in columns:
        array = vtk.vtkDoubleArray()
        array.SetName(column)
        values = [float(row[key]) for row in rows]
        for value in values + [math.nan if unit == "ml" else _mean(values)]:
            array.InsertNextValue(value)
        table.AddColumn(array)
        table.SetColumnUnitLabel(column, unit)
        table.SetColumnDescription(column, description)
    table.SetUseColumnTitleAsColumnHeader(True)
    return table


def models_table(name: str, runs: list[dict]):
    """One row per model (the teacher first): run time, speed-up over the teacher, parameter count, device,
    the model's warning when the scan looks outside its world, and what it was trained on."""
    table = new_table(name)
    teacher_seconds = runs[0]["seconds"]
    runs = [{**run, "speedup": teacher_seconds / run["seconds"] if run["seconds"] > 0 else math.nan,
             "warning": " ".join(run.get("warnings") or []), "trained_on": run.get("trained_on") or ""} for run in runs]
    for key, column, unit, description, kind in MODEL_COLUMNS:
        array = {str: vtk.vtkStringArray, float: vtk.vtkDoubleArray, int: vtk.vtkIntArray}[kind]()
        array.SetName(column)
        for run in runs:
            array.InsertNextValue(kind(run[key]))
        table.AddColumn(array)
        table.SetColumnUnitLabel(column, unit)
        table.SetColumnDescription(column, description)
    return table


def table_rows(table) -> list[dict]:
    """A table node's content as dicts (for tests and the console)."""
    vtk_table = table.GetTable()
    names = [vtk_table.GetColumnName(c) for c in range(vtk_table.GetNumberOfColumns())]
    return [{n: vtk_table.GetValue(r, c).ToString() if vtk_table.GetColumn(c).IsA("vtkStringArray")
             else vtk_table.GetValue(r, c).ToDouble() for c, n in enumerate(names)}
            for r in range(vtk_table.GetNumberOfRows())]
