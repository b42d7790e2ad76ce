"""Loader throughput benchmark (issue 5): KD label frames/s the student loader delivers vs what training consumes.

    .venv/bin/python bench/loader_throughput.py                     # defaults: ~4-5 min on 2 CPU cores
    .venv/bin/python bench/loader_throughput.py --utterances 500 --case-seconds 5 --json /tmp/l.json
    .venv/bin/python bench/loader_throughput.py --samplers           # only the sampler comparison (issue 17)

Data: a CI store of --utterances synthetic utterances (uniform 2-15 s) plus the utterances of a small real
espeak-ng corpus (distill.synth.corpus.make_corpus), 16 codebooks x 256, 50 Hz, random (incompressible) codes, frame
counts of the project's native teacher for each utterance's exact sample count. Written once locally and once to a
loopback moto S3 server started here (s3fs, region eu-west-1, credentials "testing"). Float labels for the HDF5
anchor: float32 [T, --dim], one dataset per utterance (how icefall-style pipelines keep teacher embeddings).

Cases (label frames = 50 Hz teacher frames delivered in collated batches; loaders run in this process, no
DataLoader workers, i.e. the rate of one core):
  labels-only   the label path alone: store read + distill.data.alignment.align_labels + distill.data.dataset.collate
                (features replaced by empty [T, 0] arrays so collate does no feature work), through a torch
                DataLoader with distill.data.sampler.ShardBucketSampler (60 s batches, shard-grouped, shuffled):
                (a) CI store on local disk, (b) CI store on loopback S3, (c) float32 labels from HDF5 (h5py),
                plus the same CI cases reading each batch with one CIStore.get_many call.
  full example  distill.data.dataset.KDDataset + make_loader: audio read + fbank + tokens + labels, over the real
                corpus utterances (no feature cache), labels local or on S3.
  training      (d) what the student consumes: distill.student.model.Transducer (default StudentConfig, MVQ KD head,
                kd_stack 2) compute_loss + backward + clip + AdamW step on real collated batches of the corpus,
                torch threads = TrainConfig().threads; label frames consumed per second of step time.
Every case runs one pass (epoch) or until --case-seconds, after a first batch that is timed separately (store
opening, first requests). Ratios are loader rate / training rate; goal >= 20x.

--samplers (issue 17) runs only this: the training batch sampler before and after, on a CI store whose shards were
filled in manifest order of a corpus sorted by speaker like LibriSpeech (--mix-speakers speakers x
--mix-utts-per-speaker utterances, ids speaker-chapter-utterance, durations ~ N(12.3 s, 3.5 s) clipped to 1-35 s,
--mix-shard-frames frames per shard: about ten speakers per shard, as 1<<20-frame shards hold of LibriSpeech at
50 Hz). Samplers: ShardBucketSampler (shuffled, shard-grouped: what the trainer used) and ShardMixSampler (what it
uses now). Per sampler: distinct speakers and shards per batch (mean), share of the padded batch seconds that is
audio, share of epoch-0 batches that recur in epoch 1, byte ranges requested per batch and bytes read per label
byte by one get_many per batch (shard indexes included), and the labels-only loader rate (label frames/s, one
core) reading per utterance and with one get_many per batch, locally and (unless --no-s3) on loopback S3.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cached_corpus, load_line, machine_state, start_moto, table, write_json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

FRAME_RATE = 50.0
SR = 16000


# ------------------------------------------------------------------------------------------- label-only datasets
class CodesLabelsOnly(torch.utils.data.Dataset):
    """The label half of KDDataset.__getitem__ (same store handle, alignment and Example), without audio."""

    def __init__(self, ds, batched: bool = False):
        self.ds = ds
        self.batched = batched
        if batched:
            self.__getitems__ = self._getitems

    def __len__(self):
        return len(self.ds)

    def _example(self, i: int, raw: np.ndarray):
        from distill.data.alignment import align_labels
        from distill.data.dataset import Example, student_frames
        from distill.data.fbank import num_fbank_frames

        utt = self.ds.utts[i]
        nf = num_fbank_frames(self.ds.num_samples(i), SR)
        labels, mask = align_labels(raw, student_frames(nf, self.ds.subsampling), self.ds.k, utt_id=utt.id)
        return Example(utt.id, np.zeros((nf, 0), np.float32), [], labels, mask, "")

    def __getitem__(self, i: int):
        return self._example(i, self.ds.store[self.ds.utts[i].id])

    def _getitems(self, idx: list[int]):
        raws = self.ds.store.get_many([self.ds.utts[i].id for i in idx])
        return [self._example(i, r) for i, r in zip(idx, raws)]


class H5LabelsOnly(torch.utils.data.Dataset):
    """Float labels from an HDF5 file, one dataset per utterance, aligned and collated like the CI path."""

    def __init__(self, path: str, utts, k: int, subsampling: int = 4):
        self.path, self.utts, self.k, self.subsampling = path, list(utts), k, subsampling
        self._f = None

    def __len__(self):
        return len(self.utts)

    def __getitem__(self, i: int):
        import h5py

        from distill.data.alignment import align_labels
        from distill.data.dataset import Example, student_frames
        from distill.data.fbank import num_fbank_frames

        if self._f is None:
            self._f = h5py.File(self.path, "r")
        utt = self.utts[i]
        raw = self._f[utt.id][()]
        nf = num_fbank_frames(utt.num_samples_at(SR), SR)
        labels, mask = align_labels(raw, student_frames(nf, self.subsampling), self.k, utt_id=utt.id)
        return Example(utt.id, np.zeros((nf, 0), np.float32), [], labels, mask, "")


# ------------------------------------------------------------------------------------------- data
def teacher_frames(num_samples: int) -> int:
    """Frames of the project's native teacher for this many 16 kHz samples (what extraction would store)."""
    from distill.teachers.native import num_mel_frames

    t = num_mel_frames(num_samples, SR) - 2
    return 0 if t < 3 else (t - 3) // 2 + 1


