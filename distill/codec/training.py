"""Training steps of the MVQ codec: sample frames, fit the fixed pre-transform (mean + PCA basis), initialise by
residual k-means, refine by alternating code search and a joint least-squares codebook update (LSQ-style AQ).

Every step is deterministic for a fixed seed on a fixed device: random draws come from one seeded generator,
sums over frames go through GEMMs or integer bincounts (no atomics), and linear solves run in float64.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

from .search import SearchTables, search_block


# ----------------------------------------------------------------------------------------------- input checking
def _error(message: str) -> Exception:
    from .quantizer import QuantizerError  # defined there; imported here lazily (quantizer imports this module)

    return QuantizerError(message)


def as_frames(batch, dim: int | None, what: str, row_offset: int = 0) -> torch.Tensor:
    """Validate one [n, dim] float batch (np or torch) and return it as a float32 CPU/device tensor."""
    if isinstance(batch, np.ndarray):
        if batch.dtype.kind not in "fiu":
            raise _error(f"{what}: expected a float array, got dtype {batch.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    elif isinstance(batch, torch.Tensor):
        if batch.is_complex() or batch.dtype == torch.bool:
            raise _error(f"{what}: expected a float tensor, got dtype {batch.dtype}")
        t = batch.detach().to(torch.float32)
    else:
        raise _error(f"{what}: expected a numpy array or torch tensor, got {type(batch).__name__}")
    if t.ndim != 2:
        raise _error(f"{what}: expected shape [frames, dim], got {tuple(t.shape)}")
    if dim is not None and t.shape[1] != dim:
        raise _error(f"{what}: wrong dim: frames have dim {t.shape[1]}, quantizer expects {dim}")
    bad = ~torch.isfinite(t).all(dim=1)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0]) + row_offset
        raise _error(f"{what}: row {row} contains NaN or inf")
    return t


def collect_frames(data, dim: int | None, max_frames: int, seed: int) -> torch.Tensor:
    """Up to `max_frames` training frames from an array or an iterable of batches, as float32 CPU tensor.

    A larger array is subsampled uniformly (seeded); a stream is reservoir-sampled (seeded), so any input
    order/batching of the same frames in one array gives a uniform sample without holding the stream.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    if isinstance(data, (np.ndarray, torch.Tensor)):
        n = data.shape[0] if data.ndim >= 1 else 0
        if n == 0:
            raise _error("training data is empty (0 frames)")
        if n > max_frames:
            keep = np.sort(rng.choice(n, size=max_frames, replace=False))
            data = data[keep] if isinstance(data, np.ndarray) else data[torch.from_numpy(keep)]
        return as_frames(data, dim, "training data").cpu()
    if not isinstance(data, Iterable):
        raise _error(f"training data must be an array, a tensor or an iterable of [n, dim] batches, "
                         f"got {type(data).__name__}")
    buf: torch.Tensor | None = None
    filled = 0
    seen = 0
    for bi, batch in enumerate(data):
        t = as_frames(batch, dim, f"training batch {bi}", row_offset=seen).cpu()
        if dim is None:
            dim = t.shape[1]
        if buf is None:
            buf = torch.empty((max_frames, dim), dtype=torch.float32)
        n = t.shape[0]
        take = min(n, max_frames - filled)
        if take > 0:
            buf[filled:filled + take] = t[:take]
            filled += take
        rest = t[take:]
        if rest.shape[0]:
            # Algorithm R, vectorised: frame with global index i replaces slot j ~ U{0..i} when j < max_frames.
            gidx = np.arange(seen + take, seen + n, dtype=np.float64)
            j = np.floor(rng.random(rest.shape[0]) * (gidx + 1)).astype(np.int64)
            hit = j < max_frames
            if hit.any():
                # later frames overwrite earlier ones hitting the same slot, as in the sequential algorithm
                js, src = j[hit], np.nonzero(hit)[0]
                last = {}
                for a, b in zip(js.tolist(), src.tolist()):
                    last[a] = b
                slots = torch.tensor(list(last.keys()), dtype=torch.int64)
                rows = torch.tensor(list(last.values()), dtype=torch.int64)
                buf[slots] = rest[rows]
        seen += n
    if buf is None or filled == 0:
        raise _error("training data is empty (0 frames)")
    return buf[:filled]


