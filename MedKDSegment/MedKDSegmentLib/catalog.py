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
from .engine.labels import label_colors
from .engine.locations import METADATA, WEIGHTS, bundled_models_dir

logger = logging.getLogger(__name__)

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
    parent: str | None = None  # the model this one was fine-tuned from (name)
    parent_sha256: str | None = None  # ... and its weights' checksum: names alone can repeat across folders
    sha256: str | None = None  # this model's weights checksum (as recorded in its metadata)
    created: str | None = None
    teachers: dict = field(default_factory=dict, compare=False)  # CT+MR student: modality -> teacher name
    trained_on: str | None = None  # its own volumes, e.g. "20 CT phantom abdomens" (phantom models fail on scans)

    @property
    def modalities(self) -> tuple[str, ...]:
        """('CT',), ('MR',) or ('CT', 'MR') for a CT+MR model (one network, normalisation per modality)."""
        return tuple(self.modality.split("+"))

    def serves(self, modality: str | None) -> bool:
        """Whether this model segments volumes of ``modality`` ('ct', 'MRI'... accepted)."""
        return _modality_name(modality) in self.modalities

    def describe(self) -> str:
        """One line for a model list: name · role · modality · labels · parameters · size · trained on."""
        trained = f" · trained on {self.trained_on}" if self.trained_on else ""
        return (f"{self.name} · {self.role} · {self.modality} · {len(self.labels)} labels · "
                f"{self.parameters / 1e6:.2f} M parameters · {self.size_mb:.1f} MB{trained}")

    def summary(self) -> dict:
        return {
            "name": self.name, "role": self.role, "modality": self.modality,
            "labels": list(self.labels.values()), "parameters": self.parameters, "size_mb": self.size_mb,
            "teacher": self.teacher, "version": self.version, "parent": self.parent, "source": self.source,
            "trained_on": self.trained_on,
            "path": str(self.path),
        }


def read_model_info(path: str | os.PathLike, source: str = "bundled") -> ModelInfo:
    """The catalog entry of one bundle folder; ``BundleError`` if it is not a bundle."""
    path = Path(path)
    meta_file = path / METADATA
    if not meta_file.is_file() or not (path / WEIGHTS).is_file():
        raise BundleError(f"'{path}' is not a MedKDSegment model bundle (no {METADATA} or {WEIGHTS}).",
                          "Pick the bundle folder itself (it holds configs/ and models/).")
    try:
        metadata = json.loads(meta_file.read_text(encoding="utf-8"))
        channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
        info = metadata["medkdsegment"]
        modality = _modality_name(info["preprocessing"]["modality"])
        section = info.get("modalities") or {}  # a CT+MR model (engine.unpaired): modalities by norm index
        if section:
            modality = "+".join(_modality_name(m) for m in sorted(section, key=lambda m: section[m]["norm_index"]))
        labels = {int(k): str(v) for k, v in channel_def.items() if int(k) != 0}
        recorded = {int(k): tuple(float(c) for c in v) for k, v in info.get("label_colors", {}).items()}
        colors = label_colors(labels, recorded)
        return ModelInfo(
            name=str(metadata["name"]), role=str(info["role"]), modality=modality, labels=labels, colors=colors,
            parameters=int(info["parameters"]), size_mb=round((path / WEIGHTS).stat().st_size / 1e6, 2),
            path=path, source=source, teacher=(info.get("teacher") or {}).get("name"),
            version=metadata.get("version"), parent=(info.get("parent") or {}).get("name"),
            parent_sha256=(info.get("parent") or {}).get("weights_sha256"), sha256=info.get("weights_sha256"),
            created=info.get("created"), trained_on=(info.get("domain") or {}).get("volumes"),
            teachers={_modality_name(m): e["teacher"]["name"] for m, e in section.items() if e.get("teacher")},
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


def _modality_name(modality: object) -> str:
    return str(modality).strip().upper().replace("MRI", "MR")


def models_for(modality: str, models: list[ModelInfo], role: str | None = None) -> list[ModelInfo]:
    """The models that segment ``modality`` (CT+MR models included for CT and for MR), in order."""
    return [m for m in models if m.serves(modality) and (role is None or m.role == role)]


def default_model(modality: str, role: str, models: list[ModelInfo]) -> ModelInfo | None:
    """The first model of ``role`` for ``modality`` (a CT+MR model counts for both), bundled ones first."""
    found = models_for(modality, models, role)
    return found[0] if found else None


def teacher_of(student: ModelInfo, models: list[ModelInfo], modality: str | None = None) -> ModelInfo | None:
    """The teacher a student was distilled from when it is installed, else the first teacher of its modality
    that labels the same structures (None if there is none: a brain student has no abdominal teacher).
    A CT+MR student had one teacher per modality: ``modality`` picks which (else its first modality's)."""
    modality = _modality_name(modality) if modality else student.modalities[0]
    wanted = student.teachers.get(modality) or student.teacher
    for model in models:
        if model.role == "teacher" and model.name == wanted:
            return model
    alike = [m for m in models_for(modality, models, "teacher") if m.labels == student.labels]
    return alike[0] if alike else None


def parent_of(model: ModelInfo, models: list[ModelInfo]) -> ModelInfo | None:
    """The installed model ``model`` was fine-tuned from (matched by name and, when recorded, checksum)."""
    if not model.parent:
        return None
    for candidate in models:
        if candidate.name == model.parent and (model.parent_sha256 is None or candidate.sha256 == model.parent_sha256):
            return candidate
    return None


def model_versions(model: ModelInfo, models: list[ModelInfo]) -> list[ModelInfo]:
    """Every version of ``model``'s family: its first installed ancestor, then each model fine-tuned from it
    (depth first, oldest first), ``model`` included. A version whose parent was deleted starts a family."""
    root, seen = model, {model.path}
    while (parent := parent_of(root, models)) is not None and parent.path not in seen:
        root = parent
        seen.add(root.path)
    ordered: list[ModelInfo] = []

    def visit(node: ModelInfo) -> None:
        if any(node.path == m.path for m in ordered):
            return  # a cycle (hand-edited metadata) must not loop
        ordered.append(node)
        children = [m for m in models if m.path != node.path and parent_of(m, models) is not None
                    and parent_of(m, models).path == node.path]
        for child in sorted(children, key=lambda m: (m.created or "", m.name)):
            visit(child)

    visit(root)
    return ordered
