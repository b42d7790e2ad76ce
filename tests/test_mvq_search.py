"""The code search gives the codes of the plain search it optimises: same arithmetic, same codes, bit for bit.

The reference below is the search written the direct way (full (MK x MK) table rows, all columns updated every
step, one chunk): codes already in stores were made by it, so an optimisation that changed a single code would
silently mix two codecs under one quantizer id.
"""
import numpy as np
import pytest
import torch

from distill.codec import search as S


def plain_search(z: torch.Tensor, codebooks: torch.Tensor, beam: int, sweeps: int) -> torch.Tensor:
    M, K, r = codebooks.shape
    flat = codebooks.reshape(M * K, r)
    norms = (flat.double() ** 2).sum(1).float()
    cross = (2.0 * (flat.double() @ flat.double().t())).float()
    u = (norms - 2.0 * (z @ flat.t().contiguous())).view(-1, M, K)
    B, W = u.shape[0], max(1, min(beam, K))
    # beam search: every hypothesis carries the pairwise sums for all later codebooks' columns
    cost, k = torch.topk(u[:, 0, :], W, dim=1, largest=False, sorted=True)
    codes = k.reshape(B * W, 1)
    acc = cross[k.reshape(-1)][:, K:]
    for m in range(1, M):
        cand = cost.unsqueeze(-1) + u[:, m, :].unsqueeze(1) + acc[:, :K].reshape(B, W, K)
        cost, flat_idx = torch.topk(cand.reshape(B, W * K), W, dim=1, largest=False, sorted=True)
        parent = flat_idx // K
        src = (torch.arange(B, device=z.device).unsqueeze(1) * W + parent).reshape(-1)
        kk = (flat_idx - parent * K).reshape(-1)
        codes = torch.cat([codes[src], kk.reshape(-1, 1)], dim=1)
        acc = acc[src][:, K:] + cross[kk + m * K][:, (m + 1) * K:]
    codes = codes.view(B, W, M)[:, 0, :].clone()
    # ICM: every step updates the pairwise sums of all columns
    s = cross[(codes + torch.arange(M, device=z.device) * K).reshape(-1)].view(B, M, M * K).sum(1)
    for _ in range(sweeps):
        for m in range(M):
            old = codes[:, m] + m * K
            new = torch.argmin(u[:, m, :] + s[:, m * K:(m + 1) * K] - cross[old, m * K:(m + 1) * K], dim=1)
            codes[:, m] = new
            s = s - cross[old] + cross[new + m * K]
    return codes


@pytest.mark.parametrize("M,K,r,beam,sweeps", [
    (1, 16, 8, 4, 1), (2, 4, 3, 8, 2), (5, 16, 12, 3, 0), (8, 32, 16, 8, 1), (17, 16, 24, 2, 2), (16, 256, 32, 8, 1),
])
def test_search_gives_the_plain_search_codes(M, K, r, beam, sweeps):
    g = torch.Generator().manual_seed(M * 1000 + K)
    codebooks = torch.randn((M, K, r), generator=g) / M ** 0.5
    # 203 rows: several CPU chunks and a partial one; frames near sums of codewords, so the search has work to do
    pick = torch.randint(0, K, (203, M), generator=g)
    z = codebooks[torch.arange(M), pick].sum(1) + 0.3 * torch.randn((203, r), generator=g)
    t = S.SearchTables(codebooks)
    got = S.search_block(z, t, beam, sweeps)
    want = plain_search(z, codebooks, beam, sweeps)
    assert got.shape == (203, M) and got.dtype == torch.int64
    assert torch.equal(got, want), f"{int((got != want).sum())} codes differ"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_search_on_cuda_gives_the_plain_search_codes():
    """On an accelerator the block is searched in one piece; same arithmetic as the plain search there too."""
    g = torch.Generator().manual_seed(3)
    codebooks = torch.randn((16, 256, 32), generator=g).cuda() / 4
    z = torch.randn((256, 32), generator=g).cuda()
    got = S.search_block(z, S.SearchTables(codebooks), 8, 1)
    want = plain_search(z, codebooks, 8, 1)
    assert got.is_cuda and torch.equal(got, want)


def test_chunking_never_changes_a_code(monkeypatch):
    g = torch.Generator().manual_seed(1)
    codebooks = torch.randn((6, 32, 10), generator=g)
    z = torch.randn((150, 10), generator=g)
    t = S.SearchTables(codebooks)
    by_chunk = {}
    for rows in (1, 7, 64, 1000):
        monkeypatch.setattr(S, "CPU_CHUNK_ROWS", rows)
        by_chunk[rows] = S.search_block(z, t, 4, 1)
    for rows, codes in by_chunk.items():
        assert torch.equal(codes, by_chunk[1000]), rows
    # and the search is a search: ICM never ends above the beam's cost
    u = S.unary_terms(z, t)
    cross = t.cross
    offs = torch.arange(6) * 32

    def objective(codes):
        idx = codes + offs
        pair = cross[idx.unsqueeze(2), idx.unsqueeze(1)].sum((1, 2)) - cross[idx, idx].sum(1)
        return u.gather(2, codes.unsqueeze(2)).sum((1, 2)) + pair / 2

    beam_only = S.beam_search(u, t, 4)
    assert bool((objective(by_chunk[1000]) <= objective(beam_only) + 1e-4).all())
    assert np.mean((by_chunk[1000] != beam_only).numpy()) > 0  # ICM did change some codes here
