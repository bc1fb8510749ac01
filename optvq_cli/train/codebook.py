"""Codebook initialisation from encoder features at step 0: ``random_select`` (the vanilla-VQ
baseline) or k-means (the ImageNet recipe)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from optvq_cli.model import OptVQModel
from optvq_cli.quant.assign import nearest_assign
from optvq_cli.train.config import TrainConfig


@torch.no_grad()
def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii): each next centre is a row drawn with probability
    proportional to its squared distance to the nearest centre so far. Stays on x's device (the
    uniform draws come from ``generator`` on the CPU)."""
    n = x.shape[0]
    u = torch.rand(k, generator=generator, dtype=torch.float64).to(x.device)
    first = int(torch.randint(n, (1,), generator=generator))
    centres = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centres[0] = x[first]
    d2 = (x - centres[0]).pow(2).sum(1).double()
    for j in range(1, k):
        cum = torch.cumsum(d2, 0)
        # All rows already centres (d2 == 0 everywhere): the draw falls back to the last row.
        idx = torch.searchsorted(cum, (u[j] * cum[-1]).reshape(1), right=True).clamp_(max=n - 1)
        centres[j] = x[idx[0]]
        d2 = torch.minimum(d2, (x - centres[j]).pow(2).sum(1).double())
    return centres


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means of rows x (l, d) into k centroids from k-means++ seeds; a cluster that
    empties is restarted at a random row."""
    n = x.shape[0]
    c = kmeans_plus_plus(x, k, generator)
    for _ in range(iters):
        idx = nearest_assign(x, c)
        sums = torch.zeros_like(c).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k).to(x.dtype)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            c[empty] = x[torch.randint(n, (int(empty.sum()),), generator=generator).to(x.device)]
    return c


def fetch(dataset, items: list[tuple[int, int]]) -> torch.Tensor:
    """A batch of (epoch, index) items, through the data set's batched read when it has one."""
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(items)
    return torch.stack([dataset[i] for i in items])


@torch.no_grad()
def _features(model: OptVQModel, dataset, want: int, batch: int, g: torch.Generator, device) -> torch.Tensor:
    """``want`` encoder feature vectors of training images in a seeded random order, fp32."""
    order = torch.randperm(len(dataset), generator=g).tolist()
    dim = model.quantize.code_dim
    feats, have = [], 0
    was_training = model.training
    model.eval()
    for s in range(0, len(order), batch):
        z = model.features(fetch(dataset, [(0, i) for i in order[s : s + batch]]).to(device))
        feats.append(z.permute(0, 2, 3, 1).reshape(-1, dim))
        have += feats[-1].shape[0]
        if have >= want:
            break
    model.train(was_training)
    return torch.cat(feats)[:want].float()


@torch.no_grad()
def init_codebook(
    model: OptVQModel, dataset, cfg: TrainConfig, device: torch.device, log: Callable[[str], None]
) -> None:
    """``random_select`` or ``kmeans``: codes from the (untrained) encoder's features of training
    images, per-head chunks pooled (all heads share one codebook). The shared projection is set to
    the identity so the projected codes start exactly there."""
    method = cfg.quantizer.init
    if method == "none":
        return
    q = model.quantize
    want = cfg.quantizer.init_samples or min(max(20 * q.n_codes, 2000), 500_000)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = _features(model, dataset, want, max(1, min(cfg.batch_size, 256)), g, device)
    if method == "random_select":
        pick = torch.randperm(x.shape[0], generator=g)[: q.n_codes]
        if x.shape[0] < q.n_codes:
            pick = torch.randint(x.shape[0], (q.n_codes,), generator=g)
        codes = x[pick.to(x.device)]
    else:
        codes = kmeans(x, q.n_codes, cfg.quantizer.kmeans_iters, g)
    q.embedding.weight.copy_(codes.to(q.embedding.weight))
    if q.proj is not None:
        q.proj.weight.copy_(torch.eye(q.code_dim))
        q.proj.bias.zero_()
    log(f"codebook: {method} init of {q.n_codes} codes from {x.shape[0]} encoder feature vectors")
