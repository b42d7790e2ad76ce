"""Per-shard completion records: small JSON objects at done/shard-NNNNNN.json, written after the shard's data.

A record's existence is what makes a shard complete, so a job killed mid-shard leaves that shard incomplete and
a resumed job rewrites it. Records hold no timestamps or host names: the same labels give byte-identical records,
so an interrupted-then-resumed store equals an uninterrupted one object for object.

Claims (claims/shard-NNNNNN.json) make two writers of one shard safe (a zombie task and its retry, two runs on
one store): a writer creates the claim if absent before it touches the shard object, so only the claimant, or a
writer with byte-identical content, ever writes it. A claim is deleted once the shard's record exists; see
docs/store-format.md#concurrent-writers for the protocol and what it guarantees on each storage.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid

import numpy as np

from .errors import StoreError, name_some
from .format import FORMAT_VERSION, MANIFEST_KEY, SHA256_RE, done_key, shard_key

RECORD_FORMAT = "ci-store-shard"
CLAIM_FORMAT = "ci-store-claim"
CLAIMS_PREFIX = "claims"


def data_sha256(block: np.ndarray) -> str:
    """sha256 of a shard's decoded rows (padding included), little-endian, C order."""
    le = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<"))
    return hashlib.sha256(le.view(np.uint8).reshape(-1)).hexdigest()


def build_record(array: str, shard, capacity: int, failures: dict[str, str], block_sha: str,
                 payload: bytes | None, format_version: int = FORMAT_VERSION) -> dict:
    return {
        "format": RECORD_FORMAT,
        "format_version": format_version,
        "shard": shard.index,
        "start": shard.start,
        "capacity": capacity,
        "frames": shard.size,
        "num_utterances": len(shard.utt_ids),
        "num_failed": len(failures),
        "failures": {k: failures[k] for k in sorted(failures)},
        "data_sha256": block_sha,
        "object_key": shard_key(array, shard.index),
        "object_nbytes": 0 if payload is None else len(payload),
        "object_sha256": None if payload is None else hashlib.sha256(payload).hexdigest(),
    }


def encode_record(record: dict) -> bytes:
    return (json.dumps(record, sort_keys=True, indent=1) + "\n").encode()


def decode_record(data: bytes, shard: int, where: str) -> dict:
    try:
        rec = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"{where}/{done_key(shard)}: completion record is not valid JSON ({e})") from None
    if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT or rec.get("shard") != shard:
        raise StoreError(f"{where}/{done_key(shard)}: not a completion record for shard {shard}")
    if not isinstance(rec.get("failures"), dict):
        raise StoreError(f"{where}/{done_key(shard)}: completion record has no failures map")
    return rec


def shard_from_done_key(key: str) -> int | None:
    name = key.rsplit("/", 1)[-1]
    if name.startswith("shard-") and name.endswith(".json"):
        try:
            return int(name[len("shard-"):-len(".json")])
        except ValueError:
            return None
    return None


def check_record(rec: dict, shard: int, array: str, min_nbytes: int, max_nbytes: int, where: str) -> dict:
    """Check the fields a reader relies on (a record from an untrusted store sizes the shard's reads);
    min/max_nbytes: the smallest and largest possible shard object (its index; every chunk at its worst case)."""
    at = f"{where}/{done_key(shard)}"
    failures = rec["failures"]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in failures.items()):
        raise StoreError(f"{at}: failures must map utterance ids to reason strings")
    n = rec.get("object_nbytes")
    if isinstance(n, bool) or not isinstance(n, int) or not (n == 0 or min_nbytes <= n <= max_nbytes):
        raise StoreError(f"{at}: object_nbytes {n!r} is not a possible shard object size (0, or from "
                         f"{min_nbytes} to {max_nbytes})")
    sha = rec.get("object_sha256")
    if (sha is not None or n) and not (isinstance(sha, str) and SHA256_RE.fullmatch(sha)):
        raise StoreError(f"{at}: object_sha256 {sha!r} is not a sha256 hex digest")
    if not (isinstance(rec.get("data_sha256"), str) and SHA256_RE.fullmatch(rec["data_sha256"])):
        raise StoreError(f"{at}: data_sha256 {rec.get('data_sha256')!r} is not a sha256 hex digest")
    if rec.get("object_key", shard_key(array, shard)) != shard_key(array, shard):
        raise StoreError(f"{at}: object_key {rec.get('object_key')!r} is not {shard_key(array, shard)!r}")
    return rec


# --- completion manifest (format v2) --------------------------------------------------------------------------
MANIFEST_FORMAT = "ci-store-manifest"
MAX_MANIFEST_BYTES = 1 << 30     # decoded manifest a reader accepts


