"""Bring your own teacher, measured: import time, labels agreement with the source framework's own inference,
and a student distilled from each imported teacher with its speed ratio to the teacher in the same run.

    scripts/medkd-python scripts/imported_teachers.py [--nnunet-python /tmp/nnenv/bin/python]
        [--full-size-nnunet /tmp/nnfull/Dataset901_Phantom] [--output docs/imported_teachers]

Formats and their references:
- nnU-Net v2: the committed test model (``Testing/data/nnunet``), and optionally a full-size one made by
  ``scripts/nnunet_fixture.py --full-size``; the reference is ``nnUNetPredictor`` run by ``--nnunet-python`` (an
  environment with nnunetv2, see that script), on the same files.
- MONAI bundle: a Model Zoo style bundle written with ``monai.bundle.init_bundle`` (the test's); the reference
  is ``python -m monai.bundle run``.
- TorchScript: ``torch.jit.script`` of the bundled phantom CT teacher; the reference is that teacher itself.

Test volumes: CT phantoms on three grids (one anisotropic, one stored RAS) never used for training. Students:
MedKDSegment's default student, distilled with ``kd`` on six unlabelled phantoms, hyper-parameters fixed
before any measurement (below). Speed: teacher and student segment each test volume in this process, best of
``--repeats``, on ``torch.get_num_threads()`` threads. Everything is phantom data: the figures say that the
imports are exact and that distillation runs on them, not how good a student of a real model is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
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
sys.path.insert(0, str(ROOT / "Testing"))

from MedKDSegmentLib.engine.bundle import load_bundle  # noqa: E402
from MedKDSegmentLib.engine.imported import import_teacher  # noqa: E402
from MedKDSegmentLib.engine.inference import segment  # noqa: E402
from MedKDSegmentLib.engine.measure import machine_description  # noqa: E402
from MedKDSegmentLib.engine.metrics import dice_per_label  # noqa: E402
from MedKDSegmentLib.engine.phantom import generate_phantom  # noqa: E402
from MedKDSegmentLib.engine.report import markdown_table, write_json, write_text  # noqa: E402
from MedKDSegmentLib.engine.training import TrainingConfig, distill_student  # noqa: E402
from MedKDSegmentLib.engine.volume import read_volume, write_volume  # noqa: E402

NNUNET = ROOT / "Testing" / "data" / "nnunet" / "Dataset901_Phantom"
TEST_GRIDS = (((60, 50, 18), (2.0, 2.0, 7.0)), ((96, 80, 48), (3.0, 3.0, 4.0)), ((120, 100, 40), (2.5, 2.5, 5.0)))
TEST_SEEDS = (60, 61, 62)
TRAINING_SEEDS = range(200, 206)
# Fixed before any measurement: the same for every imported teacher.
STUDENT_CONFIG = dict(epochs=12, steps_per_epoch=10, batch_size=2, patch_size=(32, 32, 32), methods="kd",
                      learning_rate=2e-3, device="cpu", seed=0)

NNUNET_REFERENCE = """
import sys, torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
model, out, files = sys.argv[1], sys.argv[2], sys.argv[3:]
predictor = nnUNetPredictor(device=torch.device('cpu'), allow_tqdm=False)
predictor.initialize_from_trained_model_folder(model, use_folds=None)
predictor.predict_from_files([[f] for f in files], [out + '/' + f.split('/')[-1][:-7] for f in files],
                             num_processes_preprocessing=1, num_processes_segmentation_export=1)
