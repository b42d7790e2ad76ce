"""Storage benchmark for ci-store: size per frame, write throughput and random-utterance reads, vs float labels.

    .venv/bin/python bench/store_io.py                      # defaults: a few minutes on 2 CPU cores
    .venv/bin/python bench/store_io.py --codes-frames 1000000 --float-frames 20000 --reads 500 --s3-reads 200

Prints (and with --json, writes) five sections:
  1. compressor candidates on codes and float labels (bytes/frame, encode speed) - why format v1 uses zstd;
  2. write throughput of a CI store (validation, encoding, checksums, completion records; local disk);
  3. bytes/frame on storage of a CI store vs float32 / float16 stores of the same utterances, whole stores
     (index, metadata, completion records, shard indexes all included), and the ratio vs float32;
  4. random-utterance reads, local: CI store and float32 stores (one at a time and batched get_many; float32 also
     with the pre-issue-17 layout, zstd:3 in 256-frame chunks) vs the icefall-style anchor, float32 labels in
     HDF5 with one dataset per utterance (h5py); float readers and the anchor take turns every batch;
  5. the same reads over S3 (a moto server on loopback, started here), plus HDF5 read through s3fs.

Codes: by default synthetic "speech-like" codes (see synthetic_codes), or --codes uniform (worst case: random
indexes, incompressible), or --codes-npy FILE with real codes [frames, codebooks] uint8 from a trained quantizer.
Float labels: the shared embedding generator (/work/shared/bench/make_embeddings.py) if present, else Gaussian.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ci_store import create, open_store, plan_shards  # noqa: E402
from ci_store.stats import storage_bytes  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import start_moto  # noqa: E402

SHARED_EMBEDDINGS = "/work/shared/bench/make_embeddings.py"
EARLIER_F32 = "float32 (zstd:3, 256-frame chunks)"     # float store defaults before issue 17 (still format v1)


# --- data ----------------------------------------------------------------------------------------------------------
def utterance_lengths(total_frames: int, mean_frames: int, rng) -> list[int]:
    """Log-normal utterance lengths (LibriSpeech-like spread), clipped to [50, 4 * mean] frames."""
    out, acc = [], 0
    while acc < total_frames:
        n = int(np.clip(rng.lognormal(np.log(mean_frames) - 0.18, 0.6), 50, 4 * mean_frames))
        n = min(n, total_frames - acc) if total_frames - acc >= 50 else n
        out.append(n)
        acc += n
    return out


def synthetic_codes(n: int, num_codebooks: int, rng, codebook_size: int = 256) -> np.ndarray:
    """Speech-like codes: per codebook a skewed usage distribution (Zipf-like, entropy ~7.3-7.9 bits, its own
    permutation of entries) and temporal persistence (the code of the previous frame repeats with probability
    0.5 for codebook 0 falling to 0.05 for the last, as adjacent 20 ms frames of a teacher are similar)."""
    out = np.empty((n, num_codebooks), np.uint8 if codebook_size <= 256 else np.uint16)
    ranks = np.arange(codebook_size)
    for k in range(num_codebooks):
        s = 0.6 + 0.6 * rng.random()
        p = 1.0 / (ranks + 12.0) ** s
        p = p[rng.permutation(codebook_size)]
        p /= p.sum()
        fresh = rng.choice(codebook_size, size=n, p=p)
        repeat_p = 0.5 * (0.1 ** (k / max(1, num_codebooks - 1)))
        rep = rng.random(n) < repeat_p
        rep[0] = False
        src = np.maximum.accumulate(np.where(rep, 0, np.arange(n)))
        out[:, k] = fresh[src]
    return out


def make_codes(kind: str, n: int, num_codebooks: int, rng, npy: str | None) -> np.ndarray:
    if npy:
        codes = np.load(npy, mmap_mode="r")
        if codes.ndim != 2:
            raise SystemExit(f"{npy}: expected [frames, codebooks], got shape {codes.shape}")
        reps = int(np.ceil(n / len(codes)))
        return np.ascontiguousarray(np.concatenate([codes] * reps)[:n], dtype=np.uint8)
    if kind == "uniform":
        return rng.integers(0, 256, (n, num_codebooks), dtype=np.uint8)
    return synthetic_codes(n, num_codebooks, rng)


def make_embeddings(n: int, dim: int, rng) -> tuple[np.ndarray, str]:
    if os.path.exists(SHARED_EMBEDDINGS):
        spec = importlib.util.spec_from_file_location("make_embeddings", SHARED_EMBEDDINGS)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        g = np.random.Generator(np.random.PCG64(1234))
        params = mod.build_params(g, dim)
        return mod.sample(g, params, n, dim), "shared make_embeddings.py generator (seed 1234)"
    return rng.standard_normal((n, dim)).astype(np.float32), "Gaussian N(0,1)"


def split(arr: np.ndarray, lengths: list[int], prefix: str) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for i, n in enumerate(lengths):
        out[f"{prefix}-{i:07d}"] = arr[pos:pos + n]
        pos += n
    return out


# --- sections --------------------------------------------------------------------------------------------------------
def compressor_table(codes_samples: dict[str, np.ndarray], emb: np.ndarray, chunk_codes: int, chunk_float: int):
    from numcodecs import Blosc, Zstd
    cands = [("none", None), ("zstd:1", Zstd(1)), ("zstd:3", Zstd(3)), ("zstd:9", Zstd(9)),
             ("blosc-zstd5 noshuffle", Blosc("zstd", 5, Blosc.NOSHUFFLE)),
             ("blosc-zstd5 bitshuffle", Blosc("zstd", 5, Blosc.BITSHUFFLE)),
             ("blosc-lz4 shuffle", Blosc("lz4", 5, Blosc.SHUFFLE))]
    rows = []

    def measure(name, data, layout, chunk, codec_name, codec):
        n = len(data)
        t, total = time.perf_counter(), 0
        for i in range(0, n - chunk + 1, chunk):
            block = data[i:i + chunk]
            block = np.ascontiguousarray(block.T if layout == "codebook-major" else block)
            total += len(codec.encode(block)) if codec is not None else block.nbytes
        dt = time.perf_counter() - t
        used = (n // chunk) * chunk
        rows.append({"data": name, "layout": layout, "codec": codec_name, "bytes_per_frame": total / used,
                     "encode_MB_s": data[:used].nbytes / dt / 1e6 if codec is not None else None})

    for name, data in codes_samples.items():
        for layout in ("frame-major", "codebook-major"):
            for cname, c in cands:
                measure(name, data, layout, chunk_codes, cname, c)
    for dtype in ("float32", "float16"):
        e = emb.astype(dtype)
        for cname, c in [cands[0], cands[2], ("blosc-zstd5 shuffle", Blosc("zstd", 5, Blosc.SHUFFLE)),
                         cands[5]]:
            measure(f"embeddings {dtype}", e, "frame-major", chunk_float, cname, c)
    return rows


def write_store(url, utt_data, lengths_plan, kind, opts=None, **kw):
    plan = plan_shards(lengths_plan, kw.pop("shard_frames"))
    t = time.perf_counter()
    st = create(url, plan, kind=kind, frame_rate=50.0, storage_options=opts, **kw)
    for sh in plan.shards:
        st.write_shard(sh.index, {u: utt_data[u] for u in sh.utt_ids})
    return st, time.perf_counter() - t


def timed_reads(fn, ids, batch: int | None = None) -> dict:
    frames = 0
    t = time.perf_counter()
    if batch:
        for i in range(0, len(ids), batch):
            frames += sum(len(a) for a in fn(ids[i:i + batch]))
    else:
        for u in ids:
            frames += len(fn(u))
    dt = time.perf_counter() - t
    return {"utterances": len(ids), "seconds": dt, "utt_per_s": len(ids) / dt, "frames_per_s": frames / dt}


def hdf5_write(path: str, utt_data: dict[str, np.ndarray]) -> None:
    import h5py
    with h5py.File(path, "w") as f:
        for u, a in utt_data.items():
            f.create_dataset(u, data=a)


def hdf5_reader(fileobj_or_path):
    import h5py
    f = h5py.File(fileobj_or_path, "r")
    return (lambda u: f[u][()]), f


# --- main -------------------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codes-frames", type=int, default=4_000_000, help="frames in the CI store (write/read)")
    ap.add_argument("--float-frames", type=int, default=60_000, help="frames of float labels (size/read anchors)")
    ap.add_argument("--num-codebooks", type=int, default=16)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--mean-frames", type=int, default=600, help="mean utterance length in frames (12 s at 50 Hz)")
    ap.add_argument("--codes", choices=["synthetic", "uniform"], default="synthetic")
    ap.add_argument("--codes-npy", default=None, help="real codes [frames, codebooks] uint8 to tile instead")
    ap.add_argument("--reads", type=int, default=2000, help="random utterances read locally")
    ap.add_argument("--s3-reads", type=int, default=300, help="random utterances read over loopback S3 (0: skip)")
    ap.add_argument("--s3-frames", type=int, default=1_000_000, help="frames of the CI store written to S3")
    ap.add_argument("--batch", type=int, default=32, help="get_many batch size")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the local float/HDF5 reads")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write all results to this JSON file")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    work = a.workdir or tempfile.mkdtemp(prefix="ci-store-bench-")
    os.makedirs(work, exist_ok=True)
    res = {"args": vars(a)}
    K, D = a.num_codebooks, a.dim
    print(f"# ci-store storage benchmark  (workdir {work}, {os.cpu_count()} CPUs)")

    # data
    lengths = utterance_lengths(a.codes_frames, a.mean_frames, rng)
    codes = make_codes(a.codes, sum(lengths), K, rng, a.codes_npy)
    codes_name = f"real codes from {a.codes_npy}" if a.codes_npy else f"{a.codes} codes"
    code_utts = split(codes, lengths, "c")
    f_lengths = utterance_lengths(a.float_frames, a.mean_frames, rng)
    emb, emb_src = make_embeddings(sum(f_lengths), D, rng)
    emb_utts = split(emb, f_lengths, "f")
    res["data"] = {"codes": codes_name, "embeddings": emb_src, "codes_frames": len(codes),
                   "code_utterances": len(lengths), "float_frames": len(emb), "float_utterances": len(f_lengths)}
    print(f"data: {len(codes)} frames of {codes_name} ({len(lengths)} utterances); {len(emb)} frames of "
          f"{D}-dim embeddings ({emb_src}, {len(f_lengths)} utterances)")

    # 1. compressors
    sample = min(len(codes), 1 << 18)
    samples = {codes_name: codes[:sample]}
    if not a.codes_npy and a.codes != "uniform":
        samples["uniform codes"] = rng.integers(0, 256, (sample, K), dtype=np.uint8)
    rows = compressor_table(samples, emb[:min(len(emb), 16384)], 1024, 256)
    res["compressors"] = rows
    print("\n## 1. compressor candidates (inner chunk: 1024 frames codes / 256 frames float; bytes/frame, "
          "lower is better)")
    print(f"{'data':<26} {'layout':<15} {'codec':<24} {'B/frame':>10} {'encode MB/s':>12}")
    for r in rows:
        sp = f"{r['encode_MB_s']:.0f}" if r["encode_MB_s"] else "-"
        print(f"{r['data']:<26} {r['layout']:<15} {r['codec']:<24} {r['bytes_per_frame']:>10.3f} {sp:>12}")

    # 2 + 3. write a CI store (local), sizes
    ci_url = os.path.join(work, "ci")
    shutil.rmtree(ci_url, ignore_errors=True)
    plan_items = [(u, len(x)) for u, x in code_utts.items()]
    ci, t_write = write_store(ci_url, code_utts, plan_items, "codes", num_codebooks=K, shard_frames=1 << 20,
                              dim=D)
    ci_bytes = storage_bytes(ci)
    res["write"] = {"frames": len(codes), "seconds": t_write, "frames_per_s": len(codes) / t_write,
                    "shards": ci.num_shards}
    print(f"\n## 2. write throughput (local disk, 1 process): {len(codes)} frames in {t_write:.2f} s = "
          f"{len(codes) / t_write / 1e6:.2f} M frames/s ({ci.num_shards} shards of 2^20 frames)")

    f_items = [(u, len(x)) for u, x in emb_utts.items()]
    same = {}
    for name, kw in (("CI", dict(kind="codes", num_codebooks=K, dim=D, shard_frames=1 << 20)),
                     ("float16", dict(kind="float", dim=D, dtype="float16", shard_frames=65536)),
                     ("float32", dict(kind="float", dim=D, dtype="float32", shard_frames=32768)),
                     (EARLIER_F32, dict(kind="float", dim=D, dtype="float32", shard_frames=32768,
                                        compressor="zstd:3", chunk_frames=256))):
        url = os.path.join(work, f"same-{name.split()[0]}{'-earlier' if name == EARLIER_F32 else ''}")
        shutil.rmtree(url, ignore_errors=True)
        if name == "CI":
            src = split(make_codes(a.codes, len(emb), K, rng, a.codes_npy), f_lengths, "f")
        else:
            src = {u: x.astype(kw["dtype"]) for u, x in emb_utts.items()}
        st, _ = write_store(url, src, f_items, kw.pop("kind"), **kw)
        same[name] = (st, storage_bytes(st))
    h5_path = os.path.join(work, "labels_f32.h5")
    hdf5_write(h5_path, emb_utts)
    h5_bytes = os.path.getsize(h5_path)
    raw32 = 4 * D
    sizes = [{"store": f"CI store, {a.codes_frames} frames ({codes_name})", "bytes": ci_bytes,
              "bytes_per_frame": ci_bytes / len(codes)}]
    for name, (st, b) in same.items():
        sizes.append({"store": f"{name} store, {len(emb)} frames", "bytes": b, "bytes_per_frame": b / len(emb)})
    sizes.append({"store": f"HDF5 float32, one dataset/utt, {len(emb)} frames", "bytes": h5_bytes,
                  "bytes_per_frame": h5_bytes / len(emb)})
    for s in sizes:
        s["ratio_vs_raw_float32"] = raw32 / s["bytes_per_frame"]
        s["ratio_vs_float32_zstd_store"] = same[EARLIER_F32][1] / len(emb) / s["bytes_per_frame"]
    res["sizes"] = sizes
    print(f"\n## 3. bytes per frame on storage (everything counted; raw float32 = {raw32} B/frame, "
          f"raw CI = {K} B/frame)")
    print(f"{'store':<58} {'bytes':>13} {'B/frame':>10} {'vs raw f32':>11} {'vs f32 zstd store':>18}")
    for s in sizes:
        print(f"{s['store']:<58} {s['bytes']:>13} {s['bytes_per_frame']:>10.3f} "
              f"{s['ratio_vs_raw_float32']:>10.1f}x {s['ratio_vs_float32_zstd_store']:>17.1f}x")

    # 4. local reads
    ro = open_store(ci_url)
    ids = ro.ids
    pick = [ids[i] for i in rng.integers(0, len(ids), a.reads)]
    ro[pick[0]]
    reads = {"CI store, one utterance per call": timed_reads(ro.__getitem__, pick),
             f"CI store, get_many batches of {a.batch}": timed_reads(ro.get_many, pick, a.batch)}
    f32 = open_store(same["float32"][0].url)
    f32_earlier = open_store(same[EARLIER_F32][0].url)
    fids = f32.ids
    fpick = [fids[i] for i in rng.integers(0, len(fids), max(50, a.reads // 4))]
    h5get, h5f = hdf5_reader(h5_path)
    float_readers = {"float32 store, one per call": (f32.__getitem__, None),
                     f"float32 store, get_many batches of {a.batch}": (f32.get_many, a.batch),
                     "float32 store, earlier defaults, one per call": (f32_earlier.__getitem__, None),
                     "HDF5 float32 (anchor), one per call": (h5get, None),
                     # like get_many, holds a whole batch of arrays at once (fresh memory every batch)
                     f"HDF5 float32, batches of {a.batch} held": (lambda b: [h5get(u) for u in b], a.batch)}
    for fn, _ in float_readers.values():
        fn(fpick[0]) if _ is None else fn(fpick[:1])       # open files, cache the shard index
    # float readers and the anchor take turns every batch of utterances, so that load from other jobs on a shared
    # machine falls on all of them alike; each row is the round with the median rate (its range is printed too)
    rounds: dict[str, list[dict]] = {k: [] for k in float_readers}
    for _ in range(a.rounds):
        parts: dict[str, list[dict]] = {k: [] for k in float_readers}
        for i in range(0, len(fpick), a.batch):
            for k, (fn, batch) in float_readers.items():
                parts[k].append(timed_reads(fn, fpick[i:i + a.batch], batch))
        for k, ps in parts.items():
            n, t = sum(p["utterances"] for p in ps), sum(p["seconds"] for p in ps)
            frames = sum(p["frames_per_s"] * p["seconds"] for p in ps)
            rounds[k].append({"utterances": n, "seconds": t, "utt_per_s": n / t, "frames_per_s": frames / t})
    h5f.close()
    for k, rs in rounds.items():
        rs = sorted(rs, key=lambda r: r["utt_per_s"])
        reads[k] = dict(rs[len(rs) // 2], rounds=[r["utt_per_s"] for r in rounds[k]])
    anchor = reads["HDF5 float32 (anchor), one per call"]
    res["reads_local"] = reads
    print(f"\n## 4. random-utterance reads, local disk (page cache warm); float rows: median of {a.rounds} "
          f"rounds of {len(fpick)} reads, readers taking turns every {a.batch} utterances (range in brackets)")
    print(f"{'reader':<48} {'utt/s':>10} {'frames/s':>12} {'utt/s vs HDF5':>14}")
    for k, r in reads.items():
        spread = (f"  [{min(r['rounds']):.0f}-{max(r['rounds']):.0f}; vs HDF5 per round: "
                  + ", ".join(f"{x / y:.2f}x" for x, y in zip(r["rounds"], anchor["rounds"])) + "]"
                  if "rounds" in r else "")
        print(f"{k:<48} {r['utt_per_s']:>10.0f} {r['frames_per_s']:>12.0f} "
              f"{r['utt_per_s'] / anchor['utt_per_s']:>13.2f}x{spread}")

    # 5. S3
    if a.s3_reads > 0:
        server, opts = start_moto()
        try:
            n = min(a.s3_frames, len(codes))
            sub_len, acc = [], 0
            for x in lengths:
                if acc + x > n:
                    break
                sub_len.append(x)
                acc += x
            sub_items = plan_items[:len(sub_len)]
            s3ci, t_s3w = write_store("s3://bench/ci", code_utts, sub_items, "codes", opts=opts, num_codebooks=K,
                                      shard_frames=1 << 20, dim=D)
            s3ro = open_store("s3://bench/ci", storage_options=opts)
            sids = s3ro.ids
            spick = [sids[i] for i in rng.integers(0, len(sids), a.s3_reads)]
            s3ro[spick[0]]
            s3reads = {"CI store on S3, one utterance per call": timed_reads(s3ro.__getitem__, spick),
                       f"CI store on S3, get_many batches of {a.batch}": timed_reads(s3ro.get_many, spick,
                                                                                     a.batch)}
            import s3fs
            fs = s3fs.S3FileSystem(**opts)
            fs.put(h5_path, "bench/labels_f32.h5")
            fh = fs.open("bench/labels_f32.h5", "rb", block_size=1 << 20, cache_type="readahead")
            h5get, h5f = hdf5_reader(fh)
            hp = fpick[:max(20, a.s3_reads // 10)]
            s3reads["HDF5 float32 on S3 via s3fs, one per call"] = timed_reads(h5get, hp)
            h5f.close()
            res["write_s3"] = {"frames": acc, "seconds": t_s3w, "frames_per_s": acc / t_s3w}
            res["reads_s3"] = s3reads
            print(f"\n## 5. loopback S3 (moto): wrote {acc} CI frames in {t_s3w:.2f} s "
                  f"({acc / t_s3w / 1e6:.2f} M frames/s); random reads:")
            print(f"{'reader':<48} {'utt/s':>10} {'frames/s':>12} {'utt/s vs local HDF5':>20}")
            for k, r in s3reads.items():
                print(f"{k:<48} {r['utt_per_s']:>10.0f} {r['frames_per_s']:>12.0f} "
                      f"{r['utt_per_s'] / anchor['utt_per_s']:>19.2f}x")
        finally:
            server.stop()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
