"""What a teacher's targets carry beyond the labels, and whether the student is short of data or of capacity:
the measurement behind the methods benchmark's reading.

    scripts/medkd-python scripts/teacher_signal.py [--steps 600] [--sections CT MR semi brats]

Per section of the methods benchmark (its data, its cached teacher, its coarse grid):
- the teacher's soft targets at temperature 1 on the training volumes against their one-hot labels: the
  voxels where its arg-max disagrees with the label, the mean probability it leaves off the labelled class,
  everywhere and on boundary voxels (a neighbour along an axis has another label);
- Dice on training and test volumes of the teacher, and of the student and the teacher assistant trained
  from labels (seed 0, the benchmark's budget). A network whose training Dice is no higher than its test
  Dice is short of capacity or steps, not of data, and a loss that only regularises cannot help it;
- each network's Dice against the teacher's arg-max on training volumes: how far it is from copying it.
Written to docs/teacher_signal.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import benchmark_methods as bench  # the benchmark's data, teachers and training, unchanged
import numpy as np
import torch
from scipy import ndimage

from MedKDSegmentLib.engine.device import select_device
from MedKDSegmentLib.engine.labels import ABDOMEN_STRUCTURES, BRATS_STRUCTURES
from MedKDSegmentLib.engine.measure import machine_description
from MedKDSegmentLib.engine.metrics import dice_per_label
from MedKDSegmentLib.engine.prediction import predict_labels, predict_scores
from MedKDSegmentLib.engine.report import markdown_table, write_json, write_text
from MedKDSegmentLib.engine.training import TrainingConfig

ROOT = Path(__file__).resolve().parent.parent
CPU = select_device("cpu")


def boundary(labels: np.ndarray) -> np.ndarray:
    """Voxels with a differently labelled face neighbour (the 6-neighbourhood's label range is not one value)."""
    cross = ndimage.generate_binary_structure(labels.ndim, 1)
    return ndimage.maximum_filter(labels, footprint=cross) != ndimage.minimum_filter(labels, footprint=cross)


def teacher_targets(teacher: torch.nn.Module, cases) -> dict:
    """Means over the training volumes' voxels of how the teacher's probabilities differ from the labels."""
    disagree, off_label, off_boundary, boundary_share = [], [], [], []
    for case in cases:
        scores, _, _ = predict_scores(teacher.eval(), case.image, CPU)
        z, y, x = case.image.shape
        probabilities = scores[:, :z, :y, :x]
        labels = case.labels.astype(np.int64)
        on_label = np.take_along_axis(probabilities, labels[None], axis=0)[0]
        edge = boundary(labels)
        disagree.append(float(np.mean(probabilities.argmax(0) != labels)))
        off_label.append(float(np.mean(1.0 - on_label)))
        off_boundary.append(float(np.mean(1.0 - on_label[edge])))
        boundary_share.append(float(np.mean(edge)))
    return {"disagreement": float(np.mean(disagree)), "off_label_mass": float(np.mean(off_label)),
            "off_label_mass_boundary": float(np.mean(off_boundary)), "boundary_share": float(np.mean(boundary_share))}


def mean_dice(predicted: dict[str, np.ndarray], cases, labels: list[int],
              reference: dict[str, np.ndarray] | None = None) -> float:
    """Mean over volumes of each volume's mean Dice over structures (reference: the labels by default)."""
    means = [np.nanmean(list(dice_per_label(predicted[case.name], case.labels if reference is None
                                            else reference[case.name], labels).values())) for case in cases]
    return float(np.mean(means))


def section(name: str, config: TrainingConfig, teacher_steps: int) -> tuple[dict, list[dict]]:
    if name == "brats":
        if not bench.BRATS.is_dir():
            return {"section": name, "skipped": f"{bench.BRATS} is absent"}, []
        structures, profile = BRATS_STRUCTURES, bench.BRATS_PROFILE
        train_cases = bench.brats_cases("train") + bench.brats_cases("validation")
        test_cases = bench.brats_cases("test")
        config = replace(config, patch_size=bench.BRATS_PATCH)
        teacher = bench.teacher_for(name, train_cases, profile, structures, config, teacher_steps)
    elif name == "semi":  # the semi-supervised section's 2 labelled volumes of 20, its teacher trained on them
        structures, profile = ABDOMEN_STRUCTURES, bench.grid_profile("CT")
        train_cases = bench.phantom_cases("CT", 20, 0)[:2]
        test_cases = bench.phantom_cases("CT", bench.TEST_CASES, bench.TEST_SEED)
        teacher = bench.teacher_for("CT-semi", train_cases, profile, structures, config, teacher_steps,
                                    trained_here=True)
    else:
        structures, profile = ABDOMEN_STRUCTURES, bench.grid_profile(name)
        train_cases = bench.phantom_cases(name, bench.TRAIN_CASES, 0)
        test_cases = bench.phantom_cases(name, bench.TEST_CASES, bench.TEST_SEED)
        teacher = bench.teacher_for(name, train_cases, profile, structures, config, teacher_steps)
    labels = [s.value for s in structures]
    teacher = teacher.load_network().eval()
    cases = train_cases + test_cases

    def predictions(network: torch.nn.Module) -> dict[str, np.ndarray]:  # once per network and volume
        return {case.name: predict_labels(network, case.image, CPU) for case in cases}

    by_teacher = predictions(teacher)
    targets = {"section": name, **teacher_targets(teacher, train_cases)}
    fits = []
    for role, architecture in (("teacher", None), *STUDENTS.items()):
        predicted = by_teacher if architecture is None else predictions(
            bench.train(architecture, len(labels) + 1, train_cases, replace(config, methods="none")))
        train, test = mean_dice(predicted, train_cases, labels), mean_dice(predicted, test_cases, labels)
        fits.append({"section": name, "network": role, "train": train, "test": test, "train_minus_test": train - test,
                     "vs_teacher_train": mean_dice(predicted, train_cases, labels, by_teacher)})
        bench.log(f"{name} {role}: Dice train {train:.3f}, test {test:.3f}")
    return targets, fits


STUDENTS = {"student (FastStudent)": bench.STUDENT_CONFIG, "assistant (0.30 M)": bench.ASSISTANT_CONFIG}
TARGET_COLUMNS = {"section": "section", "disagreement": "teacher ≠ label (voxels)",
                  "off_label_mass": "mass off the label", "off_label_mass_boundary": "… on boundary voxels",
                  "boundary_share": "boundary voxels"}
FIT_COLUMNS = {"section": "section", "network": "network, trained from labels", "train": "Dice train",
               "test": "Dice test", "train_minus_test": "train − test",
               "vs_teacher_train": "Dice against the teacher's arg-max, train"}


def formatted(rows: list[dict]) -> list[dict]:
    return [{k: f"{v:.3f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]


def render(results: dict) -> str:
    targets, fits = results["teacher_targets"], results["fits"]
    skipped = [f"- {t['section']}: skipped, {t['skipped']}" for t in targets if "skipped" in t]
    sections = " ".join(t["section"] for t in targets)
    return "\n".join([
        "# What the teacher's targets carry beyond the labels", "",
        f"Machine: {results['machine']}", "",
        "The methods benchmark's coarse grid, data and teachers (`docs/benchmark_methods.md`): CT and MR, 12 "
        "labelled phantom volumes each; semi, the semi-supervised section's 2 labelled volumes (of 20), its "
        "teacher trained on those alone; brats, the 4 BRATS FLAIR training volumes. Reproduce: "
        f"`scripts/medkd-python scripts/teacher_signal.py --steps {results['steps']} --sections {sections}`.",
        "", "## The teacher's soft targets on the training volumes", "",
        "Class probabilities at temperature 1 against the one-hot labels: the share of voxels where the arg-max "
        "differs, and the mean probability off the labelled class over all voxels and over boundary voxels "
        "(a neighbour along some axis has another label).", "",
        markdown_table(formatted([t for t in targets if "skipped" not in t]), TARGET_COLUMNS), *skipped, "",
        "## Short of data or of capacity?", "",
        f"Each network trained from labels (students: {results['steps']} steps, seed 0, the benchmark's budget): "
        "mean Dice on the training and the test volumes, and on the training volumes against the teacher's "
        "arg-max. A network whose training Dice is no higher than its test Dice is short of capacity or steps, "
        "not of data: targets that only regularise it cannot raise its Dice.", "",
        markdown_table(formatted(fits), FIT_COLUMNS), ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="the student's training steps (the benchmark's)")
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--sections", nargs="+", default=["CT", "MR", "semi", "brats"])
    parser.add_argument("--output", default=str(ROOT / "docs" / "teacher_signal"))
    parser.add_argument("--render", action="store_true", help="only re-write <output>.md from its .json")
    args = parser.parse_args()
    output = Path(args.output)
    if not args.render:
        torch.set_num_threads(1)
        config = TrainingConfig(epochs=max(1, args.steps // 25), steps_per_epoch=25, batch_size=2,
                                patch_size=bench.PATCH, learning_rate=1e-2, kd_temperature=1.0,
                                validation_fraction=0.0, device="cpu")
        results = [section(name, config, args.teacher_steps) for name in args.sections]
        write_json({"machine": machine_description(), "steps": args.steps,
                    "teacher_targets": [t for t, _ in results], "fits": [row for _, rows in results for row in rows]},
                   output.with_suffix(".json"))
    write_text(render(json.loads(output.with_suffix(".json").read_text())), output.with_suffix(".md"))
    print(output.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
