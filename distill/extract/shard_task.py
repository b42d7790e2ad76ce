"""The shard task of the extraction job: one CI shard (and the float-label shards nested in it), in bounded memory.

What a task does, segment by segment (a segment is one nested float-label shard, or, without float labels,
about `checkpoint_frames` frames of consecutive utterances):
  1. audio is read and decoded on a background thread, `prefetch` utterances ahead of the teacher, with transient
     storage faults retried (distill/data/audio.py) and permanent ones recorded as the utterance's failure;
  2. the teacher embeds one utterance per forward (default: bit-reproducible), or, with `batch_seconds`, batches
     of utterances sorted by length (faster, not bit-reproducible across batch sizes: docs/cluster.md);
  3. frames stay on the teacher's device until the quantizer has turned them into codes (uint8, small); only
     float labels travel to the CPU, cast to their dtype on the device first;
  4. at the end of the segment its float-label shards are written, and the codes of its utterances are
     checkpointed (distill/extract/checkpoints.py).
At the end the CI shard is written and its checkpoints deleted. So a task holds at most one segment of float
labels and up to MAX_BUFFER_FRAMES frames waiting for the quantizer, never a whole shard of float32 frames, and a
pre-empted task loses at most one segment of teacher work: its rerun reuses the checkpoints and complete float
shards.

Failures are per store: a float16 overflow (a teacher value beyond +-65504) fails the utterance in that float16
store only; its codes are computed from float32 frames and stored.

`retry_failed` recomputes only the failed utterances of complete shards and rewrites those shards through
`write_shard(..., replace=True)`; every utterance that had labels keeps its stored bytes.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from ci_store import open_store
from distill.data.audio import AudioError, read_audio
from distill.data.manifest import Utterance
from distill.extract.checkpoints import ShardCheckpoints, store_identity

log = logging.getLogger(__name__)

FLOAT16_MAX = 65504.0
ENCODE_ROWS = 4096  # frames per quantizer call (a multiple of its block rows; codes do not depend on it)
# Frames gathered before encoding, at most (batch_frames above it only costs memory: 32 MiB at 1024 dims here; the
# quantizer's zero-padded last block of each flush wastes < 256 rows, ~1.5% of the encode work)
MAX_BUFFER_FRAMES = 8192
FLOAT16_OVERFLOW = "float16 overflow"  # start of the failure reason a float16 store records for such an utterance


@dataclass
class ShardResult:
    shard: int
    frames: int  # frames the teacher embedded in this call
    utterances: int
    failures: dict  # failures recorded in the CI shard (utterance id -> reason)
    seconds_total: float
    seconds_teacher: float
    skipped: bool = False
    frames_reused: int = 0  # frames whose codes came from checkpoints of an interrupted attempt
    io_retries: int = 0  # transient storage faults retried while reading audio
    retried: int = 0  # utterances recomputed because a complete shard recorded them as failed (retry_failed)
    float_failures: dict = field(default_factory=dict)  # failures recorded only in float-label stores


# ---------------------------------------------------------------------------------------------- teacher side

class ShardProgress:
    """Reports a shard task's frames extracted so far to the driver's progress bar, as a Dask event on
    cfg.progress_topic, at most every `interval` seconds; a no-op outside a Dask worker or without a topic."""

    def __init__(self, topic: str | None, shard: int, interval: float = 0.5):
        self.topic, self.shard, self.interval = topic, shard, interval
        self.frames, self.last, self.worker = 0, 0.0, None
        if topic:
            try:
                from distributed import get_worker

                self.worker = get_worker()
            except (ImportError, ValueError):  # not inside a Dask task
                pass

    def __call__(self, frames: int) -> None:
        """Count `frames` more frames of this shard as extracted."""
        self.frames += int(frames)
        now = time.monotonic()
        if self.worker is not None and now - self.last >= self.interval:
            self.last = now
            self.worker.log_event(self.topic, {"shard": self.shard, "frames": self.frames})


def embed_batch(teacher, waves: list[np.ndarray]) -> list:
    """Teacher frames [T_i, dim] float32 on the teacher's device for each wave: one forward over the padded batch
    (a batch of one is not padded, so its frames cannot depend on other utterances)."""
    import torch

    lens = [int(len(w)) for w in waves]
    with torch.inference_mode():
        if len(waves) == 1:
            x = torch.from_numpy(np.ascontiguousarray(waves[0], dtype=np.float32))[None]
        else:
            x = torch.zeros(len(waves), max(lens), dtype=torch.float32)
            for i, w in enumerate(waves):
                x[i, :lens[i]] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        frames, flen = teacher.embed(x, torch.tensor(lens))
        out = [frames[i, :int(flen[i])] for i in range(len(waves))]
        if len(out) > 1:  # do not keep the whole padded batch alive through one utterance's view
            out = [f.clone() for f in out]
        if frames.is_cuda:  # the teacher's time is measured by the caller
            torch.cuda.synchronize(frames.device)
    return out


def frame_problem(emb, planned: int) -> str | None:
    """Why a teacher output cannot be stored (wrong frame count, NaN/inf), or None."""
    import torch

    if emb.shape[0] != planned:
        return (f"teacher produced {emb.shape[0]} frames, planned {planned} "
                f"(manifest sample count disagrees with the audio?)")
    finite = torch.isfinite(emb).all(dim=1)
    if not bool(finite.all()):
        return f"non-finite teacher embedding (NaN/inf) at frame {int(torch.nonzero(~finite)[0, 0])}"
    return None


class CodeBuffer:
    """Teacher frames waiting for the quantizer, copied into one preallocated [min(batch_frames,
    MAX_BUFFER_FRAMES), dim] tensor on the teacher's device and encoded when it is full (codes do not depend on the
    grouping: the quantizer encodes fixed zero-padded row blocks). Memory: that one buffer, however long the shard;
    codes land in `codes`."""

    def __init__(self, quantizer, batch_frames: int, codes: dict[str, np.ndarray]):
        self.quantizer, self.codes = quantizer, codes
        self.batch_frames = max(1, min(int(batch_frames), MAX_BUFFER_FRAMES))
        self.buf = None
        self.rows = 0
        self.spans: list[tuple[str, int, int]] = []

    def add(self, uid: str, emb) -> None:
        import torch

        n = int(emb.shape[0])
        if n >= self.batch_frames:  # longer than the buffer: encoded on its own
            self._encode(emb, [(uid, 0, n)])
            return
        if self.rows + n > self.batch_frames:
            self.flush()
        if self.buf is None or self.buf.device != emb.device:
            self.buf = torch.empty(self.batch_frames, emb.shape[1], dtype=torch.float32, device=emb.device)
        self.buf[self.rows:self.rows + n] = emb
        self.spans.append((uid, self.rows, n))
        self.rows += n

    def flush(self) -> None:
        if self.rows:
            self._encode(self.buf[:self.rows], self.spans)
        self.rows, self.spans = 0, []

    def _encode(self, frames, spans) -> None:
        """Codes of `frames`, ENCODE_ROWS at a time: the quantizer's input check (torch.isfinite) takes ~1.7x its
        input in temporaries, so one call over a 20,000-frame buffer would add more than the buffer itself."""
        import torch

        q = self.quantizer
        dtype = np.dtype(q.codes_dtype)
        step = max(q.block_rows, ENCODE_ROWS // q.block_rows * q.block_rows)
        small = np.empty((frames.shape[0], q.num_codebooks), dtype=dtype)
        for s in range(0, frames.shape[0], step):
            codes = q.encode_torch(frames[s:s + step])
            small[s:s + step] = codes.to(torch.uint8 if dtype == np.uint8 else torch.int32).cpu().numpy()
        for uid, at, n in spans:
            self.codes[uid] = small[at:at + n]


# ---------------------------------------------------------------------------------------------- float side

@dataclass
class FloatPart:
    """One nested float-label shard of this task in one float store, and what this run must produce for it."""

    store: object
    dtype: str
    index: int
    ids: list[str]
    complete: bool
    recorded_failures: dict  # failures in its completion record (complete shards only)
    need: set  # utterances whose float labels this run computes
    arrays: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)

    def add(self, uid: str, emb) -> None:
        """Keep one utterance's labels in the store's dtype (cast on the teacher's device, then copied to the
        CPU); a float16 overflow becomes this store's failure for the utterance."""
        import torch

        x = emb.to(torch.float16) if self.dtype == "float16" else emb
        if self.dtype == "float16":
            bad = ~torch.isfinite(x).all(dim=1)  # emb is finite: inf after the cast is an overflow
            if bool(bad.any()):
                frame = int(torch.nonzero(bad)[0, 0])
                peak = float(emb[frame].abs().max())
                self.failures[uid] = (f"{FLOAT16_OVERFLOW}: teacher value {peak:.6g} at frame {frame} is beyond "
                                      f"the float16 range (+-{FLOAT16_MAX:.0f}); the codes store keeps this "
                                      f"utterance")
                return
        self.arrays[uid] = x.cpu().numpy()

    def write(self, failed_now: dict[str, str]) -> None:
        """Write the shard (a new one, or a complete one whose failed utterances were recomputed)."""
        for uid in self.need:
            if uid in failed_now and uid not in self.failures:
                self.failures[uid] = failed_now[uid]
        if not self.complete:
            self.store.write_shard(self.index, self.arrays, failures=self.failures)
            return
        if not self.arrays and self.failures == self.recorded_failures:
            return  # nothing recovered, same reasons: the stored shard stays as it is
        arrays = dict(self.store.read_shard(self.index))  # the utterances that had labels keep their bytes
        arrays.update(self.arrays)
        self.store.write_shard(self.index, arrays, failures=self.failures, replace=True)


