"""A tiny stand-in of a published teacher: HD-BET's network at 2 base filters, 2 folds, packed into a
wheel-like zip whose sha256 (and each weight file's) is pinned in a test registry entry. The install,
verification and distillation code paths are the real ones."""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import replace
from pathlib import Path

import torch

from MedKDSegmentLib.engine import published
from MedKDSegmentLib.engine.hdbet import HDBETNet
from MedKDSegmentLib.engine.profiles import Profile

MEMBERS = ("pkg/models/0.model", "pkg/models/1.model")
NAME = "tiny-bet"


def fold_state(seed: int) -> bytes:
    """One fold's state dict as ``torch.save`` writes it."""
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.save(HDBETNet(base_filters=2).state_dict(), buffer)
    return buffer.getvalue()


def write_package(path: Path, members: dict[str, bytes]) -> str:
    """A zip like a wheel (its code must never run); returns its sha256."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("pkg/__init__.py", "raise SystemExit('package code must never run')\n")
        for name, data in members.items():
            archive.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def register_teacher(monkeypatch, package: Path, members: dict[str, bytes], sha256: str):
    """A registry entry for ``package`` (HD-BET's facts, tiny architecture), for this test only."""
    teacher = replace(
        published.HD_BET,
        name=NAME,
        filename=package.name,
        sha256=sha256,
        weights=tuple((name, hashlib.sha256(data).hexdigest(), f"folds.{index}")
                      for index, (name, data) in enumerate(members.items())),
        architecture={"name": "HDBETEnsemble", "kwargs": {"folds": len(members), "base_filters": 2}},
        student_profile=Profile("MR", (6.0, 6.0, 6.0), percentiles=(0.5, 99.5)),
    )
    monkeypatch.setitem(published.PUBLISHED_TEACHERS, teacher.name, teacher)
    return teacher


def tiny_teacher_package(tmp_path: Path, monkeypatch):
    """(registry entry, package file) of a valid tiny teacher."""
    members = {name: fold_state(seed) for seed, name in enumerate(MEMBERS)}
    package = tmp_path / "tiny_bet-1.0-py3-none-any.whl"
    return register_teacher(monkeypatch, package, members, write_package(package, members)), package
