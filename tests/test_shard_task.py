"""The shard task (distill/extract/shard_task.py): transient audio faults retried, --retry-failed, float16
overflow, checkpoints of a pre-empted task, batched teacher forwards, prefetching. Real stores, real teachers,
real storage faults (fault_injection.py); results compared byte for byte with fault-free runs."""
import dataclasses
import errno
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ci_store import open_store
from cli.main import main as cli
from distill.codec.quantizer import MultiCodebookQuantizer
from distill.data.audio import read_audio
from distill.data.manifest import load_manifest
from distill.extract import ExtractionConfig, prepare, run_extraction, run_shard
from distill.extract.checkpoints import ShardCheckpoints, store_identity
from distill.extract.shard_task import FLOAT16_OVERFLOW, batches_of, prefetched, segments_of
from distill.teachers import NativeTeacherModel, load_native_model, load_teacher, save_native_teacher
from fault_injection import FlakyFileSystem, register
from test_extract import SHARD, _cfg, _files, corpus, models, reference  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fault_filesystems():
    register()
    FlakyFileSystem.reset()
    yield
    FlakyFileSystem.reset()


def _entries(corpus) -> list[dict]:
    """The corpus's train utterances as plain manifest entries (exact lengths: planning reads no audio)."""
    out = []
    for c in (json.loads(line) for line in gzip.open(corpus["train"], "rt")):
        n = c["recording"]["num_samples"]
        out.append({"id": c["id"], "audio": c["recording"]["sources"][0]["source"], "sample_rate": 16000,
                    "num_samples": n, "duration": n / 16000})
    return out


def _manifest(path, entries, prefix="") -> str:
    Path(path).write_text("".join(json.dumps({**e, "audio": prefix + e["audio"]}) + "\n" for e in entries))
    return str(path)


def _in_process(manifest, cfg, **plan_kw):
    """Every shard task run here, in this process, in plan order (no Dask: fault filesystems stay registered)."""
    _, tasks = prepare(manifest, cfg, shard_frames=plan_kw.pop("shard_frames", SHARD), **plan_kw)
    out = [run_shard(cfg, i, utts, nested) for i, utts, nested in sorted(tasks, key=lambda t: t[0])]
    for url in [cfg.out, *(u for u, _ in cfg.float_targets())]:     # as run_extraction ends (format v2)
        open_store(url, mode="r+").write_completion_manifest()
    return out


# ------------------------------------------------------------------------------------ transient vs permanent

def test_transient_audio_faults_are_retried_and_the_store_is_unchanged(reference, corpus, models, tmp_path):
    entries = _entries(corpus)
    a, b = entries[0]["audio"], entries[3]["audio"]
    FlakyFileSystem.plan(a, ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
                         TimeoutError("read timed out"))
    FlakyFileSystem.plan(b, (ConnectionResetError(errno.ECONNRESET, "reset mid-read"), 5000))
    out = tmp_path / "store"
    results = _in_process(_manifest(tmp_path / "m.jsonl", entries, "flaky://"),
                          _cfg(models, out, io_backoff_seconds=0.001))
    assert sum(r.io_retries for r in results) == 3
    assert FlakyFileSystem.count(a) == 3 and FlakyFileSystem.count(b) == 2
    assert not any(r.failures for r in results)
    assert _files(out) == _files(reference)


def test_corrupt_audio_fails_with_one_attempt_in_the_shard_task(corpus, models, tmp_path):
    entries = _entries(corpus)[:4]
    bad = tmp_path / "corrupt.flac"
    bad.write_bytes(np.random.default_rng(0).bytes(4000))
    entries.append({"id": "zz_corrupt", "audio": str(bad), "sample_rate": 16000, "num_samples": 32000,
                    "duration": 2.0})
    out = tmp_path / "store"
    results = _in_process(_manifest(tmp_path / "m.jsonl", entries, "flaky://"),
                          _cfg(models, out, io_backoff_seconds=0.001))
    fails = {u: r for res in results for u, r in res.failures.items()}
    assert list(fails) == ["zz_corrupt"] and "corrupt" in fails["zz_corrupt"]
    assert FlakyFileSystem.count(str(bad)) == 1 and sum(r.io_retries for r in results) == 0


