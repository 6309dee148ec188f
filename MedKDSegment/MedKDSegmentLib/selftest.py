"""Tiny untrained models and a small phantom for the module's self-test (in Slicer and under pytest).

They check plumbing, not accuracy, in seconds on a CPU, without the bundled models.
Engine side: torch is imported when a function is called, never at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

from .engine.volume import Volume

# A coarse model grid keeps everything tiny; the code paths are those of the real models.
SPACING = (8.0, 8.0, 8.0)
TEACHER = {"name": "UNet", "kwargs": {"spatial_dims": 3, "in_channels": 1, "channels": [4, 8, 16],
                                      "strides": [2, 2], "num_res_units": 1}}
STUDENT = {"name": "FastStudent", "kwargs": {"in_channels": 1, "features": [4, 8, 8]}}
SEED = 990_777  # not a training seed


def make_test_models(folder: str | os.PathLike, modality: str = "CT", seed: int = 0) -> dict[str, str]:
    """Write an untrained teacher and a student that names it as its teacher; returns role -> model name."""
    import torch

    from .engine.bundle import load_bundle, save_bundle
    from .engine.labels import ABDOMEN_STRUCTURES
    from .engine.networks import build_network
    from .engine.profiles import Profile

    folder = Path(folder)
    key = modality.lower()
    profile = Profile(modality, SPACING, clip=(-200.0, 400.0)) if modality == "CT" else \
        Profile(modality, SPACING, percentiles=(0.5, 99.5))
    names = {role: f"selftest-{key}-{role}" for role in ("teacher", "student")}
    bundles = {}
    for role, architecture in (("teacher", TEACHER), ("student", STUDENT)):
        path = folder / names[role]
        if path.exists():  # bundles are never overwritten; reuse the one made before
            bundles[role] = load_bundle(path)
            continue
        torch.manual_seed(seed)
        network = build_network(architecture, len(ABDOMEN_STRUCTURES) + 1)
        bundles[role] = save_bundle(
            path, network, name=names[role], role=role, architecture=architecture, profile=profile,
            structures=ABDOMEN_STRUCTURES, method={"name": "untrained (self-test)"},
            teacher=bundles.get("teacher") if role == "student" else None, description="self-test model",
        )
    return names


def test_volume(modality: str = "CT", size: tuple[int, int, int] = (56, 48, 24),
                spacing: tuple[float, float, float] = (6.0, 6.0, 6.0)) -> Volume:
    """A small abdominal phantom (CT in HU or MR)."""
    from .engine.phantom import generate_phantom

    image, _ = generate_phantom(modality, SEED, size=size, spacing=spacing)
    return image