# ------------------------------------------------------------------------------------------------ pre-transform
def fit_pca(x: torch.Tensor, max_rows: int = 65536) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean float64 (D,), eigenvalues descending float64 (D,), eigenvectors float64 (D, D) as columns)."""
    mean = x.double().mean(0)
    xs = x[:max_rows].double() - mean
    cov = (xs.t() @ xs) / max(1, xs.shape[0])
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
    # deterministic sign: largest-magnitude entry of each basis vector positive
    sign = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
    sign[sign == 0] = 1.0
    return mean, evals, evecs * sign


def auto_proj_dim(evals: torch.Tensor, bits: float, factor: float = 2.0, multiple: int = 32) -> int:
    """Dimensions worth coding: `factor` x the active set of Gaussian reverse water-filling at `bits` per frame.

    Water-filling spends no bits on directions whose variance is below the distortion level, so truncating the
    PCA basis there loses little while making every GEMM cheaper; `factor` keeps margin for a real quantizer.
    """
    ev = evals.clamp_min(0).cpu().numpy()
    D = ev.shape[0]
    pos = ev[ev > 0]
    if pos.size == 0:
        return min(D, multiple)
    lo, hi = pos.min() * 1e-6, pos.max()
    for _ in range(200):
        th = math.sqrt(lo * hi)
        rate = np.maximum(0.0, 0.5 * np.log2(np.maximum(ev, 1e-300) / th)).sum()
        if rate > bits:
            lo = th
        else:
            hi = th
    active = int((ev > hi).sum())
    r = int(math.ceil(max(1, factor * active) / multiple) * multiple)
    return max(1, min(D, r))


# ---------------------------------------------------------------------------------------------------- k-means
def _onehot_sums(x: torch.Tensor, assign: torch.Tensor, K: int, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums (K, r) float64 via one-hot GEMMs (deterministic, no atomics) and counts (K,) int64."""
    sums = torch.zeros((K, x.shape[1]), dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], chunk):
        a = assign[s:s + chunk]
        oh = torch.zeros((a.shape[0], K), dtype=torch.float32, device=x.device)
        oh[torch.arange(a.shape[0], device=x.device), a] = 1.0
        sums += (oh.t() @ x[s:s + chunk]).double()
    counts = torch.bincount(assign, minlength=K)
    return sums, counts


def nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """(assignment int64 (N,), squared distance float32 (N,)) of each row of x to its nearest row of c."""
    cn = (c * c).sum(1)
    out_a, out_d = [], []
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk]
        d = cn - 2.0 * (xb @ c.t())
        v, a = d.min(1)
        out_a.append(a)
        out_d.append((v + (xb * xb).sum(1)).clamp_min(0))
    return torch.cat(out_a), torch.cat(out_d)


