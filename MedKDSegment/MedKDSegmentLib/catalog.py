"""The model list without torch: what the Slicer module shows before any dependency is installed.

Reads only each bundle's ``configs/metadata.json`` (the same keys ``engine.bundle`` reads);
full validation and the weights' checksum happen in ``engine.bundle.load_bundle`` when a job
runs. Bundled models live in ``Resources/Models`` beside the module folder (the source tree
and the installed extension share that layout); user models in any folder the user names.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .engine.errors import BundleError

logger = logging.getLogger(__name__)

METADATA = Path("configs") / "metadata.json"
WEIGHTS = Path("models") / "model.pt"
MODULE_DIR = Path(__file__).resolve().parents[1]
# Resources/ is a sibling of the module folder (source tree and installed extension); Slicer's
# own convention (Resources/ inside the module folder) is the fallback.
RESOURCES_CANDIDATES = (MODULE_DIR.parent / "Resources", MODULE_DIR / "Resources")


def resources_dir() -> Path:
    for candidate in RESOURCES_CANDIDATES:
        if candidate.is_dir():
            return candidate
    return RESOURCES_CANDIDATES[0]


def bundled_models_dir() -> Path:
    return resources_dir() / "Models"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    role: str
    modality: str
    labels: dict[int, str]
    colors: dict[int, tuple[float, float, float]]
    parameters: int
    size_mb: float
    path: Path
    source: str = "bundled"  # or "user"
    teacher: str | None = None
    version: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        """One line for a model list: name · role · modality · labels · parameters · size."""
        return (f"{self.name} · {self.role} · {self.modality} · {len(self.labels)} labels · "
                f"{self.parameters / 1e6:.2f} M parameters · {self.size_mb:.1f} MB")

    def summary(self) -> dict:
        return {
            "name": self.name, "role": self.role, "modality": self.modality,
            "labels": list(self.labels.values()), "parameters": self.parameters, "size_mb": self.size_mb,
            "teacher": self.teacher, "version": self.version, "source": self.source, "path": str(self.path),
        }


def read_model_info(path: str | os.PathLike, source: str = "bundled") -> ModelInfo:
    """The catalog entry of one bundle folder; ``BundleError`` if it is not a bundle."""
    path = Path(path)
    meta_file = path / METADATA
    if not meta_file.is_file() or not (path / WEIGHTS).is_file():
        raise BundleError(f"'{path}' is not a MedKDSegment model bundle (no {METADATA} or {WEIGHTS}).",
                          "Pick the bundle folder itself (it holds configs/ and models/).")
    try:
        metadata = json.loads(meta_file.read_text())
        channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
        info = metadata["medkdsegment"]
        modality = str(info["preprocessing"]["modality"]).upper().replace("MRI", "MR")
        labels = {int(k): str(v) for k, v in channel_def.items() if int(k) != 0}
        colors = {int(k): tuple(float(c) for c in v) for k, v in info.get("label_colors", {}).items()}
        return ModelInfo(
            name=str(metadata["name"]), role=str(info["role"]), modality=modality, labels=labels, colors=colors,
            parameters=int(info["parameters"]), size_mb=round((path / WEIGHTS).stat().st_size / 1e6, 2),
            path=path, source=source, teacher=(info.get("teacher") or {}).get("name"),
            version=metadata.get("version"),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise BundleError(f"'{meta_file}' is not valid bundle metadata ({error}).",
                          "Re-create the bundle with MedKDSegment.") from error


def list_models(user_folders: tuple | list = (), include_bundled: bool = True) -> list[ModelInfo]:
    """Bundled models, then those directly inside ``user_folders``; broken bundles are skipped with a warning."""
    folders = [(bundled_models_dir(), "bundled")] if include_bundled else []
    folders += [(Path(folder), "user") for folder in user_folders if folder and str(folder).strip()]
    models, seen = [], set()
    for folder, source in folders:
        if not folder.is_dir():
            continue
        for candidate in sorted(folder.glob(f"*/{METADATA}")):
            bundle_dir = candidate.parents[1]
            if bundle_dir.name.startswith(".partial-") or bundle_dir.resolve() in seen:
                continue  # half-written bundles are never offered
            try:
                models.append(read_model_info(bundle_dir, source))
                seen.add(bundle_dir.resolve())
            except BundleError as error:
                logger.warning("MedKDSegment: skipping %s: %s", bundle_dir, error)
    return models


def find_model(name_or_path: str | os.PathLike, user_folders: tuple | list = (),
               include_bundled: bool = True) -> ModelInfo:
    """A model given by folder path, or by name among the bundled and user models."""
    path = Path(name_or_path)
    if path.is_dir():
        return read_model_info(path, "user")
    models = list_models(user_folders, include_bundled)
    for model in models:
        if model.name == str(name_or_path) or model.path.name == str(name_or_path):
            return model
    known = ", ".join(m.name for m in models) or "none (are the bundled models installed?)"
    raise BundleError(f"No model named '{name_or_path}'.", f"Known models: {known}.")


def default_model(modality: str, role: str, models: list[ModelInfo]) -> ModelInfo | None:
    """The first model of ``role`` for ``modality``, bundled ones first."""
    for model in models:
        if model.role == role and model.modality == modality:
            return model
    return None


def teacher_of(student: ModelInfo, models: list[ModelInfo]) -> ModelInfo | None:
    """The teacher a student was distilled from when it is installed, else any teacher of its modality."""
    for model in models:
        if model.role == "teacher" and model.name == student.teacher:
            return model
    return default_model(student.modality, "teacher", models)
