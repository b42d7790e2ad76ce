"""Student (and teacher) training at scale: data-parallel processes, gradient accumulation, mixed precision, devices.

The central claim: W processes with accumulation A see exactly the batches of one process with accumulation W*A
and make the same updates (up to floating-point reduction order), also across an interruption and resume of the
W-process run. Tested with 2 gloo processes on CPU; the CUDA paths (nccl, cuda devices, float16 loss scaling on
a GPU) run where a GPU is present.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cli.main import main
from distill.data.manifest import load_manifest
from distill.student.distributed import RankBatches
from distill.student.trainer import TrainingError, evaluate, train_student
from test_train import TINY, _cfg, _weights

NO_DROPOUT = dict(TINY, dropout=0.0)  # dropout masks differ per rank by design; the math must not
SCALE = dict(epochs=3, max_seconds=4)  # ~7 batches an epoch on the tiny corpus: 3 updates of 2 batches each
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _losses(run_dir):
    return [(r["step"], r["loss"], r["loss_transducer"]) for r in map(json.loads, open(run_dir / "log.jsonl"))
            if "loss" in r]


def _assert_same_run(a_dir, b_dir, rtol=1e-4, atol=1e-6):
    la, lb = _losses(a_dir), _losses(b_dir)
    assert [s for s, *_ in la] == [s for s, *_ in lb] and len(la) >= 8
    for (step, *xa), (_, *xb) in zip(la, lb):
        assert xa == pytest.approx(xb, rel=rtol), step
    wa, wb = _weights(a_dir), _weights(b_dir)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=atol, msg=k)


class _ListSampler:
    def __init__(self, n):
        self.batches = [[i] for i in range(n)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def test_rank_batches_split_each_update_across_ranks():
    inner = _ListSampler(27)  # W*A = 6: 4 updates, 3 batches left over
    W, A = 2, 3
    per_rank = [list(RankBatches(inner, rank=r, world_size=W, accum=A)) for r in range(W)]
    assert [len(p) for p in per_rank] == [len(RankBatches(inner, rank=r, world_size=W, accum=A)) for r in range(W)]
    assert all(len(p) == 4 * A for p in per_rank)  # every rank takes the same number of micro-steps
    one = list(RankBatches(inner, world_size=1, accum=W * A))
    for k in range(4):
        # update k: rank r's micro-step a is global batch k*W*A + a*W + r; together the single process's update k
        got = [per_rank[r][k * A + a][0] for a in range(A) for r in range(W)]
        assert got == [b[0] for b in one[k * W * A:(k + 1) * W * A]] == list(range(k * 6, k * 6 + 6))
    assert max(b[0] for p in per_rank for b in p) == 23  # the remainder (24..26) is dropped
    resumed = list(RankBatches(inner, rank=1, world_size=W, accum=A, skip_updates=3))
    assert resumed == per_rank[1][3 * A:] and len(RankBatches(inner, rank=1, world_size=W, accum=A,
                                                              skip_updates=3)) == A


def test_two_processes_equal_one_with_accum_grad_2_across_a_resume(tiny_corpus, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train_student(tiny_corpus["train"], str(one), cfg=_cfg(**SCALE, accum_grad=2), student=NO_DROPOUT,
                  progress=False)
    out = train_student(tiny_corpus["train"], str(two), cfg=_cfg(**SCALE), student=NO_DROPOUT, progress=False,
                        world_size=2, stop_after_steps=4)
    assert out["stopped_early"] and out["step"] == 4  # rank 0's summary comes back from the spawned processes
    ckpt = load_file(str(two / "last.safetensors"))
    assert not torch.equal(ckpt["rng.torch"], ckpt["rng.torch.rank1"])  # each rank's dropout stream is kept
    train_student(tiny_corpus["train"], str(two), cfg=_cfg(**SCALE), student=NO_DROPOUT, progress=False,
                  world_size=2)
    _assert_same_run(one, two)
    # every update took 2 batches: the lr schedule and the log count updates, not batches
    steps = [s for s, *_ in _losses(one)]
    assert steps == list(range(1, len(steps) + 1))
    saved = json.load(open(two / "config.json"))
    assert saved["runtime"]["world_size"] == 2
    assert [(s["world_size"], s["backend"], s["step"]) for s in saved["runtime"]["sessions"]] == \
        [(2, "gloo", 0), (2, "gloo", 4)]
    assert json.load(open(one / "config.json"))["train"]["accum_grad"] == 2
    # resuming the 2-process run with one process would change what each update sees: refused, naming the option
    with pytest.raises(TrainingError, match="--world-size 1: the run .* 2 process"):
        train_student(tiny_corpus["train"], str(two), cfg=_cfg(**SCALE), student=NO_DROPOUT, progress=False)
    with pytest.raises(TrainingError, match="^--world-size 3: the run .* 2 process"):  # before any process starts
        train_student(tiny_corpus["train"], str(two), cfg=_cfg(**SCALE), student=NO_DROPOUT, progress=False,
                      world_size=3)


def test_torchrun_two_processes_equal_cli_accum_grad_2(tiny_corpus, tmp_path):
    common = ["train-student", "--train", tiny_corpus["train"], "--kd", "none", "--epochs", "2", "--max-seconds",
              "4", "--warmup-steps", "2", "--threads", "1", "--student", json.dumps(NO_DROPOUT), "--no-progress"]
    r = CliRunner().invoke(main, common + ["--out", str(tmp_path / "one"), "--accum-grad", "2"])
    assert r.exit_code == 0, r.output
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "cli"] + common +
                       ["--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count('"step"') == 1  # the summary line, from rank 0 only
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-6, msg=k)
    assert json.load(open(tmp_path / "two" / "config.json"))["runtime"]["world_size"] == 2
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "two"), tiny_corpus["dev"], "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["words"] > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_on_cpu(tiny_corpus, tmp_path, dtype):
    ref, run = tmp_path / "f32", tmp_path / dtype
    train_student(tiny_corpus["train"], str(ref), cfg=_cfg(), student=NO_DROPOUT, progress=False, stop_after_steps=2)
    train_student(tiny_corpus["train"], str(run), cfg=_cfg(dtype=dtype), student=NO_DROPOUT, progress=False,
                  stop_after_steps=2)
    a, b = _losses(ref), _losses(run)
    # autocast really ran the forward in the lower precision: close to float32, not equal to it
    assert a[0][1] != b[0][1] and b[0][1] == pytest.approx(a[0][1], rel=0.05)
    assert all(torch.isfinite(torch.tensor([x[1] for x in b])))
    assert json.load(open(run / "config.json"))["train"]["dtype"] == dtype
    assert all(v.dtype == torch.float32 for v in _weights(run).values())  # weights stay float32
    with pytest.raises(TrainingError, match="--dtype float32: the run .* --dtype " + dtype):
        train_student(tiny_corpus["train"], str(run), cfg=_cfg(), student=NO_DROPOUT, progress=False)
    with pytest.raises(TrainingError, match="--accum-grad 2: the run .* --accum-grad 1"):
        train_student(tiny_corpus["train"], str(run), cfg=_cfg(dtype=dtype, accum_grad=2), student=NO_DROPOUT,
                      progress=False)
    res = evaluate(str(run), tiny_corpus["dev"], dtype=dtype)
    assert res["words"] > 0


def test_float16_resume_continues_the_loss_scale(tiny_corpus, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    cfg = _cfg(dtype="float16", max_seconds=6)
    train_student(tiny_corpus["train"], str(full), cfg=cfg, student=TINY, progress=False)
    train_student(tiny_corpus["train"], str(resumed), cfg=cfg, student=TINY, progress=False, stop_after_steps=2)
    meta = json.load(open(resumed / "last.json"))
    assert meta["grad_scaler"]["scale"] > 1 and meta["grad_scaler"]["_growth_tracker"] >= 1
    train_student(tiny_corpus["train"], str(resumed), cfg=cfg, student=TINY, progress=False)
    assert _losses(full) == _losses(resumed)
    # the scaler's state went on from the checkpoint (a fresh scaler would count its growth interval from 0)
    assert json.load(open(full / "last.json"))["grad_scaler"] == json.load(open(resumed / "last.json"))["grad_scaler"]
    a, b = _weights(full), _weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_device_dtype_and_accum_are_refused(tiny_corpus, tmp_path):
    base = ["train-student", "--train", tiny_corpus["train"], "--kd", "none", "--out", str(tmp_path / "r")]
    r = CliRunner().invoke(main, base + ["--device", "gpu"])
    assert r.exit_code == 2 and "--device" in r.output and "'gpu' is not a device" in r.output
    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    r = CliRunner().invoke(main, base + ["--device", missing])
    assert r.exit_code == 2 and "--device" in r.output
    assert ("only" if torch.cuda.is_available() else "no CUDA device is usable") in r.output
    r = CliRunner().invoke(main, base + ["--accum-grad", "0"])
    assert r.exit_code == 2 and "--accum-grad" in r.output
    r = CliRunner().invoke(main, base + ["--dtype", "float8"])
    assert r.exit_code == 2 and "--dtype" in r.output
    # more batches per update than an epoch holds: named, before any training
    with pytest.raises(TrainingError, match="--accum-grad 500"):
        train_student(tiny_corpus["train"], str(tmp_path / "big"), cfg=_cfg(accum_grad=500), student=TINY,
                      progress=False)
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "r"), tiny_corpus["dev"], "--device", "tpu"])
    assert r.exit_code == 2 and "--device" in r.output
    assert not os.path.exists(tmp_path / "r" / "last.safetensors")


def test_evaluate_reads_s3_audio_with_storage_options(tiny_corpus, tmp_path, s3_bucket):
    import fsspec

    url, so = s3_bucket
    run = tmp_path / "run"
    train_student(tiny_corpus["train"], str(run), cfg=_cfg(), student=TINY, progress=False, stop_after_steps=2)
    lines = []
    for u in load_manifest(tiny_corpus["dev"]):
        remote = f"{url}/dev/{os.path.basename(u.audio)}"
        with open(u.audio, "rb") as src, fsspec.open(remote, "wb", **so) as dst:
            dst.write(src.read())
        lines.append(json.dumps({"id": u.id, "audio": remote, "text": u.text, "sample_rate": u.sample_rate,
                                 "num_samples": u.num_samples}))
    manifest = tmp_path / "dev_s3.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(main, ["evaluate", str(run), str(manifest), "--json", "--storage-options",
                                  json.dumps(so)])
    assert r.exit_code == 0, r.output
    remote_res = json.loads(r.output)
    local_res = evaluate(str(run), tiny_corpus["dev"])
    assert remote_res == local_res and remote_res["words"] > 0
    r = CliRunner().invoke(main, ["evaluate", str(run), str(manifest), "--storage-options", "[1]"])
    assert r.exit_code == 2 and "--storage-options" in r.output


def test_teacher_accum_grad_updates_count_batches_pairs(tiny_corpus, tmp_path):
    from distill.teachers.training import TeacherTrainConfig, train_teacher

    tiny = dict(d_model=32, num_layers=2, num_heads=2, ffn_dim=64, num_threads=1, num_workers=1,
                max_seconds_per_batch=4.0, epochs=1)
    one = train_teacher(tiny_corpus["train"], str(tmp_path / "a.safetensors"), TeacherTrainConfig(**tiny),
                        progress=False, echo=lambda m: None)
    two = train_teacher(tiny_corpus["train"], str(tmp_path / "b.safetensors"),
                        TeacherTrainConfig(**tiny, accum_grad=2, dtype="bfloat16"), progress=False,
                        echo=lambda m: None)
    steps = lambda res: [r for r in map(json.loads, open(res.log_path)) if r["type"] == "step"]  # noqa: E731
    a, b = steps(one), steps(two)
    assert len(b) == len(a) // 2 >= 2
    # the same batch plan: update k of the accumulated run holds batches 2k and 2k+1 of the plain run
    for k, rec in enumerate(b):
        assert rec["audio_seconds"] == pytest.approx(a[2 * k]["audio_seconds"] + a[2 * k + 1]["audio_seconds"],
                                                     abs=2e-3)
        assert rec["utterances"] == a[2 * k]["utterances"] + a[2 * k + 1]["utterances"]
    summary = json.load(open(two.summary_path))
    assert (summary["config"]["accum_grad"], summary["config"]["dtype"], summary["config"]["device"]) == \
        (2, "bfloat16", "cpu")
    r = CliRunner().invoke(main, ["train-teacher", "--train", tiny_corpus["train"], "--out",
                                  str(tmp_path / "c.safetensors"), "--accum-grad", "0"])
    assert r.exit_code == 2 and "--accum-grad" in r.output


# ------------------------------------------------------------------------------------------------ CUDA only

@CUDA
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cuda_run_resumes_and_evaluates_on_cpu(tiny_corpus, tmp_path, dtype):
    gpu, cont = tmp_path / "gpu", tmp_path / "cpu"
    train_student(tiny_corpus["train"], str(gpu), cfg=_cfg(dtype=dtype), student=NO_DROPOUT, progress=False,
                  device="cuda", stop_after_steps=2)
    assert all(v.device.type == "cpu" for v in load_file(str(gpu / "last.safetensors")).values())
    shutil.copytree(gpu, cont)
    out = train_student(tiny_corpus["train"], str(cont), cfg=_cfg(dtype=dtype), student=NO_DROPOUT,
                        progress=False, device="cpu", stop_after_steps=4)
    assert out["step"] == 4 and torch.isfinite(torch.tensor(out["loss"]))
    sessions = json.load(open(cont / "config.json"))["runtime"]["sessions"]
    assert [(s["device"], s["step"]) for s in sessions] == [("cuda", 0), ("cpu", 2)]
    assert evaluate(str(gpu), tiny_corpus["dev"], device="cpu")["words"] == \
        evaluate(str(gpu), tiny_corpus["dev"], device="cuda", dtype=dtype)["words"] > 0


@CUDA
def test_cuda_teacher_float16(tiny_corpus, tmp_path):
    from distill.teachers.training import TeacherTrainConfig, train_teacher

    res = train_teacher(tiny_corpus["train"], str(tmp_path / "t.safetensors"),
                        TeacherTrainConfig(d_model=32, num_layers=2, num_heads=2, ffn_dim=64, epochs=1,
                                           max_seconds_per_batch=4.0, device="cuda", dtype="float16",
                                           accum_grad=2), progress=False, echo=lambda m: None)
    assert res.steps >= 2 and next(res.model.parameters()).device.type == "cpu"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="no CUDA device (nccl needs 2, one per rank)")
def test_nccl_two_gpus_equal_one_gpu_with_accum_grad_2(tiny_corpus, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train_student(tiny_corpus["train"], str(one), cfg=_cfg(**SCALE, accum_grad=2), student=NO_DROPOUT,
                  progress=False, device="cuda:0")
    train_student(tiny_corpus["train"], str(two), cfg=_cfg(**SCALE), student=NO_DROPOUT, progress=False,
                  device="cuda", world_size=2)
    _assert_same_run(one, two, rtol=1e-3, atol=1e-5)  # GPU kernels: looser than gloo on CPU
    assert json.load(open(two / "config.json"))["runtime"]["sessions"][0]["backend"] == "nccl"
