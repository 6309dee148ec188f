"""A bundle's ONNX copy: exported when the bundle is saved, run in ONNX Runtime on the CPU without torch.

Networks that run on whole volumes (``prediction.window_independent``) get one. The copy is
``prediction.WholeVolumeOutputs`` of the network: one pass over the whole padded image returning the softmax
scores, the domain check's feature statistics and the entropy map. Running it needs neither torch nor MONAI,
so a command-line job on the CPU starts in a fraction of a second, and ONNX Runtime's convolutions are
several times faster than eager torch on a CPU.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np

ONNX_WEIGHTS = Path("models") / "model.onnx"
OPSET = 17
OUTPUTS = ("scores", "statistics", "entropy")


def export_onnx(network, path: Path) -> dict:
    """Write ``network`` (in eval mode, on the CPU) as ONNX to ``path``; the bundle's record of it
    (``sha256`` is added by the bundle)."""
    import torch

    from .networks import output_stride
    from .prediction import WholeVolumeOutputs, activation_bytes_per_voxel

    example = torch.zeros(1, 1, 32, 40, 48)  # any multiple of 8: the spatial axes stay free
    spatial = {2: "z", 3: "y", 4: "x"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on traced shapes and its own deprecation
        torch.onnx.export(WholeVolumeOutputs(network).eval(), (example,), str(path), input_names=["image"],
                          output_names=list(OUTPUTS), opset_version=OPSET, dynamo=False,
                          dynamic_axes={"image": spatial, "scores": spatial, "entropy": {1: "z", 2: "y", 3: "x"}})
    return {"opset": OPSET, "output_stride": output_stride(network),
            "bytes_per_voxel": activation_bytes_per_voxel(network)}


def onnx_runtime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def onnx_exporter_installed() -> bool:
    """torch's exporter writes through the ``onnx`` package; without it a bundle is saved without a copy (it
    then runs in torch)."""
    return importlib.util.find_spec("onnx") is not None


class OnnxNetwork:
    """An ONNX copy (bytes, already verified) in an ONNX Runtime session on the CPU."""

    def __init__(self, model: bytes, record: dict) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        self.session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.output_stride = int(record["output_stride"])
        self.bytes_per_voxel = float(record["bytes_per_voxel"])

    def __call__(self, padded: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scores (C, z, y, x), feature statistics (2K,) and entropy map (1, Z, Y, X) of a padded image."""
        scores, statistics, entropy = self.session.run(None, {"image": padded[None, None]})
        return scores[0], statistics, entropy
