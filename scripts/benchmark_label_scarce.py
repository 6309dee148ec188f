"""Distillation where a teacher has something to give: a label-rich teacher, a label-scarce student (issue 16,
section 1 of the redesigned benchmark).

    scripts/medkd-python scripts/benchmark_label_scarce.py [--labelled 1 2 4] [--seeds 3] [--processes 2]

Protocol, fixed before any run (nothing here is chosen on the test volumes):
- Phantom abdominal CT on the methods benchmark's coarse 6 mm grid (patches 24x48x48), so that students
  converge on a 2-core CPU.
- Teacher: the methods benchmark's MONAI UNet, trained once with Dice + CE on 20 labelled phantoms
  (1500 steps), then fixed.
- Students (FastStudent, 46 k parameters), 600 steps of batch 2, on a pool of 40 other phantoms of which
  ``--labelled`` k carry labels (half of each batch labelled) and the rest are unlabelled:
  ``scratch`` (Dice + CE on the k, no teacher), ``kd`` (+ weight·T²·KL to the teacher on every volume),
  ``pseudo`` (+ weight·Dice + CE against the teacher's arg-max on every volume), and the ceiling ``all-labels``
  (Dice + CE with all 40 labelled). Every student keeps its training batch-norm statistics.
- Each teacher row's settings are chosen, per k, on 10 validation phantoms (their own subjects) with seed 0
  from a grid fixed here: weights {0.5, 1, 2} (1 is the papers' default) and, for ``kd``, T ∈ {1, 4}.
- Seeds 0..n-1: seed s gives every row the same initial weights and batches.
- Test: 20 held-out phantoms (their own subjects). Each volume's score is its mean Dice over structures.
- Primary comparison, declared here: ``kd`` against ``scratch``. ``pseudo`` against ``scratch`` is secondary
  (Holm-corrected with the primary). Intervals: 95 % hierarchical bootstrap (seeds, then test volumes within
  each seed), 10,000 resamples, of the paired difference.
- Gap closed = (row − scratch) / (ceiling − scratch), against three ceilings: ``all-labels`` (the share of what
  labelling every volume would give), the teacher, and the teacher seen through the student's output stride
  (its logits averaged over 2³ voxels, then interpolated as the student's are: what a stride-2 student could copy).
Writes docs/benchmark_label_scarce.{md,json,png}, with the machine. ``--render`` re-writes them from the JSON
(recomputing only the teacher's two scores), e.g. after a change of the report.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedKDSegment"))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_methods import PATCH, WORK, dice_per_case, grid_profile, phantom_cases, teacher_for  # noqa: E402

from MedKDSegmentLib.engine.data import Case  # noqa: E402
from MedKDSegmentLib.engine.labels import ABDOMEN_STRUCTURES  # noqa: E402
from MedKDSegmentLib.engine.measure import machine_description  # noqa: E402
from MedKDSegmentLib.engine.networks import STUDENT_CONFIG, build_network  # noqa: E402
from MedKDSegmentLib.engine.report import markdown_table  # noqa: E402
from MedKDSegmentLib.engine.training import TrainingConfig, fit  # noqa: E402

TEACHER_CASES, POOL_CASES, VALIDATION_CASES, TEST_CASES = 20, 40, 10, 20
TEACHER_SEED, POOL_SEED, VALIDATION_SEED, TEST_SEED = 0, 6161, 8181, 7171  # disjoint sets of phantom subjects
STEPS, TEACHER_STEPS = 600, 1500
CONFIG = TrainingConfig(epochs=STEPS // 50, steps_per_epoch=50, batch_size=2, patch_size=PATCH,
                        learning_rate=1e-2, kd_temperature=4.0, kd_weight=1.0, validation_fraction=0.0, device="cpu")
ROWS = ("scratch", "kd", "pseudo", "all-labels")
# The settings each teacher row may take, chosen on validation: (temperature, weight).
GRID = {"kd": [(t, w) for t in (1.0, 4.0) for w in (0.5, 1.0, 2.0)], "pseudo": [(None, w) for w in (0.5, 1.0, 2.0)]}
LABELS = [s.value for s in ABDOMEN_STRUCTURES]
OUTPUT = ROOT / "docs" / "benchmark_label_scarce"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepared(count: int, seed: int) -> list[Case]:
    """``benchmark_methods.phantom_cases``, kept on disk: every process and row reads the same arrays."""
    path = WORK / f"label-scarce-ct-{count}-{seed}.npz"
    if not path.exists():
        cases = phantom_cases("CT", count, seed)
        np.savez_compressed(path, **{f"image{i}": c.image for i, c in enumerate(cases)},
                            **{f"labels{i}": c.labels for i, c in enumerate(cases)})
    stored = np.load(path)
    return [Case(f"CT-{seed}-{i}", stored[f"image{i}"], stored[f"labels{i}"]) for i in range(count)]


def student(row: str, seed: int, labelled: int, setting: tuple, evaluation: str) -> tuple:
    """One student: (row, seed, labelled, setting, evaluation, Dice per volume of the ``evaluation`` set
    ("validation" or "test"), seconds). ``setting``: (temperature, weight) of a teacher row."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    pool = prepared(POOL_CASES, POOL_SEED)
    if row != "all-labels":
        pool = [replace(c, labels=c.labels if i < labelled else None) for i, c in enumerate(pool)]
    teacher = None if row in ("scratch", "all-labels") else teacher_network()
    temperature, weight = setting
    config = replace(CONFIG, seed=seed, methods=f"{row}:{weight:g}" if teacher is not None else "none",
                     kd_temperature=temperature or CONFIG.kd_temperature)
    if teacher is None:
        pool = [c for c in pool if c.labels is not None]  # no teacher: the unlabelled volumes teach nothing
    torch.manual_seed(seed)
    network = build_network(STUDENT_CONFIG, len(ABDOMEN_STRUCTURES) + 1)
    with tempfile.TemporaryDirectory() as folder:
        fit(network, len(ABDOMEN_STRUCTURES) + 1, pool, config, Path(folder) / "checkpoint", teacher=teacher)
    cases = prepared(TEST_CASES, TEST_SEED) if evaluation == "test" else prepared(VALIDATION_CASES, VALIDATION_SEED)
    dice = dice_per_case(network.eval(), cases, LABELS)
    return row, seed, labelled, setting, evaluation, dice, time.perf_counter() - started


