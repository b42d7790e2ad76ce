"""The Dask side of extraction: the embedded LocalCluster's settings and per-worker process tuning."""
from __future__ import annotations

import os

from distill.codec.malloc_tuning import raise_glibc_thresholds

# Dask settings of the embedded cluster: throughput over live introspection. Dask's statistical profiler wakes
# every 10 ms in each worker to sample the task thread's stack, and every server ticks its event loop every 20 ms
# and polls system metrics every 0.5 s; on 2 cores with 2 workers that cost ~2 CPU-seconds per 12 s run against
# ~0.6 with these settings (the task threads got 0.89 vs 0.95 of the wall clock; bench/extract_scaling.py
# --variants shipped,dask-defaults). Only the dashboard's Profile page and the refresh rate of its system plots
# are lost; `profile=True` (`--dask-profile`) keeps Dask's defaults. Workers of an existing scheduler keep their
# own settings (docs/cluster.md).
LEAN_DASK_CONFIG = {"distributed.worker.profile.enabled": False,
                    "distributed.admin.tick.interval": "1s",
                    "distributed.admin.system-monitor.interval": "5s"}


def embedded_cluster(workers: int, *, profile: bool = False, dashboard: bool | None = None):
    """The job's LocalCluster: `workers` single-threaded processes, LEAN_DASK_CONFIG unless `profile`."""
    import dask
    from dask.distributed import LocalCluster

    dashboard = has_bokeh() if dashboard is None else dashboard
    with dask.config.set({} if profile else LEAN_DASK_CONFIG):  # nannies pass this config to their workers
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                            dashboard_address=":0" if dashboard else None, silence_logs=40)


def has_bokeh() -> bool:
    try:
        import bokeh  # noqa: F401
        return True
    except ImportError:
        return False


def undo_dask_malloc_trim() -> bool:
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which freezes glibc's mmap threshold at
    128 KiB: every large temporary of the quantizer's search becomes a fresh mmap, page faults and munmap.
    bench/extract_scaling.py measured extraction 2.7x slower for it. Raise the thresholds in this worker
    (works under any scheduler, LocalCluster or jobqueue); a plain process is left alone."""
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return False
    return raise_glibc_thresholds()
