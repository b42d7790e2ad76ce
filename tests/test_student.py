"""Student transducer, tokenizers, greedy decoding and WER."""
import json

import pytest
import torch

from distill.student.decode import greedy_search, wer
from distill.student.kd_losses import IGNORE_INDEX
from distill.student.rnnt_loss import rnnt_loss
from distill.student.model import StudentConfig, Transducer, subsampled_length
from distill.data.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer, normalize_text


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**kw) -> StudentConfig:
    base = dict(vocab_size=10, d_model=32, num_layers=2, num_heads=2, ff_mult=2, conv_kernel=5, dropout=0.0,
                subsampling_channels=8, pred_dim=32, joiner_dim=32)
    base.update(kw)
    return StudentConfig(**base)


# ---------------------------------------------------------------- tokenizers

TEXTS = ["Hello, world! It's a test.", "the quick brown fox jumps over the lazy dog", "DON'T panic -- 42 times"] * 20


def test_normalize_text():
    assert normalize_text("  Don’t   STOP, me-now!\n") == "DON'T STOP ME NOW"


def test_char_tokenizer_roundtrip_and_json(tmp_path):
    tok = CharTokenizer.build(TEXTS)
    assert tok.blank_id == 0 and tok.symbols[0] == "<blk>"
    ids = tok.encode("the lazy, lazy dog!")
    assert 0 not in ids and all(0 < i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == "THE LAZY LAZY DOG"
    assert tok.decode([0] + ids + [0]) == "THE LAZY LAZY DOG"  # blanks are skipped
    assert tok.encode("#") == [] and tok.encode("é") == [tok.unk_id]  # unseen letter -> <unk>
    tok.save(tmp_path / "tok.json")
    back = load_tokenizer(tmp_path / "tok.json")
    assert isinstance(back, CharTokenizer) and back.symbols == tok.symbols
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_bpe_tokenizer_roundtrip_and_detection(tmp_path):
    tok = BPETokenizer.train(TEXTS, vocab_size=40, model_prefix=tmp_path / "bpe")
    assert tok.sp.id_to_piece(0) == "<blk>" and tok.blank_id == 0
    ids = tok.encode("the quick brown dog")
    assert ids and 0 not in ids and max(ids) < tok.vocab_size
    assert tok.decode(ids) == "THE QUICK BROWN DOG"
    tok.save(tmp_path / "bpe.json")
    for path in (tmp_path / "bpe.json", tmp_path / "bpe.model"):
        back = load_tokenizer(path)
        assert isinstance(back, BPETokenizer) and back.encode("lazy fox") == tok.encode("lazy fox")
    (tmp_path / "bad.json").write_text(json.dumps({"type": "wordpiece"}))
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")


# ---------------------------------------------------------------- model

def test_config_json_roundtrip_and_validation():
    cfg = tiny_config(kd_type="mvq", kd_stack=2, num_codebooks=4, codebook_size=16)
    assert cfg.kd_layer == 1  # middle of 2 layers
    assert StudentConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="kd_layer"):
        tiny_config(kd_layer=3)
    with pytest.raises(ValueError, match="subsampling"):
        tiny_config(subsampling=3)
    with pytest.raises(ValueError, match="unknown fields"):
        StudentConfig.from_dict({**cfg.to_dict(), "extra": 1})


