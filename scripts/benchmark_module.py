"""Time from the Logic call to a finished segmentation node: in-process, and through the worker (cold, warm).

    python scripts/benchmark_module.py [--model phantom-abdomen-ct-student] [--repeats 3]

Runs the module's scene logic on a real MRML scene (slicer-core wheel, as in the tests) with the
student on the sample CT phantom (the demo's held-out case) and on the same phantom resampled to
512x512x300. Writes docs/benchmark_module.md and docs/benchmark_module.json with the machine.

Targets: a warm worker adds < 1 s over in-process; a cold worker adds < the torch/MONAI import time + 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedKDSegment"))

LARGE_SIZE = (512, 512, 300)  # x, y, z


def plain_mrml_scene():
    """A real MRML scene wired the way the Slicer application wires its module logics (no GUI)."""
    import slicer
    import vtk

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app.SetModuleLogic("Colors", colors)
    app.SetSliceLogics(vtk.vtkCollection())
    app.SetViewLogics(vtk.vtkCollection())
    logics = {}
    for name, cls in (("Volumes", slicer.vtkSlicerVolumesLogic), ("Segmentations",
                                                                  slicer.vtkSlicerSegmentationsModuleLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        volumes=types.SimpleNamespace(logic=lambda: logics["Volumes"]),
        segmentations=types.SimpleNamespace(logic=lambda: logics["Segmentations"]),
    )
    return scene, (app, logics)


def import_seconds(repeats: int) -> float:
    """torch + MONAI import time in a fresh interpreter (what a cold worker pays)."""
    code = "import time; t = time.perf_counter(); import torch, monai; print(time.perf_counter() - t)"
    times = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
             for _ in range(repeats)]
    return statistics.median(times)


def sample_volumes():
    import SimpleITK as sitk

    from MedKDSegmentLib.engine.demo import DEMO_SEED, DEMO_SIZE, DEMO_SPACING
    from MedKDSegmentLib.engine.phantom import generate_phantom
    from MedKDSegmentLib.engine.volume import Volume

    sample, _ = generate_phantom("CT", DEMO_SEED, size=DEMO_SIZE, spacing=DEMO_SPACING)
    image = sample.to_sitk()
    extent = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
    spacing = [e / n for e, n in zip(extent, LARGE_SIZE)]
    origin = [o - s0 / 2 + s1 / 2 for o, s0, s1 in zip(image.GetOrigin(), image.GetSpacing(), spacing)]
    large = sitk.Resample(image, list(LARGE_SIZE), sitk.Transform(), sitk.sitkLinear, origin, spacing,
                          image.GetDirection(), -1024.0, sitk.sitkInt16)
    return {
        f"sample CT phantom {'x'.join(map(str, DEMO_SIZE))}": sample,
        f"CT {'x'.join(map(str, LARGE_SIZE))}": Volume.from_sitk(large, modality="CT"),
    }


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="phantom-abdomen-ct-student")
    parser.add_argument("--models-dir", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=3, help="warm runs per configuration (median reported)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmark_module"))
    parser.add_argument("--note", default="", help="a sentence added to the report (e.g. which bundle was used)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md from the existing .json")
    args = parser.parse_args()
    output = Path(args.output)
    if args.render_only:
        results = json.loads(output.with_suffix(".json").read_text())
        results["note"] = args.note or results.get("note", "")
        output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        output.with_suffix(".md").write_text(markdown(results))
        return 0

    import torch

    from MedKDSegmentLib.engine.measure import machine_description
    from MedKDSegmentLib.scene.logic import SceneLogic
    from MedKDSegmentLib.scene.volumes import add_volume_node

    torch.set_num_threads(torch.get_num_threads())  # the engine's default, stated in the machine line
    scene, _keep = plain_mrml_scene()
    imports = import_seconds(3)
    model = SceneLogic(args.models_dir).findModel(args.model)
    results = {"machine": machine_description(), "load_average_at_start": os.getloadavg(), "model": model.name,
               "model_path": str(model.path), "model_source": model.source, "device": "cpu",
               "torch_monai_import_seconds": round(imports, 3), "note": args.note, "volumes": {}}
    print(f"torch+MONAI import: {imports:.2f} s; model {model.name} ({model.source})", flush=True)

    for label, volume in sample_volumes().items():
        node = add_volume_node(volume, label)

        def run(logic, use_worker, node=node) -> tuple[float, float]:
            """(Logic call to finished node, the engine's own time inside it) in seconds."""
            started = time.perf_counter()
            if use_worker:
                job = logic.startSegment(node, model.name, "cpu", "CT")
                result = job.wait()
                engine = job.outputs["seconds"]
            else:
                result = logic.segment(node, model.name, "cpu", "CT")
                engine = float(result.GetAttribute("MedKDSegment.Seconds"))
            total = time.perf_counter() - started
            scene.RemoveNode(result)
            return total, engine

        def median_of(runs):
            return statistics.median(r[0] for r in runs), statistics.median(r[0] - r[1] for r in runs)

        inprocess = SceneLogic(args.models_dir)
        first_in_process = run(inprocess, False)  # loads the network once
        warm_in_process, in_process_outside_engine = median_of([run(inprocess, False) for _ in range(args.repeats)])
        worker = SceneLogic(args.models_dir)
        cold = run(worker, True)  # spawn + torch/MONAI import + network load + job
        worker_import = worker.workerInfo()["import_seconds"]
        warm_worker, worker_outside_engine = median_of([run(worker, True) for _ in range(args.repeats)])
        worker.shutdownWorker()
        entry = {
            "shape_zyx": list(volume.shape), "spacing_xyz": [round(s, 4) for s in volume.spacing],
            "in_process_first_s": round(first_in_process[0], 3), "in_process_warm_s": round(warm_in_process, 3),
            "worker_cold_s": round(cold[0], 3), "worker_warm_s": round(warm_worker, 3),
            # Differences of medians of whole runs: noisy when other jobs share the CPU.
            "warm_worker_overhead_s": round(warm_worker - warm_in_process, 3),
            "cold_worker_overhead_s": round(cold[0] - warm_in_process, 3),
            # Measured within each run: time outside the engine's segmentation (same work in both paths).
            "in_process_outside_engine_s": round(in_process_outside_engine, 3),
            "warm_worker_outside_engine_s": round(worker_outside_engine, 3),
            "cold_worker_outside_engine_s": round(cold[0] - cold[1], 3),
            "warm_worker_added_s": round(worker_outside_engine - in_process_outside_engine, 3),
            "cold_worker_added_s": round(cold[0] - cold[1] - in_process_outside_engine, 3),
            "worker_import_seconds": worker_import,
        }
        entry["warm_target_met"] = entry["warm_worker_added_s"] < 1.0
        entry["cold_target_met"] = entry["cold_worker_added_s"] < imports + 1.0
        results["volumes"][label] = entry
        scene.RemoveNode(node)
        print(label, json.dumps(entry), flush=True)

    results["load_average_at_end"] = os.getloadavg()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {output.with_suffix('.md')} and .json", flush=True)
    return 0


def load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        "# Slicer module latency: Logic call to finished segmentation node",
        "",
        (f"Model `{results['model']}` ({results['model_source']}), device `{results['device']}`. "
         f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} with "
         f"{machine['torch_threads']} threads, Python {machine['python']}, {machine['platform']}. "
         f"Load average {load(results['load_average_at_start'])} at the start and "
         f"{load(results['load_average_at_end'])} at the end (other jobs shared the CPU when this ran)."),
        "",
        (f"torch + MONAI import in a fresh interpreter: **{results['torch_monai_import_seconds']:.2f} s** "
         "(median of 3); the cold worker reports its own import time too (second table)."),
        "",
        ("Each time runs from `logic.segment(volumeNode, ...)` (worker: `logic.startSegment(...).wait()`) to the new "
         "segmentation node in the scene. *First* in-process includes loading the network; *warm* values are "
         "medians of repeated calls; *cold worker* starts a new worker process (interpreter, torch/MONAI import, "
         "network load) for the call."),
        "",
        "| volume | in-process first | in-process warm | worker cold | worker warm |",
        "|---|---|---|---|---|",
    ]
    for label, e in results["volumes"].items():
        lines.append(f"| {label} | {e['in_process_first_s']:.2f} s | {e['in_process_warm_s']:.2f} s "
                     f"| {e['worker_cold_s']:.2f} s | {e['worker_warm_s']:.2f} s |")
    lines += [
        "",
        ("**What the worker adds.** The engine's segmentation is the same work in both paths, and each run "
         "reports its own engine time, so the worker's cost is measured within each run: the time *outside* "
         "the engine (in-process: volume node to engine volume, segmentation node; worker: in addition the input "
         "NRRD written and read, the labels NRRD written and read, the protocol and polling, and for a cold "
         "worker the process start, imports and network load), minus the same for in-process. The plain "
         "difference of whole-run medians is shown too; on a shared CPU it mostly shows noise."),
        "",
        ("| volume | outside the engine: in-process / warm worker / cold worker | warm worker adds "
         "(target < 1 s) | cold worker adds (target < import + 1 s) | cold worker's own import | "
         "difference of medians: warm / cold |"),
        "|---|---|---|---|---|---|",
    ]
    for label, e in results["volumes"].items():
        ok = {True: "met", False: "**missed**"}
        lines.append(
            f"| {label} | {e['in_process_outside_engine_s']:.2f} / {e['warm_worker_outside_engine_s']:.2f} / "
            f"{e['cold_worker_outside_engine_s']:.2f} s | {e['warm_worker_added_s']:+.2f} s "
            f"({ok[e['warm_target_met']]}) | {e['cold_worker_added_s']:+.2f} s vs "
            f"{results['torch_monai_import_seconds'] + 1:.2f} s ({ok[e['cold_target_met']]}) "
            f"| {e['worker_import_seconds']:.2f} s | {e['warm_worker_overhead_s']:+.2f} / "
            f"{e['cold_worker_overhead_s']:+.2f} s |")
    if results.get("note"):
        lines += ["", f"Note: {results['note']}"]
    lines += ["", "Reproduce: `.venv/bin/python scripts/benchmark_module.py` (see the script's docstring).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