class SeenThroughStride(torch.nn.Module):
    """A network whose logits are averaged over ``stride``³ voxels: what a student predicting at that stride
    (``FastStudent.output_stride``) could at best copy of it."""

    def __init__(self, network: torch.nn.Module, stride: int) -> None:
        super().__init__()
        self.network, self.output_stride = network, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(self.network(x), self.output_stride)


def teacher_scores() -> dict:
    """The teacher's mean test Dice, as it is and seen through the student's output stride."""
    network, test = teacher_network().eval(), prepared(TEST_CASES, TEST_SEED)
    stride = build_network(STUDENT_CONFIG, 2).output_stride
    return {"teacher": dice_per_case(network, test, LABELS),
            "teacher_strided": dice_per_case(SeenThroughStride(network, stride), test, LABELS)}


def teacher_network():
    cases = prepared(TEACHER_CASES, TEACHER_SEED)
    return teacher_for("label-rich-ct", cases, grid_profile("CT"), ABDOMEN_STRUCTURES, CONFIG, TEACHER_STEPS,
                       trained_here=True).load_network()


def hierarchical_bootstrap(differences: np.ndarray, resamples: int = 10_000, seed: int = 0
                           ) -> tuple[float, float, float]:
    """Mean and 95 % interval of per-volume paired differences (seeds x volumes): seeds resampled, then
    volumes within each resampled seed. Also returns the one-sided share of resamples at or below zero."""
    rng = np.random.default_rng(seed)
    seeds, volumes = differences.shape
    picks = rng.integers(0, seeds, (resamples, seeds))
    inner = rng.integers(0, volumes, (resamples, seeds, volumes))
    means = differences[picks[..., None], inner].mean(axis=(1, 2))
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high), float((means <= 0).mean())


