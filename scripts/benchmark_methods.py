"""Distillation methods side by side: same teacher, same student architecture, same budget.

    scripts/medkd-python scripts/benchmark_methods.py [--steps 300] [--sections ct mr unpaired semi brats]

Sections (each trains every listed method from the same seed and evaluates on held-out volumes):
- ``ct`` / ``mr``: phantom abdomen, the bundled teacher of that modality, 12 labelled training phantoms
  (the teachers' own training seeds), 6 held-out test phantoms;
- ``unpaired``: one shared CT + MR student (kernels shared, normalisation per modality, prototype KL)
  against the separately distilled students of the ``ct`` and ``mr`` sections (same architecture,
  same steps: the shared student sees one CT and one MR batch per step);
- ``semi``: 10 % of the CT training phantoms labelled; the teacher is trained on those labels only,
  and the students see the labelled and the unlabelled volumes;
- ``brats``: the real BRATS 2013 FLAIR volumes in ../shared/data (train + validation for training,
  test for reporting), a teacher trained here, students distilled from it.
Per method: mean ± sd Dice over the test volumes (each volume's mean over structures) and the share
of the scratch→teacher gap that it closes. Writes <output>.md, <output>.json and <output>.png.
"""

from __future__ import annotations

import argparse
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

from MedKDSegmentLib.engine.bundle import load_bundle, save_bundle  # noqa: E402
from MedKDSegmentLib.engine.data import Case  # noqa: E402
from MedKDSegmentLib.engine.device import select_device  # noqa: E402
from MedKDSegmentLib.engine.errors import BundleError  # noqa: E402
from MedKDSegmentLib.engine.inference import predict_labels  # noqa: E402
from MedKDSegmentLib.engine.labels import (  # noqa: E402
    ABDOMEN_STRUCTURES,
    BRATS_STRUCTURES,
    Structure,  # noqa: E402
)
from MedKDSegmentLib.engine.measure import machine_description  # noqa: E402
from MedKDSegmentLib.engine.metrics import dice_per_label  # noqa: E402
from MedKDSegmentLib.engine.networks import (  # noqa: E402
    ASSISTANT_CONFIG,
    STUDENT_CONFIG,
    TEACHER_CONFIG,
    build_network,
    count_parameters,
)
from MedKDSegmentLib.engine.phantom import case_seed, generate_phantom  # noqa: E402
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
# A coarser grid than the bundled models' 3 mm, so that every student can be trained close to convergence
# on a 2-core CPU: rankings of methods after a few percent of training say little.
SPACING = 6.0
PATCH = (24, 48, 48)
BRATS = ROOT.parent / "shared" / "data" / "mr-brain-tumor-brats"
BRATS_SPACING = 4.0
BRATS_PATCH = (24, 48, 48)
WORK = ROOT / "build" / "benchmark_methods"  # teachers trained here, shared by sections and processes
# Every phantom section runs these; "scratch" is supervised only (no teacher), the lower bound.
# Ordered so that methods sharing a kind of cached teacher output (log-probabilities, then logits) follow
# each other: the cache is filled once per kind and teacher, not once per method.
PHANTOM_METHODS = ["scratch", "kd", "ctkd", "dist", "hint", "at", "coteacher", "cwd", "cwd+coteacher",
                   "assistant-chain", "multi-teacher"]
MR_METHODS = ["scratch", "kd", "cwd", "coteacher", "cwd+coteacher"]
SEMI_METHODS = ["scratch", "kd", "coteacher", "cwd+coteacher"]
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


def brats_cases(split: str) -> list[Case]:
    cases = []
    for folder in sorted((BRATS / split).iterdir()):
        image = read_volume(folder / "Flair_subtrMeanDivStd.nii.gz", "MR")
        labels = read_volume(folder / "OTMultiClass.nii.gz")
        array, grid = to_model_grid(image, replace(BRATS_FLAIR_PROFILE, spacing=(BRATS_SPACING,) * 3))
        cases.append(Case(folder.name, array, labels_to_model_grid(labels, grid)))
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
                config: TrainingConfig, steps: int):
    """The section's teacher, trained once (Dice + CE, labelled cases only) and kept as a bundle in WORK."""
    folder = WORK / f"teacher-{name}-{steps}"
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


