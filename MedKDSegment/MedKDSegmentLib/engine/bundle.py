"""Model bundles: MONAI's bundle layout plus a ``medkdsegment`` section.

    <name>/configs/metadata.json   MONAI metadata (network_data_format, channel_def) + medkdsegment
    <name>/configs/inference.json  how MONAI's own bundle runner segments with it (``monai_config``), where it can
    <name>/models/model.pt         state dict, loaded with ``weights_only=True``, sha256-checked
    <name>/models/model.ts         instead, for an imported TorchScript teacher (sha256 confirmed at import)
    <name>/models/model.onnx       the same network for ONNX Runtime, where it exports (``onnx_network``)
    <name>/source/configs/         an imported MONAI bundle's own configs (sha256-checked when parsed)

Bundles are written to a temporary folder and renamed into place, and never overwritten.
Reading a bundle needs no torch (a student with an ONNX copy then segments without it); torch and MONAI
are imported where networks are built or saved.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .architectures import architecture_problem
from .errors import BundleError, InvalidInputError
from .labels import Structure, Terminology, label_colors, terminology_of
from .locations import METADATA, WEIGHTS, bundled_models_dir, user_models_dir
from .monai_config import write_inference_config
from .onnx_network import ONNX_WEIGHTS, OnnxNetwork, export_onnx, onnx_exporter_installed
from .profiles import Profile
from .volume import MODALITIES, normalize_modality, usual_permissions

if TYPE_CHECKING:
    import torch
    from torch import nn

# 2 added medkdsegment.modalities (CT+MR bundles). Only those are written as 2: older readers,
# which would rebuild the network without per-modality norms, refuse them by version; others stay 1.
FORMAT_VERSION = 2
TORCHSCRIPT_WEIGHTS = Path("models") / "model.ts"
SOURCE_CONFIGS = Path("source") / "configs"
ROLES = ("teacher", "student", "assistant")
BUNDLED_MODELS = bundled_models_dir()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Bundle:
    path: Path
    metadata: dict

    @property
    def info(self) -> dict:
        return self.metadata["medkdsegment"]

    @property
    def name(self) -> str:
        return self.metadata["name"]

    @property
    def role(self) -> str:
        return self.info["role"]

    @property
    def modality(self) -> str:
        """'CT', 'MR', or 'CT+MR' for a bundle that segments both (``modalities`` joined)."""
        return "+".join(self.modalities)

    @property
    def profile(self) -> Profile:
        """The primary profile (the only one of a single-modality bundle); see ``profile_for``."""
        return Profile.from_dict(self.info["preprocessing"])

    @property
    def modality_specific(self) -> bool:
        """True when the network has normalisation layers per modality (``medkdsegment.modalities``)."""
        return bool(self.info.get("modalities"))

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities this bundle segments, in norm-index order."""
        section = self.info.get("modalities")
        if not section:
            return (self.profile.modality,)
        return tuple(sorted(section, key=lambda name: section[name]["norm_index"]))

    def profile_for(self, modality: str) -> Profile:
        """The preprocessing profile for a volume of ``modality``; ``InvalidInputError`` if not served."""
        name = normalize_modality(modality)
        if name not in self.modalities:
            raise InvalidInputError(
                f"The volume is {name} but model '{self.name}' is for {self.modality}.",
                f"Pick a {name} model, or override the modality if it was detected wrongly.",
            )
        section = self.info.get("modalities")
        return Profile.from_dict(section[name]["preprocessing"]) if section else self.profile

    @property
    def pipeline(self) -> dict | None:
        """A published teacher's own pipeline (``{"name": "hd-bet", ...}``), which then replaces the
        profile-and-sliding-window inference; None for MedKDSegment's own networks."""
        return self.info.get("pipeline")

    @property
    def channel_def(self) -> dict[str, str]:
        return self.metadata["network_data_format"]["outputs"]["pred"]["channel_def"]

    @property
    def labels(self) -> dict[int, str]:
        """Foreground label value -> name."""
        return {int(k): v for k, v in self.channel_def.items() if int(k) != 0}

    @property
    def colors(self) -> dict[int, tuple[float, float, float]]:
        """Label value -> RGB (``labels.label_colors``: the label table's colour for a name it knows)."""
        return label_colors(self.labels, {int(k): tuple(v) for k, v in self.info.get("label_colors", {}).items()})

    @property
    def trained_on(self) -> str | None:
        """What the model's own volumes were, as its domain record says (e.g. "20 CT phantom abdomens")."""
        return (self.info.get("domain") or {}).get("volumes")

    @property
    def privileged(self) -> list[str]:
        """The modalities of the scans a KD-Net teacher takes after the image (empty for other models)."""
        return [entry["modality"] for entry in self.info.get("privileged") or []]

    @property
    def structures(self) -> tuple[Structure, ...]:
        """The foreground labels with their colours (grey where none is known) and coded terminology: the label
        tables' for a name they know, else what the bundle records (``medkdsegment.terminology``), else none."""
        colors, recorded = self.colors, self.info.get("terminology") or {}
        try:
            return tuple(Structure(value, name, colors.get(value, (0.5, 0.5, 0.5)), terminology_of(name) or (
                Terminology.from_dict(recorded[str(value)]) if str(value) in recorded else None))
                for value, name in self.labels.items())
        except (AttributeError, TypeError, ValueError) as error:
            raise BundleError(f"Bundle '{self.name}' records an invalid terminology ({error}).",
                              "Correct medkdsegment.terminology in its metadata.json, or re-create it.") from error

    @property
    def student_profile(self) -> Profile:
        """How a student of this teacher prepares its input: a published teacher's recorded
        ``student_preprocessing`` (its own pipeline is not a profile), else the teacher's profile."""
        recorded = self.info.get("student_preprocessing")
        return Profile.from_dict(recorded) if recorded else self.profile

    @property
    def num_classes(self) -> int:
        return len(self.channel_def)

    @property
    def parameters(self) -> int:
        return int(self.info["parameters"])

    @property
    def weights_sha256(self) -> str:
        return self.info["weights_sha256"]

    @property
    def reads_features(self) -> bool:
        """Whether a student can read this teacher's inner features on its own input (for ``hint`` and ``at``):
        not through a published or imported teacher's own whole-volume pipeline, nor inside a TorchScript model."""
        return self.pipeline is None and self.info["architecture"]["name"] != "TorchScript"

    @property
    def weights_path(self) -> Path:
        return self.path / _weights_file(self.info)

    def summary(self) -> dict:
        """What a user wants to see in a model list."""
        return {
            "name": self.name,
            "role": self.role,
            "modality": self.modality,
            "labels": list(self.labels.values()),
            "parameters": self.parameters,
            "gmacs_96": self.info.get("gmacs_96"),
            "method": self.info.get("method"),
            "teacher": (self.info.get("teacher") or {}).get("name"),
            "version": self.metadata.get("version"),
            "size_mb": round(self.weights_path.stat().st_size / 1e6, 2),
            "path": str(self.path),
        }

    @property
    def onnx(self) -> dict | None:
        """The ONNX copy's record (``onnx_network.export_onnx``), or None: not every network exports."""
        return self.info.get("onnx")

    def load_onnx(self) -> OnnxNetwork:
        """The ONNX copy in an ONNX Runtime session on the CPU. Its bytes and the weights file are checked
        against their recorded sha256 first: a bundle with either changed is damaged, whichever one runs."""
        if self.onnx is None:
            raise BundleError(f"Bundle '{self.name}' has no ONNX copy.", "Run it with torch (any device).")
        self._check_weights()
        try:
            model = (self.path / ONNX_WEIGHTS).read_bytes()
        except OSError as error:
            raise BundleError(f"The ONNX copy of bundle '{self.name}' could not be read ({error}).",
                              "Restore the bundle from its source or re-create it.") from error
        self._check_onnx(hashlib.sha256(model).hexdigest())
        return OnnxNetwork(model, self.onnx)

    def _check_weights(self) -> None:
        if sha256_of(self.weights_path) != self.weights_sha256:
            raise BundleError(
                f"The weights of bundle '{self.name}' do not match their recorded sha256 "
                "(the file was changed or damaged).",
                f"Restore '{self.weights_path}' from its source or re-create the bundle.",
            )

    def _check_onnx(self, digest: str | None = None) -> None:
        """The ONNX copy (when the bundle records one) against its recorded sha256; ``digest``: of bytes read."""
        if self.onnx is None:
            return
        path = self.path / ONNX_WEIGHTS
        if (digest or (sha256_of(path) if path.is_file() else None)) != self.onnx.get("sha256"):
            raise BundleError(f"The ONNX copy of bundle '{self.name}' does not match its recorded sha256 "
                              "(the file was changed, damaged or removed).",
                              f"Restore '{path}' from its source or re-create the bundle.")

    def load_network(self, device: str | torch.device = "cpu") -> nn.Module:
        """The network in eval mode with the bundle's weights (the weights and any ONNX copy checked against
        their recorded sha256 first)."""
        import torch

        from .modality_norm import make_modality_specific
        from .networks import build_network

        weights = self.weights_path
        self._check_weights()
        self._check_onnx()
        kind = self.info["architecture"]["name"]
        if kind == "TorchScript":  # the file whose sha256 the user confirmed at import, checked just above
            try:
                return torch.jit.load(str(weights), map_location="cpu").to(device).eval()
            except Exception as error:  # torch raises several types for damaged archives
                raise BundleError(f"The TorchScript model of bundle '{self.name}' could not be loaded ({error}).",
                                  "Re-import it from its source.") from error
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for corrupt files
            raise BundleError(
                f"The weights of bundle '{self.name}' could not be read ({error}).",
                "Re-create or re-download the bundle.",
            ) from error
        try:
            network = self._imported_monai_network() if kind == "MonaiBundle" else build_network(
                self.info["architecture"], self.num_classes)
        except (TypeError, ValueError) as error:  # settings the network does not take
            raise BundleError(f"Bundle '{self.name}' describes a network that cannot be built ({error}).",
                              "The bundle is inconsistent; re-create it.") from error
        if self.modality_specific:  # per-modality normalisation layers, in the recorded norm-index order
            _check_modalities(self.info, self.path)
            network = make_modality_specific(network, self.modalities)
        try:
            network.load_state_dict(state)  # copies and converts float16 storage to float32
        except RuntimeError as error:
            raise BundleError(
                f"The weights of bundle '{self.name}' do not fit its architecture.",
                "The bundle is inconsistent; re-create it.",
            ) from error
        return network.to(device).eval()

    def _imported_monai_network(self) -> nn.Module:
        """An imported MONAI bundle's ``network_def``, parsed from its copied configs once they are verified."""
        from .monai_bundle import MonaiBundleNetwork
        from .monai_bundle import build_network as build_bundle_network

        for name, digest in self.info.get("source", {}).get("copied", {}).items():
            if not (self.path / name).is_file() or sha256_of(self.path / name) != digest:
                raise BundleError(f"'{name}' of bundle '{self.name}' does not match its recorded sha256.",
                                  "Re-import the MONAI bundle from its source.")
        folder = self.path / SOURCE_CONFIGS
        return MonaiBundleNetwork(build_bundle_network(folder), folder)


