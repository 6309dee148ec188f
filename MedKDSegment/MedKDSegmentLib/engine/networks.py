"""Networks built from the architecture config stored in a bundle.

Teachers are MONAI networks. The student, ``FastStudent``, is built for CPU speed
rather than parameter count alone: it never convolves at full resolution (a strided
stem halves every axis first), keeps few channels, and predicts at half resolution.
MONAI has no network of this shape, so it is assembled here from MONAI's blocks.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import UNet
from torch import nn
from torch.nn import functional as F

from .deepbet import DeepBETModels
from .hdbet import HDBETEnsemble
from .liver_unet import LiverUNet
from .nnunet import NnUNetEnsemble
from .tissue_vnet import SpacingVNet


class FastStudent(nn.Module):
    """Encoder at 1/2, 1/4 and 1/8 resolution; logits at 1/2 resolution (``output_stride = 2``).

    Returning half-resolution logits saves the costliest memory-bound step on a CPU:
    the caller interpolates them once, straight onto the grid it needs (the label
    patch in training, the input volume's grid at inference). ``features`` are the
    channel counts at 1/2, 1/4 and 1/8 resolution.
    """

    output_stride = 2

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 9,
        features: tuple[int, int, int] = (8, 16, 20),
        norm: str = "batch",
    ) -> None:
        super().__init__()
        f1, f2, f3 = features

        def conv(cin: int, cout: int, strides: int = 1) -> Convolution:
            return Convolution(3, cin, cout, strides=strides, kernel_size=3, norm=norm, act="relu")

        self.stem = conv(in_channels, f1, strides=2)
        self.down1 = nn.Sequential(conv(f1, f2, strides=2), conv(f2, f2))
        self.down2 = nn.Sequential(conv(f2, f3, strides=2), conv(f3, f3))
        self.up = conv(f3 + f2, f2)
        self.head = nn.Conv3d(f2 + f1, out_channels, kernel_size=1)

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[2:], mode="trilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.stem(x)
        s2 = self.down1(s1)
        s3 = self.down2(s2)
        d2 = self.up(torch.cat([self._up(s3, s2), s2], dim=1))
        return self.head(torch.cat([self._up(d2, s1), s1], dim=1))


def output_stride(network: nn.Module) -> int:
    """How much coarser than its input a network's logits are (1 for MONAI networks)."""
    return getattr(network, "output_stride", 1)


def input_channels(network: nn.Module) -> int:
    """The channels a network takes: its first convolution's (1 for a module that cannot be inspected). A
    teacher given privileged inputs (KD-Net) takes the student's image and more channels after it."""
    if isinstance(network, torch.jit.ScriptModule):
        return 1
    first = next((m for m in network.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))), None)
    return first.in_channels if first is not None else 1


def full_resolution(logits: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Logits interpolated to ``size`` (a no-op when they already have it)."""
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="trilinear", align_corners=False)


NETWORKS = {
    "UNet": UNet,
    "FastStudent": FastStudent,
    "HDBETEnsemble": HDBETEnsemble,
    "DeepBETModels": DeepBETModels,
    "SpacingVNet": SpacingVNet,
    "LiverUNet": LiverUNet,
    "NnUNetEnsemble": NnUNetEnsemble,
}

TEACHER_CONFIG = {
    "name": "UNet",
    "kwargs": {
        "spatial_dims": 3,
        "in_channels": 1,
        # A full-resolution first stage, as in nnU-Net: accurate, and what a student must beat on speed.
        "channels": [8, 32, 64, 128, 256],
        "strides": [1, 2, 2, 2],
        "num_res_units": 2,
        "norm": "batch",
    },
}
STUDENT_CONFIG = {"name": "FastStudent", "kwargs": {"in_channels": 1, "features": [8, 16, 20]}}


def build_network(config: dict, out_channels: int) -> nn.Module:
    """Instantiate ``config = {"name": ..., "kwargs": {...}}`` with ``out_channels`` classes."""
    name = config.get("name")
    if name not in NETWORKS:
        raise ValueError(f"unknown network '{name}'; known: {', '.join(NETWORKS)}")
    kwargs = dict(config.get("kwargs", {}))
    for key in ("channels", "strides", "features"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return NETWORKS[name](out_channels=out_channels, **kwargs)


def count_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


def count_macs(network: nn.Module, shape: tuple[int, int, int] = (96, 96, 96)) -> int:
    """Multiply-accumulates of one forward pass on a (1, C, *shape) input, counted with hooks
    on convolutions (they are >99 % of the work in these networks)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.ConvTranspose3d):  # every input voxel meets the whole kernel
            total += module.weight.numel() * inputs[0][0, 0].numel()
        else:  # every output voxel meets in_channels/groups * prod(kernel) weights
            total += module.weight[0].numel() * output.numel()

    handles = [
        m.register_forward_hook(hook) for m in network.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))
    ]
    in_channels = next(m for m in network.modules() if isinstance(m, (nn.Conv3d,))).in_channels
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            network(torch.zeros(1, in_channels, *shape))
    finally:
        network.train(was_training)
        for handle in handles:
            handle.remove()
    return total


# A mid-size teacher assistant (Mirzadeh et al.): about 0.3 M parameters, between the 4.8 M teacher and
# the 46 k student, so a teacher → assistant → student chain bridges the capacity gap in two steps.
ASSISTANT_CONFIG = {
    "name": "UNet",
    "kwargs": {
        "spatial_dims": 3,
        "in_channels": 1,
        "channels": [8, 16, 32, 64],
        "strides": [2, 2, 2],
        "num_res_units": 2,
        "norm": "batch",
    },
}


def feature_layer(network: nn.Module) -> str:
    """Name (for ``named_modules``) of the deepest, most abstract feature map: the default layer
    for feature hints and attention transfer. MONAI's UNet nests its levels as
    ``model.1.submodule.1.submodule...``; the innermost one is the bottleneck."""
    if isinstance(network, FastStudent):
        return "down2"  # the 1/8-resolution encoder output
    if isinstance(network, UNet):
        from monai.networks.layers import SkipConnection

        name, module = "model", network.model
        while isinstance(module, nn.Sequential) and len(module) > 1 and isinstance(module[1], SkipConnection):
            name, module = f"{name}.1.submodule", module[1].submodule
        return name
    layer = getattr(network, "feature_layer", None)
    if isinstance(layer, str):
        return layer
    raise ValueError(f"no default feature layer for {type(network).__name__}; name one explicitly")
