"""The OptVQ quantizer: multi-head assignment over one shared, affinely projected codebook.

A thin nn.Module over ``assign.py``. Parameter names match the authors' checkpoints
(``embedding.weight``, ``proj.weight``, ``proj.bias``) so their weights load as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from optvq_cli.quant import ASSIGN_MODES
from optvq_cli.quant.assign import Workspace, nearest_assign, sinkhorn_assign

Assign = Literal[ASSIGN_MODES]  # type: ignore[valid-type]  (the one list, in quant/__init__)
LossType = Literal["l2", "l1", "ce"]
Commitment = Literal["authors", "paper"]


@dataclass
class CodebookStats:
    """Usage of the codebook by a set of indices, per head and overall."""

    counts: torch.Tensor  # (heads, n) how often each code was chosen by each head
    usage: float  # fraction of codes chosen at least once, all heads together
    perplexity: float  # exp(entropy) of the code distribution, all heads together
    usage_per_head: list[float]
    perplexity_per_head: list[float]


def _perplexity(counts: torch.Tensor) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts.double() / total
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    return float(ent.exp())


def codebook_stats(indices: torch.Tensor, n_codes: int) -> CodebookStats:
    """Usage counts, fraction used and perplexity of ``indices`` shaped (B, heads, ...)."""
    heads = indices.shape[1]
    flat = indices.transpose(0, 1).reshape(heads, -1).long().cpu()
    counts = torch.stack([torch.bincount(h, minlength=n_codes) for h in flat])
    total = counts.sum(0)
    return CodebookStats(
        counts=counts,
        usage=float((total > 0).float().mean()),
        perplexity=_perplexity(total),
        usage_per_head=[float((c > 0).float().mean()) for c in counts],
        perplexity_per_head=[_perplexity(c) for c in counts],
    )


def commitment_loss(
    z_e: torch.Tensor,
    z_q: torch.Tensor,
    beta: float = 0.25,
    loss_type: LossType = "l2",
    commitment: Commitment = "authors",
    logits: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 4. ``commitment="paper"`` weights the encoder term ||z_e - sg(z_q)|| by beta as printed;
    ``"authors"`` (default) weights it 1 and the codebook term ||sg(z_e) - z_q|| by beta, as the
    published models were trained. ``"ce"`` is cross-entropy of -distance logits to the chosen codes.
    """
    if loss_type == "ce":
        assert logits is not None and indices is not None
        return F.cross_entropy(logits, indices)
    dist_fn = F.mse_loss if loss_type == "l2" else F.l1_loss
    code_term = dist_fn(z_q, z_e.detach())
    enc_term = dist_fn(z_e, z_q.detach())
    if commitment == "paper":
        return code_term + beta * enc_term
    return enc_term + beta * code_term


