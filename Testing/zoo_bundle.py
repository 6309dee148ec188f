"""A MONAI Model Zoo style bundle for tests and benchmarks: the Model Zoo's CT ``inference.json`` (as
spleen_ct_segmentation's) on a tiny UNet trained a few steps on a phantom, written with ``monai.bundle.init_bundle``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.bundle import init_bundle
from monai.networks.nets import UNet

from MedKDSegmentLib.engine.phantom import generate_phantom

LABELS = {"0": "background", "1": "liver", "2": "spleen"}
NETWORK = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [8, 16, 32],
           "strides": [2, 2], "num_res_units": 1, "norm": "batch"}
# The Model Zoo's inference.json for a CT segmentation bundle (as spleen_ct_segmentation's), on a tiny UNet.
INFERENCE = {
    "imports": ["$import glob", "$import os"],
    "bundle_root": ".",
    "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "/workspace/data",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "network_def": NETWORK,
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [3.0, 3.0, 3.0], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -200, "a_max": 400, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"},
    ]},
    "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                   "num_workers": 0},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 2, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "resample": False,
         "squeeze_end_dims": True, "output_postfix": "seg", "separate_folder": False},
    ]},
    "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                  "load_dict": {"model": "@network"}}],
    "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                  "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                  "val_handlers": "@handlers"},
    "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', True)"],  # never parsed by MedKDSegment
    "run": ["$@evaluator.run()"],
}
METADATA = {
    "name": "Phantom CT organs", "version": "0.1.0", "monai_version": "1.6.1", "task": "liver and spleen on CT",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1}},
        "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3, "channel_def": LABELS}},
    },
}


def trained_unet() -> UNet:
    """The bundle's network after a few steps on a phantom, so its output is not random."""
    torch.manual_seed(0)
    network = UNet(**{k: v for k, v in NETWORK.items() if k != "_target_"})
    image, labels = generate_phantom("CT", 3, size=(32, 32, 32), spacing=(3.0, 3.0, 3.0))
    x = torch.from_numpy(np.clip((image.array.astype(np.float32) + 200) / 600, 0, 1))[None, None]
    y = torch.from_numpy(np.where(np.isin(labels.array, (1, 2)), labels.array, 0).astype(np.int64))[None]
    optimizer = torch.optim.Adam(network.parameters(), 1e-2)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(network(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return network.eval()


def write_zoo_bundle(folder: Path) -> Path:
    """The bundle at ``folder`` (which must not exist), as MONAI's own bundle tools write it."""
    init_bundle(folder, network=trained_unet(), metadata_str=METADATA, inference_str=INFERENCE)
    return folder