def _weights_file(info: dict) -> Path:
    architecture = info.get("architecture")
    scripted = isinstance(architecture, dict) and architecture.get("name") == "TorchScript"
    return TORCHSCRIPT_WEIGHTS if scripted else WEIGHTS


def _require(condition: bool, path: Path, problem: str) -> None:
    if not condition:
        raise BundleError(
            f"'{path}' is not a valid MedKDSegment bundle: {problem}.",
            "Use a bundle made by MedKDSegment (see README, 'Model bundle format').",
        )


def _check_modalities(info: dict, path: Path) -> None:
    """``medkdsegment.modalities`` (optional): known modality names, each with a valid profile of
    that modality and a distinct ``norm_index`` 0..n-1; the primary profile is one of them."""
    section = info.get("modalities")
    if section is None:
        return
    _require(isinstance(section, dict) and len(section) > 0, path, "medkdsegment.modalities must be a non-empty object")
    indices = []
    for name, entry in section.items():
        _require(
            name in MODALITIES,
            path,
            f"medkdsegment.modalities names an unknown modality '{name}' (known: {', '.join(MODALITIES)})",
        )
        _require(isinstance(entry, dict), path, f"medkdsegment.modalities.{name} must be an object")
        index = entry.get("norm_index")
        _require(
            isinstance(index, int) and not isinstance(index, bool),
            path,
            f"medkdsegment.modalities.{name}.norm_index must be an integer",
        )
        indices.append(index)
        try:
            profile = Profile.from_dict(entry.get("preprocessing") or {})
        except Exception as error:
            _require(False, path, f"medkdsegment.modalities.{name}.preprocessing: {error}")
        _require(profile.modality == name, path, f"medkdsegment.modalities.{name} holds a {profile.modality} profile")
    _require(
        sorted(indices) == list(range(len(indices))),
        path,
        "medkdsegment.modalities norm_index values must be 0..n-1, each once",
    )
    primary = Profile.from_dict(info["preprocessing"]).modality  # validated by load_bundle before
    _require(primary in section, path, "medkdsegment.preprocessing must be the profile of one of its modalities")


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Open and validate a bundle folder (the weights are checked when loaded)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(
            f"Model bundle '{path}' does not exist.", "Check the name or path ('medkd info' lists models)."
        )
    meta_file = path / METADATA
    _require(meta_file.is_file(), path, f"{METADATA} is missing")
    try:
        metadata = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"'{meta_file}' is not valid JSON ({error}).", "Re-create the bundle.") from error
    _require(isinstance(metadata, dict), path, "metadata.json is not an object")
    try:
        channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
        info = metadata["medkdsegment"]
    except (KeyError, TypeError):
        _require(False, path, "network_data_format.outputs.pred.channel_def or the medkdsegment section is missing")
    _require(
        isinstance(channel_def, dict) and all(str(k).isdigit() for k in channel_def)
        and sorted(int(k) for k in channel_def) == list(range(len(channel_def))) and 2 <= len(channel_def) <= 256,
        path,
        "channel_def must name every output channel 0..N-1 (2 to 256 of them)",
    )
    _require(isinstance(info, dict), path, "the medkdsegment section is not an object")
    _require((path / _weights_file(info)).is_file(), path, f"{_weights_file(info)} is missing")
    for key in ("role", "architecture", "preprocessing", "weights_sha256", "parameters", "format_version"):
        _require(key in info, path, f"medkdsegment.{key} is missing")
    _require(isinstance(info["role"], str) and info["role"] in ROLES, path,
             f"role '{info['role']}' is not one of {ROLES}")
    _require(isinstance(info["format_version"], int), path, "format_version is not a whole number")
    _require(info["format_version"] <= FORMAT_VERSION, path, "it was made by a newer MedKDSegment")
    _require(isinstance(info["weights_sha256"], str) and len(info["weights_sha256"]) == 64, path,
             "weights_sha256 is not a sha256")
    problem = architecture_problem(info["architecture"])
    _require(problem is None, path, str(problem))
    _require("name" in metadata, path, "name is missing")
    bundle = Bundle(path, metadata)
    try:
        bundle.profile  # noqa: B018 (validates the profile)
    except Exception as error:
        _require(False, path, str(error))
    _check_modalities(info, path)
    return bundle


