"""Fine-tuning from user annotations: recovers a domain shift, keeps unannotated structures,
writes a new version linked to its parent, resumes, and leaves nothing behind when cancelled."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import NUM_CLASSES, TINY_CT, make_bundle

from MedKDSegmentLib.engine.bundle import BUNDLED_MODELS, load_bundle, save_bundle
from MedKDSegmentLib.engine.cli import main as medkd
from MedKDSegmentLib.engine.data import Case
from MedKDSegmentLib.engine.errors import BundleError, CancelledError, InvalidInputError
from MedKDSegmentLib.engine.finetune import (
    AnnotatedCase,
    FineTuneConfig,
    annotated_case,
    default_version_path,
    delete_user_model,
    fine_tune,
    match_segment_names,
    merged_targets,
    model_lineage,
    model_versions,
    predict_labels,
)
from MedKDSegmentLib.engine.labels import ABDOMEN_STRUCTURES, label_names
from MedKDSegmentLib.engine.metrics import dice_per_label
from MedKDSegmentLib.engine.networks import build_network
from MedKDSegmentLib.engine.phantom import DomainShift, generate_phantom
from MedKDSegmentLib.engine.profiles import labels_to_model_grid, to_model_grid
from MedKDSegmentLib.engine.runs import parse_epoch_loss
from MedKDSegmentLib.engine.segfile import write_seg_nrrd
from MedKDSegmentLib.engine.training import TrainingConfig, checkpoint_dir_for, fit, recalibrate_batch_norm
from MedKDSegmentLib.engine.volume import Volume, write_volume

# Phantoms straight on the 8 mm model grid of TINY_CT: every step is cheap.
SIZE, SPACING = (48, 42, 30), (8.0, 8.0, 8.0)
SHIFT = DomainShift(intensity_offset=100.0, noise_scale=1.5)  # another scanner: +100 HU, 1.5x noise
ORIGINAL = DomainShift()
ARCHITECTURE = {"name": "FastStudent", "kwargs": {"in_channels": 1, "features": [8, 16, 16]}}
ALL = frozenset(range(1, NUM_CLASSES))
CPU = torch.device("cpu")
QUICK = dict(patch_size=(16, 24, 24), device="cpu")


def phantom(seed: int, shift: DomainShift = ORIGINAL):
    return generate_phantom("CT", seed, SIZE, SPACING, shift)


def model_grid_case(seed: int, shift: DomainShift = ORIGINAL) -> Case:
    image, labels = phantom(seed, shift)
    array, grid = to_model_grid(image, TINY_CT)
    return Case(str(seed), array, labels_to_model_grid(labels, grid))


def dice(bundle, seed: int, shift: DomainShift = ORIGINAL) -> dict[int, float]:
    case = model_grid_case(seed, shift)
    prediction = predict_labels(bundle.load_network(), case.image, CPU)
    return dice_per_label(prediction, case.labels, sorted(ALL))


def mean_dice(bundle, seed: int, shift: DomainShift = ORIGINAL) -> float:
    return float(np.nanmean(list(dice(bundle, seed, shift).values())))


def tree_digest(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".partial-") or p.name.endswith(".checkpoint"))


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A small student trained on the original domain (about 10 s on one core)."""
    folder = tmp_path_factory.mktemp("parent")
    cases = [model_grid_case(seed) for seed in (11, 12, 13)]
    torch.manual_seed(0)
    network = build_network(ARCHITECTURE, NUM_CLASSES)
    config = TrainingConfig(epochs=10, steps_per_epoch=20, patch_size=(16, 32, 32), learning_rate=1e-2, device="cpu")
    fit(network, NUM_CLASSES, cases, config, folder / "checkpoint")
    recalibrate_batch_norm(network, cases, CPU)
    return save_bundle(
        folder / "phantom-student",
        network,
        name="phantom-student",
        role="student",
        architecture=ARCHITECTURE,
        profile=TINY_CT,
        structures=ABDOMEN_STRUCTURES,
        method={"name": "supervised"},
    )


# --------------------------------------------------------------------------------------------
# Names, annotated cases, the partial-label rule
# --------------------------------------------------------------------------------------------


