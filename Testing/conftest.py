"""Shared test set-up: the module folder on sys.path (as Slicer does), shared data, tiny bundles."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests run tiny tensors, where extra threads cost more than they give (up to 20x slower on a busy
# 2-core machine). Set before any test module imports torch; worker subprocesses inherit it.
os.environ["OMP_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedKDSegment"))
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real cases not found at {SHARED_DATA} (../shared/data beside the repository)")
    return SHARED_DATA


@pytest.fixture
def tiny_package(tmp_path, monkeypatch):
    """(registry entry, pinned package file) of a tiny published teacher (``tiny_teacher.py``)."""
    from tiny_teacher import tiny_teacher_package

    return tiny_teacher_package(tmp_path, monkeypatch)
