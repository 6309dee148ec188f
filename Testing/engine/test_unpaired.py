"""The unpaired CT + MR student (Dou et al. 2020): shared kernels, per-modality normalisation,
the prototype loss, a tiny training run, one bundle for both modalities, catalog and CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny import NUM_CLASSES, TINY_CT, TINY_MR, TINY_STUDENT, TINY_TEACHER, make_bundle

from MedKDSegmentLib import catalog
from MedKDSegmentLib.engine.bundle import load_bundle, save_bundle
from MedKDSegmentLib.engine.cli import main
from MedKDSegmentLib.engine.data import load_cases
from MedKDSegmentLib.engine.errors import BundleError, CancelledError, InvalidInputError
from MedKDSegmentLib.engine.inference import segment
from MedKDSegmentLib.engine.labels import ABDOMEN_STRUCTURES, label_names
from MedKDSegmentLib.engine.metrics import dice_per_label
from MedKDSegmentLib.engine.modality_norm import (
    ModalityNorm,
    current_modality,
    make_modality_specific,
    network_modalities,
    use_modality,
)
from MedKDSegmentLib.engine.networks import build_network
from MedKDSegmentLib.engine.phantom import generate_phantom, write_phantom_dataset
from MedKDSegmentLib.engine.prediction import predict_scores
from MedKDSegmentLib.engine.profiles import to_model_grid
from MedKDSegmentLib.engine.training import TrainingConfig, checkpoint_dir_for, seed_everything
from MedKDSegmentLib.engine.unpaired import PrototypeKL, _modality_terms, distill_unpaired, train_unpaired

SIZE, SPACING = (64, 56, 40), (6.0, 6.0, 6.0)
PROFILES = {"CT": TINY_CT, "MR": TINY_MR}
FAST = dict(batch_size=2, patch_size=(24, 24, 24), device="cpu", learning_rate=1e-2, validation_fraction=0.25)
SMALL = FAST | dict(patch_size=(16, 16, 16))
STRUCTURES = list(range(1, NUM_CLASSES))


def chance_dice(labels: np.ndarray) -> float:
    """Mean foreground Dice of a prediction drawn at random with the true class frequencies."""
    shuffled = np.random.default_rng(0).permutation(labels.ravel()).reshape(labels.shape)
    return float(np.nanmean(list(dice_per_label(shuffled, labels, STRUCTURES).values())))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("unpaired")
    # Different seeds: CT and MR come from different (unpaired) subjects.
    write_phantom_dataset(root / "ct", "CT", 4, seed=7, size=SIZE, spacing=SPACING)
    write_phantom_dataset(root / "mr", "MR", 4, seed=8, size=SIZE, spacing=SPACING)
    return root


@pytest.fixture(scope="module")
def student(folders):
    config = TrainingConfig(epochs=6, steps_per_epoch=12, **FAST)
    return distill_unpaired(
        folders / "ct", folders / "mr", folders / "student", config=config, architecture=TINY_STUDENT, profiles=PROFILES
    )


@pytest.fixture(scope="module")
def held_out():
    return {m: generate_phantom(m, seed=424242, size=SIZE, spacing=SPACING) for m in ("CT", "MR")}


# --- the network side ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", [TINY_STUDENT, TINY_TEACHER])
def test_every_norm_becomes_per_modality_while_kernels_stay_the_same_tensors(architecture):
    network = build_network(architecture, NUM_CLASSES)
    kernels = {name: p for name, p in network.named_parameters() if p.dim() > 1}
    pointers = {name: p.data_ptr() for name, p in kernels.items()}
    norms = sum(isinstance(m, (torch.nn.BatchNorm3d, torch.nn.InstanceNorm3d)) for m in network.modules())
    base_keys = set(network.state_dict())

    assert make_modality_specific(network) is network
    layers = [m for m in network.modules() if isinstance(m, ModalityNorm)]
    assert len(layers) == norms > 0
    assert network_modalities(network) == ("CT", "MR")
    after = dict(network.named_parameters())
    for name, parameter in kernels.items():
        assert after[name] is parameter and parameter.data_ptr() == pointers[name]
    # One copy of every convolution in the state dict; only normalisation entries are doubled.
    keys = set(network.state_dict())
    assert {k for k in keys if ".norms." not in k} == {k for k in base_keys if k in keys}
    assert len(keys) - len(base_keys) == len([k for k in keys if ".norms.1." in k])
    assert all(isinstance(k, str) for k in keys)

    # Each modality's pass reaches the same kernels and only its own normalisation layers.
    network.train()
    image = torch.randn(2, 1, 16, 16, 16)
    for modality, own, other in (("CT", 0, 1), ("MR", 1, 0)):
        network.zero_grad(set_to_none=True)
        with use_modality(network, modality):
            network(image).square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in kernels.values())
        affine = [layer.norms for layer in layers if any(True for _ in layer.norms[0].parameters())]
        for norms_ in affine:
            assert all(p.grad is not None for p in norms_[own].parameters())
            assert all(p.grad is None for p in norms_[other].parameters())

    with pytest.raises(ValueError, match="already modality-specific"):
        make_modality_specific(network)


def test_use_modality_sets_now_and_restores_as_a_context():
    network = make_modality_specific(build_network(TINY_STUDENT, NUM_CLASSES))
    assert current_modality(network) == "CT"
    use_modality(network, "mri")
    assert current_modality(network) == "MR"
    with use_modality(network, "CT"):
        assert current_modality(network) == "CT"
    assert current_modality(network) == "MR"
    only_mr = make_modality_specific(build_network(TINY_STUDENT, NUM_CLASSES), ("MR",))
    with pytest.raises(InvalidInputError, match="not for CT"):
        use_modality(only_mr, "CT")
    with pytest.raises(ValueError, match="no modality-specific"):
        use_modality(build_network(TINY_STUDENT, NUM_CLASSES), "CT")


# --- the prototype loss -------------------------------------------------------------------------------------


def _labelled_logits(seed: int, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 6, 6, 6, generator=generator)
    labels = torch.randint(0, classes, (2, 1, 6, 6, 6), generator=generator)
    return logits, labels


def test_prototype_kl_is_zero_for_identical_prototypes_symmetric_and_positive_otherwise():
    loss = PrototypeKL()
    assert loss.temperature == 2.0
    a, labels_a = _labelled_logits(0)
    b, labels_b = _labelled_logits(1)
    # Same per-class mean logits from different voxels and batches: zero.
    same = torch.zeros(1, 4, 4, 1, 1)
    same_labels = torch.arange(4).view(1, 1, 4, 1, 1)
    same[0, :, :, 0, 0] = torch.tensor([[3.0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [1, 1, 1, 5]]).T
    twice = torch.cat([same, same], dim=2)
    assert loss(same, same_labels, twice, torch.cat([same_labels, same_labels], dim=2)).item() == pytest.approx(0.0)
    forward, backward = loss(a, labels_a, b, labels_b), loss(b, labels_b, a, labels_a)
    assert forward.item() > 1e-4
    assert forward.item() == pytest.approx(backward.item(), rel=1e-6)
    # By hand: ½ (KL(p‖q) + KL(q‖p)) of the T = 2 softmaxed mean logits, averaged over the classes.
    by_hand = np.mean([_pair_kl(a, labels_a[:, 0] == k, b, labels_b[:, 0] == k) for k in range(4)])
    assert forward.item() == pytest.approx(by_hand, rel=1e-5)


def _pair_kl(a: torch.Tensor, mask_a: torch.Tensor, b: torch.Tensor, mask_b: torch.Tensor) -> float:
    p = torch.softmax(a.movedim(1, -1)[mask_a].mean(0) / 2, 0)
    q = torch.softmax(b.movedim(1, -1)[mask_b].mean(0) / 2, 0)
    return float(0.5 * ((p * (p / q).log()).sum() + (q * (q / p).log()).sum()))


def test_prototype_kl_skips_classes_missing_in_either_modality():
    loss = PrototypeKL()
    a, labels_a = _labelled_logits(2)
    b, labels_b = _labelled_logits(3)
    labels_b[labels_b == 3] = 0  # class 3 absent from the MR batch
    before = loss(a, labels_a, b, labels_b)
    changed = torch.where(labels_a == 3, a * 7.0 + 3.0, a)  # wildly different logits where class 3 is
    assert loss(changed, labels_a, b, labels_b).item() == pytest.approx(before.item(), rel=1e-6)
    # With class 3 present on both sides the same change matters.
    b_full, labels_full = _labelled_logits(3)
    assert loss(changed, labels_a, b_full, labels_full).item() != pytest.approx(
        loss(a, labels_a, b_full, labels_full).item(), rel=1e-3
    )
    # No class in common: zero, and still differentiable.
    a.requires_grad_(True)
    nothing = loss(a, torch.zeros_like(labels_a), b, torch.ones_like(labels_b))
    nothing.backward()
    assert nothing.item() == 0.0 and a.grad is not None


# --- training, bundle, inference ------------------------------------------------------------------------------


def test_training_learns_both_modalities_with_separate_statistics(student, held_out):
    metrics = student.info["metrics"]
    assert len(metrics["train_loss"]) == 6
    assert metrics["train_loss"][-1] < 0.7 * metrics["train_loss"][0]
    for modality in ("CT", "MR"):
        supervised = metrics["train_supervised"][modality]
        assert supervised[-1] < supervised[0]
    assert all(not math.isnan(v) and v >= 0 for v in metrics["train_prototype_kl"])
    assert set(metrics["validation_dice"]) == {"CT", "MR"}

    network = student.load_network()
    layers = [m for m in network.modules() if isinstance(m, ModalityNorm)]
    assert layers and all(len(layer.norms) == 2 for layer in layers)
    for layer in layers:  # trained (and recalibrated) on different intensities: different statistics
        ct, mr = layer.norms
        assert not torch.allclose(ct.running_mean, mr.running_mean, atol=1e-3)
        assert not torch.allclose(ct.running_var, mr.running_var, rtol=1e-2)
    assert any(not torch.allclose(layer.norms[0].weight, layer.norms[1].weight) for layer in layers)

    for modality, (image, truth) in held_out.items():
        labels = segment(image, student, "cpu").labels.array
        dice = dice_per_label(labels, truth.array, STRUCTURES)
        assert float(np.nanmean(list(dice.values()))) > chance_dice(truth.array) + 0.03, modality
        assert dice[1] > 0.4, modality  # the liver, the largest structure


def test_one_bundle_segments_ct_and_mr_each_with_its_own_normalisation(student, held_out):
    bundle = load_bundle(student.path)
    assert bundle.modality == "CT+MR" and bundle.modalities == ("CT", "MR") and bundle.modality_specific
    assert bundle.profile == TINY_CT  # the primary profile stays for older readers
    assert bundle.profile_for("mr") == TINY_MR
    metadata = json.loads((bundle.path / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["network_data_format"]["inputs"]["image"]["modality"] == "CT+MR"
    assert metadata["medkdsegment"]["format_version"] == 2  # older readers refuse it rather than mis-load it
    section = metadata["medkdsegment"]["modalities"]
    assert {m: section[m]["norm_index"] for m in section} == {"CT": 0, "MR": 1}
    assert section["MR"]["preprocessing"]["percentiles"] == [0.5, 99.5]

    shared = bundle.load_network()  # one network for both, as jobs.NetworkCache keeps it
    # MR first: the modality is chosen per call, so the later CT call is not stuck with MR's layers.
    mr = segment(held_out["MR"][0], bundle, "cpu", network=shared).labels.array
    ct = segment(held_out["CT"][0], bundle, "cpu", network=shared).labels.array
    assert np.array_equal(ct, segment(held_out["CT"][0], bundle, "cpu").labels.array)
    assert np.array_equal(mr, segment(held_out["MR"][0], bundle, "cpu").labels.array)
    # Modality missing from the volume: detected from the intensities, same result.
    unknown = held_out["MR"][0].with_array(held_out["MR"][0].array)
    unknown.modality = None
    assert np.array_equal(mr, segment(unknown, bundle, "cpu", network=shared).labels.array)

    for modality, wrong in (("CT", "MR"), ("MR", "CT")):
        image, _ = to_model_grid(held_out[modality][0], bundle.profile_for(modality))
        with use_modality(shared, modality):
            right_scores, _, _ = predict_scores(shared, image, torch.device("cpu"))
        with use_modality(shared, wrong):
            wrong_scores, _, _ = predict_scores(shared, image, torch.device("cpu"))
        assert np.abs(right_scores - wrong_scores).max() > 0.05


def test_volume_of_a_modality_the_bundle_lacks_is_refused(tmp_path, held_out):
    network = make_modality_specific(build_network(TINY_STUDENT, NUM_CLASSES), ("MR",))
    bundle = save_bundle(
        tmp_path / "mr-only",
        network,
        name="mr-only",
        role="student",
        architecture=TINY_STUDENT,
        profiles={"MR": TINY_MR},
        structures=ABDOMEN_STRUCTURES,
        method={"name": "untrained"},
    )
    assert bundle.modality == "MR" and bundle.modality_specific
    image = held_out["CT"][0].with_array(held_out["CT"][0].array)
    for modality in ("CT", None):  # given, or detected from Hounsfield-like intensities
        image.modality = modality
        with pytest.raises(InvalidInputError, match="The volume is CT but model 'mr-only' is for MR") as error:
            segment(image, bundle, "cpu")
        assert "Pick a CT model" in error.value.fix
    with pytest.raises(InvalidInputError, match="is for MR"):
        bundle.profile_for("CT")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update(PET=s.pop("MR")), "unknown modality 'PET'"),
        (lambda s: s["MR"].update(norm_index=0), "norm_index values must be 0..n-1"),
        (lambda s: s["MR"].update(preprocessing=dict(s["CT"]["preprocessing"])), "holds a CT profile"),
        (lambda s: s.clear(), "non-empty"),
    ],
)
def test_bad_modality_metadata_is_a_clear_bundle_error(tmp_path, edit, message):
    network = make_modality_specific(build_network(TINY_STUDENT, NUM_CLASSES))
    bundle = save_bundle(
        tmp_path / "dual", network, name="dual", role="student", architecture=TINY_STUDENT, profiles=PROFILES,
        structures=ABDOMEN_STRUCTURES, method={"name": "untrained"},
    )
    meta_file = bundle.path / "configs" / "metadata.json"
    metadata = json.loads(meta_file.read_text(encoding="utf-8"))
    edit(metadata["medkdsegment"]["modalities"])
    meta_file.write_text(json.dumps(metadata))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle.path)


def test_save_bundle_needs_one_profile_per_modality(tmp_path):
    network = make_modality_specific(build_network(TINY_STUDENT, NUM_CLASSES))
    common = dict(name="x", role="student", architecture=TINY_STUDENT, structures=ABDOMEN_STRUCTURES, method={})
    with pytest.raises(ValueError, match="needs exactly those profiles"):
        save_bundle(tmp_path / "x", network, profiles={"CT": TINY_CT}, **common)
    with pytest.raises(ValueError, match="needs exactly those profiles"):
        save_bundle(tmp_path / "x", network, profile=TINY_CT, **common)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".partial-*"))


def test_catalog_offers_a_ct_mr_model_for_both_modalities(student, tmp_path):
    ct_only = make_bundle(tmp_path / "ct-only")
    models = [catalog.read_model_info(ct_only.path, "user"), catalog.read_model_info(student.path, "user")]
    dual = models[1]
    assert dual.modality == "CT+MR" and dual.modalities == ("CT", "MR")
    assert dual.serves("ct") and dual.serves("MRI") and not models[0].serves("MR")
    assert catalog.default_model("MR", "student", models) == dual
    assert catalog.default_model("CT", "student", models) == models[0]  # order kept: first match wins
    assert catalog.default_model("CT", "student", models[1:]) == dual
    assert catalog.models_for("MR", models) == [dual]
    assert catalog.models_for("CT", models, role="student") == models
    listed = catalog.list_models([student.path.parent], include_bundled=False)
    assert [m.name for m in listed if m.serves("MR")] == [student.name]


# --- KD, resume, cancel, CLI ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cases(folders):
    return {m: load_cases(folders / m.lower(), PROFILES[m], label_names())[:2] for m in ("CT", "MR")}


def test_teachers_add_per_modality_kd_and_are_recorded(small_cases, tmp_path):
    ct_teacher = make_bundle(tmp_path / "ct-teacher", TINY_TEACHER, TINY_CT, "teacher", seed=1)
    mr_teacher = make_bundle(tmp_path / "mr-teacher", TINY_TEACHER, TINY_MR, "teacher", seed=2)
    config = TrainingConfig(epochs=1, steps_per_epoch=2, **SMALL)
    bundle = distill_unpaired(
        small_cases["CT"], small_cases["MR"], tmp_path / "s", ct_teacher, str(mr_teacher.path), config, TINY_STUDENT
    )
    method = bundle.info["method"]
    assert method["name"] == "unpaired_kd" and method["kd_weight"] == 1.0 and method["prototype_weight"] == 0.5
    assert set(bundle.info["metrics"]["train_kd"]) == {"CT", "MR"}
    assert all(v > 0 for values in bundle.info["metrics"]["train_kd"].values() for v in values)
    section = bundle.info["modalities"]
    assert section["CT"]["teacher"]["weights_sha256"] == ct_teacher.weights_sha256
    assert section["MR"]["teacher"]["weights_sha256"] == mr_teacher.weights_sha256
    info = catalog.read_model_info(bundle.path)
    assert info.teachers == {"CT": "ct-teacher", "MR": "mr-teacher"}
    teachers = [catalog.read_model_info(t.path) for t in (ct_teacher, mr_teacher)]
    assert catalog.teacher_of(info, teachers, "MR").name == "mr-teacher"
    assert catalog.teacher_of(info, teachers, "CT").name == "ct-teacher"

    with pytest.raises(InvalidInputError, match="CT teacher 'mr-teacher' is a MR model"):
        distill_unpaired(small_cases["CT"], small_cases["MR"], tmp_path / "t", mr_teacher, None, config, TINY_STUDENT)
    with pytest.raises(InvalidInputError, match="differs from that of teacher"):
        distill_unpaired(
            small_cases["CT"], small_cases["MR"], tmp_path / "t", ct_teacher, None, config, TINY_STUDENT,
            profiles={"CT": TINY_MR.__class__("CT", (4.0, 4.0, 4.0), clip=(-100.0, 300.0))},
        )
    assert not (tmp_path / "t").exists()


def test_each_modality_gets_its_own_method_terms_with_its_own_teacher():
    network = make_modality_specific(build_network(TINY_STUDENT, NUM_CLASSES))
    teachers = {m: build_network(TINY_TEACHER, NUM_CLASSES).eval() for m in ("CT", "MR")}
    terms = _modality_terms(network, teachers, TrainingConfig(methods="ctkd+coteacher"))
    assert [[t.name for t in terms[m]] for m in ("CT", "MR")] == [["ctkd", "coteacher"]] * 2
    # Learnt temperatures are separate parameters, like the normalisation layers.
    assert terms["CT"][0].theta is not terms["MR"][0].theta
    # Each co-teacher is an EMA of the whole shared network that predicts with its modality's normalisation.
    assert current_modality(terms["CT"][1].coteacher.module) == "CT"
    assert current_modality(terms["MR"][1].coteacher.module) == "MR"
    assert current_modality(network) == "CT"  # building the terms left the student's choice alone

    # Without teachers: the consistency part of co-teacher needs none; the default "kd" adds nothing.
    assert [len(g) for g in _modality_terms(network, {}, TrainingConfig(methods="coteacher")).values()] == [1, 1]
    assert [len(g) for g in _modality_terms(network, {}, TrainingConfig()).values()] == [0, 0]
    with pytest.raises(InvalidInputError, match="MR: Method 'cwd' needs a teacher") as error:
        _modality_terms(network, {"CT": teachers["CT"]}, TrainingConfig(methods="cwd"))
    assert "Give a MR teacher" in error.value.fix


def test_combined_methods_train_both_modalities_and_are_recorded_per_modality(small_cases, tmp_path):
    ct_teacher = make_bundle(tmp_path / "ct-teacher", TINY_TEACHER, TINY_CT, "teacher", seed=1)
    mr_teacher = make_bundle(tmp_path / "mr-teacher", TINY_TEACHER, TINY_MR, "teacher", seed=2)
    config = TrainingConfig(epochs=2, steps_per_epoch=2, methods="cwd:0.5+coteacher", **SMALL)
    bundle = distill_unpaired(small_cases["CT"], small_cases["MR"], tmp_path / "s", ct_teacher, mr_teacher, config,
                              TINY_STUDENT)
    method = bundle.info["method"]
    assert method["name"] == "unpaired+cwd:0.5+coteacher:1"
    assert sorted((r["modality"], r["name"], r["weight"]) for r in method["methods"]) == [
        ("CT", "coteacher", 1.0), ("CT", "cwd", 0.5), ("MR", "coteacher", 1.0), ("MR", "cwd", 0.5)]
    kd = bundle.info["metrics"]["train_kd"]
    assert set(kd) == {"CT", "MR"} and all(len(v) == 2 and all(x > 0 for x in v) for v in kd.values())

    # A run is resumed only with the methods it was started with.
    with pytest.raises(CancelledError):
        distill_unpaired(small_cases["CT"], small_cases["MR"], tmp_path / "r", ct_teacher, mr_teacher, config,
                         TINY_STUDENT, cancel=lambda calls=[]: calls.append(1) or len(calls) > 3)
    with pytest.raises(InvalidInputError, match="made with methods 'cwd:0.5\\+coteacher:1', not 'kd:1'"):
        distill_unpaired(small_cases["CT"], small_cases["MR"], tmp_path / "r", ct_teacher, mr_teacher,
                         TrainingConfig(epochs=2, steps_per_epoch=2, **SMALL), TINY_STUDENT, resume=True)
    assert not (tmp_path / "r").exists()


def test_cancel_leaves_no_bundle_and_resume_equals_an_uninterrupted_run(small_cases, tmp_path):
    config = TrainingConfig(epochs=2, steps_per_epoch=2, **SMALL)
    args = dict(config=config, architecture=TINY_STUDENT, profiles=PROFILES)
    # The uninterrupted reference: the same loop without the bundle around it (seeded as distill_unpaired does).
    seed_everything(config.seed)
    reference = make_modality_specific(build_network(TINY_STUDENT, NUM_CLASSES))
    history = train_unpaired(reference, small_cases, config, tmp_path / "full")
    assert not math.isnan(history.first_step_loss) and len(history.epoch_loss) == 2

    calls = []
    with pytest.raises(CancelledError):
        distill_unpaired(
            small_cases["CT"], small_cases["MR"], tmp_path / "run", cancel=lambda: calls.append(1) or len(calls) > 3,
            **args,
        )
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".partial-*"))
    assert torch.load(checkpoint_dir_for(tmp_path / "run") / "checkpoint.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(InvalidInputError, match="--resume"):
        distill_unpaired(small_cases["CT"], small_cases["MR"], tmp_path / "run", **args)
    resumed = distill_unpaired(small_cases["CT"], small_cases["MR"], tmp_path / "run", resume=True, **args)
    assert not checkpoint_dir_for(tmp_path / "run").exists()
    assert resumed.info["metrics"]["train_loss"] == pytest.approx(history.epoch_loss, rel=1e-5)
    # Learned weights equal (normalisation statistics were recalibrated in the bundle, so they are left out).
    expected = dict(reference.named_parameters())
    for key, value in resumed.load_network().named_parameters():
        assert torch.allclose(value, expected[key], atol=1e-5), key


def test_cli_distills_one_student_and_segments_both_modalities(tmp_path, capsys):
    for modality, seed in (("CT", 1), ("MR", 2)):
        write_phantom_dataset(tmp_path / modality.lower(), modality, 2, seed=seed, size=(32, 32, 24), spacing=(7, 7, 7))
    common = ["--quiet", "distill-unpaired", "--ct-data", tmp_path / "ct", "--mr-data", tmp_path / "mr"]
    options = ["--epochs", 1, "--steps-per-epoch", 2, "--patch-size", 16, 16, 16, "--device", "cpu"]
    assert main([str(a) for a in common + ["--output", tmp_path / "model", *options]]) == 0
    assert json.loads(capsys.readouterr().out)["modality"] == "CT+MR"
    for modality in ("ct", "mr"):
        source = sorted((tmp_path / modality / "images").iterdir())[0]
        target = tmp_path / "out" / modality
        argv = ["--quiet", "segment", "--model", tmp_path / "model", "--input", source, "--output", target]
        assert main([str(a) for a in argv + ["--format", "nifti"]]) == 0
        assert (tmp_path / "out" / f"{modality}.nii.gz").is_file()
    # A missing teacher is a clear error (exit 2), and nothing is written.
    argv = common + ["--ct-teacher", tmp_path / "nope", "--output", tmp_path / "other", *options]
    assert main([str(a) for a in argv]) == 2
    assert "No model bundle named" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    # So is a method that needs a teacher the modality lacks.
    argv = common + ["--method", "cwd", "--output", tmp_path / "other", *options]
    assert main([str(a) for a in argv]) == 2
    assert "CT: Method 'cwd' needs a teacher" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
