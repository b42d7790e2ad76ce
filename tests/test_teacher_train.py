"""Teacher training (issue 6): CTC learns, runs are reproducible, the checkpoint feeds the extraction job, bad
data is refused with the utterance named. Tiny models on a ~40 s espeak-ng corpus keep this under a minute."""
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from distill.data.manifest import ManifestError, Utterance, load_manifest
from distill.teachers.native import NativeTeacherConfig, NativeTeacherModel
from distill.data.sampler import bucket_batches
from distill.teachers.training import (TeacherDataError, TeacherTrainConfig, _SpecAugment,
                                   evaluate_ctc, greedy_ctc_decode, load_trained_teacher, suggested_layer,
                                   tokenizer_path, train_teacher)
from distill.teachers import load_teacher
from distill.data.tokenizer import CharTokenizer

TINY = dict(d_model=32, num_layers=2, num_heads=2, ffn_dim=64, num_threads=1, num_workers=1,
            max_seconds_per_batch=12.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from distill.synth.corpus import EspeakMissingError, make_corpus

    out = str(tmp_path_factory.mktemp("corpus"))
    try:
        paths = make_corpus(out, hours=0.01, dev_hours=0.002, test_hours=0.0, seed=3, workers=2, progress=False)
    except EspeakMissingError as e:
        pytest.fail(str(e))  # the project installs espeak-ng (`make sysdeps`): missing, the run fails
    return paths


def _losses(log_path):
    with open(log_path) as f:
        return [r["loss"] for r in map(json.loads, f) if r["type"] == "step"]


def test_loss_falls_and_outputs_are_written(corpus, tmp_path):
    out = str(tmp_path / "t" / "teacher.safetensors")
    cfg = TeacherTrainConfig(**TINY, epochs=10, max_steps=36, lr=3e-3, warmup_steps=4, spec_augment=False)
    lines = []
    res = train_teacher(corpus["train"], out, cfg, dev=corpus["dev"], progress=False, echo=lines.append)
    losses = _losses(res.log_path)
    assert len(losses) == res.steps == 36
    assert all(np.isfinite(losses))
    assert np.mean(losses[-6:]) < 0.6 * np.mean(losses[:3]), losses
    # per-epoch dev scoring is printed and recorded
    assert res.history and all({"dev_cer", "dev_wer", "dev_loss", "train_loss"} <= set(h) for h in res.history)
    assert any("CER" in ln and "WER" in ln for ln in lines)
    assert res.history[-1]["dev_loss"] < res.history[0]["dev_loss"]
    for p in (out, res.tokenizer_path, res.summary_path):
        assert os.path.exists(p)
    summary = json.load(open(res.summary_path))
    assert summary["checkpoint_sha256"] == res.checkpoint_sha256 and summary["steps"] == 36
    assert summary["suggested_layer"] == suggested_layer(2) == 2


def test_same_seed_same_weights_other_seed_differs(corpus, tmp_path):
    def run(name, seed, **kw):
        cfg = TeacherTrainConfig(**{**TINY, **kw}, epochs=2, max_steps=5, seed=seed)
        return train_teacher(corpus["train"], str(tmp_path / name), cfg, progress=False, log_path=None,
                             echo=lambda m: None)

    a, b, c = run("a.safetensors", 7), run("b.safetensors", 7), run("c.safetensors", 8)
    # reading audio from disk in a DataLoader worker instead of the in-memory cache changes nothing
    d = run("d.safetensors", 7, cache_audio=False, num_workers=1)
    assert a.checkpoint_sha256 == b.checkpoint_sha256 == d.checkpoint_sha256
    sa, sc = a.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in sa.items())
    assert not all(torch.equal(v, sc[k]) for k, v in sa.items())
    assert a.checkpoint_sha256 != c.checkpoint_sha256


def test_checkpoint_loads_for_extraction_and_evaluation(corpus, tmp_path):
    out = str(tmp_path / "teacher.safetensors")
    cfg = TeacherTrainConfig(**{**TINY, "num_layers": 3}, epochs=1, max_steps=2)
    res = train_teacher(corpus["train"], out, cfg, progress=False, echo=lambda m: None)
    teacher = load_teacher(out, layer=2)
    assert (teacher.dim, teacher.num_layers, teacher.layer, teacher.frame_rate) == (32, 3, 2, 50.0)
    assert teacher.checkpoint_sha256 == res.checkpoint_sha256
    utts = load_manifest(corpus["dev"])[:2]
    from distill.data.audio import read_audio

    waves = [torch.from_numpy(read_audio(u, 16000)) for u in utts]
    x = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    lens = torch.tensor([len(w) for w in waves])
    frames, flen = teacher.embed(x, lens)
    expect = [res.model.num_frames(len(w)) for w in waves]
    assert flen.tolist() == expect and frames.shape == (2, max(expect), 32)
    # the teacher's hidden state equals the trained model's layer output (same weights, eval mode)
    with torch.no_grad():
        ref = res.model.eval()(waves[0][None], lens[:1]).hidden_states[2][0]
    torch.testing.assert_close(frames[0, :expect[0]], ref, rtol=1e-4, atol=1e-5)
    model, tok = load_trained_teacher(out)
    assert tok.symbols == res.tokenizer.symbols and model.config.vocab_size == tok.vocab_size
    ev = evaluate_ctc(model, tok, corpus["dev"])
    assert ev["utterances"] == len(load_manifest(corpus["dev"])) and 0 <= ev["cer"] and np.isfinite(ev["loss"])