# ---------------------------------------------------------------------------------------------- the task

def segments_of(shard, nested: list[int] | None, fplan, checkpoint_frames: int) -> list[list[tuple[str, int]]]:
    """The shard's utterances (id, frames) cut into segments: its nested float shards when there are float
    labels, else runs of consecutive utterances of about `checkpoint_frames` frames."""
    utts = list(zip(shard.utt_ids, (int(n) for n in shard.num_frames)))
    if nested:
        segs = [list(zip(fplan.shards[j].utt_ids, (int(n) for n in fplan.shards[j].num_frames))) for j in nested]
        if [u for s in segs for u, _ in s] != list(shard.utt_ids):
            raise RuntimeError(f"float shards {nested} do not tile CI shard {shard.index} in order")
        return segs
    segs, cur, rows = [], [], 0
    for u, n in utts:
        if cur and rows + n > checkpoint_frames:
            segs.append(cur)
            cur, rows = [], 0
        cur.append((u, n))
        rows += n
    return segs + [cur] if cur else segs


def batches_of(ids: list[str], samples: dict[str, int], rate: int, batch_seconds: float | None) -> list[list[str]]:
    """Teacher forwards: one utterance each (batch_seconds None/0), else utterances sorted by length (longest
    first) in batches whose padded size stays within batch_seconds of audio."""
    if not batch_seconds or batch_seconds <= 0:
        return [[u] for u in ids]
    budget = float(batch_seconds) * rate
    out, cur = [], []
    for u in sorted(ids, key=lambda u: (-samples[u], u)):
        width = samples[cur[0]] if cur else samples[u]  # sorted longest first: the first sets the padding
        if cur and (len(cur) + 1) * width > budget:
            out.append(cur)
            cur = []
        cur.append(u)
    return out + [cur] if cur else out


