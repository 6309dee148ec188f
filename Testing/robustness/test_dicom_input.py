"""DICOM folders as users bring them (issue 19, cases 5 and 6): several series, a missing slice, files named
by UID. Each test writes its own series; the real 20-slice CT series is used when ../shared/data is there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_series import write_series
from tiny import make_bundle

from MedKDSegmentLib.engine.cli import EXIT_ERROR, main
from MedKDSegmentLib.engine.errors import InvalidInputError
from MedKDSegmentLib.engine.volume import read_volume


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("models") / "tiny-student").path


def segment(model: Path, source: Path, output: Path, *extra: str) -> int:
    return main(["--quiet", "segment", "--model", str(model), "--input", str(source), "--output", str(output),
                 "--device", "cpu", "--format", "nifti", *extra])


def test_a_folder_of_several_series_asks_which_one(model, tmp_path, capsys):
    first, second = "1.2.826.0.1.3680043.2.1125.10", "1.2.826.0.1.3680043.2.1125.20"
    write_series(tmp_path / "study", first, "abdomen")
    write_series(tmp_path / "study", second, "partial", skip=tuple(range(5, 10)))
    with pytest.raises(InvalidInputError, match="2 DICOM series") as error:
        read_volume(tmp_path / "study")
    assert "'abdomen', 10 slices" in error.value.problem and "'partial', 5 slices" in error.value.problem
    assert segment(model, tmp_path / "study", tmp_path / "out") == EXIT_ERROR
    assert "--series" in capsys.readouterr().err and not (tmp_path / "out.nii.gz").exists()
    assert read_volume(tmp_path / "study", series=second).shape[0] == 5
    assert segment(model, tmp_path / "study", tmp_path / "out", "--series", first) == 0
    assert read_volume(tmp_path / "out.nii.gz").shape == (10, 32, 32)


def test_a_series_with_a_missing_slice_is_refused_not_stretched(model, tmp_path, capsys):
    write_series(tmp_path / "gap", "1.2.826.0.1.3680043.2.1125.30", "abdomen", skip=(4,))
    with pytest.raises(InvalidInputError, match="not evenly spaced") as error:
        read_volume(tmp_path / "gap")
    assert "12.000 mm between slices 3 and 4, 6.000 mm elsewhere" in error.value.problem
    assert segment(model, tmp_path / "gap", tmp_path / "out") == EXIT_ERROR
    assert not (tmp_path / "out.nii.gz").exists()


def test_files_named_by_uid_without_a_suffix_are_found_by_content(model, tmp_path):
    uid = "1.2.826.0.1.3680043.2.1125.40"
    write_series(tmp_path / "named", uid, "abdomen", names=lambda index: f"CT.{uid}.{index}")
    assert segment(model, tmp_path / "named", tmp_path / "out") == 0
    assert read_volume(tmp_path / "out.nii.gz").shape == (10, 32, 32)


def test_the_real_ct_series_named_by_uid_is_read_and_segmented(model, shared_data, tmp_path):
    series = shared_data / "ct-mr-abdomen-totalseg" / "ct_dicom"
    assert segment(model, series, tmp_path / "out") == 0
    labels = read_volume(tmp_path / "out.nii.gz")
    assert labels.shape == (20, 512, 512) and np.allclose(labels.spacing, (0.9765625, 0.9765625, 2.0))
