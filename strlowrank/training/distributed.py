"""One code path for CPU, one GPU and many: torchrun + DistributedDataParallel.

``torchrun --nproc_per_node=N script.py`` sets RANK, LOCAL_RANK and WORLD_SIZE; without them the
run is a single process. The backend is nccl on CUDA and gloo on CPU. Only rank 0 logs and writes.
Each rank reads its own shard of every epoch (:class:`EpochSampler`); :func:`replicas_in_sync`
checks at the end that the ranks still hold the same model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: the local GPU when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialize the process group when started by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a short list of floats over all ranks (identity for one process)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


class EpochSampler(Sampler[int]):
    """Shuffled (or ordered) indices for one epoch, sharded over ranks, from a given position.

    The order depends only on (seed, epoch), so a resumed run sees the same batches. Training
    shards are padded to equal length (DDP needs equal step counts); evaluation shards are not.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        epoch: int,
        shuffle: bool,
        info: DistInfo,
        start: int = 0,
        pad: bool = True,
    ) -> None:
        if shuffle:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if pad and info.world_size > 1:
            order += order[: (-n) % info.world_size]
        self.indices = order[info.rank :: info.world_size][start:]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def replicas_in_sync(model: nn.Module, info: DistInfo) -> bool:
    """True when every DDP rank holds bit-identical parameters (compares float64 checksums)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        sums = torch.stack([flat.sum(), (flat * weights.remainder(97)).sum()])
        both = torch.cat([sums, -sums])  # max over ranks of x and of -x: equal iff all ranks agree
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return bool(torch.equal(both[:2], -both[2:]))


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
