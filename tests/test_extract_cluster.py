"""Extraction at cluster scale: devices and one worker per GPU, teacher dtypes, provenance checked on resume,
batch schedulers through dask-jobqueue, manifests on object storage, parallel probing and progress."""
import json
import os
import shutil
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ci_store import open_store
from cli.main import main as cli
from distill.codec.quantizer import MultiCodebookQuantizer
from distill.data.manifest import load_manifest
from distill.extract import ExtractionConfig, ExtractionError, run_extraction
from distill.extract.cluster import (embedded_gpu_cluster, embedded_gpus, gpu_worker_specs, jobqueue_cluster,
                                     parse_device, check_device)
from distill.teachers import TeacherError, load_teacher
from test_extract import tiny_teacher_and_quantizer

SHARD = 400  # frames per CI shard: a few shards from the tiny corpus (its longest utterance: 380 frames)
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def kit(tmp_path_factory, tiny_corpus):
    """A random-weight native teacher (dim 32, 2 layers) and a 4-codebook quantizer trained on its frames."""
    d = tmp_path_factory.mktemp("cluster-kit")
    teacher, quantizer = tiny_teacher_and_quantizer(d, tiny_corpus["train"])
    return {"teacher": teacher, "quantizer": quantizer, "manifest": tiny_corpus["train"], "dir": d}


def _cfg(kit, out, **kw):
    return ExtractionConfig(teacher=kit["teacher"], layer=2, quantizer=kit["quantizer"], out=str(out), **kw)


def _files(root) -> dict:
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, kit):
    """A CPU float32 run with one embedded worker."""
    out = tmp_path_factory.mktemp("cluster-ref") / "store"
    rep = run_extraction(kit["manifest"], _cfg(kit, out), workers=1, shard_frames=SHARD, progress=False)
    assert rep.ok and rep.num_shards >= 2
    return out


def _extract_args(kit, out, *extra):
    return ["extract", kit["manifest"], "--teacher", kit["teacher"], "--layer", "2", "--quantizer", kit["quantizer"],
            "--out", str(out), "--shard-frames", str(SHARD), "--no-progress", *map(str, extra)]


# ------------------------------------------------------------------------------------------------ devices and GPUs

def test_device_strings_are_checked():
    assert parse_device("cpu") == ("cpu", None)
    assert parse_device("cuda") == ("cuda", None)
    assert parse_device("cuda:3") == ("cuda", 3)
    for bad in ("gpu", "cuda:", "cuda:x", "cpu:0", "CUDA", ""):
        with pytest.raises(ExtractionError, match="is not a device"):
            parse_device(bad)
    assert check_device("cpu") == "cpu"
    unusable = f"cuda:{torch.cuda.device_count()}" if CUDA else "cuda"  # a device this machine does not have
    with pytest.raises(ExtractionError, match="--device cuda") as e:
        check_device(unusable)
    assert ("CUDA device(s) visible" if CUDA else "no CUDA device") in str(e.value)