def synthetic_utterances(n: int, lo: float, hi: float, seed: int):
    from distill.data.manifest import Utterance

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ns = int(rng.uniform(lo, hi) * SR)
        out.append(Utterance(id=f"syn-{i:06d}", audio=f"/nonexistent/syn-{i:06d}.flac", sample_rate=SR,
                             num_samples=ns, duration=ns / SR, text=""))
    return out


def write_ci_store(url: str, utts, codebooks: int, seed: int, storage_options=None) -> tuple[float, int]:
    from ci_store import create, plan_shards

    counts = [(u.id, teacher_frames(u.num_samples_at(SR))) for u in utts]
    plan = plan_shards(counts, 1 << 20)
    store = create(url, plan, kind="codes", num_codebooks=codebooks, codebook_size=256, frame_rate=FRAME_RATE,
                   storage_options=storage_options)
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    for sh in plan.shards:
        store.write_shard(sh.index, {u: rng.integers(0, 256, (n, codebooks), dtype=np.uint8)
                                     for u, n in zip(sh.utt_ids, sh.num_frames)})
    return time.perf_counter() - t, plan.num_shards


def write_h5(path: str, utts, dim: int, seed: int) -> float:
    import h5py

    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    with h5py.File(path, "w") as f:
        for u in utts:
            f.create_dataset(u.id, data=rng.standard_normal((teacher_frames(u.num_samples_at(SR)), dim),
                                                            dtype=np.float32))
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------- measurement
def label_frames(batch) -> int:
    return int(batch["label_mask"].sum())


def time_loader(loader, budget_s: float) -> dict:
    """First batch timed alone; then batches until the epoch ends or budget_s passes."""
    it = iter(loader)
    t0 = time.perf_counter()
    first = next(it)
    t_first = time.perf_counter() - t0
    frames = batches = utts = 0
    t1 = time.perf_counter()
    for batch in it:
        frames += label_frames(batch)
        utts += len(batch["ids"])
        batches += 1
        if time.perf_counter() - t1 > budget_s:
            break
    dt = time.perf_counter() - t1
    if batches == 0:  # a one-batch epoch: fall back to the first batch
        frames, utts, batches, dt = label_frames(first), len(first["ids"]), 1, t_first
    return {"label_frames": frames, "utterances": utts, "batches": batches, "seconds": dt,
            "first_batch_s": t_first, "label_frames_per_s": frames / dt, "utterances_per_s": utts / dt}


