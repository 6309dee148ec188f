"""Where things live: a bundle's layout, the bundled models, the user's own models (no heavy imports, so the
Slicer module reads them before any dependency is installed)."""

from __future__ import annotations

import os
from pathlib import Path

MODELS_DIR_ENV = "MEDKDSEGMENT_MODELS_DIR"


def user_models_dir() -> Path:
    """``$MEDKDSEGMENT_MODELS_DIR`` if set, else ``~/.MedKDSegment/Models`` (Slicer picks its own folder)."""
    override = os.environ.get(MODELS_DIR_ENV)
    return Path(override) if override else Path.home() / ".MedKDSegment" / "Models"


METADATA = Path("configs") / "metadata.json"  # a bundle's MONAI metadata, with the medkdsegment section
WEIGHTS = Path("models") / "model.pt"  # its state dict
MODULE_DIR = Path(__file__).resolve().parents[2]  # MedKDSegment/, the scripted module's folder
# Resources/ is a sibling of the module folder (source tree and installed extension); Slicer's own convention
# (Resources/ inside the module folder) is the fallback.
RESOURCES_CANDIDATES = (MODULE_DIR.parent / "Resources", MODULE_DIR / "Resources")


def resources_dir() -> Path:
    """The extension's Resources/ (icons, UI, bundled models)."""
    return next((candidate for candidate in RESOURCES_CANDIDATES if candidate.is_dir()), RESOURCES_CANDIDATES[0])


def bundled_models_dir() -> Path:
    """The models that ship with the extension."""
    return resources_dir() / "Models"
