"""nnU-Net v2 trained models as teachers: reading a result folder, its network, and its inference pipeline.

A user's nnU-Net v2 model (their own, or TotalSegmentator's) is a result folder holding ``dataset.json``,
``plans.json`` and ``fold_*/checkpoint_final.pth``. Its network is rebuilt from the plans with nnU-Net's own
architecture package (``dynamic-network-architectures``), from an allow-list of classes and layer types
(the plans name them as import paths, which nnU-Net itself imports blindly). The checkpoints are read with
``weights_only=True``, allowing only the plain numpy scalar types nnU-Net's logging stores.

``segment_nnunet`` reproduces ``nnUNetPredictor`` (nnunetv2 2.8) step by step, because importing nnunetv2
would pull in its training stack (and torchvision, which replaces the pinned torch):

1. the array as SimpleITK stores it (z, y, x) (RAS-reoriented first for ``NibabelIOWithReorient``), then the
   plans' ``transpose_forward``;
2. cropped to the bounding box of the non-zero voxels (holes filled);
3. normalised per the plans (``CTNormalization``: clipped to the foreground's 0.5–99.5 percentiles, then the
   foreground mean and standard deviation; ``ZScoreNormalization``, optionally inside the non-zero mask;
   ``RescaleTo01Normalization``; ``NoNormalization``);
4. resampled to the configuration's spacing as scikit-image's ``resize`` does (cubic), with nnU-Net's
   separate-z rule for anisotropic data (in-plane cubic, nearest across slices);
5. padded to at least the patch size, a sliding window with step 0.5 of the patch, Gaussian weighting
   (sigma 1/8 of the patch) and optional mirroring over the allowed axes, logits accumulated in float16 as
   nnU-Net does; folds averaged;
6. logits resampled back (linear, same separate-z rule), arg-max (or sigmoid > 0.5 per region, in the
   region order, for region-based models), put back into the crop box, transposed back.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage
from torch import nn

from .errors import BundleError, CancelledError, InvalidInputError
from .profiles import new_shape, resample_probabilities, resize, zoomed_grid
from .report import read_json_object
from .volume import Volume

PIPELINE = "nnunet-v2"
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")
ANISOTROPY_THRESHOLD = 3  # nnunetv2.configuration.ANISO_THRESHOLD
INSTALL_HINT = "pip install --no-deps dynamic-network-architectures==0.4.4 einops"

# The network classes and layer types a plan may name (nnU-Net's import paths -> what is built). nnU-Net
# imports whatever path a plan names; a teacher here is built only from these.
NETWORK_CLASSES = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": "PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": "ResidualEncoderUNet",
}
LAYERS = {
    "torch.nn.modules.conv.Conv3d": nn.Conv3d,
    "torch.nn.Conv3d": nn.Conv3d,
    "torch.nn.modules.instancenorm.InstanceNorm3d": nn.InstanceNorm3d,
    "torch.nn.InstanceNorm3d": nn.InstanceNorm3d,
    "torch.nn.modules.batchnorm.BatchNorm3d": nn.BatchNorm3d,
    "torch.nn.BatchNorm3d": nn.BatchNorm3d,
    "torch.nn.modules.dropout.Dropout3d": nn.Dropout3d,
    "torch.nn.Dropout3d": nn.Dropout3d,
    "torch.nn.LeakyReLU": nn.LeakyReLU,
    "torch.nn.modules.activation.LeakyReLU": nn.LeakyReLU,
    "torch.nn.ReLU": nn.ReLU,
    "torch.nn.modules.activation.ReLU": nn.ReLU,
    "torch.nn.GELU": nn.GELU,
    "torch.nn.modules.activation.GELU": nn.GELU,
}
NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization", "RescaleTo01Normalization", "NoNormalization")
READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient", "SimpleITKWithReorientIO")
MAX_NUMBER = 4096  # no setting of a plan is larger (features, kernel sizes, strides, stages)


def _architecture_class(name: str):
    try:
        from dynamic_network_architectures.architectures import unet
    except ImportError as error:
        raise BundleError(
            "nnU-Net teachers need nnU-Net's architecture package, which is not installed.",
            f"Install it: {INSTALL_HINT} (its timm dependency is only for other architectures and would "
            "replace torch).",
        ) from error
    return getattr(unet, NETWORK_CLASSES[name])


def architecture_problem(kwargs: dict) -> str | None:
    """What is wrong with an ``NnUNetEnsemble`` architecture from a bundle (or a plan), or None."""
    if not isinstance(kwargs, dict):
        return "architecture kwargs must be an object"
    if kwargs.get("network_class_name") not in NETWORK_CLASSES:
        got = kwargs.get("network_class_name")
        return f"network_class_name must be one of {', '.join(NETWORK_CLASSES)} (got {got!r})"
    for key in ("folds", "input_channels"):
        if not isinstance(kwargs.get(key), int) or not 1 <= kwargs[key] <= 16:
            return f"{key} must be a whole number from 1 to 16"
    arch = kwargs.get("arch_kwargs")
    if not isinstance(arch, dict):
        return "arch_kwargs must be an object"
    for key in kwargs.get("requires_import", []):
        if arch.get(key) is not None and arch.get(key) not in LAYERS:
            return f"arch_kwargs.{key} = {arch.get(key)!r} is not a layer MedKDSegment builds ({', '.join(LAYERS)})"
    for key, value in arch.items():
        if key in kwargs.get("requires_import", []):
            continue
        if not _plain(value):
            return f"arch_kwargs.{key} must hold only numbers, words and lists or objects of them"
    return None


def _plain(value, depth: int = 0) -> bool:
    """Numbers within ``MAX_NUMBER``, words, None, and short lists or objects of them."""
    if depth > 3:
        return False
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, (int, float)):
        return -MAX_NUMBER <= value <= MAX_NUMBER
    if isinstance(value, list):
        return len(value) <= 16 and all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return len(value) <= 16 and all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


class NnUNetEnsemble(nn.Module):
    """The folds of an nnU-Net model (``folds.0``, ``folds.1``, ...), each the plan's network built with
    ``dynamic-network-architectures`` without deep supervision; ``forward`` averages their logits."""

    def __init__(
        self,
        out_channels: int,
        network_class_name: str,
        arch_kwargs: dict,
        requires_import: list,
        input_channels: int = 1,
        folds: int = 1,
    ) -> None:
        super().__init__()
        problem = architecture_problem(
            {
                "network_class_name": network_class_name,
                "arch_kwargs": arch_kwargs,
                "requires_import": requires_import,
                "folds": folds,
                "input_channels": input_channels,
            }
        )
        if problem:
            raise ValueError(problem)
        network_class = _architecture_class(network_class_name)
        kwargs = {k: (LAYERS[v] if k in requires_import and v is not None else v) for k, v in arch_kwargs.items()}
        self.folds = nn.ModuleList(
            network_class(input_channels=input_channels, num_classes=out_channels, deep_supervision=False, **kwargs)
            for _ in range(folds)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([fold(x) for fold in self.folds]).mean(0)


# ---- reading a result folder ------------------------------------------------------------------------------


@dataclass
class NnUNetModel:
    """What ``read_model_folder`` takes from an nnU-Net result folder."""

    folder: Path
    configuration: str
    plans: dict
    config: dict  # the configuration's plan, inherited settings filled in
    dataset: dict
    folds: list[str]
    checkpoints: list[Path]
    state_dicts: list[dict]
    trainer: str
    mirror_axes: list[int] | None


def _bad(folder: Path, problem: str, fix: str) -> InvalidInputError:
    return InvalidInputError(f"'{folder}' is not a usable nnU-Net v2 model folder: {problem}.", fix)


def _load_json(path: Path, folder: Path) -> dict:
    if not path.is_file():
        raise _bad(
            folder,
            f"{path.name} is missing",
            "Point at the folder nnU-Net trained into (it holds dataset.json, plans.json and fold_*).",
        )
    return read_json_object(path, lambda problem: _bad(folder, problem, "Restore the file from the model's source."))


def model_folders(path: Path) -> list[Path]:
    """The nnU-Net result folders at ``path``: itself, or its ``Trainer__Plans__configuration`` subfolders."""
    if (path / "plans.json").is_file():
        return [path]
    return sorted(p for p in path.glob("*__*__*") if (p / "plans.json").is_file())


def resolve_configuration(plans: dict, name: str, folder: Path) -> dict:
    """A configuration of the plans with what it inherits (nnU-Net's ``inherits_from``) filled in."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or name not in configurations:
        known = ", ".join(configurations or {}) if isinstance(configurations, dict) else "none"
        raise _bad(
            folder,
            f"plans.json has no configuration '{name}' (it has {known})",
            "Choose one of its configurations with --configuration.",
        )
    chain, current = [], name
    while current is not None:
        if current in chain or current not in configurations:
            raise _bad(
                folder,
                f"configuration '{name}' inherits from a missing or circular '{current}'",
                "Restore plans.json from the model's source.",
            )
        chain.append(current)
        current = configurations[current].get("inherits_from")
    merged: dict = {}
    for step in reversed(chain):
        merged.update(configurations[step])
    return merged


def _read_checkpoint(path: Path, folder: Path) -> dict:
    """An nnU-Net checkpoint with ``weights_only=True``: only tensors, plain containers and the numpy scalar
    types nnU-Net's logging holds; anything else is refused before it is unpickled."""
    scalar = np.float64(0).__reduce__()[0]  # the function numpy pickles its scalars with (a private module's)
    allowed = [scalar, np.dtype, *{type(np.dtype(t)) for t in ("f8", "f4", "i8", "i4", "f2")}]
    try:
        with torch.serialization.safe_globals(allowed):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError for anything not allowed; torch raises others for damage
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            unsafe = []
        unsafe = [u for u in unsafe if not u.startswith(("numpy", "torch"))]
        raise _bad(
            folder,
            f"{path.relative_to(folder)} could not be read safely"
            + (f": it needs code from {', '.join(sorted(unsafe)[:5])} to be unpickled" if unsafe else f" ({error})"),
            "MedKDSegment reads only weights; re-save the checkpoint with plain types (nnU-Net's own trainer "
            "does), or restore it from the model's source.",
        ) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise _bad(
            folder,
            f"{path.relative_to(folder)} holds no 'network_weights'",
            "Give a checkpoint written by nnU-Net's trainer.",
        )
    return checkpoint


def read_model_folder(
    path: str | Path, configuration: str | None = None, folds: list[str] | None = None, checkpoint: str | None = None
) -> NnUNetModel:
    """Read an nnU-Net v2 result folder (or a dataset folder holding one per configuration).

    Args:
        path: the folder nnU-Net trained into (``Trainer__Plans__configuration``), or its parent.
        configuration: which configuration, when ``path`` holds several (e.g. ``3d_fullres``).
        folds: which ``fold_*`` folders to ensemble (default: all that hold the checkpoint).
        checkpoint: ``checkpoint_final.pth`` (default) or ``checkpoint_best.pth``.
    """
    path = Path(path)
    candidates = model_folders(path)
    if configuration is not None:
        candidates = [c for c in candidates if c.name.split("__")[-1] == configuration] or (
            candidates if len(candidates) == 1 and candidates[0] == path else []
        )
    if not candidates:
        raise _bad(
            path,
            "it holds no plans.json" + (f" for configuration '{configuration}'" if configuration else ""),
            "Point at the folder nnU-Net trained into (it holds dataset.json, plans.json and fold_*), "
            "or at its dataset folder with --configuration.",
        )
    if len(candidates) > 1:
        raise _bad(
            path,
            f"it holds several models ({', '.join(c.name for c in candidates)})",
            "Choose one with --configuration (e.g. 3d_fullres), or point at its folder.",
        )
    folder = candidates[0]
    plans = _load_json(folder / "plans.json", folder)
    dataset = _load_json(folder / "dataset.json", folder)
    checkpoint_name = checkpoint or CHECKPOINTS[0]
    if checkpoint_name not in CHECKPOINTS:
        raise InvalidInputError(f"Unknown checkpoint '{checkpoint_name}'.", f"Use one of {', '.join(CHECKPOINTS)}.")
    available = sorted(p.name[5:] for p in folder.glob("fold_*") if (p / checkpoint_name).is_file())
    chosen = [str(f) for f in folds] if folds else available
    missing = [f for f in chosen if f not in available]
    if missing or not chosen:
        raise _bad(
            folder,
            f"fold {', '.join(missing) or '(any)'} has no {checkpoint_name}"
            + (f" (folds with one: {', '.join(available)})" if available else ""),
            "Choose folds that were trained (--folds), or finish training them.",
        )
    checkpoints = [folder / f"fold_{f}" / checkpoint_name for f in chosen]
    loaded = [_read_checkpoint(p, folder) for p in checkpoints]
    first = loaded[0]
    init_args = first.get("init_args") if isinstance(first.get("init_args"), dict) else {}
    name = init_args.get("configuration") or folder.name.split("__")[-1]
    if configuration is not None and name != configuration:
        raise _bad(
            folder,
            f"its checkpoints were trained for '{name}', not '{configuration}'",
            f"Use --configuration {name}, or point at the '{configuration}' folder.",
        )
    mirror = first.get("inference_allowed_mirroring_axes")
    return NnUNetModel(
        folder=folder,
        configuration=name,
        plans=plans,
        config=resolve_configuration(plans, name, folder),
        dataset=dataset,
        folds=chosen,
        checkpoints=checkpoints,
        state_dicts=[c["network_weights"] for c in loaded],
        trainer=str(first.get("trainer_name", "nnUNetTrainer")),
        mirror_axes=[int(a) for a in mirror] if mirror is not None else None,
    )


def labels_of(dataset: dict, folder: Path) -> tuple[dict[int, str], dict | None]:
    """``dataset.json``'s labels as {value: name} (background 0 included) and, for a region-based model, its
    regions: ``{"regions": [[values], ...], "order": [value per region]}`` (nnU-Net's ``regions_class_order``)."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise _bad(folder, "dataset.json has no labels", "Restore dataset.json from the model's source.")
    values, regions = {}, []
    for name, value in labels.items():
        if isinstance(value, list):  # a region: the union of these label values
            if not value or not all(isinstance(v, int) for v in value):
                raise _bad(folder, f"label '{name}' is not a list of label values", "Restore dataset.json.")
            regions.append((name, tuple(value)))
            values[max(value) if name != "background" else 0] = name
        elif isinstance(value, int) and not isinstance(value, bool):
            values[value] = name
        else:
            raise _bad(folder, f"label '{name}' has the value {value!r}", "Restore dataset.json.")
    if "ignore" in values.values():
        values = {v: n for v, n in values.items() if n != "ignore"}
    if not regions:
        return dict(sorted(values.items())), None
    order = dataset.get("regions_class_order")
    foreground = [r for r in regions if r[0] != "background"]
    if not isinstance(order, list) or len(order) != len(foreground):
        raise _bad(
            folder,
            "a region-based dataset.json needs regions_class_order, one value per region",
            "Restore dataset.json from the model's source.",
        )
    named = {0: "background", **{int(v): name for (name, _), v in zip(foreground, order, strict=True)}}
    return dict(sorted(named.items())), {"regions": [list(r[1]) for r in foreground], "order": [int(v) for v in order]}


def pipeline_settings(model: NnUNetModel, regions: dict | None) -> dict:
    """The bundle's ``pipeline`` section: everything ``segment_nnunet`` needs from the plans."""
    config = model.config
    folder = model.folder
    if config.get("previous_stage") or "cascade" in model.configuration:
        raise _bad(
            folder,
            f"'{model.configuration}' is a cascade stage, which needs the low-resolution stage's segmentation as input",
            "Import 3d_lowres or 3d_fullres instead.",
        )
    spacing, patch = config.get("spacing"), config.get("patch_size")
    if not (isinstance(patch, list) and len(patch) == 3 and isinstance(spacing, list) and len(spacing) == 3):
        raise _bad(
            folder,
            f"configuration '{model.configuration}' is not 3D (patch size {patch})",
            "Import a 3d configuration (3d_fullres or 3d_lowres); 2D nnU-Net models are not supported.",
        )
    schemes = config.get("normalization_schemes", [])
    unknown = [s for s in schemes if s not in NORMALIZATIONS]
    if unknown:
        raise _bad(
            folder, f"it normalises with {', '.join(unknown)}", f"Only {', '.join(NORMALIZATIONS)} are built in."
        )
    reader = model.plans.get("image_reader_writer", "SimpleITKIO")
    if reader not in READERS:
        raise _bad(
            folder, f"it reads images with {reader}", f"Only models read with {', '.join(READERS)} are supported."
        )
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if config.get(key) != "resample_data_or_seg_to_shape":
            raise _bad(
                folder,
                f"{key} is {config.get(key)!r}",
                "Only nnU-Net's default resampling (resample_data_or_seg_to_shape) is reproduced.",
            )
    properties = model.plans.get("foreground_intensity_properties_per_channel", {})
    return {
        "name": PIPELINE,
        "configuration": model.configuration,
        "spacing": [float(s) for s in spacing],
        "patch_size": [int(p) for p in patch],
        "transpose_forward": [int(a) for a in model.plans.get("transpose_forward", [0, 1, 2])],
        "transpose_backward": [int(a) for a in model.plans.get("transpose_backward", [0, 1, 2])],
        "normalization": schemes,
        "use_mask_for_norm": [bool(u) for u in config.get("use_mask_for_norm", [False] * len(schemes))],
        "intensity_properties": [properties.get(str(c), {}) for c in range(len(schemes))],
        "resampling_data": _resampling_kwargs(config.get("resampling_fn_data_kwargs", {})),
        "resampling_probabilities": _resampling_kwargs(config.get("resampling_fn_probabilities_kwargs", {})),
        "image_reader": reader,
        "mirror_axes": model.mirror_axes,
        "mirror": True,
        "tile_step_size": 0.5,
        "regions": regions,
    }


def _resampling_kwargs(kwargs: dict) -> dict:
    return {
        "order": int(kwargs.get("order", 3)),
        "order_z": int(kwargs.get("order_z", 0)),
        "force_separate_z": kwargs.get("force_separate_z"),
    }


def architecture_of(model: NnUNetModel) -> dict:
    arch = model.config.get("architecture") or {}
    kwargs = {
        "network_class_name": arch.get("network_class_name"),
        "arch_kwargs": arch.get("arch_kwargs"),
        "requires_import": list(arch.get("_kw_requires_import", [])),
        "input_channels": len(model.dataset.get("channel_names", model.dataset.get("modality", {"0": ""}))),
        "folds": len(model.folds),
    }
    problem = architecture_problem(kwargs)
    if problem:
        raise _bad(
            model.folder,
            f"its plans describe a network MedKDSegment does not build ({problem})",
            "Only nnU-Net's PlainConvUNet and ResidualEncoderUNet (3D) are supported.",
        )
    return {"name": "NnUNetEnsemble", "kwargs": kwargs}


# ---- the pipeline -----------------------------------------------------------------------------------------


@dataclass
class NnUNetResult:
    labels: np.ndarray  # on the input's array (z, y, x)
    logits: torch.Tensor  # float16 (C, ...) on the working grid, in the input's axis order
    regions: dict | None
    working_grid: sitk.Image
    seconds: dict[str, float]

    def probabilities_on(self, volume: Volume, target: sitk.Image) -> np.ndarray:
        """The ensemble's probabilities (C, z, y, x) resampled linearly onto ``target``; background beyond the
        crop box. ``volume`` is the one segmented."""
        probabilities = _probabilities(self.logits.float(), self.regions).numpy()
        return resample_probabilities(probabilities, self.working_grid, target)


def _separate_z(current: list[float], new: list[float], force: bool | None) -> int | None:
    """nnU-Net's ``determine_do_sep_z_and_axis``: the one low-resolution axis to resample apart, or None."""

    def lowres_axes(spacing):
        spacing = np.asarray(spacing, float)
        return np.where(max(spacing) / spacing == 1)[0]

    if force is not None:
        axes = lowres_axes(current) if force else None
    elif max(current) / min(current) > ANISOTROPY_THRESHOLD:
        axes = lowres_axes(current)
    elif max(new) / min(new) > ANISOTROPY_THRESHOLD:
        axes = lowres_axes(new)
    else:
        axes = None
    return int(axes[0]) if axes is not None and len(axes) == 1 else None


def resample_to_shape(
    data: np.ndarray,
    shape: tuple[int, ...],
    current: list[float],
    new: list[float],
    order: int,
    order_z: int,
    force_separate_z: bool | None,
) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape`` for images and logits ((C, ...), output in data's dtype)."""
    shape = tuple(int(s) for s in shape)
    if tuple(data.shape[1:]) == shape:
        return data
    axis = _separate_z(list(current), list(new), force_separate_z)
    out = np.zeros((data.shape[0], *shape), dtype=data.dtype)
    coordinates = None  # across slices: align_corners=False coordinates, as nnU-Net maps them (once for all channels)
    for c, channel in enumerate(data.astype(float, copy=False)):
        if axis is None:
            out[c] = resize(channel, shape, order)
            continue
        in_plane = tuple(s for i, s in enumerate(shape) if i != axis)
        slices = np.stack([resize(s, in_plane, order) for s in np.moveaxis(channel, axis, 0)], axis=axis)
        if slices.shape[axis] == shape[axis]:
            out[c] = slices
            continue
        if coordinates is None:
            grids = np.mgrid[tuple(slice(0, s) for s in shape)].astype(float)
            scales = np.divide(slices.shape, shape)
            coordinates = np.array([scale * (grid + 0.5) - 0.5 for scale, grid in zip(scales, grids, strict=True)])
        out[c] = ndimage.map_coordinates(slices, coordinates, order=order_z, mode="nearest")
    return out


def _crop_to_nonzero(data: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    """nnU-Net's ``crop_to_nonzero``: the bounding box of the non-zero voxels of any channel, holes filled (all
    if none), and that mask within it."""
    mask = ndimage.binary_fill_holes(np.any(data != 0, axis=0))
    if not mask.any():
        return tuple(slice(0, s) for s in mask.shape), mask
    box = tuple(slice(int(w.min()), int(w.max()) + 1) for w in np.nonzero(mask))
    return box, mask[box]


def normalize(channel: np.ndarray, scheme: str, use_mask: bool, mask: np.ndarray, properties: dict) -> np.ndarray:
    """One channel normalised as nnU-Net's scheme of that name does (float32, in place where it can)."""
    image = channel.astype(np.float32, copy=False)
    eps = 1e-8
    if scheme == "CTNormalization":
        try:
            low, high = properties["percentile_00_5"], properties["percentile_99_5"]
            mean, std = properties["mean"], properties["std"]
        except (KeyError, TypeError) as error:
            raise BundleError(
                "The nnU-Net teacher's plans lack the CT intensity properties.",
                "Re-import the model from its original folder.",
            ) from error
        np.clip(image, low, high, out=image)
        image -= mean
        image /= max(std, eps)
    elif scheme == "ZScoreNormalization":
        if use_mask:
            values = image[mask]
            mean, std = values.mean(), values.std()
            image[mask] = (image[mask] - mean) / max(std, eps)
        else:
            mean, std = image.mean(), image.std()
            image -= mean
            image /= max(std, eps)
    elif scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), eps, None)
    return image


@lru_cache(maxsize=2)
def gaussian_weights(patch: tuple[int, ...]) -> torch.Tensor:
    """nnU-Net's ``compute_gaussian(patch, 1/8, value_scaling_factor=10)`` in float16, zeros raised to the minimum."""
    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    weights = ndimage.gaussian_filter(impulse, [p / 8 for p in patch], 0, mode="constant", cval=0)
    weights /= np.max(weights) / 10
    weights = torch.from_numpy(weights).to(torch.float16)
    weights[weights == 0] = torch.min(weights[weights != 0])
    return weights


def window_starts(size: int, patch: int, step: float) -> list[int]:
    """nnU-Net's ``compute_steps_for_sliding_window`` along one axis."""
    count = int(np.ceil((size - patch) / (patch * step))) + 1
    if count == 1:
        return [0]
    stride = (size - patch) / (count - 1)
    return [int(np.round(stride * i)) for i in range(count)]


def _pad_to_patch(data: torch.Tensor, patch: list[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """acvl_utils' ``pad_nd_image``: zeros around, the content centred (the extra voxel above)."""
    pads, revert = [], []
    for size, want in zip(data.shape[1:], patch, strict=True):
        extra = max(want - size, 0)
        pads.append((extra // 2, extra - extra // 2))
        revert.append(slice(extra // 2, extra // 2 + size))
    flat = [v for pair in reversed(pads) for v in pair]
    return torch.nn.functional.pad(data, flat, "constant", 0), tuple(revert)


@torch.inference_mode()
def sliding_window_logits(
    network: nn.Module,
    data: np.ndarray,
    patch: list[int],
    step: float,
    mirror_axes: list[int] | None,
    device: torch.device,
    cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """nnU-Net's ``predict_sliding_window_return_logits`` for one network: float16 logits (C, ...)."""
    padded, revert = _pad_to_patch(torch.from_numpy(data), patch)
    starts = [window_starts(s, p, step) for s, p in zip(padded.shape[1:], patch, strict=True)]
    gaussian = gaussian_weights(tuple(patch))
    logits = counts = None
    combinations = (
        [c for i in range(len(mirror_axes or [])) for c in itertools.combinations([a + 2 for a in mirror_axes], i + 1)]
        if mirror_axes
        else []
    )
    autocast = torch.autocast("cuda") if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with autocast:
        for corner in itertools.product(*starts):
            if cancel is not None and cancel():
                raise CancelledError("Cancelled.")
            box = tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))
            x = padded[(slice(None), *box)][None].contiguous().to(device)
            prediction = network(x)
            for axes in combinations:
                prediction += torch.flip(network(torch.flip(x, axes)), axes)
            if combinations:
                prediction /= len(combinations) + 1
            prediction = prediction[0].to("cpu")
            if logits is None:
                logits = torch.zeros((prediction.shape[0], *padded.shape[1:]), dtype=torch.half)
                counts = torch.zeros(padded.shape[1:], dtype=torch.half)
            prediction *= gaussian
            logits[(slice(None), *box)] += prediction
            counts[box] += gaussian
    torch.div(logits, counts, out=logits)
    return logits[(slice(None), *revert)]


def _orientation_for(reader: str) -> str | None:
    """The orientation nnU-Net's reader puts the image in (None: as stored)."""
    return "RAS" if reader in ("NibabelIOWithReorient", "SimpleITKWithReorientIO") else None


def segment_nnunet(
    volume: Volume,
    network: NnUNetEnsemble,
    device: torch.device | str = "cpu",
    cancel: Callable[[], bool] | None = None,
    folds: int | None = None,
    **settings,
) -> NnUNetResult:
    """nnU-Net's inference (see the module docstring) on ``volume`` with the bundle's ``settings``
    (``mirror``: nnU-Net's test-time mirroring); ``folds`` limits the ensemble to its first folds."""
    device = torch.device(device)
    started = time.perf_counter()
    image = volume.to_sitk()
    orientation = _orientation_for(settings["image_reader"])
    original_orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    if orientation is not None:
        image = sitk.DICOMOrient(image, orientation)
    forward, backward = settings["transpose_forward"], settings["transpose_backward"]
    data = sitk.GetArrayFromImage(image).astype(np.float32)[None].transpose([0, *[a + 1 for a in forward]])
    spacing_zyx = list(image.GetSpacing())[::-1]
    original_spacing = [spacing_zyx[a] for a in forward]
    full_shape = data.shape[1:]
    box, mask = _crop_to_nonzero(data)
    cropped_shape = tuple(b.stop - b.start for b in box)
    data = np.ascontiguousarray(data[(slice(None), *box)])
    for c in range(data.shape[0]):
        data[c] = normalize(
            data[c],
            settings["normalization"][c],
            settings["use_mask_for_norm"][c],
            mask,
            settings["intensity_properties"][c],
        )
    target = settings["spacing"]
    shape = new_shape(cropped_shape, original_spacing, target)
    data = resample_to_shape(data, shape, original_spacing, target, **settings["resampling_data"]).astype(np.float32)
    seconds = {"preprocess": time.perf_counter() - started}
    step = time.perf_counter()
    logits = None
    members = list(network.folds)[: folds or None]
    for fold in members:
        fold.to(device).eval()
        part = sliding_window_logits(
            fold,
            data,
            settings["patch_size"],
            settings["tile_step_size"],
            settings["mirror_axes"] if settings["mirror"] else None,
            device,
            cancel,
        )
        logits = part if logits is None else logits + part
    if len(members) > 1:
        logits /= len(members)
    seconds["inference"] = time.perf_counter() - step
    step = time.perf_counter()
    back = resample_to_shape(
        logits.numpy(), cropped_shape, target, original_spacing, **settings["resampling_probabilities"]
    )
    labels_cropped = _to_labels(back, settings["regions"])
    labels = np.zeros(full_shape, dtype=np.uint8)
    labels[box] = labels_cropped
    labels = labels.transpose(backward)
    logits = logits.permute(0, *[a + 1 for a in backward])  # the image's axis order
    box_xyz = [box[a] for a in backward][::-1]
    grid = zoomed_grid(
        image.GetOrigin(),
        image.GetSpacing(),
        image.GetDirection(),
        [b.start for b in box_xyz],
        [b.stop - b.start for b in box_xyz],
        logits.shape[1:][::-1],
    )
    if orientation is not None:
        labelled = sitk.GetImageFromArray(np.ascontiguousarray(labels))
        labelled.CopyInformation(image)
        labels = sitk.GetArrayFromImage(sitk.DICOMOrient(labelled, original_orientation))
    seconds["postprocess"] = time.perf_counter() - step
    seconds["total"] = time.perf_counter() - started
    return NnUNetResult(labels=labels, logits=logits, regions=settings["regions"], working_grid=grid, seconds=seconds)


def _to_labels(logits: np.ndarray, regions: dict | None) -> np.ndarray:
    """nnU-Net's ``convert_logits_to_segmentation``: arg-max, or each region's sigmoid > 0.5 in region order."""
    if regions is None:
        return logits.argmax(0).astype(np.uint8)
    probabilities = torch.sigmoid(torch.from_numpy(logits).float()).numpy()
    labels = np.zeros(logits.shape[1:], dtype=np.uint8)
    for channel, value in enumerate(regions["order"]):
        labels[probabilities[channel] > 0.5] = value
    return labels


def _probabilities(logits: torch.Tensor, regions: dict | None) -> torch.Tensor:
    """Class probabilities for distillation: softmax, or for a region model the per-label probabilities its
    region order implies (background 1 minus the largest region probability, renormalised)."""
    if regions is None:
        return torch.softmax(logits, 0)
    sigmoid = torch.sigmoid(logits)
    foreground = torch.zeros_like(sigmoid)
    remaining = torch.ones_like(sigmoid[0])
    for channel in reversed(range(sigmoid.shape[0])):  # later regions overwrite earlier ones in nnU-Net
        foreground[channel] = sigmoid[channel] * remaining
        remaining = remaining * (1 - sigmoid[channel])
    return torch.cat([remaining[None], foreground])