def make_dl(dataset, durations, shards, max_seconds, seed=0):
    from distill.data.dataset import collate
    from distill.data.sampler import ShardBucketSampler

    sampler = ShardBucketSampler(durations, shards, max_seconds=max_seconds, shuffle=True, seed=seed)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0)


def training_rate(batches, student_cfg: dict, threads: int, budget_s: float, max_steps: int) -> dict:
    from distill.student.model import StudentConfig, Transducer
    from distill.student.trainer import TrainConfig

    tc = TrainConfig()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Transducer(StudentConfig(**student_cfg))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=1e-3)

    def step(batch):
        total, _ = model.compute_loss(batch, kd_scale=tc.kd_scale)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()

    t = time.perf_counter()
    step(batches[0])  # warm-up (allocator, first-call overheads)
    warm = time.perf_counter() - t
    frames = steps = 0
    audio_s = 0.0
    t0 = time.perf_counter()
    for i in range(1, len(batches) * 100):
        b = batches[i % len(batches)]
        step(b)
        frames += label_frames(b)
        audio_s += float(b["feat_lens"].sum()) / 100.0
        steps += 1
        if time.perf_counter() - t0 > budget_s or steps >= max_steps:
            break
    dt = time.perf_counter() - t0
    return {"steps": steps, "seconds": dt, "warmup_step_s": warm, "label_frames": frames,
            "label_frames_per_s": frames / dt, "audio_seconds_per_s": audio_s / dt, "threads": threads,
            "params": model.num_params(), "student_config": model.cfg.to_dict()}


# ------------------------------------------------------------------------------------------- samplers (issue 17)
def librispeech_like(speakers: int, per_speaker: int, seed: int):
    """Utterances sorted by speaker, then chapter, then number (LibriSpeech's manifest order), with speaker ids."""
    from distill.data.manifest import Utterance

    rng = np.random.default_rng(seed)
    out = []
    for s in range(speakers):
        spk = 100 + 37 * s
        for j in range(per_speaker):
            chapter = 1000 + 7 * s + j // max(1, per_speaker // 2)
            ns = int(np.clip(rng.normal(12.3, 3.5), 1.0, 35.0) * SR)
            uid = f"{spk}-{chapter}-{j:04d}"
            out.append(Utterance(id=uid, audio=f"/nonexistent/{uid}.flac", sample_rate=SR, num_samples=ns,
                                 duration=ns / SR, text="", speaker=str(spk)))
    return out


def batch_stats(batches, durations, speakers, shards, other_epoch) -> dict:
    same = {frozenset(b) for b in batches} & {frozenset(b) for b in other_epoch}
    padded = sum(float(durations[b].max()) * len(b) for b in batches)
    return {"batches": len(batches), "utterances_per_batch": float(np.mean([len(b) for b in batches])),
            "speakers_per_batch": float(np.mean([len(set(speakers[b].tolist())) for b in batches])),
            "shards_per_batch": float(np.mean([len(set(shards[b].tolist())) for b in batches])),
            "max_shards_per_batch": int(max(len(set(shards[b].tolist())) for b in batches)),
            "audio_share_of_padded": float(durations.sum() / padded),
            "batches_recurring_next_epoch": len(same) / len(batches)}


class _CountingObjects:
    """The reader's object store, counting the byte ranges and bytes that get_many requests (no behaviour change)."""

    def __init__(self, inner):
        self.inner, self.ranges, self.nbytes = inner, 0, 0

    def get_ranges(self, ranges):
        out = self.inner.get_ranges(ranges)
        self.ranges += len(ranges)
        self.nbytes += sum(len(b) for b in out if b is not None)
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def read_requests(url: str, utts, batches) -> dict:
    """Byte-range requests and bytes one get_many per batch issues over an epoch (shard indexes included)."""
    from ci_store import open_store

    store = open_store(url)
    reader = store._handle().reader
    counter = reader.objects = _CountingObjects(reader.objects)
    needed = 0
    for b in batches:
        needed += sum(a.nbytes for a in store.get_many([utts[i].id for i in b]))
    return {"ranges_per_batch": counter.ranges / len(batches), "bytes_read_per_label_byte": counter.nbytes / needed}