def test_embedded_gpus_one_worker_per_visible_gpu(monkeypatch):
    """The GPU ids the embedded cluster pins its workers to, for a machine with 4 GPUs of which the environment
    makes 2, 3, 5 and 7 visible (the CUDA queries answer as such a machine would)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,7")
    assert embedded_gpus("cuda", None) == ["2", "3", "5", "7"]
    assert embedded_gpus("cuda", 2) == ["2", "3"]
    assert embedded_gpus("cuda:1", None) == ["3"]  # cuda:N counts the visible GPUs, as torch does
    with pytest.raises(ExtractionError, match="only 4 CUDA device"):
        embedded_gpus("cuda", 5)
    with pytest.raises(ExtractionError, match="--workers 2 needs --device cuda"):
        embedded_gpus("cuda:1", 2)
    with pytest.raises(ExtractionError, match="only 4 CUDA device"):
        embedded_gpus("cuda:4", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert embedded_gpus("cuda", None) == ["0", "1", "2", "3"]


def test_gpu_worker_specs_pin_each_worker_to_its_gpu():
    specs = gpu_worker_specs(["0", "1", "GPU-5e1d"], memory_limit=2**30)
    assert len(specs) == 3
    opts = [s["options"] for s in specs.values()]
    assert [o["env"] for o in opts] == [{"CUDA_VISIBLE_DEVICES": g} for g in ("0", "1", "GPU-5e1d")]
    assert all(o["resources"] == {"GPU": 1} and o["nthreads"] == 1 and o["memory_limit"] == 2**30 for o in opts)
    with pytest.raises(ExtractionError, match="no GPU"):
        gpu_worker_specs([])


def _cuda_visible_devices() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def test_gpu_cluster_workers_see_only_their_gpu():
    """The real embedded GPU cluster, started for two GPU ids: each worker process has its own
    CUDA_VISIBLE_DEVICES and a GPU=1 resource, and a task asking for a GPU runs on one of them (on a machine
    without GPUs the ids are only environment values, which is all this checks)."""
    from dask.distributed import Client

    cluster = embedded_gpu_cluster(["3", "5"], dashboard=False)
    try:
        with Client(cluster) as client:
            seen = client.run(_cuda_visible_devices)
            info = client.scheduler_info(n_workers=-1)["workers"]
            placed = client.submit(_cuda_visible_devices, resources={"GPU": 1}, pure=False).result()
    finally:
        cluster.close()
    assert sorted(seen.values()) == ["3", "5"]
    assert sorted(w["resources"].get("GPU") for w in info.values()) == [1, 1]
    assert placed in ("3", "5")


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_extraction_one_worker_per_gpu(kit, reference, tmp_path):
    """On a machine with GPUs: one worker per GPU, the store records device cuda, and the codes agree with the CPU
    run for nearly every frame (float reduction order differs between devices)."""
    out = tmp_path / "store"
    rep = run_extraction(kit["manifest"], _cfg(kit, out, device="cuda"), shard_frames=SHARD, progress=False)
    assert rep.ok and rep.workers == torch.cuda.device_count()
    store, ref = open_store(str(out)), open_store(str(reference))
    assert store.meta["teacher"]["device"] == "cuda" and store.meta["teacher"]["torch_threads"] is None
    same = np.mean([np.mean(store[u] == ref[u]) for u in ref.ids])
    assert same > 0.9, same


# ------------------------------------------------------------------------------------------------ teacher dtype

def test_teacher_dtype_casts_the_weights_and_frames_stay_float32(kit, tmp_path):
    import transformers

    hf = tmp_path / "hubert"
    torch.manual_seed(0)
    transformers.HubertModel(transformers.HubertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16, 16),
        conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=True)).save_pretrained(hf, safe_serialization=True)
    wave = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 16000)).astype(np.float32) * 0.1)
    n = torch.tensor([16000])
    for path, layer in ((kit["teacher"], 2), ("whisper-tiny.en", 2), (str(hf), 2)):
        ref, _ = load_teacher(path, layer=layer).embed(wave, n)
        for dtype, tol in (("bfloat16", 0.1), ("float16", 0.02)):  # both run on CPU (float16 slowly)
            t = load_teacher(path, layer=layer, dtype=dtype)
            assert t.dtype == dtype and t.metadata()["dtype"] == dtype
            assert {p.dtype for p in t.module.parameters()} == {getattr(torch, dtype)}
            frames, _ = t.embed(wave, n)
            assert frames.dtype == torch.float32 and frames.shape == ref.shape
            err = float((frames - ref).norm() / ref.norm())
            assert 0 < err < tol, (path, dtype, err)  # different numerics, the same frames to within rounding
    native = load_teacher(kit["teacher"], layer=2, dtype="bfloat16")
    assert native.model.mel_fb.dtype == torch.float32  # the log-mel front end keeps its exact float32 tables
    with pytest.raises(TeacherError, match="teacher dtype 'half' unknown"):
        load_teacher(kit["teacher"], layer=2, dtype="half")


def test_bfloat16_extraction_stores_the_bfloat16_teachers_codes(kit, tmp_path):
    from distill.data.audio import read_audio

    out = tmp_path / "store"
    rep = run_extraction(kit["manifest"], _cfg(kit, out, teacher_dtype="bfloat16"), workers=1, shard_frames=SHARD,
                         progress=False)
    assert rep.ok and rep.provenance == {"dtype": "bfloat16", "device": "cpu", "torch_threads": 1}
    store = open_store(str(out))
    assert store.meta["teacher"]["dtype"] == "bfloat16"
    teacher = load_teacher(kit["teacher"], layer=2, dtype="bfloat16")
    q = MultiCodebookQuantizer.load(kit["quantizer"])
    for u in load_manifest(kit["manifest"])[:3]:
        wave = torch.from_numpy(read_audio(u, 16000))[None]
        frames, lens = teacher.embed(wave, torch.tensor([wave.shape[1]]))
        np.testing.assert_array_equal(store[u.id], q.encode(frames[0, : int(lens[0])].numpy()))


# ------------------------------------------------------------------------------------------------ provenance

def test_provenance_recorded_and_resume_with_other_numerics_refused(kit, reference, tmp_path):
    meta = open_store(str(reference)).meta["teacher"]
    assert (meta["dtype"], meta["device"], meta["torch_threads"]) == ("float32", "cpu", 1)
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    before = _files(out)
    res = CliRunner().invoke(cli, _extract_args(kit, out, "--workers", 1, "--teacher-dtype", "bfloat16"))
    assert res.exit_code == 8, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("Error:"))
    assert "teacher dtype (--teacher-dtype) is 'float32' there, 'bfloat16' here" in line, line
    res = CliRunner().invoke(cli, _extract_args(kit, out, "--workers", 1, "--threads-per-worker", 2))
    assert res.exit_code == 8 and "torch threads per worker (--threads-per-worker) is 1 there, 2 here" in res.output
    assert _files(out) == before  # nothing stored was touched
    res = CliRunner().invoke(cli, _extract_args(kit, out, "--workers", 1))  # the same settings resume
    assert res.exit_code == 0, res.output
    assert _files(out) == before


def test_quantizer_search_settings_are_part_of_the_check(kit, reference, tmp_path):
    """The same codebooks encoded with a narrower beam give other codes: refused, naming the setting."""
    q = MultiCodebookQuantizer.load(kit["quantizer"])
    narrow = MultiCodebookQuantizer.from_arrays({**q.config, "beam_size": 2}, q.to_arrays())
    path = tmp_path / "narrow.safetensors"
    narrow.save(str(path))
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    before = _files(out)
    cfg = ExtractionConfig(teacher=kit["teacher"], layer=2, quantizer=str(path), out=str(out))
    with pytest.raises(ExtractionError, match="quantizer search setting beam_size is 8 there, 2 here"):
        run_extraction(kit["manifest"], cfg, workers=1, shard_frames=SHARD, progress=False)
    assert _files(out) == before


def test_store_from_before_provenance_resumes_with_float32_only(kit, reference, tmp_path, monkeypatch):
    """A store created before device/dtype/threads were recorded: a float32 run resumes it (its metadata kept as
    it is), any other dtype is refused."""
    from distill.extract import prepare

    out = tmp_path / "store"
    with monkeypatch.context() as m:
        m.setattr(ExtractionConfig, "provenance", lambda self: {})  # what create() got before provenance existed
        prepare(kit["manifest"], _cfg(kit, out), shard_frames=SHARD)
    old_meta = open_store(str(out)).meta["teacher"]
    assert "dtype" not in old_meta
    with pytest.raises(ExtractionError, match="written before dtypes were recorded"):
        run_extraction(kit["manifest"], _cfg(kit, out, teacher_dtype="bfloat16"), workers=1, shard_frames=SHARD,
                       progress=False)
    rep = run_extraction(kit["manifest"], _cfg(kit, out), workers=1, shard_frames=SHARD, progress=False)
    store = open_store(str(out))
    assert rep.ok and store.meta["teacher"] == old_meta
    assert all(np.array_equal(store[u], open_store(str(reference))[u]) for u in store.ids)


# ------------------------------------------------------------------------------------------------ batch schedulers

def test_jobqueue_job_scripts_carry_the_options():
    """The job scripts dask-jobqueue would submit: options, our venv's python, one task per worker, the GPU
    resource and the lean Dask settings."""
    opts = {"cores": 8, "memory": "32GB", "queue": "gpuq", "walltime": "02:00:00"}
    extra = {"slurm": {"account": "kd1", "job_extra_directives": ["--gres=gpu:1"]}, "pbs": {"account": "kd1"},
             "sge": {"project": "kd1"}, "lsf": {"project": "kd1"}}
    for kind, more in extra.items():
        cluster = jobqueue_cluster(kind, {**opts, **more}, device="cuda", threads_per_worker=4)
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
        for piece in (sys.executable + " -m distributed.cli.dask_worker", "--nthreads 1", "--resources GPU=1",
                      "gpuq", "kd1", "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False"):
            assert piece in script, (kind, piece, script)
        assert "--nworkers" not in script  # one worker process per job: the job's GPU
        assert ("02:00" in script) if kind != "lsf" else ("#BSUB -W 02:00" in script), script
    slurm = jobqueue_cluster("slurm", {**opts, **extra["slurm"]}, device="cuda")
    try:
        assert "#SBATCH --gres=gpu:1" in slurm.job_script() and "#SBATCH -A kd1" in slurm.job_script()
    finally:
        slurm.close()
    # CPU: cores // threads worker processes per job, one shard each; --dask-profile keeps Dask's defaults
    cpu = jobqueue_cluster("slurm", {"cores": 8, "memory": "16GB", "worker_extra_args": ["--resources", "MEM=1"]},
                           threads_per_worker=4, profile=True)
    try:
        script = cpu.job_script()
    finally:
        cpu.close()
    assert "--nworkers 2" in script and "--nthreads 1" in script and "--resources MEM=1" in script
    assert "GPU=1" not in script and "DASK_DISTRIBUTED" not in script
    gpu = jobqueue_cluster("pbs", {"cores": 4, "memory": "8GB", "worker_extra_args": ["--resources", "MEM=1"]},
                           device="cuda")
    try:
        assert "--resources MEM=1 GPU=1" in gpu.job_script()  # added to the site's own resources
    finally:
        gpu.close()


def test_jobqueue_yaml_settings_and_bad_options(monkeypatch):
    import dask

    with dask.config.set({"jobqueue.slurm.cores": 2, "jobqueue.slurm.memory": "4GB",
                          "jobqueue.slurm.queue": "fromyaml"}):
        cluster = jobqueue_cluster("slurm", {})
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
        assert "#SBATCH -p fromyaml" in script and "--nworkers 2" in script
        cluster = jobqueue_cluster("slurm", {"queue": "given"})  # --cluster-options win over jobqueue.yaml
        try:
            assert "#SBATCH -p given" in cluster.job_script()
        finally:
            cluster.close()
    with pytest.raises(ExtractionError, match="--cluster slurm: .*cores and memory"):
        jobqueue_cluster("slurm", {"queue": "q"})
    with pytest.raises(ExtractionError, match="--cluster sge: .*'account'"):
        jobqueue_cluster("sge", {"cores": 1, "memory": "1GB", "account": "x"})
    with pytest.raises(ExtractionError, match="processes=2 would share it"):
        jobqueue_cluster("slurm", {"cores": 4, "memory": "4GB", "processes": 2}, device="cuda")
    with pytest.raises(ExtractionError, match="unknown"):
        jobqueue_cluster("condor", {})


def test_cluster_without_its_batch_system_is_refused_before_any_work(kit, tmp_path):
    out = tmp_path / "store"
    empty = tmp_path / "bin"
    empty.mkdir()
    res = CliRunner().invoke(cli, _extract_args(kit, out, "--cluster", "slurm", "--jobs", 2, "--cluster-options",
                                                '{"cores": 1, "memory": "1GB"}'), env={"PATH": str(empty)})
    assert res.exit_code == 8, res.output
    assert "sbatch is not on PATH" in res.output and "--scheduler" in res.output
    assert not out.exists()
    res = CliRunner().invoke(cli, _extract_args(kit, out, "--cluster", "slurm"))
    assert res.exit_code == 2 and "--jobs N or --adaptive MIN:MAX" in res.output
    res = CliRunner().invoke(cli, _extract_args(kit, out, "--cluster", "pbs", "--adaptive", "3:1"))
    assert res.exit_code == 2 and "MIN <= MAX" in res.output
    res = CliRunner().invoke(cli, _extract_args(kit, out, "--jobs", 2))
    assert res.exit_code == 2 and "--cluster" in res.output
    assert not out.exists()


STANDIN_SBATCH = """#!/bin/bash
# stands in for SLURM's sbatch on a machine without SLURM: runs the job script here, in its own session
d="$(dirname "$0")"
cp "$1" "$d/job-$$.sh"
setsid bash "$d/job-$$.sh" > "$d/job-$$.log" 2>&1 < /dev/null &
echo "Submitted batch job $!"
"""
STANDIN_SCANCEL = """#!/bin/bash
kill -TERM -- "-$1" 2>/dev/null
exit 0
"""


def test_cluster_slurm_job_script_runs_the_extraction(kit, reference, tmp_path):
    """`--cluster slurm --jobs 1` end to end, with a stand-in sbatch that runs the generated job script on this
    machine: the script's worker joins, runs every shard, and the store is byte-identical to the embedded run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", STANDIN_SBATCH), ("scancel", STANDIN_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    out = tmp_path / "store"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    res = CliRunner().invoke(cli, _extract_args(kit, out, "--cluster", "slurm", "--jobs", 1, "--cluster-options",
                                                '{"cores": 1, "memory": "2GB", "walltime": "00:20:00"}', "--json"),
                             env=env)
    logs = "\n".join(p.read_text() for p in bin_dir.glob("job-*.log"))
    assert res.exit_code == 0, res.output + logs
    report = json.loads(res.stdout)
    assert report["ok"] and report["shards_run"] == report["num_shards"]
    scripts = list(bin_dir.glob("job-*.sh"))
    assert len(scripts) == 1 and "#SBATCH -t 00:20:00" in scripts[0].read_text()
    assert _files(out) == _files(reference)


