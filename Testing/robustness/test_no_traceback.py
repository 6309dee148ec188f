"""Every command that reads a volume or a folder, given each kind of bad one a careless user has at hand: exit
code 2 with the problem and its fix, never a traceback, nothing written and nothing that existed changed (issue
19, case 12)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from tiny import make_bundle

from MedKDSegmentLib.engine.cli import EXIT_ERROR, main
from MedKDSegmentLib.engine.phantom import generate_phantom
from MedKDSegmentLib.engine.volume import write_volume


def _image(array: np.ndarray, spacing=(8.0, 8.0, 8.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    return image


# name: how to make it in a folder (returns its path)
BAD_VOLUMES = {
    "missing file": lambda folder: folder / "nothere.nii.gz",
    "empty file": lambda folder: _write_bytes(folder / "empty.nii.gz", b""),
    "text named .nii.gz": lambda folder: _write_bytes(folder / "notes.nii.gz", b"patient notes\n" * 20),
    "random bytes named .nrrd": lambda folder: _write_bytes(folder / "noise.nrrd",
                                                            np.random.default_rng(0).bytes(4096)),
    "2D image": lambda folder: _write_image(folder / "slice.nii.gz", _image(np.zeros((40, 36), np.int16))),
    "4D image": lambda folder: _write_image(folder / "series.nii.gz", sitk.JoinSeries(
        [_image(np.full((24, 36, 40), v, np.int16)) for v in (0, 100)])),
    "one-slice volume": lambda folder: _write_image(folder / "thin.nrrd",
                                                    _image(np.arange(1440, dtype=np.int16).reshape(1, 36, 40))),
    "constant volume": lambda folder: _write_image(folder / "blank.nii.gz", _image(np.zeros((24, 36, 40), np.int16))),
    "colour image": lambda folder: _write_image(folder / "photo.nrrd", sitk.Compose(
        *[_image(np.zeros((24, 36, 40), np.uint8))] * 3)),
    "folder without volumes": lambda folder: _make_folder(folder / "empty-folder"),
}


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _write_image(path: Path, image: sitk.Image) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def _make_folder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("models") / "tiny-student").path


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Path]:
    """A scan and its labels, in a folder of their own (never written to)."""
    folder = tmp_path_factory.mktemp("good")
    image, labels = generate_phantom("CT", 5, size=(40, 36, 24), spacing=(8.0, 8.0, 8.0))
    return write_volume(image, folder / "scan.nii.gz"), write_volume(labels, folder / "labels.nii.gz")


COMMANDS = {
    "segment": lambda bad, model, good, out: ["segment", "--model", model, "--input", bad, "--output", out / "seg",
                                              "--device", "cpu"],
    "compare, first": lambda bad, model, good, out: ["compare", "--first", bad, "--second", good[1]],
    "compare, second": lambda bad, model, good, out: ["compare", "--first", good[1], "--second", bad],
    "finetune, image": lambda bad, model, good, out: ["finetune", "--model", model, "--image", bad, "--labels",
                                                      good[1], "--output", out / "tuned", "--device", "cpu"],
    "finetune, labels": lambda bad, model, good, out: ["finetune", "--model", model, "--image", good[0],
                                                       "--labels", bad, "--output", out / "tuned", "--device", "cpu"],
    "import-teacher": lambda bad, model, good, out: ["import-teacher", bad, "--models-dir", out / "models"],
    "train-teacher": lambda bad, model, good, out: ["train-teacher", "--modality", "CT", "--data", bad, "--output",
                                                    out / "teacher", "--device", "cpu", "--epochs", "1"],
}


def _snapshot(*folders: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() if p.is_file() else b"<dir>"
            for folder in folders for p in sorted(folder.rglob("*"))}


def _assert_refused_leaving_everything(argv: list, capsys, *folders: Path) -> None:
    """The command exits 2 with the problem and its fix (an exception escaping ``main`` is the traceback a user
    would see), and every file in ``folders`` is as it was."""
    before = _snapshot(*folders)
    code = main(["--quiet", *[str(a) for a in argv]])
    error = capsys.readouterr().err
    assert code == EXIT_ERROR, error
    assert "error: " in error and "fix: " in error, error
    assert _snapshot(*folders) == before


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """(inputs, out): where a case builds its bad input, and where the command would write."""
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    return inputs, out


@pytest.mark.parametrize("bad_kind", list(BAD_VOLUMES))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_bad_volume_gives_exit_2_with_a_fix_and_leaves_everything_as_it_was(model, good, folders, capsys,
                                                                               command, bad_kind):
    inputs, out = folders
    bad = BAD_VOLUMES[bad_kind](inputs)
    _assert_refused_leaving_everything(COMMANDS[command](bad, model, good, out), capsys,
                                       inputs, out, good[0].parent, model)


def _damaged_copy(model: Path, folder: Path, member: str, data: bytes | None) -> Path:
    copy = folder / "damaged-model"
    shutil.copytree(model, copy)
    with open(copy / member, "ab" if data is None else "wb") as handle:
        handle.write(b"\0" if data is None else data)
    return copy


BAD_MODELS = {
    "unknown name": lambda model, folder: "no-such-model",
    "folder that is no bundle": lambda model, folder: _make_folder(folder / "notes"),
    "metadata that is not JSON": lambda model, folder: _damaged_copy(model, folder, "configs/metadata.json", b"{"),
    "weights changed": lambda model, folder: _damaged_copy(model, folder, "models/model.pt", None),
    "ONNX copy changed": lambda model, folder: _damaged_copy(model, folder, "models/model.onnx", None),
}
MODEL_COMMANDS = {
    "segment": lambda bad, good, out: ["segment", "--model", bad, "--input", good[0], "--output", out / "seg",
                                       "--device", "cpu"],
    "finetune": lambda bad, good, out: ["finetune", "--model", bad, "--image", good[0], "--labels", good[1],
                                        "--output", out / "tuned", "--device", "cpu", "--epochs", "1"],
    "info": lambda bad, good, out: ["info", bad],
}


@pytest.mark.parametrize("bad_kind", list(BAD_MODELS))
@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
def test_a_bad_model_gives_exit_2_with_a_fix_and_leaves_everything_as_it_was(model, good, folders, capsys,
                                                                              command, bad_kind):
    inputs, out = folders
    bad = BAD_MODELS[bad_kind](model, inputs)
    _assert_refused_leaving_everything(MODEL_COMMANDS[command](bad, good, out), capsys,
                                       inputs, out, good[0].parent, model)
