"""Modified beam search (distill.student.decode) against greedy search and an exact alignment sum."""
import pytest
import torch

from distill.student.decode import greedy_search, modified_beam_search
from distill.student.model import StudentConfig, Transducer


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int, **kw) -> Transducer:
    torch.manual_seed(seed)
    base = dict(vocab_size=8, d_model=32, num_layers=1, num_heads=2, ff_mult=2, conv_kernel=5, dropout=0.0,
                subsampling_channels=8, pred_dim=32, joiner_dim=32)
    base.update(kw)
    model = Transducer(StudentConfig(**base)).eval()
    with torch.no_grad():  # a random joiner is nearly uniform; sharpen it so hypotheses differ and are non-empty
        model.joiner.out.weight.mul_(6.0)
        model.joiner.out.bias[model.blank_id] -= 1.0
    return model


def _batch(seed: int, lens=(60, 44, 23, 9)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(lens), max(lens), 80, generator=g), torch.tensor(lens)


@torch.no_grad()
def one_symbol_per_frame_log_prob(model, feats, lens, b: int, tokens: list[int]) -> float:
    """log P(tokens) summed over every alignment with at most one symbol per frame (the search's model)."""
    enc, enc_lens, _ = model.encode(feats, lens)
    T = int(enc_lens[b])
    enc_p = model.joiner.enc_proj(enc[b, :T])  # [T, J]
    ctx_len, blank = model.predictor.context, model.blank_id
    ctx = torch.tensor([([blank] * ctx_len + tokens[:u])[-ctx_len:] for u in range(len(tokens) + 1)])
    pred_p = model.joiner.pred_proj(model.predictor(ctx, need_pad=False)[:, -1])  # [U+1, J]
    lp = model.joiner(enc_p[:, None], pred_p[None]).log_softmax(-1).double()  # [T, U+1, V]
    U = len(tokens)
    alpha = torch.full((U + 1,), float("-inf"), dtype=torch.float64)
    alpha[0] = 0.0
    for t in range(T):
        stay = alpha + lp[t, :, blank]
        move = torch.full_like(alpha, float("-inf"))
        if U:
            move[1:] = alpha[:-1] + lp[t, torch.arange(U), torch.tensor(tokens)]
        alpha = torch.logaddexp(stay, move)
    return float(alpha[U])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_is_greedy_search(seed):
    model = _model(seed)
    feats, lens = _batch(seed)
    greedy = greedy_search(model, feats, lens, max_sym_per_frame=1)
    assert any(greedy), "the test model must emit something"
    assert modified_beam_search(model, feats, lens, beam=1) == greedy


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_larger_beam_never_finds_a_less_likely_best_hypothesis(seed):
    model = _model(seed, vocab_size=6)
    feats, lens = _batch(seed + 10)
    hyps1, scores1 = modified_beam_search(model, feats, lens, beam=1, return_scores=True)
    for b, h in enumerate(hyps1):  # beam 1 keeps one alignment: its score is that alignment's log-prob
        assert scores1[b] <= one_symbol_per_frame_log_prob(model, feats, lens, b, h) + 1e-4
    for beam in (2, 4, 8):
        hyps, scores = modified_beam_search(model, feats, lens, beam=beam, return_scores=True)
        for b, h in enumerate(hyps):
            assert scores[b] >= scores1[b] - 1e-4, (beam, b)
            # the reported score sums kept alignments of that token sequence: at most all of them
            assert scores[b] <= one_symbol_per_frame_log_prob(model, feats, lens, b, h) + 1e-4
    # with a beam wider than all candidates the search is exact over one-symbol-per-frame alignments
    model3 = _model(seed, vocab_size=3)
    f3, l3 = _batch(seed, lens=(12, 7))
    hyps, scores = modified_beam_search(model3, f3, l3, beam=64, return_scores=True)
    for b, h in enumerate(hyps):
        assert scores[b] == pytest.approx(one_symbol_per_frame_log_prob(model3, f3, l3, b, h), abs=1e-4)


def test_beam_search_results_do_not_depend_on_batch_padding():
    model = _model(5)
    feats, lens = _batch(6)
    hyps, scores = modified_beam_search(model, feats, lens, beam=4, return_scores=True)
    for b in range(len(lens)):
        n = int(lens[b])
        alone, alone_scores = modified_beam_search(model, feats[b: b + 1, :n], lens[b: b + 1], beam=4,
                                                   return_scores=True)
        assert alone == [hyps[b]]
        assert alone_scores[0] == pytest.approx(scores[b], abs=1e-3)


def test_bad_beam_is_refused():
    model = _model(0)
    feats, lens = _batch(0, lens=(8,))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="beam"):
            modified_beam_search(model, feats, lens, beam=bad)
