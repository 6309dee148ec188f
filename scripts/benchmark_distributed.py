"""Scaling under torchrun (issue 21): time per distillation epoch and teacher-cache throughput, 1 vs N processes.

    scripts/medkd-python scripts/benchmark_distributed.py [--processes 2] [--repeats 3] [--output PATH]

Each configuration runs as its own command (``torchrun --standalone --nproc_per_node=N`` for N > 1) on the same
CT phantoms: the default teacher (a full-resolution MONAI UNet) caches its outputs on every volume, sharded
across the processes, then the default student distils for a few epochs with batch B per process (the first
epoch, warm-up, is left out). Configurations: 1 process with 1 thread, 1 process with every core, N processes
with cores/N threads each. Scaling efficiency = throughput(N processes) / (N x throughput(1 process, 1 thread)),
and the same against 1 process with every core (what a user has without torchrun). Repeats alternate the
configurations; the table gives medians and the spread. Writes <output>.md and <output>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedKDSegment"))

CASES, SIZE, SPACING = 8, (96, 96, 64), (3.0, 3.0, 3.0)  # phantoms on the CT model grid (3 mm)
EPOCHS, STEPS, BATCH, PATCH = 4, 8, 2, (64, 64, 64)


def worker(data: Path, threads: int, output: Path) -> None:
    """One configuration's run, in each process; rank 0 writes the timings."""
    import torch

    from MedKDSegmentLib.engine import distributed
    from MedKDSegmentLib.engine.data import load_cases
    from MedKDSegmentLib.engine.labels import ABDOMEN_STRUCTURES, label_names
    from MedKDSegmentLib.engine.networks import STUDENT_CONFIG, TEACHER_CONFIG, build_network
    from MedKDSegmentLib.engine.profiles import CT_PROFILE
    from MedKDSegmentLib.engine.training import TrainingConfig, cache_teacher_outputs, fit

    torch.set_num_threads(threads)
    classes = len(ABDOMEN_STRUCTURES) + 1
    with distributed.process_group("cpu") as processes:
        cases = load_cases(data, CT_PROFILE, label_names(ABDOMEN_STRUCTURES))
        torch.manual_seed(0)
        teacher = build_network(TEACHER_CONFIG, classes).eval()
        distributed.barrier()
        started = time.perf_counter()
        cache_teacher_outputs(teacher, cases, torch.device("cpu"), lambda f, m: None)
        distributed.barrier()
        cache_seconds = time.perf_counter() - started

        student = build_network(STUDENT_CONFIG, classes)
        config = TrainingConfig(epochs=EPOCHS, steps_per_epoch=STEPS, batch_size=BATCH, patch_size=PATCH,
                                device="cpu", validation_fraction=0.0)
        stamps: list[float] = []
        with tempfile.TemporaryDirectory() as checkpoints:
            distributed.barrier()
            started = time.perf_counter()
            fit(student, classes, cases, config, Path(checkpoints) / "run", teacher,
                progress=lambda f, m: stamps.append(time.perf_counter()))
            epoch_ends = [started] + stamps[STEPS - 1::STEPS]
        epoch_seconds = [b - a for a, b in zip(epoch_ends, epoch_ends[1:])][1:]  # the first epoch warms up
        if processes.main:
            output.write_text(json.dumps({
                "processes": processes.world_size, "threads": threads, "cases": len(cases),
                "cache_seconds": cache_seconds, "epoch_seconds": epoch_seconds,
                "patches_per_epoch": STEPS * BATCH * processes.world_size,
            }))


def run_configuration(data: Path, processes: int, threads: int, work: Path) -> dict:
    output = work / f"result-{processes}-{threads}.json"
    script = [str(Path(__file__).resolve()), "--worker", "--data", str(data), "--threads", str(threads),
              "--result", str(output)]
    launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [])
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "MedKDSegment")}
    subprocess.run([sys.executable, *launcher, *script], check=True, env=environment, capture_output=True)
    return json.loads(output.read_text())


