"""The extraction job: audio corpus -> teacher embeddings -> MVQ codes -> CI store, one Dask task per shard.

Why shards are the unit of work: every shard object is written by exactly one task, so parallel workers never
touch the same object, a retried task rewrites identical bytes, and the per-shard completion record lets a killed
job resume where it stopped.

Reproducibility: the shard layout depends only on the manifest's ids and exact frame counts (sorted by id), each
utterance goes through the teacher alone (no padding, so batch composition cannot change its frames), every
worker runs torch with a fixed thread count, and the quantizer's encoding is bit-identical whatever the batch.
So worker count, batch size and manifest order do not change a single stored byte. (`batch_seconds` trades this
for speed: padded teacher batches change frames in the last bits; see distill/extract/shard_task.py, which holds
the shard task itself.)
"""
from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from ci_store import create, open_store
from ci_store.errors import StoreError
from ci_store.format import DEFAULT_CODES_SHARD_FRAMES as DEFAULT_SHARD_FRAMES
from distill.data.audio import IO_ATTEMPTS, IO_BACKOFF_SECONDS
from distill.data.manifest import Utterance, load_manifest
from distill.extract.cluster import (GPU_RESOURCE, check_device, check_jobqueue_submit, device_type, embedded_cluster,
                                     embedded_gpu_cluster, embedded_gpus, has_bokeh, jobqueue_cluster, parse_device,
                                     undo_dask_malloc_trim)
from distill.extract.planning import (PROBE_THREADS, ExtractionError, check_unique_ids, float_layout_frames,
                                      frame_counts, plan_stores, probe_all)
from distill.extract.shard_task import ShardProgress, ShardResult, run_shard_task, shards_with_failures  # noqa: F401
from distill.teachers import TEACHER_DTYPES, load_teacher

# Codes of a shard are checkpointed every this many frames (when there are no float-label shards to do it):
# ~22 min of 50 Hz audio, 1/16 of a default shard: the most teacher work a pre-empted task loses (docs/cluster.md).
DEFAULT_CHECKPOINT_FRAMES = 65536


@dataclass
class ExtractionConfig:
    """Everything a shard task needs; plain data so it ships to Dask workers without pickling models."""

    teacher: str
    layer: int
    quantizer: str
    out: str
    float_labels: str | list[str] | None = None  # one or more float-label store URLs (l1/l2 baselines)
    float_dtype: str | list[str] = "float16"  # one dtype for all, or one per float_labels URL
    storage_options: dict = field(default_factory=dict)
    batch_frames: int = 20000  # frames encoded per quantizer call
    threads_per_worker: int = 1
    min_seconds: float = 0.1  # shorter audio is recorded as a failure ("too short")
    device: str = "cpu"  # cpu, cuda or cuda:N (run_extraction pins each embedded worker to one GPU)
    teacher_kind: str | None = None  # load_teacher(kind=): None detects the format from the files
    short_input: str | None = None  # Whisper teachers: mode for inputs under 30 s (None: the teacher's default)
    batch_seconds: float | None = None  # teacher batches of up to this much padded audio, sorted by length;
    #                                     None: one utterance per forward (bit-reproducible; batches are not)
    prefetch: int = 8  # utterances read and decoded ahead of the teacher on a background thread (0: inline)
    checkpoint_frames: int = DEFAULT_CHECKPOINT_FRAMES  # codes checkpoint interval without float labels
    io_attempts: int = IO_ATTEMPTS  # reads of an utterance's audio on transient storage faults
    io_backoff_seconds: float = IO_BACKOFF_SECONDS  # first retry's delay ceiling (doubles; full jitter)
    retry_failed: bool = False  # also redo the failed utterances of complete shards (`extract --retry-failed`)
    teacher_dtype: str = "float32"  # the teacher's weights: float32, float16 or bfloat16 (recorded in the store)
    progress_topic: str | None = None  # Dask event topic the shard tasks report frames done on (set by the driver)

    def provenance(self) -> dict:
        """What the codes' numerics depend on beyond the teacher and quantizer files; stored with the teacher's
        metadata, so that a resume with other settings is refused. CPU thread counts change float reduction
        order; on a GPU the host's threads do not touch the numerics (None)."""
        kind = device_type(self.device)
        return {"dtype": self.teacher_dtype, "device": kind,
                "torch_threads": int(self.threads_per_worker) if kind == "cpu" else None}

    def float_targets(self) -> list[tuple[str, str]]:
        """[(url, dtype)] of the float-label stores written alongside the CI store."""
        urls = [self.float_labels] if isinstance(self.float_labels, str) else list(self.float_labels or [])
        dtypes = [self.float_dtype] * len(urls) if isinstance(self.float_dtype, str) else list(self.float_dtype)
        if len(dtypes) != len(urls):
            raise ExtractionError(f"{len(urls)} float-label stores but {len(dtypes)} dtypes given")
        for d in dtypes:
            if d not in ("float16", "float32"):
                raise ExtractionError(f"float label dtype must be float16 or float32, got {d!r}")
        return list(zip(urls, dtypes))


