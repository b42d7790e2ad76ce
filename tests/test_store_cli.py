"""`ci-store inspect | verify | compare` through click's CliRunner, on local and S3 stores."""
import json
import os

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner

from ci_store import create, plan_shards
from ci_store.format import done_key, shard_key
from cli.main import main

NCB, DIM = 8, 32


@pytest.fixture
def stores(tmp_path):
    """The same utterances as CI codes (with a quantizer of dim 32), float16 and float32 labels."""
    rng = np.random.default_rng(0)
    utts = [(f"u{i:03d}", int(rng.integers(20, 120))) for i in range(30)]
    emb = {u: rng.standard_normal((n, DIM)).astype(np.float32) for u, n in utts}
    codes = {u: rng.integers(0, 256, (n, NCB)).astype(np.uint8) for u, n in utts}
    codes[utts[0][0]][:, 0] = 7                             # codebook 0 less used -> lower entropy
    q = {"id": "mvq-test", "config": {"dim": DIM, "num_codebooks": NCB, "codebook_size": 256},
         "arrays": {"codebooks": rng.standard_normal((NCB, 256, DIM // NCB)).astype(np.float32)}}
    paths = {}
    for name, kw, data in (("ci", dict(num_codebooks=NCB, quantizer=q), codes),
                           ("f16", dict(kind="float", dim=DIM, dtype="float16"), emb),
                           ("f32", dict(kind="float", dim=DIM, dtype="float32"), emb)):
        plan = plan_shards(utts, 1024)
        st = create(str(tmp_path / name), plan, frame_rate=50.0,
                    teacher={"name": "toy", "checkpoint_sha256": "0" * 64, "layer": 3}, **kw)
        fails = {utts[-1][0]: "audio unreadable"} if name == "ci" else {}
        for sh in plan.shards:
            st.write_shard(sh.index, {u: data[u] for u in sh.utt_ids if u not in fails},
                           failures={u: r for u, r in fails.items() if u in sh.utt_ids})
        paths[name] = st.url
    return paths, utts


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_inspect_text_and_json(stores):
    paths, utts = stores
    r = run("inspect", paths["ci"])
    assert r.exit_code == 0, r.output
    frames = sum(n for _, n in utts)
    assert f"utterances     {len(utts)}" in r.output and f"frames         {frames}" in r.output
    assert "failures       1" in r.output and "mvq-test" in r.output and "layer=3" in r.output
    r = run("inspect", paths["ci"], "--json")
    s = json.loads(r.output)
    assert s["utterances"] == len(utts) and s["frames"] == frames and s["failures"] == 1
    assert s["hours"] == pytest.approx(frames / 50.0 / 3600)
    assert s["shards_complete"] == s["shards_total"] == plan_shards(utts, 1024).num_shards > 1
    assert s["bytes"] == sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(paths["ci"]) for f in fs)
    assert s["bytes_per_frame"] == pytest.approx(s["bytes"] / frames)
    ent = s["codebook_entropy_bits"]
    assert len(ent) == NCB and all(0 < e <= 8 for e in ent) and ent[0] < min(ent[1:])
    assert s["quantizer"]["config"]["dim"] == DIM and s["dim"] == DIM
    f = json.loads(run("inspect", paths["f16"], "--json").output)
    assert f["kind"] == "float" and f["dtype"] == "float16" and "codebook_entropy_bits" not in f


def test_verify_ok_and_failures(stores):
    paths, _ = stores
    r = run("verify", paths["ci"])
    assert r.exit_code == 0 and "OK" in r.output
    obj = os.path.join(paths["f32"], shard_key("embeddings", 1))
    raw = bytearray(open(obj, "rb").read())
    raw[100] ^= 0xFF
    open(obj, "wb").write(bytes(raw))
    os.remove(os.path.join(paths["ci"], done_key(0)))
    r = run("verify", paths["f32"])
    assert r.exit_code == 1 and "shard 1" in r.output
    r = run("verify", paths["ci"], "--json")
    out = json.loads(r.output)
    assert r.exit_code == 1 and not out["ok"] and any("not complete: 0" in p for p in out["problems"])
    r = run("verify", str(os.path.dirname(paths["ci"])) + "/nothing-here")
    assert r.exit_code == 1


def test_compare_table_and_json(stores):
    paths, utts = stores
    r = run("compare", paths["ci"], paths["f16"], paths["f32"], "--json")
    assert r.exit_code == 0, r.output
    rows = {os.path.basename(x["url"]): x for x in json.loads(r.output)}
    frames = sum(n for _, n in utts)
    for name, row in rows.items():
        assert row["frames"] == frames and row["same_utterances"]
        assert row["float32_bytes"] == frames * DIM * 4
        assert row["ratio_vs_float32"] == pytest.approx(frames * DIM * 4 / row["bytes"])
    assert rows["ci"]["bytes"] < rows["f16"]["bytes"] < rows["f32"]["bytes"]
    # the quantizer inside the CI store is counted, and also reported apart as a fixed cost
    qdir = os.path.join(paths["ci"], "quantizer")
    qbytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(qdir) for f in fs)
    assert rows["ci"]["quantizer_bytes"] == qbytes > 0 and rows["f16"]["quantizer_bytes"] == 0
    assert rows["ci"]["label_bytes"] == rows["ci"]["bytes"] - qbytes
    assert rows["ci"]["label_ratio_vs_float32"] == pytest.approx(frames * DIM * 4 / (rows["ci"]["bytes"] - qbytes))
    r = run("compare", paths["ci"], paths["f32"])
    assert r.exit_code == 0 and "CI 8xuint8" in r.output and "float32" in r.output


def test_compare_needs_dim_for_codes_without_quantizer(tmp_path):
    utts = [("a", 10), ("b", 20)]
    st = create(str(tmp_path / "c"), plan_shards(utts, 64), num_codebooks=4, frame_rate=50.0)
    for sh in st.plan.shards:
        st.write_shard(sh.index, {u: np.zeros((n, 4), np.uint8) + 1 for u, n in zip(sh.utt_ids, sh.num_frames)})
    rows = json.loads(run("compare", st.url, "--json").output)
    assert rows[0]["ratio_vs_float32"] is None
    rows = json.loads(run("compare", st.url, "--json", "--dim", "1024").output)
    assert rows[0]["float32_bytes"] == 30 * 1024 * 4


def test_cli_on_s3_with_storage_options(s3_bucket):
    url, opts = s3_bucket
    utts = [(f"u{i}", 40) for i in range(6)]
    st = create(f"{url}/ci", plan_shards(utts, 128), num_codebooks=4, frame_rate=50.0, storage_options=opts)
    for sh in st.plan.shards:
        st.write_shard(sh.index, {u: np.full((40, 4), i, np.uint8) for i, u in enumerate(sh.utt_ids)})
    so = json.dumps(opts)
    r = run("verify", st.url, "--storage-options", so)
    assert r.exit_code == 0, r.output
    s = json.loads(run("inspect", st.url, "--json", "--storage-options", so).output)
    fs = fsspec.filesystem("s3", **opts)
    fs.invalidate_cache()
    assert s["frames"] == 240 and s["bytes"] == fs.du(st.url) > 0  # every object of the store, on S3
    r = run("inspect", st.url, "--storage-options", "{not json")
    assert r.exit_code != 0 and "not valid JSON" in r.output
