"""On-the-fly teacher labels equal the labels extraction stores (same teacher, same quantizer, same alignment), so
train-student --online-teacher trains exactly as train-student --labels does from the store."""
import hashlib
import json

import numpy as np
import pytest
import torch

from distill.codec.quantizer import MultiCodebookQuantizer
from distill.data.audio import read_audio
from distill.data.dataset import KDDataset, collate
from distill.data.manifest import load_manifest
from distill.data.tokenizer import CharTokenizer
from distill.extract.job import ExtractionConfig, run_extraction
from distill.student.online_teacher import OnlineTeacher, OnlineTeacherSpec
from distill.student.trainer import TrainConfig, TrainingError, train_student
from distill.teachers import load_teacher
from tests.test_extract import tiny_teacher_and_quantizer


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_corpus):
    d = tmp_path_factory.mktemp("online")
    teacher, quantizer = tiny_teacher_and_quantizer(d, tiny_corpus["train"])
    cfg = ExtractionConfig(teacher=teacher, layer=2, quantizer=quantizer, out=str(d / "ci"),
                           float_labels=str(d / "f32"), float_dtype="float32")
    run_extraction(tiny_corpus["train"], cfg, workers=1, progress=False)
    return {"teacher": teacher, "quantizer": quantizer, "ci": str(d / "ci"), "f32": str(d / "f32"),
            "utts": load_manifest(tiny_corpus["train"])}


def _stored_batch(utts, labels):
    ds = KDDataset(utts, CharTokenizer.build([u.text or "" for u in utts]), labels=labels)
    return ds, collate([ds[i] for i in range(len(ds))])


@pytest.mark.parametrize("kind", ["codes", "float"])
def test_online_labels_equal_stored_labels(extracted, kind):
    utts = extracted["utts"][:6]
    ds, stored = _stored_batch(utts, extracted["ci" if kind == "codes" else "f32"])
    teacher = load_teacher(extracted["teacher"], layer=2)
    q = MultiCodebookQuantizer.load(extracted["quantizer"]) if kind == "codes" else None
    online = OnlineTeacher(teacher, q)
    assert (online.kind, online.k, online.label_width) == (ds.kind, ds.k, ds.label_width)
    by_id = {u.id: u for u in extracted["utts"]}

    def wave(uid):
        return read_audio(by_id[uid], teacher.sample_rate)

    if kind == "float":
        # the store's statistics are over all its utterances; so are these
        online.fit_stats([u.id for u in extracted["utts"]], wave)
        np.testing.assert_array_equal(online.label_mean, ds.label_mean)
        np.testing.assert_array_equal(online.label_std, ds.label_std)
    labels, mask = online.batch_labels([wave(i) for i in stored["ids"]],
                                       [int(n) for n in stored["feat_lens"]], stored["ids"])
    assert labels.dtype == stored["labels"].dtype
    assert torch.equal(mask, stored["label_mask"])
    assert torch.equal(labels, stored["labels"])  # bit for bit: the same training follows
    assert online.seconds > 0


def test_float_labels_need_stats(extracted):
    online = OnlineTeacher(load_teacher(extracted["teacher"], layer=2))
    u = extracted["utts"][0]
    with pytest.raises(RuntimeError, match="fit_stats"):
        online.utterance_labels(read_audio(u, 16000))


def test_quantizer_of_another_dimension_is_refused(extracted):
    teacher = load_teacher(extracted["teacher"], layer=2)
    q = MultiCodebookQuantizer.train(np.random.default_rng(0).normal(size=(600, 16)).astype(np.float32),
                                     num_codebooks=2, seed=0, progress=False)
    with pytest.raises(ValueError, match="16-dim"):
        OnlineTeacher(teacher, q)


# ------------------------------------------------------------------ train-student with the teacher in the loop
TINY = dict(d_model=32, num_layers=2, num_heads=2, conv_kernel=7, subsampling_channels=8, pred_dim=32,
            joiner_dim=32, dropout=0.1)  # dropout on: the two runs must also draw the same masks


def _train_cfg(kd):
    return TrainConfig(kd=kd, kd_scale=0.1 if kd == "mvq" else 1.0, epochs=2, max_seconds=8, lr=3e-3,
                       warmup_steps=2, log_every=1, checkpoint_every=0, threads=1)


def _spec(extracted, kd, **kw):
    return OnlineTeacherSpec(extracted["teacher"], layer=kw.pop("layer", 2),
                             quantizer=extracted["quantizer"] if kd == "mvq" else None, **kw)


@pytest.fixture(scope="module")
def runs(extracted, tiny_corpus, tmp_path_factory):
    """Uninterrupted runs, made once: (kd, "store" | "online") -> run directory."""
    made = {}

    def get(kd, source):
        if (kd, source) not in made:
            out = tmp_path_factory.mktemp(f"{kd}-{source}")
            if source == "store":
                train_student(tiny_corpus["train"], str(out), labels=extracted["ci" if kd == "mvq" else "f32"],
                              cfg=_train_cfg(kd), student=TINY, progress=False)
            else:
                train_student(tiny_corpus["train"], str(out), online_teacher=_spec(extracted, kd),
                              cfg=_train_cfg(kd), student=TINY, progress=False)
            made[kd, source] = out
        return made[kd, source]

    return get


def _log(run):
    return [r for r in map(json.loads, open(run / "log.jsonl")) if "loss" in r]


def _weights(run):
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(run / "last.safetensors")).items() if k.startswith("model.")}