class OptVQuantizer(nn.Module):
    """Quantizes (B, C, H, W) or (B, T, C) features with C = e_dim, cut into ``heads`` chunks of
    ``e_dim // heads`` channels that share one codebook of ``n_codes`` codes.

    ``forward`` returns (z_q with straight-through gradient, loss, indices); indices are shaped
    (B, heads, H, W) for images and (B, heads, T) for sequences. ``chunk_size`` (an attribute, read
    at every call; ``optvq --sinkhorn-chunk N`` sets it on a loaded model) makes the Sinkhorn
    assignment stream in blocks of that many rows; None streams only above 2 GiB. On a CPU the
    Sinkhorn matrix's memory stays for the next call; ``workspace.release()`` frees it.
    """

    def __init__(
        self,
        n_codes: int = 16384,
        e_dim: int = 256,
        heads: int = 4,
        beta: float = 0.25,
        epsilon: float = 10.0,
        n_iters: int = 5,
        loss_type: LossType = "l2",
        commitment: Commitment = "authors",
        use_proj: bool = True,
        assign: Assign = "sinkhorn",
        chunk_size: int | None = None,
    ):
        super().__init__()
        if e_dim % heads:
            raise ValueError(f"e_dim={e_dim} is not divisible by heads={heads}")
        self.n_codes, self.e_dim, self.heads = n_codes, e_dim, heads
        self.code_dim = e_dim // heads
        self.beta, self.epsilon, self.n_iters = beta, epsilon, n_iters
        self.loss_type, self.commitment, self.assign = loss_type, commitment, assign
        self.chunk_size = chunk_size
        self.workspace = Workspace()  # the Sinkhorn matrix's memory, reused by the next call
        self.embedding = nn.Embedding(n_codes, self.code_dim)  # N(0, 1), PyTorch's default
        self.proj = nn.Linear(self.code_dim, self.code_dim) if use_proj else None
        if self.proj is not None:  # the authors' init: weight ~ N(0, 1/d)
            nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(self.code_dim))

    def codes(self) -> torch.Tensor:
        """The code table after the shared affine map, (n_codes, code_dim), in fp32."""
        w = self.embedding.weight.float()
        if self.proj is None:
            return w
        return F.linear(w, self.proj.weight.float(), self.proj.bias.float())

    def assign_indices(self, x: torch.Tensor, codes: torch.Tensor, assign: Assign | None = None):
        """Indices for a pool x (l, code_dim)."""
        mode = assign or self.assign
        if mode == "sinkhorn":
            return sinkhorn_assign(
                x, codes, self.epsilon, self.n_iters, chunk_size=self.chunk_size, workspace=self.workspace
            )
        if mode == "nearest":
            return nearest_assign(x, codes)
        raise ValueError(f"unknown assignment {mode!r}: use 'sinkhorn' or 'nearest'")

    def _to_pool(self, z: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        if z.dim() == 4:  # (B, C, H, W) -> (B, H, W, C)
            b, c, h, w = z.shape
            zl = z.permute(0, 2, 3, 1)
            spatial = (h, w)
        elif z.dim() == 3:  # (B, T, C)
            b, _, c = z.shape
            zl = z
            spatial = (z.shape[1],)
        else:
            raise ValueError(f"expected (B, C, H, W) or (B, T, C) features, got {tuple(z.shape)}")
        if c != self.e_dim:
            raise ValueError(f"features have {c} channels, the quantizer expects e_dim={self.e_dim}")
        return zl.reshape(-1, self.code_dim), (b, *spatial)

    def _from_pool(self, pool: torch.Tensor, shape: tuple, image: bool) -> torch.Tensor:
        b, *spatial = shape
        z = pool.reshape(b, *spatial, self.e_dim)
        return z.permute(0, 3, 1, 2) if image else z

    def _indices_layout(self, idx: torch.Tensor, shape: tuple) -> torch.Tensor:
        b, *spatial = shape
        idx = idx.reshape(b, *spatial, self.heads)
        return idx.movedim(-1, 1).contiguous()  # (B, heads, *spatial)

    def forward(self, z: torch.Tensor, assign: Assign | None = None):
        image = z.dim() == 4
        # The quantizer runs in fp32, also under autocast.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            pool, shape = self._to_pool(z)
            codes = self.codes()
            idx = self.assign_indices(pool, codes, assign)
            zq_pool = codes[idx]
            logits = None
            if self.loss_type == "ce":
                logits = -torch.cdist(pool, codes)
            loss = commitment_loss(
                pool, zq_pool, self.beta, self.loss_type, self.commitment, logits=logits, indices=idx
            )
            zq_pool = pool + (zq_pool - pool).detach()  # straight-through estimator, Eq. 2
            z_q = self._from_pool(zq_pool, shape, image)
        return z_q, loss, self._indices_layout(idx, shape)

    @torch.no_grad()
    def indices(self, z: torch.Tensor, assign: Assign | None = None) -> torch.Tensor:
        """Only the indices, (B, heads, ...)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            pool, shape = self._to_pool(z.float())
            return self._indices_layout(self.assign_indices(pool, self.codes(), assign), shape)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Exact code vectors for indices (B, heads, H, W) -> (B, e_dim, H, W); (B, heads, T) ->
        (B, T, e_dim). No straight-through residue; any grid shape."""
        if indices.shape[1] != self.heads:
            raise ValueError(f"indices have {indices.shape[1]} heads, the quantizer has {self.heads}")
        vec = self.codes()[indices.long()]  # (B, heads, *spatial, d)
        vec = vec.movedim(1, -2)  # (B, *spatial, heads, d)
        vec = vec.reshape(*vec.shape[:-2], self.e_dim)
        return vec.permute(0, 3, 1, 2).contiguous() if indices.dim() == 4 else vec

    def extra_repr(self) -> str:
        return (
            f"n_codes={self.n_codes}, e_dim={self.e_dim}, heads={self.heads}, assign={self.assign}, "
            f"epsilon={self.epsilon}, n_iters={self.n_iters}, loss={self.loss_type}/{self.commitment}"
        )