# ------------------------------------------------------------------------------------------------ object storage

def _upload_corpus(kit, url, opts, with_lengths: bool) -> str:
    """The corpus's audio under url/audio/ and a JSONL manifest at url/m.jsonl pointing there."""
    import fsspec

    rows = []
    for u in load_manifest(kit["manifest"]):
        dest = f"{url}/audio/{os.path.basename(u.audio)}"
        with open(u.audio, "rb") as src, fsspec.open(dest, "wb", **opts) as dst:
            dst.write(src.read())
        row = {"id": u.id, "audio": dest}
        if with_lengths:
            row.update(sample_rate=u.sample_rate, num_samples=u.num_samples)
        rows.append(row)
    with fsspec.open(f"{url}/m.jsonl", "w", **opts) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return f"{url}/m.jsonl"


def test_manifest_and_audio_on_s3_probed_and_extracted(kit, reference, s3_bucket):
    """Manifest and audio on S3, no lengths in the manifest: read and probed with the storage options (the manifest
    options default to them), extracted by the workers; the same store as from local files."""
    url, opts = s3_bucket
    manifest = _upload_corpus(kit, url, opts, with_lengths=False)
    out = f"{url}/ci.zarr"
    rep = run_extraction(manifest, _cfg(kit, out, storage_options=opts), workers=1, shard_frames=SHARD,
                         progress=False)
    assert rep.ok
    store, ref = open_store(out, storage_options=opts), open_store(str(reference))
    assert store.plan == ref.plan and store.meta["plan_sha256"] == ref.meta["plan_sha256"]
    for uid in ref.ids:
        np.testing.assert_array_equal(store[uid], ref[uid])


