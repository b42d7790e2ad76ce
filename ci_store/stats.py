"""Numbers about a store for people: size on storage, bytes per frame, hours of audio, codebook usage."""
from __future__ import annotations

import numpy as np

from .quantizer import read_quantizer
from .store import CIStore


def storage_bytes(st: CIStore) -> int:
    return st._handle().objects.total_size()


def quantizer_bytes(st: CIStore) -> int:
    """Bytes of the quantizer stored inside the store: a fixed cost (dim x codebooks x 256 floats), not per frame."""
    objects = st._handle().objects
    if objects.local:
        import os

        root = os.path.join(objects.url, "quantizer")
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    return sum(objects.getsize(k) for k in objects.list_prefix("quantizer/"))


def codebook_entropy(st: CIStore, max_frames: int = 100_000, seed: int = 0) -> list[float] | None:
    """Usage entropy (bits) of each codebook over up to max_frames frames of randomly chosen utterances.

    log2(codebook_size) means every entry is used equally; much lower means a wasted codebook. None when the
    store holds no complete, non-failed utterance.
    """
    if st.kind != "codes":
        return None
    done = st.completed_shards()
    failures = st.failures()
    idx = st.index
    rng = np.random.default_rng(seed)
    picked, frames = [], 0
    if st.format_version >= 2:      # sample positions: never every id of a corpus-sized store
        tries, seen = 0, set()
        while frames < max_frames and tries < 64 * max(1, max_frames // 100):
            tries += 1
            pos = int(rng.integers(0, len(idx)))
            off, n, s = idx.entry(pos)
            u = idx.id_at(pos)
            if s in done and u not in failures and u not in seen:
                seen.add(u)
                picked.append(u)
                frames += n
    else:
        ok = np.flatnonzero(np.isin(idx.shard, np.fromiter(done, np.int32, len(done))))
        ids = [u for u in idx.ids[ok].tolist() if u not in failures]
        for k in rng.permutation(len(ids)):
            if frames >= max_frames:
                break
            picked.append(ids[k])
            frames += st.num_frames(ids[k])
    if not picked:
        return None
    counts = np.zeros((st.width, st.codebook_size), np.int64)
    for i in range(0, len(picked), 256):
        for a in st.get_many(picked[i:i + 256]):
            for c in range(st.width):
                counts[c] += np.bincount(a[:, c], minlength=st.codebook_size)
    p = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)
    return [round(float(e), 4) for e in ent]


def teacher_dim(st: CIStore, fallback: int | None = None) -> int | None:
    """Width of the float labels the store replaces: meta dim, else the quantizer config's dim, else fallback."""
    if st.dim:
        return int(st.dim)
    q = read_quantizer(st._handle().objects, st.url) if st.kind == "codes" and st.quantizer_id else None
    if q is not None and isinstance(q[0].get("dim"), int):
        return q[0]["dim"]
    return fallback


def summarize(st: CIStore, entropy_frames: int = 100_000, dim: int | None = None) -> dict:
    meta = st.meta
    nbytes = storage_bytes(st)
    frames = meta["total_frames"]
    done = st.completed_shards()
    failures = st.failures()
    d = teacher_dim(st, dim)
    q = read_quantizer(st._handle().objects, st.url)
    out = {
        "url": st.url, "kind": meta["kind"], "dtype": meta["dtype"], "width": meta["width"],
        "num_codebooks": meta.get("num_codebooks"), "codebook_size": meta.get("codebook_size"), "dim": d,
        "utterances": meta["num_utterances"], "frames": frames, "frame_rate": meta["frame_rate"],
        "hours": frames / meta["frame_rate"] / 3600.0, "bytes": nbytes,
        "bytes_per_frame": nbytes / frames if frames else None,
        "shards_complete": len(done), "shards_total": meta["num_shards"], "shard_frames": meta["shard_frames"],
        "chunk_frames": meta["chunk_frames"], "compressor": meta["compressor"],
        "failures": len(failures), "teacher": meta.get("teacher"),
        "quantizer": None if q is None else {"id": meta.get("quantizer_id"), "sha256": meta.get("quantizer_sha256"),
                                             "config": q[0], "arrays": {k: list(v.shape) for k, v in q[1].items()}},
        "format_version": meta["format_version"], "created_by": meta.get("created_by"), "extra": meta.get("extra"),
    }
    if d:
        out["float32_bytes"] = frames * d * 4
        out["ratio_vs_float32"] = out["float32_bytes"] / nbytes if nbytes else None
    if meta["kind"] == "codes":
        out["codebook_entropy_bits"] = codebook_entropy(st, entropy_frames) if entropy_frames > 0 else None
        out["max_entropy_bits"] = float(np.log2(meta["codebook_size"]))
    return out


def compare_rows(stores: list[CIStore], dim: int | None = None) -> list[dict]:
    """One row per store: bytes, bytes/frame and ratio vs float32 labels of the same frames."""
    rows = []
    key = "utterances_sha256" if stores and stores[0].meta.get("utterances_sha256") else "utterances_hash_sha256"
    ref = stores[0].meta.get(key) if stores else None
    for st in stores:
        meta = st.meta
        nbytes = storage_bytes(st)
        qbytes = quantizer_bytes(st)
        frames = meta["total_frames"]
        d = teacher_dim(st, dim)
        f32 = frames * d * 4 if d else None
        label = meta["dtype"] if meta["kind"] == "float" else f"CI {meta['num_codebooks']}x{meta['dtype']}"
        rows.append({"url": st.url, "kind": meta["kind"], "label": label, "utterances": meta["num_utterances"],
                     "frames": frames, "dim": d, "bytes": nbytes, "bytes_per_frame": nbytes / frames,
                     "quantizer_bytes": qbytes, "label_bytes": nbytes - qbytes,
                     "label_bytes_per_frame": (nbytes - qbytes) / frames,
                     "float32_bytes": f32, "ratio_vs_float32": (f32 / nbytes) if f32 and nbytes else None,
                     "label_ratio_vs_float32": (f32 / (nbytes - qbytes)) if f32 and nbytes > qbytes else None,
                     "shards_complete": len(st.completed_shards()), "shards_total": meta["num_shards"],
                     "same_utterances": meta.get(key) == ref if meta.get(key) else None})
    return rows
