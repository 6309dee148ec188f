"""How hard each distillation term pulls on the student, next to Dice + CE: the measurement behind the
methods' default weights.

    scripts/medkd-python scripts/term_gradients.py [--steps 300] [--batches 8]

On the methods benchmark's coarse grid (6 mm phantom CT, its teacher, 24×48×48 patches): a student trained
from labels for ``--steps`` (so that the figures describe training under way, not random weights), then,
on the same ``--batches`` augmented training batches, the norm of the gradient on the student's weights of
Dice + CE and of each term at weight 1. Their ratio is linear in the weight, so it is also given at the
method's default weight. A term whose pull is tens of times that of Dice + CE decides what the student
learns on its own. Written to docs/term_gradients.md and .json.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import benchmark_methods as bench  # the benchmark's data, teacher and training, unchanged
import numpy as np
import torch

from MedKDSegmentLib.engine.augment import training_batch
from MedKDSegmentLib.engine.distillation import DistillContext, TermSetup, build_terms
from MedKDSegmentLib.engine.losses import SupervisedLoss
from MedKDSegmentLib.engine.measure import machine_description
from MedKDSegmentLib.engine.methods import METHODS
from MedKDSegmentLib.engine.networks import full_resolution
from MedKDSegmentLib.engine.report import markdown_table, write_json, write_text
from MedKDSegmentLib.engine.training import (
    TrainingConfig,
    cache_teacher_outputs,
    distillation_loss,
    feature_taps,
)

ROOT = Path(__file__).resolve().parent.parent


def gradient_norm(network: torch.nn.Module, loss: torch.Tensor) -> float:
    network.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in network.parameters() if p.grad is not None)))


def measure(method: str, student, teacher, cases, config: TrainingConfig, batches: int) -> dict:
    """Mean gradient norms of Dice + CE and of ``method`` at weight 1 over the same batches."""
    config = replace(config, methods=f"{method}:1")
    terms = build_terms(config.methods, TermSetup(config, len(bench.ABDOMEN_STRUCTURES) + 1, student, [teacher]))
    cache_teacher_outputs(teacher, cases, torch.device("cpu"), lambda *_: None)
    student_tap, teacher_taps = feature_taps(student, [teacher], terms)
    supervised, rng, rows = SupervisedLoss(), np.random.default_rng(1), []
    try:
        for _ in range(batches):
            images, labels, labelled, cached = training_batch(cases, config.batch_size, config.patch_size, rng,
                                                              torch.device("cpu"))
            logits = full_resolution(student(images), images.shape[2:]).float()
            context = DistillContext(images, logits, labels, labelled, student, epoch=config.epochs // 2,
                                     step=config.epochs * config.steps_per_epoch // 2)
            term = distillation_loss(terms, context, student_tap, [teacher], [1.0], cached, teacher_taps, config,
                                     torch.device("cpu"))
            rows.append((gradient_norm(student, supervised(logits, labels)), gradient_norm(student, term)))
    finally:
        for tap in [student_tap, *teacher_taps]:
            if tap is not None:
                tap.remove()
    dice_ce, term = np.mean(rows, axis=0)
    default = METHODS[method].default_weight(config)
    return {"method": method, "dice_ce": float(dice_ce), "term": float(term), "ratio_at_1": float(term / dice_ce),
            "default_weight": default, "ratio_at_default": float(default * term / dice_ce)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="steps of the student trained from labels first")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--output", default=str(ROOT / "docs" / "term_gradients"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = TrainingConfig(epochs=max(1, args.steps // 25), steps_per_epoch=25, batch_size=2, patch_size=bench.PATCH,
                            learning_rate=1e-2, kd_temperature=1.0, validation_fraction=0.0, device="cpu",
                            ctkd_epochs=max(1, args.steps // 75))
    cases = bench.phantom_cases("CT", bench.TRAIN_CASES, 0)
    teacher = bench.teacher_for("CT", cases, bench.grid_profile("CT"), bench.ABDOMEN_STRUCTURES, config, 1500)
    teacher = teacher.load_network().eval()
    student = bench.train(bench.STUDENT_CONFIG, len(bench.ABDOMEN_STRUCTURES) + 1, cases,
                          replace(config, methods="none"))
    student.train()
    rows = [measure(method, student, teacher, cases, config, args.batches) for method in METHODS]
    for row in rows:
        print(f"{row['method']:14s} pull vs Dice + CE: {row['ratio_at_1']:6.2f} at weight 1, "
              f"{row['ratio_at_default']:6.2f} at the default {row['default_weight']:g}", flush=True)
    output = Path(args.output)
    write_json({"machine": machine_description(), "steps": args.steps, "batches": args.batches, "rows": rows},
               output.with_suffix(".json"))
    table = markdown_table(
        [{**r, "ratio_at_1": f"{r['ratio_at_1']:.2f}", "ratio_at_default": f"{r['ratio_at_default']:.2f}",
          "default_weight": f"{r['default_weight']:g}"} for r in rows],
        {"method": "method", "ratio_at_1": "pull at weight 1", "default_weight": "default weight",
         "ratio_at_default": "pull at the default weight"})
    write_text("\n".join([
        "# How hard each distillation term pulls on the student", "",
        f"Machine: {machine_description()}", "",
        "Pull: the norm of the term's gradient on the student's weights over that of Dice + CE, averaged over "
        f"{args.batches} augmented training batches of 2 patches (24×48×48, phantom CT at 6 mm, the methods "
        f"benchmark's teacher), for a FastStudent trained from labels for {args.steps} steps. A pull far above 1 "
        "lets the term decide what the student learns. Reproduce: `scripts/medkd-python scripts/term_gradients.py "
        f"--steps {args.steps} --batches {args.batches}`.", "", table, ""]), output.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
