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

import time
from dataclasses import dataclass, field

import numpy as np

from ci_store import create, open_store
from ci_store.errors import StoreError
from ci_store.format import DEFAULT_CODES_SHARD_FRAMES as DEFAULT_SHARD_FRAMES
from distill.data.audio import IO_ATTEMPTS, IO_BACKOFF_SECONDS
from distill.data.manifest import Utterance, load_manifest
from distill.extract.cluster import embedded_cluster, has_bokeh, undo_dask_malloc_trim
from distill.extract.planning import (ExtractionError, check_unique_ids, float_layout_frames, frame_counts,
                                      plan_stores, probe_all)
from distill.extract.shard_task import ShardResult, run_shard_task, shards_with_failures
from distill.teachers import load_teacher

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
    device: str = "cpu"
    teacher_kind: str | None = None  # load_teacher(kind=): None detects the format from the files
    short_input: str | None = None  # Whisper teachers: mode for inputs under 30 s (None: the teacher's default)
    batch_seconds: float | None = None  # teacher batches of up to this much padded audio, sorted by length;
    #                                     None: one utterance per forward (bit-reproducible; batches are not)
    prefetch: int = 8  # utterances read and decoded ahead of the teacher on a background thread (0: inline)
    checkpoint_frames: int = DEFAULT_CHECKPOINT_FRAMES  # codes checkpoint interval without float labels
    io_attempts: int = IO_ATTEMPTS  # reads of an utterance's audio on transient storage faults
    io_backoff_seconds: float = IO_BACKOFF_SECONDS  # first retry's delay ceiling (doubles; full jitter)
    retry_failed: bool = False  # also redo the failed utterances of complete shards (`extract --retry-failed`)

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

    @property
    def ok(self) -> bool:
        return not self.failures and not any(self.float_failures.values())

    @property
    def num_failed(self) -> int:
        """Utterances failed in the CI store or in any float-label store."""
        return len(set(self.failures).union(*self.float_failures.values()))

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
    key = (cfg.teacher, cfg.layer, cfg.quantizer, cfg.device, cfg.teacher_kind, cfg.short_input)
    if key not in _MODELS:
        teacher = load_teacher(cfg.teacher, layer=cfg.layer, device=cfg.device,
                               storage_options=cfg.storage_options or None, kind=cfg.teacher_kind,
                               short_input=cfg.short_input)
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


def _teacher_meta(teacher) -> dict:
    meta = {"name": teacher.name, "checkpoint_sha256": teacher.checkpoint_sha256, "layer": teacher.layer,
            "sample_rate": teacher.sample_rate, "dim": teacher.dim}
    if getattr(teacher, "kind", None):  # Whisper teachers: format, size and how short inputs were run
        full = teacher.metadata()
        meta.update({k: full[k] for k in ("kind", "size", "num_layers", "short_input", "window_seconds")})
    return meta


def prepare(manifest, cfg: ExtractionConfig, *, shard_frames: int = DEFAULT_SHARD_FRAMES,
            float_shard_frames: int | None = None, manifest_storage_options: dict | None = None):
    """Validate inputs, plan the layout and create (or reopen, for resume) the output stores."""
    from distill.codec.quantizer import MultiCodebookQuantizer

    utts = load_manifest(manifest, storage_options=manifest_storage_options) if isinstance(manifest, str) \
        else list(manifest)
    if not utts:
        raise ExtractionError(f"manifest {manifest!r} has no utterances")
    check_unique_ids(utts)
    utts = probe_all(utts, manifest_storage_options)
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
    meta = _teacher_meta(teacher)
    qstate = {"id": quantizer.quantizer_id, "config": quantizer.config, "arrays": quantizer.to_arrays()}
    so = cfg.storage_options or None
    url = cfg.out
    try:
        create(url, plan, kind="codes", num_codebooks=quantizer.num_codebooks,
               codebook_size=quantizer.codebook_size, frame_rate=teacher.frame_rate, teacher=meta,
               quantizer=qstate, storage_options=so, exist_ok=True)
        for url, dtype in floats:
            create(url, fplan, kind="float", dim=teacher.dim, dtype=dtype, frame_rate=teacher.frame_rate,
                   teacher=meta, storage_options=so, exist_ok=True)
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


def run_extraction(manifest, cfg: ExtractionConfig, *, workers: int = 2, scheduler: str | None = None,
                   shard_frames: int = DEFAULT_SHARD_FRAMES, float_shard_frames: int | None = None,
                   progress: bool = True, retries: int = 2, dask_profile: bool = False,
                   log=print) -> ExtractionReport:
    """Run the whole job on Dask (embedded LocalCluster unless `scheduler` names a running one)."""
    from dask.distributed import Client, as_completed
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    plan, tasks = prepare(manifest, cfg, shard_frames=shard_frames, float_shard_frames=float_shard_frames)
    store = open_store(cfg.out, mode="r", storage_options=cfg.storage_options or None)
    done = store.completed_shards()
    fdone = [open_store(url, mode="r", storage_options=cfg.storage_options or None).completed_shards()
             for url, _ in cfg.float_targets()]
    retry = shards_with_failures(cfg) if cfg.retry_failed else set()
    todo = [t for t in tasks
            if t[0] not in done or t[0] in retry or any(j not in d for d in fdone for j in (t[2] or []))]
    skipped = len(tasks) - len(todo)
    results: list[ShardResult] = []
    if todo:
        cluster = None
        if scheduler:
            client = Client(scheduler)
        else:
            cluster = embedded_cluster(workers, profile=dask_profile)
            client = Client(cluster)
        try:
            if has_bokeh() and client.dashboard_link:
                log(f"Dask dashboard: {client.dashboard_link}")
            frames_todo = sum(plan.shards[i].size for i, _, _ in todo)
            futures = [client.submit(run_shard, cfg, i, utts, nested, key=f"ci-shard-{i}-{cfg.out}",
                                     retries=retries, pure=False) for i, utts, nested in todo]
            bar = tqdm(total=frames_todo, unit="frame", unit_scale=True, disable=not progress,
                       desc="extract", dynamic_ncols=True)
            for fut in as_completed(futures):
                r: ShardResult = fut.result()
                results.append(r)
                bar.update(plan.shards[r.shard].size)
                bar.set_postfix(shards=f"{len(results)}/{len(todo)}", failed=sum(len(x.failures) for x in results))
            bar.close()
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    store = open_store(cfg.out, mode="r", storage_options=cfg.storage_options or None)
    float_failures = {url: open_store(url, mode="r", storage_options=cfg.storage_options or None).failures()
                      for url, _ in cfg.float_targets()}
    return ExtractionReport(
        out=cfg.out, num_shards=plan.num_shards, shards_run=len(todo), shards_skipped=skipped,
        frames=sum(r.frames for r in results), seconds=time.perf_counter() - t0,
        seconds_teacher=sum(r.seconds_teacher for r in results), failures=store.failures(),
        float_failures={u: f for u, f in float_failures.items() if f})