def test_greedy_ctc_decode_merges_repeats_and_drops_blanks():
    tok = CharTokenizer(list("AB"))  # 0 blank, 1 unk, 2 space, 3 A, 4 B
    path = [3, 3, 0, 3, 4, 4, 2, 2, 4, 0, 1, 4]
    logits = torch.full((1, len(path) + 2, 5), -5.0)
    logits[0, torch.arange(len(path)), torch.tensor(path)] = 5.0
    logits[0, len(path):, 3] = 5.0  # beyond the length: must be ignored
    assert greedy_ctc_decode(logits, torch.tensor([len(path)]), tok) == ["AAB BB"]


def test_bucket_batches_cover_everything_within_budget():
    rng = np.random.default_rng(0)
    lengths = [int(v) for v in rng.integers(100, 1000, size=200)] + [5000]
    batches = bucket_batches(lengths, 3000, np.random.default_rng(1), num_buckets=5)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 3000
    assert [200] in batches  # too long for the budget: a batch of its own
    again = bucket_batches(lengths, 3000, np.random.default_rng(1), num_buckets=5)
    other = bucket_batches(lengths, 3000, np.random.default_rng(2), num_buckets=5)
    assert again == batches and other != batches
    # buckets keep padding low: padded size within 1.5x of the real audio
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded < 1.5 * sum(lengths)


def test_spec_augment_masks_training_features_only():
    torch.manual_seed(0)
    model = NativeTeacherModel(NativeTeacherConfig(d_model=16, num_heads=2, ffn_dim=32, num_layers=1))
    cfg = TeacherTrainConfig(freq_masks=2, freq_mask_width=10, time_masks_per_second=2.0, time_mask_width=15)
    aug = _SpecAugment(model, cfg, np.random.default_rng(0))
    feats = torch.randn(2, 300, 80)
    model.train()
    aug.draw(torch.tensor([3 * 16000, 2 * 16000]))
    masked = model.input_norm(feats)
    plain = model.input_norm(feats)  # mask is used once
    zeros = masked == 0
    assert zeros.any() and not (plain == 0).any()
    assert torch.equal(masked[~zeros], plain[~zeros])
    model.eval()
    aug.draw(torch.tensor([3 * 16000, 2 * 16000]))
    assert not (model.input_norm(feats) == 0).any()
    aug.remove()
    model.train()
    assert not (model.input_norm(feats) == 0).any()


def _utt(uid, text, path="/nonexistent.flac"):
    return Utterance(id=uid, audio=path, sample_rate=16000, num_samples=32000, text=text)


def test_bad_inputs_name_the_problem(tmp_path, corpus):
    out = str(tmp_path / "t.safetensors")
    cfg = TeacherTrainConfig(**TINY, max_steps=1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ManifestError, match="empty"):
        train_teacher(str(empty), out, cfg, progress=False)
    with pytest.raises(TeacherDataError, match="no utterances"):
        train_teacher([], out, cfg, progress=False)
    with pytest.raises(TeacherDataError, match="no transcript has usable characters.*'u1'"):
        train_teacher([_utt("u1", "?! --"), _utt("u2", "...")], out, cfg, progress=False)
    with pytest.raises(TeacherDataError, match="'u2'"):
        train_teacher([_utt("u1", "hello world"), _utt("u2", "?!")], out, cfg, progress=False)
    with pytest.raises(TeacherDataError, match="without a transcript.*'u9'"):
        train_teacher([_utt("u1", "hello"), _utt("u9", None)], out, cfg, progress=False)
    # a dev utterance without text is refused before any training
    with pytest.raises(TeacherDataError, match="dev.*'d1'"):
        train_teacher(corpus["train"], out, cfg, dev=[_utt("d1", "")], progress=False)
    # training utterances CTC cannot align (more characters than frames) are skipped and reported
    long_text = "a" * 200
    with pytest.raises(TeacherDataError, match="all 1 utterances were skipped"):
        train_teacher([_utt("u1", long_text)], out, cfg, progress=False)
    assert not os.path.exists(out)
    with pytest.raises(ValueError, match="divisible"):
        TeacherTrainConfig(d_model=30, num_heads=4).model_config(5)
    with pytest.raises(ValueError, match="epochs"):
        TeacherTrainConfig(epochs=0)


def test_cli_train_teacher(corpus, tmp_path):
    from cli.main import main

    out = str(tmp_path / "cli.safetensors")
    r = CliRunner().invoke(main, ["train-teacher", "--train", corpus["train"], "--dev", corpus["dev"], "--out", out,
                                  "--d-model", "32", "--layers", "2", "--heads", "2", "--max-steps", "2",
                                  "--threads", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "dev CER" in r.output and "--layer 2" in r.output
    assert load_teacher(out, layer=1).dim == 32 and os.path.exists(tokenizer_path(out))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x1", "audio": "/nope.wav", "text": "!!!", "duration": 1.0,
                               "sample_rate": 16000}) + "\n")
    r = CliRunner().invoke(main, ["train-teacher", "--train", str(bad), "--out", str(tmp_path / "bad.safetensors")])
    assert r.exit_code != 0 and "x1" in r.output


def test_cli_defaults_match_config():
    from cli.cmd_teacher import train_teacher_cmd

    opts = {p.name: p.default for p in train_teacher_cmd.params}
    c = TeacherTrainConfig()
    assert (opts["d_model"], opts["layers"], opts["heads"], opts["dropout"], opts["epochs"], opts["lr"],
            opts["max_seconds_per_batch"], opts["grad_clip"], opts["seed"], opts["threads"]) == \
        (c.d_model, c.num_layers, c.num_heads, c.dropout, c.epochs, c.lr, c.max_seconds_per_batch, c.grad_clip,
         c.seed, c.num_threads)