@dataclass
class ExtractionReport:
    out: str
    num_shards: int
    shards_run: int
    shards_skipped: int
    frames: int
    seconds: float
    seconds_teacher: float
    failures: dict
    float_failures: dict = field(default_factory=dict)  # float-label store URL -> {id: reason}, when any
    provenance: dict = field(default_factory=dict)  # device type, teacher dtype, torch threads (as stored)
    workers: int | None = None  # workers that ran tasks (None: no task ran)

    @property
    def ok(self) -> bool:
        return not self.failures and not any(self.float_failures.values())

    @property
    def num_failed(self) -> int:
        """Utterances failed in the CI store or in any float-label store."""
        return len(set(self.failures).union(*self.float_failures.values()))

    def to_dict(self) -> dict:
        """The report as plain JSON data (`ci-store extract --json`)."""
        fps = self.frames / self.seconds if self.seconds > 0 else None
        return {**dataclasses.asdict(self), "frames_per_second": fps, "ok": self.ok}

    def summary(self) -> str:
        fps = self.frames / self.seconds if self.seconds > 0 else float("nan")
        lines = [
            f"store: {self.out}",
            f"shards: {self.num_shards} total, {self.shards_run} run, {self.shards_skipped} already complete",
            f"frames: {self.frames} in {self.seconds:.1f} s ({fps:,.0f} frames/s)",
            f"failed utterances: {len(self.failures)}",
        ]
        for uid, reason in sorted(self.failures.items())[:20]:
            lines.append(f"  {uid}: {reason}")
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more (see `ci-store inspect`)")
        for url, fails in self.float_failures.items():
            only = {u: r for u, r in fails.items() if u not in self.failures}
            if only:
                lines.append(f"failed only in float labels {url}: {len(only)}")
                lines += [f"  {uid}: {reason}" for uid, reason in sorted(only.items())[:20]]
        return "\n".join(lines)


# ---------------------------------------------------------------- per-process model cache

_MODELS: dict = {}


def _models(cfg: ExtractionConfig):
    """Load teacher and quantizer once per worker process (not once per task)."""
    import torch

    from distill.codec.quantizer import MultiCodebookQuantizer

    torch.set_num_threads(cfg.threads_per_worker)
    if not _MODELS:
        undo_dask_malloc_trim()
    key = (cfg.teacher, cfg.layer, cfg.quantizer, cfg.device, cfg.teacher_kind, cfg.short_input, cfg.teacher_dtype)
    if key not in _MODELS:
        try:
            check_device(cfg.device)
        except ExtractionError as e:  # a worker of a remote cluster without (usable) CUDA
            import socket

            raise ExtractionError(f"worker on {socket.gethostname()}: {e}") from None
        teacher = load_teacher(cfg.teacher, layer=cfg.layer, device=cfg.device,
                               storage_options=cfg.storage_options or None, kind=cfg.teacher_kind,
                               short_input=cfg.short_input, dtype=cfg.teacher_dtype)
        quantizer = MultiCodebookQuantizer.load(cfg.quantizer, storage_options=cfg.storage_options or None)
        quantizer = quantizer.to(cfg.device)
        _MODELS.clear()
        _MODELS[key] = (teacher, quantizer)
    return _MODELS[key]


