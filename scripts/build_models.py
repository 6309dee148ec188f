"""Reproduce the bundled models from scratch: phantom data, teachers, then distilled students.

    scripts/medkd-python scripts/build_models.py [--output Resources/Models] [--work build/models]

On a 2-core CPU, one process per modality with one thread each is fastest (about 75 minutes):

    scripts/medkd-python scripts/build_models.py --modalities CT --threads 1 &
    scripts/medkd-python scripts/build_models.py --modalities MR --threads 1

Seeds are fixed, so a rerun on the same machine and library versions gives the same
data and comparable models. Held-out seeds (the demo's and the benchmark's) are never
used here: training cases use seed 0 of ``write_phantom_dataset`` (case seeds below 100003).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedKDSegment"))

from MedKDSegmentLib.engine.demo import model_name  # noqa: E402
from MedKDSegmentLib.engine.phantom import write_phantom_dataset  # noqa: E402
from MedKDSegmentLib.engine.training import TrainingConfig, distill_student, train_teacher  # noqa: E402

TRAINING_CASES = 20
# Patches span the whole axial cross-section (z, y, x at 3 mm): telling liver from spleen, or the
# kidneys apart, needs left-right context more than depth.
PATCH = (32, 64, 80)
TEACHER = TrainingConfig(epochs=40, steps_per_epoch=25, batch_size=2, patch_size=PATCH, learning_rate=5e-3)
# Students learn from cached teacher outputs (offline KD), so their steps are cheap: take more of them.
STUDENT = TrainingConfig(
    epochs=100, steps_per_epoch=50, batch_size=2, patch_size=PATCH, learning_rate=1e-2,
    kd_temperature=4.0, kd_weight=1.0,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "Resources" / "Models"))
    parser.add_argument("--work", default=str(ROOT / "build" / "models"))
    parser.add_argument("--modalities", nargs="+", default=["CT", "MR"])
    parser.add_argument("--threads", type=int, help="torch threads (e.g. 1 per process when running CT and MR at once)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    output, work = Path(args.output), Path(args.work)

    def log(fraction: float, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {100 * fraction:5.1f}% {message}", flush=True)

    for modality in args.modalities:
        data = work / f"phantom-{modality.lower()}"
        if not (data / "dataset.json").exists():
            write_phantom_dataset(data, modality, TRAINING_CASES, seed=0, progress=log)
        teacher = output / model_name(modality, "teacher")
        if not teacher.exists():
            train_teacher(data, teacher, modality, TEACHER, resume=True, progress=log, half_precision=True)
        student = output / model_name(modality, "student")
        if not student.exists():
            distill_student(data, teacher, student, STUDENT, resume=True, progress=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
