"""The main job on the embedded default: sample CT and MR, teacher vs student, a comparison report; with
``head``, also the bundled real brain-extraction student on that MR head."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .bundle import BUNDLED_MODELS, resolve_bundle
from .device import describe_device, select_device
from .inference import segment
from .measure import Measure, machine_description
from .metrics import compare_labels, mean_of
from .phantom import generate_phantom
from .report import markdown_table, overlay_figure, text_table, write_json, write_text
from .segfile import write_seg_nrrd
from .volume import read_volume, write_volume

# Held out from every training seed the bundled models saw (see scripts/build_models.py).
DEMO_SEED = 990_001
DEMO_SIZE = (150, 120, 64)  # (x, y, z), not the model's grid, to show resampling back
DEMO_SPACING = (2.5, 2.5, 3.75)
BRAIN_STUDENT = "hdbet-brain-mr-student"  # the bundled real student (distilled from HD-BET)
COLUMNS = {
    "structure": "structure",
    "dice_first_vs_reference": "teacher Dice",
    "dice_second_vs_reference": "student Dice",
    "dice_first_vs_second": "teacher↔student Dice",
    "hd95_mm_first_vs_second": "teacher↔student HD95 mm",
    "volume_ml_reference": "true ml",
}


def model_name(modality: str, role: str) -> str:
    return f"phantom-abdomen-{modality.lower()}-{role}"


def run_demo(
    output: str | Path,
    device: str = "auto",
    models: str | Path = BUNDLED_MODELS,
    log: Callable[[str], None] = print,
    progress: Callable[[float, str], None] | None = None,
    head: str | Path | None = None,
) -> dict:
    """Segment the sample CT and MR with each modality's bundled teacher and student and compare them
    (``report.md``, ``report.json``, ``comparison.png``, the segmentations); ``head``: an MR head with the
    skull on, also segmented by the bundled real brain-extraction student."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    torch_device = select_device(device)
    summary = {"machine": machine_description(), "device": describe_device(torch_device), "modalities": {}}
    markdown = ["# MedKDSegment demo: teacher vs distilled student", ""]
    panels = []
    colors = {}
    for modality in ("CT", "MR"):
        image, truth = generate_phantom(modality, DEMO_SEED, size=DEMO_SIZE, spacing=DEMO_SPACING)
        write_volume(image, output / f"sample_{modality.lower()}.nii.gz")
        write_volume(truth, output / f"sample_{modality.lower()}_truth.nii.gz")
        results, models_info = {}, {}
        for role in ("teacher", "student"):
            bundle = resolve_bundle(model_name(modality, role), models)
            colors |= bundle.colors
            with Measure() as usage:
                result = segment(image, bundle, device, progress)
            stem = output / f"sample_{modality.lower()}_{role}"
            write_volume(result.labels, f"{stem}.nii.gz")
            write_seg_nrrd(result.labels, f"{stem}.seg.nrrd", bundle.labels, bundle.colors)
            results[role] = result
            models_info[role] = {
                "model": bundle.name,
                "parameters": bundle.parameters,
                "gmacs_96": bundle.info.get("gmacs_96"),
                "seconds": round(usage.seconds, 3),
                "inference_seconds": round(result.seconds["inference"], 3),
                "peak_memory_mb": round(usage.peak_mb, 1),
                "device": result.device,
            }
        names = resolve_bundle(model_name(modality, "student"), models).labels
        rows = compare_labels(results["teacher"].labels, results["student"].labels, names, reference=truth)
        teacher_mean = mean_of(rows, "dice_first_vs_reference")
        student_mean = mean_of(rows, "dice_second_vs_reference")
        models_info["parameter_ratio"] = round(
            models_info["teacher"]["parameters"] / models_info["student"]["parameters"], 1
        )
        models_info["speedup"] = round(models_info["teacher"]["seconds"] / models_info["student"]["seconds"], 2)
        summary["modalities"][modality] = {
            "structures": rows,
            "mean_dice_teacher": teacher_mean,
            "mean_dice_student": student_mean,
            "student_share_of_teacher_dice": student_mean / teacher_mean,
            "models": models_info,
        }
        table = rows + [
            {
                "structure": "mean",
                "dice_first_vs_reference": teacher_mean,
                "dice_second_vs_reference": student_mean,
                "dice_first_vs_second": mean_of(rows, "dice_first_vs_second"),
                "hd95_mm_first_vs_second": mean_of(rows, "hd95_mm_first_vs_second"),
            }
        ]
        model_rows = [{"role": role, **models_info[role]} for role in ("teacher", "student")]
        model_columns = {
            "role": "model",
            "parameters": "parameters",
            "seconds": "seconds (end to end)",
            "inference_seconds": "network s",
            "peak_memory_mb": "peak MB",
            "device": "device",
        }
        log(f"\n{modality} phantom ({DEMO_SIZE} voxels at {DEMO_SPACING} mm, seed {DEMO_SEED})")
        log(text_table(table, COLUMNS))
        log(text_table(model_rows, model_columns))
        log(
            f"parameter ratio {models_info['parameter_ratio']}x, student {models_info['speedup']}x faster end to end, "
            f"student mean Dice = {100 * student_mean / teacher_mean:.1f} % of the teacher's"
        )
        markdown += [
            f"## {modality}",
            "",
            markdown_table(table, COLUMNS),
            "",
            markdown_table(model_rows, model_columns),
            "",
        ]
        panels.append(
            (
                modality,
                image,
                {"truth": truth, "teacher": results["teacher"].labels, "student": results["student"].labels},
            )
        )
    if head is not None:
        bundle = resolve_bundle(BRAIN_STUDENT, models)
        volume = read_volume(head)
        with Measure() as usage:
            result = segment(volume, bundle, device, progress)
        write_volume(result.labels, output / "head_brain.nii.gz")
        write_seg_nrrd(result.labels, output / "head_brain.seg.nrrd", bundle.labels, bundle.colors)
        millilitres = float((result.labels.array > 0).sum() * volume.spacing[0] * volume.spacing[1]
                            * volume.spacing[2] / 1000)
        summary["head"] = {"input": str(head), "model": bundle.name, "brain_ml": round(millilitres, 1),
                           "seconds": round(usage.seconds, 3), "warnings": result.warnings,
                           "teacher": bundle.info.get("teacher", {}).get("name")}
        line = (f"real head {Path(head).name}: {bundle.name} (distilled from {summary['head']['teacher']}) finds "
                f"{millilitres:.0f} ml of brain in {usage.seconds:.2f} s")
        log(f"\n{line}" + "".join(f"\nwarning: {w}" for w in result.warnings))
        markdown += ["## Real head", "", line + ".", *[f"Warning: {w}" for w in result.warnings], ""]
        panels.append(("head", volume, {bundle.name: result.labels}))
    window = {"CT": (-200.0, 300.0)}
    overlay_figure(panels, colors, output / "comparison.png", window)
    markdown += ["![teacher and student overlays](comparison.png)", "", f"Machine: {summary['machine']}", ""]
    write_text("\n".join(markdown), output / "report.md")
    write_json(summary, output / "report.json")
    log(f"\nOutputs in {output}: segmentations (.nii.gz, .seg.nrrd), report.md, report.json, comparison.png")
    return summary