@pytest.mark.parametrize("kd", ["l2", "mvq"])
def test_same_labels_give_the_same_training(runs, extracted, kd):
    """The store and the teacher-in-the-loop feed the student the same labels, so the runs log the same losses
    step by step (the baseline differs from the store in speed only)."""
    store, online = _log(runs(kd, "store")), _log(runs(kd, "online"))
    assert len(store) == len(online) >= 4
    for a, b in zip(store, online):
        assert a["step"] == b["step"] and a["utterances"] == b["utterances"]
        for key in ("loss", "loss_transducer", "loss_kd", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=0), (a["step"], key)
        assert "teacher_seconds" not in a
    seconds = [r["teacher_seconds"] for r in online]
    assert seconds[0] > 0 and all(y > x for x, y in zip(seconds, seconds[1:]))  # cumulative, every step labels
    a_cfg, b_cfg = (json.load(open(runs(kd, s) / "config.json")) for s in ("store", "online"))
    assert a_cfg["student"] == b_cfg["student"]  # kd_stack, codebooks / teacher_dim taken from the teacher
    rec = b_cfg["online_teacher"]
    assert rec["teacher"] == extracted["teacher"] and rec["layer"] == 2 and b_cfg["labels"] is None
    assert rec["checkpoint_sha256"] == hashlib.sha256(open(extracted["teacher"], "rb").read()).hexdigest()
    want_q = MultiCodebookQuantizer.load(extracted["quantizer"]).quantizer_id if kd == "mvq" else None
    assert rec["quantizer_id"] == want_q and a_cfg["online_teacher"] is None


def test_online_run_resumes_to_the_uninterrupted_run(runs, extracted, tiny_corpus, tmp_path):
    run = tmp_path / "r"
    out = train_student(tiny_corpus["train"], str(run), online_teacher=_spec(extracted, "mvq"),
                        cfg=_train_cfg("mvq"), student=TINY, progress=False, stop_after_steps=2)
    assert out["stopped_early"]
    # a resume keeps its label source: not another layer (other labels), not the store in its place
    with pytest.raises(TrainingError, match="--layer"):
        train_student(tiny_corpus["train"], str(run), online_teacher=_spec(extracted, "mvq", layer=1),
                      cfg=_train_cfg("mvq"), student=TINY, progress=False)
    with pytest.raises(TrainingError, match="--online-teacher"):
        train_student(tiny_corpus["train"], str(run), labels=extracted["ci"], cfg=_train_cfg("mvq"), student=TINY,
                      progress=False)
    train_student(tiny_corpus["train"], str(run), online_teacher=_spec(extracted, "mvq"), cfg=_train_cfg("mvq"),
                  student=TINY, progress=False)
    full = runs("mvq", "online")
    a, b = _weights(full), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _log(run)] == [r["loss"] for r in _log(full)]


def test_store_run_does_not_resume_on_the_fly(extracted, tiny_corpus, tmp_path):
    run = tmp_path / "r"
    train_student(tiny_corpus["train"], str(run), labels=extracted["f32"], cfg=_train_cfg("l2"), student=TINY,
                  progress=False, stop_after_steps=1)
    with pytest.raises(TrainingError, match="--labels"):
        train_student(tiny_corpus["train"], str(run), online_teacher=_spec(extracted, "l2"), cfg=_train_cfg("l2"),
                      student=TINY, progress=False)


def _cli(args):
    from click.testing import CliRunner

    from cli.main import main

    return CliRunner().invoke(main, ["train-student", *args])


def test_cli_refuses_contradictory_label_sources(extracted, tiny_corpus, tmp_path):
    base = ["--train", tiny_corpus["train"], "--out", str(tmp_path / "r"), "--no-progress"]
    t, q = extracted["teacher"], extracted["quantizer"]
    cases = [
        (["--kd", "l2", "--labels", extracted["f32"], "--online-teacher", t, "--layer", "2"], "--online-teacher",
         "not both"),
        (["--kd", "mvq", "--online-teacher", t, "--layer", "2"], "--quantizer", "needs --quantizer"),
        (["--kd", "l1", "--online-teacher", t, "--layer", "2", "--quantizer", q], "--quantizer", "--kd mvq"),
        (["--kd", "l2", "--online-teacher", t], "--layer", "needs --layer"),
        (["--kd", "none", "--online-teacher", t, "--layer", "2"], "--online-teacher", "--kd none"),
        (["--kd", "mvq", "--labels", extracted["ci"], "--quantizer", q], "--quantizer", "add --online-teacher"),
        (["--kd", "mvq", "--labels", extracted["ci"], "--layer", "2"], "--layer", "add --online-teacher"),
    ]
    for args, option, why in cases:
        r = _cli(base + args)
        assert r.exit_code == 2, (args, r.output)
        assert f"Invalid value for {option}:" in r.output and why in r.output, (args, r.output)
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_cli_trains_on_the_fly(extracted, tiny_corpus, tmp_path):
    out = tmp_path / "cli"
    r = _cli(["--train", tiny_corpus["train"], "--out", str(out), "--kd", "l2", "--online-teacher",
              extracted["teacher"], "--layer", "2", "--epochs", "1", "--max-seconds", "20", "--threads", "1",
              "--no-progress", "--student", json.dumps(TINY)])
    assert r.exit_code == 0, r.output
    saved = json.load(open(out / "config.json"))
    assert saved["online_teacher"]["layer"] == 2 and saved["online_teacher"]["teacher_dtype"] == "float32"
    assert saved["student"]["kd_type"] == "l2" and saved["student"]["teacher_dim"] == 32
    assert all(r["teacher_seconds"] > 0 for r in _log(out))
