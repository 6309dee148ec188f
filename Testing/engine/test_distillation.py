"""Distillation methods: each term's defining property on tiny tensors, the registry, and short
end-to-end runs that combine methods, mix teachers, chain an assistant and resume exactly."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import NUM_CLASSES, TINY_CT, TINY_STUDENT, TINY_TEACHER, make_bundle
from torch import nn
from torch.nn import functional as F

from MedKDSegmentLib.engine.cli import main
from MedKDSegmentLib.engine.data import load_cases
from MedKDSegmentLib.engine.distillation import (
    TERMS,
    ATTerm,
    CoTeacherTerm,
    CTKDTerm,
    DistillContext,
    FeatureTap,
    HintTerm,
    TermSetup,
    build_terms,
    consistency_rampup,
    ctkd_lambda,
    ctkd_temperature,
    teacher_mixture,
    teacher_sample_weights,
    validate_teacher_weights,
)
from MedKDSegmentLib.engine.errors import CancelledError, InvalidInputError
from MedKDSegmentLib.engine.labels import label_names
from MedKDSegmentLib.engine.losses import (
    ChannelWiseKD,
    PixelKD,
    attention_map,
    attention_transfer,
    channel_distribution,
    dist_loss,
    kd_to_target,
)
from MedKDSegmentLib.engine.methods import METHODS, MethodSpec, format_methods, parse_methods
from MedKDSegmentLib.engine.networks import (
    ASSISTANT_CONFIG,
    TEACHER_CONFIG,
    build_network,
    count_parameters,
    feature_layer,
)
from MedKDSegmentLib.engine.phantom import write_phantom_dataset
from MedKDSegmentLib.engine.training import Optimisation, TrainingConfig, distill_chain, distill_student, fit

C = 4


def random_logits(seed: int, shape: tuple[int, ...] = (2, C, 5, 6, 7), scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def context(student: torch.Tensor, *teachers: torch.Tensor, epoch: int = 0, weights=None) -> DistillContext:
    n = student.shape[0]
    return DistillContext(
        images=torch.zeros(n, 1, *student.shape[2:]),
        logits=student,
        labels=torch.zeros(n, 1, *student.shape[2:], dtype=torch.long),
        labelled=torch.zeros(n, dtype=torch.bool),
        student=nn.Identity(),
        teacher_logits=list(teachers),
        teacher_weights=weights,
        epoch=epoch,
    )


def setup(config: TrainingConfig | None = None, student=None, teachers=()) -> TermSetup:
    return TermSetup(config or TrainingConfig(), C, student or nn.Identity(), list(teachers))


# --- registry ---------------------------------------------------------------------------------


def test_method_strings_parse_and_print_canonically():
    assert parse_methods("kd:1+cwd:0.5") == [MethodSpec("kd", 1.0), MethodSpec("cwd", 0.5)]
    assert parse_methods(" CTKD-Instance + coteacher ") == [MethodSpec("ctkd_instance"), MethodSpec("coteacher")]
    assert format_methods(parse_methods("kd+cwd:0.5"), TrainingConfig(kd_weight=2.0)) == "kd:2+cwd:0.5"
    assert set(METHODS) == {"kd", "ctkd", "ctkd_instance", "cwd", "dist", "hint", "at", "coteacher", "pseudo"}
    assert list(TERMS) == list(METHODS) and all(TERMS[name].name == name for name in METHODS)  # a term each
    assert parse_methods("none") == [] and format_methods([], TrainingConfig()) == "none"
    assert len(build_terms("none", setup(teachers=[nn.Identity()]))) == 0  # a from-scratch baseline


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("kd+cdw", "Unknown distillation method 'cdw'"),
        ("kd:x", "not a number"),
        ("cwd:-1", "not a number"),
        ("kd:nan", "not a number"),
        ("kd+kd:2", "given twice"),
        ("kd+", "empty method name"),
    ],
)
def test_bad_method_strings_name_the_problem_and_the_known_methods(text, problem):
    with pytest.raises(InvalidInputError, match=problem) as error:
        parse_methods(text)
    assert "cwd" in error.value.fix and "coteacher" in error.value.fix or "twice" in problem or "number" in problem


@pytest.mark.parametrize(
    ("methods", "field", "value"),
    [("kd", "kd_temperature", 0.0), ("cwd", "cwd_temperature", -1.0), ("coteacher", "coteacher_alpha", 1.5)],
)
def test_out_of_range_hyperparameters_are_named(methods, field, value):
    config = TrainingConfig(**{field: value})
    with pytest.raises(InvalidInputError, match=field):
        build_terms(methods, setup(config, student=build_network(TINY_STUDENT, C), teachers=[nn.Identity()]))


def test_methods_needing_a_teacher_are_refused_without_one_except_the_default():
    assert len(build_terms("kd", setup())) == 0  # plain supervised training, as before
    with pytest.raises(InvalidInputError, match="'cwd' needs a teacher"):
        build_terms("cwd", setup())
    student = build_network(TINY_STUDENT, C)
    terms = build_terms("coteacher:0.5", setup(student=student))  # mean-teacher consistency alone
    assert [type(t) for t in terms] == [CoTeacherTerm] and terms[0].weight == 0.5


# --- pixel KD and CTKD ------------------------------------------------------------------------


def test_kd_term_defaults_to_the_configured_weight_and_is_the_pixel_kd():
    config = TrainingConfig(kd_temperature=3.0, kd_weight=0.7)
    (term,) = build_terms("kd", setup(config, teachers=[nn.Identity()]))
    s, t = random_logits(0), random_logits(1)
    assert term.weight == 0.7
    assert torch.equal(term(context(s, t)), PixelKD(3.0)(s, t))
    # The general form (used for mixtures and learnable temperatures) agrees with it.
    assert torch.allclose(kd_to_target(s, F.softmax(t / 3.0, dim=1), 3.0), PixelKD(3.0)(s, t), atol=1e-6)


def test_ctkd_lambda_follows_the_cosine_schedule():
    values = [ctkd_lambda(i, 10) for i in range(13)]
    assert values[0] == 0.0 and values[10] == 1.0 and values[12] == 1.0
    assert values[5] == pytest.approx(0.5)
    assert values[2] == pytest.approx(1 - (math.cos(2 * math.pi / 10) + 1) / 2)
    assert all(a < b for a, b in zip(values[:10], values[1:11]))


def test_ctkd_temperature_stays_in_range_and_starts_where_the_official_code_starts():
    term = CTKDTerm(1.0, setup(TrainingConfig(kd_temperature=4.0)))
    assert term.final_temperature() == pytest.approx(1 + 20 / (1 + math.exp(-1)), abs=1e-5)  # θ = 1: T ≈ 15.6
    extremes = ctkd_temperature(torch.tensor([-50.0, 0.0, 50.0]))
    assert extremes[0] >= 1.0 and extremes[1] == pytest.approx(11.0) and extremes[2] <= 21.0


def test_ctkd_reversal_makes_the_temperature_increase_the_loss_the_student_decreases():
    term = CTKDTerm(1.0, setup(TrainingConfig(kd_temperature=4.0, ctkd_epochs=10)))
    teacher = random_logits(1)
    student = nn.Parameter(random_logits(2))

    def loss(epoch: int = 10) -> torch.Tensor:
        return term(context(student, teacher, epoch=epoch))

    # Gradient of θ is exactly −λ times the plain gradient of the KD loss.
    value = loss(epoch=5)
    value.backward()
    theta = term.theta.detach().clone().requires_grad_(True)
    t = ctkd_temperature(theta)
    (plain,) = torch.autograd.grad(kd_to_target(student.detach(), F.softmax(teacher / t, dim=1), t), theta)
    assert term.theta.grad == pytest.approx(-0.5 * float(plain), rel=1e-4)
    assert float(plain) != 0.0

    # One optimiser step on θ alone raises the loss; one on the student alone lowers it.
    before = float(loss().detach())
    theta_step = torch.optim.SGD([term.theta], lr=0.5)
    theta_step.zero_grad()
    loss().backward()
    theta_step.step()
    after_theta = float(loss().detach())
    assert after_theta > before
    student_step = torch.optim.SGD([student], lr=0.5)
    student_step.zero_grad()
    loss().backward()
    student_step.step()
    assert float(loss().detach()) < after_theta

    # λ = 0 in the first epoch: the temperature does not move.
    term.theta.grad = None
    loss(epoch=0).backward()
    assert float(term.theta.grad) == 0.0


def test_ctkd_temperature_steps_by_sgd_in_proportion_to_lambda():
    """θ has its own SGD (momentum 0.9, weight decay 5e-4), so the curriculum's λ scales its step: under AdamW,
    which normalises steps, λ = 0.1 and λ = 1 would move it alike."""
    config = TrainingConfig(kd_temperature=4.0, ctkd_epochs=10, learning_rate=0.1)
    teacher = random_logits(1)
    steps = {}
    for epoch in (0, 2, 5, 10):
        student = nn.ParameterList([nn.Parameter(random_logits(2))])
        terms = nn.ModuleList([CTKDTerm(1.0, setup(config))])
        optimisation = Optimisation(student, terms, config)
        assert [type(o).__name__ for o in optimisation.optimizers] == ["AdamW", "SGD"]
        optimisation.step(terms[0](context(student[0], teacher, epoch=epoch)), torch.amp.GradScaler(enabled=False))
        decay = 0.1 * 5e-4 * 1.0  # SGD's weight decay on θ = 1
        steps[epoch] = float(terms[0].theta.detach()) - 1.0 + decay
    assert abs(steps[0]) < 1e-7 and abs(steps[10]) > 1e-4  # λ = 0: only the weight decay moved θ (float32)
    for epoch in (2, 5):
        assert steps[epoch] / steps[10] == pytest.approx(ctkd_lambda(epoch, 10), rel=1e-3)


def test_instance_ctkd_gives_one_temperature_per_patch():
    term = build_terms("ctkd_instance", setup(TrainingConfig(kd_temperature=4.0), teachers=[nn.Identity()]))[0]
    s, t = random_logits(0), random_logits(1)
    temperature = term.temperature(context(s, t, epoch=3))
    assert temperature.shape == (2, 1, 1, 1, 1)
    assert torch.allclose(temperature, torch.full_like(temperature, term.initial_temperature), atol=1e-4)
    assert term.initial_temperature == pytest.approx(15.62, abs=0.01)  # θ = 1, as the global term
    value = term(context(s, t, epoch=3))
    value.backward()
    assert all(p.grad is not None for p in term.mlp.parameters())


def test_pseudo_labels_are_the_teacher_s_arg_max():
    term = build_terms("pseudo", setup(TrainingConfig(), teachers=[nn.Identity()]))[0]
    teacher = random_logits(1)
    hard = 20.0 * F.one_hot(teacher.argmax(1), C).movedim(-1, 1).float()  # the arg-max as confident logits
    assert float(term(context(hard, teacher))) < 0.05 < float(term(context(random_logits(2), teacher)))
    student = nn.Parameter(random_logits(2))
    term(context(student, teacher)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


# --- CWD and DIST -----------------------------------------------------------------------------


def test_cwd_normalises_each_channel_over_space():
    distribution = channel_distribution(random_logits(0), 4.0)
    assert distribution.shape == (2, C, 5 * 6 * 7)
    assert torch.allclose(distribution.sum(dim=2), torch.ones(2, C))


def test_cwd_matches_its_formula_and_ignores_per_channel_constants_unlike_pixel_kd():
    s, t = random_logits(0), random_logits(1)
    cwd, pixel = ChannelWiseKD(4.0), PixelKD(4.0)
    p_t, p_s = channel_distribution(t, 4.0), channel_distribution(s, 4.0)
    expected = 16.0 * (p_t * (p_t.log() - p_s.log())).sum() / (2 * C)
    assert torch.allclose(cwd(s, t), expected, atol=1e-5)
    assert float(cwd(t, t)) == pytest.approx(0.0, abs=1e-6)
    per_channel = 3.0 * torch.randn(2, C, 1, 1, 1)
    per_voxel = 3.0 * torch.randn(2, 1, 5, 6, 7)
    assert torch.allclose(cwd(s + per_channel, t - per_channel), cwd(s, t), atol=1e-5)
    assert not torch.allclose(pixel(s + per_channel, t), pixel(s, t), atol=1e-3)
    assert torch.allclose(pixel(s + per_voxel, t), pixel(s, t), atol=1e-5)
    assert not torch.allclose(cwd(s + per_voxel, t), cwd(s, t), atol=1e-3)


def test_dist_is_zero_for_identical_predictions_and_invariant_to_positive_affine_maps():
    p_s, p_t = F.softmax(random_logits(0), dim=1), F.softmax(random_logits(1), dim=1)
    assert float(dist_loss(p_t, p_t)) == pytest.approx(0.0, abs=1e-5)
    value = dist_loss(p_s, p_t)
    assert float(value) > 0.1
    assert torch.allclose(dist_loss(3.0 * p_s + 0.2, p_t), value, atol=1e-5)
    assert torch.allclose(dist_loss(p_s, 0.5 * p_t + 1.0), value, atol=1e-5)
    assert float(dist_loss(-p_t, p_t)) == pytest.approx(4.0, abs=1e-4)  # anti-correlated: 1 − (−1), twice


# --- features: hints and attention transfer ---------------------------------------------------


def test_default_feature_layers_are_the_deepest_maps():
    student, teacher = build_network(TINY_STUDENT, C), build_network(TINY_TEACHER, C)
    assert feature_layer(student) == "down2"
    assert feature_layer(teacher) == "model.1.submodule.1.submodule"
    assert feature_layer(build_network(TEACHER_CONFIG, C)) == "model.1.submodule.1.submodule.1.submodule.1.submodule"
    with FeatureTap(teacher, [feature_layer(teacher)]) as tap:
        teacher(torch.zeros(1, 1, 16, 16, 16))
        assert tap.features[feature_layer(teacher)].shape == (1, 32, 4, 4, 4)  # bottleneck at 1/4
    assert not teacher._forward_hooks and not any(m._forward_hooks for m in teacher.modules())
    with pytest.raises(InvalidInputError, match="no layer named"):
        FeatureTap(teacher, ["model.9"])


def test_hint_adapter_maps_student_features_to_the_teachers_and_learns():
    torch.manual_seed(0)
    student, teacher = build_network(TINY_STUDENT, C), build_network(TINY_TEACHER, C)
    (term,) = build_terms("hint", setup(student=student, teachers=[teacher]))
    assert isinstance(term, HintTerm) and term.adapters[0].in_channels == 8 and term.adapters[0].out_channels == 32
    images = torch.randn(2, 1, 16, 16, 16)
    with FeatureTap(student, term.student_layers) as s_tap, FeatureTap(teacher, term.teacher_layers) as t_tap:
        with torch.no_grad():
            student(images), teacher(images)
        features_s, features_t = dict(s_tap.features), dict(t_tap.features)
    layer = term.teacher_layers[0]
    assert features_s["down2"].shape[2:] == (2, 2, 2) and features_t[layer].shape[2:] == (4, 4, 4)
    assert term.adapters[0](features_s["down2"]).shape == (2, 32, 2, 2, 2)  # then resampled to the teacher's 4³
    # A teacher feature that some 1×1×1 map of the (resampled) student feature explains exactly:
    # training the adapter alone drives the hint loss towards zero.
    hidden = nn.Conv3d(8, 32, kernel_size=1)
    with torch.no_grad():
        features_t[layer] = F.interpolate(hidden(features_s["down2"]), size=(4, 4, 4), mode="trilinear")
    step = context(torch.zeros(2, C, 16, 16, 16), torch.zeros(2, C, 16, 16, 16))
    step.student_features, step.teacher_features = features_s, [features_t]
    optimizer = torch.optim.Adam(term.parameters(), lr=0.05)
    first = float(term(step).detach())
    for _ in range(100):
        optimizer.zero_grad()
        term(step).backward()
        optimizer.step()
    assert float(term(step).detach()) < 0.05 * first


def test_hint_target_is_the_teacher_feature_at_unit_rms_whatever_its_scale():
    # The shipped UNet teachers' bottlenecks have RMS values in the thousands: raw, their L2 swamps Dice + CE.
    torch.manual_seed(0)
    student, teacher = build_network(TINY_STUDENT, C), build_network(TINY_TEACHER, C)
    (term,) = build_terms("hint", setup(student=student, teachers=[teacher]))
    layer = term.teacher_layers[0]
    features_s = {"down2": torch.randn(2, 8, 2, 2, 2)}
    features_t = torch.randn(2, 32, 4, 4, 4)
    step = context(torch.zeros(2, C, 16, 16, 16), torch.zeros(2, C, 16, 16, 16))

    def hint(teacher_features: torch.Tensor) -> float:
        step.student_features, step.teacher_features = features_s, [{layer: teacher_features}]
        return float(term(step).detach())

    assert hint(2000.0 * features_t) == pytest.approx(hint(features_t), rel=1e-5)
    # The per-item scaling: each item's target is its own feature over its own RMS.
    lopsided = features_t * torch.tensor([1.0, 50.0]).view(2, 1, 1, 1, 1)
    assert hint(lopsided) == pytest.approx(hint(features_t), rel=1e-5)
    # And the loss is the plain mean square error against that target.
    with torch.no_grad():
        projected = F.interpolate(term.adapters[0](features_s["down2"]), size=(4, 4, 4), mode="trilinear")
    unit = features_t / features_t.pow(2).flatten(1).mean(1).sqrt().view(2, 1, 1, 1, 1)
    assert hint(features_t) == pytest.approx(float(F.mse_loss(projected, unit)), rel=1e-5)


def test_attention_maps_are_normalised_and_ignore_feature_scale_and_channel_count():
    features = torch.randn(2, 6, 4, 4, 4)
    maps = attention_map(features)
    assert maps.shape == (2, 64)
    assert torch.allclose(maps.norm(dim=1), torch.ones(2))
    assert torch.allclose(attention_map(5.0 * features), maps, atol=1e-6)
    assert torch.allclose(attention_map(features.flip(1)), maps, atol=1e-6)
    assert torch.allclose(attention_transfer(3.0 * features, features), torch.zeros(2), atol=1e-6)
    coarse = torch.randn(2, 3, 2, 2, 2)  # fewer channels, half the size: resampled to the teacher's grid
    distance = attention_transfer(coarse, features)
    assert distance.shape == (2,) and float(distance.min()) > 0 and float(distance.max()) <= 4.0
    (term,) = build_terms(
        "at", setup(student=build_network(TINY_STUDENT, C), teachers=[build_network(TINY_TEACHER, C)])
    )
    assert isinstance(term, ATTerm) and not list(term.parameters())


# --- co-teacher -------------------------------------------------------------------------------


def test_coteacher_is_an_exact_ema_of_the_student_and_gets_no_gradient():
    torch.manual_seed(0)
    student = build_network(TINY_STUDENT, C)
    config = TrainingConfig(coteacher_alpha=0.9, coteacher_noise=0.1)
    term = CoTeacherTerm(1.0, setup(config, student=student))
    assert all(not p.requires_grad for p in term.coteacher.parameters())
    images = torch.randn(2, 1, 16, 16, 16)
    full = F.interpolate(student(images), size=(16, 16, 16), mode="trilinear")
    step = context(full, random_logits(3, (2, C, 16, 16, 16)))
    step.images, step.student = images, student
    loss = term(step)
    loss.backward()
    assert all(p.grad is None for p in term.coteacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    before = {k: v.clone() for k, v in term.coteacher.module.state_dict().items()}
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    term.after_step(student)
    after, current = term.coteacher.module.state_dict(), student.state_dict()
    names = [name for name, _ in student.named_parameters()]
    for name in names:
        expected = 0.9 * before[name] + 0.1 * current[name]
        torch.testing.assert_close(after[name], expected, rtol=1e-6, atol=1e-7)  # float rounding only
    assert sum(not torch.equal(after[name], current[name]) for name in names) > len(names) // 2
    # Batch-norm statistics follow the same average, so the co-teacher can predict in eval mode.
    mean = next(k for k in current if k.endswith("running_mean"))
    torch.testing.assert_close(after[mean], 0.9 * before[mean] + 0.1 * current[mean], rtol=1e-6, atol=1e-7)
    term.train()
    assert not term.coteacher.training


def test_coteacher_consistency_ramps_up_and_sums_over_classes_as_the_kd_part_does():
    assert consistency_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert consistency_rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert consistency_rampup(100, 100) == consistency_rampup(500, 100) == consistency_rampup(0, 0) == 1.0
    torch.manual_seed(0)
    student = build_network(TINY_STUDENT, C)
    config = TrainingConfig(epochs=2, steps_per_epoch=50, coteacher_noise=0.0, coteacher_rampup=0.5)
    term = CoTeacherTerm(1.0, setup(config, student=student))
    assert term.rampup_steps == 50
    with torch.no_grad():  # the co-teacher drifts from the student, so their outputs differ
        for p in term.coteacher.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.randn(2, 1, 16, 16, 16)
    step = context(torch.zeros(2, C, 16, 16, 16))  # no teacher: consistency alone
    step.images, step.student = images, student
    losses = {}
    for index in (0, 25, 50, 99):
        step.step = index
        losses[index] = float(term(step))
    with torch.no_grad():
        size = (16, 16, 16)
        s = F.softmax(F.interpolate(student(images), size=size, mode="trilinear"), 1)
        c = F.softmax(F.interpolate(term.coteacher(images), size=size, mode="trilinear"), 1)
    full = float((s - c).pow(2).sum(1).mean())
    assert losses[50] == pytest.approx(full, rel=1e-4) and losses[99] == pytest.approx(full, rel=1e-4)
    assert losses[0] == pytest.approx(math.exp(-5) * full, rel=1e-4)
    assert losses[25] == pytest.approx(math.exp(-1.25) * full, rel=1e-4)


def test_coteacher_default_weight_lets_the_teacher_be_heard():
    """At τ = 20 the softened probabilities are close together: with λ_kd = 1 the teacher's term would be
    a rounding error next to the supervised cross-entropy, and with λ_kd = τ² it would swamp it. The
    default sits between, for a confident teacher (logits spread ~20, like the benchmark's)."""
    from MedKDSegmentLib.engine.losses import soft_probability_mse

    student, teacher = random_logits(1, scale=1.0), random_logits(2, scale=20.0)
    config = TrainingConfig()
    tau = config.coteacher_tau

    def pull(loss_of) -> float:
        logits = student.clone().requires_grad_(True)
        loss_of(logits).backward()
        return float(logits.grad.norm())

    def teacher_term(weight: float):
        return lambda z: weight * soft_probability_mse(z, F.softmax(teacher / tau, dim=1), tau)

    ce = pull(lambda z: F.cross_entropy(z, teacher.argmax(dim=1)))
    assert pull(teacher_term(1.0)) < 0.02 * ce
    assert 0.05 * ce < pull(teacher_term(config.coteacher_kd_weight)) < ce
    assert pull(teacher_term(tau**2)) > 2 * ce
    term = CoTeacherTerm(1.0, setup(config, student=build_network(TINY_STUDENT, C)))
    assert term.kd_weight == config.coteacher_kd_weight and term.describe()["kd_weight"] == term.kd_weight


# --- several teachers -------------------------------------------------------------------------


def test_teacher_mixture_is_the_weighted_mixture_of_softened_probabilities():
    z1, z2 = random_logits(1), random_logits(2)
    weights = teacher_sample_weights([z1, z2], validate_teacher_weights([7, 3], 2))
    assert torch.allclose(weights, torch.tensor([[0.7, 0.3], [0.7, 0.3]]))
    mixture = teacher_mixture([z1, z2], weights, lambda z: F.softmax(z / 4.0, dim=1))
    expected = 0.7 * F.softmax(z1 / 4.0, dim=1) + 0.3 * F.softmax(z2 / 4.0, dim=1)
    assert torch.allclose(mixture, expected, atol=1e-6)
    assert torch.allclose(mixture.sum(dim=1), torch.ones_like(mixture[:, 0]))
    # The KD term distils towards that mixture; two copies of one teacher give the single-teacher loss.
    (term,) = build_terms("kd", setup(TrainingConfig(kd_temperature=4.0), teachers=[nn.Identity(), nn.Identity()]))
    s = random_logits(0)
    assert torch.allclose(term(context(s, z1, z2, weights=weights)), kd_to_target(s, expected, 4.0), atol=1e-6)
    assert torch.allclose(term(context(s, z1, z1, weights=weights)), PixelKD(4.0)(s, z1), atol=1e-5)


def test_teacher_weights_are_validated_and_confidence_favours_the_surer_teacher():
    assert validate_teacher_weights(None, 3) == pytest.approx([1 / 3] * 3)
    for bad in ([1.0], [-1.0, 2.0], [0.0, 0.0], [math.inf, 1.0]):
        with pytest.raises(InvalidInputError, match="teacher weights|Teacher weights"):
            validate_teacher_weights(bad, 2)
    sure, unsure = random_logits(1, scale=10.0), random_logits(2, scale=0.1)
    weights = teacher_sample_weights([sure, unsure], [0.5, 0.5], confidence=True)
    assert torch.allclose(weights.sum(dim=1), torch.ones(2))
    assert bool((weights[:, 0] > 0.6).all())


# --- end to end -------------------------------------------------------------------------------

FAST = dict(batch_size=2, patch_size=(16, 16, 16), device="cpu", validation_fraction=0.0, learning_rate=1e-2)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Three tiny CT phantoms; the third has no labels (semi-supervised)."""
    folder = tmp_path_factory.mktemp("distil-data")
    write_phantom_dataset(folder, "CT", 3, seed=11, size=(48, 48, 32), spacing=(8.0, 8.0, 8.0))
    sorted((folder / "labels").iterdir())[-1].unlink()
    return folder


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distil-teachers")
    return [make_bundle(folder / f"teacher-{i}", TINY_TEACHER, role="teacher", seed=i) for i in (1, 2)]


def test_cwd_plus_coteacher_learns_on_partly_unlabelled_data_and_is_recorded(tiny_data, teachers, tmp_path):
    config = TrainingConfig(epochs=4, steps_per_epoch=6, methods="cwd+coteacher", **FAST)
    student = distill_student(tiny_data, teachers[0], tmp_path / "student", config, TINY_STUDENT)
    method = student.info["method"]
    assert method["name"] == "cwd:0.02+coteacher:1"  # CWDTerm.default
    assert [m["name"] for m in method["methods"]] == ["cwd", "coteacher"]
    assert method["methods"][0]["temperature"] == 4.0 and method["methods"][1]["alpha"] == 0.99
    assert method["teachers"][0]["weights_sha256"] == teachers[0].weights_sha256
    assert method["training"]["methods"] == "cwd+coteacher"
    losses = student.info["metrics"]["train_loss"]
    assert losses[-1] < 0.9 * losses[0]


def test_several_teachers_and_combined_terms_are_recorded_with_weights(tiny_data, teachers, tmp_path):
    cases = load_cases(tiny_data, TINY_CT, label_names())  # an in-memory list works as data too
    config = TrainingConfig(
        epochs=2, steps_per_epoch=1, methods="kd:1+dist:0.5+hint:0.1+at+ctkd", ctkd_epochs=1, **FAST
    )
    student = distill_student(cases, teachers, tmp_path / "student", config, TINY_STUDENT, weights=[0.7, 0.3])
    method = student.info["method"]
    assert method["name"] == "kd:1+dist:0.5+hint:0.1+at:0.2+ctkd:1"  # ATTerm.default
    assert [(t["name"], t["weight"]) for t in method["teachers"]] == [("teacher-1", 0.7), ("teacher-2", 0.3)]
    ctkd = method["methods"][-1]
    assert ctkd["initial_temperature"] == pytest.approx(15.62, abs=0.01) and 1.0 < ctkd["final_temperature"] < 21.0
    assert ctkd["final_temperature"] != ctkd["initial_temperature"]  # λ > 0 in the second epoch: T moved
    assert method["methods"][2]["teacher_layers"] == ["model.1.submodule.1.submodule"] * 2
    assert student.info["teacher"]["name"] == "teacher-1"
    # The cached teacher outputs say which teachers filled them; a single teacher replaces them.
    assert cases[0].teacher.shape[0] == 2 * NUM_CLASSES
    distill_student(
        cases, teachers[1], tmp_path / "single", TrainingConfig(epochs=1, steps_per_epoch=1, **FAST), TINY_STUDENT
    )
    assert cases[0].teacher.shape[0] == NUM_CLASSES
    with pytest.raises(InvalidInputError, match="2 teacher weights for 1 teachers"):
        distill_student(cases, teachers[0], tmp_path / "bad", config, TINY_STUDENT, weights=[0.5, 0.5])


def test_teacher_assistant_chain_records_both_stages(tiny_data, teachers, tmp_path):
    assert 300_000 <= count_parameters(build_network(ASSISTANT_CONFIG, NUM_CLASSES)) <= 600_000
    config = TrainingConfig(epochs=1, steps_per_epoch=1, **FAST)
    student = distill_chain(tiny_data, teachers[0], tmp_path / "student", config, TINY_STUDENT)
    assistant_folder = tmp_path / "student-assistant"
    assert assistant_folder.is_dir()
    assert student.info["teacher"]["name"] == "student-assistant"
    assert [link["name"] for link in student.info["method"]["chain"]] == ["teacher-1", "student-assistant"]
    from MedKDSegmentLib.engine.bundle import load_bundle

    assistant = load_bundle(assistant_folder)
    assert assistant.role == "assistant" and assistant.info["teacher"]["name"] == "teacher-1"
    assert assistant.info["architecture"] == ASSISTANT_CONFIG


def test_resumed_combined_run_equals_an_uninterrupted_one(tiny_data, teachers, tmp_path):
    cases = load_cases(tiny_data, TINY_CT, label_names())
    config = TrainingConfig(epochs=2, steps_per_epoch=2, methods="ctkd+hint:0.1+coteacher", ctkd_epochs=1, **FAST)
    teacher = teachers[0].load_network()
    torch.manual_seed(0)
    reference = build_network(TINY_STUDENT, NUM_CLASSES)
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    full = fit(reference, NUM_CLASSES, cases, config, tmp_path / "full", teacher)

    calls = []
    interrupted = build_network(TINY_STUDENT, NUM_CLASSES)
    interrupted.load_state_dict(start)
    with pytest.raises(CancelledError):
        fit(
            interrupted,
            NUM_CLASSES,
            cases,
            config,
            tmp_path / "run",
            teacher,
            cancel=lambda: calls.append(1) or len(calls) > 2,
        )
    other = TrainingConfig(**{**config.__dict__, "methods": "kd"})
    with pytest.raises(InvalidInputError, match="was made with methods"):
        fit(build_network(TINY_STUDENT, NUM_CLASSES), NUM_CLASSES, cases, other, tmp_path / "run", teacher, resume=True)
    resumed = build_network(TINY_STUDENT, NUM_CLASSES)
    history = fit(resumed, NUM_CLASSES, cases, config, tmp_path / "run", teacher, resume=True)
    for key, value in reference.state_dict().items():
        assert torch.allclose(value.float(), resumed.state_dict()[key].float(), atol=1e-5), key
    assert history.terms[0]["final_temperature"] == pytest.approx(full.terms[0]["final_temperature"], abs=1e-5)


# --- command line -----------------------------------------------------------------------------


def test_cli_lists_methods_and_rejects_unknown_ones(capsys, tmp_path):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert name in out
    assert "cwd_temperature" in out
    code = main(
        [
            "--quiet",
            "distill",
            "--method",
            "kd+cdw",
            "--teacher",
            "x",
            "--data",
            str(tmp_path),
            "--output",
            str(tmp_path / "s"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "Unknown distillation method 'cdw'" in err and "fix:" in err
    assert not (tmp_path / "s").exists()