def run_methods(section: str, methods: list[str], train_cases: list[Case], test_cases: list[Case], teacher,
                num_classes: int, config: TrainingConfig, labels: list[int]) -> dict:
    results = {"teacher": {"dice": dice_per_case(teacher, test_cases, labels), "parameters": count_parameters(teacher)}}
    log(f"{section}: teacher {np.mean(results['teacher']['dice']):.3f}")
    assistant = None
    for method in methods:
        started = time.perf_counter()
        if method == "scratch":
            network = train(STUDENT_CONFIG, num_classes, train_cases, replace(config, methods="none"))
        elif method in ("assistant-chain", "multi-teacher"):
            if assistant is None:
                assistant = train(ASSISTANT_CONFIG, num_classes, train_cases, replace(config, methods="kd"),
                                  teacher)
                results["assistant"] = {"dice": dice_per_case(assistant, test_cases, labels),
                                        "parameters": count_parameters(assistant)}
            target = assistant if method == "assistant-chain" else [(teacher, 0.7), (assistant, 0.3)]
            network = train(STUDENT_CONFIG, num_classes, train_cases, replace(config, methods="kd"), target)
        else:
            network = train(STUDENT_CONFIG, num_classes, train_cases, replace(config, methods=method), teacher)
        dice = dice_per_case(network, test_cases, labels)
        results[method] = {"dice": dice, "seconds": time.perf_counter() - started,
                           "parameters": count_parameters(network)}
        log(f"{section}: {method} {np.mean(dice):.3f} ({results[method]['seconds']:.0f} s)")
    return summarise(results)


def summarise(results: dict) -> dict:
    teacher = float(np.mean(results["teacher"]["dice"]))
    scratch = float(np.mean(results["scratch"]["dice"])) if "scratch" in results else math.nan
    for entry in results.values():
        entry["mean"], entry["sd"] = float(np.mean(entry["dice"])), float(np.std(entry["dice"]))
        gap = teacher - scratch
        entry["gap_closed"] = (entry["mean"] - scratch) / gap if gap > 1e-6 else math.nan
    return results


# ---------------------------------------------------------------- sections


def phantom_section(modality: str, methods: list[str], config: TrainingConfig, teacher_steps: int) -> dict:
    labels = [s.value for s in ABDOMEN_STRUCTURES]
    train_cases = phantom_cases(modality, TRAIN_CASES, 0)
    test_cases = phantom_cases(modality, TEST_CASES, TEST_SEED)
    teacher = teacher_for(modality, train_cases, grid_profile(modality), ABDOMEN_STRUCTURES, config, teacher_steps)
    return run_methods(modality, methods, train_cases, test_cases, teacher.load_network(), len(labels) + 1, config,
                       labels)


def unpaired_section(config: TrainingConfig, teacher_steps: int, separate: dict) -> dict:
    from MedKDSegmentLib.engine.unpaired import distill_unpaired, use_modality

    labels = [s.value for s in ABDOMEN_STRUCTURES]
    train = {m: phantom_cases(m, TRAIN_CASES, 0) for m in ("CT", "MR")}
    test = {m: phantom_cases(m, TEST_CASES, TEST_SEED) for m in ("CT", "MR")}
    teachers = {m: teacher_for(m, train[m], grid_profile(m), ABDOMEN_STRUCTURES, config, teacher_steps)
                for m in ("CT", "MR")}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(config.seed)
        bundle = distill_unpaired(train["CT"], train["MR"], Path(folder) / "shared-student",
                                  ct_teacher=teachers["CT"], mr_teacher=teachers["MR"],
                                  config=replace(config, methods="kd"), architecture=STUDENT_CONFIG)
        network = bundle.load_network()
    results = {"seconds": time.perf_counter() - started, "parameters": count_parameters(network)}
    for modality in ("CT", "MR"):
        with use_modality(network, modality):
            dice = dice_per_case(network, test[modality], labels)
        own = separate.get(modality, {}).get("kd", {})
        results[modality] = {"dice": dice, "mean": float(np.mean(dice)), "sd": float(np.std(dice)),
                             "separate_mean": own.get("mean", math.nan), "separate_sd": own.get("sd", math.nan)}
        log(f"unpaired: shared student on {modality} {np.mean(dice):.3f} vs separate {own.get('mean', math.nan)}")
    return results


