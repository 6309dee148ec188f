"""Privileged information (KD-Net, Hu et al. MICCAI 2020): a teacher that also sees the CT of the same subject,
an MR-only student (issue 16, section 2 of the redesigned benchmark).

    scripts/medkd-python scripts/benchmark_privileged.py [--labelled 2] [--seeds 6] [--processes 2]
    scripts/medkd-python scripts/benchmark_privileged.py --brats [--seeds 3]

Protocol, fixed before any run (nothing here is chosen on the test volumes):
- Phantom abdominal MR on section 1's coarse 6 mm grid (patches 24x48x48), each with the CT of the same phantom
  subject (the generator fixes anatomy by seed across modalities) on the same model grid, CT-normalised, as the
  privileged channel. Students see the MR alone, at training and at test time.
- Teachers (the methods benchmark's MONAI UNet, 1500 steps, 20 labelled subjects): ``MR`` (MR only) and
  ``CT+MR`` (both channels), trained once and fixed.
- Students (FastStudent, 46 k parameters, 600 steps of batch 2) on 40 other subjects, ``--labelled`` k with
  labels (section 1's label-scarce regime, where a teacher has something to give):
  ``scratch`` (Dice + CE on the k), ``kd-mr`` (+ weight·T²·KL to the MR teacher), ``kd-ct+mr`` (the same, to
  the CT+MR teacher), ``kdnet`` (KD-Net: Dice + CE + weight·T²·KL + the bottleneck-feature term ``hint`` at its
  default weight, to the CT+MR teacher), and the ceiling ``all-labels`` (all 40 labelled).
- Each teacher row's (T, weight) is chosen on 10 validation subjects with seed 0 from T ∈ {1, 4} x
  weight ∈ {0.5, 1, 2}.
- Seeds 0..n-1 (same initial weights and batches for every row); test: 20 held-out subjects, each volume's
  score its mean Dice over structures.
- Primary comparison, declared here: ``kdnet`` against ``kd-mr`` (the KD-Net student against the student of
  a mono-modal teacher). Secondary, Holm-corrected with it: ``kdnet`` against ``scratch`` and ``kd-ct+mr``
  against ``kd-mr``. Intervals: section 1's 95 % hierarchical bootstrap (seeds, then volumes).
Writes docs/benchmark_privileged.{md,json}, with the machine; resumable per run (finished runs are kept under build/).

``--brats``, the real smoke test, also fixed before any run: BRATS 2013 FLAIR with the same subjects' T1c as the
privileged channel, on the methods benchmark's 4 mm grid (patches 24x48x48); teachers ``FLAIR`` and
``FLAIR+T1c`` (MONAI UNet, 1500 steps) and FLAIR-only students (FastStudent, 600 steps) on the 4 labelled
``train/`` + ``validation/`` subjects: ``scratch``, ``kd-flair`` (kd:1 to the FLAIR teacher) and ``kdnet``
(kd:1+hint to the FLAIR+T1c teacher), all at T = 1, the CLI's default (no validation subjects are left for a
grid). Scored on the 2 ``test/`` subjects in the BraTS regions: whole tumour (labels 1-4), tumour core (1, 3, 4)
and enhancing tumour (4). Two test volumes: a smoke test of the method on real multi-modal MRI, not an
estimate; no interval is given. Writes docs/benchmark_privileged_brats.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedKDSegment"))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_label_scarce import CONFIG, STEPS, TEACHER_STEPS, hierarchical_bootstrap, log  # noqa: E402
from benchmark_methods import BRATS, BRATS_PATCH, BRATS_PROFILE, BRATS_SPACING, WORK, brats_cases, grid_profile, train  # noqa: E402, E501

from MedKDSegmentLib.engine.bundle import BundleError, load_bundle, save_bundle  # noqa: E402
from MedKDSegmentLib.engine.data import Case  # noqa: E402
from MedKDSegmentLib.engine.device import select_device  # noqa: E402
from MedKDSegmentLib.engine.labels import ABDOMEN_STRUCTURES, BRATS_STRUCTURES, Structure  # noqa: E402
from MedKDSegmentLib.engine.measure import machine_description  # noqa: E402
from MedKDSegmentLib.engine.metrics import dice_per_label  # noqa: E402
from MedKDSegmentLib.engine.networks import STUDENT_CONFIG, TEACHER_CONFIG, build_network, input_channels  # noqa: E402
from MedKDSegmentLib.engine.phantom import case_seed, generate_phantom  # noqa: E402
from MedKDSegmentLib.engine.prediction import predict_labels  # noqa: E402
from MedKDSegmentLib.engine.profiles import Profile, labels_to_model_grid, to_model_grid  # noqa: E402
from MedKDSegmentLib.engine.report import markdown_table  # noqa: E402
from MedKDSegmentLib.engine.training import fit, with_input_channels  # noqa: E402

TEACHER_CASES, POOL_CASES, VALIDATION_CASES, TEST_CASES = 20, 40, 10, 20
TEACHER_SEED, POOL_SEED, VALIDATION_SEED, TEST_SEED = 0, 6161, 8181, 7171  # disjoint sets of phantom subjects
ROWS = ("scratch", "kd-mr", "kd-ct+mr", "kdnet", "all-labels")
TEACHER_OF = {"kd-mr": "MR", "kd-ct+mr": "CT+MR", "kdnet": "CT+MR"}
GRID = [(t, w) for t in (1.0, 4.0) for w in (0.5, 1.0, 2.0)]
COMPARISONS = [("kdnet", "kd-mr"), ("kdnet", "scratch"), ("kd-ct+mr", "kd-mr")]  # the first is primary
LABELS = [s.value for s in ABDOMEN_STRUCTURES]
CLASSES = len(ABDOMEN_STRUCTURES) + 1
OUTPUT = ROOT / "docs" / "benchmark_privileged"
BRATS_ROWS = {"scratch": None, "kd-flair": "FLAIR", "kdnet": "FLAIR+T1c"}  # row: its teacher
BRATS_METHOD = {"scratch": "none", "kd-flair": "kd:1", "kdnet": "kd:1+hint"}
BRATS_REGIONS = {"whole tumour": (1, 2, 3, 4), "tumour core": (1, 3, 4), "enhancing tumour": (4,)}
BRATS_CLASSES = len(BRATS_STRUCTURES) + 1


def paired(count: int, seed: int) -> list[Case]:
    """MR cases with the same subjects' CT as a privileged channel, kept on disk for every process and row."""
    path = WORK / f"privileged-mr-ct-{count}-{seed}.npz"
    if not path.exists():
        arrays = {}
        for index in range(count):
            mr, labels = generate_phantom("MR", case_seed(seed, index))
            ct, _ = generate_phantom("CT", case_seed(seed, index))
            image, grid = to_model_grid(mr, grid_profile("MR"))
            privileged, _ = to_model_grid(ct, grid_profile("CT"))
            if privileged.shape != image.shape:
                raise SystemExit(f"subject {index}: CT and MR model grids differ ({privileged.shape}, {image.shape})")
            arrays |= {f"image{index}": image, f"ct{index}": privileged,
                       f"labels{index}": labels_to_model_grid(labels, grid)}
        WORK.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)
    stored = np.load(path)
    return [Case(f"MR-{seed}-{i}", stored[f"image{i}"], stored[f"labels{i}"], privileged=stored[f"ct{i}"][None])
            for i in range(count)]


