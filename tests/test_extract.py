"""The Dask extraction job: correct codes, reproducible bytes, resumable after a kill, fault-tolerant."""
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from ci_store import open_store
from cli.main import main as cli
from distill.extract import ExtractionConfig, ExtractionError, run_extraction, sample_frames
from distill.data.manifest import load_manifest
from distill.codec.quantizer import MultiCodebookQuantizer
from distill.teachers import NativeTeacherConfig, NativeTeacherModel, load_teacher, save_native_teacher

SHARD = 600  # frames per CI shard: several shards from a tiny corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from distill.synth.corpus import make_corpus

    out = tmp_path_factory.mktemp("xcorpus") / "c"
    return make_corpus(str(out), hours=0.012, dev_hours=0.001, test_hours=0.001, seed=11, progress=False)


def tiny_teacher_and_quantizer(d, manifest) -> tuple[str, str]:
    """A random-weight native teacher (dim 32, 2 layers) saved in folder d, and a 4-codebook quantizer trained on
    its layer-2 frames of 8 utterances of `manifest`: (teacher path, quantizer path)."""
    torch.manual_seed(0)
    teacher = str(d / "teacher.safetensors")
    save_native_teacher(NativeTeacherModel(NativeTeacherConfig(d_model=32, num_heads=2, ffn_dim=64, num_layers=2)),
                        teacher)
    frames = sample_frames(manifest, teacher, 2, num_utterances=8, seed=0, progress=False)
    quantizer = str(d / "q.safetensors")
    MultiCodebookQuantizer.train(frames, num_codebooks=4, seed=0, progress=False).save(quantizer)
    return teacher, quantizer


@pytest.fixture(scope="module")
def models(tmp_path_factory, corpus):
    return tiny_teacher_and_quantizer(tmp_path_factory.mktemp("models"), corpus["train"])


def _cfg(models, out, **kw):
    teacher, quantizer = models
    return ExtractionConfig(teacher=teacher, layer=2, quantizer=quantizer, out=str(out), **kw)


