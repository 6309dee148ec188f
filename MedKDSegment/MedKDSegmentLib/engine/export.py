"""``medkd export``: a copy of a bundle for use elsewhere, checked against the bundle before it is kept.

- ``monai``: the bundle folder with MONAI's ``configs/inference.json`` (``monai_config``), for MONAI's runner,
  MONAI Label and MONAI Deploy.
- ``onnx``: the network alone (image on the model grid -> logits at its output stride), written with MONAI's
  ``convert_to_onnx``, the bundle's metadata in the model's ``metadata_props``.
- ``torchscript``: the network traced with MONAI's ``convert_to_torchscript``, the metadata and MONAI config as
  extra files (as MONAI's ``ckpt_export`` stores them).

A network copy is compared with torch on a phantom prepared as the bundle prepares a scan, and on a second,
smaller shape (the spatial axes stay free); the largest absolute logit difference is reported. Outputs are
written beside their final name and renamed into place; an existing one is never replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .bundle import Bundle
from .errors import InvalidInputError
from .modality_norm import use_modality
from .monai_config import CONFIG, inference_config, write_inference_config
from .onnx_network import OPSET
from .phantom import generate_phantom
from .prediction import as_batch
from .profiles import to_model_grid
from .windowing import pad_to_multiple_of_8

FORMATS = ("monai", "onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts"}
# A copy whose logits stray further than this from torch's is not kept (float32 rounding stays ~1e-5).
MAX_LOGIT_DIFFERENCE = 1e-3


@dataclass
class Export:
    path: Path
    format: str
    max_logit_difference: float | None  # None for the ``monai`` copy (the same weights file)
    checked_shapes: tuple[tuple[int, ...], ...] = ()


def export_bundle(bundle: Bundle, output: str | os.PathLike, fmt: str, modality: str | None = None) -> Export:
    """Write ``bundle`` as ``fmt`` (one of ``FORMATS``) to ``output``.

    Args:
        bundle: a MedKDSegment bundle whose network MONAI's transforms can run (not a published teacher's
            own pipeline, nor an imported TorchScript or MONAI network).
        output: a new folder (``monai``) or file (``.onnx``, ``.ts``).
        fmt: ``monai``, ``onnx`` or ``torchscript``.
        modality: for a CT+MR bundle's network copy, whose normalisation layers to keep (default: its first).
    """
    output = Path(output)
    if fmt not in FORMATS:
        raise InvalidInputError(f"Unknown export format '{fmt}'.", f"Use one of {', '.join(FORMATS)}.")
    if output.exists():
        raise InvalidInputError(f"'{output}' already exists; exports never replace files.", "Choose a new name.")
    if fmt in SUFFIXES and output.suffix != SUFFIXES[fmt]:
        raise InvalidInputError(f"A {fmt} export is a '{SUFFIXES[fmt]}' file, not '{output.name}'.",
                                f"Name the output '{output.stem}{SUFFIXES[fmt]}'.")
    if bundle.pipeline is not None or bundle.info["architecture"]["name"] in ("TorchScript", "MonaiBundle"):
        raise InvalidInputError(
            f"'{bundle.name}' runs {'its own published pipeline' if bundle.pipeline else 'as imported'}: "
            "its network alone does not segment a scan.",
            "Export a student or teacher trained with MedKDSegment, or share the original model.")
    if bundle.privileged:
        raise InvalidInputError(f"'{bundle.name}' is a KD-Net teacher: it segments no single scan.",
                                "Export a student distilled from it.")
    if not output.parent.is_dir():
        raise InvalidInputError(f"The folder '{output.parent}' does not exist.", "Create it first.")
    if fmt == "monai":
        return _export_monai(bundle, output)
    network = bundle.load_network("cpu")
    chosen = modality or bundle.modalities[0]
    profile = bundle.profile_for(chosen)  # refuses a modality the bundle does not serve
    if bundle.modality_specific:
        use_modality(network, chosen)
    example = _example_input(profile)
    staging = output.with_name(f".partial-{output.name}")
    try:
        if fmt == "onnx":
            _write_onnx(network, example, staging, bundle.metadata)
        else:
            _write_torchscript(network, example, staging, bundle)
        shapes = (tuple(example.shape[2:]), tuple(s - 8 for s in example.shape[2:]))
        difference = max(_difference(network, staging, fmt, example[..., :z, :y, :x]) for z, y, x in shapes)
        if difference > MAX_LOGIT_DIFFERENCE:
            raise InvalidInputError(
                f"The {fmt} copy of '{bundle.name}' differs from torch by up to {difference:.2g} in a logit.",
                "Report this with the bundle; the copy was not kept.")
        os.replace(staging, output)
    finally:
        staging.unlink(missing_ok=True)
    return Export(output, fmt, difference, shapes)


def _export_monai(bundle: Bundle, output: Path) -> Export:
    staging = Path(tempfile.mkdtemp(prefix=f".partial-{output.name}-", dir=output.parent))
    try:
        copy = staging / output.name
        shutil.copytree(bundle.path, copy)
        if not (copy / CONFIG).is_file():  # a bundle made before configs were written
            write_inference_config(copy, bundle.metadata)
        os.rename(copy, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Export(output, "monai", None)


def _example_input(profile) -> torch.Tensor:
    """A phantom of the profile's modality, prepared as a scan is (on the model grid, padded to 8)."""
    image, _ = generate_phantom(profile.modality, seed=1, size=(96, 80, 48), spacing=(2.0, 2.0, 2.5))
    array, _ = to_model_grid(image, profile)
    return as_batch(pad_to_multiple_of_8(array))


def _write_onnx(network, example: torch.Tensor, path: Path, metadata: dict) -> None:
    import onnx
    from monai.networks.utils import convert_to_onnx

    spatial = {2: "z", 3: "y", 4: "x"}
    model = convert_to_onnx(network, [example], input_names=["image"], output_names=["logits"],
                            opset_version=OPSET, dynamic_axes={"image": spatial, "logits": spatial},
                            filename=str(path), dynamo=False)
    entry = model.metadata_props.add()
    entry.key, entry.value = "medkdsegment", json.dumps(metadata)
    onnx.save(model, str(path))


def _write_torchscript(network, example: torch.Tensor, path: Path, bundle: Bundle) -> None:
    from monai.networks.utils import convert_to_torchscript

    extra = {"metadata.json": json.dumps(bundle.metadata).encode(),
             "inference.json": json.dumps(inference_config(bundle.metadata)).encode()}
    convert_to_torchscript(network, str(path), extra_files=extra, inputs=[example], use_trace=True)


def _difference(network, path: Path, fmt: str, image: torch.Tensor) -> float:
    """The largest absolute logit difference between torch and the copy at ``path`` on ``image``."""
    with torch.inference_mode():
        expected = network(image).float().numpy()
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        found = session.run(None, {"image": image.numpy()})[0]
    else:
        with torch.inference_mode():
            found = torch.jit.load(str(path)).eval()(image).numpy()
    if found.shape != expected.shape:
        return float("inf")
    return float(np.abs(found - expected).max())