# ------------------------------------------------------------------------------------ --retry-failed

def test_retry_failed_redoes_only_the_failed_utterances(reference, corpus, models, tmp_path):
    """An utterance's audio is missing during the first run and restored afterwards: `extract --retry-failed`
    rewrites only its shard (CI and float16 labels), and both stores equal a fault-free run's byte for byte."""
    entries = _entries(corpus)
    victim = entries[5]
    restored = tmp_path / "audio" / "victim.flac"
    entries[5] = {**victim, "audio": str(restored)}
    manifest = _manifest(tmp_path / "m.jsonl", entries)
    teacher, quantizer = models
    out, f16 = tmp_path / "ci", tmp_path / "f16"
    cmd = ["extract", manifest, "--teacher", teacher, "--layer", "2", "--quantizer", quantizer, "--out", str(out),
           "--float-labels", str(f16), "--workers", "1", "--shard-frames", str(SHARD), "--no-progress"]
    res = CliRunner().invoke(cli, cmd)
    assert res.exit_code == 2, res.output
    ci = open_store(str(out))
    assert ci.failures() == {victim["id"]: "audio file not found"}
    assert open_store(str(f16)).failures() == {victim["id"]: "audio file not found"}
    victim_shard = ci.shard_of(victim["id"])
    objects = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    restored.parent.mkdir()
    shutil.copy(victim["audio"], restored)
    res = CliRunner().invoke(cli, cmd + ["--retry-failed"])
    assert res.exit_code == 0, res.output
    assert f"{ci.num_shards} total, 1 run" in res.output
    assert _files(out) == _files(reference)
    clean = tmp_path / "clean"
    _in_process(manifest, _cfg(models, clean / "ci", float_labels=[str(clean / "f16")]))
    assert _files(f16) == _files(clean / "f16")
    rewritten = {p.relative_to(out).as_posix() for p, t in objects.items() if p.stat().st_mtime_ns != t}
    # the completion manifest copies the replaced record: deleted before it, rewritten after the job
    assert rewritten == {f"codes/c/{victim_shard}/0", f"done/shard-{victim_shard:06d}.json",
                         "done/manifest.json.zst"}, rewritten
    # nothing failed any more: a second --retry-failed has nothing to do
    res = CliRunner().invoke(cli, cmd + ["--retry-failed"])
    assert res.exit_code == 0 and f"{ci.num_shards} already complete" in res.output, res.output


# ------------------------------------------------------------------------------------ float16 overflow

def _overflowing_teacher(models, corpus, tmp_path) -> tuple[str, str]:
    """The test teacher with its last layer's feed-forward output scaled so that exactly one utterance's layer-2
    frames exceed the float16 range (found by measuring every utterance, then checked)."""
    model, _ = load_native_model(models[0])
    utts = load_manifest(corpus["train"])
    waves = [read_audio(u, 16000) for u in utts]

    def peaks(scale: float) -> list[float]:
        m = NativeTeacherModel(model.config)
        m.load_state_dict(model.state_dict())
        with torch.no_grad():
            m.layers[-1].ff2.weight.mul_(scale)
            m.layers[-1].ff2.bias.mul_(scale)
        path = str(tmp_path / f"teacher-x{scale:.6g}.safetensors")
        save_native_teacher(m, path)
        t = load_teacher(path, layer=2)
        out = []
        for w in waves:
            f, n = t.embed(torch.from_numpy(w)[None], torch.tensor([len(w)]))
            out.append(float(f[0, :int(n[0])].abs().max()))
        return out, path

    base, _ = peaks(1000.0)
    order = np.argsort(base)[::-1]
    top, second = base[order[0]], base[order[1]]
    assert top > second * 1.02, "no utterance stands out enough to overflow alone"
    scale = 1000.0 * 65520.0 / ((top + second) / 2)  # float16 rounds values >= 65520 to inf
    got, path = peaks(scale)
    over = [utts[i].id for i, p in enumerate(got) if p >= 65520.0]
    assert len(over) == 1, (over, sorted(got)[-3:])
    return path, over[0]