def test_segment_names_match_ignoring_case_spaces_and_underscores():
    labels = label_names()
    match = match_segment_names(["Liver", "Right_Kidney", "left-kidney", "IVC", "Tumour", "Bowel"], labels)
    assert match.matched == {"Liver": 1, "Right_Kidney": 3, "left-kidney": 4}
    assert match.unknown == ["IVC", "Tumour", "Bowel"]
    with pytest.raises(InvalidInputError) as error:
        match.raise_if_unknown()
    message = str(error.value)
    assert "'IVC'" in message and "'inferior vena cava'" in message  # names the problem and the model's labels
    assert "--map" in error.value.fix and "--skip" in error.value.fix

    mapped = match_segment_names(
        ["Liver", "IVC", "Tumour", "bowel"], labels, {"IVC": "Inferior_Vena_Cava", "tumour": None, "Bowel": 7, "x": 1}
    )
    assert mapped.matched == {"Liver": 1, "IVC": 8, "bowel": 7}  # mapping by name or value; unused keys ignored
    assert mapped.skipped == ["Tumour"] and mapped.unknown == []
    mapped.raise_if_unknown()
    assert match_segment_names(["Liver"], labels, {"Liver": "spleen"}).matched == {"Liver": 2}  # the mapping wins
    with pytest.raises(InvalidInputError, match="'kidney' is not a label"):
        match_segment_names(["Tumour"], labels, {"Tumour": "kidney"})


def test_annotated_case_translates_segment_values_and_checks_them():
    image, labels = phantom(5)
    segmentation = labels.with_array(np.where(labels.array == 1, 7, np.where(labels.array == 2, 3, 0)).astype(np.uint8))
    case = annotated_case("c", image, segmentation, label_names(), segment_names={7: "LIVER", 3: "Spleen"})
    assert case.annotated == {1, 2}
    assert np.array_equal(case.labels.array, np.where(np.isin(labels.array, [1, 2]), labels.array, 0))

    # A Slicer segmentation cropped to its extent lies on another grid: resampled onto the image.
    box = (slice(5, 25), slice(10, 35), slice(8, 40))
    origin = tuple(o + s.start * d for o, s, d in zip(image.origin, box[::-1], image.spacing))
    cropped = Volume(labels.array[box].copy(), labels.spacing, origin, labels.direction)
    case = annotated_case("c", image, cropped, label_names())
    assert np.array_equal(case.labels.array[box], labels.array[box]) and case.labels.array.sum() > 0
    # The same labels moved half the image away (another scan's segmentation): most would be cut off.
    shifted = tuple(o + 0.5 * n * d for o, n, d in zip(image.origin, image.shape[::-1], image.spacing))
    with pytest.raises(InvalidInputError, match="% of the painted labels of case 'c' lie outside its image"):
        annotated_case("c", image, Volume(labels.array.copy(), labels.spacing, shifted, labels.direction),
                       label_names())

    only_liver = annotated_case("c", image, labels, label_names(), annotated=["liver"])
    assert only_liver.annotated == {1} and set(np.unique(only_liver.labels.array)) == {0, 1}
    with pytest.raises(InvalidInputError, match="values \\[12\\]"):
        annotated_case(
            "c", image, labels.with_array(np.where(labels.array == 1, 12, 0).astype(np.uint8)), label_names()
        )
    with pytest.raises(InvalidInputError, match="no annotated structure"):
        annotated_case("c", image, labels.with_array(np.zeros_like(labels.array)), label_names())
    with pytest.raises(InvalidInputError, match="'Tumour'"):
        annotated_case("c", image, segmentation, label_names(), segment_names={7: "Liver", 3: "Tumour"})


def test_merged_targets_take_unannotated_structures_from_the_parent():
    user = np.array([1, 1, 0, 0, 0, 0], np.uint8)  # the user painted liver (1) only
    parent = np.array([1, 2, 1, 2, 5, 0], np.uint8)
    merged = merged_targets(user, {1}, parent)
    # painted liver kept; unpainted voxels: parent's spleen/aorta kept, parent's liver -> background
    assert merged.tolist() == [1, 1, 0, 2, 5, 0]