def test_manifest_storage_options_and_json_report(kit, reference, s3_bucket, tmp_path):
    """A manifest on S3 read with --manifest-storage-options only (audio and store local): the summary as JSON."""
    url, opts = s3_bucket
    rows = [{"id": u.id, "audio": u.audio, "sample_rate": u.sample_rate, "num_samples": u.num_samples}
            for u in load_manifest(kit["manifest"])]
    import fsspec

    with fsspec.open(f"{url}/local-audio.jsonl", "w", **opts) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "store"
    args = ["extract", f"{url}/local-audio.jsonl", "--teacher", kit["teacher"], "--layer", "2", "--quantizer",
            kit["quantizer"], "--out", str(out), "--shard-frames", str(SHARD), "--workers", "1", "--no-progress"]
    res = CliRunner().invoke(cli, args + ["--json", "--manifest-storage-options", json.dumps(opts)])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)  # stdout holds the JSON object alone
    store = open_store(str(out))
    assert report["ok"] is True and report["failures"] == {}
    assert report["num_shards"] == store.plan.num_shards == report["shards_run"]
    assert report["frames"] == store.total_frames and report["frames_per_second"] > 0
    assert report["provenance"] == {"device": "cpu", "dtype": "float32", "torch_threads": 1}
    assert report["out"] == str(out) and report["workers"] == 1
    assert _files(out) == _files(reference)


