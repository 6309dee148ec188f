"""KD-Net (Hu et al., MICCAI 2020): a teacher that takes privileged scans of the same subject besides the image
(here the CT of an MR phantom's subject), distilled into a student that sees the MR alone."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tiny import TINY_MR, TINY_STUDENT, TINY_TEACHER

from MedKDSegmentLib.engine.bundle import load_bundle
from MedKDSegmentLib.engine.data import load_cases, sample_batch
from MedKDSegmentLib.engine.errors import InvalidInputError
from MedKDSegmentLib.engine.inference import segment
from MedKDSegmentLib.engine.labels import label_names
from MedKDSegmentLib.engine.monai_config import CONFIG
from MedKDSegmentLib.engine.networks import input_channels
from MedKDSegmentLib.engine.phantom import write_phantom_dataset
from MedKDSegmentLib.engine.prediction import as_batch
from MedKDSegmentLib.engine.profiles import CT_PROFILE
from MedKDSegmentLib.engine.training import TrainingConfig, cache_teacher_outputs, distill_student, train_teacher
from MedKDSegmentLib.engine.volume import read_volume

FAST = dict(epochs=2, steps_per_epoch=3, batch_size=2, patch_size=(16, 16, 16), device="cpu",
            validation_fraction=0.0, learning_rate=1e-2)


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """MR phantoms and the CT of the same subjects (same seeds, same grid)."""
    folder = tmp_path_factory.mktemp("paired")
    for modality in ("MR", "CT"):
        write_phantom_dataset(folder / modality.lower(), modality, 3, seed=21, size=(48, 48, 32),
                              spacing=(8.0, 8.0, 8.0))
    return folder / "mr", folder / "ct"


@pytest.fixture(scope="module")
def teacher(paired, tmp_path_factory):
    mr, ct = paired
    folder = tmp_path_factory.mktemp("kdnet")
    return train_teacher(mr, folder / "teacher", "MR", TrainingConfig(**FAST), TINY_TEACHER, TINY_MR,
                         privileged={"CT": ct})


def test_the_teacher_takes_the_image_and_the_privileged_scan(teacher, paired):
    assert teacher.privileged == ["CT"]
    assert input_channels(teacher.load_network()) == 2
    assert teacher.metadata["network_data_format"]["inputs"]["image"]["channel_def"] == {"0": "image", "1": "CT"}
    assert teacher.onnx is None and not (teacher.path / CONFIG).exists()  # no single scan is its input
    with pytest.raises(InvalidInputError, match="KD-Net teacher"):
        segment(read_volume(next((paired[0] / "images").iterdir())), teacher, "cpu")


def test_cached_targets_are_the_teacher_s_answer_on_both_scans(teacher, paired):
    mr, ct = paired
    cases = load_cases(mr, TINY_MR, label_names(), privileged=[(ct, CT_PROFILE)])
    case = cases[0]
    assert case.privileged.shape == (1, *case.image.shape) and case.privileged.std() > 0.3
    network = teacher.load_network()
    cache_teacher_outputs(network, cases, torch.device("cpu"), lambda f, m: None)
    z, y, x = case.image.shape
    with torch.no_grad():
        both = network(as_batch(np.stack([case.image, case.privileged[0]])))[0, :, :z, :y, :x].numpy()
        without = network(as_batch(np.stack([case.image, np.zeros_like(case.image)])))[0].numpy()
    np.testing.assert_allclose(case.teacher.astype(np.float32), both, atol=0.05, rtol=0.01)
    assert np.abs(both - without).max() > 0.1  # the privileged scan changes what the teacher says
    images, *_ = sample_batch(cases, 2, (16, 16, 16), np.random.default_rng(0))
    assert images.shape[1] == 2  # patches carry the privileged channel for online teachers


def test_the_student_sees_the_image_alone_and_segments_it(teacher, paired, tmp_path):
    mr, ct = paired
    config = TrainingConfig(**FAST, methods="kd+hint:0.1")
    student = distill_student(mr, teacher, tmp_path / "student", config, TINY_STUDENT, profile=TINY_MR,
                              privileged={"CT": ct})
    assert input_channels(student.load_network()) == 1 and student.privileged == []
    assert student.info["teacher"]["name"] == teacher.name
    assert [m["name"] for m in student.info["method"]["methods"]] == ["kd", "hint"]
    labels = segment(read_volume(next((mr / "images").iterdir())), student, "cpu").labels
    assert labels.array.shape == read_volume(next((mr / "images").iterdir())).array.shape


def test_missing_or_misplaced_privileged_scans_are_refused_before_training(teacher, paired, tmp_path):
    mr, ct = paired
    config = TrainingConfig(**FAST)
    with pytest.raises(InvalidInputError, match="take privileged CT") as error:
        distill_student(mr, teacher, tmp_path / "a", config, TINY_STUDENT, profile=TINY_MR)
    assert "--privileged" in error.value.fix
    shifted = tmp_path / "shifted"
    shutil.copytree(ct, shifted)
    first = next((shifted / "images").iterdir())
    image = sitk.ReadImage(str(first))
    image.SetOrigin([v + 5.0 for v in image.GetOrigin()])
    sitk.WriteImage(image, str(first))
    with pytest.raises(InvalidInputError, match="does not lie on its image's grid"):
        distill_student(mr, teacher, tmp_path / "b", config, TINY_STUDENT, profile=TINY_MR,
                        privileged={"CT": shifted})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert load_bundle(teacher.path).privileged == ["CT"]


def test_a_network_of_several_input_channels_is_saved_without_a_one_scan_onnx_copy(tmp_path):
    """The ONNX runner feeds one scan: a two-channel network (saved without a privileged record, as a script
    may) keeps its torch weights only, instead of failing the export."""
    from tiny import make_bundle

    from MedKDSegmentLib.engine.training import with_input_channels

    architecture = with_input_channels(TINY_STUDENT, 2)
    bundle = make_bundle(tmp_path / "two-channel", architecture)
    assert bundle.onnx is None and input_channels(bundle.load_network()) == 2
    assert make_bundle(tmp_path / "one-channel", TINY_STUDENT).onnx is not None  # the usual copy is still made
