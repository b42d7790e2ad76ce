import math

import pytest
import torch
import torch.nn.functional as F

from distill.student.kd_losses import (IGNORE_INDEX, MVQKDHead, RegressionKDHead, build_kd_head, mvq_kd_loss,
                               regression_kd_loss)


pytestmark = pytest.mark.usefixtures("one_thread")


def _ci_batch(g, B=2, T=6, k=2, N=3, K=5, lens=(6, 4)):
    labels = torch.randint(0, K, (B, T, k * N), generator=g)
    for b, n in enumerate(lens):
        labels[b, n:] = IGNORE_INDEX
    return labels


def test_mvq_loss_value_matches_cross_entropy_per_valid_teacher_frame():
    g = torch.Generator().manual_seed(0)
    B, T, k, N, K = 2, 6, 2, 3, 5
    logits = torch.randn(B, T, k, N, K, generator=g)
    labels = _ci_batch(g, B, T, k, N, K)
    labels[0, 2, N:] = IGNORE_INDEX  # second teacher frame of student frame 2 is padding
    loss = mvq_kd_loss(logits, labels)
    lab = labels.view(B, T, k, N)
    ce_sum = F.cross_entropy(logits.reshape(-1, K), lab.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    frames = (lab != IGNORE_INDEX).any(-1).sum()
    assert int(frames) == 2 * 6 + 2 * 4 - 1
    torch.testing.assert_close(loss, ce_sum / frames)
    torch.testing.assert_close(mvq_kd_loss(logits, labels, reduction="sum"), ce_sum)
    # the [B, T, k, N] label layout means the same
    torch.testing.assert_close(mvq_kd_loss(logits, lab), loss)
    # uniform logits: CE per codebook is log K, summed over N codebooks per teacher frame
    torch.testing.assert_close(mvq_kd_loss(torch.zeros_like(logits), labels), torch.tensor(N * math.log(K)))


def test_mvq_ignored_frames_do_not_affect_loss_or_gradient():
    g = torch.Generator().manual_seed(1)
    head = MVQKDHead(d_model=8, num_codebooks=3, codebook_size=5, stack_k=2)
    hidden = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    labels = _ci_batch(g)
    mask = torch.ones(2, 6, 2, dtype=torch.bool)
    mask[0, 5, 1] = False  # masked teacher frame with a real-looking label
    loss1 = head.kd_loss(head(hidden), labels, mask)
    loss1.backward()
    assert torch.isfinite(hidden.grad).all()
    assert hidden.grad[1, 4:].abs().sum() == 0  # student frames whose labels are all -100 get no gradient
    hidden2 = hidden.detach().clone()
    hidden2[1, 4:] = torch.randn(2, 8, generator=g) * 100  # change the student output at ignored frames
    logits2 = head(hidden2)
    logits2 = logits2.clone()
    logits2[0, 5, 1] = 1e4  # and the logits of the masked teacher frame
    torch.testing.assert_close(head.kd_loss(logits2, labels, mask), loss1.detach())
    # without the mask the masked teacher frame counts again
    assert not torch.isclose(head.kd_loss(logits2, labels), loss1.detach())


def test_heads_fit_a_fixed_batch():
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    hidden = torch.randn(2, 6, 16, generator=g)
    labels = _ci_batch(g, K=5)
    head = MVQKDHead(16, num_codebooks=3, codebook_size=5, stack_k=2)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        loss = head.kd_loss(head(hidden), labels)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first

    target = torch.randn(2, 6, 2 * 4, generator=g)
    mask = torch.ones(2, 6, 2, dtype=torch.bool)
    mask[1, 4:] = False
    for kind in ("l1", "l2"):
        rhead = RegressionKDHead(16, teacher_dim=4, stack_k=2, kind=kind)
        opt = torch.optim.Adam(rhead.parameters(), lr=0.05)
        first = None
        for _ in range(80):
            loss = rhead.kd_loss(rhead(hidden), target, mask)
            first = loss.item() if first is None else first
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.3 * first, kind


def test_regression_loss_masking_and_per_frame_normalisation():
    g = torch.Generator().manual_seed(3)
    B, T, k, D = 2, 5, 2, 4
    pred = torch.randn(B, T, k, D, generator=g, requires_grad=True)
    target = torch.randn(B, T, k * D, generator=g)
    mask = torch.ones(B, T, k, dtype=torch.bool)
    mask[1, 3:] = False
    mask[0, 0, 1] = False
    target_bad = target.clone().view(B, T, k, D)
    target_bad[~mask] = float("nan")  # padded teacher frames may hold anything
    for kind in ("l1", "l2"):
        loss = regression_kd_loss(pred, target_bad.view(B, T, k * D), mask, kind=kind)
        (grad,) = torch.autograd.grad(loss, pred)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert grad[~mask].abs().sum() == 0
        d = (pred - target.view(B, T, k, D))[mask]
        per_frame = d.abs().mean(-1) if kind == "l1" else d.square().mean(-1)
        torch.testing.assert_close(loss, per_frame.mean())
        torch.testing.assert_close(regression_kd_loss(pred, target_bad, mask, kind=kind, reduction="sum"),
                                   per_frame.sum())
    # a [B, T] student-frame mask broadcasts over k
    m2 = torch.ones(B, T, dtype=torch.bool)
    m2[1, 3:] = False
    torch.testing.assert_close(regression_kd_loss(pred, target, m2),
                               regression_kd_loss(pred, target, m2[:, :, None].expand(B, T, k)))


def test_all_masked_batch_gives_zero_not_nan():
    logits = torch.randn(1, 3, 1, 2, 4, requires_grad=True)
    labels = torch.full((1, 3, 2), IGNORE_INDEX)
    loss = mvq_kd_loss(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    pred = torch.randn(1, 3, 1, 4, requires_grad=True)
    loss = regression_kd_loss(pred, torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool))
    assert loss.item() == 0.0


def test_bad_labels_are_refused():
    logits = torch.randn(1, 3, 2, 2, 4)
    with pytest.raises(ValueError, match="codebook_size"):
        mvq_kd_loss(logits, torch.full((1, 3, 4), 4))
    with pytest.raises(ValueError, match="k\\*N"):
        mvq_kd_loss(logits, torch.zeros(1, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        mvq_kd_loss(logits, torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="mask"):
        mvq_kd_loss(logits, torch.zeros(1, 3, 4, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="kd_type"):
        build_kd_head("cosine", 8, stack_k=1, num_codebooks=2, codebook_size=4, teacher_dim=4)
    assert build_kd_head("none", 8, stack_k=1, num_codebooks=2, codebook_size=4, teacher_dim=4) is None