def test_out_lengths_are_exact_and_padding_does_not_leak():
    torch.manual_seed(0)
    for sub in (1, 2, 4, 8):
        model = Transducer(tiny_config(subsampling=sub)).eval()
        lens = torch.tensor([37, 1, 20, 4, 36])
        feats = torch.randn(5, 37, 80) * 3
        with torch.no_grad():
            out, out_lens, kd_hidden = model.encode(feats, lens)
            assert out_lens.tolist() == [subsampled_length(int(n), sub) for n in lens]
            assert out_lens.tolist() == [-(-int(n) // sub) for n in lens]  # ceil(n / sub)
            assert out.shape == (5, int(out_lens.max()), 32) and kd_hidden.shape == out.shape
            # every utterance alone gives the same encoder output as inside the padded batch
            for b in range(5):
                n = int(lens[b])
                alone, alone_lens, _ = model.encode(feats[b: b + 1, :n], lens[b: b + 1])
                assert int(alone_lens) == int(out_lens[b])
                torch.testing.assert_close(out[b, : int(out_lens[b])], alone[0], rtol=1e-4, atol=1e-4)


def test_chunked_transducer_loss_equals_full_logits():
    torch.manual_seed(1)
    model = Transducer(tiny_config())
    feats, lens = torch.randn(3, 30, 80), torch.tensor([30, 22, 9])
    targets = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0], [7, 0, 0, 0]])
    tl = torch.tensor([4, 2, 1])
    enc, enc_lens, _ = model.encode(feats, lens)
    small = model.transducer_loss(enc, enc_lens, targets, tl)  # default budget: one chunk
    grads_small = torch.autograd.grad(small, list(model.parameters()), allow_unused=True)
    model.cfg.joiner_chunk_elems = 3 * 5 * 32 * 2  # forces 2-frame chunks
    enc, enc_lens, _ = model.encode(feats, lens)
    chunked = model.transducer_loss(enc, enc_lens, targets, tl)
    grads_chunked = torch.autograd.grad(chunked, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(chunked, small)
    for a, b in zip(grads_chunked, grads_small):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # and both equal the loss on explicitly materialised joiner logits
    sos = torch.zeros(3, 1, dtype=torch.long)
    pred = model.joiner.pred_proj(model.predictor(torch.cat([sos, targets], 1)))
    logits = model.joiner(model.joiner.enc_proj(enc)[:, :, None], pred[:, None])
    torch.testing.assert_close(rnnt_loss(logits, targets, enc_lens, tl, reduction="sum"), small)


def test_forward_and_compute_loss_with_kd_heads():
    torch.manual_seed(2)
    feats, lens = torch.randn(2, 24, 80), torch.tensor([24, 13])
    tokens, token_lens = torch.tensor([[1, 2, 3], [4, 0, 0]]), torch.tensor([3, 1])
    Tp = subsampled_length(24, 4)
    k = 2
    # MVQ: CI labels [B, T', k*N], -100 on padding, as distill.data.dataset.collate builds them
    model = Transducer(tiny_config(kd_type="mvq", kd_stack=k, num_codebooks=3, codebook_size=16))
    labels = torch.randint(0, 16, (2, Tp, k * 3))
    labels[1, subsampled_length(13, 4):] = IGNORE_INDEX
    mask = labels.view(2, Tp, k, 3)[..., 0] != IGNORE_INDEX
    batch = {"feats": feats, "feat_lens": lens, "tokens": tokens, "token_lens": token_lens, "labels": labels,
             "label_mask": mask, "ids": ["a", "b"]}
    out = model(feats, lens, tokens, token_lens)
    assert out["kd_hidden"].shape == (2, Tp, 32) and out["kd_out"].shape == (2, Tp, k, 3, 16)
    total, parts = model.compute_loss(batch, kd_scale=0.5)
    frames = Tp + subsampled_length(13, 4)
    assert parts["frames"] == frames
    torch.testing.assert_close(total.detach(), torch.tensor(parts["transducer"] + 0.5 * parts["kd"]))
    kd_ref = model.kd_head.kd_loss(out["kd_out"], labels, mask, reduction="sum") / frames
    assert abs(parts["kd"] - kd_ref.item()) < 1e-4
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())  # all used
    assert model.kd_head.proj.weight.grad.abs().sum() > 0
    # kd_scale 0 skips the head; a KD model without labels is an error naming the batch
    _, parts0 = model.compute_loss(batch, kd_scale=0.0)
    assert "kd" not in parts0
    with pytest.raises(ValueError, match="no teacher labels"):
        model.compute_loss({k_: v for k_, v in batch.items() if k_ not in ("labels", "label_mask")}, kd_scale=1)
    with pytest.raises(ValueError, match="frames"):
        model.compute_loss({**batch, "labels": labels[:, :-1], "label_mask": mask[:, :-1]}, kd_scale=1)

    # regression: float teacher frames [B, T', k*D]
    rmodel = Transducer(tiny_config(kd_type="l2", kd_stack=k, teacher_dim=6))
    rbatch = {**batch, "labels": torch.randn(2, Tp, k * 6)}
    total, parts = rmodel.compute_loss(rbatch, kd_scale=1.0)
    assert parts["kd"] > 0 and torch.isfinite(total)


