"""``medkd``: the engine's command line. Exit code 0 only on success."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import InvalidInputError, MedKDError

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


@contextmanager
def progress_bar(description: str, enabled: bool = True):
    """A tqdm bar fed by the engine's ``progress(fraction, stage)`` callbacks."""
    from tqdm import tqdm

    bar = tqdm(
        total=1000, desc=description, disable=not enabled, bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}"
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
    from .training import TrainingConfig

    return TrainingConfig(
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        patch_size=tuple(args.patch_size),
        learning_rate=args.learning_rate,
        seed=args.seed,
        kd_temperature=getattr(args, "temperature", 4.0),
        kd_weight=getattr(args, "kd_weight", 1.0),
        device=args.device,
    )


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

    with progress_bar("train teacher", not args.quiet) as update:
        bundle = train_teacher(
            args.data, args.output, args.modality, _training_config(args), resume=args.resume, progress=update
        )
    print(json.dumps(bundle.summary(), indent=2))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .training import distill_student

    with progress_bar("distil student", not args.quiet) as update:
        bundle = distill_student(
            args.data, args.teacher, args.output, _training_config(args), resume=args.resume, progress=update
        )
    print(json.dumps(bundle.summary(), indent=2))
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from .bundle import resolve_bundle
    from .inference import segment
    from .segfile import write_seg_nrrd
    from .volume import VOLUME_SUFFIXES, detect_modality, normalize_modality, read_volume, write_volume

    bundle = resolve_bundle(args.model)
    source = Path(args.input)
    is_series = (
        source.is_dir()
        and not (source / "images").is_dir()
        and any(p.suffix.lower() in ("", ".dcm") and p.is_file() for p in source.iterdir())
        and not any(p.name.endswith(VOLUME_SUFFIXES) for p in source.iterdir())
    )
    if source.is_dir() and not is_series:
        inputs = sorted(p for p in source.iterdir() if p.name.endswith(VOLUME_SUFFIXES) or p.is_dir())
        output_dir = Path(args.output)
        targets = [output_dir / f"{p.name.split('.')[0]}_{bundle.name}" for p in inputs]
    else:
        inputs, output = [source], Path(args.output)
        stem = output.name.removesuffix(".seg.nrrd").removesuffix(".nii.gz").removesuffix(".nrrd")
        targets = [output.with_name(stem)]
    if not inputs:
        raise InvalidInputError(
            f"'{source}' holds no volumes.", "Give a volume file, a DICOM folder or a folder of volumes."
        )
    for path, target in zip(inputs, targets):
        volume = read_volume(path, normalize_modality(args.modality) if args.modality != "auto" else None)
        volume.modality = detect_modality(volume)
        with progress_bar(f"{path.name}", not args.quiet) as update:
            result = segment(volume, bundle, args.device, update)
        written = []
        if args.format in ("nifti", "both"):
            written.append(write_volume(result.labels, f"{target}.nii.gz"))
        if args.format in ("seg.nrrd", "both"):
            written.append(write_seg_nrrd(result.labels, f"{target}.seg.nrrd", bundle.labels, bundle.colors))
        print(f"{path.name}: {result.seconds['total']:.2f} s on {result.device} -> {', '.join(map(str, written))}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .bundle import resolve_bundle
    from .labels import label_names
    from .metrics import compare_labels, mean_of
    from .report import markdown_table, text_table, write_json, write_text
    from .volume import read_volume

    names = resolve_bundle(args.model).labels if args.model else label_names()
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
    from .bundle import find_bundles, resolve_bundle
    from .report import text_table

    if args.model:
        bundle = resolve_bundle(args.model)
        bundle.load_network()  # verifies the checksum
        print(json.dumps({**bundle.summary(), "weights": "sha256 verified", "medkdsegment": bundle.info}, indent=2))
        return 0
    rows = [b.summary() for b in find_bundles(*(args.models_dir or []))]
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


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, args.device)
    return 0


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="folder with images/ and labels/ (see 'phantom')")
    parser.add_argument("--output", required=True, help="new bundle folder (never overwritten)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps-per-epoch", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--patch-size", type=int, nargs=3, default=[64, 64, 64], metavar=("Z", "Y", "X"))
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")


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
    _add_training_arguments(p)
    p.set_defaults(run=cmd_train_teacher)

    p = commands.add_parser("distill", help="distil a student from a teacher (Dice+CE where labelled, + T²·KL)")
    p.add_argument("--teacher", required=True, help="teacher bundle name or folder")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--kd-weight", type=float, default=1.0)
    _add_training_arguments(p)
    p.set_defaults(run=cmd_distill)

    p = commands.add_parser("segment", help="segment a volume, a DICOM folder or a folder of volumes")
    p.add_argument("--model", required=True, help="bundle name or folder ('medkd info' lists them)")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True, help="output file stem, or folder when --input is a folder")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--modality", default="auto", help="auto (DICOM tag or intensities), CT or MR")
    p.add_argument("--format", default="both", choices=["nifti", "seg.nrrd", "both"])
    p.set_defaults(run=cmd_segment)

    p = commands.add_parser("compare", help="per-structure Dice/HD95/volumes of two label volumes")
    p.add_argument("--first", required=True)
    p.add_argument("--second", required=True)
    p.add_argument("--reference", help="optional reference (ground truth) label volume")
    p.add_argument("--model", help="bundle whose label names to use (default: the phantom table)")
    p.add_argument("--no-hd95", action="store_true")
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.set_defaults(run=cmd_compare)

    p = commands.add_parser("info", help="list models, or show one bundle's information")
    p.add_argument("model", nargs="?")
    p.add_argument("--models-dir", action="append")
    p.set_defaults(run=cmd_info)

    p = commands.add_parser("demo", help="the main job on the embedded default (sample CT + MR)")
    p.add_argument("--output", default="demo-output")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MedKDError as error:
        print(f"error: {error.problem}", file=sys.stderr)
        if error.fix:
            print(f"fix: {error.fix}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; nothing partial was written (use --resume to continue training)", file=sys.stderr)
        return EXIT_INTERRUPTED
