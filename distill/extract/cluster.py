"""The Dask side of extraction: which device the workers compute on, the clusters the job starts (the embedded
LocalCluster, one worker per GPU, batch-scheduler jobs through dask-jobqueue) and per-worker process tuning."""
from __future__ import annotations

import os
import re
import shutil

from distill import devices
from distill.codec.malloc_tuning import raise_glibc_thresholds
from distill.extract.planning import ExtractionError

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

# The worker resource a GPU worker declares and every shard task of a CUDA run asks for: a task then only runs on
# a worker that owns a GPU, one task per GPU at a time.
GPU_RESOURCE = "GPU"

# --cluster NAME -> the dask-jobqueue class that submits the workers as batch jobs
JOBQUEUE_CLUSTERS = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}


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


# ---------------------------------------------------------------------------------------------- devices

def parse_device(device: str) -> tuple[str, int | None]:
    """'cpu' -> ('cpu', None), 'cuda' -> ('cuda', None), 'cuda:N' -> ('cuda', N); anything else is refused."""
    try:
        return devices.parse_device(device, cuda_hint=_CUDA_HINT)
    except devices.DeviceError as e:
        raise ExtractionError(str(e)) from None


def device_type(device: str) -> str:
    """'cpu' or 'cuda': what the store records (the GPU's index does not change the numerics)."""
    return parse_device(device)[0]


def check_device(device: str) -> str:
    """`device`, if this process can compute on it; ExtractionError naming the device and why not otherwise."""
    try:
        return devices.check_device(device, cuda_hint=_CUDA_HINT)
    except devices.DeviceError as e:
        raise ExtractionError(str(e)) from None


_CUDA_HINT = "one worker per visible GPU"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (indexes or UUIDs), in CUDA's order."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(count)]
    return [g.strip() for g in env.split(",") if g.strip()][:count]


def embedded_gpus(device: str, workers: int | None) -> list[str]:
    """The GPUs the embedded cluster gets, one worker each: all visible GPUs for `cuda` (the first `workers` if
    given), GPU N alone for `cuda:N`. ExtractionError when the machine has fewer."""
    check_device(device)
    _, index = parse_device(device)
    gpus = visible_gpus()
    if index is not None:
        if workers not in (None, 1):
            raise ExtractionError(f"--device {device} runs one worker on that GPU; --workers {workers} needs "
                                  f"--device cuda (one worker per GPU)")
        return [gpus[index]]
    if workers is not None and workers > len(gpus):
        raise ExtractionError(f"--workers {workers} with --device cuda: one worker per GPU, and only {len(gpus)} "
                              f"CUDA device(s) are visible here")
    return gpus[:workers] if workers else gpus


def gpu_worker_specs(gpu_ids: list[str], *, memory_limit: int | None = None) -> dict:
    """SpecCluster worker specs, one Nanny per GPU id: worker i sees only GPU gpu_ids[i] (CUDA_VISIBLE_DEVICES,
    so `cuda` inside it is that GPU), runs one task at a time and declares GPU=1, which the shard tasks ask for.
    The host's memory is shared equally, as LocalCluster does."""
    from distributed import Nanny
    from distributed.system import MEMORY_LIMIT

    if not gpu_ids:
        raise ExtractionError("no GPU to start a worker on")
    memory_limit = memory_limit or MEMORY_LIMIT // len(gpu_ids)
    return {f"gpu-{g}": {"cls": Nanny, "options": {
        "nthreads": 1, "host": "127.0.0.1", "resources": {GPU_RESOURCE: 1},
        "env": {"CUDA_VISIBLE_DEVICES": str(g)}, "memory_limit": memory_limit, "dashboard": False,
        "silence_logs": 40}} for g in gpu_ids}


def embedded_gpu_cluster(gpu_ids: list[str], *, profile: bool = False, dashboard: bool | None = None):
    """The embedded cluster of a CUDA run: one worker process per GPU (gpu_worker_specs), LEAN_DASK_CONFIG
    unless `profile`. The same layout as dask-cuda's LocalCUDACluster, without its dependencies."""
    import dask
    from distributed import Scheduler, SpecCluster

    dashboard = has_bokeh() if dashboard is None else dashboard
    # a random port for the scheduler's HTTP server either way (Dask's default, 8787, may be taken)
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": dashboard, "dashboard_address": ":0"}}
    with dask.config.set({} if profile else LEAN_DASK_CONFIG):
        return SpecCluster(workers=gpu_worker_specs(gpu_ids), scheduler=scheduler, silence_logs=40,
                           name="ci-store-gpus")


# ---------------------------------------------------------------------------------------------- batch schedulers