def trained_teacher(name: str, kind: str, cases: Callable[[], list[Case]], profile: Profile,
                    structures: tuple[Structure, ...], patch: tuple[int, int, int] = CONFIG.patch_size
                    ) -> torch.nn.Module:
    """A teacher of ``kind`` ("A+B": two input channels), trained once (Dice + CE on ``cases()``) and kept in WORK."""
    folder = WORK / f"teacher-{name}-{kind.lower().replace('+', '-')}-{TEACHER_STEPS}"
    if not folder.exists():
        log(f"training the {name} {kind} teacher ({TEACHER_STEPS} steps)")
        architecture = with_input_channels(TEACHER_CONFIG, 2 if "+" in kind else 1)
        config = replace(CONFIG, methods="none", epochs=TEACHER_STEPS // CONFIG.steps_per_epoch, learning_rate=5e-3,
                         patch_size=patch)
        network = train(architecture, len(structures) + 1, cases(), config)
        try:
            save_bundle(folder, network, name=folder.name, role="teacher", architecture=architecture,
                        profile=profile, structures=structures, method={"name": "supervised"},
                        description=f"{name} benchmark teacher ({kind})")
        except BundleError:
            pass  # the other process saved the same teacher first
    return load_bundle(folder).load_network()


def teacher(kind: str) -> torch.nn.Module:
    """The phantom ``MR`` or ``CT+MR`` teacher, on the 20 labelled subjects."""
    return trained_teacher("privileged", kind, lambda: paired(TEACHER_CASES, TEACHER_SEED), grid_profile("MR"),
                           ABDOMEN_STRUCTURES)


