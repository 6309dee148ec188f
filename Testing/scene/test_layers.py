"""The layering rules, checked on the source: engine-side code never imports Slicer, Qt, CTK or VTK; the scene
layer imports Slicer (MRML) but never Qt or CTK; the module file keeps torch and MONAI out of its imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from scene_helpers import REPO

LIB = REPO / "MedKDSegment" / "MedKDSegmentLib"
ENGINE_SIDE = [*sorted((LIB / "engine").glob("*.py")), LIB / "jobs.py", LIB / "worker.py", LIB / "catalog.py",
               LIB / "selftest.py"]
SCENE_LAYER = sorted((LIB / "scene").glob("*.py"))


def imported_roots(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    roots = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", ENGINE_SIDE, ids=lambda p: p.relative_to(LIB).as_posix())
def test_engine_side_never_imports_slicer_qt_ctk_or_vtk(path):
    assert not imported_roots(path) & {"slicer", "qt", "ctk", "vtk", "PythonQt"}


@pytest.mark.parametrize("path", SCENE_LAYER, ids=lambda p: p.name)
def test_scene_layer_never_imports_qt(path):
    assert not imported_roots(path) & {"qt", "ctk", "PythonQt"}


def test_module_and_scene_layer_import_no_heavy_dependency_at_load_time():
    for path in [REPO / "MedKDSegment" / "MedKDSegment.py", LIB / "widget.py", *SCENE_LAYER, LIB / "jobs.py",
                 LIB / "catalog.py"]:
        assert not imported_roots(path, top_level_only=True) & {"torch", "monai"}, path
