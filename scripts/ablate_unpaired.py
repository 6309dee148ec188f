"""When does one shared CT + MR student (Dou et al. 2020) beat two separate students of the same size?

    scripts/medkd-python scripts/ablate_unpaired.py --cases 12 --prototype-weight 0.5 --steps 600 --seed 0

One run trains, from the same seed and on the methods benchmark's coarse grid (6 mm phantoms, 24×48×48
patches, no teacher): a CT student and an MR student separately, and one shared student that sees one CT
and one MR batch per step (so each modality gets the same patches and steps as its separate student).
Each run varies one thing against the methods benchmark's unpaired ``none`` variant: the training volumes
per modality (``--cases``), the prototype-KL weight (``--prototype-weight``, 0 = sharing alone), the
student's width (``--features``), the budget (``--steps``) or whether the CT and MR volumes show the same
subjects (``--subjects``). Rows are merged into <output>.json (several
runs may write at once) and the table is re-written to <output>.md.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import tempfile
import time
from pathlib import Path

import benchmark_methods as bench  # the benchmark's data, training and evaluation, unchanged
import numpy as np
import torch

from MedKDSegmentLib.engine.measure import machine_description
from MedKDSegmentLib.engine.modality_norm import use_modality
from MedKDSegmentLib.engine.report import markdown_table, write_json, write_text
from MedKDSegmentLib.engine.training import TrainingConfig
from MedKDSegmentLib.engine.unpaired import PROTOTYPE_WEIGHT, distill_unpaired

MODALITIES = ("CT", "MR")
COLUMNS = {"subjects": "CT / MR subjects",
           "cases": "volumes per modality", "prototype_weight": "prototype weight", "features": "student features",
           "parameters": "parameters", "steps": "steps", "seed": "seed", "separate_CT": "separate CT",
           "shared_CT": "shared CT", "delta_CT": "shared − separate CT", "separate_MR": "separate MR",
           "shared_MR": "shared MR", "delta_MR": "shared − separate MR", "minutes": "minutes"}


# A phantom seed fixes the subject (anatomy) whatever the modality: "same" gives the CT and MR training sets the
# same subjects (paired data), "distinct" draws the MR volumes from other subjects, as in real unpaired data.
SUBJECT_SEEDS = {"same": {"CT": 0, "MR": 0}, "distinct": {"CT": 0, "MR": 1}}


def run(cases: int, prototype_weight: float, features: list[int], steps: int, seed: int, subjects: str) -> dict:
    architecture = {"name": "FastStudent", "kwargs": {"in_channels": 1, "features": features}}
    labels = [s.value for s in bench.ABDOMEN_STRUCTURES]
    train = {m: bench.phantom_cases(m, cases, SUBJECT_SEEDS[subjects][m]) for m in MODALITIES}
    test = {m: bench.phantom_cases(m, bench.TEST_CASES, bench.TEST_SEED) for m in MODALITIES}
    config = TrainingConfig(epochs=max(1, steps // 25), steps_per_epoch=25, batch_size=2, patch_size=bench.PATCH,
                            learning_rate=1e-2, validation_fraction=0.0, device="cpu", methods="none", seed=seed)
    started = time.perf_counter()
    row = {"cases": cases, "prototype_weight": prototype_weight, "features": "-".join(map(str, features)),
           "steps": steps, "seed": seed, "subjects": subjects}
    for modality in MODALITIES:
        network = bench.train(architecture, len(labels) + 1, train[modality], config)
        row[f"separate_{modality}"] = float(np.mean(bench.dice_per_case(network, test[modality], labels)))
        row["parameters"] = bench.count_parameters(network)
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(seed)
        bundle = distill_unpaired(train["CT"], train["MR"], Path(folder) / "shared", config=config,
                                  architecture=architecture, prototype_weight=prototype_weight)
        shared = bundle.load_network()
    for modality in MODALITIES:
        with use_modality(shared, modality):
            row[f"shared_{modality}"] = float(np.mean(bench.dice_per_case(shared, test[modality], labels)))
        row[f"delta_{modality}"] = row[f"shared_{modality}"] - row[f"separate_{modality}"]
    row["minutes"] = (time.perf_counter() - started) / 60
    return row


def cell(key: str, value):
    if key.startswith("delta"):
        return f"{value:+.3f}"
    if key.startswith(("separate", "shared")):
        return f"{value:.3f}"
    return f"{value:.0f}" if key == "minutes" else value


def render(results: dict) -> str:
    rows = sorted(results["rows"], key=lambda r: (r["subjects"] != "same", r["steps"], -r["cases"],
                                                  -r["prototype_weight"], r["features"],
                                                  r["seed"]))
    shown = [{key: cell(key, value) for key, value in row.items()} for row in rows]
    return "\n".join([
        "# Unpaired CT + MR: one shared student against separate students", "",
        f"Machine: {results['machine']}", "",
        "Coarse grid of the methods benchmark (6 mm phantoms, 24×48×48 patches, 6 held-out test volumes per "
        "modality), no teacher: Dice + CE per modality, plus the prototype KL for the shared student. Mean Dice "
        "over the test volumes (each volume's mean over structures). Reproduce a row: "
        "`scripts/medkd-python scripts/ablate_unpaired.py --cases N --prototype-weight W --features A B C "
        "--steps S --seed K --subjects same|distinct` (one core). Subjects `same`: the CT and MR training volumes "
        "are the same phantom subjects (paired anatomy); `distinct`: the MR volumes are other subjects, as in "
        "real unpaired data.", "",
        markdown_table(shown, COLUMNS), ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=bench.TRAIN_CASES, help="training volumes per modality")
    parser.add_argument("--prototype-weight", type=float, default=PROTOTYPE_WEIGHT)
    parser.add_argument("--features", type=int, nargs=3, default=[8, 16, 20], help="FastStudent channels")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subjects", choices=sorted(SUBJECT_SEEDS), default="same",
                        help="CT and MR training volumes of the same subjects, or of distinct ones (unpaired)")
    parser.add_argument("--output", default=str(bench.ROOT / "docs" / "ablation_unpaired"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    row = run(args.cases, args.prototype_weight, args.features, args.steps, args.seed, args.subjects)
    print(json.dumps(row), flush=True)
    output = Path(args.output)
    with open(output.with_suffix(".lock"), "w") as lock:  # another run may be merging its row
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = output.with_suffix(".json")
        results = json.loads(path.read_text()) if path.exists() else {"rows": []}
        key = ("subjects", "cases", "prototype_weight", "features", "steps", "seed")
        results["rows"] = [r for r in results["rows"] if [r[k] for k in key] != [row[k] for k in key]] + [row]
        results["machine"] = machine_description()
        write_json(results, path)
        write_text(render(results), output.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
