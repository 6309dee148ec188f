"""Several processes under ``torchrun``: the process group, who does what, and what they exchange.

``torchrun --nproc_per_node=N -m MedKDSegmentLib <command> …`` starts N copies of a command; each joins the
process group here (NCCL when the processes run on CUDA, gloo otherwise) and trains data-parallel with
``DistributedDataParallel``. Without torchrun (or with one process) every function here is the identity or a
no-op, so single-process code paths are the same code.

Who does what: every process reads the data and trains on its own random patches (its own random stream,
below); teacher outputs and folder segmentation are sharded (``shard``); only the main process (rank 0)
reports progress, writes checkpoints, run records and the model, and the others wait for it (``barrier``).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

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
    if not (dist.is_available() and dist.is_initialized()):
        return Processes()
    return Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device: torch.device) -> str:
    """NCCL for processes on CUDA GPUs, gloo for CPU processes (NCCL has no CPU tensors)."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def process_group(device_choice: str = "auto") -> Iterator[Processes]:
    """Join torchrun's process group for the duration (nothing to join without torchrun). On CUDA each process
    takes the GPU of its ``LOCAL_RANK`` first, so ``select_device`` ("cuda") means that GPU from then on."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
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
    values: list = [None] * processes.world_size
    dist.all_gather_object(values, value)
    return values


def from_main(value: T) -> T:
    """The main process's ``value`` in every process (a decision all must share, e.g. to stop)."""
    if not current().parallel:
        return value
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


class Trainee(nn.Module):
    """A network together with its distillation terms' learnt parts (hint adapters, CTKD's temperature): one
    module, so ``DistributedDataParallel`` averages all their gradients. Calling it runs the network."""

    def __init__(self, network: nn.Module, terms: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.terms = terms

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)


@contextmanager
def data_parallel(network: nn.Module, terms: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """What a training step calls to run ``network``: the network itself in one process; across processes,
    ``DistributedDataParallel`` over it and ``terms`` (gradients averaged in backward, rank 0's weights
    broadcast first). On GPUs batch norm is synchronised across processes while training (``SyncBatchNorm``,
    as nnU-Net's DDP does) and made plain again afterwards, for evaluation in the main process alone; on CPUs
    each process keeps its own statistics (``SyncBatchNorm`` runs on GPUs only)."""
    if not current().parallel:
        yield network
        return
    synchronised = device.type == "cuda"
    if synchronised:
        nn.SyncBatchNorm.convert_sync_batchnorm(network)  # in place below the top module
    try:
        ids = [device.index if device.index is not None else torch.cuda.current_device()] if synchronised else None
        yield nn.parallel.DistributedDataParallel(Trainee(network, terms), device_ids=ids)
    finally:
        if synchronised:
            local_batch_norm(network)


def local_batch_norm(module: nn.Module) -> None:
    """Replace ``SyncBatchNorm`` layers below ``module`` by plain 3-D batch norm with the same state (torch
    converts one way only)."""
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            plain = nn.BatchNorm3d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats).to(next(child.buffers(), torch.empty(0)).device)
            plain.load_state_dict(child.state_dict())
            plain.train(child.training)
            setattr(module, name, plain)
        else:
            local_batch_norm(child)


def scale_message(batch_size: int, learning_rate: float) -> str | None:
    """The effective batch and learning rate of a data-parallel run (None in one process)."""
    processes = current()
    if not processes.parallel:
        return None
    return (f"{processes.world_size} processes x batch {batch_size} = effective batch "
            f"{processes.world_size * batch_size}; learning rate {learning_rate:g}, not scaled with the processes "
            "(AdamW's step does not grow with the batch as SGD's does; lower --batch-size to keep the effective "
            "batch of a single-process run)")