def semi_section(config: TrainingConfig, teacher_steps: int) -> dict:
    labels = [s.value for s in ABDOMEN_STRUCTURES]
    cases = phantom_cases("CT", 20, 0)
    labelled = {0, 1}  # 10 % of 20
    test_cases = phantom_cases("CT", TEST_CASES, TEST_SEED)
    semi_cases = without_labels(cases, labelled)
    # The teacher learns from the same 2 labelled volumes: no label the students are denied reaches them.
    teacher = teacher_for("CT-semi", semi_cases, grid_profile("CT"), ABDOMEN_STRUCTURES, config, teacher_steps)
    results = run_methods_semi(teacher.load_network(), semi_cases, test_cases, labels, config)
    results["labelled"], results["volumes"] = len(labelled), len(cases)
    return results


def run_methods_semi(teacher, cases, test_cases, labels, config) -> dict:
    num_classes = len(labels) + 1
    results = {"teacher": {"dice": dice_per_case(teacher, test_cases, labels), "parameters": count_parameters(teacher)}}
    log(f"semi: teacher {np.mean(results['teacher']['dice']):.3f}")
    for method in SEMI_METHODS:
        started = time.perf_counter()
        if method == "scratch":  # supervised only: the labelled volumes are all it can use
            network = train(STUDENT_CONFIG, num_classes, [c for c in cases if c.labels is not None],
                            replace(config, methods="none"))
        else:
            network = train(STUDENT_CONFIG, num_classes, cases, replace(config, methods=method), teacher)
        dice = dice_per_case(network, test_cases, labels)
        results[method] = {"dice": dice, "seconds": time.perf_counter() - started,
                           "parameters": count_parameters(network)}
        log(f"semi: {method} {np.mean(dice):.3f}")
    return summarise(results)


def brats_section(config: TrainingConfig, teacher_steps: int) -> dict:
    if not BRATS.is_dir():
        return {"skipped": f"{BRATS} is absent"}
    labels = [s.value for s in BRATS_STRUCTURES]
    train_cases = brats_cases("train") + brats_cases("validation")
    test_cases = brats_cases("test")
    config = replace(config, patch_size=BRATS_PATCH)
    profile = replace(BRATS_FLAIR_PROFILE, spacing=(BRATS_SPACING,) * 3)
    teacher = teacher_for("brats", train_cases, profile, BRATS_STRUCTURES, config, teacher_steps)
    results = run_methods("brats", BRATS_METHODS, train_cases, test_cases, teacher.load_network(), len(labels) + 1,
                          config, labels)
    results["train_volumes"], results["test_volumes"] = len(train_cases), len(test_cases)
    return results


# ---------------------------------------------------------------- report


def method_rows(section: dict) -> list[dict]:
    rows = []
    for name, entry in section.items():
        if isinstance(entry, dict) and "mean" in entry:
            rows.append({"method": name, "dice": f"{entry['mean']:.3f} ± {entry['sd']:.3f}",
                         "gap": "–" if name in ("teacher", "scratch") or entry.get("gap_closed") is None
                         or math.isnan(entry["gap_closed"])
                         else f"{100 * entry['gap_closed']:.0f} %",
                         "parameters": entry.get("parameters", ""),
                         "seconds": f"{entry['seconds']:.0f}" if "seconds" in entry else ""})
    return rows