def dice_per_case(network: torch.nn.Module, cases: list[Case]) -> list[float]:
    """Each volume's mean Dice over structures, the network given the channels it takes."""
    device = select_device("cpu")
    means = []
    for case in cases:
        predicted = predict_labels(network, case.inputs(input_channels(network)), device)
        means.append(float(np.nanmean(list(dice_per_label(predicted, case.labels, LABELS).values()))))
    return means


def student(row: str, seed: int, labelled: int, setting: tuple, evaluation: str) -> tuple:
    """One MR student: (row, seed, labelled, setting, evaluation, Dice per volume, seconds).

    Each finished run is kept in WORK, so an interrupted benchmark resumes where it stopped.
    """
    record = WORK / "privileged-runs" / f"{row}-{seed}-{labelled}-{setting[0]}-{setting[1]}-{evaluation}.json"
    if record.exists():
        dice, seconds = json.loads(record.read_text())
        return row, seed, labelled, setting, evaluation, dice, seconds
    torch.set_num_threads(1)
    started = time.perf_counter()
    pool = paired(POOL_CASES, POOL_SEED)
    if row != "all-labels":
        pool = [replace(c, labels=c.labels if i < labelled else None) for i, c in enumerate(pool)]
    model = teacher(TEACHER_OF[row]) if row in TEACHER_OF else None
    temperature, weight = setting
    methods = {"kd-mr": f"kd:{weight:g}", "kd-ct+mr": f"kd:{weight:g}", "kdnet": f"kd:{weight:g}+hint"}
    config = replace(CONFIG, seed=seed, methods=methods.get(row, "none"), kd_temperature=temperature or 4.0)
    if model is None:
        pool = [c for c in pool if c.labels is not None]
    torch.manual_seed(seed)
    network = build_network(STUDENT_CONFIG, CLASSES)
    with tempfile.TemporaryDirectory() as folder:
        fit(network, CLASSES, pool, config, Path(folder) / "checkpoint", teacher=model)
    cases = paired(TEST_CASES, TEST_SEED) if evaluation == "test" else paired(VALIDATION_CASES, VALIDATION_SEED)
    dice, seconds = dice_per_case(network.eval(), cases), time.perf_counter() - started
    record.parent.mkdir(parents=True, exist_ok=True)
    record.with_suffix(".part").write_text(json.dumps([dice, seconds]))
    record.with_suffix(".part").replace(record)
    return row, seed, labelled, setting, evaluation, dice, seconds


def run(jobs: list[tuple], processes: int) -> list[tuple]:
    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(student, *zip(*jobs)))