def summarise(runs: dict, teacher: dict, labelled: int, seeds: int, chosen: dict, validation: dict) -> dict:
    matrix = {row: np.array([runs[(row, s)] for s in range(seeds)]) for row in ROWS}  # seeds x volumes
    scratch, ceiling = matrix["scratch"], matrix["all-labels"]
    gap = float(ceiling.mean() - scratch.mean())
    result = {"labelled": labelled, "seeds": seeds, "test_volumes": TEST_CASES,
              "chosen": {row: list(chosen[row]) for row in chosen},
              "validation": {row: {f"T={t}, w={w:g}" if t else f"w={w:g}": d for (t, w), d in table.items()}
                             for row, table in validation.items()},
              "rows": {}}
    p_values = {}
    for row in ROWS:
        entry = {"mean": float(matrix[row].mean()), "sd_seeds": float(matrix[row].mean(axis=1).std())}
        if row != "scratch":
            low, high, p = hierarchical_bootstrap(matrix[row] - scratch)
            entry |= {"vs_scratch": float((matrix[row] - scratch).mean()), "ci95": [low, high],
                      "gap_closed": float((matrix[row] - scratch).mean() / gap) if gap > 1e-6 else math.nan}
            if row in ("kd", "pseudo"):
                p_values[row] = p
        result["rows"][row] = entry
    add_teacher(result, teacher)
    # Holm over the two teacher rows (one-sided: gain over scratch), kd being the declared primary.
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    for rank, (row, p) in enumerate(ordered):
        result["rows"][row]["p_one_sided"] = p
        result["rows"][row]["holm_significant_5pc"] = bool(
            all(q <= 0.05 / (len(ordered) - i) for i, (_, q) in enumerate(ordered[: rank + 1])))
    return result


def add_teacher(result: dict, teacher: dict) -> None:
    """The teacher's two scores and each row's gap closed against them (means over seeds and volumes)."""
    result |= {key: float(np.mean(teacher[key])) for key in ("teacher", "teacher_strided")}
    scratch = result["rows"]["scratch"]["mean"]
    for entry in result["rows"].values():
        for key, ceiling in (("gap_closed_teacher", result["teacher"]),
                             ("gap_closed_strided", result["teacher_strided"])):
            entry[key] = (entry["mean"] - scratch) / (ceiling - scratch) if ceiling - scratch > 1e-6 else math.nan