def prefetched(fn: Callable, items: Iterable, depth: int) -> Iterator:
    """fn(item) for each item in order, computed up to `depth` items ahead on one background thread (audio
    decoding overlaps the teacher); depth <= 0 calls fn inline."""
    if depth <= 0:
        for x in items:
            yield fn(x)
        return
    it = iter(items)
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="audio-prefetch") as ex:
        try:
            for x in itertools.islice(it, depth):
                pending.append(ex.submit(fn, x))
            while pending:
                fut = pending.popleft()
                for x in itertools.islice(it, 1):
                    pending.append(ex.submit(fn, x))
                yield fut.result()
        finally:
            for f in pending:
                f.cancel()


def run_shard_task(cfg, shard_index: int, utts: list[Utterance], float_shards: list[int] | None,
                   load_models: Callable) -> ShardResult:
    """Extract one CI shard (module docstring); a no-op if it and its float shards are complete (and, with
    cfg.retry_failed, hold no failures)."""
    import torch

    t0 = time.perf_counter()
    so = cfg.storage_options or None
    store = open_store(cfg.out, mode="r+", storage_options=so)
    sh = store.plan.shards[shard_index]
    retry = bool(getattr(cfg, "retry_failed", False))
    ci_complete = store.is_shard_complete(shard_index)
    ci_recorded = dict(store.shard_record(shard_index)["failures"]) if ci_complete else {}
    ci_need = set(sh.utt_ids) if not ci_complete else (set(ci_recorded) if retry else set())

    parts: dict[int, list[FloatPart]] = {}  # by nested float shard
    fplan = None
    for url, dtype in cfg.float_targets():
        fstore = open_store(url, mode="r+", storage_options=so)
        fplan = fstore.plan
        for j in float_shards or []:
            done = fstore.is_shard_complete(j)
            recorded = dict(fstore.shard_record(j)["failures"]) if done else {}
            ids = list(fplan.shards[j].utt_ids)
            need = set(ids) if not done else (set(recorded) if retry else set())
            parts.setdefault(j, []).append(FloatPart(fstore, dtype, j, ids, done, recorded, need))
    if not ci_need and not any(p.need for ps in parts.values() for p in ps):
        return ShardResult(shard_index, 0, 0, {}, 0.0, 0.0, skipped=True)

    teacher, quantizer = load_models(cfg)
    rate = int(teacher.sample_rate)
    segments = segments_of(sh, float_shards if parts else None, fplan, cfg.checkpoint_frames)
    seg_parts = [parts.get(j, []) for j in float_shards] if parts else [[] for _ in segments]
    meta = store.meta
    ckpt = ShardCheckpoints(cfg.out, so, shard_index, store_identity(meta), meta["dtype"], meta["width"])
    saved = ckpt.load(segments) if not ci_complete else {}

    codes: dict[str, np.ndarray] = {}
    failures: dict[str, str] = {}
    frames_reused = 0
    by_id = {u.id: u for u in utts}
    samples = {u.id: int(u.num_samples_at(rate)) for u in utts}
    work = []  # (segment number, teacher batches, utterances whose codes are needed)
    for k, seg in enumerate(segments):
        ci_ids = {u for u, _ in seg if u in ci_need}
        if k in saved and ci_ids:
            codes.update(saved[k].codes)
            failures.update(saved[k].failures)
            frames_reused += saved[k].frames
            ci_ids = set()
        ids = [u for u, _ in seg if u in ci_ids or any(u in p.need for p in seg_parts[k])]
        work.append((k, batches_of(ids, samples, rate, cfg.batch_seconds), ci_ids))

    io_retries = [0]

    def count_retry(e: AudioError, attempt: int, delay: float) -> None:
        io_retries[0] += 1
        log.warning("%s (attempt %d; retrying in %.2f s)", e, attempt, delay)

    min_samples = max(int(cfg.min_seconds * rate), teacher.min_samples)

    def read(uid: str):
        try:
            return uid, read_audio(by_id[uid], rate, storage_options=so, min_samples=min_samples,
                                   attempts=cfg.io_attempts, backoff=cfg.io_backoff_seconds, on_retry=count_retry)
        except AudioError as e:
            return uid, e

    order = [u for _, batches, _ in work for b in batches for u in b]
    depth = max([cfg.prefetch] + [len(b) for _, bs, _ in work for b in bs]) if cfg.prefetch > 0 else 0
    expected = dict(zip(sh.utt_ids, (int(n) for n in sh.num_frames)))
    t_teacher, frames_done = 0.0, 0
    float_failed: dict[str, str] = {}
    progress = ShardProgress(cfg.progress_topic, shard_index)
    with torch.inference_mode():
        audio = prefetched(read, order, depth)
        buffer = CodeBuffer(quantizer, cfg.batch_frames, codes)
        try:
            for k, batches, ci_ids in work:
                failed_now: dict[str, str] = {}
                for batch in batches:
                    ok = []
                    for expect in batch:
                        uid, wave = next(audio)
                        assert uid == expect, (uid, expect)
                        if isinstance(wave, AudioError):
                            failed_now[uid] = wave.reason
                        else:
                            ok.append((uid, wave))
                    if not ok:
                        continue
                    t1 = time.perf_counter()
                    ok_ids, embs = [u for u, _ in ok], embed_batch(teacher, [w for _, w in ok])
                    t_teacher += time.perf_counter() - t1
                    progress(sum(int(e.shape[0]) for e in embs))
                    ok = []  # the waves are not needed any more
                    for uid, emb in zip(ok_ids, embs):
                        problem = frame_problem(emb, expected[uid])
                        if problem:
                            failed_now[uid] = problem
                            continue
                        frames_done += int(emb.shape[0])
                        if uid in ci_ids:
                            buffer.add(uid, emb)
                        for p in seg_parts[k]:
                            if uid in p.need:
                                p.add(uid, emb)
                buffer.flush()
                failures.update({u: r for u, r in failed_now.items() if u in ci_ids})
                for p in seg_parts[k]:
                    if p.need:
                        p.write(failed_now)
                        float_failed.update({u: r for u, r in p.failures.items() if u not in failures})
                    p.arrays = {}  # written: free the segment's float labels
                if not ci_complete and ci_ids and k < len(segments) - 1:
                    ckpt.save(k, segments[k], codes, {u: failures[u] for u, _ in segments[k] if u in failures})
        finally:
            audio.close()

    retried = len((ci_need if ci_complete else set()).union(
        *(p.need for ps in parts.values() for p in ps if p.complete)))
    if not ci_complete:
        store.write_shard(shard_index, codes, failures=failures)
        ckpt.clear()
    elif ci_need:
        new_failures = {u: failures[u] for u in ci_need if u in failures}
        recovered = {u: codes[u] for u in ci_need if u in codes}
        if recovered or new_failures != ci_recorded:
            arrays = dict(store.read_shard(shard_index))  # the utterances that had codes keep their bytes
            arrays.update(recovered)
            store.write_shard(shard_index, arrays, failures=new_failures, replace=True)
        failures = new_failures
    else:
        failures = ci_recorded
    return ShardResult(shard_index, frames_done, len(utts), failures, time.perf_counter() - t0, t_teacher,
                       frames_reused=frames_reused, io_retries=io_retries[0], retried=retried,
                       float_failures=float_failed)


def shards_with_failures(cfg) -> set[int]:
    """CI shards with a failed utterance in the CI store or in any float-label store (what retry_failed redoes)."""
    so = cfg.storage_options or None
    store = open_store(cfg.out, mode="r", storage_options=so)
    failed = set(store.failures())
    for url, _ in cfg.float_targets():
        failed |= set(open_store(url, mode="r", storage_options=so).failures())
    return {store.shard_of(u) for u in failed}
