"""Code assignment: nearest neighbour (paper Eq. 1) and OptVQ's optimal transport (Eqs. 8-12).

Pure tensor functions. ``x`` is a pool of ``l`` vectors (l, d), ``codes`` the code table (n, d);
each function returns one code index per vector (LongTensor of shape (l,)).

The Sinkhorn plan is kept factored, A = diag(u) K diag(v) with K = exp(-eps * D''), so the
l x n matrix is built once (dense mode) or never (streaming mode, ``chunk_size``) instead of once
per normalization. The scalings reproduce the authors' guarded updates exactly, and since the last
row normalization rescales each row by one positive number it cannot change a row's argmax: it is
skipped. Under torch.distributed every global statistic (mean, std, min of D, total mass, every
sum over vectors) is reduced across ranks, so each rank gets the indices one process would get
on the concatenated pool.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist

# The authors' guards (their code, reproduced so their tokens come out).
STD_EPS = 1e-6
SUM_EPS = 1e-8
# Above this many bytes for one fp32 l x n matrix, sinkhorn_assign streams instead.
DEFAULT_MAX_BYTES = 2 * 1024**3
# Rows per block when streaming: small blocks stay in cache (measured in `make bench`).
DEFAULT_CHUNK = 256
_V_MAX = 1e30  # keeps a code that nothing reaches from overflowing its scaling


def _default_group(distributed: bool | None):
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return dist.group.WORLD if distributed else None


def _all_sum(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _all_min(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return t


def _prepare(x: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 copies, checked. Always fp32: half precision distances break the z-score."""
    if x.dim() != 2 or codes.dim() != 2 or x.shape[1] != codes.shape[1]:
        raise ValueError(f"expected x (l, d) and codes (n, d), got {tuple(x.shape)} and {tuple(codes.shape)}")
    return x.detach().float(), codes.detach().float().to(x.device)


def _distances(x: torch.Tensor, codes: torch.Tensor, c2: torch.Tensor, out: torch.Tensor | None = None):
    """Euclidean (not squared) distances, D_ij = ||x_i - c_j||, via one matrix multiply."""
    x2 = (x * x).sum(1, keepdim=True)
    d = torch.addmm(c2.unsqueeze(0), x, codes.t(), beta=1.0, alpha=-2.0, out=out)
    return d.add_(x2).clamp_(min=0.0).sqrt_()


def _center(x: torch.Tensor, codes: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    # Distances do not change under a common shift; centring keeps ||x||^2 + ||c||^2 - 2 x.c
    # from cancelling catastrophically on features far from the origin (e.g. scaled by 1e6).
    count = torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device)
    total = x.sum(0, dtype=torch.float64)
    _all_sum(count, group)
    _all_sum(total, group)
    mu = (total / count.clamp(min=1)).float()
    return x - mu, codes - mu