def test_float16_overflow_fails_that_utterance_in_the_float16_store_only(corpus, models, tmp_path):
    teacher, victim = _overflowing_teacher(models, corpus, tmp_path)
    cfg = ExtractionConfig(teacher=teacher, layer=2, quantizer=models[1], out=str(tmp_path / "ci"),
                           float_labels=[str(tmp_path / "f16"), str(tmp_path / "f32")],
                           float_dtype=["float16", "float32"])
    report = run_extraction(corpus["train"], cfg, workers=1, shard_frames=SHARD, progress=False)
    ci, f16, f32 = (open_store(str(tmp_path / n)) for n in ("ci", "f16", "f32"))
    assert ci.failures() == {} and f32.failures() == {}
    assert list(f16.failures()) == [victim] and f16.failures()[victim].startswith(FLOAT16_OVERFLOW)
    assert np.abs(f32[victim]).max() >= 65520.0
    q = MultiCodebookQuantizer.load(models[1])
    np.testing.assert_array_equal(ci[victim], q.encode(f32[victim]))  # codes come from the float32 frames
    for uid in f32.ids:
        if uid != victim:
            np.testing.assert_array_equal(f16[uid], f32[uid].astype(np.float16))
    assert not report.ok and report.failures == {} and report.num_failed == 1
    assert list(report.float_failures) == [str(tmp_path / "f16")]
    assert FLOAT16_OVERFLOW in report.summary()


# ------------------------------------------------------------------------------------ pre-emption, checkpoints

_SHARD_TASK = r"""
import json, sys
import fault_injection
fault_injection.register()
from distill.extract import ExtractionConfig, prepare, run_shard
a = json.loads(sys.argv[1])
cfg = ExtractionConfig(**a["cfg"])
_, tasks = prepare(a["manifest"], cfg, shard_frames=a["shard_frames"], float_shard_frames=a["float_shard_frames"])
run_shard(cfg, *next(t for t in tasks if t[0] == a["shard"]))
"""


