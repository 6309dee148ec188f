"""The user's own models as teachers: ``medkd import-teacher PATH`` turns an nnU-Net v2 result folder, a MONAI
Model Zoo bundle or a TorchScript file into a teacher bundle in the user's models folder.

The source is only read, never modified. The bundle records where it came from (path, each file's sha256,
framework and version), so a teacher can always be traced to the files it was made from; it is written
atomically and never replaces an existing model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .bundle import SOURCE_CONFIGS, Bundle, save_bundle, sha256_of
from .errors import BundleError, InvalidInputError
from .labels import Structure
from .locations import user_models_dir
from .profiles import DEFAULT_PROFILES, Profile
from .volume import normalize_modality

Progress = Callable[[float, str], None]
FORMATS = ("nnunet-v2", "monai-bundle", "torchscript")
# Distinct colours for imported labels (the first ones; grey beyond), in the style of Slicer's label colours.
PALETTE = (
    (0.867, 0.510, 0.396),
    (0.616, 0.424, 0.635),
    (0.722, 0.478, 0.345),
    (0.882, 0.290, 0.263),
    (0.945, 0.839, 0.569),
    (0.000, 0.592, 0.808),
    (0.565, 0.933, 0.565),
    (0.980, 0.859, 0.541),
    (0.694, 0.478, 0.396),
    (0.435, 0.722, 0.824),
    (0.847, 0.396, 0.310),
    (0.867, 0.800, 0.620),
)


def detect_format(path: Path) -> str:
    """Which kind of model ``path`` is, from its files; ``InvalidInputError`` naming the three if none."""
    from .nnunet import model_folders

    if path.is_file() and path.suffix in (".pt", ".ts", ".pth"):
        return "torchscript"
    if path.is_dir():
        if (path / "configs" / "metadata.json").is_file() and (path / "configs" / "inference.json").is_file():
            return "monai-bundle"
        if model_folders(path):
            return "nnunet-v2"
    if not path.exists():
        raise InvalidInputError(f"'{path}' does not exist.", "Check the path of the model to import.")
    raise InvalidInputError(
        f"'{path}' is none of the models MedKDSegment imports.",
        "Give an nnU-Net v2 result folder (dataset.json, plans.json, fold_*/checkpoint_final.pth), a MONAI bundle "
        "folder (configs/metadata.json, configs/inference.json, models/model.pt) or a TorchScript file (.pt/.ts) "
        "with --config and --sha256.",
    )


def structures_from(labels: dict[int, str], folder: Path) -> tuple[Structure, ...]:
    """Foreground structures from {value: name}; values must be 1..N, as MedKDSegment's channel_def needs."""
    foreground = {v: n for v, n in labels.items() if v != 0}
    if sorted(foreground) != list(range(1, len(foreground) + 1)):
        raise InvalidInputError(
            f"'{folder}' has label values {sorted(foreground)}, not 1..{len(foreground)}.",
            "Only models whose labels are numbered consecutively can be imported.",
        )
    if not foreground:
        raise InvalidInputError(f"'{folder}' segments no foreground label.", "Import a segmentation model.")
    return tuple(
        Structure(v, n, PALETTE[v - 1] if v <= len(PALETTE) else (0.5, 0.5, 0.5)) for v, n in sorted(foreground.items())
    )


def _write_teacher(target: Path, network, kind: str, report: Progress, **details) -> Bundle:
    """Write the imported teacher bundle ``target`` (``details`` go to ``save_bundle``)."""
    report(0.7, "writing the teacher bundle")
    bundle = save_bundle(
        target, network, name=target.name, role="teacher", method={"name": "imported", "format": kind}, **details
    )
    report(1.0, "done")
    return bundle


def _target(models_dir: str | os.PathLike | None, name: str) -> Path:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise InvalidInputError(
            f"'{name}' is not a usable model name.", "Give --name a plain word, e.g. my-liver-teacher."
        )
    folder = Path(models_dir) if models_dir else user_models_dir()
    target = folder / name
    if target.exists():
        raise BundleError(f"A model named '{name}' already exists in '{folder}'.", "Choose another --name.")
    folder.mkdir(parents=True, exist_ok=True)
    return target


