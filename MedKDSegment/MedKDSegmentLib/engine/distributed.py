"""Several processes under ``torchrun``: the process group, who does what, and what they exchange.

``torchrun --nproc_per_node=N -m MedKDSegmentLib <command> …`` starts N copies of a command; each joins the
process group here (NCCL when the processes run on CUDA, gloo otherwise) and trains data-parallel with
``DistributedDataParallel``. Without torchrun (or with one process) every function here is the identity or a
no-op, so single-process code paths are the same code.

Who does what: every process reads the data and trains on its own random patches (its own random stream,
below); teacher outputs and folder segmentation are sharded (``shard``); only the main process (rank 0)
reports progress, writes checkpoints, run records and the model, and the others wait for it (``barrier``).
How a training step runs across processes (``DistributedDataParallel``) is the trainer's: ``training.data_parallel``.

``torch.distributed`` is imported only under torchrun: in one process nothing here needs torch, so a command that
runs without it (segmenting with an ONNX student) still does.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from .device import select_device

T = TypeVar("T")
# Rank 0 evaluates, records the domain and writes the model while the others wait: allow it time.
TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Processes:
    """This process's place: ``rank`` of ``world_size`` in all, ``local_rank`` on its node (its GPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


def current() -> Processes:
    """This process's place in the group (one process of one without a group)."""
    if not launched():
        return Processes()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Processes()
    return Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device) -> str:
    """NCCL for processes on CUDA GPUs, gloo for CPU processes (NCCL has no CPU tensors)."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def process_group(device_choice: str = "auto") -> Iterator[Processes]:
    """Join torchrun's process group for the duration (nothing to join without torchrun). On CUDA each process
    takes the GPU of its ``LOCAL_RANK`` first, so ``select_device`` ("cuda") means that GPU from then on."""
    if not launched() or current().parallel:
        yield current()
        return
    import torch
    import torch.distributed as dist

    device = select_device(device_choice)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend_for(device), timeout=TIMEOUT)
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here."""
    if current().parallel:
        import torch.distributed as dist

        dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of ``items``: every world_size-th, from its rank (all of them in one process)."""
    processes = current()
    return list(items[processes.rank::processes.world_size])


def gather(value: T) -> list[T]:
    """Every process's ``value``, in rank order (pickled objects: for results and small arrays)."""
    processes = current()
    if not processes.parallel:
        return [value]
    import torch.distributed as dist

    values: list = [None] * processes.world_size
    dist.all_gather_object(values, value)
    return values


def from_main(value: T) -> T:
    """The main process's ``value`` in every process (a decision all must share, e.g. to stop)."""
    if not current().parallel:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(value: float) -> float:
    """The mean of ``value`` over the processes."""
    processes = current()
    if not processes.parallel:
        return value
    return float(np.mean(gather(float(value))))


def written_by_main(write: Callable[[], T], read: Callable[[], T]) -> T:
    """``write()`` in the main process alone (a model, a table); every other process waits for it, then returns
    ``read()`` of what it wrote. (If the main process fails, torchrun stops the others.)"""
    if current().main:
        value = write()
        barrier()
        return value
    barrier()
    return read()


def process_seed(seed: int) -> int:
    """The seed of this process's random stream: ``seed`` itself in the main process (a single-process run
    reproduces exactly as before), one derived from (seed, rank) in the others, so each draws other patches."""
    rank = current().rank
    return seed if rank == 0 else int(np.random.SeedSequence((seed, rank)).generate_state(1)[0])


def scale_message(batch_size: int, learning_rate: float) -> str | None:
    """The effective batch and learning rate of a data-parallel run (None in one process)."""
    processes = current()
    if not processes.parallel:
        return None
    return (f"{processes.world_size} processes x batch {batch_size} = effective batch "
            f"{processes.world_size * batch_size}; learning rate {learning_rate:g}, not scaled with the processes "
            "(AdamW's step does not grow with the batch as SGD's does; lower --batch-size to keep the effective "
            "batch of a single-process run)")