@pytest.mark.parametrize("floats", [False, True], ids=["codes-checkpoints", "float-subshards"])
def test_preempted_shard_task_resumes_after_its_last_finished_segment(reference, corpus, models, tmp_path,
                                                                       monkeypatch, floats):
    """A shard task is killed (SIGKILL) while it waits for the audio of a later segment (its third, or with float
    sub-shards its second); the rerun reuses the finished segments (codes checkpoints and complete float
    sub-shards), runs the teacher on the rest only, and the stores end byte-identical to a fault-free run."""
    entries = _entries(corpus)
    manifest = _manifest(tmp_path / "m.jsonl", entries, "gated://")
    out = tmp_path / "ci"
    extra = {"float_labels": [str(tmp_path / "f32")], "float_dtype": "float32"} if floats else \
        {"checkpoint_frames": 150}
    cfg = _cfg(models, out, **extra)
    fsf = 150 if floats else None
    plan, tasks = prepare(manifest, cfg, shard_frames=SHARD, float_shard_frames=fsf)
    fplan = open_store(str(tmp_path / "f32")).plan if floats else None
    segs = {i: segments_of(plan.shards[i], nested, fplan, 150) for i, _, nested in tasks}
    shard = max(segs, key=lambda i: (len(segs[i]), -i))
    g = min(2, len(segs[shard]) - 1)  # the segment whose first audio read blocks
    assert g >= 1
    gates = tmp_path / "gates"
    gates.mkdir()
    gated_uid = segs[shard][g][0][0]
    gate = gates / (os.path.basename(next(e["audio"] for e in entries if e["id"] == gated_uid)) + ".closed")
    gate.touch()
    args = {"cfg": dataclasses.asdict(cfg), "manifest": manifest, "shard_frames": SHARD, "float_shard_frames": fsf,
            "shard": shard}
    env = {**os.environ, "CI_STORE_TEST_GATE_DIR": str(gates),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _SHARD_TASK, json.dumps(args)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    checkpoint = out / "partial" / f"shard-{shard:06d}" / f"segment-{g - 1:06d}.bin"
    deadline = time.time() + 240
    try:
        while not checkpoint.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the task never finished its first segments"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not open_store(str(out)).is_shard_complete(shard)
    task = next(t for t in tasks if t[0] == shard)
    if floats:  # float sub-shards are written as their segment ends, before the segment's codes checkpoint
        fstore = open_store(str(tmp_path / "f32"))
        assert [fstore.is_shard_complete(j) for j in task[2]][:g + 1] == [True] * g + [False]
    gate.unlink()
    reused = sum(n for seg in segs[shard][:g] for _, n in seg)
    r = run_shard(cfg, *task)
    assert r.frames_reused == reused and r.frames == plan.shards[shard].size - reused
    for t in tasks:
        if t[0] != shard:
            run_shard(cfg, *t)
    assert not (out / "partial").exists()
    for url in [cfg.out, *(u for u, _ in cfg.float_targets())]:     # as run_extraction ends (format v2)
        open_store(url, mode="r+").write_completion_manifest()
    assert _files(out) == _files(reference)
    if floats:
        clean = tmp_path / "clean"
        _in_process(manifest, _cfg(models, clean / "ci", float_labels=[str(clean / "f32")], float_dtype="float32"),
                    float_shard_frames=fsf)
        assert _files(tmp_path / "f32") == _files(clean / "f32")


def test_checkpoints_that_do_not_match_are_ignored(reference, tmp_path):
    """A damaged checkpoint, or one made for another store, is recomputed rather than trusted."""
    store = open_store(str(reference))
    meta = store.meta
    sh = store.plan.shards[0]
    seg = list(zip(sh.utt_ids, (int(n) for n in sh.num_frames)))
    codes = dict(store.read_shard(0))
    url = str(tmp_path / "copy")
    shutil.copytree(reference, url)
    ck = ShardCheckpoints(url, None, 0, store_identity(meta), meta["dtype"], meta["width"])
    ck.save(0, seg, codes, {})
    got = ck.load([seg])
    assert list(got) == [0] and got[0].frames == sh.size
    assert all(np.array_equal(got[0].codes[u], codes[u]) for u in codes)
    other = ShardCheckpoints(url, None, 0, store_identity({**meta, "quantizer_id": "other"}), meta["dtype"],
                             meta["width"])
    assert other.load([seg]) == {}
    key = Path(url) / ck.keys()[0]
    raw = bytearray(key.read_bytes())
    raw[-1] ^= 1
    key.write_bytes(bytes(raw))
    assert ck.load([seg]) == {}
    assert ck.load([seg[1:]]) == {}  # other segment boundaries
    ck.clear()
    assert ck.keys() == [] and not (Path(url) / "partial").exists()


# ------------------------------------------------------------------------------------ batching and prefetching

def test_batched_teacher_is_close_to_single_and_reproducible_for_one_batch_size(reference, corpus, models,
                                                                                tmp_path):
    """batch_seconds: padded, length-sorted teacher batches. Not bit-identical to one-utterance forwards (BLAS
    results depend on the batch shape; bench/batch_bitwise.py), but close, and for a fixed batch_seconds the
    store does not depend on worker count, manifest order or quantizer batch."""
    teacher = load_teacher(models[0], layer=2)
    utts = load_manifest(corpus["train"])
    samples = {u.id: u.num_samples for u in utts}
    assert max(len(b) for b in batches_of(sorted(samples), samples, 16000, 8.0)) > 1
    cfg = _cfg(models, tmp_path / "a" / "ci", batch_seconds=8.0, float_labels=[str(tmp_path / "a" / "f32")],
               float_dtype="float32")
    _in_process(corpus["train"], cfg)
    random.Random(3).shuffle(utts)
    cfg2 = dataclasses.replace(cfg, out=str(tmp_path / "b" / "ci"), float_labels=[str(tmp_path / "b" / "f32")],
                               batch_frames=7, prefetch=0)
    _in_process(utts, cfg2)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    f32, ci, ref = (open_store(str(p)) for p in (tmp_path / "a" / "f32", tmp_path / "a" / "ci", reference))
    for u in sorted(utts, key=lambda u: u.id)[:4]:
        w = read_audio(u, 16000)
        alone, n = teacher.embed(torch.from_numpy(w)[None], torch.tensor([len(w)]))
        np.testing.assert_allclose(f32[u.id], alone[0, :int(n[0])].numpy(), rtol=1e-4, atol=1e-4)
    agree = np.mean([(ci[u] == ref[u]).mean() for u in ref.ids])
    assert agree > 0.95, agree


def test_batches_are_length_sorted_and_within_budget():
    samples = {f"u{i}": n for i, n in enumerate([16000, 48000, 8000, 47000, 30000, 100000])}
    batches = batches_of(list(samples), samples, 16000, 6.0)
    assert [u for b in batches for u in b] == sorted(samples, key=lambda u: -samples[u])
    assert all(len(b) * samples[b[0]] <= 6.0 * 16000 or len(b) == 1 for b in batches)
    assert batches[0] == ["u5"] and ["u1", "u3"] in batches
    assert batches_of(list(samples), samples, 16000, None) == [[u] for u in samples]


def test_prefetch_reads_ahead_in_order_and_at_most_depth_items():
    consumed = [0]
    ahead_seen = threading.Event()
    callers = set()

    def fn(i):
        callers.add(threading.current_thread().name)
        assert i - consumed[0] <= 3, (i, consumed[0])  # never more than depth items beyond the consumer
        if i == 2:
            ahead_seen.set()
        return i * i

    out = []
    for x in prefetched(fn, range(10), depth=3):
        if not out:
            assert ahead_seen.wait(30), "the background thread did not read ahead"
        out.append(x)
        consumed[0] += 1
    assert out == [i * i for i in range(10)]
    assert callers and threading.current_thread().name not in callers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_shard_task_encodes_on_the_device(reference, corpus, models, tmp_path):
    """Teacher, code buffer and quantizer on the GPU (frames never copied to the host; float labels cast there):
    a complete, verified store whose codes match the CPU reference up to GPU rounding, and float16 labels equal to
    the float32 ones cast by numpy."""
    out = tmp_path / "ci"
    cfg = _cfg(models, out, device="cuda", float_labels=[str(tmp_path / "f16"), str(tmp_path / "f32")],
               float_dtype=["float16", "float32"])
    results = _in_process(corpus["train"], cfg)
    assert not any(r.failures or r.float_failures for r in results)
    res = CliRunner().invoke(cli, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    ci, ref = open_store(str(out)), open_store(str(reference))
    f16, f32 = open_store(str(tmp_path / "f16")), open_store(str(tmp_path / "f32"))
    assert np.mean([(ci[u] == ref[u]).mean() for u in ref.ids]) > 0.9
    q = MultiCodebookQuantizer.load(models[1])
    for u in ref.ids[:3]:
        np.testing.assert_array_equal(f16[u], f32[u].astype(np.float16))
        assert (q.encode(f32[u]) == ci[u]).mean() > 0.99


def test_planning_retries_header_probes_and_refuses_to_plan_on_persistent_faults(corpus, models, tmp_path):
    """Without lengths in the manifest, planning reads headers: a transient fault is retried; one that persists
    stops planning (a 0-sample placeholder would fix a wrong frame count into the plan) and nothing is written.
    (Planning waits the default backoff, a few seconds at most here.)"""
    from distill.extract import ExtractionError

    entries = [{"id": e["id"], "audio": e["audio"]} for e in _entries(corpus)[:3]]
    manifest = _manifest(tmp_path / "m.jsonl", entries, "flaky://")
    FlakyFileSystem.plan(entries[1]["audio"], ConnectionResetError(errno.ECONNRESET, "reset"))
    plan, _ = prepare(manifest, _cfg(models, tmp_path / "a"), shard_frames=SHARD)
    teacher = load_teacher(models[0], layer=2)
    n = json.loads(gzip.open(corpus["train"], "rt").readlines()[1])["recording"]["num_samples"]
    frames = {u: f for sh in plan.shards for u, f in zip(sh.utt_ids, sh.num_frames)}
    assert frames[entries[1]["id"]] == teacher.num_frames(n) and FlakyFileSystem.count(entries[1]["audio"]) == 2
    FlakyFileSystem.plan(entries[2]["audio"], *[TimeoutError("timed out")] * 5)
    with pytest.raises(ExtractionError, match=entries[2]["id"]):
        prepare(manifest, _cfg(models, tmp_path / "b"), shard_frames=SHARD)
    assert not (tmp_path / "b").exists()
