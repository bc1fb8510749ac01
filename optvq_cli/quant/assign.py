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
from contextlib import contextmanager

import torch
import torch.distributed as dist

# The authors' guards (their code, reproduced so their tokens come out).
STD_EPS = 1e-6
SUM_EPS = 1e-8
# Above this many bytes for one fp32 l x n matrix, sinkhorn_assign streams instead.
DEFAULT_MAX_BYTES = 2 * 1024**3
_V_MAX = 1e30  # keeps a code that nothing reaches from overflowing its scaling


class Workspace:
    """Memory for the Sinkhorn matrix, kept between calls on a CPU.

    A fresh l x n matrix costs one page fault per 4 KiB on every call (0.5 s of a 2.3 s assignment
    at 262,144 x 1,024); a quantizer called on pools of one shape (every training step) fills the
    same memory again. GPU allocators keep freed memory already: there nothing is held."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def matrix(self, rows: int, n: int, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return torch.empty(rows, n, device=device)
        if self._buf is None or self._buf.numel() < rows * n:
            self._buf = None  # the old one goes before the new one is made
            self._buf = torch.empty(rows * n)
        return self._buf[: rows * n].view(rows, n)

    def release(self) -> None:
        self._buf = None

    def __deepcopy__(self, memo) -> Workspace:  # a copied model (EMA) starts without one
        return Workspace()

    def __getstate__(self) -> dict:
        return {"_buf": None}


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


# Streaming sweeps take at least this many rows a block: every block is a multiply and a few
# parallel regions, each waiting for its slowest thread, and 128-row blocks (8 MiB at 16,384 codes)
# stalled on a core shared with another process (benchmarks/bench_contention.py). The dense sweeps
# read a stored matrix and keep their 8 MiB blocks: 512 rows measured 0.87x quiet, 1.09x beside a
# busy process.
SINKHORN_MIN_ROWS = 512


def _block_rows(n: int, device: torch.device, chunk_size: int | None = None, min_rows: int = 1) -> int:
    if chunk_size:
        return chunk_size
    # About 8 MiB of fp32 per block on CPU (stays in cache between the fused steps); larger on GPUs.
    # ``min_rows`` stops at 64 MiB a block, so streaming over many codes stays small in memory.
    n = max(n, 1)
    elems = 1 << 21 if device.type == "cpu" else 1 << 26
    return max(1, elems // n, min(min_rows, (1 << 24) // n))


class _Pairs:
    """x and codes laid out so one matrix multiply gives a block of squared distances:
    [x, 1, ||x||^2] . [-2c, ||c||^2, 1] = ||x - c||^2.

    Both are first centred on the pool's mean (distances do not change under a common shift, and
    it keeps ||x||^2 + ||c||^2 - 2 x.c from cancelling on features far from the origin), then scaled
    down by a power of two if their squares could overflow fp32 (D'' does not change under a
    global scale)."""

    def __init__(self, x: torch.Tensor, codes: torch.Tensor, group):
        count = torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device)
        total = _all_sum(torch.cat([count, x.sum(0, dtype=torch.float64)]), group)
        self.l_total = float(total[0])
        mu = (total[1:] / max(self.l_total, 1.0)).float()
        x, codes = x - mu, codes - mu
        big = torch.cat([x.abs().amax().reshape(1), codes.abs().amax().reshape(1)]).amax()
        if group is not None:
            dist.all_reduce(big, op=dist.ReduceOp.MAX, group=group)
        if float(big) > 2.0**48:
            shrink = 2.0 ** -(math.ceil(math.log2(float(big))) - 48)
            x, codes = x * shrink, codes * shrink
        self.x, self.codes = x, codes
        x2 = (x * x).sum(1, keepdim=True)
        c2 = (codes * codes).sum(1, keepdim=True)
        self.xa = torch.cat([x, torch.ones_like(x2), x2], 1)
        self.ca = torch.cat([-2.0 * codes, c2, torch.ones_like(c2)], 1)
        # Sum over the whole matrix of D^2 in closed form (float64 sums, no copies): the z-score's
        # second moment without a pass over D.
        parts = _all_sum(torch.cat([x2.sum(dtype=torch.float64).reshape(1), x.sum(0, dtype=torch.float64)]), group)
        n = codes.shape[0]
        c_sum = codes.sum(0, dtype=torch.float64)
        self.sum_sq = float(n * parts[0] + self.l_total * c2.sum(dtype=torch.float64) - 2 * parts[1:] @ c_sum)

    def sq_dist(self, s: int, e: int, out: torch.Tensor, ca: torch.Tensor | None = None) -> torch.Tensor:
        return torch.mm(self.xa[s:e], (self.ca if ca is None else ca).t(), out=out)

    def dist(self, s: int, e: int, out: torch.Tensor) -> torch.Tensor:
        return self.sq_dist(s, e, out).clamp_(min=0.0).sqrt_()


def _best_in_rows(t: torch.Tensor, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``t.max(1)`` (or ``t.min(1)``): each row's best value and the first index reaching it.

    Reductions that return indices are not vectorized on CPU (measured 6x slower than ``amax``
    at 128 x 16384): the value is found with amax over column groups, the index by one
    index-returning reduction over the winning group only. Same values, same first indices."""
    rows, n = t.shape
    w = next((w for w in (128, 160, 200, 250, 256, 96, 64) if n % w == 0 and n > w), None)
    if w is None or t.device.type != "cpu":
        return t.max(1) if largest else t.min(1)
    groups = t.view(rows, n // w, w)
    best, which = (groups.amax(2).max(1)) if largest else (groups.amin(2).min(1))
    inner = groups[torch.arange(rows, device=t.device), which]
    return best, which * w + (inner.argmax(1) if largest else inner.argmin(1))


def nearest_assign(x: torch.Tensor, codes: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Vanilla VQ (Eq. 1): k_i = argmin_j ||x_i - c_j||.

    Works on ``chunk_size`` rows at a time, so the full l x n matrix is never built. Each row is
    independent of every other: tokens do not depend on the batch.
    """
    x, codes = _prepare(x, codes)
    rows = _block_rows(codes.shape[0], x.device, chunk_size)
    # ||x||^2 is constant along a row: argmin ||x - c||^2 = argmin ([x, 1] . [-2c, ||c||^2]).
    xa = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    ca = torch.cat([-2.0 * codes, (codes * codes).sum(1, keepdim=True)], 1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], rows):
        out[s : s + rows] = _best_in_rows(torch.mm(xa[s : s + rows], ca.t()), largest=False)[1]
    return out


@contextmanager
def _flush_denormals(device: torch.device) -> Iterator[None]:
    # exp(-eps D'') underflows into subnormal floats, which x86 CPUs process several times slower
    # (measured 3x on a training step); values below 1e-38 cannot change a guarded sum or an argmax.
    on = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


def sinkhorn_assign(
    x: torch.Tensor,
    codes: torch.Tensor,
    epsilon: float = 10.0,
    n_iters: int = 5,
    chunk_size: int | None = None,
    max_bytes: int | None = None,
    distributed: bool | None = None,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """OptVQ assignment (Algorithm 1): k_i = argmax_j A_ij of the entropic transport plan.

    D_ij = ||x_i - c_j||; D' = (D - mean D) / (std D + 1e-6) and D'' = D' - min D' over the whole
    matrix (Eqs. 11-12); A = exp(-epsilon D'') (Eq. 10) scaled to total mass 1, then ``n_iters``
    times: each code's mass to 1/n, each vector's mass to 1/l (with the authors' +1e-8 guards).

    ``chunk_size=None`` holds one l x n fp32 matrix when it fits ``max_bytes`` (default 2 GiB) and
    otherwise streams; a ``chunk_size`` always streams (``OptVQuantizer.chunk_size`` passes one):
    distances are recomputed block by block on every pass and only the per-vector and per-code
    scalings are kept, O((l + n) d + chunk n) memory.
    ``distributed=None`` reduces across ranks whenever torch.distributed is initialized.
    ``workspace`` keeps the matrix's memory for the next call (see ``Workspace``).
    """
    x, codes = _prepare(x, codes)
    group = _default_group(distributed)
    if x.shape[0] == 0 and group is None:
        return torch.empty(0, dtype=torch.long, device=x.device)
    with _flush_denormals(x.device):
        budget = max_bytes or DEFAULT_MAX_BYTES
        return _sinkhorn(x, codes, epsilon, n_iters, chunk_size, budget, group, workspace or Workspace())


def _sinkhorn(x, codes, epsilon, n_iters, chunk_size, max_bytes, group, workspace: Workspace) -> torch.Tensor:
    pairs = _Pairs(x, codes, group)
    n, l_local = codes.shape[0], x.shape[0]
    stream = chunk_size is not None or l_local * n * 4 > max_bytes
    rows = _block_rows(n, x.device, chunk_size, SINKHORN_MIN_ROWS if stream else 1)
    spans = [(s, min(s + rows, l_local)) for s in range(0, l_local, rows)]
    store = workspace.matrix(min(rows, l_local) if stream else l_local, n, x.device)

    def view(s: int, e: int) -> torch.Tensor:
        return store[: e - s] if stream else store[s:e]

    scale, dmin = _z_score(pairs, spans, view, stream, epsilon, group)
    shift = scale * float(dmin)
    ca_scaled = pairs.ca * scale**2 if stream else None  # streaming folds the scale into the multiply

    def kernel(s: int, e: int) -> torch.Tensor:
        """K = exp(-eps D'') = exp(scale min D - scale D) for rows s:e."""
        if stream:
            kb = pairs.sq_dist(s, e, view(s, e), ca_scaled).clamp_(min=0.0).sqrt_()
            return torch.sub(shift, kb, out=kb).exp_()
        return view(s, e)

    # Sweep 2: K itself (kept in dense mode), its total mass and the first column sums.
    colk = torch.zeros(n, device=x.device)
    for s, e in spans:
        kb = view(s, e).mul_(-scale).add_(shift).exp_() if not stream else kernel(s, e)
        colk += kb.sum(0)
    _all_sum(colk, group)
    u0 = 1.0 / (float(colk.sum(dtype=torch.float64)) + SUM_EPS)  # A^0 scaled to total mass 1
    u = torch.full((l_local,), u0, device=x.device)
    v = _update(torch.ones(n, device=x.device), colk * u0, n)
    # Each further sweep fuses one row scaling with the next column sums; the last row scaling
    # cannot change any argmax and is skipped.
    for _ in range(n_iters - 1):
        col = torch.zeros(n, device=x.device)
        for s, e in spans:
            kb = kernel(s, e)
            u[s:e] = ub = _update(u[s:e], torch.mv(kb, v) * u[s:e], pairs.l_total)
            col.addmv_(kb.t(), ub)
        v = _update(v, _all_sum(col, group) * v, n)
    # Last sweep: k_i = argmax_j K_ij v_j.
    idx = torch.empty(l_local, dtype=torch.long, device=x.device)
    best = torch.empty(l_local, device=x.device)
    for s, e in spans:
        best[s:e], idx[s:e] = _best_in_rows(kernel(s, e).mul_(v))
    _fix_dead_rows(idx, best, pairs, v, scale, float(dmin))
    return idx


def _z_score(pairs: _Pairs, spans, view, stream: bool, epsilon: float, group) -> tuple[float, torch.Tensor]:
    """Sweep 1: mean and min of D (its second moment is closed-form), Eqs. 11-12; returns the
    factor epsilon / (std D + 1e-6) and min D. Dense mode leaves D in the store for sweep 2."""
    x, n = pairs.x, pairs.codes.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    dmin = torch.full((), math.inf, device=x.device)
    for s, e in spans:
        d = pairs.dist(s, e, view(s, e))
        total += d.sum().double()
        dmin = torch.minimum(dmin, d.min())
    _all_sum(total, group)
    _all_min(dmin, group)
    count = pairs.l_total * n
    mean = float(total) / count
    var = (pairs.sum_sq - float(total) * mean) / max(count - 1.0, 1.0)
    if var <= 1e-4 * pairs.sum_sq / count:  # ill-conditioned: exact sum of squared deviations
        m2 = torch.zeros((), dtype=torch.float64, device=x.device)
        for s, e in spans:
            d = view(s, e) if not stream else pairs.dist(s, e, view(s, e))
            m2 += (d - mean).square_().sum().double()
        var = float(_all_sum(m2, group)) / max(count - 1.0, 1.0)
    scale = epsilon / (math.sqrt(max(var, 0.0)) + STD_EPS)
    return scale, dmin


def _update(v: torch.Tensor, sums: torch.Tensor, size: float) -> torch.Tensor:
    """The authors' guarded normalization v <- v / (sum + 1e-8) / size; an all-zero line stays zero."""
    new = v / (sums + SUM_EPS) / size
    return torch.where(sums > 0, new, torch.zeros_like(new)).clamp_(max=_V_MAX)


def _fix_dead_rows(idx, best, pairs: _Pairs, v, scale: float, dmin: float) -> None:
    """Rows whose whole plan underflowed to 0 (a feature far from every code) are ties in the plain
    formulation; give them the limit the plan tends to, argmax_j (log K_ij + log v_j), computed in
    the log domain for just those rows."""
    dead = (best <= 0).nonzero().flatten()
    if dead.numel() == 0:
        return
    d = torch.cdist(pairs.x[dead], pairs.codes)
    logv = torch.where(v > 0, v.log(), torch.full_like(v, -math.inf))
    score = -scale * (d - dmin) + logv
    if not torch.isfinite(score.max(1).values).all():  # no live code at all: plain nearest
        score = -d
    idx[dead] = score.argmax(1)


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