def test_progress_messages_feed_a_loss_curve():
    assert parse_epoch_loss("epoch 3/15 loss 0.4321") == (3, 15, 0.4321)
    assert parse_epoch_loss("preparing case a") is None


# --------------------------------------------------------------------------------------------
# Training behaviour (a trained tiny parent)
# --------------------------------------------------------------------------------------------


def test_fine_tuning_recovers_a_domain_shift_and_writes_a_linked_version(parent, tmp_path):
    parent_digest = tree_digest(parent.path)
    original_before, shifted_before = mean_dice(parent, 22), mean_dice(parent, 22, SHIFT)
    assert shifted_before < original_before - 0.05  # the shift hurts the parent

    image, labels = phantom(31, SHIFT)
    held = phantom(21, SHIFT)
    config = FineTuneConfig(epochs=4, steps_per_epoch=20, learning_rate=3e-3, **QUICK)
    messages = []
    result = fine_tune(
        parent,
        [AnnotatedCase("shifted-31", image, labels, ALL)],
        tmp_path / "v2",
        config,
        validation=[AnnotatedCase("shifted-21", *held, ALL)],
        progress=lambda fraction, message: messages.append(message),
    )
    # Held-out before/after as reported, and on another shifted subject measured here.
    assert result.mean_after > result.mean_before + 0.05, (result.before, result.after)
    assert mean_dice(result.bundle, 22, SHIFT) > shifted_before + 0.05
    assert mean_dice(result.bundle, 22) > original_before - 0.05  # what it knew is kept
    assert set(result.before) == set(result.after) and "liver" in result.before
    assert result.worse == [n for n in result.before if result.after[n] < result.before[n] - 0.01]
    assert "shifted-21" in result.held_out and result.seconds_per_epoch > 0
    assert any(parse_epoch_loss(m) for m in messages)

    # A new version: parent linked by checksum, version bumped, parent untouched, nothing left over.
    bundle = result.bundle
    assert bundle.info["parent"]["weights_sha256"] == parent.weights_sha256
    assert bundle.metadata["version"] == "1.1.0" and bundle.role == "student"
    assert bundle.info["method"]["name"] == "fine_tune" and bundle.info["method"]["cases"] == ["shifted-31"]
    assert bundle.info["metrics"]["after"] == pytest.approx(result.after)
    assert tree_digest(parent.path) == parent_digest
    assert leftovers(tmp_path) == []
    assert [item["name"] for item in model_lineage(bundle, [parent.path.parent])] == ["v2", "phantom-student"]


def test_partial_labels_keep_unannotated_structures(parent, tmp_path):
    image, labels = phantom(31)
    liver_only = labels.with_array((labels.array == 1).astype(np.uint8))
    validation = [AnnotatedCase("held", *phantom(21), ALL)]
    config = FineTuneConfig(epochs=4, steps_per_epoch=20, learning_rate=3e-3, **QUICK)

    # The merged targets hold the parent's other structures, not background.
    array, grid = to_model_grid(image, TINY_CT)
    user = labels_to_model_grid(liver_only, grid)
    targets = merged_targets(user, {1}, predict_labels(parent.load_network(), array, CPU))
    assert {2, 3, 4} <= set(np.unique(targets).tolist())
    assert np.array_equal(targets == 1, user == 1)

    partial = fine_tune(
        parent, [AnnotatedCase("c", image, liver_only, frozenset({1}))], tmp_path / "p", config, validation=validation
    )
    # The naive reading of the same paint: every other structure taught as background.
    naive = fine_tune(
        parent, [AnnotatedCase("c", image, liver_only, ALL)], tmp_path / "n", config, validation=validation
    )
    assert partial.bundle.info["method"]["annotated"] == ["liver"]
    kept = [n for n in ("spleen", "right kidney", "left kidney") if partial.before[n] > 0.5]
    assert kept, partial.before
    for name in kept:
        assert partial.after[name] > partial.before[name] - 0.1, (name, partial.before, partial.after)
    partial_mean = np.mean([partial.after[n] for n in kept])
    naive_mean = np.mean([naive.after[n] for n in kept])
    assert naive_mean < partial_mean - 0.15, (partial.after, naive.after)