def kmeans(x: torch.Tensor, K: int, iters: int, gen: torch.Generator, shrink: float = 0.3
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd k-means. Returns (centroids (K, r), assignment (N,)).

    Init: K distinct random frames pulled towards the mean by `shrink`. In high dimensions a raw data point is far
    from every other point, so unshrunk seeds leave most clusters as singletons and collapse the rest into one
    (near-zero code entropy on residual stages); shrunk seeds split the data by direction first and stay balanced.
    Empty clusters are re-seeded with the worst-fit frames.
    """
    N = x.shape[0]
    mu = x.mean(0)
    init = torch.randperm(N, generator=gen)[:K].to(x.device)
    c = mu + shrink * (x[init] - mu)
    if N < K:  # fewer frames than codewords: pad with jittered copies
        extra = K - N
        pick = torch.randint(0, N, (extra,), generator=gen).to(x.device)
        noise = torch.randn((extra, x.shape[1]), generator=gen).to(x.device) * 1e-3 * (x.std() + 1e-12)
        c = torch.cat([c, x[pick] + noise])
    assign, dist = nearest(x, c)
    for _ in range(iters):
        sums, counts = _onehot_sums(x, assign, K)
        nz = counts > 0
        c = c.clone()
        c[nz] = (sums[nz] / counts[nz].unsqueeze(1).double()).float()
        dead = torch.nonzero(~nz).flatten()
        if dead.numel():
            worst = torch.topk(dist, min(dead.numel(), N)).indices
            c[dead[:worst.numel()]] = x[worst]
        assign, dist = nearest(x, c)
    return c, assign


# ------------------------------------------------------------------------------------------- code search (train)
def search_all(z: torch.Tensor, codebooks: torch.Tensor, beam: int, icm_sweeps: int, block: int = 512) -> torch.Tensor:
    """Codes (N, M) int64 for all rows of z (training-time helper; blocks only bound memory here)."""
    t = SearchTables(codebooks)
    out = []
    for s in range(0, z.shape[0], block):
        out.append(search_block(z[s:s + block], t, beam, icm_sweeps))
    return torch.cat(out)


def reconstruct(codes: torch.Tensor, codebooks: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    M = codebooks.shape[0]
    out = []
    for s in range(0, codes.shape[0], chunk):
        c = codes[s:s + chunk]
        acc = codebooks[0][c[:, 0]].clone()
        for m in range(1, M):
            acc += codebooks[m][c[:, m]]
        out.append(acc)
    return torch.cat(out)


def sq_error(z: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> float:
    return float(((z - reconstruct(codes, codebooks)).double() ** 2).sum())


# ------------------------------------------------------------------------------------------------ LSQ update
def lsq_codebooks(z: torch.Tensor, codes: torch.Tensor, K: int, ridge: float,
                  gen: torch.Generator) -> torch.Tensor:
    """Jointly re-fit all codebooks for fixed codes: argmin_C ||Z - B C||^2 + ridge ||C||^2, B the one-hot code matrix.

    B^T B comes from exact integer co-occurrence counts; B^T Z from one-hot GEMMs; solved by Cholesky in float64.
    Codewords no frame uses are re-seeded next to the busiest codeword of their codebook (split), so they get a
    chance in the next search instead of staying dead.
    """
    N, M = codes.shape
    r = z.shape[1]
    MK = M * K
    dev = z.device
    offs = torch.arange(M, device=dev) * K
    gidx = codes + offs                                           # (N, M) global codeword ids
    gram = torch.empty((MK, MK), dtype=torch.float64, device=dev)
    for m in range(M):
        pair = gidx[:, m:m + 1] * MK + gidx                       # (N, M) ids into the (MK, MK) grid, rows of block m
        cnt = torch.bincount((pair - m * K * MK).reshape(-1), minlength=K * MK)
        gram[m * K:(m + 1) * K] = cnt.view(K, MK).double()
    rhs = torch.zeros((MK, r), dtype=torch.float64, device=dev)
    for m in range(M):
        s, _ = _onehot_sums(z, codes[:, m], K)
        rhs[m * K:(m + 1) * K] = s
    counts = torch.diagonal(gram).clone()
    lam = ridge * max(1.0, N / K)
    gram.diagonal().add_(lam)
    L = torch.linalg.cholesky(gram)
    C = torch.cholesky_solve(rhs, L).float().view(M, K, r)
    dead = (counts == 0).view(M, K)
    if bool(dead.any()):
        scale = float(z.std()) * 1e-2 / math.sqrt(max(1, M))
        C = C.clone()
        cnt = counts.view(M, K)
        for m in torch.nonzero(dead.any(1)).flatten().tolist():
            d = torch.nonzero(dead[m]).flatten()
            busiest = torch.argsort(cnt[m], descending=True, stable=True)[:d.numel()]
            noise = torch.randn((d.numel(), r), generator=gen).to(dev) * scale
            C[m, d] = C[m, busiest] + noise
    return C
