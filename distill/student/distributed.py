"""Data-parallel student training (torch.distributed): who this process is, its share of the batches, the launcher.

Two ways in: `torchrun --nproc-per-node N -m cli train-student ...` (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT) or `ci-store train-student --world-size N ...`, which spawns N local processes itself
(`spawn`). Backend: gloo on CPU, nccl on CUDA (one GPU per rank: cuda:LOCAL_RANK).

Batches: per epoch the global batch list of the (seeded, reproducible) batch sampler is cut into updates of W*A
batches (W world size, A --accum-grad); rank r's micro-step a of update k takes global batch k*W*A + a*W + r, and
the remainder that does not fill an update is dropped, so every rank takes the same number of steps. Hence a W-rank
run with accumulation A sees exactly the batches of a 1-process run with accumulation W*A, and (each micro-batch
loss / A, DDP averaging gradients over ranks) makes the same updates up to floating-point reduction order.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Rank", "RankBatches", "current_rank", "init_distributed", "spawn", "updates_per_epoch"]

# rank 0 evaluates the dev set and writes checkpoints while the others wait at a barrier: allow for that
BARRIER_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current_rank() -> Rank:
    """This process's place in the job, from the environment torchrun (or `spawn`) sets; 1 process without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun): {e}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return Rank(rank, world, local)


def init_distributed(rank: Rank, device_kind: str) -> bool:
    """Join the process group (gloo on CPU, nccl on CUDA) unless already in one; True if this call joined it."""
    if not rank.distributed or dist.is_initialized():
        return False
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank.rank, world_size=rank.world_size, timeout=BARRIER_TIMEOUT)
    return True


def updates_per_epoch(num_batches: int, world_size: int, accum: int) -> int:
    return num_batches // (world_size * accum)


class RankBatches(torch.utils.data.Sampler):
    """This rank's micro-batches of one epoch of `inner` (any batch sampler), in update order, from update `skip`.

    The inner sampler's epoch is listed once (it must give every rank the same list: seeded by epoch, not by
    rank); micro-step a of update k is global batch k*W*A + a*W + rank."""

    def __init__(self, inner, *, rank: int = 0, world_size: int = 1, accum: int = 1, skip_updates: int = 0):
        self.inner, self.rank, self.world_size, self.accum, self.skip = inner, rank, world_size, accum, skip_updates

    def set_epoch(self, epoch: int, skip_updates: int = 0) -> None:
        """Serve `epoch` of the inner sampler from update `skip_updates` (a resumed epoch skips what it trained)."""
        self.inner.set_epoch(epoch)
        self.skip = skip_updates

    def __iter__(self):
        batches = list(self.inner)
        W, A = self.world_size, self.accum
        for k in range(self.skip, updates_per_epoch(len(batches), W, A)):
            for a in range(A):
                yield batches[k * W * A + a * W + self.rank]

    def __len__(self) -> int:
        return max(0, updates_per_epoch(len(self.inner), self.world_size, self.accum) - self.skip) * self.accum


def barrier(rank: Rank) -> None:
    if rank.distributed and dist.is_initialized():
        dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(index: int, world_size: int, port: int, fn, args: tuple, kwargs: dict, results) -> None:
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = fn(*args, **kwargs)
    if index == 0:
        results.put(out)


def spawn(nprocs: int, fn, args: tuple = (), kwargs: dict | None = None):
    """Run fn(*args, **kwargs) in `nprocs` fresh local processes (ranks 0..N-1); rank 0's return value.

    `fn` and its arguments must be picklable (module-level functions, plain data). A rank that fails raises
    RuntimeError naming the rank and its error (the others are stopped)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    try:
        mp.spawn(_spawned, args=(nprocs, _free_port(), fn, tuple(args), dict(kwargs or {}), results), nprocs=nprocs,
                 join=True, start_method="spawn")
    except mp.ProcessRaisedException as e:
        last = [ln for ln in str(e).strip().splitlines() if ln.strip()][-1]
        raise SpawnedRankError(f"rank {e.error_index} of {nprocs} failed: {last.strip()}") from None
    except mp.ProcessExitedException as e:
        raise SpawnedRankError(f"rank {e.error_index} of {nprocs} exited with status {e.exit_code}") from None
    return results.get() if not results.empty() else None


class SpawnedRankError(RuntimeError):
    """A process started by `spawn` failed; the message names the rank and its last error line."""
