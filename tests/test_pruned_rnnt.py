"""Pruned RNN-T loss (distill.student.pruned_rnnt) against the full loss and brute-force enumeration."""

import pytest
import torch

from distill.student.pruned_rnnt import (occupation, pruned_loss_scales, pruned_rnnt_loss, prune_ranges,
                                         simple_lattice)
from distill.student.rnnt_loss import rnnt_loss
from test_rnnt_loss import brute_force_nll


def _joiner(B, T, U, V, J=8, seed=0, dtype=torch.float64):
    """enc [B,T,J], pred [B,U+1,J], out [V,J] (leaves) and logits_fn over windows, as the student's joiner."""
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(B, T, J, dtype=dtype, generator=g, requires_grad=True)
    pred = torch.randn(B, U + 1, J, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(V, J, dtype=dtype, generator=g, requires_grad=True)

    def full():
        return torch.tanh(enc[:, :, None] + pred[:, None]) @ w.T

    def pruned_fn(ranges):
        Bq, Tq, R = ranges.shape
        p = pred.gather(1, ranges.reshape(Bq, Tq * R, 1).expand(-1, -1, J)).view(Bq, Tq, R, J)
        return torch.tanh(enc[:, :, None] + p) @ w.T

    return (enc, pred, w), full, pruned_fn


def _am_lm(B, T, U, V, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    am = torch.randn(B, T, V, dtype=dtype, generator=g, requires_grad=True)
    lm = torch.randn(B, U + 1, V, dtype=dtype, generator=g, requires_grad=True)
    return am, lm


def test_simple_loss_is_the_full_loss_of_the_trivial_joiner():
    B, T, U, V = 3, 9, 4, 7
    am, lm = _am_lm(B, T, U, V)
    targets = torch.randint(1, V, (B, U), generator=torch.Generator().manual_seed(2))
    tl, ul = torch.tensor([9, 6, 2]), torch.tensor([4, 1, 0])
    targets[1, 1:] = 99  # padding is ignored
    simple, _ = pruned_rnnt_loss(lambda r: torch.zeros(*r.shape, V, dtype=am.dtype), am, lm, targets, tl, ul,
                                 prune_range=3, reduction="none", lm_only_scale=0.0)
    full = rnnt_loss(am[:, :, None] + lm[:, None], targets, tl, ul, reduction="none")
    torch.testing.assert_close(simple, full, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(simple.sum(), (am, lm)), torch.autograd.grad(full.sum(), (am, lm))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # and against every alignment, utterance 0
    ref = brute_force_nll((am[0, :, None] + lm[0, None]).detach(), targets[0].tolist())
    torch.testing.assert_close(simple[0].detach(), ref, rtol=1e-10, atol=1e-10)


def test_smoothed_simple_lattice_matches_explicit_formula():
    B, T, U, V = 2, 5, 3, 6
    am, lm = _am_lm(B, T, U, V, seed=5)
    am, lm = (am * 4).detach(), (lm * 4).detach()  # peaked: the bmm normaliser must stay accurate
    targets = torch.randint(1, V, (B, U), generator=torch.Generator().manual_seed(6))
    ul = torch.tensor([3, 1])
    lm_s, am_s = 0.25, 0.1
    lpb, lpl = simple_lattice(am, lm, targets, 0, lm_s, am_s, target_lengths=ul)
    joint = (am[:, :, None] + lm[:, None]).log_softmax(-1)  # [B,T,U+1,V]
    lm_only = lm.log_softmax(-1)[:, None].expand(B, T, U + 1, V)
    valid = torch.arange(U + 1)[None] <= ul[:, None]
    unigram = lm.softmax(-1)[valid].mean(0)
    am_only = (am + unigram.log()).log_softmax(-1)[:, :, None].expand(B, T, U + 1, V)
    mix = (1 - lm_s - am_s) * joint + lm_s * lm_only + am_s * am_only
    torch.testing.assert_close(lpb, mix[..., 0], rtol=1e-10, atol=1e-10)
    ids = targets[:, None, :, None].expand(B, T, U, 1)
    torch.testing.assert_close(lpl, mix[:, :, :U].gather(3, ids).squeeze(3), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("extra", [0, 1, 6])
def test_pruned_equals_full_loss_when_the_window_covers_every_symbol(extra):
    B, T, U, V = 3, 8, 4, 6
    params, full, pruned_fn = _joiner(B, T, U, V)
    am, lm = _am_lm(B, T, U, V)
    targets = torch.randint(1, V, (B, U), generator=torch.Generator().manual_seed(3))
    tl, ul = torch.tensor([8, 5, 3]), torch.tensor([4, 2, 3])
    _, pruned = pruned_rnnt_loss(pruned_fn, am, lm, targets, tl, ul, prune_range=U + 1 + extra, reduction="sum")
    ref = rnnt_loss(full(), targets, tl, ul, reduction="sum")
    torch.testing.assert_close(pruned, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(pruned, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("T,U,R", [(5, 4, 2), (6, 3, 2), (4, 5, 3), (6, 6, 3)])
def test_pruned_loss_sums_exactly_the_alignments_inside_the_windows(T, U, R):
    V = 5
    params, full, pruned_fn = _joiner(1, T, U, V, seed=T * 10 + U)
    am, lm = _am_lm(1, T, U, V, seed=R)
    targets = torch.randint(1, V, (1, U), generator=torch.Generator().manual_seed(U))
    seen = []

    def spy(ranges):
        seen.append(ranges)
        return pruned_fn(ranges)

    _, pruned = pruned_rnnt_loss(spy, am, lm, targets, torch.tensor([T]), torch.tensor([U]), prune_range=R,
                                 reduction="sum")
    windows = [set(seen[0][0, t].tolist()) for t in range(T)]
    ref = brute_force_nll(full()[0], targets[0].tolist(), windows=windows)
    torch.testing.assert_close(pruned, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(pruned, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # a subset of the alignments: never more likely than all of them
    assert pruned >= rnnt_loss(full(), targets, torch.tensor([T]), torch.tensor([U]), reduction="sum") - 1e-12


def test_prune_ranges_satisfy_the_lattice_constraints():
    g = torch.Generator().manual_seed(9)
    B, T, U = 6, 30, 12
    tl = torch.tensor([30, 25, 7, 12, 1, 30])
    ul = torch.tensor([12, 0, 12, 3, 0, 5])
    for R in (2, 3, 5, 13, 20):
        lpb = torch.randn(B, T, U + 1, generator=g) * 3
        lpl = torch.randn(B, T, U, generator=g) * 3
        loglike, occ_b, occ_l = occupation(lpb, lpl, tl, ul)
        assert torch.isfinite(loglike).all()
        ranges = prune_ranges(occ_b, occ_l, tl, ul, R)
        Rc = min(R, U + 1)
        assert ranges.shape == (B, T, Rc)
        assert (ranges[:, :, 1:] - ranges[:, :, :-1] == 1).all()
        s = ranges[:, :, 0]
        assert (s >= 0).all() and (ranges[:, :, -1] <= U).all()
        for b in range(B):
            if ul[b] > (Rc - 1) * tl[b]:
                continue  # no window sequence can reach the end (the loss refuses such input)
            sb = s[b, : tl[b]]
            assert sb[0] == 0
            steps = sb[1:] - sb[:-1]
            assert (steps >= 0).all() and (steps <= Rc - 1).all()
            assert ul[b] in ranges[b, tl[b] - 1].tolist()


def test_pruned_loss_is_close_to_the_full_loss_on_a_peaked_batch():
    """Lattices like a partly trained model's: the encoder side says which label sounds near which frame, the
    predictor side which label comes next; the real joiner is the simple one plus an interaction term."""
    B, T, U, V = 4, 40, 12, 20
    g = torch.Generator().manual_seed(4)
    targets = torch.randint(1, V, (B, U), generator=g)
    tl, ul = torch.tensor([40, 33, 40, 21]), torch.tensor([12, 9, 7, 12])
    am = 0.3 * torch.randn(B, T, V, dtype=torch.float64, generator=g)
    am[:, :, 0] += 5.0  # blank unless a label is near
    lm = 0.3 * torch.randn(B, U + 1, V, dtype=torch.float64, generator=g)
    for b in range(B):
        frames = torch.arange(int(tl[b]), dtype=torch.float64)
        for u in range(int(ul[b])):  # label y_{u+1} sounds around frame (u + 0.5) * T_b / U_b
            centre = (u + 0.5) * int(tl[b]) / int(ul[b])
            am[b, : int(tl[b]), targets[b, u]] += 6.0 * torch.exp(-((frames - centre) / 1.5) ** 2)
            lm[b, u, targets[b, u]] += 3.0
    logits = am[:, :, None] + lm[:, None] + 0.3 * torch.randn(B, T, U + 1, V, dtype=torch.float64, generator=g)
    logits, am, lm = logits.requires_grad_(), am.requires_grad_(), lm.requires_grad_()

    def fn(r):
        return logits.gather(2, r[..., None].expand(*r.shape, V))

    _, pruned = pruned_rnnt_loss(fn, am, lm, targets, tl, ul, prune_range=5, reduction="none")
    full = rnnt_loss(logits, targets, tl, ul, reduction="none")
    assert (pruned >= full - 1e-9).all()
    assert ((pruned - full) / full).abs().max() < 0.02, (pruned, full)  # measured 0.8%
    (gp,) = torch.autograd.grad(pruned.sum(), logits)
    (gf,) = torch.autograd.grad(full.sum(), logits)
    big = gf.abs() > 0.05 * gf.abs().max()
    assert big.sum() > 100
    assert (torch.sign(gp[big]) == torch.sign(gf[big])).float().mean() > 0.98  # measured 99.3%
    assert torch.nn.functional.cosine_similarity(gp.flatten(), gf.flatten(), 0) > 0.99  # measured 0.9993


def test_per_utterance_losses_do_not_depend_on_batch_padding():
    V = 7
    lens_t, lens_u = [9, 4, 6], [5, 1, 0]
    B, T, U = 3, max(lens_t), max(lens_u)
    params, _, pruned_fn = _joiner(B, T, U, V, seed=12)
    am, lm = _am_lm(B, T, U, V, seed=13)
    targets = torch.randint(1, V, (B, U), generator=torch.Generator().manual_seed(14))
    targets[1, 1:] = -1
    simple, pruned = pruned_rnnt_loss(pruned_fn, am, lm, targets, torch.tensor(lens_t), torch.tensor(lens_u),
                                      prune_range=3, reduction="none")
    (simple.sum() + pruned.sum()).backward()
    enc, pred, w = params
    assert enc.grad[1, 4:].abs().sum() == 0 and pred.grad[1, 2:].abs().sum() == 0
    assert am.grad[0].abs().sum() > 0 and am.grad[1, 4:].abs().sum() == 0 and lm.grad[2, 1:].abs().sum() == 0
    for b in range(B):
        t, u = lens_t[b], lens_u[b]
        sp = pred[b:b + 1, : u + 1].detach()
        se = enc[b:b + 1, :t].detach()

        def alone_fn(ranges):
            p = sp.gather(1, ranges.reshape(1, -1, 1).expand(-1, -1, sp.shape[2])).view(*ranges.shape, -1)
            return torch.tanh(se[:, :, None] + p) @ w.detach().T

        s1, p1 = pruned_rnnt_loss(alone_fn, am[b:b + 1, :t].detach(), lm[b:b + 1, : u + 1].detach(),
                                  targets[b:b + 1, :u], torch.tensor([t]), torch.tensor([u]), prune_range=3,
                                  reduction="none")
        torch.testing.assert_close(s1[0], simple[b].detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(p1[0], pruned[b].detach(), rtol=1e-10, atol=1e-10)


def test_float32_and_no_grad_paths():
    B, T, U, V = 2, 30, 8, 50
    params, full, pruned_fn = _joiner(B, T, U, V, dtype=torch.float32)
    am, lm = _am_lm(B, T, U, V, dtype=torch.float32)
    am, lm = (am * 8).detach().requires_grad_(), (lm * 8).detach().requires_grad_()
    targets = torch.randint(1, V, (B, U), generator=torch.Generator().manual_seed(1))
    tl, ul = torch.tensor([30, 17]), torch.tensor([8, 5])
    s, p = pruned_rnnt_loss(pruned_fn, am, lm, targets, tl, ul, prune_range=4)
    (s + p).backward()
    assert torch.isfinite(s) and torch.isfinite(p)
    assert all(torch.isfinite(x.grad).all() for x in (*params, am, lm))
    with torch.inference_mode():  # e.g. a validation loss: the windows still come from the occupation
        s2, p2 = pruned_rnnt_loss(pruned_fn, am, lm, targets, tl, ul, prune_range=4)
    torch.testing.assert_close(s2, s.detach())
    torch.testing.assert_close(p2, p.detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # AMP: the simple lattice still runs in float32
        s3, p3 = pruned_rnnt_loss(pruned_fn, am, lm, targets, tl, ul, prune_range=4)
    torch.testing.assert_close(s3, s.detach())
    assert p3.dtype == torch.float32 and torch.isfinite(p3)


def test_bad_inputs_raise_clear_errors():
    B, T, U, V = 2, 4, 3, 5
    _, _, fn = _joiner(B, T, U, V)
    am, lm = _am_lm(B, T, U, V)
    targets = torch.randint(1, V, (B, U))
    tl, ul = torch.tensor([4, 4]), torch.tensor([3, 2])
    for bad in (0, 1, -3, 2.5, True):
        with pytest.raises(ValueError, match="prune_range"):
            pruned_rnnt_loss(fn, am, lm, targets, tl, ul, prune_range=bad)
    with pytest.raises(ValueError, match="reduction"):
        pruned_rnnt_loss(fn, am, lm, targets, tl, ul, reduction="avg")
    with pytest.raises(ValueError, match="lm_only_scale"):
        pruned_rnnt_loss(fn, am, lm, targets, tl, ul, lm_only_scale=1.5)
    with pytest.raises(ValueError, match="<= 1"):
        pruned_rnnt_loss(fn, am, lm, targets, tl, ul, lm_only_scale=0.6, am_only_scale=0.6)
    with pytest.raises(ValueError, match="lm \\[B, U\\+1"):
        pruned_rnnt_loss(fn, am, lm[:, :U], targets, tl, ul)
    with pytest.raises(ValueError, match="logit_lengths"):
        pruned_rnnt_loss(fn, am, lm, targets, torch.tensor([4, 5]), ul)
    with pytest.raises(ValueError, match="target ids"):
        pruned_rnnt_loss(fn, am, lm, torch.tensor([[1, 2, 9], [1, 1, 1]]), tl, ul)
    with pytest.raises(ValueError, match=r"utterances \[1\] have more labels"):  # 2 frames x (2-1) < 3 labels
        pruned_rnnt_loss(fn, am, lm, targets, torch.tensor([4, 2]), torch.tensor([3, 3]), prune_range=2)
    with pytest.raises(ValueError, match="logits_fn returned"):
        pruned_rnnt_loss(lambda r: torch.zeros(B, T, 2, V), am, lm, targets, tl, ul, prune_range=3)


def test_warm_up_scales():
    assert pruned_loss_scales(None, 100, 0.5) == (0.5, 1.0)
    assert pruned_loss_scales(0, 100, 0.5) == (1.0, 0.1)
    assert pruned_loss_scales(50, 100, 0.5) == pytest.approx((0.75, 0.55))
    assert pruned_loss_scales(100, 100, 0.5) == pruned_loss_scales(10 ** 6, 100, 0.5) == (0.5, 1.0)
    assert pruned_loss_scales(3, 0, 0.25) == (0.25, 1.0)


# ---------------------------------------------------------------- the student with rnnt_loss="pruned"

def _tiny_student(**kw):
    from distill.student.model import StudentConfig, Transducer

    base = dict(vocab_size=10, d_model=32, num_layers=1, num_heads=2, ff_mult=2, conv_kernel=5, dropout=0.0,
                subsampling_channels=8, pred_dim=32, joiner_dim=32)
    base.update(kw)
    return Transducer(StudentConfig(**base))


def _batch():
    g = torch.Generator().manual_seed(0)
    return {"feats": torch.randn(3, 40, 80, generator=g), "feat_lens": torch.tensor([40, 29, 17]),
            "tokens": torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0], [9, 1, 0, 0, 0]]),
            "token_lens": torch.tensor([5, 3, 2]), "ids": ["a", "b", "c"]}


def test_student_pruned_loss_parts_and_equality_with_full_at_a_covering_range():
    torch.manual_seed(0)
    pruned_model = _tiny_student(rnnt_loss="pruned", prune_range=6)  # U+1 = 6: every symbol in every window
    full_model = _tiny_student()
    assert {"simple_am_proj.weight", "simple_lm_proj.weight"} <= set(pruned_model.state_dict())
    assert not any(k.startswith("simple_") for k in full_model.state_dict())  # "full" checkpoints unchanged
    missing, unexpected = full_model.load_state_dict(pruned_model.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == ["simple_am_proj.bias", "simple_am_proj.weight",
                                                  "simple_lm_proj.bias", "simple_lm_proj.weight"]
    batch = _batch()
    total, parts = pruned_model.compute_loss(batch)
    _, full_parts = full_model.compute_loss(batch)
    assert "simple" not in full_parts and "pruned" not in full_parts
    assert parts["pruned"] == pytest.approx(full_parts["transducer"], rel=1e-5)
    assert parts["transducer"] == pytest.approx(0.5 * parts["simple"] + parts["pruned"], rel=1e-5)
    assert float(total.detach()) == pytest.approx(parts["total"])
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pruned_model.parameters())
    assert pruned_model.simple_am_proj.weight.grad.abs().sum() > 0
    # warm-up: at step 0 of 100 the simple loss counts fully and the pruned one at 0.1
    warm = _tiny_student(rnnt_loss="pruned", prune_range=6, prune_warmup_steps=100)
    warm.load_state_dict(pruned_model.state_dict())
    _, p0 = warm.compute_loss(batch, step=0)
    assert p0["transducer"] == pytest.approx(p0["simple"] + 0.1 * p0["pruned"], rel=1e-5)
    _, pn = warm.compute_loss(batch)  # no step: the steady scales
    assert pn["transducer"] == pytest.approx(parts["transducer"], rel=1e-5)


def test_student_pruned_loss_with_a_narrow_range_trains():
    torch.manual_seed(1)
    model = _tiny_student(rnnt_loss="pruned", prune_range=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = _batch()
    first = None
    for _ in range(15):
        total, parts = model.compute_loss(batch)
        first = first if first is not None else parts
        opt.zero_grad()
        total.backward()
        opt.step()
    assert parts["pruned"] < first["pruned"] and parts["simple"] < first["simple"]


def test_student_config_fields_load_from_old_runs_and_are_validated():
    from distill.student.model import StudentConfig

    old = {"vocab_size": 12, "d_model": 32, "num_heads": 2}  # a config.json written before these fields existed
    cfg = StudentConfig.from_dict(old)
    assert (cfg.rnnt_loss, cfg.prune_range, cfg.simple_loss_scale, cfg.prune_warmup_steps) == ("full", 5, 0.5, 0)
    assert StudentConfig.from_dict(cfg.to_dict()) == cfg
    for bad, match in (({"rnnt_loss": "fast"}, "rnnt_loss"), ({"prune_range": 1}, "prune_range"),
                       ({"prune_range": 3.0}, "prune_range"), ({"simple_loss_scale": -0.1}, "simple_loss_scale"),
                       ({"prune_warmup_steps": -1}, "prune_warmup_steps")):
        with pytest.raises(ValueError, match=match):
            StudentConfig.from_dict({**old, **bad})


# ---------------------------------------------------------------- ci-store train-student --rnnt-loss

def test_train_student_cli_records_the_pruned_loss_and_refuses_contradictions(tiny_corpus, tmp_path):
    import json

    from click.testing import CliRunner

    from cli.main import main

    run = tmp_path / "run"
    student = json.dumps({"d_model": 32, "num_layers": 1, "num_heads": 2, "subsampling_channels": 8,
                          "pred_dim": 32, "joiner_dim": 32})
    base = ["train-student", "--train", tiny_corpus["train"], "--kd", "none", "--epochs", "1", "--threads", "1",
            "--max-seconds", "20", "--warmup-steps", "2", "--no-progress", "--student", student]
    res = CliRunner().invoke(main, [*base, "--out", str(run), "--rnnt-loss", "pruned", "--prune-range", "3"])
    assert res.exit_code == 0, res.output
    saved = json.load(open(run / "config.json"))["student"]
    assert saved["rnnt_loss"] == "pruned" and saved["prune_range"] == 3
    logged = [json.loads(line) for line in open(run / "log.jsonl")]
    assert logged and all(r["loss_transducer"] > 0 for r in logged)
    res = CliRunner().invoke(main, ["evaluate", str(run), tiny_corpus["dev"], "--json"])
    assert res.exit_code == 0, res.output
    greedy = json.loads(res.output)
    assert greedy["words"] > 0
    # ci-store evaluate --decoding modified_beam_search: beam 1 is greedy search, a wider beam scores the same words
    beam = {}
    for n in (1, 4):
        res = CliRunner().invoke(main, ["evaluate", str(run), tiny_corpus["dev"], "--json", "--decoding",
                                        "modified_beam_search", "--beam", str(n)])
        assert res.exit_code == 0, res.output
        beam[n] = json.loads(res.output)
    assert beam[1] == greedy
    assert beam[4]["words"] == greedy["words"] and beam[4]["chars"] == greedy["chars"]
    res = CliRunner().invoke(main, ["evaluate", str(run), tiny_corpus["dev"], "--beam", "0"])
    assert res.exit_code == 2 and "--beam" in res.output
    # the default for a new run is the pruned loss, unless --student names one
    from cli.cmd_train import _with_loss_options

    assert _with_loss_options({}, None, None) == {"rnnt_loss": "pruned"}
    assert _with_loss_options({"rnnt_loss": "full"}, None, None) == {"rnnt_loss": "full"}
    assert _with_loss_options({}, None, 7) == {"rnnt_loss": "pruned", "prune_range": 7}
    for extra, msg in ((["--rnnt-loss", "full", "--student", '{"rnnt_loss": "pruned"}'], "contradicts"),
                       (["--rnnt-loss", "pruned", "--prune-range", "4", "--student", '{"prune_range": 6}'],
                        "contradicts"),
                       (["--prune-range", "4", "--student", '{"rnnt_loss": "full"}'], "add --rnnt-loss pruned"),
                       (["--rnnt-loss", "pruned", "--prune-range", "1"], "--prune-range")):
        res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "bad"), *extra])
        assert res.exit_code == 2 and msg in res.output, res.output
        assert not (tmp_path / "bad" / "config.json").exists()
