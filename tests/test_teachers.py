"""Teachers: tiny random HF HuBERT/wav2vec2 checkpoints and the native encoder, loaded through load_teacher.

What matters for stored labels: exact frame counts, frames independent of batch composition, the right layer,
stable checkpoint hashes, and loading only through safe (non-pickle) paths.
"""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

from distill.teachers import (
    NativeTeacherConfig,
    NativeTeacherModel,
    load_native_model,
    load_teacher,
    log_mel,
    num_mel_frames,
    save_native_teacher,
)

LENGTHS = [1999, 640, 3210, 401]


def _hf_dir(root, name, model_type, norm, do_normalize=True, seed=0):
    import transformers  # a dev dependency; imported here so that the native-teacher tests run without it

    torch.manual_seed(seed)
    kw = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
              conv_dim=(16, 16, 16), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16,
              num_conv_pos_embedding_groups=2, feat_extract_norm=norm, do_stable_layer_norm=(norm == "layer"))
    if model_type == "hubert":
        model = transformers.HubertModel(transformers.HubertConfig(**kw))
    else:
        model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**kw))
    path = os.path.join(root, name)
    model.save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "padding_value": 0.0,
                   "sampling_rate": 16000, "do_normalize": do_normalize, "return_attention_mask": norm == "layer"}, f)
    return path, model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf"))
    return {"hubert-group": _hf_dir(root, "hubert-group", "hubert", "group"),
            "wav2vec2-layer": _hf_dir(root, "wav2vec2-layer", "wav2vec2", "layer", seed=1),
            "hubert-layer-nonorm": _hf_dir(root, "hubert-layer-nonorm", "hubert", "layer", do_normalize=False,
                                           seed=2)}


@pytest.fixture(scope="module")
def native_path(tmp_path_factory):
    torch.manual_seed(0)
    model = NativeTeacherModel(NativeTeacherConfig(d_model=48, num_heads=4, ffn_dim=96, num_layers=3,
                                                   vocab_size=12))
    path = str(tmp_path_factory.mktemp("native") / "teacher-small.safetensors")
    sha = save_native_teacher(model, path)
    return path, sha, model.eval()


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(len(lengths), max(lengths))
    for b, n in enumerate(lengths):
        w[b, :n] = torch.randn(n, generator=g) * (0.1 + 0.2 * b)
    return w, torch.tensor(lengths)


def _assert_batch_invariant(teacher, lengths):
    w, lens = _batch(lengths)
    frames, flen = teacher.embed(w, lens)
    assert frames.dtype == torch.float32 and frames.shape == (len(lengths), max(flen), teacher.dim)
    # the same utterances in another batch: reversed order, plus a much longer and a minimal neighbour
    order = list(reversed(range(len(lengths))))
    other = [lengths[i] for i in order] + [max(lengths) + 777, teacher.min_samples]
    w2, l2 = _batch(other, seed=5)
    for j, i in enumerate(order):
        w2[j, :lengths[i]] = w[i, :lengths[i]]
    f2, fl2 = teacher.embed(w2, l2)
    for b, n in enumerate(lengths):
        alone, alen = teacher.embed(w[b:b + 1, :n], torch.tensor([n]))
        assert int(alen[0]) == int(flen[b]) == teacher.num_frames(n) == alone.shape[1]
        torch.testing.assert_close(frames[b, :flen[b]], alone[0], rtol=1e-5, atol=1e-5)
        assert torch.all(frames[b, flen[b]:] == 0)
        j = order.index(b)
        torch.testing.assert_close(f2[j, :fl2[j]], alone[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- HF

@pytest.mark.parametrize("kind", ["hubert-group", "wav2vec2-layer", "hubert-layer-nonorm"])
def test_hf_frames_match_model_and_are_batch_invariant(hf_dirs, kind):
    path, model = hf_dirs[kind]
    t = load_teacher(path, layer=2)
    assert (t.dim, t.sample_rate, t.frame_rate, t.num_layers, t.layer) == (32, 16000, 800.0, 3, 2)
    assert t.name == ("hubert" if kind.startswith("hubert") else "wav2vec2")
    assert t.normalize == (kind != "hubert-layer-nonorm")
    for n in LENGTHS + [t.min_samples]:
        with torch.inference_mode():
            ref = model(torch.randn(1, n), output_hidden_states=True).hidden_states
        assert t.num_frames(n) == ref[0].shape[1] == int(model._get_feat_extract_output_lengths(n))
    assert t.num_frames(t.min_samples) == 1 and t.num_frames(t.min_samples - 1) == 0
    _assert_batch_invariant(t, LENGTHS)


def test_hf_group_norm_needs_unpadded_runs(hf_dirs):
    """The invariance test above can fail: naive padded batching of a GroupNorm model changes the frames."""
    path, model = hf_dirs["hubert-group"]
    w, lens = _batch([800, 3000])
    with torch.inference_mode():
        padded = model(w, output_hidden_states=True).hidden_states[2][0, :model._get_feat_extract_output_lengths(800)]
        alone = model(w[:1, :800], output_hidden_states=True).hidden_states[2][0]
    assert (padded - alone).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["hubert-group", "wav2vec2-layer", "hubert-layer-nonorm"])
def test_hf_layers_match_transformers_hidden_states(hf_dirs, kind):
    path, model = hf_dirs[kind]
    x = torch.randn(1, 2500) * 0.3 + 0.05
    xn = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7) if kind != "hubert-layer-nonorm" else x
    with torch.inference_mode():
        ref = model(xn, output_hidden_states=True).hidden_states
    outs = []
    for layer in range(4):
        frames, _ = load_teacher(path, layer=layer).embed(x, torch.tensor([2500]))
        torch.testing.assert_close(frames[0], ref[layer][0], rtol=1e-5, atol=1e-5)
        outs.append(frames)
    assert all((outs[i] - outs[i + 1]).abs().max() > 1e-3 for i in range(3))
    with pytest.raises(ValueError, match=r"layer 4 out of range; valid layers are 0\.\.3"):
        load_teacher(path, layer=4)
    with pytest.raises(ValueError, match="out of range"):
        load_teacher(path, layer=-1)