def nearest_assign(x: torch.Tensor, codes: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Vanilla VQ (Eq. 1): k_i = argmin_j ||x_i - c_j||.

    Works on ``chunk_size`` rows at a time (default: enough rows for about 256 MiB of scores), so
    the full l x n matrix is never built. Independent of every other row: batch-independent tokens.
    """
    x, codes = _prepare(x, codes)
    n = codes.shape[0]
    if chunk_size is None:
        chunk_size = max(1, (256 * 1024**2) // (4 * max(n, 1)))
    c2 = (codes * codes).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], chunk_size):
        # ||x||^2 is constant along a row, so argmin ||x - c||^2 = argmin (||c||^2 - 2 x.c).
        scores = torch.addmm(c2.unsqueeze(0), x[s : s + chunk_size], codes.t(), alpha=-2.0)
        out[s : s + chunk_size] = scores.argmin(1)
    return out


def _dist_stats(x, codes, c2, chunk, group, out=None):
    """Global mean, unbiased std and min of D, combined blockwise (Chan et al.) in float64."""
    cnt = 0.0
    mean = torch.zeros((), dtype=torch.float64, device=x.device)
    m2 = torch.zeros((), dtype=torch.float64, device=x.device)
    dmin = torch.full((), math.inf, dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        d = _distances(x[s : s + chunk], codes, c2, out=None if out is None else out[s : s + chunk])
        bcnt = float(d.numel())
        bmean = d.mean(dtype=torch.float64)
        bm2 = _m2(d, bmean)
        delta = bmean - mean
        tot = cnt + bcnt
        mean = mean + delta * (bcnt / tot)
        m2 = m2 + bm2 + delta * delta * (cnt * bcnt / tot)
        cnt = tot
        dmin = torch.minimum(dmin, d.min())
    if group is not None:
        # Combine ranks: first the global mean, then the spread around it.
        buf = torch.stack([torch.tensor(cnt, dtype=torch.float64, device=x.device), mean * cnt])
        _all_sum(buf, group)
        gmean = buf[1] / buf[0]
        m2 = m2 + cnt * (mean - gmean) ** 2
        _all_sum(m2, group)
        _all_min(dmin, group)
        cnt, mean = float(buf[0]), gmean
    std = torch.sqrt(m2.clamp(min=0) / max(cnt - 1.0, 1.0))
    return mean, std, dmin


def _m2(d: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    # Sum of squared deviations without a float64 copy of a large matrix.
    acc = torch.zeros((), dtype=torch.float64, device=d.device)
    m = mean.float()
    rows = max(1, (1 << 22) // max(d.shape[1], 1))
    for s in range(0, d.shape[0], rows):
        acc += ((d[s : s + rows] - m) ** 2).sum(dtype=torch.float64)
    return acc


def sinkhorn_assign(
    x: torch.Tensor,
    codes: torch.Tensor,
    epsilon: float = 10.0,
    n_iters: int = 5,
    chunk_size: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    distributed: bool | None = None,
) -> torch.Tensor:
    """OptVQ assignment (Algorithm 1): k_i = argmax_j A_ij of the entropic transport plan.

    D_ij = ||x_i - c_j||; D' = (D - mean D) / (std D + 1e-6) and D'' = D' - min D' over the whole
    matrix (Eqs. 11-12); A = exp(-epsilon D'') (Eq. 10) scaled to total mass 1, then ``n_iters``
    times: each code's mass to 1/n, each vector's mass to 1/l (with the authors' +1e-8 guards).

    ``chunk_size=None`` holds one l x n fp32 matrix when it fits ``max_bytes`` and otherwise
    streams; an explicit ``chunk_size`` always streams: distances are recomputed block by block on
    every pass and only the per-vector and per-code scalings are kept, O((l + n) d + chunk n) memory.
    ``distributed=None`` reduces across ranks whenever torch.distributed is initialized.
    """
    x, codes = _prepare(x, codes)
    group = _default_group(distributed)
    if x.shape[0] == 0 and group is None:
        return torch.empty(0, dtype=torch.long, device=x.device)
    x, codes = _center(x, codes, group)
    n = codes.shape[0]
    l_total = torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device)
    _all_sum(l_total, group)
    l_total = float(l_total)
    c2 = (codes * codes).sum(1)

    if chunk_size is None and x.shape[0] * n * 4 <= max_bytes:
        return _sinkhorn_dense(x, codes, c2, epsilon, n_iters, n, l_total, group)
    return _sinkhorn_stream(x, codes, c2, epsilon, n_iters, n, l_total, group, chunk_size or DEFAULT_CHUNK)


def _kernel_(d: torch.Tensor, dmin: torch.Tensor, scale: float) -> torch.Tensor:
    """In place: D -> exp(-eps D'') with D'' = (D - min D) / (std + 1e-6), scale = eps / (std + 1e-6)."""
    return d.sub_(dmin).mul_(-scale).exp_()


def _update(v: torch.Tensor, sums: torch.Tensor, size: float) -> torch.Tensor:
    """The authors' guarded normalization v <- v / (sum + 1e-8) / size; an all-zero line stays zero."""
    new = v / (sums + SUM_EPS) / size
    return torch.where(sums > 0, new, torch.zeros_like(new)).clamp_(max=_V_MAX)


def _sinkhorn_dense(x, codes, c2, epsilon, n_iters, n, l_total, group):
    k = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    block = max(1, (1 << 24) // max(n, 1))
    _, std, dmin = _dist_stats(x, codes, c2, block, group, out=k)  # fills k with D
    scale = float(epsilon / (std + STD_EPS))
    for s in range(0, x.shape[0], block):  # blockwise keeps the pass in cache
        _kernel_(k[s : s + block], dmin, scale)
    total = _all_sum(k.sum(dtype=torch.float64).reshape(1), group)
    u = torch.full((x.shape[0],), 1.0 / (float(total) + SUM_EPS), device=x.device)
    v = torch.ones(n, device=x.device)
    for t in range(n_iters):
        col = _all_sum(torch.mv(k.t(), u) * v, group)
        v = _update(v, col, n)
        if t + 1 < n_iters:  # the last row scaling cannot change any argmax
            u = _update(u, torch.mv(k, v) * u, l_total)
    return _argmax_rows(k, v, x, codes, c2, dmin, scale)


def _argmax_rows(k, v, x, codes, c2, dmin, scale, offset: int = 0):
    block = max(1, (1 << 22) // max(k.shape[1], 1))
    idx = torch.empty(k.shape[0], dtype=torch.long, device=k.device)
    best = torch.empty(k.shape[0], dtype=torch.float32, device=k.device)
    for s in range(0, k.shape[0], block):
        best[s : s + block], idx[s : s + block] = (k[s : s + block] * v).max(1)
    _fix_dead_rows(idx, best, x[offset : offset + k.shape[0]], codes, c2, v, dmin, scale)
    return idx


def _fix_dead_rows(idx, best, x, codes, c2, v, dmin, scale):
    """Rows whose whole plan underflowed to 0 (a feature far from every code) are ties in the plain
    formulation; give them the limit the plan tends to, argmax_j (log K_ij + log v_j), computed in
    the log domain for just those rows."""
    dead = (best <= 0).nonzero().flatten()
    if dead.numel() == 0:
        return
    d = _distances(x[dead], codes, c2)
    logv = torch.where(v > 0, v.log(), torch.full_like(v, -math.inf))
    score = -scale * (d - dmin) + logv
    if not torch.isfinite(score.max(1).values).all():  # no live code at all: plain nearest
        score = -d
    idx[dead] = score.argmax(1)


def _sinkhorn_stream(x, codes, c2, epsilon, n_iters, n, l_total, group, chunk):
    l_local = x.shape[0]
    _, std, dmin = _dist_stats(x, codes, c2, chunk, group)
    scale = float(epsilon / (std + STD_EPS))
    buf = torch.empty(min(chunk, l_local), n, dtype=torch.float32, device=x.device)

    def blocks():
        for s in range(0, l_local, chunk):
            kb = buf[: min(chunk, l_local - s)]
            _distances(x[s : s + chunk], codes, c2, out=kb)
            yield s, _kernel_(kb, dmin, scale)

    # Pass 1: total mass and the first column sums (u is one constant scalar at the start).
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    colk = torch.zeros(n, dtype=torch.float32, device=x.device)
    for _, kb in blocks():
        cs = kb.sum(0)
        colk += cs
        total += cs.sum(dtype=torch.float64)
    _all_sum(total, group)
    _all_sum(colk, group)
    u0 = 1.0 / (float(total) + SUM_EPS)
    u = torch.full((l_local,), u0, device=x.device)
    v = _update(torch.ones(n, device=x.device), colk * u0, n)
    # Each later pass fuses this iteration's row scaling with the next one's column sums.
    for _ in range(n_iters - 1):
        col = torch.zeros(n, dtype=torch.float32, device=x.device)
        for s, kb in blocks():
            ub = u[s : s + kb.shape[0]]
            ub = _update(ub, torch.mv(kb, v) * ub, l_total)
            u[s : s + kb.shape[0]] = ub
            col.addmv_(kb.t(), ub)
        _all_sum(col, group)
        v = _update(v, col * v, n)
    idx = torch.empty(l_local, dtype=torch.long, device=x.device)
    best = torch.empty(l_local, dtype=torch.float32, device=x.device)
    for s, kb in blocks():
        best[s : s + kb.shape[0]], idx[s : s + kb.shape[0]] = kb.mul_(v).max(1)
    _fix_dead_rows(idx, best, x, codes, c2, v, dmin, scale)
    return idx


def sinkhorn_plans(
    x: torch.Tensor, codes: torch.Tensor, epsilon: float = 10.0, n_iters: int = 5
) -> Iterator[torch.Tensor]:
    """The authors' dense formulation written plainly, yielding A^0, A^1, ..., A^T.

    The reference the fast path is tested and benchmarked against (and Fig. 9's data). It builds
    several l x n matrices; not for production use.
    """
    x, codes = _prepare(x, codes)
    d = torch.cdist(x, codes)
    d = (d - d.mean()) / (d.std() + STD_EPS)
    d = d - d.min()
    a = torch.exp(-epsilon * d)
    a = a / (a.sum() + SUM_EPS)
    yield a
    n, l_ = codes.shape[0], x.shape[0]
    for _ in range(n_iters):
        a = a / (a.sum(dim=0, keepdim=True) + SUM_EPS) / n
        a = a / (a.sum(dim=1, keepdim=True) + SUM_EPS) / l_
        yield a


def sinkhorn_assign_plain(
    x: torch.Tensor, codes: torch.Tensor, epsilon: float = 10.0, n_iters: int = 5
) -> torch.Tensor:
    """Indices of the plain formulation's final plan (see ``sinkhorn_plans``)."""
    *_, last = sinkhorn_plans(x, codes, epsilon, n_iters)
    return last.argmax(dim=1)
