"""Tiny profiles, networks and bundles so engine tests run in seconds on a CPU."""

from __future__ import annotations

import torch

from MedKDSegmentLib.engine.bundle import save_bundle
from MedKDSegmentLib.engine.labels import ABDOMEN_STRUCTURES
from MedKDSegmentLib.engine.networks import build_network
from MedKDSegmentLib.engine.profiles import Profile

NUM_CLASSES = len(ABDOMEN_STRUCTURES) + 1
# Coarse model grids keep test volumes tiny; the code paths are those of real models.
TINY_CT = Profile("CT", (8.0, 8.0, 8.0), clip=(-200.0, 400.0))
TINY_MR = Profile("MR", (8.0, 8.0, 8.0), percentiles=(0.5, 99.5))
TINY_TEACHER = {
    "name": "UNet",
    "kwargs": {"spatial_dims": 3, "in_channels": 1, "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
}
TINY_STUDENT = {"name": "FastStudent", "kwargs": {"in_channels": 1, "features": [4, 8, 8]}}


def make_bundle(folder, architecture=TINY_STUDENT, profile=TINY_CT, role="student", seed=0):
    torch.manual_seed(seed)
    network = build_network(architecture, NUM_CLASSES)
    return save_bundle(
        folder,
        network,
        name=folder.name,
        role=role,
        architecture=architecture,
        profile=profile,
        structures=ABDOMEN_STRUCTURES,
        method={"name": "untrained"},
        description="test bundle",
    )
