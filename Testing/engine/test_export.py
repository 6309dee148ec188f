"""``medkd export``: MONAI, ONNX and TorchScript copies of a bundle that compute what the bundle computes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from tiny import NUM_CLASSES, TINY_CT, TINY_MR, TINY_STUDENT

from MedKDSegmentLib.engine.bundle import Bundle, load_bundle, resolve_bundle, save_bundle, sha256_of
from MedKDSegmentLib.engine.cli import main
from MedKDSegmentLib.engine.errors import InvalidInputError
from MedKDSegmentLib.engine.export import export_bundle
from MedKDSegmentLib.engine.labels import ABDOMEN_STRUCTURES
from MedKDSegmentLib.engine.modality_norm import make_modality_specific, use_modality
from MedKDSegmentLib.engine.monai_config import CONFIG
from MedKDSegmentLib.engine.networks import build_network
from MedKDSegmentLib.engine.phantom import generate_phantom
from MedKDSegmentLib.engine.profiles import to_model_grid
from MedKDSegmentLib.engine.windowing import pad_to_multiple_of_8


def prepared(bundle: Bundle, modality: str = "CT", seed: int = 9) -> torch.Tensor:
    """A phantom unlike the export's own check (another seed and size), prepared as the bundle prepares scans."""
    image, _ = generate_phantom(modality, seed=seed, size=(72, 64, 40), spacing=(3.5, 3.5, 4.0))
    array, _ = to_model_grid(image, bundle.profile_for(modality))
    return torch.from_numpy(pad_to_multiple_of_8(array))[None, None]


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_onnx_export_runs_in_onnx_runtime_with_the_network_s_logits(role, tmp_path):
    bundle = resolve_bundle(f"phantom-abdomen-ct-{role}")
    result = export_bundle(bundle, tmp_path / "model.onnx", "onnx")
    assert result.max_logit_difference < 1e-4
    model = onnx.load(str(result.path))
    assert json.loads({p.key: p.value for p in model.metadata_props}["medkdsegment"]) == bundle.metadata
    image = prepared(bundle)
    found = onnxruntime.InferenceSession(str(result.path)).run(None, {"image": image.numpy()})[0]
    with torch.inference_mode():
        expected = bundle.load_network()(image).numpy()
    assert found.shape == expected.shape
    np.testing.assert_allclose(found, expected, atol=1e-4, rtol=0)
    assert (found.argmax(1) == expected.argmax(1)).mean() > 0.999


def test_torchscript_export_carries_metadata_and_config(tmp_path):
    bundle = resolve_bundle("phantom-abdomen-ct-student")
    result = export_bundle(bundle, tmp_path / "model.ts", "torchscript")
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(result.path), _extra_files=extra)
    assert json.loads(extra["metadata.json"]) == bundle.metadata
    assert json.loads(extra["inference.json"])["network_def"]["_target_"].endswith("FastStudent")
    image = prepared(bundle)
    with torch.inference_mode():
        np.testing.assert_allclose(scripted(image).numpy(), bundle.load_network()(image).numpy(), atol=1e-5, rtol=0)


def test_monai_export_is_a_bundle_with_the_same_weights_and_its_config(tmp_path):
    bundle = resolve_bundle("phantom-abdomen-mr-student")
    result = export_bundle(bundle, tmp_path / "copy", "monai")
    copy = load_bundle(result.path)
    assert sha256_of(copy.weights_path) == bundle.weights_sha256
    assert (result.path / CONFIG).read_text() == (bundle.path / CONFIG).read_text()


def test_a_ct_mr_network_is_exported_with_the_chosen_modality_s_norms(tmp_path):
    torch.manual_seed(2)
    network = make_modality_specific(build_network(TINY_STUDENT, NUM_CLASSES))
    with torch.no_grad():  # MR's norms learnt apart from CT's
        for name, parameter in network.named_parameters():
            if ".norms.1." in name:
                parameter.mul_(1.5)
    bundle = save_bundle(tmp_path / "ct-mr", network, name="ct-mr", role="student", architecture=TINY_STUDENT,
                         profiles={"CT": TINY_CT, "MR": TINY_MR}, structures=ABDOMEN_STRUCTURES,
                         method={"name": "untrained"})
    image = prepared(bundle, "MR")
    outputs = {}
    for modality in ("CT", "MR"):
        path = export_bundle(bundle, tmp_path / f"{modality}.onnx", "onnx", modality).path
        outputs[modality] = onnxruntime.InferenceSession(str(path)).run(None, {"image": image.numpy()})[0]
    loaded = bundle.load_network()
    with torch.inference_mode(), use_modality(loaded, "MR"):
        np.testing.assert_allclose(outputs["MR"], loaded(image).numpy(), atol=1e-4, rtol=0)
    assert np.abs(outputs["CT"] - outputs["MR"]).max() > 1e-2
    with pytest.raises(InvalidInputError, match="Unknown modality .PET."):
        export_bundle(bundle, tmp_path / "pet.onnx", "onnx", "PET")


def test_refusals_leave_nothing_behind(tmp_path, capsys):
    bundle = resolve_bundle("phantom-abdomen-ct-student")
    existing = tmp_path / "taken.onnx"
    existing.write_bytes(b"user's file")
    assert main(["export", "--model", "phantom-abdomen-ct-student", "--format", "onnx", "--output", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_bytes() == b"user's file"
    with pytest.raises(InvalidInputError, match="'.onnx' file"):
        export_bundle(bundle, tmp_path / "model.pt", "onnx")
    published = Bundle(bundle.path, {**bundle.metadata,
                                     "medkdsegment": {**bundle.info, "pipeline": {"name": "hd-bet"}}})
    with pytest.raises(InvalidInputError, match="own published pipeline"):
        export_bundle(published, tmp_path / "hdbet.onnx", "onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.onnx"]