def import_nnunet(
    path: str | os.PathLike,
    models_dir: str | os.PathLike | None = None,
    name: str | None = None,
    configuration: str | None = None,
    folds: list[str] | None = None,
    checkpoint: str | None = None,
    progress: Progress | None = None,
) -> Bundle:
    """An nnU-Net v2 result folder as a teacher bundle (see ``nnunet``); folds become one ensemble.

    Args:
        path: the result folder, or a dataset folder holding several (then ``configuration`` picks one).
        models_dir: where the bundle goes (default: the user's models folder).
        name: the bundle's name (default: the dataset's name and configuration).
        configuration: e.g. ``3d_fullres``; folds: which folds (default all); checkpoint: final or best.
    """
    import monai
    import torch

    from . import nnunet
    from .networks import build_network

    report = progress or (lambda fraction, stage: None)
    report(0.05, "reading the nnU-Net model folder")
    model = nnunet.read_model_folder(path, configuration, folds, checkpoint)
    labels, regions = nnunet.labels_of(model.dataset, model.folder)
    structures = structures_from(labels, model.folder)
    settings = nnunet.pipeline_settings(model, regions)
    architecture = nnunet.architecture_of(model)
    channels = model.dataset.get("channel_names") or model.dataset.get("modality") or {}
    if len(channels) != 1:
        raise InvalidInputError(
            f"'{model.folder}' takes {len(channels)} input channels ({', '.join(map(str, channels.values()))}).",
            "Only single-channel nnU-Net models can be imported.",
        )
    modality = "CT" if next(iter(channels.values())).strip().upper() == "CT" else "MR"
    dataset_name = str(model.plans.get("dataset_name", model.folder.parent.name))
    target = _target(models_dir, name or f"{dataset_name}-{model.configuration}".replace("_", "-").lower())
    report(0.3, f"rebuilding the network ({len(model.folds)} fold(s))")
    try:
        network = build_network(architecture, len(labels) if regions is None else len(regions["order"]))
    except ValueError as error:
        raise BundleError(
            f"The plans of '{model.folder}' describe a network that cannot be built ({error}).",
            "Check plans.json against the model's source.",
        ) from error
    for fold, state, source in zip(network.folds, model.state_dicts, model.checkpoints, strict=True):
        try:
            fold.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise BundleError(
                f"The weights in '{source}' do not fit the network its plans describe ({error}).",
                "Check that plans.json belongs to these checkpoints.",
            ) from error
    spacing_zyx = [settings["spacing"][a] for a in settings["transpose_backward"]]
    properties = settings["intensity_properties"][0]
    if modality == "CT" and "percentile_00_5" in properties:
        student = Profile(
            "CT",
            tuple(spacing_zyx[::-1]),
            clip=(float(properties["percentile_00_5"]), float(properties["percentile_99_5"])),
        )
    else:
        student = Profile(modality, tuple(spacing_zyx[::-1]), percentiles=(0.5, 99.5))
    source = {
        "framework": "nnU-Net v2",
        "path": str(model.folder.resolve()),
        "configuration": model.configuration,
        "trainer": model.trainer,
        "folds": model.folds,
        "files": {
            str(p.relative_to(model.folder)): sha256_of(p)
            for p in (model.folder / "plans.json", model.folder / "dataset.json", *model.checkpoints)
        },
        "imported_with": {"torch": torch.__version__, "monai": monai.__version__},
    }
    description = (
        f"nnU-Net v2 model {dataset_name} ({model.configuration}, {model.trainer}, "
        f"fold(s) {', '.join(model.folds)}), imported from {model.folder}"
    )
    return _write_teacher(
        target,
        network,
        "nnunet-v2",
        report,
        architecture=architecture,
        profile=Profile(modality, tuple(spacing_zyx[::-1])),
        structures=structures,
        description=description,
        task=f"{modality} segmentation ({', '.join(s.name for s in structures[:6])}"
        + (", ..." if len(structures) > 6 else "")
        + ")",
        extra={
            "pipeline": settings,
            "student_preprocessing": student.to_dict(),
            "source": source,
        },
    )


def _modality(value, source: Path) -> str:
    try:
        return normalize_modality(str(value))
    except InvalidInputError as error:
        raise InvalidInputError(
            f"'{source}' gives the modality {value!r}, which is neither CT nor MR.",
            "Give --modality CT or --modality MR.",
        ) from error