def test_hf_normalisation_makes_gain_irrelevant(hf_dirs):
    w, lens = _batch([1500, 2200])
    norm = load_teacher(hf_dirs["wav2vec2-layer"][0], layer=3)
    a, _ = norm.embed(w, lens)
    b, _ = norm.embed(w * 4.0 + 0.3, lens)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    raw = load_teacher(hf_dirs["hubert-layer-nonorm"][0], layer=3)
    a, _ = raw.embed(w, lens)
    b, _ = raw.embed(w * 4.0 + 0.3, lens)  # a DC offset survives without do_normalize
    assert (a - b).abs().max() > 1e-3


def test_hf_checkpoint_sha_and_errors(hf_dirs, tmp_path):
    path, _ = hf_dirs["hubert-group"]
    t1, t2 = load_teacher(path, layer=1), load_teacher(path, layer=3)
    h = hashlib.sha256()
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        h.update(open(os.path.join(path, name), "rb").read())
    assert t1.checkpoint_sha256 == t2.checkpoint_sha256 == h.hexdigest()
    assert t1.checkpoint_sha256 != load_teacher(hf_dirs["wav2vec2-layer"][0], layer=1).checkpoint_sha256
    meta = t1.metadata()
    assert meta["checkpoint_sha256"] == h.hexdigest() and meta["layer"] == 1 and meta["format"] == "hf"

    with pytest.raises(ValueError, match=r"batch item 1 has 10 samples; at least \d+ are needed"):
        t1.embed(torch.zeros(2, 1000), torch.tensor([1000, 10]))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_teacher(str(tmp_path / "nothing"), layer=1)
    empty = tmp_path / "noconfig"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_teacher(str(empty), layer=1)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(ValueError, match="no weight files"):
        load_teacher(str(noweights), layer=1)
    # a checkpoint whose weights lack layers its config declares must not load with random weights
    bigger = tmp_path / "bigger"
    bigger.mkdir()
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["num_hidden_layers"] = 5
    (bigger / "config.json").write_text(json.dumps(cfg))
    (bigger / "model.safetensors").write_bytes(open(os.path.join(path, "model.safetensors"), "rb").read())
    with pytest.raises(ValueError, match="missing weights"):
        load_teacher(str(bigger), layer=1)