def embed_utterance(teacher, utt: Utterance, wave: np.ndarray) -> np.ndarray:
    """Teacher frames [T, dim] float32 for one utterance, embedded alone (no padding), as a numpy array."""
    import torch

    with torch.inference_mode():
        w = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))[None]
        frames, lens = teacher.embed(w, torch.tensor([w.shape[1]]))
    return frames[0, : int(lens[0])].float().cpu().numpy()


def run_shard(cfg: ExtractionConfig, shard_index: int, utts: list[Utterance],
              float_shards: list[int] | None = None) -> ShardResult:
    """Extract one CI shard (and the float-label shards nested in it); a no-op if already complete.
    The task itself is distill/extract/shard_task.py; this is what the driver submits to Dask."""
    return run_shard_task(cfg, shard_index, utts, float_shards, load_models=_models)


# ---------------------------------------------------------------- the job

# the provenance keys of the stored teacher metadata (ExtractionConfig.provenance), as the user sets them
_PROVENANCE_NAMES = {"dtype": "teacher dtype (--teacher-dtype)", "device": "device type (--device)",
                     "torch_threads": "torch threads per worker (--threads-per-worker)"}
# the quantizer's encode settings (part of its config and id; named here so a refusal says which one differs)
_SEARCH_SETTINGS = ("beam_size", "icm_sweeps", "block_rows")


def _teacher_meta(teacher, cfg: ExtractionConfig) -> dict:
    """The teacher metadata stored with the labels: which checkpoint and layer, and how it was run (provenance)."""
    meta = {"name": teacher.name, "checkpoint_sha256": teacher.checkpoint_sha256, "layer": teacher.layer,
            "sample_rate": teacher.sample_rate, "dim": teacher.dim}
    if getattr(teacher, "kind", None):  # Whisper teachers: format, size and how short inputs were run
        full = teacher.metadata()
        meta.update({k: full[k] for k in ("kind", "size", "num_layers", "short_input", "window_seconds")})
    meta.update(cfg.provenance())
    return meta


def _resume_teacher_meta(url: str, meta: dict, quantizer, so: dict | None) -> dict:
    """The teacher metadata to create (or reopen) the store at `url` with.

    A store already there whose labels came from other numerics (teacher dtype, device type, torch threads,
    quantizer search settings) is refused, naming each difference: resuming would mix labels of two kinds. A store
    written before these were recorded (float32 teachers only) is resumed with its metadata as it is."""
    try:
        existing = open_store(url, mode="r", storage_options=so)
        old = existing.teacher
        state = existing.quantizer_state() if quantizer is not None and existing.kind == "codes" else None
    except (StoreError, OSError):
        return meta  # nothing there, or not a store: create() says what is wrong
    if not isinstance(old, dict):
        return meta
    legacy = not any(k in old for k in _PROVENANCE_NAMES)
    diffs = []
    if legacy and meta["dtype"] != "float32":
        diffs.append(f"teacher dtype (--teacher-dtype) is 'float32' there (written before dtypes were recorded), "
                     f"{meta['dtype']!r} here")
    for k, name in ({} if legacy else _PROVENANCE_NAMES).items():
        if old.get(k) != meta.get(k):
            diffs.append(f"{name} is {old.get(k)!r} there, {meta.get(k)!r} here")
    for k in _SEARCH_SETTINGS if state else ():
        if state[0].get(k) != quantizer.config.get(k):
            diffs.append(f"quantizer search setting {k} is {state[0].get(k)!r} there, {quantizer.config.get(k)!r} "
                         f"here")
    if diffs:
        raise ExtractionError(f"{url} holds labels computed with other settings, and resuming would mix labels of "
                              f"different numerics: " + "; ".join(diffs)
                              + " (resume with the same settings, or write to a new --out)")
    return {k: v for k, v in meta.items() if k not in _PROVENANCE_NAMES} if legacy else meta