def _files(root) -> dict:
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, models):
    """An uninterrupted 2-worker run: the bytes every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "store"
    rep = run_extraction(corpus["train"], _cfg(models, out), workers=2, shard_frames=SHARD, progress=False)
    assert rep.ok and rep.shards_run == rep.num_shards >= 3
    return out


def test_codes_are_the_quantized_teacher_frames(reference, corpus, models):
    from distill.data.audio import read_audio

    store = open_store(str(reference))
    teacher = load_teacher(models[0], layer=2)
    q = MultiCodebookQuantizer.load(models[1])
    utts = load_manifest(corpus["train"])
    assert sorted(store.ids) == sorted(u.id for u in utts)
    assert store.meta["quantizer_id"] == q.quantizer_id
    assert store.meta["teacher"]["checkpoint_sha256"] == teacher.checkpoint_sha256
    assert store.frame_rate == teacher.frame_rate
    for u in utts[:3]:
        wave = torch.from_numpy(read_audio(u, 16000))[None]
        frames, lens = teacher.embed(wave, torch.tensor([wave.shape[1]]))
        expect = q.encode(frames[0, : int(lens[0])].numpy())
        np.testing.assert_array_equal(store[u.id], expect)
    # the quantizer travels inside the store: codes decode from the store alone
    config, arrays = store.quantizer_state()
    q2 = MultiCodebookQuantizer.from_arrays(config, arrays)
    assert q2.quantizer_id == q.quantizer_id
    res = CliRunner().invoke(cli, ["verify", str(reference)])
    assert res.exit_code == 0, res.output


def test_reproducible_across_workers_batch_size_and_order(reference, corpus, models, tmp_path):
    utts = load_manifest(corpus["train"])
    random.Random(5).shuffle(utts)
    out = tmp_path / "store"
    rep = run_extraction(utts, _cfg(models, out, batch_frames=7), workers=1, shard_frames=SHARD, progress=False)
    assert rep.ok
    assert _files(out) == _files(reference)


def test_dead_worker_is_retried(reference, corpus, models, tmp_path, monkeypatch):
    """A worker process dies in the middle of a shard (after the teacher ran on its first utterance): the
    scheduler reruns the task elsewhere and the store ends byte-identical to an undisturbed run."""
    from dask.distributed import LocalCluster

    marker = tmp_path / "crashed"
    monkeypatch.setenv("CI_STORE_TEST_CRASH_MARKER", str(marker))
    monkeypatch.setenv("CI_STORE_TEST_CRASH_SHARD", "1")
    out = tmp_path / "store"
    preload = str(Path(__file__).with_name("worker_crash.py"))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, preload=[preload],
                      dashboard_address=None, silence_logs=50) as cluster:
        rep = run_extraction(corpus["train"], _cfg(models, out), scheduler=cluster.scheduler_address,
                             shard_frames=SHARD, progress=False)
    assert marker.exists(), "the fault was not injected"
    assert rep.ok
    assert _files(out) == _files(reference)


def test_killed_job_resumes_to_identical_bytes(reference, corpus, models, tmp_path):
    out = tmp_path / "store"
    teacher, quantizer = models
    cmd = [sys.executable, "-m", "cli", "extract", corpus["train"], "--teacher", teacher, "--layer", "2",
           "--quantizer", quantizer, "--out", str(out), "--workers", "1", "--shard-frames", str(SHARD),
           "--no-progress"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=Path(__file__).resolve().parents[1])
    done_dir = out / "done"
    deadline = time.time() + 240
    while time.time() < deadline and not list(done_dir.glob("shard-*.json")):
        assert proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    store = open_store(str(out))
    n_done = len(store.completed_shards())
    assert 1 <= n_done < store.plan.num_shards, n_done
    res = CliRunner().invoke(cli, ["verify", str(out)])
    assert res.exit_code != 0  # an interrupted store is reported incomplete
    rep = run_extraction(corpus["train"], _cfg(models, out), workers=1, shard_frames=SHARD, progress=False)
    assert rep.shards_skipped >= n_done and rep.ok
    assert _files(out) == _files(reference)


def _bad_manifest(corpus, tmp_path) -> str:
    """The corpus plus a missing, a corrupt, an empty and a too-short file."""
    lines = [json.loads(l) for l in gzip.open(corpus["train"], "rt")][:6]
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "corrupt.flac").write_bytes(os.urandom(3000))
    sf.write(bad_dir / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(bad_dir / "short.wav", np.zeros(400, np.float32), 16000)

    def plain(uid, path, n=None):
        d = {"id": uid, "audio": str(path)}
        if n is not None:
            d.update(sample_rate=16000, num_samples=n, duration=n / 16000)
        return d

    out = [plain(c["id"], c["recording"]["sources"][0]["source"], c["recording"]["num_samples"]) for c in lines]
    out += [plain("bad_missing", bad_dir / "missing.wav", 16000), plain("bad_corrupt", bad_dir / "corrupt.flac", 16000),
            plain("bad_empty", bad_dir / "empty.wav"), plain("bad_short", bad_dir / "short.wav")]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in out))
    return str(path)


def test_bad_audio_is_recorded_and_the_rest_completes(corpus, models, tmp_path):
    manifest = _bad_manifest(corpus, tmp_path)
    teacher, quantizer = models
    out = tmp_path / "store"
    res = CliRunner().invoke(cli, ["extract", manifest, "--teacher", teacher, "--layer", "2", "--quantizer",
                                   quantizer, "--out", str(out), "--workers", "1", "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "4 utterance(s) failed" in res.output
    store = open_store(str(out))
    fails = store.failures()
    assert set(fails) == {"bad_missing", "bad_corrupt", "bad_empty", "bad_short"}
    assert "short" in fails["bad_short"] and "empty" in fails["bad_empty"]
    good = [u for u in store.ids if not u.startswith("bad_")]
    assert len(good) == 6 and all(store[u].shape[0] > 0 for u in good)
    with pytest.raises(Exception, match="bad_corrupt"):
        store["bad_corrupt"]
    assert store.completed_shards() == set(range(store.plan.num_shards))


def test_duplicate_ids_refused_before_any_work(corpus, models, tmp_path):
    utts = load_manifest(corpus["train"])
    out = tmp_path / "store"
    with pytest.raises(ExtractionError, match=utts[0].id):
        run_extraction(utts + [utts[0]], _cfg(models, out), workers=1, progress=False)
    assert not out.exists()


def test_other_quantizer_refused_and_store_untouched(reference, corpus, models, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    before = _files(out)
    other = MultiCodebookQuantizer.train(np.random.default_rng(1).standard_normal((3000, 32)).astype(np.float32),
                                         num_codebooks=4, seed=1, progress=False)
    other_path = tmp_path / "other.safetensors"
    other.save(str(other_path))
    cfg = ExtractionConfig(teacher=models[0], layer=2, quantizer=str(other_path), out=str(out))
    with pytest.raises(ExtractionError, match="quantizer"):
        run_extraction(corpus["train"], cfg, workers=1, shard_frames=SHARD, progress=False)
    assert _files(out) == before


def test_extract_to_s3_with_float_labels(corpus, models, s3_bucket):
    """Stores, and the quantizer they are coded with, on S3 (the storage options reach every reader)."""
    import fsspec

    url, opts = s3_bucket
    with open(models[1], "rb") as src, fsspec.open(f"{url}/q.safetensors", "wb", **opts) as dst:
        dst.write(src.read())
    cfg = ExtractionConfig(teacher=models[0], layer=2, quantizer=f"{url}/q.safetensors", out=f"{url}/ci.zarr",
                           float_labels=[f"{url}/f16.zarr", f"{url}/f32.zarr"], float_dtype=["float16", "float32"],
                           storage_options=opts)
    rep = run_extraction(corpus["train"], cfg, workers=1, shard_frames=SHARD, progress=False)
    assert rep.ok
    ci = open_store(f"{url}/ci.zarr", storage_options=opts)
    fl = open_store(f"{url}/f16.zarr", storage_options=opts)
    assert ci.completed_shards() == set(range(ci.plan.num_shards))
    f32 = open_store(f"{url}/f32.zarr", storage_options=opts)
    assert fl.kind == "float" and fl.meta["dtype"] == "float16" and f32.meta["dtype"] == "float32"
    assert f32.plan == fl.plan  # one layout for all float stores, nested in the CI shards
    q = MultiCodebookQuantizer.load(models[1])
    for uid in ci.ids[:3]:
        emb = fl[uid].astype(np.float32)
        assert emb.shape[0] == ci[uid].shape[0]
        # float16 rounding can flip a near-tie, so compare codes of the stored floats loosely
        agree = (q.encode(emb) == ci[uid]).mean()
        assert agree > 0.9, agree
        np.testing.assert_array_equal(q.encode(f32[uid]), ci[uid])  # float32 labels are exactly what was coded
        np.testing.assert_array_equal(f32[uid].astype(np.float16), fl[uid])
    res = CliRunner().invoke(cli, ["verify", f"{url}/ci.zarr", "--storage-options", json.dumps(opts)])
    assert res.exit_code == 0, res.output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_worker_undoes_dask_malloc_trim_threshold(monkeypatch):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_; the worker raises glibc's thresholds (measured 2.7x faster)."""
    from distill.extract.cluster import undo_dask_malloc_trim

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert undo_dask_malloc_trim() is False  # a plain process is left alone
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    assert undo_dask_malloc_trim() is True


