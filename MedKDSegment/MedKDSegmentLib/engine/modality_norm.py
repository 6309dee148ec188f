"""Modality-specific normalisation (Dou et al., IEEE TMI 2020): one network for CT and MR whose convolutions are
shared and whose normalisation layers are separate per modality. A network layer, used by the bundle that
rebuilds such a network, by inference that picks a modality's layers, and by the training recipe (``unpaired``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .errors import InvalidInputError
from .volume import normalize_modality

# Normalisation layers made modality-specific (BatchNorm and InstanceNorm in the project's
# networks; GroupNorm and LayerNorm too, so MONAI networks built with them work as well).
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


class ModalityNorm(nn.Module):
    """One copy of a normalisation layer per modality; ``forward`` uses the active one.

    The copies start as deep copies of the original layer (same affine parameters and running
    statistics) and then learn apart. ``active`` is the index into ``modalities``; it is set for
    the whole network at once by ``use_modality``. State-dict keys are ``<layer>.norms.<index>.*``.
    """

    def __init__(self, norm: nn.Module, modalities: Sequence[str]) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.norms = nn.ModuleList(copy.deepcopy(norm) for _ in self.modalities)
        self.active = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norms[self.active](x)

    def extra_repr(self) -> str:
        return f"modalities={self.modalities}, active={self.modalities[self.active]!r}"


def modality_norms(network: nn.Module) -> list[ModalityNorm]:
    """The network's ``ModalityNorm`` layers (none for an ordinary network)."""
    return [m for m in network.modules() if isinstance(m, ModalityNorm)]


def make_modality_specific(network: nn.Module, modalities: Sequence[str] = ("CT", "MR")) -> nn.Module:
    """Replace every normalisation layer of ``network`` in place by a ``ModalityNorm``; returns it.

    Convolutions (and every other parameter) are untouched, so they stay the same tensors and
    are shared by all modalities; the norm index of a modality is its position in ``modalities``.
    Works on any ``nn.Module`` (MONAI ``UNet``, ``FastStudent``) since layers are found by type.
    """
    names = tuple(normalize_modality(m) for m in modalities)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"modalities must be distinct and non-empty, got {modalities!r}")
    if modality_norms(network):
        raise ValueError("the network is already modality-specific")
    # Collected first: replacing while iterating modules() would visit the new layers.
    targets = [
        (parent, name, child)
        for parent in network.modules()
        for name, child in parent.named_children()
        if isinstance(child, NORM_TYPES)
    ]
    if not targets:
        raise ValueError("the network has no normalisation layers to make modality-specific")
    for parent, name, child in targets:
        setattr(parent, name, ModalityNorm(child, names))
    return network


def network_modalities(network: nn.Module) -> tuple[str, ...]:
    """The modalities of a modality-specific network in norm-index order; () for an ordinary one."""
    layers = modality_norms(network)
    return layers[0].modalities if layers else ()


def current_modality(network: nn.Module) -> str | None:
    """The modality whose normalisation layers ``network`` uses now (None if not modality-specific)."""
    layers = modality_norms(network)
    return layers[0].modalities[layers[0].active] if layers else None


class _Selection:
    """Returned by ``use_modality``: the choice is already made; ``with`` restores the previous one on exit."""

    def __init__(self, layers: list[ModalityNorm], previous: int) -> None:
        self._layers, self._previous = layers, previous

    def __enter__(self) -> _Selection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for layer in self._layers:
            layer.active = self._previous


def use_modality(network: nn.Module, modality: str) -> _Selection:
    """Make ``network`` use ``modality``'s normalisation layers, now.

    Usable as a plain setter (``use_modality(net, "MR")``) or as a context manager
    (``with use_modality(net, "MR"): ...``) that restores the previous choice afterwards.
    A network shared between jobs (``jobs.NetworkCache``) must be set on every call.
    """
    layers = modality_norms(network)
    if not layers:
        raise ValueError("the network has no modality-specific normalisation layers (see make_modality_specific)")
    name = normalize_modality(modality)
    known = layers[0].modalities
    if name not in known:
        raise InvalidInputError(
            f"This network has normalisation layers for {'+'.join(known)}, not for {name}.",
            f"Use a model made for {name} volumes, or override the modality if it was detected wrongly.",
        )
    previous = layers[0].active
    for layer in layers:
        layer.active = known.index(name)
    return _Selection(layers, previous)