def find_bundles(*folders: str | os.PathLike, problems: list[str] | None = None) -> list[Bundle]:
    """Every valid bundle directly inside ``folders`` (the bundled models by default). Folders still being
    written or left by a crash (``.partial-*``) are passed over; so is a broken bundle, whose problem is
    added to ``problems`` when given, so one bad folder never hides the others."""
    bundles = []
    for folder in folders or (BUNDLED_MODELS,):
        for candidate in sorted(Path(folder).glob(f"*/{METADATA}")):
            if candidate.parents[1].name.startswith("."):
                continue
            try:
                bundles.append(load_bundle(candidate.parents[1]))
            except BundleError as error:
                if problems is not None:
                    problems.append(f"{candidate.parents[1]}: {error.problem}")
    return bundles


def default_model_folders() -> tuple[Path, ...]:
    """Where models are found by name: the bundled models, then the user's models folder (where
    ``medkd teachers get`` puts published teachers) when it exists."""
    user = user_models_dir()
    return (BUNDLED_MODELS, user) if user.is_dir() else (BUNDLED_MODELS,)


def resolve_bundle(name_or_path: str | os.PathLike, *folders: str | os.PathLike) -> Bundle:
    """A bundle given by path, or by name among ``folders`` (``default_model_folders()`` by default)."""
    path = Path(name_or_path)
    if path.is_dir():
        return load_bundle(path)
    folders = folders or default_model_folders()
    for folder in folders:
        if (Path(folder) / str(name_or_path)).is_dir():
            return load_bundle(Path(folder) / str(name_or_path))
    known = [b.name for b in find_bundles(*folders)]
    raise BundleError(f"No model bundle named '{name_or_path}'.", f"Known models: {', '.join(known) or 'none'}.")


