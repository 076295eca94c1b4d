"""Data-parallel training of one member under `torchrun`: the process group, each rank's share
of a batch, and the few values ranks exchange.

tympan does not launch ranks itself: `torchrun --nproc-per-node N --no-python tympan train ...`
starts N copies of the stage, and each finds its rank in torchrun's environment (`RANK`,
`WORLD_SIZE`, `LOCAL_RANK`). There is no param to switch it on: the environment says whether
the stage is one of several ranks, and without torchrun nothing changes.

`train.batch_size` is per rank, as in PyTorch's DistributedSampler: N ranks at batch b train
on global batches of N x b, the same batches, in the same order, that one process at batch
N x b trains on (the shuffle is drawn from the member's seed on every rank, each rank takes
its slice). Each rank scales its loss by its share of the global batch's denominator, so that
the gradients DistributedDataParallel averages are the gradients of the global batch's loss:
the learning curve of N ranks x b equals one rank x N b up to float summation order, for
models without batch norm and draws (dropout, augmentation), which differ by rank. Batch
norm statistics are per rank on CPU; on CUDA the layers become SyncBatchNorm.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch import distributed as dist
from torch import nn


class DistributedError(RuntimeError):
    """A torchrun launch that tympan cannot train under (the message says why)."""


@dataclass(frozen=True)
class Rank:
    """This process's place among torchrun's ranks."""

    rank: int
    world: int
    local: int  # the rank on this machine: the CUDA device it uses

    @property
    def leader(self) -> bool:
        """Rank 0: the one that logs to MLflow, writes checkpoints and the stage's outputs."""
        return self.rank == 0


def from_env(environ: Mapping[str, str] = os.environ) -> Rank | None:
    """The rank torchrun's environment gives this process; None outside torchrun or with one
    process (a world of one trains as without torchrun)."""
    world = int(environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if "RANK" not in environ:
        raise DistributedError(
            f"WORLD_SIZE={world} but no RANK in the environment: launch with torchrun"
        )
    return Rank(int(environ["RANK"]), world, int(environ.get("LOCAL_RANK", "0")))


def start(device: torch.device) -> tuple[Rank | None, torch.device]:
    """Join torchrun's process group when launched by it (gloo on CPU, NCCL on CUDA) -> the
    rank (None outside torchrun) and the device this rank trains on (CUDA: `cuda:LOCAL_RANK`)."""
    rank = from_env()
    if rank is None:
        return None, device
    if device.type == "cuda":
        if rank.local >= torch.cuda.device_count():
            raise DistributedError(
                f"rank {rank.rank} wants cuda:{rank.local}, this machine has "
                f"{torch.cuda.device_count()} CUDA device(s): --nproc-per-node at most that"
            )
        device = torch.device("cuda", rank.local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10)
        )
    return rank, device


def backend() -> str:
    """The process group's backend (gloo or nccl)."""
    return str(dist.get_backend())


def stop() -> None:
    """Leave the process group (each rank, once its part of the stage is done)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` as DistributedDataParallel (rank 0's weights broadcast to every rank); on CUDA
    with batch norm layers synchronised across ranks first. Returns the wrapper; `model`
    itself (its `module`) is what validation, checkpoints and the bundle use."""
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    # find_unused_parameters: a model whose forward skips a layer still trains, and DDP keeps
    # its first bucket layout (it re-buckets by gradient order otherwise, after the first
    # step of each process: a resumed run would then sum one step's gradients in another
    # order than the uninterrupted run did, and no longer end on the same weights)
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def shard(chunk: np.ndarray, rank: Rank) -> tuple[np.ndarray, bool]:
    """This rank's rows of a global batch `chunk` (contiguous slices, earlier ranks one longer)
    -> `(rows, counts)`. A rank left without rows (a last batch shorter than the world) gets
    the whole chunk with `counts` False: it runs forward and backward with a zero loss so that
    every rank takes part in the gradient average and steps its optimiser alike."""
    mine = np.array_split(chunk, rank.world)[rank.rank]
    return (mine, True) if len(mine) else (chunk, False)


def total(value: float, device: torch.device) -> float:
    """The sum of `value` over the ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def from_leader(value: Any) -> Any:
    """Rank 0's `value` on every rank (any picklable object)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (any picklable object)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