def summarise(runs: list[dict]) -> dict:
    cache = [run["cases"] / run["cache_seconds"] for run in runs]
    epoch = [statistics.median(run["epoch_seconds"]) for run in runs]
    patches = [run["patches_per_epoch"] / seconds for run, seconds in zip(runs, epoch)]
    return {"processes": runs[0]["processes"], "threads": runs[0]["threads"],
            "cache_cases_per_s": cache, "epoch_seconds": epoch, "patches_per_s": patches,
            "patches_per_epoch": runs[0]["patches_per_epoch"]}


def median_range(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmark_distributed"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.data), args.threads, Path(args.result))
        return

    cores = os.cpu_count() or 1
    configurations = [(1, 1), (1, cores), (args.processes, max(1, cores // args.processes))]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        data = work / "ct"
        subprocess.run([sys.executable, "-m", "MedKDSegmentLib", "--quiet", "phantom", "--modality", "CT",
                        "--count", str(CASES), "--size", *map(str, SIZE), "--spacing", *map(str, SPACING),
                        "--seed", "11", "--output", str(data)],
                       check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "MedKDSegment")})
        runs: dict[tuple[int, int], list[dict]] = {c: [] for c in configurations}
        for repeat in range(args.repeats):
            order = configurations if repeat % 2 == 0 else configurations[::-1]
            for processes, threads in order:
                print(f"repeat {repeat + 1}: {processes} process(es) x {threads} thread(s)", flush=True)
                runs[(processes, threads)].append(run_configuration(data, processes, threads, work))
    rows = [summarise(runs[c]) for c in configurations]
    single, whole, parallel = rows
    n = parallel["processes"]

    def efficiency(key: str, base: dict, workers: int) -> list[float]:
        return [p / (workers * b) for p, b in zip(parallel[key], base[key])]

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {cores} cores, CPU only, "
                   f"Python {platform.python_version()}",
        "setting": {"cases": CASES, "size": SIZE, "spacing_mm": SPACING, "epochs_timed": EPOCHS - 1,
                    "steps_per_epoch": STEPS, "batch_per_process": BATCH, "patch": PATCH,
                    "teacher": "TEACHER_CONFIG", "student": "STUDENT_CONFIG", "repeats": args.repeats},
        "rows": rows,
        "efficiency_vs_one_thread": {"cache": efficiency("cache_cases_per_s", single, n),
                                     "training": efficiency("patches_per_s", single, n)},
        "speedup_vs_whole_machine": {"cache": efficiency("cache_cases_per_s", whole, 1),
                                     "training": efficiency("patches_per_s", whole, 1)},
    }
    output = Path(args.output)
    output.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Scaling under torchrun (issue 21)",
        "",
        f"Machine: {result['machine']}. Produced by `scripts/medkd-python scripts/benchmark_distributed.py` "
        f"({args.repeats} repeats, configurations alternated; medians with the range).",
        "",
        f"{CASES} CT phantoms ({SIZE[0]}x{SIZE[1]}x{SIZE[2]} at 3 mm): the default teacher caches its outputs on "
        f"every volume (sharded across processes), then the default student distils with batch {BATCH} of "
        f"{PATCH[0]}³ patches per process, {STEPS} steps per epoch; {EPOCHS - 1} epochs timed after a warm-up epoch.",
        "",
        "| processes x threads | teacher cache, volumes/s | s per epoch | patches/s |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['processes']} x {row['threads']} | {median_range(row['cache_cases_per_s'], 3)} | "
                     f"{median_range(row['epoch_seconds'])} | {median_range(row['patches_per_s'])} |")
    lines += [
        "",
        f"Scaling efficiency of {n} processes (throughput / ({n} x one process with one thread)): teacher cache "
        f"{median_range(result['efficiency_vs_one_thread']['cache'])}, training "
        f"{median_range(result['efficiency_vs_one_thread']['training'])}.",
        f"Against one process using all {cores} cores (what a user has without torchrun): teacher cache "
        f"x{median_range(result['speedup_vs_whole_machine']['cache'])}, training "
        f"x{median_range(result['speedup_vs_whole_machine']['training'])}.",
        "",
        "On a CPU the processes share the same cores, so torchrun gains little over one process using them all: it",
        "is for several GPUs or machines. This script measures CPU processes only; 1 vs N GPUs has not been",
        "measured yet (no GPU machine was lent to the sessions so far).",
        "",
    ]
    output.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
