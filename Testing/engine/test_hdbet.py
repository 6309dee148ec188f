"""HD-BET rebuilt: the network's shape, each pipeline step, and (with the published weights) the real thing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from installed_teachers import REFERENCE_ENV, installed_teacher

from MedKDSegmentLib.engine import hdbet, profiles
from MedKDSegmentLib.engine.volume import Volume, read_volume


def test_rebuilt_network_has_the_published_parameter_count_and_module_names():
    network = hdbet.HDBETNet()
    # 16,349,655 is the size of each published fold's state dict; the names are those its keys use.
    assert sum(p.numel() for p in network.parameters()) == 16_349_655
    keys = network.state_dict()
    assert "context1.bn_1.running_mean" in keys and "loc2_seg.weight" in keys and "seg_layer.bias" not in keys


def test_norm_layers_use_the_inputs_statistics_even_in_eval_mode():
    norm = hdbet.InputStatsInstanceNorm(2).eval()
    norm.running_mean.fill_(100.0)  # must be ignored, as HD-BET's pipeline ignores its running statistics
    x = torch.randn(1, 2, 4, 4, 4) * 5 + 3
    expected = torch.nn.functional.instance_norm(x)
    assert torch.allclose(norm(x), expected, atol=1e-5)


def test_ensemble_output_softmax_is_the_mean_of_the_folds_softmax():
    torch.manual_seed(0)
    ensemble = hdbet.HDBETEnsemble(folds=3, base_filters=2).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        mean = torch.stack([torch.softmax(fold(x), 1) for fold in ensemble.folds]).mean(0)
        assert torch.allclose(torch.softmax(ensemble(x), 1), mean, atol=1e-6)
        first = ensemble.with_folds(1)
        assert torch.allclose(torch.softmax(first(x), 1), torch.softmax(ensemble.folds[0](x), 1), atol=1e-6)
        assert first.folds[0] is ensemble.folds[0]  # a view, not a copy


def test_resize_keeps_a_constant_and_the_range_and_nearest_keeps_label_values():
    constant = np.full((10, 12, 7), 3.5, np.float32)
    assert np.allclose(profiles.resize(constant, (15, 8, 11), order=3), 3.5, atol=1e-5)
    ramp = np.random.default_rng(0).normal(size=(9, 9, 9)).astype(np.float32)
    out = profiles.resize(ramp, (20, 5, 13), order=3)
    assert out.shape == (20, 5, 13) and out.min() >= ramp.min() and out.max() <= ramp.max()
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    assert set(np.unique(profiles.resize(labels, (13, 5, 9), order=0))) == {0, 1}


def test_preprocess_resamples_to_1_5_mm_and_z_scores():
    array = np.random.default_rng(1).uniform(0, 300, (20, 30, 40)).astype(np.float32)
    image = hdbet.preprocess(array, (3.0, 1.0, 0.75))  # (z, y, x) spacing
    assert image.shape == (40, 20, 20)
    assert abs(image.mean()) < 1e-4 and abs(image.std() - 1) < 1e-4


def test_pad_reaches_a_multiple_of_16_and_at_least_128_with_zeros_at_the_far_end():
    image = np.ones((130, 100, 129), np.float32)
    padded = hdbet.pad(image)
    assert padded.shape == (144, 128, 144)
    assert padded[:130, :100, :129].all() and not padded[130:].any() and not padded[:, 100:].any()


def test_largest_component_keeps_only_the_biggest_26_connected_blob():
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[1:4, 1:4, 1:4] = 1
    mask[4, 4, 4] = 1  # touches the big blob at a corner only: 26-connected to it
    mask[7:9, 7:9, 7:9] = 1
    kept = hdbet.largest_component(mask)
    assert kept[4, 4, 4] == 1 and kept[1:4, 1:4, 1:4].all() and not kept[7:9, 7:9, 7:9].any()


def test_center_pad_or_cut_puts_the_extra_voxel_after():
    array = np.arange(5)[:, None, None] * np.ones((5, 1, 1))
    assert hdbet.center_pad_or_cut(array, (7, 1, 1))[:, 0, 0].tolist() == [0, 0, 1, 2, 3, 4, 0]
    assert hdbet.center_pad_or_cut(array, (2, 1, 1))[:, 0, 0].tolist() == [1, 2]


def test_mirroring_averages_the_eight_flipped_predictions():
    torch.manual_seed(0)
    network = hdbet.HDBETNet(base_filters=2).eval()
    image = np.random.default_rng(2).normal(size=(20, 18, 16)).astype(np.float32)
    mirrored = hdbet.predict_probabilities(network, image, torch.device("cpu"), mirror=True)
    padded = torch.from_numpy(hdbet.pad(image))[None, None]
    with torch.no_grad():
        expected = sum(torch.softmax(network(padded.flip(a)), 1).flip(a) if a else torch.softmax(network(padded), 1)
                       for a in hdbet.MIRRORS) / 8
    assert len(hdbet.MIRRORS) == 8
    assert np.allclose(mirrored, expected[0, :, :20, :18, :16].numpy(), atol=1e-6)
    plain = hdbet.predict_probabilities(network, image, torch.device("cpu"), mirror=False)
    assert not np.allclose(plain, mirrored, atol=1e-4)  # the flips did change something


def test_working_grid_covers_the_inputs_box_and_labels_come_back_on_the_inputs_array():
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    volume = Volume(np.zeros((13, 21, 17), np.float32), (1.2, 0.9, 2.5), (10.0, -40.0, 95.0), direction)
    grid = hdbet.working_grid(volume)
    assert grid.GetSize() == (14, 13, 22)
    image = volume.to_sitk()
    for corner_in, corner_grid in (((-0.5,) * 3, (-0.5,) * 3),
                                   ((16.5, 20.5, 12.5), tuple(s - 0.5 for s in grid.GetSize()))):
        assert np.allclose(image.TransformContinuousIndexToPhysicalPoint(corner_in),
                           grid.TransformContinuousIndexToPhysicalPoint(corner_grid), atol=1e-6)
    torch.manual_seed(0)
    volume.array[4:9, 5:15, 4:12] = 100
    result = hdbet.segment_hdbet(volume, hdbet.HDBETEnsemble(folds=1, base_filters=2))
    assert result.labels.shape == volume.shape and result.labels.dtype == np.uint8
    target = sitk.Image([5, 6, 7], sitk.sitkFloat32)
    target.SetOrigin((-500.0, 0, 0))  # far outside the head: background
    outside = result.probabilities_on(volume, target)
    assert outside.shape == (2, 7, 6, 5) and np.allclose(outside[0], 1) and np.allclose(outside[1], 0)


# --- the published weights (skip when `medkd teachers get hd-bet` has not been run) ---


@pytest.fixture(scope="module")
def hdbet_bundle():
    return installed_teacher("hd-bet")


def test_published_hdbet_finds_a_plausible_brain_in_a_real_head(hdbet_bundle, shared_data):
    from MedKDSegmentLib.engine.inference import segment

    volume = read_volume(shared_data / "mr-brain-itk" / "t1_head.nii.gz")
    labels = segment(volume, hdbet_bundle, "cpu", pipeline_options={"folds": 1}).labels
    assert labels.same_grid(volume)
    millilitres = (labels.array > 0).sum() * np.prod(volume.spacing) / 1000
    assert 900 < millilitres < 1900  # an adult brain, not the head (about 4 l) nor a fragment
    # Inside the head: the mask's voxels are bright tissue, not the air around the head.
    assert np.median(volume.array[labels.array > 0]) > np.percentile(volume.array, 60)


@pytest.mark.parametrize("setting, options", [("fold0", {"folds": 1}), ("5folds", {})])
def test_published_hdbet_equals_the_original_package_on_the_real_heads(hdbet_bundle, shared_data, setting, options):
    from MedKDSegmentLib.engine.inference import segment

    folder = Path(os.environ.get(REFERENCE_ENV, "/nonexistent"))
    if not folder.is_dir():
        pytest.skip(f"no reference masks of the original HD-BET package (${REFERENCE_ENV}; "
                    "made by scripts/teacher_reference.py in a throwaway environment)")
    heads = {"itk_t1_head": shared_data / "mr-brain-itk" / "t1_head.nii.gz",
             "pyradiomics_brain1": shared_data / "mr-brain-tumor-pyradiomics" / "brain1_image.nrrd"}
    network = hdbet_bundle.load_network()
    for case, path in heads.items():
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}_{setting}.nii.gz"))) > 0
        ours = segment(read_volume(path), hdbet_bundle, "cpu", network=network, pipeline_options=options)
        found = ours.labels.array > 0
        dice = 2 * (found & expected).sum() / (found.sum() + expected.sum())
        assert dice >= 0.99, (case, dice)
