"""deepbet rebuilt: the network's shape, the pipeline's steps, and (with the published weights) the real thing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from installed_teachers import REFERENCE_ENV, installed_teacher

from MedKDSegmentLib.engine import deepbet
from MedKDSegmentLib.engine.errors import InvalidInputError
from MedKDSegmentLib.engine.inference import segment
from MedKDSegmentLib.engine.volume import Volume, read_volume


def test_rebuilt_linknet_has_the_published_parameter_count_and_module_names():
    network = deepbet.LinkNet3d()
    assert sum(p.numel() for p in network.parameters()) == 2_126_258  # each published TorchScript file's size
    keys = set(network.state_dict())
    assert {"init.0.weight", "down1.block1.downsample.0.weight", "up3.tp_conv.0.weight", "tp_conv2.bias"} <= keys
    assert "down0.block1.downsample.0.weight" not in keys  # the first stage keeps its shape: no projection
    with torch.no_grad():
        assert network(torch.randn(1, 1, 64, 64, 64)).shape == (1, 2, 64, 64, 64)


def test_box_is_the_masks_extent_scaled_and_grown_by_ten_percent_a_side():
    mask = torch.zeros(16, 16, 16)
    mask[4:12, 6:10, 2:14] = 1
    box = deepbet._box(mask, (64, 64, 64))
    # extent 8, 4, 12 voxels centred at 8, 8, 8 -> x4 on the full grid, 1.2 times as wide
    assert [(s.start, s.stop) for s in box] == [(13, 51), (22, 41), (3, 61)]
    with pytest.raises(ValueError):
        deepbet._box(torch.zeros(8, 8, 8), (32, 32, 32))


class _Bright(torch.nn.Module):
    """Says "brain" where the normalised image is above its mean (0.449 after deepbet's scaling)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), (x - 0.449) * 10], dim=1)


def test_pipeline_finds_the_bright_object_on_the_input_array_whatever_its_orientation():
    direction = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # a permuted, flipped grid
    z, y, x = np.mgrid[:30, :40, :36]
    head = ((z - 13) / 10) ** 2 + ((y - 22) / 14) ** 2 + ((x - 17) / 12) ** 2 < 1
    volume = Volume((head * 100 + 5).astype(np.float32), (1.0, 1.2, 2.0), (3.0, -2.0, 7.0), direction)
    network = deepbet.DeepBETModels()
    network.box, network.brain = _Bright(), _Bright()
    result = deepbet.segment_deepbet(volume, network)
    assert result.labels.shape == volume.shape and result.probability.shape == volume.shape
    found = result.labels > 0
    assert 2 * (found & head).sum() / (found.sum() + head.sum()) > 0.95
    with pytest.raises(InvalidInputError, match="no brain"):
        deepbet.segment_deepbet(volume.with_array(np.full(volume.shape, 5, np.float32)), network)


@pytest.fixture(scope="module")
def deepbet_bundle():
    return installed_teacher("deepbet")


def test_published_deepbet_equals_the_original_package_on_the_real_heads(deepbet_bundle, shared_data):
    folder = Path(os.environ.get(REFERENCE_ENV, "/nonexistent"))
    if not folder.is_dir():
        pytest.skip(f"no reference masks of the original packages (${REFERENCE_ENV}; scripts/teacher_reference.py)")
    network = deepbet_bundle.load_network()
    for case, path in {"itk_t1_head": shared_data / "mr-brain-itk" / "t1_head.nii.gz",
                       "pyradiomics_brain2": shared_data / "mr-brain-tumor-pyradiomics" / "brain2_image.nrrd"}.items():
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}_deepbet.nii.gz"))) > 0
        found = segment(read_volume(path), deepbet_bundle, "cpu", network=network).labels.array > 0
        assert 2 * (found & expected).sum() / (found.sum() + expected.sum()) >= 0.99, case