def save_bundle(
    folder: str | os.PathLike,
    network: nn.Module,
    *,
    name: str,
    role: str,
    architecture: dict,
    profile: Profile | None = None,
    structures: tuple[Structure, ...],
    method: dict,
    profiles: dict[str, Profile] | None = None,
    teachers: dict[str, Bundle | None] | None = None,
    teacher: Bundle | None = None,
    parent: Bundle | None = None,
    metrics: dict | None = None,
    description: str = "",
    version: str = "1.0.0",
    half_precision: bool = False,
    task: str | None = None,
    extra: dict | None = None,
    references: list[str] | None = None,
    torchscript: Path | None = None,
    copies: dict[str, Path] | None = None,
) -> Bundle:
    """Write a new bundle atomically; refuse to overwrite an existing one.

    ``task`` (default: abdominal segmentation) and ``references`` (citations) go into MONAI's metadata;
    ``extra`` adds keys to the ``medkdsegment`` section (a published teacher's ``pipeline``, ``source``,
    ``licence`` and ``citation``). ``torchscript`` is a verified TorchScript file stored as the weights
    (``network`` is its loaded module); ``copies`` are files copied in ({path in the bundle: file}), their
    sha256 recorded in ``medkdsegment.source.copied``.

    ``half_precision`` stores learned weights as float16 (half the file size; they are
    converted back to float32 on load); buffers such as batch-norm statistics stay float32.
    A modality-specific network (``modality_norm.make_modality_specific``) needs ``profiles``, one per
    modality of its normalisation layers (and optionally ``teachers`` per modality); ``profile``,
    the primary one kept in ``medkdsegment.preprocessing``, then defaults to the first modality's.

    A network that runs on whole volumes (``prediction.window_independent``) also gets its ONNX copy, unless
    it runs through a published teacher's own pipeline or the ``onnx`` package is missing.
    """
    import monai
    import torch

    from .modality_norm import network_modalities
    from .networks import count_parameters, input_channels
    from .prediction import window_independent

    folder = Path(folder)
    if folder.exists():
        raise BundleError(f"'{folder}' already exists; bundles are never overwritten.", "Choose a new name.")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    modalities = network_modalities(network)
    if modalities:
        profiles = {normalize_modality(k): v for k, v in (profiles or {}).items()}
        if set(profiles) != set(modalities):
            raise ValueError(f"a network with norm layers for {modalities} needs exactly those profiles")
        profile = profile or profiles[modalities[0]]
        if profiles.get(profile.modality) != profile:
            raise ValueError("the primary profile must be one of the per-modality profiles")
    elif profiles is not None and set(profiles) != {(profile or next(iter(profiles.values()))).modality}:
        raise ValueError("several profiles need a modality-specific network (modality_norm.make_modality_specific)")
    profile = profile or next(iter((profiles or {}).values()), None)
    if profile is None:
        raise ValueError("a profile is needed")
    modality_name = "+".join(modalities) if modalities else profile.modality
    privileged = (extra or {}).get("privileged") or []  # KD-Net: teacher-only input channels after the image
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".partial-{folder.name}-", dir=folder.parent))
    try:
        (staging / WEIGHTS).parent.mkdir(parents=True)
        (staging / METADATA).parent.mkdir(parents=True)
        # Only learned parameters are halved: batch-norm running variances can exceed float16's range.
        halve = {name for name, _ in network.named_parameters()} if half_precision else set()
        if torchscript is not None:
            shutil.copyfile(torchscript, staging / TORCHSCRIPT_WEIGHTS)
        else:
            state = {
                k: (v.half() if k in halve else v).detach().cpu().contiguous() for k, v in network.state_dict().items()
            }
            torch.save(state, staging / WEIGHTS)
            # Not for a network taking several channels (privileged scans): the ONNX runner feeds one scan.
            if not modalities and not (extra or {}).get("pipeline") and input_channels(network) == 1 \
                    and window_independent(network) and onnx_exporter_installed():
                exported = copy.deepcopy(network).cpu()
                exported.load_state_dict(state)  # as the bundle's weights load: float16-stored ones rounded
                record = export_onnx(exported.eval(), staging / ONNX_WEIGHTS)
                extra = {**(extra or {}), "onnx": {"sha256": sha256_of(staging / ONNX_WEIGHTS), **record}}
        copied = {}
        for name, file in (copies or {}).items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, staging / name)
            copied[name] = sha256_of(staging / name)
        if copies:
            extra = {**(extra or {}), "source": {**(extra or {}).get("source", {}), "copied": copied}}
        num_classes = len(structures) + 1
        channel_def = {"0": "background", **{str(s.value): s.name for s in structures}}
        modality_format = "+".join({"CT": "hounsfield", "MR": "magnitude"}[m] for m in modality_name.split("+"))
        metadata = {
            "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
            "name": name,
            "version": version,
            "changelog": {version: description or "created"},
            "monai_version": monai.__version__,
            "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": np.__version__,
            "required_packages_version": {"SimpleITK": "2.5"},
            "task": task or f"{modality_name} abdominal segmentation",
            "description": description,
            "authors": "MedKDSegment",
            "copyright": "MedKDSegment contributors",
            "network_data_format": {
                "inputs": {
                    "image": {
                        "type": "image",
                        "format": modality_format,
                        "modality": modality_name,
                        "num_channels": 1 + len(privileged),
                        "spatial_shape": ["8*n", "8*n", "8*n"],
                        "dtype": "float32",
                        "value_range": [],
                        "is_patch_data": True,
                        "channel_def": {"0": "image", **{str(i + 1): p["modality"] for i, p in enumerate(privileged)}},
                    }
                },
                "outputs": {
                    "pred": {
                        "type": "image",
                        "format": "segmentation",
                        "num_channels": num_classes,
                        "spatial_shape": ["8*n", "8*n", "8*n"],
                        "dtype": "float32",
                        "value_range": [],
                        "is_patch_data": True,
                        "channel_def": channel_def,
                    }
                },
            },
            "medkdsegment": {
                "format_version": 2 if modalities else 1,
                "role": role,
                "architecture": architecture,
                "output_stride": getattr(network, "output_stride", 1),
                "preprocessing": profile.to_dict(),
                "label_colors": {str(s.value): list(s.color) for s in structures},
                "terminology": recorded_terminology(structures),
                "method": method,
                "teacher": _reference(teacher),
                "parent": _reference(parent),
                "parameters": count_parameters(network),
                "gmacs_96": _gmacs(network),
                "weights_dtype": "float16" if half_precision else "float32",
                "weights_sha256": sha256_of(staging / (TORCHSCRIPT_WEIGHTS if torchscript else WEIGHTS)),
                "metrics": metrics or {},
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                **(extra or {}),
            },
        }
        if references:
            metadata["references"] = list(references)
        if modalities:  # which profile and which normalisation layers serve each modality
            metadata["medkdsegment"]["modalities"] = {
                m: {
                    "preprocessing": profiles[m].to_dict(),
                    "norm_index": index,
                    "teacher": _reference((teachers or {}).get(m)),
                }
                for index, m in enumerate(modalities)
            }
        (staging / METADATA).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
        write_inference_config(staging, metadata)
        usual_permissions(staging)
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_bundle(folder)


