"""Student training: the loss falls, runs are deterministic, and a resumed run equals an uninterrupted one."""
import json

import pytest
import torch
from safetensors.torch import load_file

from distill.data.manifest import load_manifest
from distill.data.tokenizer import normalize_text
from distill.student.trainer import TrainConfig, evaluate, evaluate_model, load_student, train_student
from scoring import edit_distance

TINY = dict(d_model=32, num_layers=2, num_heads=2, conv_kernel=7, subsampling_channels=8, pred_dim=32,
            joiner_dim=32, dropout=0.1)


def _cfg(**kw):
    base = dict(kd="none", epochs=2, max_seconds=20, lr=3e-3, warmup_steps=2, log_every=1, checkpoint_every=0,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _weights(run_dir):
    return {k: v for k, v in load_file(str(run_dir / "last.safetensors")).items() if k.startswith("model.")}


def test_loss_falls_and_run_is_evaluable(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    train_student(tiny_corpus["train"], str(run), cfg=_cfg(epochs=4), student=TINY, progress=False)
    recs = [json.loads(l) for l in open(run / "log.jsonl")]
    losses = [r["loss_transducer"] for r in recs if "loss_transducer" in r]
    assert len(losses) >= 6
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    assert (run / "curves.png").stat().st_size > 1000
    res = evaluate(str(run), tiny_corpus["dev"])
    dev = load_manifest(tiny_corpus["dev"])
    assert res["words"] == sum(len(normalize_text(u.text).split()) for u in dev) > 0
    # the errors are the word edit distance between each reference and the student's greedy hypothesis
    model, tok = load_student(str(run))
    full = evaluate_model(model, tok, dev, return_hyps=True)
    assert set(full["hyps"]) == {u.id for u in dev}
    errors = sum(edit_distance(full["refs"][u].split(), full["hyps"][u].split()) for u in full["refs"])
    assert res["errors"] == full["errors"] == errors
    assert res["wer"] == pytest.approx(errors / res["words"])


def test_resume_continues_the_same_run(tiny_corpus, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train_student(tiny_corpus["train"], str(full), cfg=_cfg(), student=TINY, progress=False)
    out = train_student(tiny_corpus["train"], str(resumed), cfg=_cfg(), student=TINY, progress=False,
                        stop_after_steps=3)
    assert out["stopped_early"] and out["step"] == 3
    train_student(tiny_corpus["train"], str(resumed), cfg=_cfg(), student=TINY, progress=False)
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps_full = [r["step"] for r in map(json.loads, open(full / "log.jsonl")) if "loss" in r]
    steps_resumed = [r["step"] for r in map(json.loads, open(resumed / "log.jsonl")) if "loss" in r]
    assert steps_full == steps_resumed


def test_resume_refuses_changed_settings(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    train_student(tiny_corpus["train"], str(run), cfg=_cfg(), student=TINY, progress=False, stop_after_steps=1)
    with pytest.raises(ValueError, match="other training settings"):
        train_student(tiny_corpus["train"], str(run), cfg=_cfg(lr=1e-4), student=TINY, progress=False)


def test_kd_without_labels_is_refused(tiny_corpus, tmp_path):
    with pytest.raises(ValueError, match="needs --labels"):
        train_student(tiny_corpus["train"], str(tmp_path / "r"), cfg=_cfg(kd="mvq"), student=TINY, progress=False)


def test_cli_max_steps_stops_records_and_resumes(tiny_corpus, tmp_path):
    """train-student --max-steps N: stops at update N with a checkpoint; the same command again does nothing; without
    it the run continues to the end of its schedule, as one uninterrupted run does."""
    from click.testing import CliRunner

    from cli.main import main

    run, full = tmp_path / "run", tmp_path / "full"
    base = ["train-student", "--train", tiny_corpus["train"], "--kd", "none", "--epochs", "2", "--threads", "1",
            "--max-seconds", "20", "--warmup-steps", "2", "--no-progress", "--student", json.dumps(TINY)]
    res = CliRunner().invoke(main, [*base, "--out", str(run), "--max-steps", "1"])
    assert res.exit_code == 0, res.output
    assert json.load(open(run / "last.json"))["step"] == 1
    # the stop is logged although step 1 is neither on the log_every (10) grid nor an epoch's end
    last = [json.loads(line) for line in open(run / "log.jsonl")][-1]
    assert last["step"] == 1 and last["time"] > 0
    res = CliRunner().invoke(main, [*base, "--out", str(run), "--max-steps", "1"])
    assert res.exit_code == 0, res.output
    assert "nothing to do" in res.output and json.load(open(run / "last.json"))["step"] == 1
    sessions = json.load(open(run / "config.json"))["runtime"]["sessions"]
    assert [(s["step"], s.get("stop_after_steps")) for s in sessions] == [(0, 1), (1, 1)]
    assert CliRunner().invoke(main, [*base, "--out", str(run)]).exit_code == 0
    assert CliRunner().invoke(main, [*base, "--out", str(full)]).exit_code == 0
    assert json.load(open(run / "last.json"))["step"] == json.load(open(full / "last.json"))["step"] > 1
    a, b = _weights(full), _weights(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "bad"), "--max-steps", "0"])
    assert res.exit_code != 0 and "--max-steps" in res.output
