"""What the eval report is made of: sums over images (and counts, and feature moments), reduced
over the torchrun processes once at the end."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from optvq_cli.core import dist as D
from optvq_cli.eval import metrics as M


@dataclass
class Sums:
    """Everything additive that the report is made of."""

    count: int = 0
    psnr_y: float = 0.0  # BT.601 luma
    psnr_rgb: float = 0.0  # all channels
    ssim: float = 0.0
    lpips: float = 0.0
    agree: int = 0
    tokens: int = 0
    counts: torch.Tensor | None = None  # (heads, n_codes)
    real: M.FeatureStats | None = None
    fake: M.FeatureStats | None = None
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of skipped images


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) otherwise. Read before any process
    group exists: eval creates one only for the final reduction."""
    return int(os.environ.get("RANK", "0")), D.env_world_size()


def _reduce_stats(st: M.FeatureStats) -> M.FeatureStats:
    merged = M.FeatureStats(st.dim)
    n = torch.tensor([st.n], dtype=torch.float64)
    merged.total, merged.outer = st.total.clone(), st.outer.clone()
    for t in (n, merged.total, merged.outer):
        D.all_reduce_sum(t)
    merged.n = int(n)
    return merged


def reduce(sums: Sums) -> Sums:
    """Sum every field over the processes (gloo, CPU tensors, float64): once, at the end. The group
    exists only here, so the quantizer never synchronizes its Sinkhorn pools across processes."""
    created = D.init_from_env()  # no device: gloo, for the CPU tensors below
    try:
        scalars = torch.tensor(
            [sums.count, sums.psnr_y, sums.psnr_rgb, sums.ssim, sums.lpips, sums.agree, sums.tokens],
            dtype=torch.float64,
        )
        D.all_reduce_sum(scalars)
        count, psnr_y, psnr_rgb, ssim, lpips, agree, tokens = scalars.tolist()
        out = Sums(int(count), psnr_y, psnr_rgb, ssim, lpips, int(agree), int(tokens))
        if sums.counts is not None:
            out.counts = D.all_reduce_sum(sums.counts.clone())
        out.real = _reduce_stats(sums.real) if sums.real is not None else None
        out.fake = _reduce_stats(sums.fake) if sums.fake is not None else None
        out.failed = sorted(f for part in D.all_gather_object(sums.failed) for f in part)
        return out
    finally:
        if created:
            D.destroy()
