"""Segment (or compare teacher and student on) every volume in a folder, headless.

In Slicer (the module's Logic on MRML nodes, results written by Slicer's own storage nodes):

    Slicer --no-main-window --python-script scripts/slicer_batch.py -- --input DIR --output DIR --model NAME [--compare]

Without Slicer, plain Python runs the same job through the engine (same outputs):

    python scripts/slicer_batch.py --input DIR --output DIR --model NAME [--compare]

Inputs: NIfTI/NRRD/MHA files and DICOM series folders directly inside DIR. Outputs: one
``<case>_<model>.seg.nrrd`` per case and model (with ``--compare`` also the teacher's and a
``<case>_disagreement.seg.nrrd``), and ``results.csv``: one row per case and structure with
the structure's volume, Dice and HD95 between teacher and student (``--compare``), run time,
device and parameter count. Exit code 0 only if every case succeeded.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedKDSegment"))

from MedKDSegmentLib.engine.volume import VOLUME_SUFFIXES  # noqa: E402 (needs the path above)

CSV_COLUMNS = [
    "case", "mode", "structure", "label", "model", "role", "device", "seconds", "parameters", "volume_ml",
    "teacher", "student", "dice_teacher_student", "hd95_mm_teacher_student", "volume_ml_teacher",
    "volume_ml_student", "teacher_seconds", "student_seconds", "error",
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="folder of volumes (files or DICOM series folders)")
    parser.add_argument("--output", required=True, help="folder for .seg.nrrd files and results.csv")
    parser.add_argument("--model", required=True, help="model name or bundle folder (the student with --compare)")
    parser.add_argument("--compare", action="store_true", help="also run the student's teacher and compare")
    parser.add_argument("--teacher", help="teacher name or folder for --compare (default: the student's teacher)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    parser.add_argument("--modality", default="auto", help="auto (DICOM tag or intensities), CT or MR")
    parser.add_argument("--models-dir", action="append", default=[], help="folder of user models (repeatable)")
    return parser.parse_args([a for a in argv if a != "--"] if argv[:1] == ["--"] else argv)


def find_cases(folder: Path) -> list[Path]:
    """Volume files and DICOM series folders directly inside ``folder``."""
    cases = []
    for path in sorted(folder.iterdir()):
        is_volume_file = path.is_file() and path.name.endswith(VOLUME_SUFFIXES) and not path.name.endswith(".seg.nrrd")
        is_series = path.is_dir() and any(p.is_file() for p in path.iterdir())
        if is_volume_file or is_series:
            cases.append(path)
    return cases


def case_name(path: Path) -> str:
    return path.name.split(".")[0]


def structure_rows(case: str, labels, names: dict, run: dict, voxel_ml: float) -> list[dict]:
    import numpy as np

    counts = np.bincount(np.asarray(labels).ravel(), minlength=max(names) + 1)
    return [{"case": case, "mode": "segment", "structure": name, "label": value, "model": run["model"],
             "role": run["role"], "device": run["device"], "seconds": round(run["seconds"], 4),
             "parameters": run["parameters"], "volume_ml": round(float(counts[value]) * voxel_ml, 4)}
            for value, name in sorted(names.items())]


def comparison_rows(case: str, rows: list[dict], runs: dict) -> list[dict]:
    def number(value):
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else round(value, 4)

    return [{"case": case, "mode": "compare", "structure": row["structure"], "label": row["label"],
             "device": runs["student"]["device"], "teacher": runs["teacher"]["model"],
             "student": runs["student"]["model"], "dice_teacher_student": number(row["dice_first_vs_second"]),
             "hd95_mm_teacher_student": number(row.get("hd95_mm_first_vs_second")),
             "volume_ml_teacher": number(row["volume_ml_first"]), "volume_ml_student": number(row["volume_ml_second"]),
             "teacher_seconds": round(runs["teacher"]["seconds"], 4),
             "student_seconds": round(runs["student"]["seconds"], 4)} for row in rows]


def write_csv(rows: list[dict], path: Path) -> None:
    temporary = path.with_name(f".partial-{path.name}")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


# --- without Slicer: the engine ---------------------------------------------------------------------------


def run_with_engine(args: argparse.Namespace, cases: list[Path], output: Path) -> tuple[list[dict], int]:
    import numpy as np

    from MedKDSegmentLib import catalog, jobs
    from MedKDSegmentLib.engine.segfile import write_seg_nrrd
    from MedKDSegmentLib.engine.volume import detect_modality, normalize_modality, read_volume

    cache, rows, failures = jobs.NetworkCache(), [], 0
    student = catalog.find_model(args.model, args.models_dir)
    teacher = (catalog.find_model(args.teacher, args.models_dir) if args.teacher else
               catalog.teacher_of(student, catalog.list_models(args.models_dir))) if args.compare else None
    for path in cases:
        case = case_name(path)
        try:
            volume = read_volume(path)
            volume.modality = normalize_modality(args.modality) if args.modality != "auto" else detect_modality(volume)
            voxel_ml = float(np.prod(volume.spacing)) / 1000.0
            if args.compare:
                if teacher is None:
                    raise RuntimeError(f"no teacher for {student.name}; give --teacher")
                result = jobs.compare_volume(volume, teacher.path, student.path, None, args.device, cache=cache,
                                             user_folders=args.models_dir)
                runs = {role: result[role] for role in ("teacher", "student")}
                for run in runs.values():
                    write_seg_nrrd(run.labels, output / f"{case}_{run.model}.seg.nrrd", run.names, run.colors)
                    rows += structure_rows(case, run.labels.array, run.names, run.summary(), voxel_ml)
                difference = runs["teacher"].labels.with_array(
                    jobs.disagreement(runs["teacher"].labels.array, runs["student"].labels.array))
                write_seg_nrrd(difference, output / f"{case}_disagreement.seg.nrrd", jobs.DISAGREEMENT_NAMES,
                               jobs.DISAGREEMENT_COLORS)
                rows += comparison_rows(case, result["rows"], {r: runs[r].summary() for r in runs})
            else:
                run = jobs.segment_volume(volume, student.path, args.device, cache=cache, user_folders=args.models_dir)
                write_seg_nrrd(run.labels, output / f"{case}_{run.model}.seg.nrrd", run.names, run.colors)
                rows += structure_rows(case, run.labels.array, run.names, run.summary(), voxel_ml)
            print(f"{case}: done", flush=True)
        except Exception as error:  # noqa: BLE001 (one bad case must not stop the batch)
            failures += 1
            rows.append({"case": case, "error": str(error)})
            print(f"{case}: FAILED: {error}", file=sys.stderr, flush=True)
    return rows, failures


# --- in Slicer: the module's Logic on MRML nodes ------------------------------------------------------------


def write_segmentation_node(node, path: Path) -> None:
    """Through Slicer's segmentation storage node, to a temporary name first (nothing partial is left)."""
    import slicer

    temporary = path.with_name(f".partial-{path.name}")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(temporary))
    storage.SetUseCompression(True)
    if not storage.WriteData(node):
        temporary.unlink(missing_ok=True)
        raise RuntimeError(f"could not write {path}")
    os.replace(temporary, path)