def lean_config_exports() -> list[str]:
    """Shell lines that give workers started elsewhere (a job script) LEAN_DASK_CONFIG through Dask's environment
    variables."""
    out = []
    for key, value in LEAN_DASK_CONFIG.items():
        name = "DASK_" + key.upper().replace(".", "__").replace("-", "_")
        out.append(f"export {name}={value}")
    return out


def _with_gpu_resource(args: list[str]) -> list[str]:
    """dask worker arguments with GPU=1 among the worker's --resources (added to any the site gives)."""
    args = [str(a) for a in args]
    for i, a in enumerate(args):
        if a == "--resources" and i + 1 < len(args):
            if not re.search(rf"\b{GPU_RESOURCE}=", args[i + 1]):
                args[i + 1] = f"{args[i + 1]} {GPU_RESOURCE}=1".strip()
            return args
        if a.startswith("--resources="):
            if not re.search(rf"\b{GPU_RESOURCE}=", a):
                args[i] = f"{a} {GPU_RESOURCE}=1"
            return args
    return args + ["--resources", f"{GPU_RESOURCE}=1"]


def _jobqueue_class(kind: str):
    if kind not in JOBQUEUE_CLUSTERS:
        raise ExtractionError(f"--cluster {kind!r} unknown; choose one of {', '.join(JOBQUEUE_CLUSTERS)}")
    try:
        import dask_jobqueue
    except ImportError:
        raise ExtractionError(f"--cluster {kind} needs dask-jobqueue: pip install 'ci-store[cluster]'") from None
    return getattr(dask_jobqueue, JOBQUEUE_CLUSTERS[kind])


def jobqueue_submit_command(kind: str) -> str:
    """The batch system's submit command (sbatch, qsub, bsub) that dask-jobqueue runs for `kind`."""
    return _jobqueue_class(kind).job_cls.submit_command.split()[0]


def check_jobqueue_submit(kind: str) -> None:
    """Refuse before any work when the batch system cannot be reached from here (workers would never start)."""
    cmd = jobqueue_submit_command(kind)
    if shutil.which(cmd) is None:
        raise ExtractionError(f"--cluster {kind}: {cmd} is not on PATH; run ci-store on a node that submits "
                              f"{kind.upper()} jobs (a login node), or start the workers yourself and use "
                              f"--scheduler (docs/cluster.md)")


def jobqueue_cluster(kind: str, options: dict | None = None, *, device: str = "cpu", threads_per_worker: int = 1,
                     profile: bool = False):
    """A dask-jobqueue cluster (no job submitted yet: call .scale(jobs=N) or .adapt(...)).

    `options` (--cluster-options) go to the cluster class over the site's jobqueue.yaml (cores, memory, queue,
    account, walltime, job_extra_directives, worker_extra_args, job_script_prologue, ...). On top of them:
    every worker runs one shard at a time (--nthreads 1: a shard's torch threads are the parallelism); on CPU a
    job of `cores` cores runs cores // threads_per_worker worker processes unless `processes` says otherwise;
    with CUDA a job is one worker process that declares GPU=1 (ask the batch system for one GPU per job, e.g.
    job_extra_directives ["--gres=gpu:1"]) and uses the GPU the batch system gives the job; workers get
    LEAN_DASK_CONFIG unless `profile`.
    """
    import dask

    cls = _jobqueue_class(kind)
    opts = dict(options or {})
    config_name = opts.get("config_name") or cls.job_cls.config_name

    def setting(key: str, default=None):
        value = opts.get(key.replace("-", "_"))
        return dask.config.get(f"jobqueue.{config_name}.{key}", default) if value is None else value

    processes = setting("processes")
    if parse_device(device)[0] == "cuda":
        if processes not in (None, 1):
            raise ExtractionError(f"--cluster {kind} with --device cuda runs one worker process per job, each on "
                                  f"its job's GPU; processes={processes} would share it (set processes to 1, "
                                  f"one GPU per job)")
        opts["processes"] = 1
        opts["worker_extra_args"] = _with_gpu_resource(setting("worker-extra-args") or [])
    elif processes is None and isinstance(setting("cores"), int):
        opts["processes"] = max(1, setting("cores") // max(1, threads_per_worker))
    if not profile:
        opts["job_script_prologue"] = lean_config_exports() + list(setting("job-script-prologue") or [])
    job_cls = type(cls.job_cls.__name__, (cls.job_cls,), {
        "__doc__": "A job whose workers run one shard task at a time (dask worker --nthreads 1).",
        "worker_process_threads": 1})
    try:
        with dask.config.set({} if profile else LEAN_DASK_CONFIG):
            return cls(job_cls=job_cls, **opts)
    except (TypeError, ValueError) as e:  # an option the class does not take, cores/memory missing, ...
        raise ExtractionError(f"--cluster {kind}: {e} (options from --cluster-options and jobqueue.yaml)") from None