def encode_manifest(records: dict[int, dict], plan_sha256: str, num_shards: int) -> bytes:
    """The manifest of a complete store: every record, in shard order; deterministic bytes (same records, same
    manifest), so writing it again, from any process, changes nothing."""
    from numcodecs import zstd
    body = {"format": MANIFEST_FORMAT, "plan_sha256": plan_sha256, "num_shards": num_shards,
            "records": [records[s] for s in range(num_shards)]}
    return bytes(zstd.Zstd(level=3).encode(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()))


def decode_manifest(blob: bytes, meta: dict, where: str) -> list[dict]:
    """The records of a manifest, checked to belong to this store (plan, shard count) and each a record of its
    shard; StoreError naming the manifest otherwise."""
    from .zstdframe import decompress
    at = f"{where}/{MANIFEST_KEY}"
    raw = decompress(blob, at, limit=MAX_MANIFEST_BYTES)
    try:
        body = json.loads(raw.tobytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise StoreError(f"{at}: completion manifest is not valid JSON ({type(e).__name__})") from None
    if (not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT
            or body.get("plan_sha256") != meta["plan_sha256"] or body.get("num_shards") != meta["num_shards"]
            or not isinstance(body.get("records"), list) or len(body["records"]) != meta["num_shards"]):
        raise StoreError(f"{at}: not the completion manifest of this store (format, plan_sha256 or shard count "
                         f"differ); delete it to fall back to the per-shard records")
    out = []
    for s, rec in enumerate(body["records"]):
        if (not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT or rec.get("shard") != s
                or not isinstance(rec.get("failures"), dict)):
            raise StoreError(f"{at}: entry {s} is not a completion record of shard {s}")
        out.append(rec)
    return out


# --- claims: one writer per shard object ------------------------------------------------------------------------
def claim_key(shard: int) -> str:
    """Object key of a shard's write claim (outside done/ and the label array: v1 readers never look there)."""
    return f"{CLAIMS_PREFIX}/shard-{shard:06d}.json"


def writer_id() -> str:
    """Who holds a claim: host, pid and a random part (so a stale claim tells an operator which job left it)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def build_claim(record: dict, writer: str) -> dict:
    return {"format": CLAIM_FORMAT, "shard": record["shard"], "writer": writer,
            "data_sha256": record["data_sha256"], "object_sha256": record["object_sha256"],
            "object_nbytes": record["object_nbytes"], "failures": record["failures"]}


def decode_claim(data: bytes, shard: int, where: str) -> dict:
    key = f"{where}/{claim_key(shard)}"
    try:
        claim = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"{key}: claim is not valid JSON ({e}); if no writer is running, delete it") from None
    if (not isinstance(claim, dict) or claim.get("format") != CLAIM_FORMAT or claim.get("shard") != shard
            or not isinstance(claim.get("failures"), dict)):
        raise StoreError(f"{key}: not a write claim for shard {shard}; if no writer is running, delete it")
    return claim


def same_labels(a: dict, b: dict) -> bool:
    """Two records (or a claim and a record) hold the same labels: decoded rows and failures equal."""
    return a["data_sha256"] == b["data_sha256"] and a["failures"] == b["failures"]


def same_object(a: dict, b: dict) -> bool:
    """Same labels and byte-identical shard object (a writer may then write the object alongside the other)."""
    return same_labels(a, b) and a["object_sha256"] == b["object_sha256"]


def content_differences(theirs: dict, ours: dict, differing_utterances: list[str] | None = None) -> list[str]:
    """What differs between the content another writer stored or claimed (`theirs`) and ours, for an error."""
    out = []
    ft, fo = theirs["failures"], ours["failures"]
    only_there = sorted(set(ft) - set(fo))
    only_here = sorted(set(fo) - set(ft))
    reason = sorted(u for u in set(ft) & set(fo) if ft[u] != fo[u])
    if only_there:
        out.append(f"failed there, written here: {name_some(only_there, 5)}")
    if only_here:
        out.append(f"written there, failed here: {name_some(only_here, 5)}")
    if reason:
        out.append(f"failure reasons differ for {name_some(reason, 5)}")
    if differing_utterances:
        out.append(f"labels differ for {len(differing_utterances)} utterance(s): {name_some(differing_utterances, 5)}")
    elif theirs["data_sha256"] != ours["data_sha256"] and not (only_there or only_here):
        out.append(f"labels differ (data_sha256 {theirs['data_sha256'][:12]}... there, "
                   f"{ours['data_sha256'][:12]}... here)")
    if not out and theirs.get("object_sha256") != ours.get("object_sha256"):
        out.append("same labels but different shard object bytes (another zstd/numcodecs version?)")
    return out