COLUMNS = {"method": "method", "dice": "mean ± sd Dice", "gap": "gap closed", "parameters": "parameters",
           "seconds": "train s"}


def render(results: dict) -> str:
    lines = ["# Distillation methods benchmark", "", f"Machine: {results['machine']}", "",
             f"Budget per student: {results['steps']} steps of batch {results['batch_size']}; "
             "same seed, same student architecture (FastStudent) for every method. Dice: mean ± sd over the "
             "test volumes of each volume's mean over structures. Gap closed: (method − scratch) / "
             "(teacher − scratch).", "",
             f"Grid: phantoms at {SPACING:g} mm ({TRAIN_CASES} training, {TEST_CASES} test volumes per modality), "
             f"BRATS FLAIR at {BRATS_SPACING:g} mm; teachers (MONAI UNet, 4.77 M parameters) trained here for "
             f"{results.get('teacher_steps', '?')} steps with Dice + CE; KD temperature "
             f"{results.get('temperature', '?')} (kd, ctkd start, multi-teacher). Reproduce: "
             "`scripts/medkd-python scripts/benchmark_methods.py --steps "
             f"{results['steps']} --teacher-steps {results.get('teacher_steps', '?')} "
             f"--temperature {results.get('temperature', '?')} --threads 1`.", ""]
    titles = {"CT": "Phantom CT", "MR": "Phantom MR", "semi": "Semi-supervised CT (10 % labelled)",
              "brats": "BRATS 2013 FLAIR (real MRI)"}
    for key, title in titles.items():
        if key in results["sections"]:
            section = results["sections"][key]
            lines += [f"## {title}", ""]
            lines += [section["skipped"]] if "skipped" in section else [markdown_table(method_rows(section), COLUMNS)]
            lines += [""]
    if "unpaired" in results["sections"]:
        section = results["sections"]["unpaired"]
        rows = [{"modality": m, "shared": f"{section[m]['mean']:.3f} ± {section[m]['sd']:.3f}",
                 "separate": f"{section[m]['separate_mean']:.3f} ± {section[m]['separate_sd']:.3f}"}
                for m in ("CT", "MR")]
        lines += ["## Unpaired CT + MR: one shared student vs separate students (both KD, same size)", "",
                  markdown_table(rows, {"modality": "modality", "shared": "shared CT+MR student",
                                        "separate": "separate student"}), ""]
    lines += ["## Against the targets", "", *target_lines(results["sections"]), "",
              "![methods](benchmark_methods.png)", ""]
    return "\n".join(lines)