def recorded_terminology(structures: tuple[Structure, ...]) -> dict[str, dict]:
    """What a bundle records of its labels' terminology (the structure's own, else the label tables')."""
    coded = {s.value: s.terminology or terminology_of(s.name) for s in structures}
    return {str(value): terminology.to_dict() for value, terminology in coded.items() if terminology}


def _gmacs(network: nn.Module) -> float | None:
    """Giga multiply-accumulates on a 96³ patch; None for a TorchScript module (it takes no forward hooks) and
    for a network whose total stride does not divide 96 (an nnU-Net plan's may not)."""
    import torch

    from .networks import count_macs

    if isinstance(network, torch.jit.ScriptModule):
        return None
    try:
        return round(count_macs(network, (96, 96, 96)) / 1e9, 3)
    except RuntimeError:  # torch's error for feature maps that do not fit together
        return None


def _reference(bundle: Bundle | None) -> dict | None:
    if bundle is None:
        return None
    return {"name": bundle.name, "version": bundle.metadata.get("version"), "weights_sha256": bundle.weights_sha256}


# A zipped bundle expands to at most this (HD-BET's five folds are 330 MB): a small archive that would
# expand to far more is a zip bomb.
MAX_ARCHIVE_BYTES = 2 * 1024**3


def extract_bundle_archive(archive: str | os.PathLike, destination: str | os.PathLike) -> Bundle:
    """Import a zipped bundle folder into ``destination``: members that would land outside its folder, an
    archive that would expand beyond ``MAX_ARCHIVE_BYTES`` and an invalid bundle are refused before
    anything lands there; an existing bundle is never replaced."""
    archive, destination = Path(archive), Path(destination)
    if not destination.is_dir():
        raise InvalidInputError(f"The models folder '{destination}' does not exist.",
                                "Create it first, or choose an existing folder.")
    try:
        with zipfile.ZipFile(archive) as handle:
            members = handle.infolist()
            roots = sorted({Path(m.filename).parts[0] for m in members if m.filename.strip("/")})
            if len(roots) != 1 or all(m.filename.strip("/") == roots[0] for m in members):
                raise BundleError(f"'{archive}' must hold one bundle folder; it holds {roots[:5] or 'nothing'}.",
                                  "Zip the bundle folder itself (the folder holding configs/ and models/).")
            expanded = sum(m.file_size for m in members)
            if expanded > MAX_ARCHIVE_BYTES:
                raise BundleError(f"'{archive}' would expand to {expanded / 1e6:.0f} MB, more than any bundle.",
                                  "Refusing it; ask the bundle's author for the bundle itself.")
            target = destination / roots[0]
            if target.exists():
                raise BundleError(f"'{target}' already exists; bundles are never overwritten.", "Remove it first.")
            base = destination.resolve()
            for member in members:
                resolved = (destination / member.filename).resolve()
                if (
                    not resolved.is_relative_to(base)
                    or member.filename.startswith("/")
                    or (member.external_attr >> 28) == 0xA
                ):
                    raise BundleError(
                        f"'{archive}' holds a member that escapes its folder ('{member.filename}').",
                        "Refusing to extract it; ask the bundle's author for a clean archive.",
                    )
            staging = Path(tempfile.mkdtemp(prefix=".partial-import-", dir=destination))
            try:
                handle.extractall(staging)
                bundle = load_bundle(staging / target.name)
                bundle.load_network()  # verifies the checksum and that the weights fit
                usual_permissions(staging / target.name)
                os.rename(staging / target.name, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (zipfile.BadZipFile, FileNotFoundError, IsADirectoryError) as error:
        raise BundleError(f"'{archive}' is not a zip archive ({error}).", "Give a .zip of a bundle folder.") from error
    return load_bundle(target)