class _Epoch0(torch.utils.data.Sampler):
    """A fixed list of batches (one epoch of a sampler), so every loader case reads the same batches."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter([list(b) for b in self.batches])

    def __len__(self):
        return len(self.batches)


def sampler_comparison(args) -> dict:
    from distill.data.dataset import KDDataset, collate
    from distill.data.sampler import ShardBucketSampler, ShardMixSampler
    from distill.data.tokenizer import CharTokenizer

    torch.set_num_threads(1)
    os.makedirs(args.workdir, exist_ok=True)
    print(f"# training batch samplers before/after issue 17  ({load_line()} at start)")
    utts = librispeech_like(args.mix_speakers, args.mix_utts_per_speaker, args.seed)
    url = os.path.join(args.workdir, "ci-librispeech-order.zarr")
    if os.path.exists(url):
        shutil.rmtree(url)
    frames = [(u.id, teacher_frames(u.num_samples_at(SR))) for u in utts]
    from ci_store import create, plan_shards

    plan = plan_shards(frames, args.mix_shard_frames)

    def write(u, so=None):
        store = create(u, plan, kind="codes", num_codebooks=args.codebooks, codebook_size=256,
                       frame_rate=FRAME_RATE, storage_options=so)
        rng = np.random.default_rng(args.seed)
        for sh in plan.shards:
            store.write_shard(sh.index, {i: rng.integers(0, 256, (n, args.codebooks), dtype=np.uint8)
                                         for i, n in zip(sh.utt_ids, sh.num_frames)})

    write(url)
    targets = {"local": (url, None)}
    server = None
    if not args.no_s3:
        server, opts = start_moto()
        write("s3://bench/ci-librispeech-order.zarr", opts)
        targets["loopback S3"] = ("s3://bench/ci-librispeech-order.zarr", opts)
    tok = CharTokenizer.build(["a"])
    ds = KDDataset(utts, tok, labels=url)
    durations, shards = ds.durations(), ds.shard_of()
    speakers = np.array([int(u.speaker) for u in ds.utts])
    hours = durations.sum() / 3600
    print(f"corpus: {len(utts)} utterances, {args.mix_speakers} speakers x {args.mix_utts_per_speaker}, {hours:.1f} h; "
          f"store: {plan.num_shards} shards of <= {args.mix_shard_frames:,} frames in manifest order "
          f"({len(utts) / plan.num_shards / args.mix_utts_per_speaker:.1f} speakers per shard), "
          f"{args.codebooks} codebooks; batches of {args.max_seconds:g} s; loader: num_workers=0, 1 thread")
    samplers = {
        "ShardBucketSampler (before)": ShardBucketSampler(durations, shards, max_seconds=args.max_seconds,
                                                          shuffle=True, seed=args.seed),
        f"ShardMixSampler G={args.shards_per_window} (after)": ShardMixSampler(
            durations, shards, max_seconds=args.max_seconds, shards_per_window=args.shards_per_window,
            seed=args.seed),
    }
    results = {}
    for name, smp in samplers.items():
        smp.set_epoch(0)
        e0 = [list(b) for b in smp]
        smp.set_epoch(1)
        e1 = [list(b) for b in smp]
        st = batch_stats(e0, durations, speakers, shards, e1)
        st.update(read_requests(url, ds.utts, e0))
        for where, (u, so) in targets.items():
            lds = KDDataset(utts, tok, labels=u, storage_options=so)
            for batched in (False, True):
                dl = torch.utils.data.DataLoader(CodesLabelsOnly(lds, batched=batched), batch_sampler=_Epoch0(e0),
                                                 collate_fn=collate, num_workers=0)
                r = time_loader(dl, args.case_seconds)
                st[f"{where}, {'get_many per batch' if batched else 'per utterance'}"] = r["label_frames_per_s"]
        results[name] = st
        print(f"  {name}: {st['speakers_per_batch']:.2f} speakers/batch, " + ", ".join(
            f"{k}: {v:,.0f} label fr/s" for k, v in st.items() if k.startswith(tuple(targets))))
    if server is not None:
        server.stop()
    read_cols = [k for k in next(iter(results.values())) if k.startswith(tuple(targets))]
    rows = [[n, r["batches"], f"{r['utterances_per_batch']:.2f}", f"{r['speakers_per_batch']:.2f}",
             f"{r['shards_per_batch']:.2f} (max {r['max_shards_per_batch']})", f"{r['audio_share_of_padded']:.3f}",
             f"{r['batches_recurring_next_epoch']:.2f}", f"{r['ranges_per_batch']:.1f}",
             f"{r['bytes_read_per_label_byte']:.2f}", *[r[c] for c in read_cols]] for n, r in results.items()]
    print(table(["sampler", "batches", "utt/batch", "speakers/batch", "shards/batch", "audio/padded",
                 "recurring", "ranges/batch", "read/needed B", *[f"label fr/s {c}" for c in read_cols]], rows))
    print(f"\n{load_line()} at end")
    out = {"config": {"utterances": len(utts), "speakers": args.mix_speakers, "hours": hours,
                      "shards": plan.num_shards, "shard_frames": args.mix_shard_frames, "codebooks": args.codebooks,
                      "max_seconds": args.max_seconds, "shards_per_window": args.shards_per_window,
                      "case_budget_s": args.case_seconds},
           "samplers": results, "machine_at_end": machine_state()}
    write_json(args.json, out)
    return out


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--utterances", type=int, default=3000, help="synthetic utterances in the CI stores")
    ap.add_argument("--min-s", type=float, default=2.0)
    ap.add_argument("--max-s", type=float, default=15.0)
    ap.add_argument("--codebooks", type=int, default=16)
    ap.add_argument("--audio-minutes", type=float, default=6.0, help="real corpus for the full path + training")
    ap.add_argument("--dim", type=int, default=1024, help="float label dim for the HDF5 anchor")
    ap.add_argument("--h5-utterances", type=int, default=400, help="utterances in the HDF5 file")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="audio seconds per batch (TrainConfig default)")
    ap.add_argument("--case-seconds", type=float, default=15.0, help="time budget per loader case")
    ap.add_argument("--train-seconds", type=float, default=40.0, help="time budget for the training measurement")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--train-threads", default=None,
                    help="comma-separated torch thread counts for training (default: 1 and TrainConfig().threads); "
                         "the fastest is the consumption rate the loader must beat")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--workdir", default="/tmp/ci-store-bench/loader")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--samplers", action="store_true", help="only the sampler comparison (issue 17)")
    ap.add_argument("--mix-speakers", type=int, default=200)
    ap.add_argument("--mix-utts-per-speaker", type=int, default=20)
    ap.add_argument("--mix-shard-frames", type=int, default=1 << 17)
    ap.add_argument("--shards-per-window", type=int, default=4)
    args = ap.parse_args(argv)
    if args.samplers:
        return sampler_comparison(args)

    from distill.data.alignment import stack_factor
    from distill.data.dataset import FBANK_RATE, KDDataset
    from distill.data.loader import make_loader
    from distill.data.sampler import ShardBucketSampler
    from distill.data.manifest import load_manifest
    from distill.data.tokenizer import CharTokenizer
    from distill.student.trainer import TrainConfig

    torch.set_num_threads(1)
    os.makedirs(args.workdir, exist_ok=True)
    state0 = machine_state()
    print(f"# loader throughput benchmark  ({load_line()} at start)")
    manifest, corpus_s = cached_corpus(os.path.join(args.workdir, f"corpus-{args.audio_minutes:g}m-s{args.seed}"),
                                       args.audio_minutes, args.seed)
    real = load_manifest(manifest)
    syn = synthetic_utterances(args.utterances, args.min_s, args.max_s, args.seed)
    every = real + syn
    k = stack_factor(FRAME_RATE, FBANK_RATE / 4)

    local_url = os.path.join(args.workdir, "ci.zarr")
    if os.path.exists(local_url):
        shutil.rmtree(local_url)
    w_local, nshards = write_ci_store(local_url, every, args.codebooks, args.seed)
    total_frames = sum(teacher_frames(u.num_samples_at(SR)) for u in every)
    h5_utts = (real + syn)[: args.h5_utterances]
    h5_path = os.path.join(args.workdir, f"labels-f32-{args.dim}.h5")
    w_h5 = write_h5(h5_path, h5_utts, args.dim, args.seed)
    h5_bytes = os.path.getsize(h5_path)
    server = s3_url = opts = None
    w_s3 = None
    if not args.no_s3:
        server, opts = start_moto()
        s3_url = "s3://bench/ci.zarr"
        w_s3, _ = write_ci_store(s3_url, every, args.codebooks, args.seed, storage_options=opts)

    config = {
        "ci_store": {"utterances": len(every), "real_corpus_utterances": len(real), "synthetic_utterances": len(syn),
                     "synthetic_durations_s": [args.min_s, args.max_s], "label_frames": total_frames,
                     "codebooks": args.codebooks, "codebook_size": 256, "frame_rate": FRAME_RATE,
                     "codes": "uniform random uint8", "shard_frames": 1 << 20, "shards": nshards,
                     "write_seconds_local": round(w_local, 2), "write_seconds_s3": w_s3 and round(w_s3, 2)},
        "hdf5": {"utterances": len(h5_utts), "dim": args.dim, "dtype": "float32", "bytes": h5_bytes,
                 "write_seconds": round(w_h5, 2), "layout": "one dataset per utterance, no compression"},
        "corpus": {"manifest": manifest, "utterances": len(real),
                   "audio_seconds": round(sum(u.num_samples_at(SR) for u in real) / SR, 1)},
        "loader": {"batch_max_seconds": args.max_seconds, "sampler": "ShardBucketSampler(shuffle, shard-grouped)",
                   "num_workers": 0, "torch_threads": 1, "stack_k": k, "case_budget_s": args.case_seconds},
        "s3": "moto ThreadedMotoServer on 127.0.0.1 via s3fs" if not args.no_s3 else None,
        "machine_at_start": state0,
    }
    print(f"CI store: {len(every)} utterances ({len(real)} real + {len(syn)} synthetic {args.min_s:g}-{args.max_s:g}"
          f" s), {total_frames:,} frames x {args.codebooks} codebooks, {nshards} shard(s); written locally in "
          f"{w_local:.1f} s" + (f", to loopback S3 in {w_s3:.1f} s" if w_s3 is not None else ""))
    print(f"HDF5: {len(h5_utts)} utterances float32 x {args.dim}, {h5_bytes / 1e6:.0f} MB, written in {w_h5:.1f} s")
    print(f"loader: torch DataLoader, num_workers=0, 1 torch thread, ShardBucketSampler max_seconds "
          f"{args.max_seconds:g}, stack k={k}; each case one epoch or {args.case_seconds:g} s")

    tok = CharTokenizer.build([u.text or "" for u in real])
    cases: dict[str, dict] = {}

    def label_case(name, url, so, batched):
        ds = KDDataset(every, tok, labels=url, storage_options=so)
        dl = make_dl(CodesLabelsOnly(ds, batched=batched), ds.durations(), ds.shard_of(), args.max_seconds,
                     args.seed)
        cases[name] = {"path": "labels only", **time_loader(dl, args.case_seconds)}
        print(f"  {name}: {cases[name]['label_frames_per_s']:,.0f} label frames/s")

    print("\n## measuring")
    label_case("(a) CI local, per utterance", local_url, None, False)
    label_case("(a') CI local, get_many per batch", local_url, None, True)
    if s3_url:
        label_case("(b) CI loopback S3, per utterance", s3_url, opts, False)
        label_case("(b') CI loopback S3, get_many per batch", s3_url, opts, True)
    h5ds = H5LabelsOnly(h5_path, h5_utts, k)
    durs = np.array([u.num_samples_at(SR) / SR for u in h5_utts])
    cases["(c) HDF5 float32 local"] = {"path": "labels only",
                                       **time_loader(make_dl(h5ds, durs, None, args.max_seconds, args.seed),
                                                     args.case_seconds)}
    print(f"  (c) HDF5 float32 local: {cases['(c) HDF5 float32 local']['label_frames_per_s']:,.0f} label frames/s")

    def shuffled_batches(ds):
        return ShardBucketSampler(ds.durations(), ds.shard_of(), max_seconds=args.max_seconds, shuffle=True,
                                  seed=args.seed)

    def full_case(name, url, so):
        ds = KDDataset(real, tok, labels=url, storage_options=so)
        dl = make_loader(ds, shuffled_batches(ds))
        cases[name] = {"path": "full example", **time_loader(dl, args.case_seconds)}
        print(f"  {name}: {cases[name]['label_frames_per_s']:,.0f} label frames/s")

    full_case("full: audio+fbank+CI local", local_url, None)
    if s3_url:
        full_case("full: audio+fbank+CI loopback S3", s3_url, opts)

    # (d) training consumption on real batches of the corpus (collated once, outside the timing)
    ds = KDDataset(real, tok, labels=local_url)
    batches = list(make_loader(ds, shuffled_batches(ds)))
    student_cfg = {"vocab_size": tok.vocab_size, "kd_type": "mvq", "kd_stack": k, "num_codebooks": args.codebooks,
                   "codebook_size": 256}
    thread_counts = sorted({int(t) for t in args.train_threads.split(",")}) if args.train_threads \
        else sorted({1, TrainConfig().threads})
    trains = {}
    for th in thread_counts:
        trains[th] = training_rate(batches, student_cfg, th, args.train_seconds / len(thread_counts),
                                   args.train_steps)
        print(f"  (d) training, {th} thread(s): {trains[th]['label_frames_per_s']:,.0f} label frames/s "
              f"({trains[th]['steps']} steps, {trains[th]['audio_seconds_per_s']:.1f} s audio/s, "
              f"warm-up step {trains[th]['warmup_step_s']:.1f} s)")
    torch.set_num_threads(1)
    threads = max(trains, key=lambda t: trains[t]["label_frames_per_s"])
    train = trains[threads]

    if server is not None:
        server.stop()

    rate_train = train["label_frames_per_s"]
    print(f"\n## results (label frames/s; training = {rate_train:,.0f} label frames/s, the fastest of "
          f"{thread_counts} threads ({threads}), default StudentConfig + MVQ head, {train['params']:,} params, "
          f"{args.max_seconds:g} s batches)")
    rows = []
    for name, c in cases.items():
        ratio = c["label_frames_per_s"] / rate_train
        c["ratio_vs_training"] = ratio
        c["goal_20x_met"] = ratio >= 20
        rows.append([name, c["path"], c["label_frames_per_s"], c["utterances_per_s"], f"{c['first_batch_s']:.3f}",
                     f"{ratio:,.1f}x", "yes" if ratio >= 20 else "NO"])
    for th, tr in trains.items():
        rows.append([f"(d) training, {th} thread(s)", "compute_loss+backward+step", tr["label_frames_per_s"],
                     float("nan"), f"{tr['warmup_step_s']:.2f}", f"{tr['label_frames_per_s'] / rate_train:.2f}x", ""])
    print(table(["case", "path", "label fr/s", "utt/s", "first batch s", "vs training", ">= 20x"], rows))
    lab = [c for n, c in cases.items() if c["path"] == "labels only"]
    full = [c for n, c in cases.items() if c["path"] == "full example"]
    if full and lab:
        print(f"audio read + fbank dominate the full path: full-example rate {full[0]['label_frames_per_s']:,.0f} vs "
              f"labels-only local {cases['(a) CI local, per utterance']['label_frames_per_s']:,.0f} label frames/s")
    print(f"\n{load_line()} at end")
    out = {"config": config, "cases": cases, "training": {str(t): v for t, v in trains.items()},
           "training_rate_used": {"threads": threads, "label_frames_per_s": rate_train},
           "machine_at_end": machine_state()}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