def labels_of(node):
    """The shared labelmap layer (label values) of a result node."""
    import slicer

    first = node.GetSegmentation().GetNthSegmentID(0)
    return slicer.util.arrayFromSegmentInternalBinaryLabelmap(node, first)


def run_with_slicer(args: argparse.Namespace, cases: list[Path], output: Path) -> tuple[list[dict], int]:
    import numpy as np
    import slicer

    from MedKDSegmentLib.scene import dependencies, volumes
    from MedKDSegmentLib.scene.logic import SceneLogic

    missing = dependencies.missing_requirements()
    if missing:  # a headless run never installs packages without asking
        raise SystemExit(f"error: missing Python packages in Slicer: {', '.join(missing)}; open the MedKDSegment "
                         "module once (it offers to install them) or use Slicer's pip_install")
    logic, rows, failures = SceneLogic(args.models_dir), [], 0
    for path in cases:
        case = case_name(path)
        scene = slicer.mrmlScene
        existing = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        try:
            volume_node = volumes.load_volume_node(path, case)
            voxel_ml = float(np.prod(volume_node.GetSpacing())) / 1000.0
            modality = args.modality
            if args.compare:
                result = logic.compare(volume_node, args.teacher, args.model, None, args.device, modality,
                                       showLayout=False)
                pairs = [(result.teacherSegmentation, result.runs["teacher"]),
                         (result.studentSegmentation, result.runs["student"])]
                write_segmentation_node(result.disagreementSegmentation, output / f"{case}_disagreement.seg.nrrd")
                extra = comparison_rows(case, result.rows, result.runs)
            else:
                node = logic.segment(volume_node, args.model, args.device, modality)
                run = {"model": node.GetAttribute("MedKDSegment.Model"), "role": node.GetAttribute("MedKDSegment.Role"),
                       "device": node.GetAttribute("MedKDSegment.Device"),
                       "seconds": float(node.GetAttribute("MedKDSegment.Seconds")),
                       "parameters": int(node.GetAttribute("MedKDSegment.Parameters"))}
                pairs, extra = [(node, run)], []
            for node, run in pairs:
                write_segmentation_node(node, output / f"{case}_{run['model']}.seg.nrrd")
                segmentation = node.GetSegmentation()
                names = {segmentation.GetNthSegment(i).GetLabelValue(): segmentation.GetNthSegment(i).GetName()
                         for i in range(segmentation.GetNumberOfSegments())}
                rows += structure_rows(case, labels_of(node), names, run, voxel_ml)
            rows += extra
            print(f"{case}: done", flush=True)
        except Exception as error:  # noqa: BLE001 (one bad case must not stop the batch)
            failures += 1
            rows.append({"case": case, "error": str(error)})
            print(f"{case}: FAILED: {error}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        finally:  # one case at a time in memory
            for index in reversed(range(scene.GetNumberOfNodes())):
                node = scene.GetNthNode(index)
                if node is not None and node.GetID() not in existing:
                    scene.RemoveNode(node)
    return rows, failures


def in_slicer() -> bool:
    try:
        import slicer
    except ImportError:
        return False
    return hasattr(slicer, "app")


def main(argv: list[str] | None = None, use_slicer: bool | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    source, output = Path(args.input), Path(args.output)
    if not source.is_dir():
        print(f"error: input folder '{source}' does not exist", file=sys.stderr)
        return 2
    cases = find_cases(source)
    if not cases:
        print(f"error: '{source}' holds no volumes", file=sys.stderr)
        return 2
    output.mkdir(parents=True, exist_ok=True)
    use_slicer = in_slicer() if use_slicer is None else use_slicer
    started = time.perf_counter()
    runner = run_with_slicer if use_slicer else run_with_engine
    rows, failures = runner(args, cases, output)
    write_csv(rows, output / "results.csv")
    print(f"{len(cases) - failures}/{len(cases)} cases in {time.perf_counter() - started:.1f} s "
          f"({'Slicer' if use_slicer else 'engine'}); results in {output}", flush=True)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    code = main()
    if in_slicer():
        import slicer

        slicer.util.exit(code)  # --python-script does not end Slicer by itself
    else:
        sys.exit(code)