def test_hf_from_s3(hf_dirs, s3_bucket):
    import fsspec

    url, so = s3_bucket
    path, _ = hf_dirs["wav2vec2-layer"]
    fs = fsspec.filesystem("s3", **so)
    for name in os.listdir(path):
        fs.put(os.path.join(path, name), f"{url}/w2v/{name}")
    remote, local = load_teacher(f"{url}/w2v", layer=2, storage_options=so), load_teacher(path, layer=2)
    assert remote.checkpoint_sha256 == local.checkpoint_sha256
    w, lens = _batch([1200, 900])
    torch.testing.assert_close(remote.embed(w, lens)[0], local.embed(w, lens)[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- native

def test_log_mel_frames_and_content():
    sr = 16000
    assert [num_mel_frames(n, sr) for n in (399, 400, 559, 560, 16000)] == [0, 1, 1, 2, 98]
    t = torch.arange(16000) / sr
    tone = torch.sin(2 * torch.pi * 1000 * t)
    m = log_mel(tone, sr)
    assert m.shape == (98, 80)
    # the loudest band is the one whose centre is nearest 1 kHz
    mel = lambda f: 1127.0 * np.log1p(f / 700.0)  # noqa: E731
    centres = np.linspace(mel(20.0), mel(8000.0), 82)[1:-1]
    assert int(m.mean(0).argmax()) == int(np.abs(centres - mel(1000.0)).argmin())
    # padding invariance of the front end itself
    padded = torch.cat([tone[:5000], torch.randn(3000)])
    torch.testing.assert_close(log_mel(padded[None], sr)[0, :num_mel_frames(5000, sr)], log_mel(tone[:5000], sr))


def test_native_frames_invariance_and_layers(native_path):
    path, sha, model = native_path
    t = load_teacher(path, layer=2)
    assert (t.name, t.dim, t.num_layers, t.sample_rate, t.frame_rate) == ("teacher-small", 48, 3, 16000, 50.0)
    for n in (1040, 1200, 16161):
        out = model(torch.randn(1, n), torch.tensor([n]))
        assert t.num_frames(n) == out.hidden_states[0].shape[1] == int(out.frame_lengths[0])
    assert t.num_frames(16000) == 47 and t.num_frames(t.min_samples) == 1 and t.num_frames(t.min_samples - 1) == 0
    _assert_batch_invariant(t, [16000, 1040, 7777])
    x = torch.randn(1, 8000)
    layers = [load_teacher(path, layer=i).embed(x, torch.tensor([8000]))[0] for i in range(4)]
    ref = model(x, torch.tensor([8000])).hidden_states
    for i in range(4):
        torch.testing.assert_close(layers[i], ref[i], rtol=1e-5, atol=1e-5)
    assert all((layers[i] - layers[i + 1]).abs().max() > 1e-3 for i in range(3))
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.3"):
        load_teacher(path, layer=4)


def test_native_save_load_identical_and_sha(native_path, tmp_path):
    path, sha, model = native_path
    raw = open(path, "rb").read()
    assert sha == hashlib.sha256(raw).hexdigest() == load_teacher(path, layer=1).checkpoint_sha256
    w, lens = _batch([9000, 4000])
    a = load_teacher(path, layer=3).embed(w, lens)[0]
    again = str(tmp_path / "copy.safetensors")
    loaded, sha2 = load_native_model(path)
    assert save_native_teacher(loaded, again) == sha == sha2  # deterministic bytes
    b = load_teacher(again, layer=3).embed(w, lens)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.inference_mode():
        ref = model(w, lens).hidden_states[3]
    torch.testing.assert_close(a, ref * (torch.arange(ref.shape[1])[None, :, None] < torch.tensor(
        [model.num_frames(9000), model.num_frames(4000)])[:, None, None]), rtol=1e-5, atol=1e-5)


def test_native_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    plain = str(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="without 'ci-store-teacher' metadata"):
        load_teacher(plain, layer=0)
    future = str(tmp_path / "future.safetensors")
    save_file({"w": torch.zeros(2)}, future, metadata={"format": "ci-store-teacher", "version": "9",
                                                       "config": "{}"})
    with pytest.raises(ValueError, match="unsupported ci-store-teacher version '9'"):
        load_teacher(future, layer=0)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="not a teacher checkpoint"):
        load_teacher(str(junk), layer=0)


def test_native_model_trains(tmp_path):
    torch.manual_seed(0)
    model = NativeTeacherModel(NativeTeacherConfig(d_model=32, num_heads=2, ffn_dim=64, num_layers=2,
                                                   vocab_size=6, dropout=0.0))
    w, lens = _batch([6000, 4000])
    targets = torch.tensor([[1, 2, 3], [4, 5, 0]])
    tlens = torch.tensor([3, 2])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model.train()(w, lens)
        assert len(out.hidden_states) == 3 and out.logits.shape[-1] == 6
        logp = out.logits.log_softmax(-1).transpose(0, 1)
        loss = torch.nn.functional.ctc_loss(logp, targets, out.frame_lengths, tlens, blank=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    sha = save_native_teacher(model, str(tmp_path / "trained.safetensors"))
    assert load_teacher(str(tmp_path / "trained.safetensors"), layer=2).checkpoint_sha256 == sha


@pytest.mark.parametrize("kind", ["hubert-group", "native"])
def test_concurrent_embeds_from_threads(hf_dirs, native_path, kind):
    """Threaded Dask workers share one teacher per process: concurrent calls must not mix activations."""
    from concurrent.futures import ThreadPoolExecutor

    t = load_teacher(hf_dirs[kind][0] if kind != "native" else native_path[0], layer=2)
    inputs = [_batch([n], seed=s) for s, n in enumerate([1600, 2400, 3200, 4000] * 3)]
    expected = [t.embed(w, lens)[0] for w, lens in inputs]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda wl: t.embed(*wl)[0], inputs))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
