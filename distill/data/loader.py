"""The one DataLoader over a KDDataset, for training and evaluation alike.

Workers are spawned (not forked) by default and each opens its own label-store handle: an fsspec/S3-backed zarr
array opened before a fork is bound to the parent's event loop. With workers, the loader is made once per run and
its workers persist across epochs (spawning costs seconds per worker, and each worker's feature cache lives on):
the batch sampler stays in the main process, so `set_epoch` on it between epochs picks the next epoch's batches.
"""
from __future__ import annotations

import torch

from distill.data.dataset import collate

__all__ = ["make_loader", "worker_init"]


def worker_init(_worker_id: int) -> None:
    """Each DataLoader worker opens its own store handle and runs torch single-threaded."""
    torch.set_num_threads(1)
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "_store"):
        info.dataset._store = None


def make_loader(dataset, batch_sampler, *, num_workers: int = 0, seed: int = 0,
                multiprocessing_context: str | None = "spawn",
                persistent_workers: bool = True) -> torch.utils.data.DataLoader:
    """Batches of `dataset` in the order `batch_sampler` yields, collated and padded (`collate`); with workers,
    they persist across passes over the loader unless `persistent_workers` is False."""
    kwargs = {}
    if num_workers:
        kwargs = {"worker_init_fn": worker_init, "multiprocessing_context": multiprocessing_context,
                  "persistent_workers": persistent_workers}
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate,
                                       num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
                                       **kwargs)