def target_lines(sections: dict) -> list[str]:
    """The issue's three targets, checked on this run's figures."""
    lines = []
    for key in ("CT", "MR"):
        section = sections.get(key, {})
        methods = {n: e for n, e in section.items() if isinstance(e, dict) and e.get("gap_closed") is not None
                   and n not in ("teacher", "scratch", "assistant")}
        if methods:
            best = max(methods, key=lambda n: methods[n]["mean"])
            gap = methods[best]["gap_closed"]
            lines.append(f"- Phantom {key}: best method `{best}` closes {100 * gap:.0f} % of a "
                         f"{section['teacher']['mean'] - section['scratch']['mean']:.3f} Dice gap "
                         f"(target ≥ 50 %: {'met' if gap >= 0.5 else 'missed'}).")
    if "unpaired" in sections:
        u = sections["unpaired"]
        better = [m for m in ("CT", "MR") if u[m]["mean"] > (u[m]["separate_mean"] or math.inf)]
        worse = [m for m in ("CT", "MR") if u[m]["mean"] < (u[m]["separate_mean"] or -math.inf)]
        met = bool(better) and not worse
        lines.append(f"- Unpaired: the shared student is better on {better or 'no modality'} and worse on "
                     f"{worse or 'none'} (target: better on one, not worse on the other: "
                     f"{'met' if met else 'missed'}).")
    if "semi" in sections:
        semi = sections["semi"]
        co, sup = semi["coteacher"]["mean"], semi["scratch"]["mean"]
        lines.append(f"- Semi-supervised: co-teacher {co:.3f} vs supervised-only {sup:.3f} with the same labels "
                     f"(target: co-teacher better: {'met' if co > sup else 'missed'}).")
    return lines


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [(k, v) for k, v in results["sections"].items()
                if k in ("CT", "MR", "semi", "brats") and "skipped" not in v]
    figure, axes = plt.subplots(1, max(len(sections), 1), figsize=(5 * max(len(sections), 1), 4), squeeze=False)
    for axis, (key, section) in zip(axes[0], sections):
        names = [n for n, e in section.items() if isinstance(e, dict) and "mean" in e]
        means = [section[n]["mean"] for n in names]
        sds = [section[n]["sd"] for n in names]
        colors = ["#555555" if n == "teacher" else "#bbbbbb" if n == "scratch" else "#3b7dd8" for n in names]
        axis.barh(names, means, xerr=sds, color=colors)
        axis.set_xlim(0, 1)
        axis.set_title(key)
        axis.set_xlabel("mean Dice")
        axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def load_results(output: Path) -> dict:
    path = output.with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else {"sections": {}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["CT", "MR", "unpaired", "semi", "brats"])
    parser.add_argument("--steps", type=int, default=300, help="training steps per student")
    parser.add_argument("--teacher-steps", type=int, default=400, help="steps for teachers trained here")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=4.0, help="KD temperature (kd, ctkd start, multi-teacher)")
    parser.add_argument("--methods", nargs="+", help="only these methods (a quick check; default: each section's list)")
    parser.add_argument("--cases", type=int, nargs=2, metavar=("TRAIN", "TEST"), help="phantom counts (quick check)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmark_methods"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps_per_epoch = 25
    config = TrainingConfig(epochs=max(1, args.steps // steps_per_epoch), steps_per_epoch=steps_per_epoch,
                            batch_size=2, patch_size=PATCH, learning_rate=1e-2, kd_temperature=args.temperature,
                            validation_fraction=0.0, device="cpu",
                            # The curriculum spans a third of these short runs (CTKD's paper: 10 of 240+ epochs).
                            ctkd_epochs=max(1, args.steps // steps_per_epoch // 3))
    output = Path(args.output)
    if args.cases:
        global TRAIN_CASES, TEST_CASES
        TRAIN_CASES, TEST_CASES = args.cases
    if args.methods:
        PHANTOM_METHODS[:], SEMI_METHODS[:], BRATS_METHODS[:], MR_METHODS[:] = [args.methods] * 4
    for section in args.sections:
        started = time.perf_counter()
        if section in ("CT", "MR"):
            methods = PHANTOM_METHODS if section == "CT" else MR_METHODS
            result = phantom_section(section, methods, config, args.teacher_steps)
        elif section == "unpaired":
            result = unpaired_section(config, args.teacher_steps, load_results(output)["sections"])
        elif section == "semi":
            result = semi_section(config, args.teacher_steps)
        elif section == "brats":
            result = brats_section(config, args.teacher_steps)
        else:
            parser.error(f"unknown section {section}")
        result["wall_seconds"] = time.perf_counter() - started
        # Merged into the results file after each section: sections can run in separate processes,
        # and a stopped run keeps the figures it has.
        results = load_results(output)
        results["sections"][section] = result
        results |= {"machine": machine_description(), "steps": args.steps, "batch_size": config.batch_size,
                    "teacher_steps": args.teacher_steps, "temperature": args.temperature}
        write_json(results, output.with_suffix(".json"))
    results = load_results(output)
    write_text(render(results), output.with_suffix(".md"))
    chart(results, output.with_suffix(".png"))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
