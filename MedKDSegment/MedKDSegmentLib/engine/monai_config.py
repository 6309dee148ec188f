"""A bundle's ``configs/inference.json``: the bundle run by MONAI's own bundle runner, with MONAI's transforms.

    PYTHONPATH=MedKDSegment python -m monai.bundle run --config_file BUNDLE/configs/inference.json \\
        --bundle_root BUNDLE --dataset_dir DIR --output_dir OUT [--modality MR]

segments every NIfTI volume in DIR as ``medkd segment`` does, and names the ids MONAI Label and MONAI Deploy
read (``network_def``, ``preprocessing``, ``inferer``, ``postprocessing``): the model grid of MONAI's
``Spacing`` (``profiles.model_grid`` lays its grid out the same way), the profile's intensities, padding to a
multiple of 8 with the image's minimum, one pass over the whole image, and the class scores interpolated
once, straight onto the input's grid. Where the scores of two classes tie to float rounding the labels can
differ: MONAI interpolates in float32 (``grid_sample``), ``argmax_resample`` in double as ITK does.

Only the network class comes from MedKDSegment (a MONAI ``UNet`` needs nothing from it). Published teachers,
which run their own pipelines, and imported TorchScript or MONAI bundles are not described here.
"""

from __future__ import annotations

import json
from pathlib import Path

from .profiles import Profile

CONFIG = Path("configs") / "inference.json"
LOGGING = Path("configs") / "logging.conf"  # MONAI's runner looks for it beside the config
# Python's logging configuration: MONAI's messages at INFO to the console.
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=console

[formatters]
keys=plain

[logger_root]
level=INFO
handlers=console

[handler_console]
class=StreamHandler
level=INFO
formatter=plain
args=(sys.stdout,)

[formatter_plain]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""
# Where each network a config can build lives, importable by MONAI's config parser.
NETWORK_CLASSES = {"UNet": "monai.networks.nets.UNet", "FastStudent": "MedKDSegmentLib.engine.networks.FastStudent"}
MODALITY_SPECIFIC = "MedKDSegmentLib.engine.modality_norm.make_modality_specific"


def inference_config(metadata: dict) -> dict | None:
    """The MONAI bundle config that segments as ``medkd segment`` does with the bundle of ``metadata``, or None
    for a bundle MONAI's transforms cannot run (a published teacher's own pipeline, an imported network) or that
    segments no single scan (a KD-Net teacher, which takes privileged scans too)."""
    info = metadata["medkdsegment"]
    architecture = info["architecture"]
    if info.get("pipeline") or info.get("privileged") or architecture["name"] not in NETWORK_CLASSES:
        return None
    channels = len(metadata["network_data_format"]["outputs"]["pred"]["channel_def"])
    network = {"_target_": NETWORK_CLASSES[architecture["name"]], **architecture.get("kwargs", {}),
               "out_channels": channels}
    sections = info.get("modalities") or {}
    profiles = {name: Profile.from_dict(entry["preprocessing"]) for name, entry in sections.items()}
    profiles = profiles or {info["preprocessing"]["modality"]: Profile.from_dict(info["preprocessing"])}
    modality = Profile.from_dict(info["preprocessing"]).modality
    initialize = ["$@network_def.load_state_dict(torch.load(@weights, map_location='cpu', weights_only=True))"]
    imports = ["$import glob", "$import os", "$import numpy", "$import torch"]
    if info.get("modalities"):  # per-modality normalisation layers, chosen by --modality
        network = {"_target_": MODALITY_SPECIFIC, "network": network, "modalities": list(profiles)}
        imports.append("$from MedKDSegmentLib.engine.modality_norm import use_modality")
        initialize.append("$use_modality(@network_def, @modality)")
    stride = int(info.get("output_stride", 1))
    return {
        "imports": imports,
        "bundle_root": ".",
        "dataset_dir": "input",
        "output_dir": "output",
        "weights": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "modality": modality,
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "datalist": "$[{'image': f} for f in sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))]",
        "network_def": network,
        "network": "$@network_def.to(@device)",
        "intensity": {name: _intensity(profile) for name, profile in profiles.items()},
        "spacing": {name: list(profile.spacing[::-1]) for name, profile in profiles.items()},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "CopyItemsd", "keys": "image", "names": "original"},  # the grid the labels go back to
            # Axes in the order the networks learnt them: MedKDSegment's arrays are (z, y, x) of an LPS volume.
            {"_target_": "Orientationd", "keys": "image", "axcodes": "SPL"},
            "$@intensity[@modality]",
            {"_target_": "Spacingd", "keys": "image", "pixdim": "$@spacing[@modality]", "mode": "bilinear",
             "padding_mode": "border"},
            {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
            # Pad at the far end to a multiple of 8 (at least 8) with the image's minimum, so every stride-2
            # stage halves exactly; the first voxel, and so the affine, stay where they are.
            {"_target_": "Lambdad", "keys": "image", "func": "$lambda x: torch.nn.functional.pad(x, [p for s in "
             "reversed(x.shape[1:]) for p in (0, -(-max(s, 8) // 8) * 8 - s)], value=float(x.min()))"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            *([] if stride == 1 else [_coarse_affine(stride)]),
            {"_target_": "ResampleToMatchd", "keys": "pred", "key_dst": "original", "mode": "bilinear",
             "padding_mode": "border", "dtype": "$torch.float32"},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False, "print_log": False},
        ]},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing"},
        "initialize": initialize,
        "run": ["$@evaluator.run()"],
    }


def write_inference_config(folder: Path, metadata: dict) -> bool:
    """Write ``configs/inference.json`` and ``configs/logging.conf`` into the bundle ``folder`` (being written)
    when MONAI's transforms can run it; whether they could."""
    config = inference_config(metadata)
    if config is None:
        return False
    (folder / CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / LOGGING).write_text(LOGGING_CONF, encoding="utf-8")
    return True


def _intensity(profile: Profile) -> dict:
    """``profiles.intensity_window`` as MONAI transforms: a CT window scaled to [-1, 1], or MR clipped at its
    percentiles and z-scored over the body (voxels above a tenth of the clipped range)."""
    if profile.clip is not None:
        low, high = profile.clip
        transforms = [{"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": low, "a_max": high,
                       "b_min": -1.0, "b_max": 1.0, "clip": True}]
    else:
        low, high = profile.percentiles
        transforms = [
            {"_target_": "ScaleIntensityRangePercentilesd", "keys": "image", "lower": low, "upper": high,
             "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "Lambdad", "keys": "image", "func": "$lambda x: (lambda body: (x - body.mean()) / "
             "body.std(unbiased=False).clamp_min(1e-6))(x[x > 0.1] if (x > 0.1).sum() > 100 else x)"},
        ]
    return {"_target_": "Compose", "transforms": transforms}


def _coarse_affine(stride: int) -> dict:
    """The scores of a network with an output stride lie on a grid ``stride`` times coarser whose voxels cover
    ``stride`` input voxels each (their outer corners in place): index j sits at input index stride*j + (stride-1)/2.
    (``matmul``, as MONAI's parser would read ``@`` as a reference.)"""
    shift = (stride - 1) / 2
    scale = [[stride, 0, 0, shift], [0, stride, 0, shift], [0, 0, stride, shift], [0, 0, 0, 1]]
    return {"_target_": "Lambdad", "keys": "pred",
            "func": f"$lambda x: setattr(x, 'affine', torch.matmul(x.affine, torch.tensor({scale}, "
                    "dtype=torch.float64))) or x"}