"""


def test_volumes(folder: Path) -> list[Path]:
    paths = []
    for index, (seed, (size, spacing)) in enumerate(zip(TEST_SEEDS, TEST_GRIDS, strict=True)):
        image, _ = generate_phantom("CT", seed, size=size, spacing=spacing)
        if index == 2:  # stored RAS, as many NIfTI files are
            sitk_image = image.to_sitk()
            flipped = sitk.Flip(sitk_image, [True, True, False])
            image = type(image).from_sitk(flipped, "CT")
        path = folder / f"test{index}.nii.gz"
        write_volume(image, path)
        paths.append(path)
    return paths


def agreement(ours: np.ndarray, reference: np.ndarray) -> dict:
    labels = sorted(int(v) for v in np.unique(reference) if v != 0)
    per_label = dice_per_label(ours, reference, labels)
    dice = list(per_label.values())
    return {"differing_voxels": int((ours != reference).sum()), "voxels": int(reference.size),
            "dice": {v: round(d, 4) for v, d in per_label.items()},
            "dice_mean": round(float(np.mean(dice)), 4) if dice else None,
            "dice_min": round(float(min(dice)), 5) if dice else None, "labels_present": [int(v) for v in labels]}


def timed_import(path: Path, models: Path, name: str, **options):
    started = time.perf_counter()
    bundle = import_teacher(path, models, name, **options)
    return bundle, round(time.perf_counter() - started, 2)


def labels_of(bundle, path: Path) -> np.ndarray:
    return segment(read_volume(path, "CT"), bundle, "cpu").labels.array


def distil_and_time(teacher, data: Path, output: Path, volumes: list[Path], repeats: int) -> dict:
    started = time.perf_counter()
    student = distill_student(data, teacher, output, TrainingConfig(**STUDENT_CONFIG))
    train_seconds = time.perf_counter() - started
    networks = {"teacher": teacher.load_network(), "student": student.load_network()}
    mirrored = teacher.pipeline is not None and teacher.pipeline["name"] == "nnunet-v2"
    rows = []
    for path in volumes:
        volume = read_volume(path, "CT")
        times = {}
        labels = {}
        for role, bundle in (("teacher", teacher), ("student", student)):
            best = float("inf")
            for _ in range(repeats):
                step = time.perf_counter()
                result = segment(volume, bundle, "cpu", network=networks[role])
                best = min(best, time.perf_counter() - step)
            times[role], labels[role] = best, result.labels.array
        row = {"volume": path.name, "shape_xyz": list(volume.shape[::-1]), "teacher_s": round(times["teacher"], 3),
               "student_s": round(times["student"], 3), "speedup": round(times["teacher"] / times["student"], 2),
               "student_vs_teacher": agreement(labels["student"], labels["teacher"])}
        if mirrored:  # nnU-Net's network alone, without its 8-fold test-time mirroring
            step = time.perf_counter()
            segment(volume, teacher, "cpu", network=networks["teacher"], pipeline_options={"mirror": False})
            row["teacher_no_mirroring_s"] = round(time.perf_counter() - step, 3)
        rows.append(row)
    return {"student_parameters": student.parameters, "teacher_parameters": teacher.parameters,
            "train_seconds": round(train_seconds, 1), "volumes": rows,
            "speedup_geomean": round(float(np.exp(np.mean([np.log(r["speedup"]) for r in rows]))), 2)}


def nnunet_reference(python: str, model: Path, volumes: list[Path], out: Path) -> list[np.ndarray]:
    out.mkdir()
    folder = next(iter(p for p in model.glob("*__*__*")))
    subprocess.run([python, "-c", NNUNET_REFERENCE, str(folder), str(out), *map(str, volumes)], check=True,
                   capture_output=True, timeout=3600)
    return [sitk.GetArrayFromImage(sitk.ReadImage(str(out / p.name))) for p in volumes]


def monai_reference(bundle: Path, volume: Path, work: Path) -> np.ndarray:
    single = work / f"single-{volume.stem}"
    single.mkdir()
    shutil.copy(volume, single / volume.name)
    out = work / f"monai-out-{volume.stem}"
    config = bundle / "configs"
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config / "inference.json"),
                    "--meta_file", str(config / "metadata.json"), "--bundle_root", str(bundle),
                    "--dataset_dir", str(single), "--output_dir", str(out)], check=True, capture_output=True,
                   timeout=1800)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(next(out.rglob("*.nii.gz")))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nnunet-python", help="a Python with nnunetv2 (the reference for nnU-Net imports)")
    parser.add_argument("--full-size-nnunet", type=Path, help="output of scripts/nnunet_fixture.py --full-size")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "imported_teachers")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imported-teachers-"))
    models = work / "models"
    volumes = test_volumes(work / "test")
    data = work / "unlabelled"
    for seed in TRAINING_SEEDS:
        image, _ = generate_phantom("CT", seed, size=(96, 80, 48), spacing=(3.0, 3.0, 4.0))
        write_volume(image, data / "images" / f"case{seed}.nii.gz")
    results = {"machine": machine_description(),
               "student_config": STUDENT_CONFIG, "test_volumes": [p.name for p in volumes], "formats": {}}

    nnunet_models = [("nnunet-v2 (test model)", NNUNET)]
    if args.full_size_nnunet:
        nnunet_models.append(("nnunet-v2 (full-size)", args.full_size_nnunet))
    for title, model in nnunet_models:
        name = "nnunet-full" if "full" in title else "nnunet-test"
        teacher, seconds = timed_import(model, models, name)
        entry = {"import_seconds": seconds, "parameters": teacher.parameters, "folds": teacher.info["source"]["folds"]}
        if args.nnunet_python:
            references = nnunet_reference(args.nnunet_python, model, volumes, work / f"reference-{name}")
            entry["agreement"] = [agreement(labels_of(teacher, p), r) for p, r in zip(volumes, references, strict=True)]
            entry["reference"] = "nnunetv2 2.8.1 nnUNetPredictor (all folds, mirroring, step 0.5)"
        repeats = 1 if "full" in title else args.repeats  # a full-size nnU-Net run takes minutes on a CPU
        entry["distillation"] = distil_and_time(teacher, data, models / f"{name}-student", volumes, repeats)
        entry["distillation"]["repeats"] = repeats
        results["formats"][title] = entry
        print(title, json.dumps(entry)[:400], flush=True)

    from zoo_bundle import write_zoo_bundle

    zoo = work / "zoo" / "phantom_ct_organs"
    zoo.parent.mkdir()
    write_zoo_bundle(zoo)
    teacher, seconds = timed_import(zoo, models, "monai-bundle")
    entry = {"import_seconds": seconds, "parameters": teacher.parameters,
             "reference": "python -m monai.bundle run (MONAI 1.6.1)",
             "agreement": [agreement(labels_of(teacher, p), monai_reference(zoo, p, work)) for p in volumes]}
    entry["distillation"] = distil_and_time(teacher, data, models / "monai-student", volumes, args.repeats)
    results["formats"]["monai-bundle"] = entry
    print("monai", json.dumps(entry)[:400], flush=True)

    original = load_bundle(ROOT / "Resources" / "Models" / "phantom-abdomen-ct-teacher")
    scripted = work / "teacher.pt"
    torch.jit.save(torch.jit.script(original.load_network()), str(scripted))
    config = work / "teacher.json"
    config.write_text(json.dumps({"labels": {str(k): v for k, v in original.labels.items()}, "modality": "CT",
                                  "spacing": list(original.profile.spacing), "clip": list(original.profile.clip)}))
    digest = hashlib.sha256(scripted.read_bytes()).hexdigest()
    teacher, seconds = timed_import(scripted, models, "torchscript", config=config, sha256=digest)
    entry = {"import_seconds": seconds, "parameters": teacher.parameters,
             "reference": "the bundled phantom-abdomen-ct-teacher it was exported from",
             "agreement": [agreement(labels_of(teacher, p), labels_of(original, p)) for p in volumes]}
    entry["distillation"] = distil_and_time(teacher, data, models / "torchscript-student", volumes, args.repeats)
    results["formats"]["torchscript"] = entry
    print("torchscript", json.dumps(entry)[:400], flush=True)

    write_json(results, args.output.with_suffix(".json"))
    write_text(report(results), args.output.with_suffix(".md"))
    shutil.rmtree(work)


def report(results: dict) -> str:
    machine = results["machine"]
    rows = []
    for title, entry in results["formats"].items():
        agree, distil = entry.get("agreement"), entry["distillation"]
        rows.append({
            "format": title, "parameters": f"{entry['parameters']:,}", "import": entry["import_seconds"],
            "reference": entry.get("reference", "—"),
            "differing": " / ".join(str(a["differing_voxels"]) for a in agree) if agree else "not run",
            "dice": min((a["dice_min"] for a in agree), default="—") if agree else "—",
            "student": f"{distil['student_parameters']:,}", "speedup": f"{distil['speedup_geomean']}×",
            "student_dice": " / ".join(f"{v['student_vs_teacher']['dice_mean']} ({v['student_vs_teacher']['dice_min']})"
                                       for v in distil["volumes"]),
        })
    lines = [
        "# Imported teachers: exactness, import time, and students distilled from them",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} ({machine['torch_threads']} "
        f"threads), {machine['platform']}. CPU only. "
        "Reproduce: `scripts/medkd-python scripts/imported_teachers.py --nnunet-python /tmp/nnenv/bin/python "
        "--full-size-nnunet /tmp/nnfull/Dataset901_Phantom` (see the script's docstring for the environments).",
        "",
        "All volumes are CT phantoms (3 test volumes on 3 grids: 2×2×7 mm, 3×3×4 mm, 2.5×2.5×5 mm stored RAS); "
        "students learn from 6 unlabelled phantoms with `kd`, settings fixed beforehand "
        f"(`{json.dumps(results['student_config'])}`). Speed is the best of 3 whole-volume runs in the same process "
        "(1 for the full-size nnU-Net model, whose runs take minutes).",
        "",
        markdown_table(rows, {
            "format": "format", "parameters": "teacher parameters", "import": "import s", "reference": "reference",
            "differing": "differing voxels (3 volumes)", "dice": "min Dice to reference",
            "student": "student parameters", "speedup": "speed-up (geomean)",
            "student_dice": "student vs teacher Dice per volume: mean over labels (min)",
        }),
        "",
        "Per volume (seconds for teacher and student):",
        "",
    ]
    for title, entry in results["formats"].items():
        volumes = ", ".join(f"{v['volume']} {v['shape_xyz']}: {v['teacher_s']} s vs {v['student_s']} s"
                            + (f" (teacher without mirroring {v['teacher_no_mirroring_s']} s)"
                               if "teacher_no_mirroring_s" in v else "")
                            for v in entry["distillation"]["volumes"])
        lines.append(f"- {title}: {volumes}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
