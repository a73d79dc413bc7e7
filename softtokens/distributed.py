"""Processes under torchrun: the process group, each rank's device, and the few collectives training needs.

``softtokens train`` started by ``torchrun --nproc_per_node N`` (one or many
nodes) reads the usual RANK / WORLD_SIZE / LOCAL_RANK variables; started
plainly it is rank 0 of 1 and nothing here talks to anyone. NCCL on CUDA,
gloo on CPU (which is how the tests run two processes on one machine).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes files, logs and the progress bar."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        """This process's place as torchrun's variables give it, before (or without) a process group: what a run
        needs to know before it starts one (who writes the folder, how the rows split)."""
        if not launched():
            return cls()
        return cls(*(int(os.environ.get(k, 0)) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")))

    @property
    def group(self) -> bool:
        """Whether a process group is up (several ranks, or one rank sharding for mixed precision)."""
        return dist.is_available() and dist.is_initialized()


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str, single: bool = False) -> tuple[Dist, str]:
    """The process group and this rank's device; ``single`` starts a one-rank group (for FSDP2 on one GPU)."""
    if not launched() and not single:
        return Dist(), device
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) if launched() else (0, 1, 0)
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        # Rank 0 alone runs the out-of-domain checks while the others wait: allow hours, not NCCL's 10 minutes.
        timeout = datetime.timedelta(hours=3)
        if launched():
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
        else:  # one rank: an in-memory store, no port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return Dist(rank, world, local), device


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj, d: Dist) -> list:
    """Every rank's ``obj`` in rank order (small Python objects: rewards, rollout summaries)."""
    if not d.group:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank when it is true on one (a stop request must stop all ranks together)."""
    if not d.group:
        return flag
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(d: Dist) -> None:
    if d.group:
        dist.barrier()
