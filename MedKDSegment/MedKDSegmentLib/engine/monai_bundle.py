"""MONAI Model Zoo bundles as teachers: the network and the pre- and post-processing come from the bundle's own
``configs/inference.json`` through MONAI's bundle parser (``monai.bundle.ConfigParser``), never from a copy.

A bundle's config is code: ``_target_`` names classes to build and ``$`` expressions are evaluated. Before
anything is parsed, every ``_target_`` must be a MONAI or torch component and no expression may reach for the
interpreter's escape hatches (``__``, ``eval``, ``exec``, ``open``, ``os.system``, ``subprocess``, ...); custom
``scripts/`` are refused. The imported copy of the configs is sha256-checked each time it is parsed.

``segment_monai_bundle`` runs what ``python -m monai.bundle run`` runs for one image (the
``SupervisedEvaluator`` iteration): ``preprocessing`` on ``{"image": file}``, MONAI's collate, ``inferer``
with the network, decollate, ``postprocessing`` without its ``SaveImage(d)`` steps. The probabilities for
distillation are the ``pred`` just before the first ``AsDiscreted`` (after ``Activationsd`` and ``Invertd``,
so on the input's grid).
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from .errors import BundleError, InvalidInputError
from .profiles import resample_probabilities
from .report import read_json_object
from .volume import Volume

PIPELINE = "monai-bundle"
CONFIG = "inference.json"
IDS = ("network_def", "preprocessing", "inferer", "postprocessing")
# Words no expression of a segmentation bundle needs, and that would let a config do anything.
FORBIDDEN = re.compile(
    r"__|\b(eval|exec|compile|open|system|popen|subprocess|shutil|remove|unlink|rmtree|"
    r"getattr|setattr|globals|locals|builtins|breakpoint|input|pickle|socket|urllib|requests)\b"
)
STRING = re.compile(r"'[^']*'|\"[^\"]*\"")  # literals are data, not code: '/eval' is a folder name
REFERENCE = re.compile(r"@([\w#:]+)")
ALLOWED_IMPORTS = re.compile(r"^\$import (glob|os|torch|numpy|monai)( as \w+)?$")


def not_usable(folder: Path, problem: str, fix: str) -> InvalidInputError:
    return InvalidInputError(f"'{folder}' is not a usable MONAI bundle: {problem}.", fix)


def _walk(value, path: str = ""):
    """Every (location, item) of a config, depth first."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")


def reachable(config: dict, ids: tuple[str, ...] = IDS) -> dict:
    """The top-level items MedKDSegment parses (``ids``) and every item they reference (``@id``), transitively:
    only these are ever evaluated (a bundle's ``run``, ``initialize`` or training items never are)."""
    found, todo = {}, [i for i in ids if i in config]
    while todo:
        key = todo.pop()
        if key in found or key not in config:
            continue
        found[key] = config[key]
        for _, item in _walk(config[key]):
            if isinstance(item, str):
                todo.extend(m.split("#")[0].split("::")[0] for m in REFERENCE.findall(item))
    return found


def config_problems(config: dict) -> list[str]:
    """What in an inference config MedKDSegment will not run (empty when what it parses is only MONAI and torch,
    and its imports are plain ones)."""
    from monai.bundle.config_item import ComponentLocator

    locator = ComponentLocator()
    problems = []
    for where, item in _walk(config):
        if isinstance(item, str) and item.strip().startswith(("$import", "$from")):
            if not ALLOWED_IMPORTS.match(item.strip()):
                problems.append(f"{where} imports something other than glob, os, torch, numpy or monai: {item!r}")
    for where, item in _walk(reachable(config)):
        if where.endswith("_target_") and isinstance(item, str):
            name = item.lstrip("$@")
            if "." in name:
                if not name.startswith(("monai.", "torch.")):
                    problems.append(f"{where} names '{item}', which is neither MONAI nor torch")
            elif locator.get_component_module_name(name) is None:
                problems.append(f"{where} names '{item}', which MONAI does not know")
        elif isinstance(item, str) and item.startswith("$") and FORBIDDEN.search(STRING.sub("''", item)):
            problems.append(f"{where} evaluates {item!r}")
    return problems


def read_config(folder: Path, bundle: Path | None = None) -> dict:
    """``folder/inference.json`` checked by ``config_problems`` (``bundle`` names the source in errors)."""
    bundle = bundle or folder
    path = folder / CONFIG
    if not path.is_file():
        raise not_usable(bundle, f"configs/{CONFIG} is missing", "Give a bundle in the MONAI Model Zoo layout.")
    config = read_json_object(
        path, lambda problem: not_usable(bundle, f"configs/{problem}", "Restore it from the bundle's source.")
    )
    missing = [i for i in IDS if i not in config]
    if missing:
        raise not_usable(
            bundle,
            f"configs/{CONFIG} defines no {', '.join(missing)}",
            "MedKDSegment runs a bundle's network_def, preprocessing, inferer and postprocessing.",
        )
    problems = config_problems(config)
    if problems:
        raise not_usable(
            bundle,
            "its config would run code MedKDSegment does not allow: " + "; ".join(problems[:3]),
            "Use a bundle built from MONAI components only (custom scripts/ are not run).",
        )
    return config


