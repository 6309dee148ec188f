"""Distillation methods side by side: same teacher, same student architecture, same budget.

    scripts/medkd-python scripts/benchmark_methods.py [--steps 300] [--sections ct mr unpaired semi brats]

Sections (each trains every listed method from the same seed and evaluates on held-out volumes):
- ``ct`` / ``mr``: phantom abdomen, a teacher of that modality, 12 labelled training phantoms, 6 held-out
  test phantoms;
- ``unpaired``: one shared CT + MR student (kernels shared, normalisation per modality, prototype KL)
  against the separately distilled students of the ``ct`` and ``mr`` sections (same architecture,
  same steps: the shared student sees one CT and one MR batch per step);
- ``semi``: 10 % of the CT training phantoms labelled; the students see the labelled and the unlabelled
  volumes (``--grid coarse``: the teacher is trained on those labels only);
- ``brats``: the real BRATS 2013 FLAIR volumes in ../shared/data (train + validation for training,
  test for reporting), a teacher trained here, students distilled from it.
Grids (``--grid``): ``coarse`` (default) puts the phantoms on a 6 mm grid with teachers trained here, so
that every student gets close to convergence on a CPU; ``bundled`` is the shipped models' own setting: 3 mm,
their training patch, and the bundled teachers in Resources/Models (phantom sections only). On the coarse
grid the student's half-resolution output costs Dice by itself (12 mm effective); at 3 mm it does not.
Per method: mean ± sd Dice over the test volumes (each volume's mean over structures) and the share
of the scratch→teacher gap that it closes. Writes <output>.md, <output>.json and <output>.png.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedKDSegment"))

from build_models import PATCH as BUNDLED_PATCH  # noqa: E402

from MedKDSegmentLib.engine.bundle import load_bundle, save_bundle  # noqa: E402
from MedKDSegmentLib.engine.data import Case  # noqa: E402
from MedKDSegmentLib.engine.device import select_device  # noqa: E402
from MedKDSegmentLib.engine.errors import BundleError  # noqa: E402
from MedKDSegmentLib.engine.labels import (  # noqa: E402
    ABDOMEN_STRUCTURES,
    BRATS_STRUCTURES,
    Structure,  # noqa: E402
)
from MedKDSegmentLib.engine.measure import machine_description  # noqa: E402
from MedKDSegmentLib.engine.methods import METHODS  # noqa: E402
from MedKDSegmentLib.engine.metrics import dice_per_label  # noqa: E402
from MedKDSegmentLib.engine.networks import (  # noqa: E402
    ASSISTANT_CONFIG,
    STUDENT_CONFIG,
    TEACHER_CONFIG,
    FastStudent,
    build_network,
    count_parameters,
)
from MedKDSegmentLib.engine.phantom import case_seed, generate_phantom  # noqa: E402
from MedKDSegmentLib.engine.prediction import predict_labels  # noqa: E402
from MedKDSegmentLib.engine.profiles import (  # noqa: E402
    BRATS_FLAIR_PROFILE,
    DEFAULT_PROFILES,
    Profile,
    labels_to_model_grid,
    to_model_grid,
)
from MedKDSegmentLib.engine.report import markdown_table, write_json, write_text  # noqa: E402
from MedKDSegmentLib.engine.training import TrainingConfig, fit, recalibrate_batch_norm  # noqa: E402
from MedKDSegmentLib.engine.volume import read_volume  # noqa: E402

TEST_SEED = 5151  # distinct from training (0), the engine benchmark (777) and the demo (990001)
TRAIN_CASES, TEST_CASES = 12, 6
# Phantom grids: "coarse" so that every student can be trained close to convergence on a 2-core CPU
# (rankings of methods after a few percent of training say little); "bundled" as the shipped models.
GRIDS = {"coarse": {"spacing": 6.0, "patch": (24, 48, 48), "bundled_teachers": False},
         "bundled": {"spacing": 3.0, "patch": BUNDLED_PATCH, "bundled_teachers": True}}
SPACING = GRIDS["coarse"]["spacing"]
PATCH = GRIDS["coarse"]["patch"]
BUNDLED_TEACHERS = False
MODELS = ROOT / "Resources" / "Models"
BRATS = ROOT.parent / "shared" / "data" / "mr-brain-tumor-brats"
BRATS_SPACING = 4.0
BRATS_PATCH = (24, 48, 48)
BRATS_PROFILE = replace(BRATS_FLAIR_PROFILE, spacing=(BRATS_SPACING,) * 3)
WORK = ROOT / "build" / "benchmark_methods"  # teachers trained here, shared by sections and processes
# Every phantom section runs these; "scratch" is supervised only (no teacher), the lower bound;
# "teacher-half-res" is no student but the teacher seen through the student's half-resolution output.
# Ordered so that methods sharing a kind of cached teacher output (log-probabilities, then logits) follow
# each other: the cache is filled once per kind and teacher, not once per method.
PHANTOM_METHODS = ["teacher-half-res", "scratch", "kd", "ctkd", "dist", "hint", "at", "coteacher", "cwd",
                   "cwd+coteacher", "assistant-chain", "multi-teacher", "assistant-scratch"]
MR_METHODS = ["teacher-half-res", "scratch", "kd", "cwd", "coteacher", "cwd+coteacher"]
SEMI_METHODS = ["scratch", "kd", "coteacher", "cwd+coteacher", "all-labels"]
BRATS_METHODS = ["scratch", "kd", "cwd", "dist", "coteacher"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- data


def grid_profile(modality: str) -> Profile:
    return replace(DEFAULT_PROFILES[modality], spacing=(SPACING,) * 3)


def phantom_cases(modality: str, count: int, seed: int) -> list[Case]:
    profile = grid_profile(modality)
    cases = []
    for index in range(count):
        image, labels = generate_phantom(modality, case_seed(seed, index))
        array, grid = to_model_grid(image, profile)
        cases.append(Case(f"{modality}-{seed}-{index}", array, labels_to_model_grid(labels, grid)))
    return cases


def brats_cases(split: str, with_t1c: bool = False) -> list[Case]:
    """BRATS FLAIR on the benchmark grid; ``with_t1c`` adds the subject's T1c as a privileged channel (KD-Net)."""
    cases = []
    for folder in sorted((BRATS / split).iterdir()):
        array, grid = to_model_grid(read_volume(folder / "Flair_subtrMeanDivStd.nii.gz", "MR"), BRATS_PROFILE)
        labels = labels_to_model_grid(read_volume(folder / "OTMultiClass.nii.gz"), grid)
        privileged = None
        if with_t1c:
            privileged = to_model_grid(read_volume(folder / "T1c_subtrMeanDivStd.nii.gz", "MR"), BRATS_PROFILE)[0][None]
        cases.append(Case(folder.name, array, labels, privileged=privileged))
    return cases