# ------------------------------------------------------------------------------------------------ probing, progress

def test_probing_runs_threaded_with_progress_and_placeholders(kit, tmp_path, capsys):
    from distill.data.audio import probe_utterance
    from distill.extract.planning import probe_all

    utts = [u for u in load_manifest(kit["manifest"])]
    bare = [type(u)(id=u.id, audio=u.audio) for u in utts]
    missing = type(utts[0])(id="gone", audio=str(tmp_path / "gone.wav"))
    sized = type(utts[0])(id="sized", audio=str(tmp_path / "gone2.wav"), sample_rate=16000, num_samples=800)
    probed = probe_all(bare + [missing, sized], None, threads=4, progress=True)
    assert probed[:-2] == [probe_utterance(u) for u in bare]
    assert probed[-2].num_samples == 0  # unreadable: a placeholder that fails, with its reason, in its shard
    assert probed[-1] is sized  # lengths given: never opened
    err = capsys.readouterr().err
    n = len(bare) + 1
    assert f"{n}/{n}" in err and "probe" in err


def _report_progress(topic):
    from distill.extract.job import ShardProgress

    p = ShardProgress(topic, 3, interval=0)
    p(5)
    p(7)
    return p.worker is not None


def test_shard_progress_events_reach_the_driver(kit, tmp_path, monkeypatch):
    from dask.distributed import Client, LocalCluster

    from distill.extract import job

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as lc, \
            Client(lc) as client:
        assert client.submit(_report_progress, "t-progress", pure=False).result()
        deadline = time.time() + 60
        while len(client.get_events("t-progress")) < 2 and time.time() < deadline:
            time.sleep(0.05)
        msgs = [(m["shard"], m["frames"]) for _, m in client.get_events("t-progress")]
        assert msgs == [(3, 5), (3, 12)]  # cumulative frames of the shard
    assert _report_progress("t") is False  # outside a worker: nothing to report to, and no error

    seen, final = [], []
    on_event, close = job._FrameBar.on_event, job._FrameBar.close
    monkeypatch.setattr(job._FrameBar, "on_event", lambda self, ev: (seen.append(ev[1]), on_event(self, ev)))
    monkeypatch.setattr(job._FrameBar, "close", lambda self: (final.append((self.bar.n, self.bar.total)),
                                                              close(self)))
    rep = run_extraction(kit["manifest"], _cfg(kit, tmp_path / "store"), workers=1, shard_frames=SHARD,
                         progress=True)
    assert rep.ok and seen and {m["shard"] for m in seen} <= set(range(rep.num_shards))
    assert all(m["frames"] > 0 for m in seen)
    assert final and final[0][0] == final[0][1] > 0  # the bar ends at every planned frame