def _parser(config: dict, root: Path, device: torch.device):
    from monai.bundle import ConfigParser

    parser = ConfigParser(config)
    parser["bundle_root"] = str(root)
    parser["device"] = f"$torch.device('{device}')"
    return parser


def build_network(folder: Path) -> nn.Module:
    """The bundle's ``network_def``, built by MONAI's parser from the (checked) config in ``folder``."""
    parser = _parser(read_config(folder), folder, torch.device("cpu"))
    network = parser.get_parsed_content("network_def")
    if not isinstance(network, nn.Module):
        raise BundleError(f"network_def of the bundle in '{folder}' is not a network.", "Re-import the bundle.")
    return network


class MonaiBundleNetwork(nn.Module):
    """A bundle's network with the folder of the config it came from (the pipeline parses the rest there)."""

    def __init__(self, network: nn.Module, config_folder: Path) -> None:
        super().__init__()
        self.network = network
        self.config_folder = config_folder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


@dataclass
class MonaiBundleResult:
    labels: np.ndarray  # on the input's array (z, y, x)
    probabilities: np.ndarray | None  # (C, z, y, x) on the input's grid, when the config has AsDiscreted
    seconds: dict[str, float]

    def probabilities_on(self, volume: Volume, target: sitk.Image) -> np.ndarray:
        """The bundle's class probabilities (C, z, y, x) resampled linearly onto ``target``."""
        if self.probabilities is None:
            raise InvalidInputError(
                "This MONAI bundle's postprocessing gives no probabilities (no AsDiscreted).",
                "Distil from it with its labels only, or add Activationsd and AsDiscreted.",
            )
        return resample_probabilities(self.probabilities, volume.to_sitk(), target)


def _split_postprocessing(postprocessing):
    """(steps up to the first AsDiscreted, the rest), both without SaveImage(d)."""
    from monai.transforms import AsDiscreted, Compose, SaveImage, SaveImaged

    steps = [
        t for t in getattr(postprocessing, "transforms", [postprocessing]) if not isinstance(t, (SaveImage, SaveImaged))
    ]
    cut = next((i for i, t in enumerate(steps) if isinstance(t, AsDiscreted)), None)
    if cut is None:
        return None, Compose(steps)
    return Compose(steps[:cut]), Compose(steps[cut:])


def segment_monai_bundle(
    volume: Volume, network: MonaiBundleNetwork, device: torch.device | str = "cpu"
) -> MonaiBundleResult:
    """The bundle's inference on ``volume`` (see the module docstring)."""
    from monai.data import decollate_batch, list_data_collate

    device = torch.device(device)
    started = time.perf_counter()
    folder = network.config_folder
    parser = _parser(read_config(folder), folder, device)
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    to_probabilities, to_labels = _split_postprocessing(parser.get_parsed_content("postprocessing"))
    with tempfile.TemporaryDirectory(prefix="medkd-bundle-") as scratch:
        path = Path(scratch) / "image.nii.gz"
        sitk.WriteImage(volume.to_sitk(), str(path))
        batch = list_data_collate([preprocessing({"image": str(path)})])
        seconds = {"preprocess": time.perf_counter() - started}
        step = time.perf_counter()
        model = network.network.to(device).eval()
        with torch.no_grad():
            batch["pred"] = inferer(batch["image"].to(device), model)
        seconds["inference"] = time.perf_counter() - step
        step = time.perf_counter()
        item = decollate_batch(batch)[0]
        probabilities = None
        if to_probabilities is not None:
            item = to_probabilities(item)
            probabilities = np.asarray(item["pred"].detach().cpu(), dtype=np.float32).transpose(0, 3, 2, 1)
        item = to_labels(item)
    labels = np.asarray(item["pred"].detach().cpu())[0].transpose(2, 1, 0)
    if labels.shape != volume.shape:
        raise BundleError(
            f"The bundle's output has the shape {labels.shape[::-1]}, not the input's {volume.shape[::-1]}.",
            "Its postprocessing must invert its preprocessing (Invertd).",
        )
    seconds["postprocess"] = time.perf_counter() - step
    seconds["total"] = time.perf_counter() - started
    return MonaiBundleResult(labels=np.rint(labels).astype(np.uint8), probabilities=probabilities, seconds=seconds)