def holm(p_values: list[float], alpha: float = 0.05) -> list[bool]:
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    significant, still = [False] * len(p_values), True
    for rank, index in enumerate(order):
        still = still and p_values[index] <= alpha / (len(p_values) - rank)
        significant[index] = still
    return significant


def brats_training() -> list[Case]:
    """The 4 labelled training subjects (``train/`` and ``validation/``): FLAIR, with T1c as privileged channel."""
    return brats_cases("train", True) + brats_cases("validation", True)


def brats_teacher(kind: str) -> torch.nn.Module:
    """The BRATS ``FLAIR`` or ``FLAIR+T1c`` teacher, on the 4 training subjects."""
    return trained_teacher("privileged-brats", kind, brats_training, BRATS_PROFILE, BRATS_STRUCTURES, BRATS_PATCH)


def region_dice(network: torch.nn.Module, cases: list[Case]) -> dict[str, list[float]]:
    """Dice of each BraTS region on each case (NaN where neither prediction nor truth has the region)."""
    scores: dict[str, list[float]] = {region: [] for region in BRATS_REGIONS}
    for case in cases:
        predicted = predict_labels(network, case.inputs(input_channels(network)), select_device("cpu"))
        for region, labels in BRATS_REGIONS.items():
            scores[region].append(dice_per_label(np.isin(predicted, labels), np.isin(case.labels, labels), [1])[1])
    return scores


def brats_student(row: str, seed: int) -> tuple[str, int, dict, float]:
    """One FLAIR-only student: (row, seed, Dice of each region on each test subject, seconds); resumable."""
    record = WORK / "privileged-brats-runs" / f"{row}-{seed}.json"
    if record.exists():
        scores, seconds = json.loads(record.read_text())
        return row, seed, scores, seconds
    torch.set_num_threads(1)
    started = time.perf_counter()
    kind = BRATS_ROWS[row]
    config = replace(CONFIG, seed=seed, methods=BRATS_METHOD[row], kd_temperature=1.0, patch_size=BRATS_PATCH)
    torch.manual_seed(seed)
    network = build_network(STUDENT_CONFIG, BRATS_CLASSES)
    with tempfile.TemporaryDirectory() as folder:
        fit(network, BRATS_CLASSES, brats_training(), config,
            Path(folder) / "checkpoint", teacher=brats_teacher(kind) if kind else None)
    scores, seconds = region_dice(network.eval(), brats_cases("test", True)), time.perf_counter() - started
    record.parent.mkdir(parents=True, exist_ok=True)
    record.with_suffix(".part").write_text(json.dumps([scores, seconds]))
    record.with_suffix(".part").replace(record)
    return row, seed, scores, seconds