def test_tasks_come_largest_shard_first(corpus, models, tmp_path):
    """A shorter tail: the smallest shards are the last ones a worker picks up."""
    from distill.extract import prepare

    plan, tasks = prepare(corpus["train"], _cfg(models, tmp_path / "store"), shard_frames=SHARD)
    order = [i for i, _, _ in tasks]
    sizes = [plan.shards[i].size for i in order]
    assert sorted(order) == list(range(plan.num_shards))
    assert sizes == sorted(sizes, reverse=True)
    assert order != sorted(order)  # this corpus's shards are not already in size order: the sort did something


def _timers(dask_worker=None, dask_scheduler=None) -> dict:
    """The server's periodic callbacks (ms): what it actually runs, whatever the config says now."""
    server = dask_worker or dask_scheduler
    return {k: pc.callback_time for k, pc in server.periodic_callbacks.items() if k in ("tick", "monitor", "profile")}


def _dask_default_ms(key: str) -> float:
    """A Dask timer setting (ms) as this Dask release ships it, read from dask.config at test time."""
    import dask
    from dask.utils import parse_timedelta

    return 1000 * parse_timedelta(dask.config.get(key))


@pytest.mark.parametrize("profile", [False, True])
def test_embedded_cluster_workers_skip_the_profiler_unless_asked(profile):
    """The job's own cluster turns off Dask's stack sampler and slows its ticks (~6% of 2 cores, measured);
    `profile=True` keeps whatever this Dask release does by default."""
    import dask
    from dask.distributed import Client

    from distill.extract import embedded_cluster

    tick = _dask_default_ms("distributed.admin.tick.interval")
    monitor = _dask_default_ms("distributed.admin.system-monitor.interval")
    sampler = dask.config.get("distributed.worker.profile.enabled")
    cluster = embedded_cluster(2, profile=profile, dashboard=False)
    try:
        with Client(cluster) as client:
            workers = list(client.run(_timers).values())
            profiling = list(client.run(lambda: dask.config.get("distributed.worker.profile.enabled")).values())
            scheduler = client.run_on_scheduler(_timers)
    finally:
        cluster.close()
    assert len(workers) == 2
    if profile:  # Dask's defaults, untouched
        for w in workers:
            assert w["tick"] == pytest.approx(tick) and w["monitor"] == pytest.approx(monitor), workers
            assert ("profile" in w) == sampler, workers
            if sampler:
                assert w["profile"] == pytest.approx(_dask_default_ms("distributed.worker.profile.interval"))
        assert profiling == [sampler] * 2
        assert scheduler["tick"] == pytest.approx(tick)
    else:  # no stack sampler at all, and ticks slower than Dask's
        assert profiling == [False, False]
        for w in workers:
            assert "profile" not in w and w["tick"] > tick and w["monitor"] > monitor, workers
        assert scheduler["tick"] > tick


def test_lhotse_shar_input_extracts_the_same_store(reference, corpus, models, tmp_path):
    """The corpus as Lhotse Shar (audio re-encoded into tar shards by lhotse) yields a byte-identical store."""
    from lhotse import CutSet

    shar = tmp_path / "shar"
    shar.mkdir()
    CutSet.from_file(corpus["train"]).to_shar(str(shar), fields={"recording": "flac"}, shard_size=5)
    out = tmp_path / "store"
    rep = run_extraction(str(shar), _cfg(models, out), workers=1, shard_frames=SHARD, progress=False)
    assert rep.ok and rep.num_shards >= 3
    assert _files(out) == _files(reference)