# --------------------------------------------------------------------------------------------
# Resume, cancel, versions, deletion (an untrained tiny parent: the mechanics only)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def small_case():
    image, labels = phantom(41)
    return AnnotatedCase("c41", image, labels, ALL)


def test_a_cancelled_run_resumes_into_a_bundle(tmp_path, small_case):
    parent = make_bundle(tmp_path / "models" / "tiny")
    output = tmp_path / "models" / "tiny-v2"
    config = FineTuneConfig(epochs=3, steps_per_epoch=2, **QUICK)
    messages = []
    with pytest.raises(CancelledError):
        fine_tune(
            parent,
            [small_case],
            output,
            config,
            progress=lambda fraction, message: messages.append(message),
            cancel=lambda: any(m.startswith("epoch 2/") for m in messages),
        )
    assert not output.exists() and not list(output.parent.glob(".partial-*"))
    assert (checkpoint_dir_for(output) / "checkpoint.pt").exists()  # kept so that the run can resume
    assert torch.load(checkpoint_dir_for(output) / "checkpoint.pt", weights_only=True)["epoch"] == 1

    with pytest.raises(InvalidInputError, match="resume"):
        fine_tune(parent, [small_case], output, config)
    other = FineTuneConfig(epochs=3, steps_per_epoch=2, learning_rate=5e-3, **QUICK)
    with pytest.raises(InvalidInputError, match="another fine-tuning run"):
        fine_tune(parent, [small_case], output, other, resume=True)

    result = fine_tune(parent, [small_case], output, config, resume=True)
    assert len(result.history.epoch_loss) == 3
    assert result.bundle.path == output and not checkpoint_dir_for(output).exists()
    assert "slab" in result.held_out  # a single case: a slab of it is held out


