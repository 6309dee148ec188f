"""Engine benchmark: accuracy, size and CPU speed of the bundled teachers and distilled students.

    scripts/medkd-python scripts/benchmark.py [--subjects 10] [--output docs/benchmark_engine] [--timing-only]

Measures, in one run on one machine (recorded with the figures):
1. mean Dice per structure of teacher and student on held-out phantom subjects per modality
   (target: student >= 97 % of the teacher's mean Dice);
2. teacher/student parameter ratio (target >= 100);
3. teacher vs student on the same 512x512x300 CT-sized volume and on the real CT/MR in ../shared/data:
   warm in-process seconds per stage (read, preprocess, network, back to the input grid, write), cold
   command-line seconds, peak memory, the read+write floor, and the labels against interpolating every
   class everywhere (issue 17 targets: student warm <= 1.5 s and <= 2x the floor, command line <= 3 s,
   <= 1 GB, >= 10x faster than its teacher end to end);
4. Dice on the real cases against their TotalSegmentator labels (informative only).
Writes <output>.md and <output>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedKDSegment"))

from MedKDSegmentLib.engine import inference, prediction, windowing  # noqa: E402
from MedKDSegmentLib.engine.argmax_resample import resample_every_class, resample_to_input  # noqa: E402
from MedKDSegmentLib.engine.bundle import resolve_bundle  # noqa: E402
from MedKDSegmentLib.engine.demo import model_name  # noqa: E402
from MedKDSegmentLib.engine.inference import load_runner, segment  # noqa: E402
from MedKDSegmentLib.engine.measure import Measure, machine_description  # noqa: E402
from MedKDSegmentLib.engine.metrics import dice_per_label  # noqa: E402
from MedKDSegmentLib.engine.networks import output_stride  # noqa: E402
from MedKDSegmentLib.engine.phantom import case_seed, generate_phantom  # noqa: E402
from MedKDSegmentLib.engine.profiles import to_model_grid  # noqa: E402
from MedKDSegmentLib.engine.report import markdown_table, write_json, write_text  # noqa: E402
from MedKDSegmentLib.engine.segfile import write_seg_nrrd  # noqa: E402
from MedKDSegmentLib.engine.volume import read_volume, write_volume  # noqa: E402

HELD_OUT_SEED = 777  # build_models.py trains on dataset seed 0; the demo uses 990001
SHARED = ROOT.parent / "shared" / "data" / "ct-mr-abdomen-totalseg"
# Our structure names -> TotalSegmentator names in the real cases' label tables.
TOTALSEG_NAMES = {
    "liver": ["liver"],
    "spleen": ["spleen"],
    "right kidney": ["kidney_right"],
    "left kidney": ["kidney_left"],
    "aorta": ["aorta"],
    "vertebral bodies": ["vertebrae"],  # prefix: whole vertebrae there, bodies here
    "pancreas": ["pancreas"],
    "inferior vena cava": ["inferior_vena_cava"],
}


def accuracy(modality: str, subjects: int) -> dict:
    teacher = resolve_bundle(model_name(modality, "teacher"))
    student = resolve_bundle(model_name(modality, "student"))
    labels = sorted(student.labels)
    scores = {"teacher": {v: [] for v in labels}, "student": {v: [] for v in labels}}
    networks = {"teacher": teacher.load_network(), "student": student.load_network()}
    for index in range(subjects):
        image, truth = generate_phantom(modality, case_seed(HELD_OUT_SEED, index))
        for role, bundle in (("teacher", teacher), ("student", student)):
            result = segment(image, bundle, "cpu", network=networks[role])
            for label, value in dice_per_label(result.labels.array, truth.array, labels).items():
                scores[role][label].append(value)
        print(f"  {modality} subject {index + 1}/{subjects} done", flush=True)
    rows = []
    for label in labels:
        t, s = np.nanmean(scores["teacher"][label]), np.nanmean(scores["student"][label])
        rows.append({"structure": student.labels[label], "teacher": float(t), "student": float(s)})
    teacher_mean = float(np.mean([r["teacher"] for r in rows]))
    student_mean = float(np.mean([r["student"] for r in rows]))
    return {
        "subjects": subjects,
        "seeds": [case_seed(HELD_OUT_SEED, i) for i in range(subjects)],
        "structures": rows,
        "teacher_mean_dice": teacher_mean,
        "student_mean_dice": student_mean,
        "student_share_of_teacher": student_mean / teacher_mean,
        "teacher_parameters": teacher.parameters,
        "student_parameters": student.parameters,
        "parameter_ratio": teacher.parameters / student.parameters,
        "teacher_gmacs_96": teacher.info["gmacs_96"],
        "student_gmacs_96": student.info["gmacs_96"],
    }


REPEATS = 3  # warm runs (after one warm-up) and cold command-line runs per model; medians are reported


def timing(path: Path, modality: str, workdir: Path, reference: Path | None = None, names: dict | None = None,
           exactness: bool = False) -> dict:
    """Teacher and student on one volume, one after the other: warm in-process runs (the network loaded once,
    as in Slicer's worker) stage by stage, cold command-line runs (a new process: imports, bundle, job), peak
    memory, and the floor: reading the input and writing the two outputs with SimpleITK alone. Each model
    runs as it would for a user on the CPU (``load_runner``: the student's ONNX copy, the teacher in torch);
    the student also runs warm in torch."""
    result = {"input": str(path), "floor": io_floor(path, workdir)}
    for role, runner in (("teacher", load_runner), ("student", load_runner), ("student in torch", None)):
        bundle = resolve_bundle(model_name(modality, role.split()[0]))
        network = runner(bundle, "cpu") if runner else bundle.load_network()
        runs = [warm_run(path, modality, bundle, network, workdir) for _ in range(REPEATS + 1)][1:]
        entry = {key: float(np.median([run[key] for run in runs])) for key in runs[0] if key != "result"}
        seg = runs[-1]["result"]
        entry.update(windows=seg.windows, runtime=seg.device)
        if runner:
            entry["cli"] = cli_runs(path, bundle, workdir)
        if reference is not None and names is not None:
            entry["dice_vs_totalsegmentator"] = informative_dice(seg.labels, reference, names, bundle.labels)
        if exactness and runner:
            entry["exactness"] = exact_postprocessing(read_volume(path, modality), bundle, network, seg.labels)
        result[role] = entry
        result["shape_zyx"], result["spacing_xyz"] = list(seg.labels.shape), [round(s, 3) for s in seg.labels.spacing]
        print(f"  {path.name} {role}: {entry['end_to_end_seconds']:.2f} s warm, network "
              f"{entry['network_seconds']:.2f} s ({seg.device})", flush=True)
    for key in ("network_seconds", "end_to_end_seconds"):
        result[key.replace("seconds", "speedup")] = result["teacher"][key] / result["student"][key]
    result["cli_speedup"] = result["teacher"]["cli"]["seconds"] / result["student"]["cli"]["seconds"]
    return result


def warm_run(path: Path, modality: str, bundle, network, workdir: Path) -> dict:
    """One in-process job as the CLI runs it (read, segment, write .nii.gz and .seg.nrrd), stage by stage."""
    gc.collect()
    with Measure() as usage:
        started = time.perf_counter()
        volume = read_volume(path, modality)
        read = time.perf_counter() - started
        seg = segment(volume, bundle, "cpu", network=network)
        started = time.perf_counter()
        write_volume(seg.labels, workdir / "out.nii.gz")
        write_seg_nrrd(seg.labels, workdir / "out.seg.nrrd", bundle.labels, bundle.colors)
        write = time.perf_counter() - started
    for name in ("out.nii.gz", "out.seg.nrrd"):
        (workdir / name).unlink()
    return {"end_to_end_seconds": usage.seconds, "read_seconds": read, "preprocess_seconds": seg.seconds["preprocess"],
            "network_seconds": seg.seconds["inference"], "postprocess_seconds": seg.seconds["postprocess"],
            "write_seconds": write, "peak_memory_mb": usage.peak_mb, "result": seg}


# ``medkd`` in a process that reports its own peak resident memory (VmHWM, counted from its exec) on exit.
PEAK_REPORTING_MEDKD = (
    "import runpy, sys\n"
    "try:\n    runpy.run_module('MedKDSegmentLib', run_name='__main__')\n"
    "finally:\n    sys.stderr.write('VmHWM' + [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0][6:])\n"
)


def cli_runs(path: Path, bundle, workdir: Path) -> dict:
    """``medkd segment`` in a new process each time (files already in the page cache): wall seconds and the
    process's peak resident memory (its whole footprint, interpreter and libraries included)."""
    seconds, peaks = [], []
    env = {**os.environ, "PYTHONPATH": str(ROOT / "MedKDSegment")}
    for _ in range(REPEATS):
        output = workdir / "cli"
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", PEAK_REPORTING_MEDKD, "--quiet", "segment", "--input", str(path),
                              "--output", str(output), "--model", str(bundle.path), "--device", "cpu"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds.append(time.perf_counter() - started)
        if run.returncode != 0:
            raise RuntimeError(f"medkd segment failed: {run.stderr[-2000:]}")
        peaks.append(int(run.stderr.rsplit("VmHWM", 1)[1].split()[0]) / 1024)  # kB
        for written in workdir.glob("cli*"):
            written.unlink()
    return {"seconds": float(np.median(seconds)), "peak_rss_mb": float(np.median(peaks))}


def io_floor(path: Path, workdir: Path) -> dict:
    """Reading the input and writing a label map of its size as .nii.gz and .seg.nrrd with SimpleITK alone
    (no checks): what any tool doing this job pays. Median of REPEATS."""
    reads, writes = [], []
    for _ in range(REPEATS):
        started = time.perf_counter()
        image = read_volume(path).to_sitk() if path.is_dir() else sitk.ReadImage(str(path))
        reads.append(time.perf_counter() - started)
        labels = sitk.Cast(image > 0, sitk.sitkUInt8)
        started = time.perf_counter()
        sitk.WriteImage(labels, str(workdir / "floor.nii.gz"), True)
        sitk.WriteImage(labels, str(workdir / "floor.seg.nrrd"), True)
        writes.append(time.perf_counter() - started)
        del image, labels
    for written in workdir.glob("floor*"):
        written.unlink()
    read, write = float(np.median(reads)), float(np.median(writes))
    return {"read_seconds": read, "write_seconds": write, "seconds": read + write}


def exact_postprocessing(volume, bundle, runner, labels) -> dict:
    """On the torch network's scores: voxels where the labels differ from interpolating every class everywhere
    (the method the engine used before) and, for a whole-volume pass, from the sliding window's labels; and
    voxels where ``labels`` (the job's, through ``runner``: an ONNX copy where the bundle has one) differ from
    torch's."""
    network = bundle.load_network()
    image, grid = to_model_grid(volume, bundle.profile)
    scores, _, padded = prediction.predict_scores(network, image, torch.device("cpu"))
    output = inference._output_grid(grid, padded, output_stride(network))
    started = time.perf_counter()
    ours = resample_to_input(scores, output, volume)
    fast = time.perf_counter() - started
    started = time.perf_counter()
    reference = resample_every_class(scores, output, volume)
    slow = time.perf_counter() - started
    out = {"differing_voxels": int((ours != reference).sum()), "voxels": int(ours.size),
           "seconds": fast, "every_class_seconds": slow, "runtime_vs_torch_differing_voxels": int(
               (labels.array != ours).sum())}
    if prediction.whole_volume_fits(network, padded):
        budget = windowing.WHOLE_VOLUME_BYTES
        windowing.WHOLE_VOLUME_BYTES = 0
        try:
            windowed, _, _ = prediction.predict_scores(network, image, torch.device("cpu"))
        finally:
            windowing.WHOLE_VOLUME_BYTES = budget
        out["whole_volume_vs_windows_differing_voxels"] = int(
            (resample_to_input(windowed, output, volume) != ours).sum())
    return out


def informative_dice(labels, reference_path: Path, names_path: Path, ours: dict[int, str]) -> dict:
    reference = read_volume(reference_path)
    table = {int(k): v for k, v in json.loads(Path(names_path).read_text()).items()}
    out = {}
    for value, name in ours.items():
        theirs = [k for k, v in table.items() if any(v.startswith(p) for p in TOTALSEG_NAMES[name])]
        if theirs:
            truth = np.isin(reference.array, theirs).astype(np.uint8)
            out[name] = dice_per_label((labels.array == value).astype(np.uint8), truth, [1])[1]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=10)
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmark_engine"))
    parser.add_argument("--skip-large", action="store_true", help="skip the 512x512x300 volume")
    parser.add_argument("--timing-only", action="store_true", help="skip the accuracy sections")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"machine": machine_description(), "accuracy": {}, "timing": {}}
    for modality in () if args.timing_only else ("CT", "MR"):
        print(f"accuracy on {args.subjects} held-out {modality} phantoms", flush=True)
        results["accuracy"][modality] = accuracy(modality, args.subjects)
    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(temporary)
        if not args.skip_large:
            image, _ = generate_phantom("CT", case_seed(HELD_OUT_SEED, 999), size=(512, 512, 300),
                                        spacing=(0.8, 0.8, 1.0))
            large = write_volume(image, workdir / "ct_512x512x300.nii.gz")
            del image
            results["timing"]["CT 512x512x300 phantom"] = timing(large, "CT", workdir, exactness=True)
        if SHARED.is_dir():
            results["timing"]["real CT (ct.nii.gz)"] = timing(
                SHARED / "ct.nii.gz", "CT", workdir, SHARED / "ct_labels.nii.gz", SHARED / "ct_labels.json", True)
            results["timing"]["real CT DICOM series (ct_dicom)"] = timing(
                SHARED / "ct_dicom", "CT", workdir, SHARED / "ct_dicom_labels.nii.gz", SHARED / "ct_dicom_labels.json",
                True)
            results["timing"]["real MR (mr.nii.gz)"] = timing(
                SHARED / "mr.nii.gz", "MR", workdir, SHARED / "mr_labels.nii.gz", SHARED / "mr_labels.json", True)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(results, output.with_suffix(".json"))
    write_text(render(results), output.with_suffix(".md"))
    print(render(results))
    return 0


