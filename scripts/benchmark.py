"""Engine benchmark: accuracy, size and CPU speed of the bundled teachers and distilled students.

    scripts/medkd-python scripts/benchmark.py [--subjects 10] [--output docs/benchmark_engine]

Measures, in one run on one machine (recorded with the figures):
1. mean Dice per structure of teacher and student on held-out phantom subjects per modality
   (target: student >= 97 % of the teacher's mean Dice);
2. teacher/student parameter ratio (target >= 100);
3. teacher vs student on the same 512x512x300 CT-sized volume: network seconds as a ratio
   (target >= 10x), end-to-end seconds (read, preprocess, infer, write) and peak memory;
4. the same timing on the real abdominal CT and MR in ../shared/data (their labels are
   TotalSegmentator output, so Dice there is informative only).
Writes <output>.md and <output>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedKDSegment"))

from MedKDSegmentLib.engine.bundle import resolve_bundle  # noqa: E402
from MedKDSegmentLib.engine.demo import model_name  # noqa: E402
from MedKDSegmentLib.engine.inference import segment  # noqa: E402
from MedKDSegmentLib.engine.measure import Measure, machine_description  # noqa: E402
from MedKDSegmentLib.engine.metrics import dice_per_label  # noqa: E402
from MedKDSegmentLib.engine.phantom import case_seed, generate_phantom  # noqa: E402
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


def timing(path: Path, modality: str, workdir: Path, reference: Path | None = None, names: dict | None = None) -> dict:
    """End to end (read, preprocess, infer, write .seg.nrrd) for teacher and student, one after the other."""
    result = {"input": str(path)}
    for role in ("teacher", "student"):
        bundle = resolve_bundle(model_name(modality, role))
        gc.collect()
        with Measure() as usage:
            volume = read_volume(path, modality)
            seg = segment(volume, bundle, "cpu")
            write_seg_nrrd(seg.labels, workdir / f"{role}.seg.nrrd", bundle.labels, bundle.colors)
        result["shape_zyx"] = list(volume.shape)
        result["spacing_xyz"] = [round(s, 3) for s in volume.spacing]
        result[role] = {
            "end_to_end_seconds": usage.seconds,
            "network_seconds": seg.seconds["inference"],
            "preprocess_seconds": seg.seconds["preprocess"],
            "postprocess_seconds": seg.seconds["postprocess"],
            "windows": seg.windows,
            "peak_memory_mb": usage.peak_mb,
        }
        if reference is not None and names is not None:
            result[role]["dice_vs_totalsegmentator"] = informative_dice(seg.labels, reference, names, bundle.labels)
        print(f"  {path.name} {role}: {usage.seconds:.1f} s end to end, network {seg.seconds['inference']:.2f} s",
              flush=True)
    result["network_speedup"] = result["teacher"]["network_seconds"] / result["student"]["network_seconds"]
    result["end_to_end_speedup"] = result["teacher"]["end_to_end_seconds"] / result["student"]["end_to_end_seconds"]
    return result


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
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"machine": machine_description(), "accuracy": {}, "timing": {}}
    for modality in ("CT", "MR"):
        print(f"accuracy on {args.subjects} held-out {modality} phantoms", flush=True)
        results["accuracy"][modality] = accuracy(modality, args.subjects)
    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(temporary)
        if not args.skip_large:
            image, _ = generate_phantom("CT", case_seed(HELD_OUT_SEED, 999), size=(512, 512, 300),
                                        spacing=(0.8, 0.8, 1.0))
            large = write_volume(image, workdir / "ct_512x512x300.nii.gz")
            del image
            results["timing"]["CT 512x512x300 phantom"] = timing(large, "CT", workdir)
        if SHARED.is_dir():
            results["timing"]["real CT (ct.nii.gz)"] = timing(
                SHARED / "ct.nii.gz", "CT", workdir, SHARED / "ct_labels.nii.gz", SHARED / "ct_labels.json")
            results["timing"]["real CT DICOM series (ct_dicom)"] = timing(
                SHARED / "ct_dicom", "CT", workdir, SHARED / "ct_dicom_labels.nii.gz", SHARED / "ct_dicom_labels.json")
            results["timing"]["real MR (mr.nii.gz)"] = timing(
                SHARED / "mr.nii.gz", "MR", workdir, SHARED / "mr_labels.nii.gz", SHARED / "mr_labels.json")
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
    rows = []
    for name, t in results["timing"].items():
        for role in ("teacher", "student"):
            r = t[role]
            rows.append({
                "volume": f"{name} {tuple(t['shape_zyx'])}", "model": role,
                "network s": r["network_seconds"], "end-to-end s": r["end_to_end_seconds"],
                "peak MB": r["peak_memory_mb"], "windows": r["windows"],
                "speedup": t["network_speedup"] if role == "student" else "",
                "e2e speedup": t["end_to_end_speedup"] if role == "student" else "",
            })
    lines += [
        "## CPU speed (same run, same volume; teacher then student)",
        "",
        "Network seconds are the sliding-window inference at the model's 3 mm grid; end to end adds reading the "
        "file, preprocessing and resampling, resampling back to the input grid and writing a .seg.nrrd.",
        "",
        markdown_table(rows, {k: k for k in rows[0]}) if rows else "(not run)",
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
