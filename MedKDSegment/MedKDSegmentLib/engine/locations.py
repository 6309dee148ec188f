"""Where the user's own models live outside Slicer: the one place that decides it (no heavy imports)."""

from __future__ import annotations

import os
from pathlib import Path

MODELS_DIR_ENV = "MEDKDSEGMENT_MODELS_DIR"


def user_models_dir() -> Path:
    """``$MEDKDSEGMENT_MODELS_DIR`` if set, else ``~/.MedKDSegment/Models`` (Slicer picks its own folder)."""
    override = os.environ.get(MODELS_DIR_ENV)
    return Path(override) if override else Path.home() / ".MedKDSegment" / "Models"
