"""Model bundles: MONAI layout, checksums, safe loading, never overwritten, safe archive import."""

from __future__ import annotations

import json
import pickle
import zipfile

import pytest
import torch
from tiny import TINY_TEACHER, make_bundle

from MedKDSegmentLib.engine.bundle import (
    METADATA,
    WEIGHTS,
    extract_bundle_archive,
    find_bundles,
    load_bundle,
    resolve_bundle,
)
from MedKDSegmentLib.engine.errors import BundleError


def test_bundle_has_monai_layout_and_medkd_section(tiny_bundle):
    metadata = json.loads((tiny_bundle.path / METADATA).read_text(encoding="utf-8"))
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"]["0"] == "background"
    assert pred["channel_def"]["1"] == "liver"
    assert pred["num_channels"] == len(pred["channel_def"]) == 9
    info = metadata["medkdsegment"]
    assert info["role"] == "student" and info["architecture"]["name"] == "FastStudent"
    assert info["parameters"] == sum(p.numel() for p in tiny_bundle.load_network().parameters())
    assert info["preprocessing"]["modality"] == "CT"
    assert isinstance(torch.load(tiny_bundle.path / WEIGHTS, weights_only=True), dict)  # a plain state dict


def test_loaded_network_reproduces_saved_weights(tmp_path):
    first = make_bundle(tmp_path / "a", seed=3)
    second = make_bundle(tmp_path / "b", seed=3)
    third = make_bundle(tmp_path / "c", seed=4)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(first.load_network()(x), second.load_network()(x))
        assert not torch.equal(first.load_network()(x), third.load_network()(x))


def test_half_precision_halves_weights_but_keeps_batch_norm_statistics(tmp_path):
    from tiny import TINY_CT

    from MedKDSegmentLib.engine.bundle import save_bundle
    from MedKDSegmentLib.engine.labels import ABDOMEN_STRUCTURES
    from MedKDSegmentLib.engine.networks import build_network

    architecture = {"name": "UNet", "kwargs": {**TINY_TEACHER["kwargs"], "norm": "batch"}}
    network = build_network(architecture, 9)
    norm = next(m for m in network.modules() if isinstance(m, torch.nn.BatchNorm3d))
    norm.running_var.fill_(1e6)  # beyond float16's range
    bundle = save_bundle(tmp_path / "half", network, name="half", role="teacher", architecture=architecture,
                         profile=TINY_CT, structures=ABDOMEN_STRUCTURES, method={}, half_precision=True)
    state = torch.load(bundle.path / WEIGHTS, weights_only=True)
    assert state["model.0.conv.unit0.conv.weight"].dtype == torch.float16
    loaded = bundle.load_network()
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    original = network.state_dict()
    for name, value in loaded.state_dict().items():
        if name in dict(network.named_parameters()):
            assert torch.allclose(value, original[name], atol=1e-3, rtol=1e-3), name
        else:
            assert torch.equal(value, original[name]), name  # buffers exactly, no overflow


def test_tampered_weights_are_refused(tiny_bundle):
    weights = tiny_bundle.path / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="do not match their recorded sha256"):
        load_bundle(tiny_bundle.path).load_network()


def test_pickled_objects_are_refused_even_with_a_matching_checksum(tiny_bundle):
    weights = tiny_bundle.path / WEIGHTS

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    weights.write_bytes(pickle.dumps({"x": Payload()}))
    metadata = json.loads((tiny_bundle.path / METADATA).read_text(encoding="utf-8"))
    from MedKDSegmentLib.engine.bundle import sha256_of

    metadata["medkdsegment"]["weights_sha256"] = sha256_of(weights)
    (tiny_bundle.path / METADATA).write_text(json.dumps(metadata))
    with pytest.raises(BundleError, match="could not be read"):
        load_bundle(tiny_bundle.path).load_network()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: m.pop("medkdsegment"), "medkdsegment section is missing"),
        (lambda m: m["network_data_format"]["outputs"]["pred"]["channel_def"].pop("3"), "name every output channel"),
        (lambda m: m["medkdsegment"].update(role="oracle"), "role 'oracle'"),
        (lambda m: m["medkdsegment"].pop("weights_sha256"), "weights_sha256 is missing"),
        (lambda m: m["medkdsegment"]["preprocessing"].update(modality="PET"), "Unknown modality"),
    ],
)
def test_invalid_metadata_is_named(tiny_bundle, damage, message):
    path = tiny_bundle.path / METADATA
    metadata = json.loads(path.read_text(encoding="utf-8"))
    damage(metadata)
    path.write_text(json.dumps(metadata))
    with pytest.raises(BundleError, match=message):
        load_bundle(tiny_bundle.path)


def test_missing_and_corrupt_bundles(tmp_path, tiny_bundle):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    original = (tiny_bundle.path / METADATA).read_text()
    (tiny_bundle.path / METADATA).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tiny_bundle.path)
    (tiny_bundle.path / METADATA).write_text(original)  # which weights file is expected depends on the metadata
    (tiny_bundle.path / WEIGHTS).unlink()
    with pytest.raises(BundleError, match="model.pt is missing"):
        load_bundle(tiny_bundle.path)


def test_bundles_are_never_overwritten(tiny_bundle):
    before = (tiny_bundle.path / WEIGHTS).read_bytes()
    with pytest.raises(BundleError, match="never overwritten"):
        make_bundle(tiny_bundle.path, seed=9)
    assert (tiny_bundle.path / WEIGHTS).read_bytes() == before
    assert [p.name for p in tiny_bundle.path.parent.iterdir()] == [tiny_bundle.path.name]


def test_find_and_resolve(tmp_path):
    make_bundle(tmp_path / "one")
    make_bundle(tmp_path / "two")
    assert [b.name for b in find_bundles(tmp_path)] == ["one", "two"]
    assert resolve_bundle("two", tmp_path).name == "two"
    with pytest.raises(BundleError, match="Known models: one, two"):
        resolve_bundle("three", tmp_path)


def test_archive_import_and_escape_rejection(tmp_path, tiny_bundle):
    archive = tmp_path / "good.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for file in tiny_bundle.path.rglob("*"):
            if file.is_file():
                handle.write(file, file.relative_to(tiny_bundle.path.parent))
    destination = tmp_path / "imported"
    destination.mkdir()
    imported = extract_bundle_archive(archive, destination)
    assert imported.weights_sha256 == tiny_bundle.weights_sha256

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as handle:
        handle.writestr("evil/configs/metadata.json", "{}")
        handle.writestr("evil/../../escaped.txt", "gotcha")
    with pytest.raises(BundleError, match="escapes its folder"):
        extract_bundle_archive(evil, destination)
    assert not (tmp_path / "escaped.txt").exists()
    assert sorted(p.name for p in destination.iterdir()) == [tiny_bundle.path.name]


def test_the_architecture_names_bundles_may_give_are_those_of_the_networks():
    from MedKDSegmentLib.engine.architectures import NETWORK_NAMES
    from MedKDSegmentLib.engine.networks import NETWORKS

    assert tuple(NETWORKS) == NETWORK_NAMES