def prepare(manifest, cfg: ExtractionConfig, *, shard_frames: int = DEFAULT_SHARD_FRAMES,
            float_shard_frames: int | None = None, manifest_storage_options: dict | None = None,
            probe_threads: int = PROBE_THREADS, progress: bool = False):
    """Validate inputs, plan the layout and create (or reopen, for resume) the output stores.

    The manifest is read, and audio headers probed for utterances without lengths, with
    `manifest_storage_options` (default: cfg.storage_options)."""
    from distill.codec.quantizer import MultiCodebookQuantizer

    if cfg.teacher_dtype not in TEACHER_DTYPES:
        raise ExtractionError(f"--teacher-dtype {cfg.teacher_dtype!r} unknown; choose one of "
                              f"{', '.join(TEACHER_DTYPES)}")
    parse_device(cfg.device)
    mso = (cfg.storage_options if manifest_storage_options is None else manifest_storage_options) or None
    utts = load_manifest(manifest, storage_options=mso) if isinstance(manifest, str) else list(manifest)
    if not utts:
        raise ExtractionError(f"manifest {manifest!r} has no utterances")
    check_unique_ids(utts)
    utts = probe_all(utts, mso, threads=probe_threads, progress=progress)
    teacher = load_teacher(cfg.teacher, layer=cfg.layer, device="cpu",
                           storage_options=cfg.storage_options or None, kind=cfg.teacher_kind,
                           short_input=cfg.short_input)
    quantizer = MultiCodebookQuantizer.load(cfg.quantizer, storage_options=cfg.storage_options or None)
    if quantizer.dim != teacher.dim:
        raise ExtractionError(f"quantizer {cfg.quantizer} expects dim {quantizer.dim}, teacher {cfg.teacher} "
                              f"layer {cfg.layer} gives dim {teacher.dim}")
    counts = frame_counts(utts, teacher)
    floats = cfg.float_targets()
    if floats and float_shard_frames is None:
        float_shard_frames = float_layout_frames(teacher.dim, [d for _, d in floats])
    plan, fplan, nested = plan_stores(counts, shard_frames, float_shard_frames if floats else None)
    meta = _teacher_meta(teacher, cfg)
    qstate = {"id": quantizer.quantizer_id, "config": quantizer.config, "arrays": quantizer.to_arrays()}
    so = cfg.storage_options or None
    metas = {url: _resume_teacher_meta(url, meta, q, so)  # every refusal before anything is written
             for url, q in [(cfg.out, quantizer)] + [(u, None) for u, _ in floats]}
    url = cfg.out
    try:
        create(url, plan, kind="codes", num_codebooks=quantizer.num_codebooks,
               codebook_size=quantizer.codebook_size, frame_rate=teacher.frame_rate, teacher=metas[url],
               quantizer=qstate, storage_options=so, exist_ok=True)
        for url, dtype in floats:
            create(url, fplan, kind="float", dim=teacher.dim, dtype=dtype, frame_rate=teacher.frame_rate,
                   teacher=metas[url], storage_options=so, exist_ok=True)
    except Exception as e:  # StoreError: mismatched quantizer, different plan, not a store; OSError: a file there
        msg = str(e) if isinstance(e, StoreError) else f"output store {url}: cannot create it ({e})"
        raise ExtractionError(msg) from e
    by_id = {u.id: u for u in utts}
    tasks = []
    # largest shards first: Dask runs tasks roughly in submission order, so the last to finish are the smallest
    # and workers idle less at the end (a shard's bytes never depend on the order)
    for sh in sorted(plan.shards, key=lambda sh: (-sh.size, sh.index)):
        tasks.append((sh.index, [by_id[u] for u in sh.utt_ids], nested[sh.index] if nested else None))
    return plan, tasks


def _placement(cfg: ExtractionConfig, *, workers: int | None, scheduler: str | None, cluster: str | None,
               jobs: int | None, adaptive: tuple[int, int] | None) -> list[str] | None:
    """Check where the job is asked to run, before any work; the GPU ids of an embedded CUDA cluster (else None)."""
    kind, index = parse_device(cfg.device)
    if scheduler and cluster:
        raise ExtractionError("give --scheduler (a running scheduler) or --cluster (start one), not both")
    if cluster is None and (jobs is not None or adaptive is not None):
        raise ExtractionError("--jobs and --adaptive size the batch jobs of --cluster (slurm, pbs, sge, lsf)")
    if cluster is not None:
        if (jobs is None) == (adaptive is None):
            raise ExtractionError(f"--cluster {cluster}: give either --jobs N or --adaptive MIN:MAX")
        if jobs is not None and jobs < 1:
            raise ExtractionError(f"--jobs {jobs}: at least one job")
        if adaptive is not None and not 0 <= adaptive[0] <= adaptive[1] >= 1:
            raise ExtractionError(f"--adaptive {adaptive[0]}:{adaptive[1]}: need 0 <= MIN <= MAX and MAX >= 1")
        check_jobqueue_submit(cluster)
    if scheduler or cluster:
        if index is not None:
            raise ExtractionError(f"--device {cfg.device} names a GPU of this machine; workers of --scheduler or "
                                  f"--cluster each use the GPU their environment gives them: use --device cuda")
        return None
    if workers is not None and workers < 1:
        raise ExtractionError(f"--workers {workers}: at least one worker")
    return embedded_gpus(cfg.device, workers) if kind == "cuda" else None


