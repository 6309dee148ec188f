"""Training runs on disk, without torch: where a run keeps its checkpoint and the record of what it was started
with, so that an interrupted run is found and resumed the same way from the command line and from Slicer.

    <output>.checkpoint/checkpoint.pt     the last finished epoch (written by the training loop)
    <output>.checkpoint/training.json     a training job's spec (teacher, distillation, CT+MR student)
    <output>.checkpoint/finetune.json     a fine-tuning run's record (parent, cases, settings)
    <output>.checkpoint/teacher-cache/    the teachers' outputs on each training volume, kept as they are made

The folder goes when the model is written; a run stopped before its first epoch leaves nothing
(``recorded_run``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

CHECKPOINT_SUFFIX = ".checkpoint"
CHECKPOINT_FILE = "checkpoint.pt"
TRAINING_RUN_FILE = "training.json"
FINETUNE_RUN_FILE = "finetune.json"
TEACHER_CACHE = "teacher-cache"


# Training reports every step as "epoch 3/15 loss 0.4321" (the epoch's running mean loss): the last message
# of an epoch carries its mean loss, which live loss curves read back.
EPOCH_LOSS = re.compile(r"\bepoch (\d+)/(\d+) loss ([-+0-9.eE]+|nan|inf)\b")


def epoch_message(epoch: int, epochs: int, loss: float) -> str:
    """The progress message of a training step in epoch ``epoch`` (1-based) of ``epochs``."""
    return f"epoch {epoch}/{epochs} loss {loss:.4f}"


def parse_epoch_loss(message: str | None) -> tuple[int, int, float] | None:
    """(epoch, epochs, running mean loss) from a training progress message, else None."""
    found = EPOCH_LOSS.search(message or "")
    return (int(found[1]), int(found[2]), float(found[3])) if found else None


def checkpoint_dir_for(output: str | os.PathLike) -> Path:
    """The folder of a run that writes the model ``output``."""
    output = Path(output)
    return output.parent / f"{output.name}{CHECKPOINT_SUFFIX}"


def output_of(checkpoint_dir: Path) -> Path:
    """The model a run's checkpoint folder is for."""
    return checkpoint_dir.with_name(checkpoint_dir.name.removesuffix(CHECKPOINT_SUFFIX))


def has_checkpoint(output: str | os.PathLike) -> bool:
    """Whether the run writing ``output`` finished an epoch (something to resume)."""
    return (checkpoint_dir_for(output) / CHECKPOINT_FILE).is_file()


def assistant_output(output: str | os.PathLike) -> Path:
    """Where a teacher-assistant chain writing ``output`` writes its assistant."""
    output = Path(output)
    return output.with_name(f"{output.name}-assistant")


def started(output: str | os.PathLike, chain: bool = False) -> bool:
    """Whether an unfinished run writing ``output`` has something to resume: a finished epoch or, for a
    teacher-assistant chain, the assistant's finished epoch or the finished assistant."""
    helper = assistant_output(output)
    return has_checkpoint(output) or (chain and (has_checkpoint(helper) or helper.exists()))


def discard(output: str | os.PathLike, chain: bool = False) -> bool:
    """Delete an unfinished run's folder (and, for a chain, its assistant's); finished models are never
    touched. True if something was deleted."""
    folders = [checkpoint_dir_for(output)] + ([checkpoint_dir_for(assistant_output(output))] if chain else [])
    found = [folder for folder in folders if folder.is_dir()]
    for folder in found:
        shutil.rmtree(folder, ignore_errors=True)
    return bool(found)


def write_record(output: str | os.PathLike, run_file: str, record: dict) -> None:
    """Write a run's record atomically (Resume must never see half of one)."""
    folder = checkpoint_dir_for(output)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{run_file}.partial"
    partial.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(partial, folder / run_file)


def read_record(output: str | os.PathLike, run_file: str) -> dict | None:
    """A run's record, or None when there is none (or it cannot be read)."""
    try:
        return json.loads((checkpoint_dir_for(output) / run_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def interrupted_runs(folders: Iterable[str | os.PathLike], run_file: str) -> list[tuple[Path, dict]]:
    """(output, record) of every run in ``folders`` that has a record and wrote no model yet, newest first."""
    found = []
    for folder in folders:
        for record_file in Path(folder).glob(f"*{CHECKPOINT_SUFFIX}/{run_file}"):
            output = output_of(record_file.parent)
            record = None if output.exists() else read_record(output, run_file)
            if record is not None:
                found.append((record_file.stat().st_mtime, output, record))
    return [(output, record) for _, output, record in sorted(found, key=lambda item: item[0], reverse=True)]


@contextmanager
def recorded_run(output: str | os.PathLike, run_file: str, record: dict, resume: bool,
                 chain: bool = False) -> Iterator[None]:
    """Record a new run (not on ``resume``: the record is already there) before it starts; if it stops with
    nothing to resume (``started``), remove its folder."""
    if not resume and not started(output, chain):  # a started run's record stays (the engine refuses it)
        write_record(output, run_file, record)
    try:
        yield
    except BaseException:
        if not started(output, chain):
            discard(output)
        raise