def chart(results: list[dict], path: Path) -> None:
    """Test Dice of each row against k, with the three ceilings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    ks = [r["labelled"] for r in results]
    for row, colour in zip(ROWS[:3], ("tab:grey", "tab:blue", "tab:orange")):
        means = [r["rows"][row]["mean"] for r in results]
        low = [r["rows"][row]["mean"] - (r["rows"][row]["vs_scratch"] - r["rows"][row]["ci95"][0])
               if "ci95" in r["rows"][row] else r["rows"][row]["mean"] for r in results]
        high = [r["rows"][row]["mean"] + (r["rows"][row]["ci95"][1] - r["rows"][row]["vs_scratch"])
                if "ci95" in r["rows"][row] else r["rows"][row]["mean"] for r in results]
        axis.plot(ks, means, "-o", color=colour, label=row)
        axis.fill_between(ks, low, high, color=colour, alpha=0.15)
    for key, style, name in (("all-labels", "--", "all-labels student"), ("teacher_strided", ":",
                             "teacher at the student's stride"), ("teacher", "-.", "teacher")):
        level = results[0]["rows"]["all-labels"]["mean"] if key == "all-labels" else results[0][key]
        axis.axhline(level, color="black", linestyle=style, linewidth=1, label=f"{name} ({level:.3f})")
    axis.set_xscale("log", base=2)
    axis.set_xticks(ks, [str(k) for k in ks])
    axis.set_xlabel("labelled phantoms k (of 40)")
    axis.set_ylabel("test Dice (mean over 20 volumes and seeds)")
    axis.set_title("Label-rich teacher, label-scarce student (shaded: 95 % CI of the gain)", fontsize=10)
    axis.legend(fontsize=7, loc="center right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write(results: list[dict], machine: dict, seconds: dict, teacher_machine: dict | None = None) -> None:
    """The Markdown, JSON and chart; ``teacher_machine``: where ``--render`` re-scored the teacher."""
    lines = [
        "# Label-rich teacher, label-scarce student (issue 16, section 1)", "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, one thread per run. "
        f"Reproduce: `scripts/medkd-python scripts/benchmark_label_scarce.py --labelled "
        f"{' '.join(str(r['labelled']) for r in results)} --seeds {results[0]['seeds']}`. The protocol is the "
        "script's docstring, fixed before the run.", "",
        f"Phantom CT, 6 mm grid. Teacher (MONAI UNet, 20 labelled phantoms) on the {TEST_CASES} test phantoms: "
        f"{results[0]['teacher']:.3f} mean Dice, {results[0]['teacher_strided']:.3f} seen through the students' "
        "output stride (logits averaged over 2³ voxels). "
        f"Students: FastStudent (46 k parameters), {STEPS} steps, k labelled "
        f"+ {POOL_CASES} − k unlabelled phantoms (`all-labels`: all {POOL_CASES} labelled), {results[0]['seeds']} "
        "seeds; each teacher row's temperature and weight chosen on 10 validation phantoms (seed 0)."
        + ("" if teacher_machine is None else f" The teacher's two scores were computed again (`--render`) on "
           f"{teacher_machine['cpu']}, {teacher_machine['cores']} cores, the teacher retrained there from the same "
           "seed; the students' rows are the stored run's."), ""]
    for result in results:
        rows = []
        for row in ROWS:
            entry = result["rows"][row]
            ci = entry.get("ci95")
            setting = result["chosen"].get(row)
            label = row if not setting else f"{row} (" + (f"T={setting[0]:g}, " if setting[0] else "") + \
                f"w={setting[1]:g})"
            rows.append({"row": label,
                         "dice": f"{entry['mean']:.3f} ± {entry['sd_seeds']:.3f}",
                         "gain": f"{entry['vs_scratch']:+.4f}" if "vs_scratch" in entry else "",
                         "ci": f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "",
                         "gap": " / ".join(f"{100 * entry[key]:.0f} %" for key in (
                             "gap_closed", "gap_closed_strided", "gap_closed_teacher")) if row != "scratch" else "",
                         "seconds": f"{seconds.get(row, math.nan):.0f}"})
        validation = "; ".join(f"`{row}` " + ", ".join(f"{name}: {dice:.3f}" for name, dice in table.items())
                               for row, table in result["validation"].items())
        lines += [f"## k = {result['labelled']} labelled", "",
                  markdown_table(rows, {"row": "row (chosen setting)", "dice": "test Dice (mean ± sd over seeds)",
                                        "gain": "vs scratch", "ci": "95 % CI (hierarchical bootstrap)",
                                        "gap": "gap closed: all-labels / teacher at stride / teacher",
                                        "seconds": "s per run"}), "",
                  "Primary comparison: `kd` vs `scratch`; `pseudo` is Holm-corrected with it. "
                  + "; ".join(f"`{row}`: one-sided bootstrap p = {result['rows'][row]['p_one_sided']:.4f}, "
                              f"{'significant' if result['rows'][row]['holm_significant_5pc'] else 'not significant'}"
                              " at 5 % after Holm" for row in ("kd", "pseudo")) + ".", "",
                  f"Validation Dice of each setting (seed 0): {validation}.", ""]
    lines += ["Gap closed: the share of the difference between `scratch` and a ceiling that the row recovers "
              "without labels; ceilings: `all-labels` (the same student with every volume labelled), the teacher "
              "seen through the student's output stride, and the teacher.", "",
              f"![test Dice against k]({OUTPUT.name}.png)", ""]
    chart(results, OUTPUT.with_suffix(".png"))
    OUTPUT.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    stored = {"machine": machine, "results": results, "seconds": seconds}
    if teacher_machine is not None:
        stored["teacher_machine"] = teacher_machine
    OUTPUT.with_suffix(".json").write_text(json.dumps(stored, indent=2), encoding="utf-8")


def run(jobs: list[tuple], processes: int) -> list[tuple]:
    with ProcessPoolExecutor(processes) as pool:
        results = []
        for result in pool.map(student, *zip(*jobs)):
            row, seed, labelled, setting, evaluation, dice, took = result
            log(f"k={labelled} {row} {setting} seed {seed} on {evaluation}: {np.mean(dice):.3f} ({took:.0f} s)")
            results.append(result)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelled", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--render", action="store_true",
                        help="re-write the results from the JSON (the teacher's two scores recomputed, no students)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.render:
        stored = json.loads(OUTPUT.with_suffix(".json").read_text(encoding="utf-8"))
        teacher = teacher_scores()
        log(f"teacher {np.mean(teacher['teacher']):.4f} (stored run: {stored['results'][0]['teacher']:.4f}), "
            f"at the students' stride {np.mean(teacher['teacher_strided']):.4f}")
        for result in stored["results"]:
            add_teacher(result, teacher)
        write(stored["results"], stored["machine"], stored["seconds"], machine_description())
        return 0
    for count, seed in ((TEACHER_CASES, TEACHER_SEED), (POOL_CASES, POOL_SEED), (VALIDATION_CASES, VALIDATION_SEED),
                        (TEST_CASES, TEST_SEED)):
        prepared(count, seed)  # once, before the processes start
    log("teacher")
    teacher = teacher_scores()
    log(f"teacher {np.mean(teacher['teacher']):.3f}, at the students' stride {np.mean(teacher['teacher_strided']):.3f}")
    # 1. Each teacher row's setting, per k, on the validation phantoms (seed 0).
    selection = run([(row, 0, k, setting, "validation") for k in args.labelled for row, settings in GRID.items()
                     for setting in settings], args.processes)
    validation = {k: {row: {} for row in GRID} for k in args.labelled}
    for row, _, k, setting, _, dice, _ in selection:
        validation[k][row][setting] = float(np.mean(dice))
    chosen = {k: {row: max(table, key=table.get) for row, table in rows.items()} for k, rows in validation.items()}
    # 2. Every row on the test phantoms with its chosen setting, every seed (all-labels does not depend on k).
    plain = (None, 1.0)
    jobs = [("all-labels", seed, 0, plain, "test") for seed in range(args.seeds)]
    jobs += [(row, seed, k, chosen[k].get(row, plain), "test") for k in args.labelled for seed in range(args.seeds)
             for row in ROWS if row != "all-labels"]
    tested = run(jobs, args.processes)
    seconds: dict[str, list[float]] = {}
    for row, *_, took in tested:
        seconds.setdefault(row, []).append(took)
    results = []
    for k in args.labelled:
        runs = {(row, seed): dice for row, seed, labelled, _, _, dice, _ in tested
                if labelled == k or row == "all-labels"}
        results.append(summarise(runs, teacher, k, args.seeds, chosen[k], validation[k]))
    write(results, machine_description(), {row: float(np.mean(v)) for row, v in seconds.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
