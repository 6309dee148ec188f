"""Reproduce the bundled models from scratch: phantom data, teachers, then distilled students.

    scripts/medkd-python scripts/build_models.py [--output Resources/Models] [--work build/models]

On a 2-core CPU, one process per modality with one thread each is fastest (about 75 minutes):

    scripts/medkd-python scripts/build_models.py --modalities CT --threads 1 &
    scripts/medkd-python scripts/build_models.py --modalities MR --threads 1

Bundles saved now carry an ONNX copy of a window-independent network, their labels' terminology and MONAI's
``configs/inference.json``;
``--upgrade`` gives the bundled models made before that theirs (weights unchanged):
scripts/medkd-python scripts/build_models.py --upgrade

Seeds are fixed, so a rerun on the same machine and library versions gives the same
data and comparable models. Held-out seeds (the demo's and the benchmark's) are never
used here: training cases use seed 0 of ``write_phantom_dataset`` (case seeds below 100003).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedKDSegment"))

from MedKDSegmentLib.engine.bundle import METADATA, find_bundles, recorded_terminology, sha256_of  # noqa: E402
from MedKDSegmentLib.engine.demo import model_name  # noqa: E402
from MedKDSegmentLib.engine.monai_config import CONFIG, write_inference_config  # noqa: E402
from MedKDSegmentLib.engine.onnx_network import ONNX_WEIGHTS, export_onnx  # noqa: E402
from MedKDSegmentLib.engine.phantom import write_phantom_dataset  # noqa: E402
from MedKDSegmentLib.engine.prediction import window_independent  # noqa: E402
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
    parser.add_argument("--upgrade", action="store_true",
                        help="only add ONNX copies, terminology and MONAI configs to bundled models lacking them")
    args = parser.parse_args()
    if args.upgrade:
        upgrade(Path(args.output))
        return 0
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


def upgrade(folder: Path) -> None:
    """Give each bundled model what ``save_bundle`` now writes and it lacks: MONAI's inference config, and a
    student's ONNX copy, recorded as ``save_bundle`` records it (a release step on the project's own bundles:
    a user's bundles are never changed)."""
    for bundle in find_bundles(folder):
        if "terminology" not in bundle.info:
            bundle.info["terminology"] = recorded_terminology(bundle.structures)
            (bundle.path / METADATA).write_text(json.dumps(bundle.metadata, indent=2), encoding="utf-8")
            print(f"{bundle.name}: terminology recorded for {len(bundle.info['terminology'])} labels")
        if not (bundle.path / CONFIG).is_file() and write_inference_config(bundle.path, bundle.metadata):
            print(f"{bundle.name}: {CONFIG} added")
        if bundle.role != "student" or bundle.onnx is not None or bundle.modality_specific:
            continue
        network = bundle.load_network()
        if not window_independent(network):
            continue
        record = export_onnx(network, bundle.path / ONNX_WEIGHTS)
        metadata = bundle.metadata
        metadata["medkdsegment"]["onnx"] = {"sha256": sha256_of(bundle.path / ONNX_WEIGHTS), **record}
        (bundle.path / METADATA).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
        print(f"{bundle.name}: ONNX copy added ({(bundle.path / ONNX_WEIGHTS).stat().st_size:,} bytes)")


if __name__ == "__main__":
    sys.exit(main())