def import_monai_bundle(
    path: str | os.PathLike,
    models_dir: str | os.PathLike | None = None,
    name: str | None = None,
    modality: str | None = None,
    progress: Progress | None = None,
) -> Bundle:
    """A MONAI Model Zoo bundle folder as a teacher bundle (see ``monai_bundle``).

    Args:
        path: the bundle folder (``configs/metadata.json``, ``configs/inference.json``, ``models/model.pt``).
        models_dir: where the bundle goes (default: the user's models folder).
        name: the bundle's name (default: the folder's name).
        modality: CT or MR, when ``metadata.json`` does not say.
    """
    import json

    import monai
    import torch

    from . import monai_bundle

    report = progress or (lambda fraction, stage: None)
    path = Path(path)
    configs = path / "configs"
    report(0.05, "checking the bundle's config")
    monai_bundle.read_config(configs, path)
    try:
        metadata = json.loads((configs / "metadata.json").read_text(encoding="utf-8"))
        channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
        labels = {int(k): str(v) for k, v in channel_def.items()}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
        raise monai_bundle.not_usable(
            path,
            f"configs/metadata.json gives no network_data_format.outputs.pred.channel_def ({error})",
            "Add the label names to metadata.json, as Model Zoo bundles do.",
        ) from error
    structures = structures_from(labels, path)
    if modality is None:
        stated = metadata.get("network_data_format", {}).get("inputs", {}).get("image", {}).get("modality")
        if stated is None:
            raise monai_bundle.not_usable(
                path, "metadata.json does not state the input modality", "Give --modality CT or MR."
            )
        modality = "MR" if str(stated).upper() in ("MRI", "MR") else stated
    modality = _modality(modality, path)
    weights_file = path / "models" / "model.pt"
    if not weights_file.is_file():
        raise monai_bundle.not_usable(
            path, "models/model.pt is missing", "Give a bundle with its weights (models/model.pt)."
        )
    report(0.2, "building the bundle's network with MONAI's parser")
    network = monai_bundle.build_network(configs)
    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError for anything but plain tensors and containers
        raise monai_bundle.not_usable(
            path,
            f"models/model.pt could not be read as weights only ({error})",
            "Save the network's state dict (torch.save(model.state_dict(), ...)).",
        ) from error
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a CheckpointSaver dictionary
        state = state["model"]
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise monai_bundle.not_usable(
            path,
            f"models/model.pt does not fit its network_def ({error})",
            "Check that the weights belong to this config.",
        ) from error
    target = _target(models_dir, name or path.name)
    copies = {str(SOURCE_CONFIGS / f.name): f for f in sorted(configs.glob("*.json"))}
    wrapped = monai_bundle.MonaiBundleNetwork(network, configs)
    source = {
        "framework": "MONAI bundle",
        "path": str(path.resolve()),
        "bundle_version": metadata.get("version"),
        "monai_version": metadata.get("monai_version"),
        "files": {str(f.relative_to(path)): sha256_of(f) for f in (*copies.values(), weights_file)},
        "imported_with": {"torch": torch.__version__, "monai": monai.__version__},
    }
    profile = DEFAULT_PROFILES[modality]
    return _write_teacher(
        target,
        wrapped,
        "monai-bundle",
        report,
        architecture={"name": "MonaiBundle", "kwargs": {}},
        profile=profile,
        structures=structures,
        description=f"MONAI bundle {metadata.get('name', path.name)} {metadata.get('version', '')} from {path}",
        task=str(metadata.get("task", f"{modality} segmentation")),
        extra={
            "pipeline": {"name": monai_bundle.PIPELINE},
            "student_preprocessing": profile.to_dict(),
            "source": source,
        },
        copies=copies,
    )