def brats_main(seeds: int, processes: int) -> int:
    if not BRATS.is_dir():
        raise SystemExit(f"{BRATS} is absent: the BRATS smoke test needs ../shared/data")
    started = time.perf_counter()
    test = brats_cases("test", True)
    teachers = {kind: region_dice(brats_teacher(kind), test) for kind in ("FLAIR", "FLAIR+T1c")}
    log("teachers on test: " + str(teachers))
    jobs = [(row, seed) for row in BRATS_ROWS for seed in range(seeds)]
    with ProcessPoolExecutor(processes) as pool:
        results = list(pool.map(brats_student, *zip(*jobs)))
    subjects = [case.name for case in test]
    rows = {f"teacher {kind}": {"seeds": {"-": scores}} for kind, scores in teachers.items()}
    for row, seed, scores, seconds in results:
        rows.setdefault(row, {"seeds": {}, "seconds": []})
        rows[row]["seeds"][str(seed)] = scores
        rows[row]["seconds"].append(seconds)
    for row in rows.values():  # mean over seeds, per region and subject
        row["mean"] = {region: [float(np.mean([s[region][i] for s in row["seeds"].values()]))
                                for i in range(len(subjects))] for region in BRATS_REGIONS}
    differences = {f"{a} - {b}": {region: [float(np.mean(rows[a]["seeds"][str(k)][region]) -
                                                np.mean(rows[b]["seeds"][str(k)][region])) for k in range(seeds)]
                                      for region in BRATS_REGIONS}
                   for a, b in (("kdnet", "kd-flair"), ("kdnet", "scratch"), ("kd-flair", "scratch"))}
    machine = machine_description()
    result = {"machine": machine, "seeds": seeds, "test_subjects": subjects, "rows": rows,
              "differences_per_seed": differences, "minutes": (time.perf_counter() - started) / 60}
    output = OUTPUT.with_name(OUTPUT.name + "_brats")
    output.with_suffix(".json").write_text(json.dumps(result, indent=1))
    table = []
    for name, row in rows.items():
        entry = {"row": name}
        for region in BRATS_REGIONS:
            per_subject = row["mean"][region]
            entry[region] = f"{np.mean(per_subject):.3f} ({', '.join(f'{v:.3f}' for v in per_subject)})"
        entry["s per run"] = f"{np.mean(row['seconds']):.0f}" if "seconds" in row else ""
        table.append(entry)
    lines = [
        "# Privileged information on real MRI: a FLAIR+T1c teacher, a FLAIR-only student (issue 16, section 2)",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, one thread per run. "
        f"Reproduce: `scripts/medkd-python scripts/benchmark_privileged.py --brats --seeds {seeds}`. The protocol "
        f"is the script's docstring, fixed before the run ({result['minutes']:.0f} min).",
        "",
        f"BRATS 2013, 4 training subjects (all labelled), {len(subjects)} test subjects ({', '.join(subjects)}), "
        f"{BRATS_SPACING:g} mm grid; students FastStudent, {STEPS} steps, {seeds} seeds, T = 1, weight 1. "
        "Dice per BraTS region: mean over test subjects (each subject's Dice, averaged over seeds). Two test "
        "volumes: a smoke test, not an estimate.",
        "",
        markdown_table(table, {key: key for key in table[0]}),
        "",
        "| difference (per seed, mean over subjects) | " + " | ".join(BRATS_REGIONS) + " |",
        "|---|" + "---|" * len(BRATS_REGIONS),
    ]
    for name, by_region in differences.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{np.mean(v):+.3f} ({', '.join(f'{x:+.3f}' for x in v)})" for v in by_region.values()) + " |")
    lines.append("")
    output.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelled", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=None, help="6 for the phantoms, 3 for --brats")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--brats", action="store_true", help="the real FLAIR+T1c -> FLAIR smoke test")
    args = parser.parse_args()
    if args.brats:
        return brats_main(args.seeds or 3, args.processes)
    args.seeds = args.seeds or 6
    started = time.perf_counter()
    for kind in ("MR", "CT+MR"):  # trained before the pool starts: one process each time
        teacher(kind)
    test = paired(TEST_CASES, TEST_SEED)
    teacher_dice = {kind: dice_per_case(teacher(kind), test) for kind in ("MR", "CT+MR")}
    log("teachers on test: " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in teacher_dice.items()))

    validation = run([(row, 0, args.labelled, setting, "validation") for row in TEACHER_OF for setting in GRID],
                     args.processes)
    scores = {(row, setting): float(np.mean(dice)) for row, _, _, setting, _, dice, _ in validation}
    chosen = {row: max(GRID, key=lambda s, r=row: scores[(r, s)]) for row in TEACHER_OF}
    log(f"chosen on validation: {chosen}")

    jobs = [(row, seed, args.labelled, chosen.get(row, (None, 0.0)), "test") for row in ROWS
            for seed in range(args.seeds)]
    results = run(jobs, args.processes)
    dice = {(row, seed): d for row, seed, _, _, _, d, _ in results}
    seconds = {row: float(np.mean([s for r, *_, s in results if r == row])) for row in ROWS}
    matrix = {row: np.array([dice[(row, s)] for s in range(args.seeds)]) for row in ROWS}
    comparisons = []
    for better, worse in COMPARISONS:
        low, high, p = hierarchical_bootstrap(matrix[better] - matrix[worse])
        difference = float((matrix[better] - matrix[worse]).mean())
        comparisons.append({"row": better, "against": worse, "difference": difference, "ci95": [low, high],
                            "p_one_sided": p})
    for comparison, significant in zip(comparisons, holm([c["p_one_sided"] for c in comparisons])):
        comparison["significant_after_holm"] = significant
    gap = float(matrix["all-labels"].mean() - matrix["scratch"].mean())
    machine = machine_description()
    result = {
        "machine": machine, "labelled": args.labelled, "seeds": args.seeds, "test_volumes": TEST_CASES,
        "teachers_test_dice": {k: float(np.mean(v)) for k, v in teacher_dice.items()},
        "chosen": {row: list(setting) for row, setting in chosen.items()},
        "validation": {f"{row} T={s[0]:g} w={s[1]:g}": v for (row, s), v in scores.items()},
        "rows": {row: {"mean": float(matrix[row].mean()), "sd_over_seeds": float(matrix[row].mean(axis=1).std()),
                       "gap_closed": (float(matrix[row].mean() - matrix["scratch"].mean()) / gap) if gap > 0 else None,
                       "seconds_per_run": seconds[row]} for row in ROWS},
        "comparisons": comparisons, "minutes": (time.perf_counter() - started) / 60,
    }
    OUTPUT.with_suffix(".json").write_text(json.dumps(result, indent=1))
    table = [{"row (chosen setting)": row + (f" (T={chosen[row][0]:g}, w={chosen[row][1]:g})" if row in chosen else ""),
              "test Dice (mean ± sd over seeds)": f"{r['mean']:.3f} ± {r['sd_over_seeds']:.3f}",
              "gap closed": "" if r["gap_closed"] is None or row == "scratch" else f"{100 * r['gap_closed']:.0f} %",
              "s per run": f"{r['seconds_per_run']:.0f}"} for row, r in result["rows"].items()]
    lines = [
        "# Privileged information: a CT+MR teacher, an MR-only student (issue 16, section 2)",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, one thread per run. "
        "Reproduce: `scripts/medkd-python scripts/benchmark_privileged.py "
        f"--labelled {args.labelled} --seeds {args.seeds}`. The protocol is the script's docstring, fixed before "
        f"the run ({result['minutes']:.0f} min).",
        "",
        f"Phantom MR on the 6 mm grid, the same subjects' CT as the teacher's privileged channel. Teachers on the "
        f"{TEST_CASES} test subjects: MR only {result['teachers_test_dice']['MR']:.3f}, CT+MR "
        f"{result['teachers_test_dice']['CT+MR']:.3f} mean Dice. Students (MR only): FastStudent, {STEPS} steps, "
        f"{args.labelled} labelled + {POOL_CASES - args.labelled} unlabelled subjects, {args.seeds} seeds; settings "
        f"chosen on {VALIDATION_CASES} validation subjects (seed 0).",
        "",
        markdown_table(table, {key: key for key in table[0]}),
        "",
        "| comparison | difference | 95 % CI (hierarchical bootstrap) | one-sided p | significant after Holm |",
        "|---|---|---|---|---|",
    ]
    for c in comparisons:
        lines.append(f"| {c['row']} vs {c['against']}{' (primary)' if c is comparisons[0] else ''} | "
                     f"{c['difference']:+.4f} | [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | {c['p_one_sided']:.4f} | "
                     f"{'yes' if c['significant_after_holm'] else 'no'} |")
    lines += ["", "Validation Dice of each setting (seed 0): " + "; ".join(
        f"`{k}`: {v:.3f}" for k, v in result["validation"].items()) + ".", ""]
    OUTPUT.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
