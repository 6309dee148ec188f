"""Liver U-Net rebuilt: the network, its Keras weights, pymirc's zoom, the centred prediction, and (with the
published weights) the package's own output on the real CTs."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from installed_teachers import REFERENCE_ENV, installed_teacher

from MedKDSegmentLib.engine import liver_unet
from MedKDSegmentLib.engine.errors import InvalidInputError
from MedKDSegmentLib.engine.inference import segment
from MedKDSegmentLib.engine.volume import read_volume


def test_rebuilt_unet_has_the_published_size_and_keeps_the_centre_of_its_input():
    network = liver_unet.LiverUNet().eval()
    assert sum(p.numel() for p in network.parameters()) == 3_874_961  # the published HDF5's arrays
    with torch.no_grad():
        assert network(torch.randn(1, 1, 54, 54, 81)).shape == (1, 1, 28, 28, 55)  # 26 voxels lost, as in Keras
    with pytest.raises(ValueError, match="one sigmoid output"):
        liver_unet.LiverUNet(out_channels=3)


def test_moments_are_tensorflows_sequential_float32_sums_not_the_exact_ones():
    x = torch.rand(1, 3, 40, 30, 30) * 1000 + 500  # large values: sequential float32 sums drift
    mean, std = liver_unet._cpu_tensorflow_moments(x)
    flat = x[0].permute(1, 2, 3, 0).reshape(-1, 3).numpy()
    running = np.add.accumulate(flat, axis=0, dtype=np.float32)[-1] / np.float32(len(flat))
    np.testing.assert_array_equal(mean.view(-1).numpy(), running)
    np.testing.assert_allclose(mean.view(-1).numpy(), flat.astype(np.float64).mean(0), rtol=1e-3)
    np.testing.assert_allclose(std.view(-1).numpy(), flat.astype(np.float64).std(0), rtol=1e-2)
    two = torch.cat([x, x * 2])
    assert torch.allclose(liver_unet._cpu_tensorflow_moments(two)[0][1], mean[0] * 2, rtol=1e-3)  # per item


def keras_weights_file(kernels: list[np.ndarray]) -> bytes:
    """A Keras 2 ``save_weights`` HDF5: layer names in order, each with its weight names and arrays."""
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as file:
        names = ["input_1"] + [f"conv3d_{i + 1}" for i in range(len(kernels))]
        file.attrs["layer_names"] = np.array(names, dtype="S")
        file.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S")
        for name, kernel in zip(names[1:], kernels):
            group = file.create_group(name)
            group.attrs["weight_names"] = np.array([f"{name}/kernel:0", f"{name}/bias:0"], dtype="S")
            group.create_dataset(f"{name}/kernel:0", data=kernel)
            group.create_dataset(f"{name}/bias:0", data=np.arange(kernel.shape[-1], dtype=np.float32))
    return buffer.getvalue()


def test_keras_kernels_become_torch_weights_in_the_files_layer_order():
    rng = np.random.default_rng(0)
    kernels = [rng.normal(size=(*k, cin, cout)).astype(np.float32) for cin, cout, k in liver_unet.CONVOLUTIONS]
    state = liver_unet.keras_state_dict(keras_weights_file(kernels))
    network = liver_unet.LiverUNet()
    network.load_state_dict(state, strict=True)
    kernel = kernels[1]  # (x, y, z, in, out)
    assert state["convs.1.weight"][5, 7, 2, 0, 1] == kernel[2, 0, 1, 7, 5]
    assert state["convs.14.bias"].tolist() == [0.0]
    with pytest.raises(ValueError, match="expected 15"):
        liver_unet.keras_state_dict(keras_weights_file(kernels[:-1]))


def test_zoom_is_pymircs_centre_aligned_linear_up_and_area_down_sampling():
    line = np.array([[[2.0]], [[6.0]]])
    up = liver_unet.zoom(line, [2, 1, 1])[:, 0, 0]
    # centres at -0.25, 0.25, 0.75, 1.25 of the input; beyond its edge lies 0
    np.testing.assert_allclose(up, [0.75 * 2, 0.75 * 2 + 0.25 * 6, 0.25 * 2 + 0.75 * 6, 0.75 * 6])
    down = liver_unet.zoom(np.arange(1.0, 5.0)[None, :, None], [1, 0.5, 1])[0, :, 0]
    np.testing.assert_allclose(down, [1.5, 3.5])
    assert liver_unet.zoom(np.ones((5, 6, 7)), [1, 1, 1]).shape == (5, 6, 7)
    assert liver_unet.zoom(np.ones((5, 6, 7)), [2, 0.5, 1]).shape == (10, 3, 7)


class _Centre(torch.nn.Module):
    """Returns the central output-sized part of its input (the U-Net's geometry, not its function)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return liver_unet._centre_crop(x, liver_unet.OUTPUT_SHAPE)


def test_prediction_lands_on_the_voxel_it_was_made_for_and_fills_the_uncovered_ones():
    rng = np.random.default_rng(1)
    small = rng.normal(size=(50, 41, 30)).astype(np.float32)
    np.testing.assert_allclose(liver_unet._predict(small, _Centre(), torch.device("cpu")), 1 / (1 + np.exp(-small)),
                               rtol=1e-5)
    wide = rng.normal(size=(170, 20, 141)).astype(np.float32)  # beyond the 163 x 136 output in x and z
    found = liver_unet._predict(wide, _Centre(), torch.device("cpu"))
    # centres 85 (odd window) and 70 - 0.5 (even window): covered x 4..166 and z 2..137
    x, z = slice(4, 167), slice(2, 138)
    np.testing.assert_allclose(found[x, :, z], 1 / (1 + np.exp(-wide[x, :, z])), rtol=1e-5)
    np.testing.assert_array_equal(found[:4, :, z], np.broadcast_to(found[4:5, :, z], (4, 20, 136)))  # nearest
    np.testing.assert_array_equal(found[x, :, 138:], np.broadcast_to(found[x, :, 137:138], (163, 20, 3)))


def test_a_ct_without_lungs_or_body_is_refused_with_a_reason():
    water = np.zeros((40, 40, 30))
    water[5:35, 5:35] = 40.0  # a body of soft tissue in air, no lungs
    water[water == 0] = -1000.0
    with pytest.raises(InvalidInputError, match="lungs"):
        liver_unet.crop_ct(water, np.array([3.0, 3.0, 3.0]))
    with pytest.raises(InvalidInputError, match="No body"):
        liver_unet.crop_ct(np.full((20, 20, 20), -1000.0), np.array([3.0, 3.0, 3.0]))
    for flat in (np.zeros(12), np.arange(12.0)):  # no peak or dip at any order: the package loops for ever
        with pytest.raises(InvalidInputError, match="hip"):
            liver_unet._extremes(flat, np.less, 15, 3)
    assert liver_unet._extremes(np.array([0.0, 2, 1, 0, 3, 0, 0, 0]), np.greater, 15, 3).tolist() == [4]


@pytest.fixture(scope="module")
def liver_bundle():
    return installed_teacher("liver-unet")


def test_published_liver_unet_equals_the_original_package_on_the_real_ct(liver_bundle, shared_data):
    folder = Path(os.environ.get(REFERENCE_ENV, "/nonexistent"))
    if not (folder / "ct_liver.nii.gz").is_file():
        pytest.skip(f"no reference masks of the original package (${REFERENCE_ENV}; scripts/liver_reference.py)")
    image = shared_data / "ct-mr-abdomen-totalseg" / "ct.nii.gz"  # scripts/real_students.py also checks ct_large
    found = segment(read_volume(image), liver_bundle, "cpu").labels.to_sitk()
    expected = sitk.Resample(sitk.ReadImage(str(folder / "ct_liver.nii.gz")), found, sitk.Transform(),
                             sitk.sitkNearestNeighbor)  # the package writes canonical (RAS) orientation
    found, expected = sitk.GetArrayFromImage(found) > 0, sitk.GetArrayFromImage(expected) > 0
    assert expected.sum() > 10_000
    assert 2 * (found & expected).sum() / (found.sum() + expected.sum()) >= 0.99