def without_labels(cases: list[Case], labelled: set[int]) -> list[Case]:
    """Copies that keep the labels of the cases in ``labelled`` only."""
    return [replace(c, labels=c.labels if i in labelled else None, teacher=None, teacher_source=None)
            for i, c in enumerate(cases)]


# ---------------------------------------------------------------- training and evaluation


def dice_per_case(network: torch.nn.Module, cases: list[Case], labels: list[int]) -> list[float]:
    """Each test volume's mean Dice over the structures present in its reference."""
    device = select_device("cpu")
    means = []
    for case in cases:
        dice = dice_per_label(predict_labels(network, case.image, device), case.labels, labels)
        means.append(float(np.nanmean(list(dice.values()))))
    return means


def train(architecture: dict, num_classes: int, cases: list[Case], config: TrainingConfig,
          teacher=None) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    network = build_network(architecture, num_classes)
    with tempfile.TemporaryDirectory() as folder:
        fit(network, num_classes, cases, config, Path(folder) / "checkpoint", teacher=teacher)
    recalibrate_batch_norm(network, cases, select_device(config.device))
    return network


def teacher_for(name: str, cases: list[Case], profile: Profile, structures: tuple[Structure, ...],
                config: TrainingConfig, steps: int, trained_here: bool = False):
    """The section's teacher: on the bundled grid the shipped teacher of that modality (unless
    ``trained_here``); otherwise one trained once (Dice + CE, labelled cases only) and kept as a bundle in WORK."""
    if BUNDLED_TEACHERS and structures == ABDOMEN_STRUCTURES and not trained_here:
        bundle = load_bundle(MODELS / f"phantom-abdomen-{profile.modality.lower()}-teacher")
        if bundle.profile_for(profile.modality) != profile:
            raise SystemExit(f"{bundle.name}'s preprocessing differs from the {SPACING:g} mm benchmark grid")
        return bundle
    grid = "" if SPACING == GRIDS["coarse"]["spacing"] else f"-{SPACING:g}mm"
    folder = WORK / f"teacher-{name}-{steps}{grid}"
    if not folder.exists():
        log(f"{name}: training the teacher ({steps} steps)")
        teacher_config = replace(config, methods="none", epochs=max(1, steps // config.steps_per_epoch),
                                 learning_rate=5e-3)
        network = train(TEACHER_CONFIG, len(structures) + 1, [c for c in cases if c.labels is not None],
                        teacher_config)
        try:
            save_bundle(folder, network, name=folder.name, role="teacher", architecture=TEACHER_CONFIG,
                        profile=profile, structures=structures, method={"name": "supervised"},
                        description=f"methods benchmark teacher ({name})")
        except BundleError:
            pass  # another benchmark process saved the same teacher (same seed) first
    return load_bundle(folder)


class Coarsened(torch.nn.Module):
    """A network's class probabilities averaged onto the student's output grid (``output_stride`` 2), which
    inference interpolates back as it does the student's: what a student that predicts at half resolution
    scores by copying the teacher (the ``teacher-half-res`` row). Returned as log-probabilities, which
    inference's softmax turns back into those probabilities. (Averaging logits instead scores lower.)"""

    output_stride = FastStudent.output_stride

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(self.network(x), dim=1)
        return torch.log(torch.nn.functional.avg_pool3d(probabilities, self.output_stride).clamp_min(1e-12))


def run_methods(section: str, methods: list[str], train_cases: list[Case], test_cases: list[Case], teacher,
                num_classes: int, config: TrainingConfig, labels: list[int], seeds: range) -> dict:
    """Every method once per seed (seed s: same initial weights and batches for every method)."""
    results = {"teacher": {"runs": [dice_per_case(teacher, test_cases, labels)],
                           "parameters": count_parameters(teacher)}}
    log(f"{section}: teacher {np.mean(results['teacher']['runs'][0]):.3f}")
    for seed in seeds:
        seeded = replace(config, seed=seed)
        assistant = None
        for method in methods:
            started = time.perf_counter()
            if method == "teacher-half-res":  # no training: the same for every seed
                if seed == 0:
                    record(results, method, dice_per_case(Coarsened(teacher), test_cases, labels), teacher)
                    log(f"{section}: teacher-half-res {np.mean(results[method]['runs'][0]):.3f}")
                continue
            if method == "scratch":
                network = train(STUDENT_CONFIG, num_classes, train_cases, replace(seeded, methods="none"))
            elif method == "assistant-scratch":  # does kd do more for a student 6.5× larger? (capacity check)
                network = train(ASSISTANT_CONFIG, num_classes, train_cases, replace(seeded, methods="none"))
            elif method in ("assistant-chain", "multi-teacher"):
                if assistant is None:
                    assistant = train(ASSISTANT_CONFIG, num_classes, train_cases, replace(seeded, methods="kd"),
                                      teacher)
                    record(results, "assistant", dice_per_case(assistant, test_cases, labels), assistant)
                target = assistant if method == "assistant-chain" else [(teacher, 0.7), (assistant, 0.3)]
                network = train(STUDENT_CONFIG, num_classes, train_cases, replace(seeded, methods="kd"), target)
            else:
                network = train(STUDENT_CONFIG, num_classes, train_cases, replace(seeded, methods=method), teacher)
            dice = dice_per_case(network, test_cases, labels)
            record(results, method, dice, network, time.perf_counter() - started)
            log(f"{section} seed {seed}: {method} {np.mean(dice):.3f} ({time.perf_counter() - started:.0f} s)")
    return summarise(results)


def record(results: dict, method: str, dice: list[float], network: torch.nn.Module, seconds: float | None = None):
    entry = results.setdefault(method, {"runs": [], "seconds": [], "parameters": count_parameters(network)})
    entry["runs"].append(dice)
    if seconds is not None:
        entry["seconds"].append(seconds)


UNTRAINED = ("teacher", "teacher-half-res")  # the same for every seed


def summarise(results: dict) -> dict:
    """Per method: the mean over seeds of the test-set mean Dice, its sd over seeds, the sd over test
    volumes (averaged over seeds), the share of the scratch→teacher gap closed, and the difference to
    scratch paired by seed (same initial weights and batches)."""
    for entry in results.values():
        if isinstance(entry, dict) and "runs" in entry:
            entry.update(seed_summary(entry["runs"]))
            entry["sd_volumes"] = float(np.mean([np.std(run) for run in entry["runs"]]))
            if entry.get("seconds"):
                entry["seconds"] = float(np.mean(entry["seconds"]))
    teacher = results["teacher"]["mean"]
    scratch_runs = results.get("scratch", {}).get("seed_means", [])
    for name, entry in results.items():
        if not (isinstance(entry, dict) and "mean" in entry) or name in ("teacher", "scratch"):
            continue
        # Seed s is the same start for every method, so a row run with fewer seeds than scratch (a later
        # re-run of some methods) is compared with scratch's same seeds; untrained rows with all of them.
        seeds = len(scratch_runs) if name in UNTRAINED else min(len(entry["seed_means"]), len(scratch_runs))
        entry["paired_seeds"] = seeds
        gap = teacher - float(np.mean(scratch_runs[:seeds])) if seeds else math.nan
        if name in UNTRAINED:
            entry["vs_scratch"] = entry["vs_scratch_sd"] = math.nan
            gain = entry["mean"] - (teacher - gap)
        else:
            entry["vs_scratch"], entry["vs_scratch_sd"] = paired(entry["seed_means"][:seeds], scratch_runs[:seeds])
            gain = entry["vs_scratch"]
        entry["gap_closed"] = gain / gap if gap > 1e-6 else math.nan
    return results


# ---------------------------------------------------------------- sections


def phantom_section(modality: str, methods: list[str], config: TrainingConfig, teacher_steps: int,
                    seeds: range) -> dict:
    labels = [s.value for s in ABDOMEN_STRUCTURES]
    train_cases = phantom_cases(modality, TRAIN_CASES, 0)
    test_cases = phantom_cases(modality, TEST_CASES, TEST_SEED)
    teacher = teacher_for(modality, train_cases, grid_profile(modality), ABDOMEN_STRUCTURES, config, teacher_steps)
    return run_methods(modality, methods, train_cases, test_cases, teacher.load_network(), len(labels) + 1, config,
                       labels, seeds)


# Shared-student variants and the separately trained students each is compared with.
UNPAIRED_VARIANTS = {"kd": "kd", "none": "scratch"}
# Unpaired means different patients: the unpaired section draws its MR training volumes from other
# subjects than its CT ones (a phantom seed fixes the anatomy whatever the modality).
UNPAIRED_SUBJECT_SEEDS = {"CT": 0, "MR": 1}


def unpaired_section(config: TrainingConfig, teacher_steps: int, seeds: int, variants: list[str],
                     cases: int) -> dict:
    """Per variant and seed, one shared CT + MR student and, on the same volumes, a separate CT and a
    separate MR student of the same architecture: ``kd`` distils each modality from its teacher (against
    separate ``kd`` students), ``none`` is Dou et al.'s setting without teachers: Dice + CE + prototype KL
    (against separate students trained from scratch). The shared student sees one CT and one MR batch per
    step, so each modality gets the same patches and steps as its separate student. ``cases``: training
    volumes per modality (the teachers are those of the modality sections, whatever it is)."""
    from MedKDSegmentLib.engine.modality_norm import use_modality
    from MedKDSegmentLib.engine.unpaired import distill_unpaired

    labels = [s.value for s in ABDOMEN_STRUCTURES]
    modalities = ("CT", "MR")
    volumes = {m: phantom_cases(m, cases, UNPAIRED_SUBJECT_SEEDS[m]) for m in modalities}
    test = {m: phantom_cases(m, TEST_CASES, TEST_SEED) for m in modalities}
    # The modality sections' teachers (the MR one trained on other subjects: a given, fixed model either way).
    teachers = {m: teacher_for(m, phantom_cases(m, TRAIN_CASES, 0), grid_profile(m), ABDOMEN_STRUCTURES, config,
                               teacher_steps) for m in modalities}
    teacher_networks = {m: bundle.load_network() for m, bundle in teachers.items()}
    results: dict = {"subjects": "CT and MR training volumes of different subjects", "volumes": cases}
    for variant in variants:
        baseline = UNPAIRED_VARIANTS[variant]
        runs: dict[str, dict[str, list]] = {"shared": {m: [] for m in modalities},
                                            "separate": {m: [] for m in modalities}}
        started = time.perf_counter()
        for seed in range(seeds):
            seeded = replace(config, seed=seed, methods="kd" if variant == "kd" else "none")
            for modality in modalities:
                teacher = teacher_networks[modality] if variant == "kd" else None
                network = train(STUDENT_CONFIG, len(labels) + 1, volumes[modality], seeded, teacher)
                runs["separate"][modality].append(dice_per_case(network, test[modality], labels))
            with tempfile.TemporaryDirectory() as folder:
                torch.manual_seed(seed)
                given = teachers if variant == "kd" else {"CT": None, "MR": None}
                bundle = distill_unpaired(volumes["CT"], volumes["MR"], Path(folder) / "shared-student",
                                          ct_teacher=given["CT"], mr_teacher=given["MR"],
                                          config=replace(seeded, methods="kd"), architecture=STUDENT_CONFIG)
                network = bundle.load_network()
            for modality in modalities:
                with use_modality(network, modality):
                    runs["shared"][modality].append(dice_per_case(network, test[modality], labels))
            log(f"unpaired {variant} seed {seed}: " + ", ".join(
                f"{m} shared {np.mean(runs['shared'][m][-1]):.3f} separate {np.mean(runs['separate'][m][-1]):.3f}"
                for m in modalities))
        entry = {"seconds": (time.perf_counter() - started) / seeds, "parameters": count_parameters(network),
                 "baseline": baseline, "separate": {}}
        for modality in modalities:
            entry[modality] = seed_summary(runs["shared"][modality])
            entry["separate"][modality] = seed_summary(runs["separate"][modality])
        results[variant] = entry
    return results


def seed_summary(runs: list[list[float]]) -> dict:
    means = [float(np.mean(run)) for run in runs]
    return {"runs": runs, "seed_means": means, "mean": float(np.mean(means)),
            "sd_seeds": float(np.std(means, ddof=1)) if len(means) > 1 else math.nan}


def semi_section(config: TrainingConfig, teacher_steps: int, seeds: range) -> dict:
    labels = [s.value for s in ABDOMEN_STRUCTURES]
    cases = phantom_cases("CT", 20, 0)
    labelled = {0, 1}  # 10 % of 20
    test_cases = phantom_cases("CT", TEST_CASES, TEST_SEED)
    semi_cases = without_labels(cases, labelled)
    # The teacher learns from the same 2 labelled volumes on either grid (the bundled teacher saw all 20
    # labels): no label the students are denied reaches them.
    teacher = teacher_for("CT-semi", semi_cases, grid_profile("CT"), ABDOMEN_STRUCTURES, config, teacher_steps,
                          trained_here=True)
    results = run_methods_semi(teacher.load_network(), semi_cases, test_cases, labels, config, seeds, cases)
    results["labelled"], results["volumes"] = len(labelled), len(cases)
    return results


def run_methods_semi(teacher, cases, test_cases, labels, config, seeds: range, all_labelled: list[Case]) -> dict:
    """Supervised-only sees batches of ``batch_size`` labelled patches; the semi-supervised methods see the
    same labelled patches plus as many unlabelled ones (batches twice the size, half labelled), the usual
    protocol of semi-supervised segmentation benchmarks (e.g. SSL4MIS: 2 labelled + 2 unlabelled).
    ``all-labels``, as in those benchmarks, is the student supervised on every volume's labels: the most
    that the unlabelled volumes could add."""
    num_classes = len(labels) + 1
    results = {"teacher": {"runs": [dice_per_case(teacher, test_cases, labels)],
                           "parameters": count_parameters(teacher)}}
    log(f"semi: teacher {np.mean(results['teacher']['runs'][0]):.3f}")
    for seed in seeds:
        for method in SEMI_METHODS:
            started = time.perf_counter()
            seeded = replace(config, seed=seed)
            if method == "scratch":  # supervised only: the labelled volumes are all it can use
                network = train(STUDENT_CONFIG, num_classes, [c for c in cases if c.labels is not None],
                                replace(seeded, methods="none"))
            elif method == "all-labels":
                network = train(STUDENT_CONFIG, num_classes, all_labelled, replace(seeded, methods="none"))
            else:
                network = train(STUDENT_CONFIG, num_classes, cases,
                                replace(seeded, methods=method, batch_size=2 * config.batch_size), teacher)
            dice = dice_per_case(network, test_cases, labels)
            record(results, method, dice, network, time.perf_counter() - started)
            log(f"semi seed {seed}: {method} {np.mean(dice):.3f}")
    return summarise(results)


def brats_section(config: TrainingConfig, teacher_steps: int, seeds: range) -> dict:
    if not BRATS.is_dir():
        return {"skipped": f"{BRATS} is absent"}
    labels = [s.value for s in BRATS_STRUCTURES]
    train_cases = brats_cases("train") + brats_cases("validation")
    test_cases = brats_cases("test")
    config = replace(config, patch_size=BRATS_PATCH)
    teacher = teacher_for("brats", train_cases, BRATS_PROFILE, BRATS_STRUCTURES, config, teacher_steps)
    results = run_methods("brats", BRATS_METHODS, train_cases, test_cases, teacher.load_network(), len(labels) + 1,
                          config, labels, seeds)
    results["train_volumes"], results["test_volumes"] = len(train_cases), len(test_cases)
    return results


# ---------------------------------------------------------------- report


def missing(value: float | None) -> bool:
    """No figure: NaN in memory, None once written to JSON."""
    return value is None or math.isnan(value)


def percent(value: float | None) -> str:
    return "–" if missing(value) else f"{100 * value:.0f} %"


def signed(value: float | None, sd: float | None = None) -> str:
    if missing(value):
        return "–"
    return f"{value:+.3f}" + ("" if missing(sd) else f" ± {sd:.3f}")


def method_rows(section: dict) -> list[dict]:
    rows = []
    for name, entry in section.items():
        if isinstance(entry, dict) and "mean" in entry:
            rows.append({"method": name, "dice": f"{entry['mean']:.3f}",
                         "sd_seeds": "–" if missing(entry["sd_seeds"]) else f"{entry['sd_seeds']:.3f}",
                         "sd_volumes": f"{entry['sd_volumes']:.3f}",
                         "vs_scratch": signed(entry.get("vs_scratch"), entry.get("vs_scratch_sd")),
                         "gap": "–" if name in ("teacher", "scratch") else percent(entry.get("gap_closed")),
                         "parameters": entry.get("parameters", ""),
                         "seconds": f"{entry['seconds']:.0f}" if entry.get("seconds") else ""})
    return rows


COLUMNS = {"method": "method", "dice": "mean Dice", "sd_seeds": "sd (seeds)", "sd_volumes": "sd (volumes)",
           "vs_scratch": "− scratch, paired by seed", "gap": "gap closed", "parameters": "parameters",
           "seconds": "train s"}


def render(results: dict, chart_name: str = "benchmark_methods.png") -> str:
    seeds = max([seeds_of(section) for section in results["sections"].values()] or [1])
    cases = results.get("phantom_cases", {"train": TRAIN_CASES, "test": TEST_CASES})
    grid = GRIDS[results.get("grid", "coarse")]
    teacher_steps = "" if grid["bundled_teachers"] else f"--teacher-steps {results.get('teacher_steps', '?')} "
    reproduce = (f"scripts/medkd-python scripts/benchmark_methods.py --steps {results['steps']} {teacher_steps}"
                 f"--temperature {results.get('temperature', '?')} --seeds {seeds} --threads 1 "
                 f"--grid {results.get('grid', 'coarse')}")
    if grid["bundled_teachers"]:
        teachers = ("the bundled teachers of Resources/Models (MONAI UNet, 4.77 M parameters; trained on 20 "
                    "labelled phantoms), kept fixed for every student; the semi-supervised section's teacher (same "
                    f"architecture) is trained here for {results.get('teacher_steps', '?')} steps on that section's "
                    "labelled volumes only")
    else:
        teachers = (f"teachers (MONAI UNet, 4.77 M parameters) trained here for {results.get('teacher_steps', '?')} "
                    "steps with Dice + CE and kept fixed for every student")
    lines = ["# Distillation methods benchmark", "", f"Machine: {results['machine']}", "",
             f"Budget per student: {results['steps']} steps of batch {results['batch_size']} (semi-supervised "
             f"methods: {results['batch_size']} labelled + {results['batch_size']} unlabelled patches per step); "
             f"the same student architecture (FastStudent) for every method; up to {seeds} seeds (each section "
             "says how many), seed s giving every method the same initial weights and batches. Dice: each test "
             "volume's mean over structures, "
             "averaged over the test volumes and then over seeds; sd over seeds and (mean over seeds of the) sd "
             "over test volumes. Gap closed: (method − scratch) / (teacher − scratch), over the seeds both ran. "
             "A method named without a weight ran at its default weight (`medkd methods`: "
             f"{', '.join(f'`{n}` {m.default:g}' for n, m in METHODS.items() if m.default != 1)}, "
             "others 1); `name:w` at weight w. `teacher-half-res` is no "
             "student: the teacher's class probabilities averaged onto the student's half-resolution output grid "
             "and interpolated back as the student's output is, i.e. what a student that copied the teacher "
             "perfectly at its own output resolution would score.", "",
             f"Grid: phantoms at {grid['spacing']:g} mm, patches of {'×'.join(map(str, grid['patch']))} voxels "
             f"({cases['train']} training, {cases['test']} test volumes per modality), "
             f"BRATS FLAIR at {BRATS_SPACING:g} mm; {teachers}; KD "
             f"temperature {results.get('temperature', '?')} (kd, ctkd start, multi-teacher). "
             f"Reproduce: `{reproduce}` (sections can run as separate processes with `--sections`; each "
             "section's wall time on one core is given with it).", ""]
    titles = {"CT": "Phantom CT", "MR": "Phantom MR", "semi": "Semi-supervised CT (10 % labelled)",
              "brats": "BRATS 2013 FLAIR (real MRI)"}
    for key, title in titles.items():
        if key in results["sections"]:
            section = results["sections"][key]
            lines += [f"## {title}", "", *wall_time(section)]
            lines += [section["skipped"]] if "skipped" in section else [markdown_table(method_rows(section), COLUMNS)]
            lines += [""]
    if "unpaired" in results["sections"]:
        section = results["sections"]["unpaired"]
        rows = []
        for variant, entry in section.items():
            if not isinstance(entry, dict) or "CT" not in entry:
                continue
            for m in ("CT", "MR"):
                e, own = entry[m], separate_for(results["sections"], entry, m)
                separate = "–" if own is None else f"{own['mean']:.3f} ({entry['baseline']})"
                rows.append({"variant": f"shared, {variant}", "modality": m, "shared": f"{e['mean']:.3f}",
                             "separate": separate,
                             "difference": signed(*paired(e["seed_means"], own["seed_means"] if own else []))})
        lines += ["## Unpaired CT + MR: one shared student vs separate students of the same size", "",
                  *wall_time(section),
                  "`shared, kd`: each modality also distilled from its teacher, against the separate `kd` students; "
                  "`shared, none`: Dou et al.'s setting (Dice + CE + prototype KL, no teacher), against the separate "
                  "students trained from scratch. The shared student sees one CT and one MR batch per step, so each "
                  "modality gets the same patches and steps as its separate student. "
                  + (f"The CT and MR training volumes ({section.get('volumes', '?')} per modality) are of different "
                     "subjects (unpaired), and the separate students are trained in this section on the same volumes. "
                     "Reproduce: `scripts/medkd-python scripts/benchmark_methods.py --sections unpaired "
                     f"--unpaired-cases {section.get('volumes', '?')} --steps {results['steps']} "
                     f"--teacher-steps {results.get('teacher_steps', '?')} --temperature {results.get('temperature')} "
                     f"--seeds {seeds_of(section)} --threads 1`."
                     if "subjects" in section else
                     "The CT and MR training volumes are of the same subjects; the separate students are the CT and "
                     "MR sections' rows."), "",
                  markdown_table(rows, {"variant": "student", "modality": "modality", "shared": "shared mean Dice",
                                        "separate": "separate student", "difference": "shared − separate (paired)"}),
                  ""]
    lines += ["## Against the targets", "", *target_lines(results["sections"]), *signal_lines(results), "",
              f"![methods]({chart_name})", ""]
    return "\n".join(lines)


def seeds_of(section: dict) -> int:
    """How many seeds the section's students were trained with (the most of any row)."""
    rows = [e for e in section.values() if isinstance(e, dict)]
    rows += [e[m] for e in rows for m in ("CT", "MR") if isinstance(e.get(m), dict)]  # unpaired variants
    return max((len(e["seed_means"]) for e in rows if "seed_means" in e and e is not section.get("teacher")),
               default=0)


def wall_time(section: dict) -> list[str]:
    if "wall_seconds" not in section:
        return []
    return [f"Students trained with {seeds_of(section)} seed(s); wall time {section['wall_seconds'] / 60:.0f} min "
            "(one core, shared with the other sections' processes).", ""]


def separate_student(sections: dict, modality: str, method: str) -> dict | None:
    """The ``method`` row of the ``modality`` section: a separately trained student of the same size."""
    entry = sections.get(modality, {}).get(method)
    return entry if isinstance(entry, dict) and "mean" in entry else None


def separate_for(sections: dict, variant: dict, modality: str) -> dict | None:
    """The separate student a shared-student variant is compared with: trained in the unpaired section on
    the same volumes (runs before that existed: the modality section's row of the baseline method)."""
    own = variant.get("separate", {}).get(modality)
    return own if own else separate_student(sections, modality, variant["baseline"])


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and sd over seeds of a − b (NaN when the runs do not pair up)."""
    if not a or len(a) != len(b):
        return math.nan, math.nan
    d = np.subtract(a, b)
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else math.nan


def target_lines(sections: dict) -> list[str]:
    """The issue's three targets, checked on this run's figures (means over seeds)."""
    lines = []
    for key in ("CT", "MR"):
        section = sections.get(key, {})
        methods = {n: e for n, e in section.items() if isinstance(e, dict) and "gap_closed" in e
                   and n not in ("teacher", "scratch", "assistant", "assistant-scratch", "teacher-half-res")}
        if methods:
            best = max(methods, key=lambda n: methods[n]["mean"])
            gap = methods[best]["gap_closed"]
            if missing(gap):
                difference = section["teacher"]["mean"] - section.get("scratch", {}).get("mean", math.nan)
                if difference <= 0:
                    lines.append(f"- Phantom {key}: the student trained from scratch is already "
                                 f"{-difference:.3f} Dice above the teacher: there is no gap to close "
                                 f"(best method `{best}`, {signed(methods[best].get('vs_scratch'))} vs scratch).")
                continue
            lines.append(f"- Phantom {key}: best method `{best}` closes {percent(gap)} of a "
                         f"{section['teacher']['mean'] - section['scratch']['mean']:.3f} Dice gap "
                         f"(target ≥ 50 %: {'met' if gap >= 0.5 else 'missed'}).")
        lines += capacity_line(key, section)
    for variant, u in sections.get("unpaired", {}).items():
        if not isinstance(u, dict) or "CT" not in u:
            continue
        own = {m: separate_for(sections, u, m) for m in ("CT", "MR")}
        known = [m for m in ("CT", "MR") if own[m] is not None]
        better = [m for m in known if u[m]["mean"] > own[m]["mean"]]
        worse = [m for m in known if u[m]["mean"] < own[m]["mean"]]
        met = bool(better) and not worse
        lines.append(f"- Unpaired ({variant}): the shared student is better on {', '.join(better) or 'no modality'} "
                     f"and worse on {', '.join(worse) or 'none'} than the separate `{u['baseline']}` students "
                     f"(target: better on one, not worse on the other: {'met' if met else 'missed'}).")
    if "semi" in sections:
        semi = sections["semi"]
        co, sup = semi["coteacher"]["mean"], semi["scratch"]["mean"]
        gain, sd = semi["coteacher"].get("vs_scratch"), semi["coteacher"].get("vs_scratch_sd")
        seeds = semi["coteacher"]["paired_seeds"]
        error = math.nan if missing(sd) else sd / math.sqrt(seeds)
        difference = signed(gain, sd) + (f" over {seeds} seeds, standard error {error:.3f}"
                                         + (", within two of zero" if abs(gain) < 2 * error else "")
                                         if not missing(error) else "")
        verdict = ("missed" if missing(gain) or gain <= 0 else "met" if missing(error) or gain > 2 * error
                   else "better on the mean, not beyond the noise of the seeds")
        everything = semi.get("all-labels")
        ceiling = "" if not everything else (
            f" With every volume's labels the same student scores {everything['mean']:.3f} "
            f"({signed(everything.get('vs_scratch'), everything.get('vs_scratch_sd'))} paired): the most that "
            "the unlabelled volumes could add.")
        lines.append(f"- Semi-supervised: co-teacher {co:.3f} vs supervised-only {sup:.3f} with the same labels, "
                     f"paired difference {difference} "
                     f"(target: co-teacher better: {verdict}).{ceiling}")
    return lines


SIGNAL = ROOT / "docs" / "teacher_signal.json"  # scripts/teacher_signal.py
OVERFITTING = 0.05  # training minus test Dice above which a student is read as short of data


def signal_lines(results: dict) -> list[str]:
    """Why a distillation loss can or cannot help on each data set, from scripts/teacher_signal.py's figures
    (measured on the coarse grid at one budget: only for a run of the same)."""
    signal = json.loads(SIGNAL.read_text()) if SIGNAL.exists() else {}
    if signal.get("steps") != results.get("steps") or results.get("grid", "coarse") != "coarse":
        return []
    targets = {t["section"]: t for t in signal["teacher_targets"]}
    lines = []
    for row in signal["fits"]:
        if not row["network"].startswith("student"):
            continue
        target = targets[row["section"]]
        lines.append(f"- Why ({row['section']}, [teacher_signal.md](teacher_signal.md)): on the training volumes the "
                     f"teacher's arg-max differs from the labels at {100 * target['disagreement']:.1f} % of voxels "
                     f"and its targets leave {100 * target['off_label_mass_boundary']:.0f} % of the probability off "
                     f"the label on boundary voxels; the student trained from labels scores {row['train']:.3f} on "
                     f"its training volumes and {row['test']:.3f} on the test volumes ("
                     + (f"within {OVERFITTING:g}: short of capacity, not of data, so a target that only regularises "
                        "cannot raise it)." if row["train_minus_test"] < OVERFITTING
                        else f"more than {OVERFITTING:g} apart: short of data, where a teacher's targets can help)."))
    return lines


def capacity_line(key: str, section: dict) -> list[str]:
    """The same comparison one size up: `kd` (the `assistant` row) against the assistant trained from scratch."""
    big, alone = section.get("assistant"), section.get("assistant-scratch")
    if not big or not alone:
        return []
    gap = section["teacher"]["mean"] - alone["mean"]
    closed = (big["mean"] - alone["mean"]) / gap if gap > 1e-6 else math.nan
    difference = signed(*paired(big["seed_means"], alone["seed_means"]))
    return [f"- Phantom {key}, one size up (the {big['parameters'] / 1e6:.2f} M assistant): from scratch "
            f"{alone['mean']:.3f}, with `kd` {big['mean']:.3f} ({difference} paired), closing {percent(closed)} "
            "of its own gap to the teacher (not a target; a capacity check)."]


def chart(results: dict, path: Path) -> None:
    """Per section, each row's Dice over scratch (paired by seed, with its sd), the 50 % target (half the
    scratch→teacher gap) dashed: Dice bars on a 0–1 axis would hide differences of a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [(k, results["sections"][k]) for k in ("CT", "MR", "semi", "brats")
                if k in results["sections"] and "skipped" not in results["sections"][k]]
    rows = max((sum(isinstance(e, dict) and "mean" in e for e in v.values()) for _, v in sections), default=0)
    figure, axes = plt.subplots(1, max(len(sections), 1), figsize=(5 * max(len(sections), 1), max(4, 0.3 * rows + 1)),
                                squeeze=False)
    for axis, (key, section) in zip(axes[0], sections):
        scratch = section["scratch"]["mean"]
        names = [n for n, e in section.items() if isinstance(e, dict) and "mean" in e and n != "scratch"]
        gains = [section[n]["mean"] - scratch if n in UNTRAINED or missing(section[n].get("vs_scratch"))
                 else section[n]["vs_scratch"] for n in names]
        spread = [0.0 if missing(section[n].get("vs_scratch_sd")) else section[n]["vs_scratch_sd"] for n in names]
        colors = ["#555555" if n in UNTRAINED else "#999999" if n.startswith("assistant") or n == "all-labels"
                  else "#3b7dd8" for n in names]
        axis.barh(names, gains, xerr=spread, color=colors)
        axis.axvline(0, color="black", linewidth=0.8)
        gap = section["teacher"]["mean"] - scratch
        if gap > 0:
            axis.axvline(gap / 2, color="#d83b3b", linestyle="--", linewidth=1, label="50 % of the gap")
            axis.legend(loc="lower right")
        axis.set_title(f"{key}: scratch {scratch:.3f}, teacher {section['teacher']['mean']:.3f}")
        axis.set_xlabel("Dice − scratch (paired by seed; bars: sd over seeds)")
        axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def check_more_seeds(results: dict, sections: list[str], methods: list[str] | None, first: int, parser) -> None:
    """--first-seed K adds seeds to existing rows: each must exist with seeds 0..K-1 (checked before training)."""
    if not methods or "unpaired" in sections:
        parser.error("--first-seed needs --methods and a section other than unpaired")
    for section in sections:
        for method in methods:
            runs = len(results["sections"].get(section, {}).get(method, {}).get("runs", []))
            if runs != first:
                parser.error(f"--first-seed {first}: the {section} row '{method}' has {runs} seed(s), not {first}; "
                             f"run it with --seeds {first} first")