def _start_cluster(cfg: ExtractionConfig, *, gpus, workers, scheduler, cluster, cluster_options, jobs, adaptive,
                   profile, log):
    """(client, cluster this job owns or None)."""
    from dask.distributed import Client

    if scheduler:
        return Client(scheduler), None
    if cluster:
        owned = jobqueue_cluster(cluster, cluster_options, device=cfg.device,
                                 threads_per_worker=cfg.threads_per_worker, profile=profile)
        try:
            if jobs is not None:
                owned.scale(jobs=jobs)
                log(f"{cluster}: {jobs} job(s) submitted; the shards start as their workers join")
            else:
                owned.adapt(minimum_jobs=adaptive[0], maximum_jobs=adaptive[1])
                log(f"{cluster}: adaptive, {adaptive[0]} to {adaptive[1]} job(s)")
            return Client(owned), owned
        except BaseException:
            owned.close()
            raise
    owned = embedded_gpu_cluster(gpus, profile=profile) if gpus else embedded_cluster(workers or 2, profile=profile)
    try:
        return Client(owned), owned
    except BaseException:
        owned.close()
        raise


def _check_gpu_workers(client, scheduler: str) -> None:
    """A CUDA run's tasks ask for the GPU resource: refuse a scheduler whose workers declare none (they would wait
    forever). Workers that have not joined yet cannot be checked."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    if workers and not any((w.get("resources") or {}).get(GPU_RESOURCE) for w in workers.values()):
        raise ExtractionError(f"--device cuda: none of the {len(workers)} worker(s) of {scheduler} declares a "
                              f"{GPU_RESOURCE} resource; start one worker per GPU with CUDA_VISIBLE_DEVICES=<gpu> "
                              f"dask worker {scheduler} --nthreads 1 --resources {GPU_RESOURCE}=1 (docs/cluster.md)")


class _FrameBar:
    """The driver's progress bar over frames: live counts from the shard tasks' events (ShardProgress), the full
    shard once its task returns. Event handlers run on the client's event-loop thread, hence the lock."""

    def __init__(self, sizes: dict[int, int], enabled: bool):
        from tqdm.auto import tqdm

        self.sizes, self.live, self.finished = sizes, {}, set()
        self.lock = threading.Lock()
        self.bar = tqdm(total=sum(sizes.values()), unit="frame", unit_scale=True, disable=not enabled,
                        desc="extract", dynamic_ncols=True)

    def on_event(self, event) -> None:
        msg = event[1]
        with self.lock:
            shard = msg.get("shard") if isinstance(msg, dict) else None
            if shard in self.sizes and shard not in self.finished:
                self.live[shard] = min(int(msg.get("frames", 0)), self.sizes[shard])  # a retry starts again at 0
                self._show()

    def shard_done(self, result: ShardResult, done: int, todo: int, failed: int) -> None:
        with self.lock:
            self.finished.add(result.shard)
            self.live[result.shard] = self.sizes[result.shard]
            self.bar.set_postfix(shards=f"{done}/{todo}", failed=failed, refresh=False)
            self._show()

    def _show(self) -> None:
        self.bar.n = sum(self.live.values())
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def run_extraction(manifest, cfg: ExtractionConfig, *, workers: int | None = None, scheduler: str | None = None,
                   cluster: str | None = None, cluster_options: dict | None = None, jobs: int | None = None,
                   adaptive: tuple[int, int] | None = None, shard_frames: int = DEFAULT_SHARD_FRAMES,
                   float_shard_frames: int | None = None, progress: bool = True, retries: int = 2,
                   dask_profile: bool = False, manifest_storage_options: dict | None = None,
                   probe_threads: int = PROBE_THREADS, log=print) -> ExtractionReport:
    """Run the whole job on Dask, resumably.

    Where: an embedded cluster (`workers` CPU processes, default 2; with a CUDA cfg.device one process per GPU,
    each pinned to its GPU), a running scheduler (`scheduler`, its workers one per GPU for CUDA), or batch jobs
    (`cluster` slurm/pbs/sge/lsf through dask-jobqueue, `cluster_options` over jobqueue.yaml, `jobs` or
    `adaptive`=(min, max) jobs). Everything is checked before the first shard runs."""
    from dask.distributed import as_completed

    t0 = time.perf_counter()
    gpus = _placement(cfg, workers=workers, scheduler=scheduler, cluster=cluster, jobs=jobs, adaptive=adaptive)
    plan, tasks = prepare(manifest, cfg, shard_frames=shard_frames, float_shard_frames=float_shard_frames,
                          manifest_storage_options=manifest_storage_options, probe_threads=probe_threads,
                          progress=progress)
    store = open_store(cfg.out, mode="r", storage_options=cfg.storage_options or None)
    done = store.completed_shards()
    fdone = [open_store(url, mode="r", storage_options=cfg.storage_options or None).completed_shards()
             for url, _ in cfg.float_targets()]
    retry = shards_with_failures(cfg) if cfg.retry_failed else set()
    todo = [t for t in tasks
            if t[0] not in done or t[0] in retry or any(j not in d for d in fdone for j in (t[2] or []))]
    skipped = len(tasks) - len(todo)
    results: list[ShardResult] = []
    n_workers = None
    if todo:
        cuda = device_type(cfg.device) == "cuda"
        topic = f"ci-store-progress-{uuid.uuid4().hex}" if progress else None
        # inside a worker `cuda` is its own GPU (CUDA_VISIBLE_DEVICES); the store records only the device type
        task_cfg = dataclasses.replace(cfg, device="cuda" if cuda else cfg.device, progress_topic=topic)
        client, owned = _start_cluster(cfg, gpus=gpus, workers=workers, scheduler=scheduler, cluster=cluster,
                                       cluster_options=cluster_options, jobs=jobs, adaptive=adaptive,
                                       profile=dask_profile, log=log)
        bar = None
        try:
            if has_bokeh() and client.dashboard_link:
                log(f"Dask dashboard: {client.dashboard_link}")
            if cuda and scheduler:
                _check_gpu_workers(client, scheduler)
            bar = _FrameBar({i: plan.shards[i].size for i, _, _ in todo}, progress)
            if topic:
                client.subscribe_topic(topic, bar.on_event)
            resources = {GPU_RESOURCE: 1} if cuda else None
            futures = [client.submit(run_shard, task_cfg, i, utts, nested, key=f"ci-shard-{i}-{cfg.out}",
                                     retries=retries, pure=False, resources=resources) for i, utts, nested in todo]
            for fut in as_completed(futures):
                r: ShardResult = fut.result()
                results.append(r)
                bar.shard_done(r, len(results), len(todo), sum(len(x.failures) for x in results))
            n_workers = len(client.scheduler_info(n_workers=-1).get("workers", {}))
        finally:
            if bar is not None:
                bar.close()
            client.close()
            if owned is not None:
                owned.close()
    # format v2: once every shard is complete, one manifest object replaces the listing of done/ and a GET per
    # record for every reader (written after all tasks: the per-shard records stay the truth; same bytes on rerun)
    for url in [cfg.out, *(u for u, _ in cfg.float_targets())]:
        open_store(url, mode="r+", storage_options=cfg.storage_options or None).write_completion_manifest()
    store = open_store(cfg.out, mode="r", storage_options=cfg.storage_options or None)
    float_failures = {url: open_store(url, mode="r", storage_options=cfg.storage_options or None).failures()
                      for url, _ in cfg.float_targets()}
    return ExtractionReport(
        out=cfg.out, num_shards=plan.num_shards, shards_run=len(todo), shards_skipped=skipped,
        frames=sum(r.frames for r in results), seconds=time.perf_counter() - t0,
        seconds_teacher=sum(r.seconds_teacher for r in results), failures=store.failures(),
        provenance=cfg.provenance(), workers=n_workers,
        float_failures={u: f for u, f in float_failures.items() if f})