def render(results: dict) -> str:
    machine = results["machine"]
    lines = [
        "# Engine benchmark: bundled teachers vs distilled students",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), {machine['platform']}. CPU only. "
        "Reproduce: `scripts/medkd-python scripts/benchmark.py`.",
        "",
    ]
    for modality, acc in results["accuracy"].items():
        lines += [
            f"## Accuracy, {modality}: {acc['subjects']} held-out phantom subjects (128×128×80 at 3 mm)",
            "",
            markdown_table(
                acc["structures"] + [{"structure": "**mean**", "teacher": acc["teacher_mean_dice"],
                                      "student": acc["student_mean_dice"]}],
                {"structure": "structure", "teacher": "teacher Dice", "student": "student Dice"},
            ),
            "",
            f"Student mean Dice = **{100 * acc['student_share_of_teacher']:.1f} %** of the teacher's (target ≥ 97 %). "
            f"Parameters: teacher {acc['teacher_parameters']:,}, student {acc['student_parameters']:,}, "
            f"ratio **{acc['parameter_ratio']:.1f}** (target ≥ 100). "
            f"GMAC per 96³ window: teacher {acc['teacher_gmacs_96']}, student {acc['student_gmacs_96']}.",
            "",
        ]
    rows, exact = [], []
    for name, t in results["timing"].items():
        for role in ("teacher", "student", "student in torch"):
            r = t[role]
            rows.append({
                "volume": f"{name} {tuple(t['shape_zyx'])}", "model": role, "runtime": r["runtime"],
                "read": r["read_seconds"], "preprocess": r["preprocess_seconds"], "network": r["network_seconds"],
                "back to input grid": r["postprocess_seconds"], "write": r["write_seconds"],
                "warm end to end": r["end_to_end_seconds"], "× floor": r["end_to_end_seconds"] / t["floor"]["seconds"],
                "CLI cold": r["cli"]["seconds"] if "cli" in r else "",
                "peak MB (warm, above start)": r["peak_memory_mb"],
                "CLI peak RSS MB": r["cli"]["peak_rss_mb"] if "cli" in r else "", "windows": r["windows"],
            })
            if "exactness" in r:
                e = r["exactness"]
                exact.append({"volume": name, "model": role, "differing voxels": f"{e['differing_voxels']:,} of "
                              f"{e['voxels']:,}", "seconds": e["seconds"], "every class s": e["every_class_seconds"],
                              "whole volume vs windows": e.get("whole_volume_vs_windows_differing_voxels", ""),
                              "runtime vs torch": e["runtime_vs_torch_differing_voxels"]})
    floors = ", ".join(f"{name} {t['floor']['seconds']:.2f} s (read {t['floor']['read_seconds']:.2f}, write "
                       f"{t['floor']['write_seconds']:.2f})" for name, t in results["timing"].items())
    speedups = ", ".join(f"{name}: network {t['network_speedup']:.1f}×, warm end to end "
                         f"{t['end_to_end_speedup']:.1f}×, command line {t['cli_speedup']:.1f}×"
                         for name, t in results["timing"].items())
    lines += [
        "## CPU speed (same run, same volume; teacher then student)",
        "",
        f"Seconds are medians of {REPEATS} runs. *Warm*: in one process with the network loaded (as Slicer's worker "
        "runs it): read the file, preprocess onto the model grid, run the network (one whole-volume pass or a "
        "sliding window: *windows*), take labels back onto the input grid, write `.nii.gz` and `.seg.nrrd` "
        "(each checked before it is moved into place). The student runs as a user's CPU job runs it (its ONNX "
        "copy in ONNX Runtime), and also in torch; the teacher has no ONNX copy in the repository and runs in "
        "torch. *CLI cold*: `medkd segment` in a new process (interpreter, torch and "
        "MONAI imports where the model needs them, bundle, the same job; files in the page cache); its peak RSS is "
        "the whole process's. *Floor*: reading the input and writing "
        "the two files with SimpleITK alone in the same run; *× floor* = warm end to end / floor.",
        "",
        markdown_table(rows, {k: k for k in rows[0]}) if rows else "(not run)",
        "",
        f"Floors: {floors}.",
        "",
        f"Student speed-ups over its teacher: {speedups}.",
        "",
    ]
    if exact:
        lines += [
            "Labels back on the input grid (`engine/argmax_resample.py`) against interpolating every class at every "
            "voxel (the engine's method before), on the same scores (differing voxels, seconds of each); for "
            "networks that run on the whole volume, differing voxels against the sliding window's labels; and "
            "the job's labels (the student's ONNX copy) against torch's:",
            "",
            markdown_table(exact, {k: k for k in exact[0]}),
            "",
        ]
    real = {k: v for k, v in results["timing"].items() if "real" in k}
    if real:
        lines += ["Dice against the real cases' TotalSegmentator labels (informative only: phantom-trained models, "
                  "model-made labels, whole vertebrae vs vertebral bodies):", ""]
        for name, t in real.items():
            for role in ("teacher", "student"):
                dice = t[role].get("dice_vs_totalsegmentator", {})
                lines.append(f"- {name}, {role}: " + ", ".join(f"{k} {v:.2f}" for k, v in dice.items()))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