def import_torchscript(
    path: str | os.PathLike,
    config: str | os.PathLike | None,
    sha256: str | None,
    models_dir: str | os.PathLike | None = None,
    name: str | None = None,
    progress: Progress | None = None,
) -> Bundle:
    """A TorchScript file as a teacher bundle, loaded only when its sha256 equals the one the user confirmed.

    Args:
        path: the TorchScript archive (``torch.jit.save``).
        config: a JSON file: ``labels`` ({"1": "liver", ...}), ``modality`` (CT or MR), ``spacing`` ([x, y, z] mm)
            and the intensity normalisation: ``clip`` ([low, high] HU, scaled to [-1, 1]) or ``percentiles``
            ([low, high], then z-scored in the body), as MedKDSegment's own profiles do.
        sha256: the file's sha256 as the user knows it from its source.
    """
    import json

    import torch

    report = progress or (lambda fraction, stage: None)
    path = Path(path)
    if not sha256 or not config:
        raise InvalidInputError(
            f"Importing the TorchScript file '{path}' needs --sha256 and --config.",
            "Give the file's sha256 from its source (sha256sum FILE), and a JSON with labels, "
            "modality, spacing and clip or percentiles (see README).",
        )
    actual = sha256_of(path)
    if actual != sha256.lower():
        raise InvalidInputError(
            f"'{path}' has the sha256 {actual}, not the {sha256} you confirmed.",
            "Get the file again from its source; TorchScript runs code, so only a verified file is loaded.",
        )
    try:
        settings = json.loads(Path(config).read_text(encoding="utf-8"))
        labels = {int(k): str(v) for k, v in settings["labels"].items()}
        modality = _modality(settings["modality"], Path(config))
        profile = Profile.from_dict(
            {
                "modality": modality,
                "spacing": settings["spacing"],
                "clip": settings.get("clip"),
                "percentiles": settings.get("percentiles"),
            }
        )
    except (
        OSError,
        json.JSONDecodeError,
        UnicodeDecodeError,
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
    ) as error:
        raise InvalidInputError(
            f"'{config}' is not a usable TorchScript model description ({error}).",
            'Give a JSON like {"labels": {"1": "liver"}, "modality": "CT", "spacing": [3, 3, 3], "clip": [-200, 400]}.',
        ) from error
    if (profile.clip is None) == (profile.percentiles is None):
        raise InvalidInputError(
            f"'{config}' must give exactly one of clip (CT window) or percentiles.",
            "Give the normalisation the model was trained with.",
        )
    structures = structures_from(labels, path)
    report(0.3, "loading the TorchScript model")
    try:
        network = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as error:  # torch raises several types for files that are not TorchScript archives
        raise InvalidInputError(
            f"'{path}' is not a TorchScript archive ({error}).",
            "Export the model with torch.jit.script or torch.jit.trace and torch.jit.save.",
        ) from error
    with torch.no_grad():
        probe = network(torch.zeros(1, 1, 32, 32, 32))
    if not isinstance(probe, torch.Tensor) or probe.ndim != 5 or probe.shape[1] != len(structures) + 1:
        shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
        raise InvalidInputError(
            f"'{path}' gives {shape} for a (1, 1, 32, 32, 32) input, not "
            f"(1, {len(structures) + 1}, z, y, x) logits for its {len(structures)} labels.",
            "Check the labels in the config against the model's outputs.",
        )
    target = _target(models_dir, name or path.stem)
    source = {
        "framework": "TorchScript",
        "path": str(path.resolve()),
        "files": {path.name: actual},
        "config": settings,
        "imported_with": {"torch": torch.__version__},
    }
    return _write_teacher(
        target,
        network,
        "torchscript",
        report,
        architecture={"name": "TorchScript", "kwargs": {}},
        profile=profile,
        structures=structures,
        description=f"TorchScript model {path.name} (sha256 {actual[:12]}…), imported from {path}",
        task=f"{modality} segmentation",
        torchscript=path,
        extra={"source": source},
    )


def import_teacher(
    path: str | os.PathLike,
    models_dir: str | os.PathLike | None = None,
    name: str | None = None,
    progress: Progress | None = None,
    **options,
) -> Bundle:
    """Import the model at ``path`` (its format detected) as a teacher bundle; ``options`` go to the format's
    importer: ``configuration``, ``folds``, ``checkpoint`` (nnU-Net), ``modality`` (MONAI bundle), ``config``
    and ``sha256`` (TorchScript). Options a format does not take are refused."""
    path = Path(path)
    kind = detect_format(path)
    takes = {
        "nnunet-v2": ("configuration", "folds", "checkpoint"),
        "monai-bundle": ("modality",),
        "torchscript": ("config", "sha256"),
    }[kind]
    given = {k: v for k, v in options.items() if v not in (None, [], "")}
    unused = sorted(set(given) - set(takes))
    if unused:
        raise InvalidInputError(
            f"'{path}' is a {kind} model, which takes no {', '.join(unused)}.",
            f"Leave {', '.join(unused)} out (it takes {', '.join(takes)}).",
        )
    if kind == "nnunet-v2":
        return import_nnunet(path, models_dir, name, progress=progress, **given)
    if kind == "monai-bundle":
        return import_monai_bundle(path, models_dir, name, progress=progress, **given)
    return import_torchscript(path, given.get("config"), given.get("sha256"), models_dir, name, progress=progress)