def with_more_seeds(previous: dict, new: dict) -> dict:
    """A summarised row with another run's seeds after its own (mean training time weighted by seeds)."""
    before, after = len(previous["runs"]), len(new["runs"])
    seconds = [t for t, n in ((previous.get("seconds"), before), (new.get("seconds"), after)) for _ in range(n) if t]
    return {**new, "runs": previous["runs"] + new["runs"], "seconds": float(np.mean(seconds)) if seconds else []}


def load_results(output: Path) -> dict:
    """The results file, each method section re-summarised from its runs (older files then read as new ones)."""
    path = output.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {"sections": {}}
    for section in results["sections"].values():
        if "runs" in section.get("teacher", {}):
            summarise(section)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["CT", "MR", "unpaired", "semi", "brats"])
    parser.add_argument("--steps", type=int, default=300, help="training steps per student")
    parser.add_argument("--teacher-steps", type=int, default=1500, help="steps for teachers trained here")
    parser.add_argument("--seeds", type=int, default=1, help="student runs per method (seeds 0..N-1)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="with --methods: run seeds K..K+N-1 and add them to rows that have seeds 0..K-1")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=4.0, help="KD temperature (kd, ctkd start, multi-teacher)")
    parser.add_argument("--methods", nargs="+",
                        help="only these methods (unpaired section: variants kd, none); their rows replace those of "
                             "an earlier run in the results file")
    parser.add_argument("--cases", type=int, nargs=2, metavar=("TRAIN", "TEST"), help="phantom counts (quick check)")
    parser.add_argument("--unpaired-cases", type=int,
                        help="training volumes per modality in the unpaired section (default: as the others)")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="coarse",
                        help="phantom grid: coarse (6 mm, teachers trained here) or bundled (3 mm, shipped teachers)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmark_methods"))
    parser.add_argument("--render", action="store_true", help="only re-write <output>.md and .png from its .json")
    args = parser.parse_args()
    global SPACING, PATCH, BUNDLED_TEACHERS
    SPACING, PATCH, BUNDLED_TEACHERS = (GRIDS[args.grid][k] for k in ("spacing", "patch", "bundled_teachers"))
    if args.threads:
        torch.set_num_threads(args.threads)
    steps_per_epoch = 25
    config = TrainingConfig(epochs=max(1, args.steps // steps_per_epoch), steps_per_epoch=steps_per_epoch,
                            batch_size=2, patch_size=PATCH, learning_rate=1e-2, kd_temperature=args.temperature,
                            validation_fraction=0.0, device="cpu",
                            # The curriculum spans a third of these short runs (CTKD's paper: 10 of 240+ epochs).
                            ctkd_epochs=max(1, args.steps // steps_per_epoch // 3))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.cases:
        global TRAIN_CASES, TEST_CASES
        TRAIN_CASES, TEST_CASES = args.cases
    if args.methods:
        PHANTOM_METHODS[:], SEMI_METHODS[:], BRATS_METHODS[:], MR_METHODS[:] = [args.methods] * 4
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    if args.first_seed:
        check_more_seeds(load_results(output), args.sections, args.methods, args.first_seed, parser)
    for section in [] if args.render else args.sections:
        started = time.perf_counter()
        if section in ("CT", "MR"):
            methods = PHANTOM_METHODS if section == "CT" else MR_METHODS
            result = phantom_section(section, methods, config, args.teacher_steps, seeds)
        elif section == "unpaired":
            variants = [v for v in UNPAIRED_VARIANTS if not args.methods or v in args.methods]
            result = unpaired_section(config, args.teacher_steps, args.seeds, variants,
                                      args.unpaired_cases or TRAIN_CASES)
        elif section == "semi":
            result = semi_section(config, args.teacher_steps, seeds)
        elif section == "brats":
            result = brats_section(config, args.teacher_steps, seeds)
        else:
            parser.error(f"unknown section {section}")
        result["wall_seconds"] = time.perf_counter() - started
        # Merged into the results file after each section: sections can run in separate processes,
        # and a stopped run keeps the figures it has.
        with open(output.with_suffix(".lock"), "w") as lock:  # another process may be merging its section
            fcntl.flock(lock, fcntl.LOCK_EX)
            results = load_results(output)
            previous = results["sections"].get(section)
            if args.methods and previous and section == "unpaired":
                result = {**previous, **result, "wall_seconds": previous.get("wall_seconds", 0.0)
                          + result["wall_seconds"]}  # the variants run here replace theirs only
            elif args.methods and previous and "skipped" not in previous:
                # A re-run of some methods replaces only those rows (same teacher, same seeds); more seeds
                # (--first-seed) are added to them.
                wall = previous.get("wall_seconds", 0.0) + result["wall_seconds"]
                rows = {k: v for k, v in result.items() if k != "teacher" and isinstance(v, dict) and "runs" in v}
                if args.first_seed:
                    rows = {k: with_more_seeds(previous[k], v) for k, v in rows.items()
                            if len(previous.get(k, {}).get("runs", [])) == args.first_seed}
                result = summarise({**previous, **rows})
                result["wall_seconds"] = wall
            results["sections"][section] = result
            results |= {"machine": machine_description(), "steps": args.steps, "batch_size": config.batch_size,
                        "teacher_steps": args.teacher_steps, "grid": args.grid, "temperature": args.temperature,
                        "seeds": args.seeds,
                        "phantom_cases": {"train": TRAIN_CASES, "test": TEST_CASES}}
            write_json(results, output.with_suffix(".json"))
    results = load_results(output)
    write_text(render(results, output.with_suffix(".png").name), output.with_suffix(".md"))
    chart(results, output.with_suffix(".png"))
    print(render(results, output.with_suffix(".png").name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