def test_bad_targets_are_refused():
    model = Transducer(tiny_config())
    feats, lens = torch.randn(1, 12, 80), torch.tensor([12])
    with pytest.raises(ValueError, match="blank"):
        model(feats, lens, torch.tensor([[1, 0, 2]]), torch.tensor([3]))
    with pytest.raises(ValueError, match="outside"):
        model(feats, lens, torch.tensor([[1, 10]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="feat_lens"):
        model(feats, torch.tensor([13]), torch.tensor([[1]]), torch.tensor([1]))


# ---------------------------------------------------------------- decoding

def test_greedy_search_on_untrained_model_returns_valid_ids():
    torch.manual_seed(3)
    model = Transducer(tiny_config(vocab_size=6))
    # bias the joiner away from blank so the untrained model actually emits symbols
    with torch.no_grad():
        model.joiner.out.bias[0] = -5.0
    feats, lens = torch.randn(3, 40, 80), torch.tensor([40, 17, 3])
    model.train()
    for max_sym in (1, 3):
        hyps = greedy_search(model, feats, lens, max_sym_per_frame=max_sym)
        assert model.training  # mode restored
        assert len(hyps) == 3
        enc_lens = subsampled_length(lens, 4)
        for h, n in zip(hyps, enc_lens.tolist()):
            assert all(isinstance(i, int) and 0 < i < 6 for i in h)
            assert 0 < len(h) <= n * max_sym
        # each utterance decodes the same alone as in the batch
        for b in range(3):
            alone = greedy_search(model, feats[b: b + 1, : int(lens[b])], lens[b: b + 1], max_sym_per_frame=max_sym)
            assert alone[0] == hyps[b]


def test_overfit_one_example_then_decode_it_exactly():
    """Loss and decoding agree: a model trained on one utterance greedily decodes its transcript."""
    torch.manual_seed(0)
    model = Transducer(tiny_config(vocab_size=8))
    feats, lens = torch.randn(1, 40, 80), torch.tensor([40])  # 10 encoder frames
    target = [3, 5, 2, 7]
    targets, tl = torch.tensor([target]), torch.tensor([4])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    assert greedy_search(model, feats, lens) != [target]
    for step in range(200):
        loss = model(feats, lens, targets, tl)["loss_transducer"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 60 and step % 20 == 0 and loss.item() < 0.3 and greedy_search(model, feats, lens) == [target]:
            break
    assert loss.item() < 0.3
    assert greedy_search(model, feats, lens, max_sym_per_frame=1) == [target]
    assert greedy_search(model, feats, lens, max_sym_per_frame=3) == [target]


def test_wer():
    r = wer(["the cat sat", "on the mat", ""], ["the cat sat", "on a mat here", "extra"])
    assert (r["substitutions"], r["deletions"], r["insertions"]) == (1, 0, 2)
    assert r["errors"] == 3 and r["words"] == 6 and r["wer"] == pytest.approx(0.5)
    assert wer(["a  b"], ["a b"])["errors"] == 0  # whitespace does not count
    assert wer(["a b c d"], [""])["wer"] == 1.0
    with pytest.raises(ValueError, match="hypotheses"):
        wer(["a"], [])


def test_cer():
    from distill.student.decode import cer

    r = cer(["the cat", "ab"], ["the bat", "abc"])
    assert r["char_errors"] == 2 and r["chars"] == 9 and r["cer"] == pytest.approx(2 / 9)
    assert cer(["a  b"], ["a b"])["char_errors"] == 0
    with pytest.raises(ValueError, match="hypotheses"):
        cer(["a"], [])
