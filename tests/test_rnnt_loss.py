import itertools

import pytest
import torch

from distill.student.rnnt_loss import rnnt_loss


def brute_force_nll(logits: torch.Tensor, targets: list[int], blank: int = 0, windows=None) -> torch.Tensor:
    """-log sum over every alignment of one utterance; logits [T, U+1, V] (already trimmed to its lengths).
    windows: per frame t, the symbol positions u allowed at (t, u) (pruned RNN-T); only alignments whose every node
    lies inside them count. None: all alignments."""
    T, U1, _ = logits.shape
    U = U1 - 1
    lp = logits.log_softmax(-1)
    scores = []
    # an alignment = positions of the U label emissions among the T-1+U moves before the final blank
    for label_pos in itertools.combinations(range(T - 1 + U), U):
        t = u = 0
        s, inside = logits.new_zeros(()), True
        for step in range(T - 1 + U):
            inside &= windows is None or u in windows[t]
            if step in label_pos:
                s = s + lp[t, u, targets[u]]
                u += 1
            else:
                s = s + lp[t, u, blank]
                t += 1
        assert (t, u) == (T - 1, U)
        if inside and (windows is None or U in windows[T - 1]):
            scores.append(s + lp[T - 1, U, blank])
    return -torch.logsumexp(torch.stack(scores), 0)


@pytest.mark.parametrize("T,U,V,blank", [(1, 0, 3, 0), (1, 3, 4, 0), (4, 0, 3, 0), (3, 2, 5, 0), (4, 3, 6, 2),
                                         (5, 4, 4, 0), (2, 5, 7, 0)])
def test_matches_brute_force_value_and_gradient(T, U, V, blank):
    g = torch.Generator().manual_seed(T * 100 + U * 10 + V)
    logits = torch.randn(1, T, U + 1, V, dtype=torch.float64, generator=g, requires_grad=True)
    choices = [v for v in range(V) if v != blank]
    targets = torch.tensor([[choices[int(i)] for i in torch.randint(len(choices), (U,), generator=g)]],
                           dtype=torch.int64)
    ours = rnnt_loss(logits, targets, torch.tensor([T]), torch.tensor([U]), blank=blank, reduction="sum")
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = brute_force_nll(logits[0], targets[0].tolist(), blank)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-10)


def test_padding_in_a_batch_does_not_matter():
    g = torch.Generator().manual_seed(7)
    V = 6
    lens_t, lens_u = [5, 3, 1, 4], [3, 0, 2, 4]
    T, U = max(lens_t), max(lens_u)
    logits = torch.randn(4, T, U + 1, V, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(1, V, (4, U), generator=g)
    # garbage in the padded positions (including out-of-vocabulary ids) must be ignored
    for b, u in enumerate(lens_u):
        targets[b, u:] = -1 if b % 2 else 99
    per_utt = rnnt_loss(logits, targets, torch.tensor(lens_t), torch.tensor(lens_u), reduction="none")
    assert per_utt.shape == (4,)
    per_utt.sum().backward()
    for b in range(4):
        t, u = lens_t[b], lens_u[b]
        ref = brute_force_nll(logits[b, :t, : u + 1].detach(), targets[b, :u].tolist())
        torch.testing.assert_close(per_utt[b].detach(), ref, rtol=1e-10, atol=1e-10)
        # no gradient leaks into padded frames / padded target positions
        assert logits.grad[b, t:].abs().sum() == 0
        assert logits.grad[b, :, u + 1:].abs().sum() == 0
    # reductions
    mean = rnnt_loss(logits, targets, torch.tensor(lens_t), torch.tensor(lens_u), reduction="mean")
    total = rnnt_loss(logits, targets, torch.tensor(lens_t), torch.tensor(lens_u), reduction="sum")
    torch.testing.assert_close(mean * 4, total)
    torch.testing.assert_close(total, per_utt.sum().detach())


def test_chunked_joiner_callable_equals_full_logits():
    g = torch.Generator().manual_seed(3)
    B, T, U, V, J = 3, 23, 5, 9, 8
    enc = torch.randn(B, T, J, dtype=torch.float64, generator=g, requires_grad=True)
    pred = torch.randn(B, U + 1, J, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, J, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(1, V, (B, U), generator=g)
    tl, ul = torch.tensor([23, 10, 17]), torch.tensor([5, 2, 0])

    def logits_fn(t0, t1):
        return torch.tanh(enc[:, t0:t1, None, :] + pred[:, None]) @ w.T

    full = rnnt_loss(logits_fn(0, T), targets, tl, ul)
    grads_full = torch.autograd.grad(full, (enc, pred, w))
    calls = []

    def counting_fn(t0, t1):
        calls.append((t0, t1))
        return logits_fn(t0, t1)

    chunked = rnnt_loss(counting_fn, targets, tl, ul, chunk_frames=4)
    assert max(b - a for a, b in calls) <= 4  # never more than one chunk of logits at a time
    grads_chunked = torch.autograd.grad(chunked, (enc, pred, w))
    torch.testing.assert_close(chunked, full)
    for a, b in zip(grads_chunked, grads_full):
        torch.testing.assert_close(a, b)


def test_float32_large_case_is_finite_and_close_to_float64():
    g = torch.Generator().manual_seed(11)
    B, T, U, V = 2, 60, 20, 30
    logits = torch.randn(B, T, U + 1, V, generator=g) * 3
    targets = torch.randint(1, V, (B, U), generator=g)
    tl, ul = torch.tensor([60, 41]), torch.tensor([20, 13])
    l32 = logits.clone().requires_grad_()
    loss32 = rnnt_loss(l32, targets, tl, ul, reduction="sum")
    loss32.backward()
    loss64 = rnnt_loss(logits.double(), targets, tl, ul, reduction="sum")
    assert torch.isfinite(l32.grad).all()
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=1e-3)
    # gradient of the NLL w.r.t. logits sums to zero over V (softmax) at every lattice cell
    torch.testing.assert_close(l32.grad.sum(-1), torch.zeros(B, T, U + 1), atol=1e-5, rtol=0)


def test_bad_inputs_raise_clear_errors():
    logits = torch.randn(2, 4, 3, 5)
    targets = torch.randint(1, 5, (2, 2))
    with pytest.raises(ValueError, match="logit_lengths"):
        rnnt_loss(logits, targets, torch.tensor([4, 5]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="no frames"):
        rnnt_loss(logits, targets, torch.tensor([4, 0]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="target ids"):
        rnnt_loss(logits, torch.tensor([[1, 7], [1, 2]]), torch.tensor([4, 4]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="U\\+1"):
        rnnt_loss(logits, torch.randint(1, 5, (2, 3)), torch.tensor([4, 4]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="reduction"):
        rnnt_loss(logits, targets, torch.tensor([4, 4]), torch.tensor([2, 2]), reduction="avg")