def test_cancel_leaves_nothing_behind(tmp_path, small_case):
    parent = make_bundle(tmp_path / "tiny")
    output = tmp_path / "tiny-v2"
    config = FineTuneConfig(epochs=2, steps_per_epoch=3, **QUICK)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CancelledError):  # while preparing the cases
        fine_tune(parent, [small_case], output, config, cancel=lambda: True)
    messages = []
    with pytest.raises(CancelledError):  # during the first epoch, before any checkpoint
        fine_tune(
            parent,
            [small_case],
            output,
            config,
            progress=lambda fraction, message: messages.append(message),
            cancel=lambda: any(m.startswith("epoch 1/") for m in messages),
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_versions_lineage_and_deletion(tmp_path, small_case):
    bundled = tmp_path / "bundled"
    parent = make_bundle(bundled / "tiny")
    users = tmp_path / "user"
    assert default_version_path(parent, users) == users / "tiny-v2"
    config = FineTuneConfig(epochs=1, steps_per_epoch=1, **QUICK)
    first = fine_tune(parent, [small_case], default_version_path(parent, users), config).bundle
    second = fine_tune(parent, [small_case], default_version_path(parent, users), config).bundle
    grandchild = fine_tune(first, [small_case], default_version_path(first, users), config).bundle
    assert (first.name, second.name, grandchild.name) == ("tiny-v2", "tiny-v3", "tiny-v4")
    # Versions of one family never repeat: the next free minor version each time.
    assert [b.metadata["version"] for b in (first, second, grandchild)] == ["1.1.0", "1.2.0", "1.3.0"]
    lineage = model_lineage(grandchild, [bundled])
    assert [item["name"] for item in lineage] == ["tiny-v4", "tiny-v2", "tiny"]
    assert lineage[1]["weights_sha256"] == grandchild.info["parent"]["weights_sha256"]

    rows = {row["name"]: row for row in model_versions(users, bundled_dir=bundled)}
    assert rows["tiny"]["bundled"] and not rows["tiny"]["deletable"]
    assert rows["tiny-v4"]["parent"] == "tiny-v2 1.1.0" and rows["tiny-v4"]["deletable"]

    with pytest.raises(BundleError, match="bundled"):
        delete_user_model(parent.path, bundled)
    with pytest.raises(BundleError, match="bundled"):
        delete_user_model(BUNDLED_MODELS / "phantom-abdomen-ct-student")
    assert parent.path.exists() and (BUNDLED_MODELS / "phantom-abdomen-ct-student").exists()
    (users / "notes").mkdir()
    with pytest.raises(BundleError, match="not a MedKDSegment model bundle"):
        delete_user_model(users / "notes", bundled)
    assert (users / "notes").exists()

    warnings = delete_user_model(first.path, bundled)
    assert any("tiny-v4" in w for w in warnings)
    assert not first.path.exists() and not list(users.glob(".partial-*"))
    assert second.path.exists() and grandchild.path.exists()


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def test_cli_finetune_and_models(tmp_path, capsys):
    for command in (["finetune", "--help"], ["models", "--help"]):
        with pytest.raises(SystemExit) as done:
            medkd(command)
        assert done.value.code == 0 and "usage: medkd" in capsys.readouterr().out
    parent = make_bundle(tmp_path / "tiny")
    image, labels = phantom(41)
    image_path = write_volume(image, tmp_path / "case.nii.gz")
    # Slicer-style segment values and names: 1 "Spleen", 2 "LIVER", 3 "Tumour" (not a model label).
    values = np.select([labels.array == 2, labels.array == 1, labels.array == 6], [1, 2, 3], 0).astype(np.uint8)
    seg_path = write_seg_nrrd(
        labels.with_array(values), tmp_path / "case.seg.nrrd", {1: "Spleen", 2: "LIVER", 3: "Tumour"}
    )
    output = tmp_path / "tiny-v2"
    base = ["--quiet", "finetune", "--model", parent.path, "--image", image_path, "--labels", seg_path]
    base = [str(a) for a in base] + ["--output", str(output), "--epochs", "1", "--steps-per-epoch", "2"]
    base += ["--patch-size", "16", "24", "24", "--device", "cpu"]

    assert medkd(base) == 2  # 'Tumour' is no label of the model
    assert "'Tumour'" in capsys.readouterr().err
    assert medkd(base + ["--map", "Tumour=kidney"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "fix:" in err
    assert medkd(base + ["--map", "Tumour"]) == 2
    assert "NAME=LABEL" in capsys.readouterr().err
    assert not output.exists() and leftovers(tmp_path) == []

    assert medkd(base + ["--skip", "Tumour"]) == 0
    out = capsys.readouterr().out
    assert "tiny-v2 1.1.0" in out and "parent" in out and "mean" in out
    assert output.exists()
    assert load_bundle(output).info["method"]["annotated"] == ["liver", "spleen"]

    assert medkd(["models", "--folder", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "tiny-v2" in listing and "tiny 1.0.0" in listing and "phantom-abdomen-ct-student" in listing
    assert medkd(["models", "delete", str(BUNDLED_MODELS / "phantom-abdomen-ct-student")]) == 2
    assert medkd(["models", "delete", str(output)]) == 0
    assert not output.exists()


def test_finetune_refuses_existing_output_and_wrong_modality(tmp_path, small_case):
    parent = make_bundle(tmp_path / "tiny")
    with pytest.raises(InvalidInputError, match="never overwritten"):
        fine_tune(parent, [small_case], parent.path)
    mr_image, mr_labels = generate_phantom("MR", 3, SIZE, SPACING)
    with pytest.raises(InvalidInputError, match="is MR but model"):
        fine_tune(parent, [AnnotatedCase("mr", mr_image, mr_labels, ALL)], tmp_path / "x")
    assert not (tmp_path / "x").exists() and leftovers(tmp_path) == []


def test_segment_name_matching_imports_no_torch():
    # The module previews the matching in Slicer's own process, before any training job.
    import subprocess
    import sys

    code = ("import sys; import MedKDSegmentLib.engine.segment_names as n; "
            "m = n.match_segment_names(['Right_Kidney', 'tumour'], {3: 'right kidney'}); "
            "assert m.matched == {'Right_Kidney': 3} and m.unknown == ['tumour']; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    root = Path(__file__).resolve().parents[2] / "MedKDSegment"
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
