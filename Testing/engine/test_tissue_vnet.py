"""Tissue VNet rebuilt: the network's shape, the pipeline's steps, and (with the published weights) the real thing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from installed_teachers import REFERENCE_ENV, installed_teacher

from MedKDSegmentLib.engine import tissue_vnet
from MedKDSegmentLib.engine.errors import InvalidInputError
from MedKDSegmentLib.engine.inference import segment
from MedKDSegmentLib.engine.volume import Volume, read_volume

REFERENCE_CASES = ("aseg_t1", "itk_t1_head", "pyradiomics_brain1", "pyradiomics_brain2")


def test_rebuilt_vnet_has_the_published_parameter_count_module_names_and_uses_the_spacing():
    network = tissue_vnet.SpacingVNet().eval()
    assert sum(p.numel() for p in network.parameters()) == 7_618_285
    assert sum(v.numel() for v in network.state_dict().values()) == 7_620_503  # the published best.pth
    keys = set(network.state_dict())
    assert {"enc0.conv1.weight", "down4.down.1.running_var", "film4.mlp.2.weight", "up1.conv.weight",
            "dec4.shortcut.weight", "enc0.relu.weight", "outc.bias"} <= keys
    assert "enc1.shortcut.weight" not in keys  # same width in and out: identity shortcut
    x = torch.randn(1, 1, 16, 32, 16)
    with torch.no_grad():
        fine, coarse = network(x, torch.tensor([[1.0, 1.0, 1.0]])), network(x, torch.tensor([[2.0, 2.0, 6.0]]))
        assert fine.shape == (1, 4, 16, 32, 16)
        assert not torch.allclose(fine, coarse)  # FiLM: the spacing changes the output
        assert torch.equal(network(x), fine)  # 1 mm unless told


def test_outliers_above_the_brightest_peak_are_removed_and_the_rest_kept():
    rng = np.random.default_rng(0)
    array = np.concatenate([rng.normal(300, 20, 4000), rng.normal(800, 30, 6000), [5000, 6000]]).astype(np.float32)
    cleaned = tissue_vnet._without_bright_outliers(array)
    assert cleaned[-2:].tolist() == [0, 0]  # far above the white-matter peak
    assert (cleaned[:4000] == array[:4000]).all()  # darker tissue kept
    assert (cleaned[4000:-2] > 0).mean() > 0.99


def test_preprocess_scales_the_foreground_to_0_1_and_pads_to_multiples_of_16_centred():
    z, y, x = np.mgrid[:20, :35, :17]
    array = np.where(((z - 10) / 8) ** 2 + ((y - 17) / 15) ** 2 + ((x - 8) / 7) ** 2 < 1, 600 + y * 10.0, 0)
    image = sitk.GetImageFromArray(array.astype(np.float32))
    prepared, before = tissue_vnet.preprocess(image)
    assert prepared.shape == (32, 48, 32) and before == (6, 6, 7)
    inner = prepared[6:26, 6:41, 7:24]
    assert ((inner > 0) <= (array > 0)).all() and prepared.sum() == pytest.approx(inner.sum())
    assert inner.max() == pytest.approx(1.0)
    with pytest.raises(InvalidInputError, match="raw T1 intensities"):
        tissue_vnet.preprocess(sitk.GetImageFromArray((array / 1000).astype(np.float32)))


class _ByIntensity(torch.nn.Module):
    """Says background where the input is 0, and CSF / GM / WM for dark / middle / bright foreground."""

    def forward(self, x: torch.Tensor, spacing: torch.Tensor) -> torch.Tensor:
        assert spacing.shape == (1, 3)
        tissue = -((x - torch.tensor([0.25, 0.625, 1.0]).view(1, 3, 1, 1, 1)) ** 2) * 100
        return torch.cat([torch.where(x > 0, -50.0, 50.0), tissue], dim=1)


def test_pipeline_labels_the_foreground_box_on_the_input_array_and_background_outside():
    z, y, x = np.mgrid[:24, :30, :28]
    head = ((z - 12) / 9) ** 2 + ((y - 15) / 12) ** 2 + ((x - 14) / 11) ** 2 < 1
    array = np.where(head, np.select([x < 10, x < 18], [300.0, 600.0], 900.0), 0).astype(np.float32)
    array[12, 15, 14] = 100  # the darkest voxel becomes 0 after scaling: CSF is 0.25, GM 0.625, WM 1
    volume = Volume(array, (1.0, 1.0, 1.5), (3.0, -2.0, 7.0), (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    result = tissue_vnet.segment_tissue_vnet(volume, _ByIntensity())
    assert result.labels.shape == volume.shape and result.probabilities.shape == (4, *volume.shape)
    assert (result.labels[~head] == 0).all() and (result.labels[head] > 0).mean() > 0.95
    inner = head & (np.abs(x - 14) < 8) & (np.abs(x - 10) > 1) & (np.abs(x - 18) > 1)  # away from the blur
    for value, label in ((300, 1), (600, 2), (900, 3)):
        where = inner & (array == value)
        assert (result.labels[where] == label).mean() > 0.9, label
    np.testing.assert_allclose(result.probabilities.sum(0), 1, atol=1e-5)
    assert (np.argmax(result.probabilities, 0) == result.labels).mean() > 0.999  # soft output agrees
    with pytest.raises(InvalidInputError, match="no voxel"):
        tissue_vnet.segment_tissue_vnet(volume.with_array(np.zeros_like(array)), _ByIntensity())


@pytest.fixture(scope="module")
def tissue_bundle():
    return installed_teacher("tissue-vnet")


def test_published_tissue_vnet_equals_the_original_package_on_real_brains(tissue_bundle):
    folder = Path(os.environ.get(REFERENCE_ENV, "/nonexistent"))
    if not all((folder / f"{case}_tissue.nii.gz").is_file() for case in REFERENCE_CASES):
        pytest.skip(f"no reference labels of the original package (${REFERENCE_ENV}; scripts/teacher_reference.py)")
    network = tissue_bundle.load_network()
    for case in REFERENCE_CASES[1:]:  # the small ones; scripts/real_students.py checks all four
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}_tissue.nii.gz")))
        found = segment(read_volume(folder / f"{case}_tissue_input.nii.gz"), tissue_bundle, "cpu",
                        network=network).labels.array
        assert (found == expected).mean() >= 0.999, case
        for label in (1, 2, 3):
            overlap = 2 * ((found == label) & (expected == label)).sum()
            assert overlap / ((found == label).sum() + (expected == label).sum()) >= 0.99, (case, label)


def test_a_volume_without_contrast_is_refused_with_a_reason():
    flat = np.zeros((20, 20, 20), np.float32)
    flat[5:15, 5:15, 5:15] = 700.0
    with pytest.raises(InvalidInputError, match="one intensity"):
        tissue_vnet.preprocess(sitk.GetImageFromArray(flat))
