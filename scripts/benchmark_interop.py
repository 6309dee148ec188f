"""Interoperability check (issue 20): MONAI's runner against ``medkd segment``, exports against torch, DICOM SEG.

    scripts/medkd-python scripts/benchmark_interop.py [--output docs/interop] [--skip-large]

1. ``python -m monai.bundle run`` with each bundled model's ``configs/inference.json`` against ``medkd segment``
   on the real cases in ../shared/data and on a 512x512x300 CT phantom: voxels whose labels differ, and the
   seconds of each (both as cold command-line processes).
2. ``medkd export --format onnx|torchscript`` of every bundled model: the largest logit difference from torch.
3. ``--format dicom-seg`` on the real 20-slice DICOM CT (given study and series UIDs, which its anonymisation
   removed): seconds, size, and the labels read back with highdicom against the NIfTI output.
Writes <output>.md and <output>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedKDSegment"))

from MedKDSegmentLib.engine.bundle import find_bundles, resolve_bundle  # noqa: E402
from MedKDSegmentLib.engine.export import export_bundle  # noqa: E402
from MedKDSegmentLib.engine.monai_config import CONFIG  # noqa: E402
from MedKDSegmentLib.engine.phantom import generate_phantom  # noqa: E402
from MedKDSegmentLib.engine.volume import dicom_series, read_volume, write_volume  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
CASES = [  # (name, input relative to ../shared/data or "phantom-512", model)
    ("real CT 3 mm", "ct-mr-abdomen-totalseg/ct.nii.gz", "phantom-abdomen-ct-student"),
    ("real CT 512² DICOM", "ct-mr-abdomen-totalseg/ct_dicom", "phantom-abdomen-ct-student"),
    ("real CT 512² DICOM", "ct-mr-abdomen-totalseg/ct_dicom", "phantom-abdomen-ct-teacher"),
    ("real MR abdomen", "ct-mr-abdomen-totalseg/mr.nii.gz", "phantom-abdomen-mr-student"),
    ("real MR head, oblique", "mr-brain-itk/t1_head.nii.gz", "hdbet-brain-mr-student"),
    ("CT phantom 512x512x300", "phantom-512", "phantom-abdomen-ct-student"),
]
MEDKD = [sys.executable, "-m", "MedKDSegmentLib", "--quiet"]
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(ROOT / "MedKDSegment")}


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=ENVIRONMENT)
    return time.perf_counter() - started


def monai_against_medkd(work: Path, skip_large: bool) -> list[dict]:
    rows = []
    for name, relative, model in CASES:
        if relative == "phantom-512":
            if skip_large:
                continue
            volume = generate_phantom("CT", seed=100001, size=(512, 512, 300), spacing=(0.7, 0.7, 1.0))[0]
        else:
            volume = read_volume(DATA / relative)
        case = work / f"{len(rows)}"
        (case / "input").mkdir(parents=True)
        write_volume(volume, case / "input" / "scan.nii.gz")
        bundle = resolve_bundle(model)
        monai_seconds = timed([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                               str(bundle.path / CONFIG), "--bundle_root", str(bundle.path),
                               "--dataset_dir", str(case / "input"), "--output_dir", str(case / "monai")])
        medkd_seconds = timed([*MEDKD, "segment", "--model", model, "--input", str(case / "input" / "scan.nii.gz"),
                               "--output", str(case / "medkd"), "--format", "nifti", "--device", "cpu"])
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "medkd.nii.gz")))
        theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "monai" / "scan_seg.nii.gz")))
        rows.append({"case": name, "model": model, "shape": list(ours.shape), "voxels": int(ours.size),
                     "differing": int((ours != theirs).sum()), "labelled": int((ours > 0).sum()),
                     "monai_seconds": round(monai_seconds, 2), "medkd_seconds": round(medkd_seconds, 2)})
        print(rows[-1], flush=True)
    return rows


def exports(work: Path) -> list[dict]:
    work.mkdir(parents=True)
    rows = []
    for bundle in find_bundles():
        row = {"model": bundle.name}
        for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".ts")):
            result = export_bundle(bundle, work / f"{bundle.name}{suffix}", fmt)
            row[fmt] = result.max_logit_difference
            row["shapes"] = [list(s) for s in result.checked_shapes]
        rows.append(row)
        print(row, flush=True)
    return rows


def dicom_seg(work: Path) -> dict:
    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    series = work / "series"
    series.mkdir()
    study, uid = generate_uid(), generate_uid()
    for file in sorted((DATA / "ct-mr-abdomen-totalseg" / "ct_dicom").iterdir()):
        image = pydicom.dcmread(file)
        image.SOPClassUID = image.file_meta.MediaStorageSOPClassUID
        image.SOPInstanceUID = image.file_meta.MediaStorageSOPInstanceUID
        image.StudyInstanceUID, image.SeriesInstanceUID = study, uid
        image.save_as(series / file.name)
    model = "phantom-abdomen-ct-student"
    common = ["--model", model, "--input", str(series), "--output", str(work / "labels"), "--device", "cpu"]
    nifti_seconds = timed([*MEDKD, "segment", *common, "--format", "nifti"])
    seg_seconds = timed([*MEDKD, "segment", *common, "--format", "dicom-seg"])
    seg = hd.seg.segread(work / "labels.dcm")
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "labels.nii.gz")))
    files = next(iter(dicom_series(series).values()))  # the order the volume was read in
    ordered = [pydicom.dcmread(file, stop_before_pixels=True).SOPInstanceUID for file in files]
    labels = seg.get_pixels_by_source_instance(ordered, combine_segments=True, skip_overlap_checks=True)
    return {"model": model, "slices": len(ordered), "frames": len(seg.PerFrameFunctionalGroupsSequence),
            "segments": seg.number_of_segments, "bytes": (work / "labels.dcm").stat().st_size,
            "nifti_seconds": round(nifti_seconds, 2), "dicom_seg_seconds": round(seg_seconds, 2),
            "labels_equal": bool(np.array_equal(labels, expected))}


def write_report(results: dict, output: Path) -> None:
    lines = [
        "# Interoperability: MONAI's runner, exports, DICOM SEG (issue 20)",
        "",
        f"Machine: {results['machine']}. Reproduce: `scripts/medkd-python scripts/benchmark_interop.py`.",
        "Seconds are single cold command-line processes (start-up included), not medians: indicative only.",
        "",
        "## `python -m monai.bundle run` with the bundle's `configs/inference.json` against `medkd segment`",
        "",
        "| case | model | voxels | labelled by medkd | differing | MONAI s | medkd s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["monai"]:
        lines.append(f"| {row['case']} | {row['model']} | {row['voxels']:,} | {row['labelled']:,} | "
                     f"{row['differing']:,} | {row['monai_seconds']} | {row['medkd_seconds']} |")
    lines += ["", "Where the labels differ, two classes' scores are within float rounding of each other and the two "
              "interpolations round them differently (MONAI: float32 `grid_sample`; MedKDSegment: double, as ITK). "
              "MONAI's runner interpolates every class at every voxel; `medkd` only where the arg-max can change.",
              "",
              "## Exports: largest absolute logit difference from torch (prepared phantom, two shapes)", "",
              "| model | ONNX Runtime | TorchScript |", "|---|---|---|"]
    for row in results["exports"]:
        lines.append(f"| {row['model']} | {row['onnx']:.2g} | {row['torchscript']:.2g} |")
    seg = results["dicom_seg"]
    lines += ["", "## DICOM SEG of the real 20-slice CT series", "",
              f"{seg['model']}: {seg['segments']} segments, {seg['frames']} frames over {seg['slices']} slices, "
              f"{seg['bytes']:,} bytes; `segment --format dicom-seg` {seg['dicom_seg_seconds']} s against "
              f"{seg['nifti_seconds']} s for NIfTI; labels read back with highdicom equal the NIfTI output: "
              f"{seg['labels_equal']}. The shared series was anonymised without its study and series UIDs, "
              "which a DICOM SEG must reference (`medkd` refuses it, exit 2); the check gives it new ones, as a "
              "PACS export would carry.", ""]
    output.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    output.with_suffix(".json").write_text(json.dumps(results, indent=2), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "docs" / "interop"))
    parser.add_argument("--skip-large", action="store_true", help="leave out the 512x512x300 phantom")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"real cases not found at {DATA}", file=sys.stderr)
        return 2
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only, "
               f"Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        results = {"machine": machine, "monai": monai_against_medkd(work / "monai", args.skip_large),
                   "exports": exports(work / "exports"), "dicom_seg": dicom_seg(work)}
    write_report(results, Path(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
