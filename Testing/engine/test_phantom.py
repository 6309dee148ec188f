"""The synthetic abdominal phantom: determinism, anatomy, contrast, geometry, arguments and files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from MedKDSegmentLib.engine.errors import CancelledError, InvalidInputError
from MedKDSegmentLib.engine.labels import ABDOMEN_STRUCTURES
from MedKDSegmentLib.engine.phantom import (
    DEFAULT_SIZE,
    DEFAULT_SPACING,
    DomainShift,
    generate_phantom,
    write_phantom_dataset,
)
from MedKDSegmentLib.engine.volume import Volume, read_volume

LABEL = {s.name: s.value for s in ABDOMEN_STRUCTURES}
SMALL = (48, 48, 32)  # a coarse grid over the same body, for the cheap tests
SMALL_SPACING = (8.0, 8.0, 7.5)


@pytest.fixture(scope="module")
def ct() -> tuple[Volume, Volume]:
    return generate_phantom("CT", 0)


@pytest.fixture(scope="module")
def mr() -> tuple[Volume, Volume]:
    return generate_phantom("MR", 0)


def volume_ml(labels: Volume, value: int) -> float:
    return float((labels.array == value).sum() * np.prod(labels.spacing) / 1000.0)


def centroid_mm(labels: Volume, value: int) -> np.ndarray:
    """Physical (x, y, z) centroid of a label; identity direction, so origin + index * spacing."""
    z, y, x = np.nonzero(labels.array == value)
    return np.array(labels.origin) + np.array([x.mean(), y.mean(), z.mean()]) * np.array(labels.spacing)


def interior(mask: np.ndarray) -> np.ndarray:
    """The mask less its boundary voxels (6-connected erosion), free of partial-volume blur."""
    inner = mask.copy()
    for axis in range(3):
        for shift in (1, -1):
            inner &= np.roll(mask, shift, axis=axis)
    return inner


def organ_mean(image: Volume, labels: Volume, value: int) -> float:
    return float(image.array[interior(labels.array == value)].astype(np.float64).mean())


def fat_level(image: Volume, labels: Volume) -> float:
    """Mode of the unlabelled body voxels: fat, the commonest tissue of the abdomen."""
    values = image.array[labels.array == 0].astype(np.float64)
    if image.modality == "CT":
        values = values[(values > -300) & (values < 300)]
        bins = np.arange(-300, 301, 10)
    else:
        values = values[values > 0.2 * np.percentile(values, 99)]
        bins = np.linspace(values.min(), values.max(), 61)
    counts, edges = np.histogram(values, bins=bins)
    return float(edges[np.argmax(counts)] + (edges[1] - edges[0]) / 2)


# --------------------------------------------------------------------------------------------
# Determinism and format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_same_seed_gives_identical_volumes(modality: str) -> None:
    first = generate_phantom(modality, 7, SMALL, SMALL_SPACING)
    second = generate_phantom(modality, 7, SMALL, SMALL_SPACING)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a.array, b.array)
        assert a.same_grid(b, tolerance=0.0)


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_different_seeds_give_different_subjects(modality: str) -> None:
    image_a, labels_a = generate_phantom(modality, 1, SMALL, SMALL_SPACING)
    image_b, labels_b = generate_phantom(modality, 2, SMALL, SMALL_SPACING)
    assert not np.array_equal(labels_a.array, labels_b.array)
    assert not np.array_equal(image_a.array, image_b.array)
    # Different anatomy, not just different noise: the organs themselves moved or resized.
    assert np.mean(labels_a.array != labels_b.array) > 0.005


def test_default_grid_is_centred_with_identity_direction(ct: tuple[Volume, Volume]) -> None:
    image, labels = ct
    nx, ny, nz = DEFAULT_SIZE
    assert image.shape == labels.shape == (nz, ny, nx)
    assert image.same_grid(labels, tolerance=0.0)
    assert image.spacing == DEFAULT_SPACING
    assert image.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    centre = np.array(image.origin) + (np.array(DEFAULT_SIZE) - 1) / 2 * np.array(image.spacing)
    np.testing.assert_allclose(centre, 0.0, atol=1e-9)
    assert image.modality == labels.modality == "CT"
    assert labels.array.dtype == np.uint8
    assert image.array.dtype in (np.int16, np.float32)
    assert set(np.unique(labels.array)) == {0, *LABEL.values()}
    # Air around the body, body in the middle.
    assert image.array[:, 0, 0].max() < -900
    assert image.array[nz // 2, ny // 2, nx // 2] > -300


def test_mr_is_non_negative_float(mr: tuple[Volume, Volume]) -> None:
    image, labels = mr
    assert image.modality == labels.modality == "MR"
    assert image.array.dtype == np.float32
    assert image.array.min() >= 0
    assert np.isfinite(image.array).all()
    # Background near zero, fat in the hundreds.
    assert np.median(image.array[:, :4, :4]) < 0.1 * fat_level(image, labels)


@pytest.mark.parametrize("modality", ["ct", "Mr", "MRI", " CT "])
def test_modality_is_case_insensitive(modality: str) -> None:
    image, labels = generate_phantom(modality, 0, SMALL, SMALL_SPACING)
    expected = "CT" if "C" in modality.upper() else "MR"
    assert image.modality == labels.modality == expected


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------

PLAUSIBLE_ML = {
    "liver": (1000, 2500),
    "spleen": (80, 450),
    "right kidney": (80, 300),
    "left kidney": (80, 300),
    "aorta": (30, 200),  # the part inside a 24 cm field of view
    "vertebral bodies": (100, 450),
    "pancreas": (40, 150),
    "inferior vena cava": (30, 200),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_structure_present_with_plausible_volume(seed: int, ct: tuple[Volume, Volume]) -> None:
    labels = ct[1] if seed == 0 else generate_phantom("CT", seed)[1]
    for name, (low, high) in PLAUSIBLE_ML.items():
        ml = volume_ml(labels, LABEL[name])
        assert low <= ml <= high, f"{name}: {ml:.0f} ml outside {low}-{high} ml (seed {seed})"
    # Labels are anatomy, identical between modalities of the same seed.
    assert np.array_equal(labels.array, generate_phantom("MR", seed)[1].array)


@pytest.mark.parametrize("seed", [0, 3, 4])
def test_structures_lie_on_their_anatomical_sides(seed: int, ct: tuple[Volume, Volume]) -> None:
    labels = ct[1] if seed == 0 else generate_phantom("CT", seed)[1]
    c = {name: centroid_mm(labels, value) for name, value in LABEL.items()}
    # LPS: +x is the patient's left, +y posterior, +z superior.
    assert c["liver"][0] < -20
    assert c["spleen"][0] > 40
    assert c["right kidney"][0] < -30
    assert c["left kidney"][0] > 30
    assert c["left kidney"][2] > c["right kidney"][2], "the left kidney sits higher"
    assert c["aorta"][0] > 0 > c["inferior vena cava"][0]
    assert abs(c["vertebral bodies"][0]) < 15
    assert c["vertebral bodies"][1] > c["aorta"][1] + 15, "vertebrae lie behind the aorta"
    assert c["vertebral bodies"][1] > c["inferior vena cava"][1] + 15
    assert c["pancreas"][1] < c["aorta"][1], "the pancreas lies in front of the aorta"
    for kidney in ("right kidney", "left kidney"):
        assert c[kidney][1] > c["aorta"][1], "kidneys are retroperitoneal, behind the great vessels"
    assert c["liver"][2] > c["right kidney"][2]
    assert c["spleen"][2] > c["left kidney"][2]


def test_vertebrae_are_separated_by_discs_and_behind_the_aorta_slice_by_slice(
    ct: tuple[Volume, Volume],
) -> None:
    labels = ct[1].array
    vertebra = labels == LABEL["vertebral bodies"]
    per_slice = vertebra.sum(axis=(1, 2))
    # A stack of bodies with gaps: some slices hold no vertebra while the slices around them do.
    inside = np.nonzero(per_slice)[0]
    gaps = [z for z in range(inside.min(), inside.max()) if per_slice[z] == 0]
    assert len(gaps) >= 3
    for z in range(labels.shape[0]):
        aorta = labels[z] == LABEL["aorta"]
        if aorta.any() and vertebra[z].any():
            assert np.nonzero(vertebra[z])[0].mean() > np.nonzero(aorta)[0].mean()


def test_anisotropic_spacing_samples_the_same_anatomy(ct: tuple[Volume, Volume]) -> None:
    labels = ct[1]
    # Same 384 x 384 x 240 mm field of view, sampled at 1.5 x 1.5 x 4 mm.
    _, fine = generate_phantom("CT", 0, (256, 256, 60), (1.5, 1.5, 4.0))
    for name in ("liver", "spleen", "right kidney", "pancreas"):
        coarse_ml, fine_ml = volume_ml(labels, LABEL[name]), volume_ml(fine, LABEL[name])
        assert abs(fine_ml - coarse_ml) <= 0.05 * coarse_ml, f"{name}: {coarse_ml:.0f} vs {fine_ml:.0f} ml"
        np.testing.assert_allclose(centroid_mm(fine, LABEL[name]), centroid_mm(labels, LABEL[name]), atol=3.0)


def test_smaller_field_of_view_crops_the_same_body(ct: tuple[Volume, Volume]) -> None:
    labels = ct[1].array
    # Half the voxels per axis at the same spacing: the voxel centres are the central ones of the default.
    image, small = generate_phantom("CT", 0, (64, 64, 40), DEFAULT_SPACING)
    nz, ny, nx = labels.shape
    crop = labels[nz // 4 : nz // 4 + 40, ny // 4 : ny // 4 + 64, nx // 4 : nx // 4 + 64]
    assert np.mean(small.array == crop) > 0.999
    # The 192 mm field of view is narrower than the body: no air column at the left and right edges.
    assert image.array[20, 32, 0] > -500
    assert image.array[20, 32, -1] > -500


# --------------------------------------------------------------------------------------------
# Contrast
# --------------------------------------------------------------------------------------------

CT_HU = {
    "liver": (85, 140),
    "spleen": (90, 150),
    "right kidney": (120, 200),
    "left kidney": (120, 200),
    "aorta": (140, 230),
    "inferior vena cava": (105, 175),
    "pancreas": (65, 120),
    "vertebral bodies": (220, 500),
}


def test_ct_organs_have_portal_venous_hounsfield_units(ct: tuple[Volume, Volume]) -> None:
    image, labels = ct
    for name, (low, high) in CT_HU.items():
        mean = organ_mean(image, labels, LABEL[name])
        assert low <= mean <= high, f"{name}: mean {mean:.0f} HU outside {low}-{high}"
    assert -130 <= fat_level(image, labels) <= -70
    # Noise of roughly 15-25 HU, measured inside the liver where the tissue itself is uniform.
    liver = image.array[interior(interior(labels.array == LABEL["liver"]))].astype(np.float64)
    assert 5 < liver.std() < 30


def test_mr_contrast_differs_from_ct(ct: tuple[Volume, Volume], mr: tuple[Volume, Volume]) -> None:
    ct_mean = {name: organ_mean(ct[0], ct[1], value) for name, value in LABEL.items()}
    mr_mean = {name: organ_mean(mr[0], mr[1], value) for name, value in LABEL.items()}
    ct_fat, mr_fat = fat_level(*ct), fat_level(*mr)
    # Fat: darkest soft tissue on CT, brightest on T1-weighted MR.
    assert ct_fat < ct_mean["liver"]
    assert mr_fat > mr_mean["liver"]
    assert mr_mean["liver"] > mr_mean["spleen"]
    assert mr_mean["liver"] > mr_mean["right kidney"]
    assert mr_mean["liver"] > mr_mean["left kidney"]
    # Flowing blood: brightest soft tissue on contrast CT, a flow void on MR.
    assert ct_mean["aorta"] > ct_mean["liver"]
    assert mr_mean["aorta"] < 0.5 * mr_mean["liver"]
    assert mr_mean["inferior vena cava"] < 0.5 * mr_mean["liver"]
    assert ct_mean["vertebral bodies"] == max(ct_mean.values())


def test_mr_bias_field_is_smooth_and_switchable() -> None:
    flat, labels = generate_phantom("MR", 0, SMALL, SMALL_SPACING, DomainShift(noise_scale=0.0, bias_strength=0.0))
    biased, _ = generate_phantom("MR", 0, SMALL, SMALL_SPACING, DomainShift(noise_scale=0.0))
    liver = flat.array[interior(labels.array == LABEL["liver"])]
    assert liver.std() / liver.mean() < 0.02  # uniform tissue without bias or noise
    # Without noise the ratio of the two images is the bias field itself.
    body = flat.array > 100
    ratio = np.ones_like(flat.array)
    ratio[body] = biased.array[body] / flat.array[body]
    assert 1.2 < ratio[body].max() / ratio[body].min() < 2.5
    for axis in range(3):
        step = np.abs(np.diff(ratio, axis=axis))
        both = np.diff(body.astype(np.int8), axis=axis) == 0
        assert step[both & np.delete(body, 0, axis=axis)].max() < 0.05  # smooth, voxel to voxel


# --------------------------------------------------------------------------------------------
# Domain shift
# --------------------------------------------------------------------------------------------


def test_domain_shift_changes_appearance_not_anatomy() -> None:
    base_image, base_labels = generate_phantom("CT", 3, SMALL, SMALL_SPACING, DomainShift(noise_scale=0.0))
    shift = DomainShift(contrast_scale=0.5, intensity_offset=100.0, noise_scale=0.0)
    image, labels = generate_phantom("CT", 3, SMALL, SMALL_SPACING, shift)
    assert np.array_equal(labels.array, base_labels.array)
    base_liver = organ_mean(base_image, base_labels, LABEL["liver"])
    base_fat = fat_level(base_image, base_labels)
    liver, fat = organ_mean(image, labels, LABEL["liver"]), fat_level(image, labels)
    assert fat == pytest.approx(base_fat + 100.0, abs=10.0)
    assert liver - fat == pytest.approx(0.5 * (base_liver - base_fat), rel=0.1)


def test_noise_scale_scales_the_noise() -> None:
    def liver_std(scale: float) -> float:
        image, labels = generate_phantom("CT", 5, SMALL, SMALL_SPACING, DomainShift(noise_scale=scale))
        return float(image.array[interior(labels.array == LABEL["liver"])].std())

    quiet, normal, loud = liver_std(0.0), liver_std(1.0), liver_std(3.0)
    assert quiet < 2.0
    assert loud == pytest.approx(3 * normal, rel=0.2)


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"modality": "PET"}, "modality"),
        ({"modality": "auto"}, "modality"),
        ({"modality": None}, "modality"),
        ({"size": (64, 64)}, "size"),
        ({"size": (64, 0, 64)}, "size"),
        ({"size": (64, 64.5, 64)}, "size"),
        ({"size": "abc"}, "size"),
        ({"size": 64}, "size"),
        ({"spacing": (1.0, -1.0, 1.0)}, "spacing"),
        ({"spacing": (1.0, float("nan"), 1.0)}, "spacing"),
        ({"spacing": (1.0, 1.0)}, "spacing"),
        ({"spacing": (1.0, "1", 1.0)}, "spacing"),
        ({"size": (4096, 4096, 4096)}, "size"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"shift": "none"}, "shift"),
    ],
)
def test_bad_arguments_raise_invalid_input(kwargs: dict, word: str) -> None:
    arguments = {"modality": "CT", "seed": 0, "size": SMALL, "spacing": SMALL_SPACING, **kwargs}
    with pytest.raises(InvalidInputError) as error:
        generate_phantom(**arguments)
    assert word in error.value.problem
    assert error.value.fix


@pytest.mark.parametrize(
    "kwargs",
    [
        {"contrast_scale": 0.0},
        {"noise_scale": -1.0},
        {"bias_strength": -0.5},
        {"intensity_offset": float("inf")},
    ],
)
def test_bad_domain_shift_raises_invalid_input(kwargs: dict) -> None:
    with pytest.raises(InvalidInputError) as error:
        DomainShift(**kwargs)
    assert next(iter(kwargs)) in error.value.problem


def test_bad_dataset_count_raises_invalid_input(tmp_path) -> None:
    for count in (0, -3, 2.5):
        with pytest.raises(InvalidInputError, match="count"):
            write_phantom_dataset(tmp_path / "d", "CT", count)
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------------------------
# Datasets on disk
# --------------------------------------------------------------------------------------------


def test_write_dataset_writes_readable_matching_pairs(tmp_path) -> None:
    calls: list[tuple[float, str]] = []
    pairs = write_phantom_dataset(
        tmp_path / "mr",
        "mri",
        2,
        seed=4,
        size=SMALL,
        spacing=SMALL_SPACING,
        progress=lambda fraction, message: calls.append((fraction, message)),
    )
    assert [(p[0].name, p[1].name) for p in pairs] == [("case_000.nii.gz",) * 2, ("case_001.nii.gz",) * 2]
    for image_path, label_path in pairs:
        assert image_path.parent.name == "images"
        assert label_path.parent.name == "labels"
        image, labels = read_volume(image_path), read_volume(label_path)
        assert image.same_grid(labels)
        assert image.shape == (SMALL[2], SMALL[1], SMALL[0])
        np.testing.assert_allclose(image.spacing, SMALL_SPACING)
        assert labels.array.dtype == np.uint8
        assert set(np.unique(labels.array)) <= {0, *LABEL.values()}
    # The written case is the phantom of its documented seed.
    first_image, first_labels = generate_phantom("MR", 4 * 100003, SMALL, SMALL_SPACING)
    assert np.array_equal(read_volume(pairs[0][1]).array, first_labels.array)
    np.testing.assert_allclose(read_volume(pairs[0][0]).array, first_image.array, rtol=1e-6)
    assert not np.array_equal(read_volume(pairs[0][1]).array, read_volume(pairs[1][1]).array)

    description = json.loads((tmp_path / "mr" / "dataset.json").read_text(encoding="utf-8"))
    assert description["modality"] == "MR"
    assert description["count"] == 2
    assert description["seed"] == 4
    assert description["size"] == list(SMALL)
    assert description["spacing"] == list(SMALL_SPACING)
    assert description["labels"] == {str(s.value): s.name for s in ABDOMEN_STRUCTURES}
    assert [c["image"] for c in description["cases"]] == ["images/case_000.nii.gz", "images/case_001.nii.gz"]

    fractions = [fraction for fraction, _ in calls]
    assert fractions == sorted(fractions)
    assert fractions[0] == 0.0
    assert fractions[-1] == 1.0
    assert all(isinstance(message, str) and message for _, message in calls)
    assert not list(tmp_path.rglob(".partial-*")), "no temporary files left behind"


def test_datasets_with_different_seeds_share_no_case(tmp_path) -> None:
    a = write_phantom_dataset(tmp_path / "a", "CT", 2, seed=0, size=SMALL, spacing=SMALL_SPACING)
    b = write_phantom_dataset(tmp_path / "b", "CT", 2, seed=1, size=SMALL, spacing=SMALL_SPACING)
    first = [read_volume(labels).array for _, labels in a]
    second = [read_volume(labels).array for _, labels in b]
    for x in first:
        for y in second:
            assert not np.array_equal(x, y)


def test_progress_can_cancel_a_dataset(tmp_path) -> None:
    write_phantom_dataset(tmp_path / "c", "CT", 1, size=SMALL, spacing=SMALL_SPACING)
    assert (tmp_path / "c" / "dataset.json").exists()

    def progress(fraction: float, message: str) -> None:
        if fraction > 0:
            raise CancelledError

    with pytest.raises(CancelledError):
        write_phantom_dataset(tmp_path / "c", "CT", 3, seed=9, size=SMALL, spacing=SMALL_SPACING, progress=progress)
    # One whole new pair, and no description claiming a complete dataset.
    written = sorted(p.relative_to(tmp_path / "c").as_posix() for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert written == ["images/case_000.nii.gz", "labels/case_000.nii.gz"]
