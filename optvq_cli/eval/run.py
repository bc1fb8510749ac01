"""`optvq eval`: reconstruct a folder of images through a model (or pair it with another folder) and
measure PSNR, SSIM, LPIPS, rFID and codebook health under one recorded protocol.

Every figure is a sum over images (or a count, or feature moments), so shards add up exactly:
under ``torchrun`` each process takes whole batches (batch i goes to rank i mod world size), the
model sees exactly the batches one process would (Sinkhorn assigns each batch as one pool), and the
sums are reduced once at the end. The process group is only created for that final reduction, so
the quantizer never synchronizes its Sinkhorn pools across processes.

Modules: ``options``, ``inputs`` (images and pairs, through the source layer), ``job`` (the setup),
``ref_stats``, ``sums`` (and their reduction), ``report``, ``pictures``; the measuring loop here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from optvq_cli.core.errors import UserError
from optvq_cli.core.workers import make_loader
from optvq_cli.eval import metrics as M
from optvq_cli.eval.inputs import EvalImages, as_list, size_mismatch
from optvq_cli.eval.job import Job, new_sums, prepare
from optvq_cli.eval.options import EvalOptions
from optvq_cli.eval.ref_stats import save_ref_stats
from optvq_cli.eval.report import make_report
from optvq_cli.eval.sums import Sums, reduce, world
from optvq_cli.quant.quantizer import codebook_stats


@dataclass
class EvalResult:
    report: dict[str, Any]
    counts: torch.Tensor | None = None  # (heads, n_codes) over the whole data set
    samples: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (original, reconstruction) [0, 1]


Progress = Callable[[int, int], None]  # (images done, images in total) of this process
Skip = Callable[[str, str], None]  # (path, why): an image that cannot be read, skipped


def _reconstruct(model, x01: torch.Tensor, assign: str, want_usage: bool):
    """(reconstruction in [0, 1], indices, indices of the other assignment or None)."""
    x = x01 * 2 - 1
    other_mode = "nearest" if assign == "sinkhorn" else "sinkhorn"
    if hasattr(model, "features"):  # one encoder pass for both assignments
        z = model.features(x)
        idx = model.quantize.indices(z, assign=assign)
        other = model.quantize.indices(z, assign=other_mode) if want_usage else None
    else:
        idx = model.encode_indices(x, assign=assign)
        other = model.encode_indices(x, assign=other_mode) if want_usage else None
    rec = model.decode_indices(idx).float()
    return ((rec + 1) / 2).clamp(0, 1), idx, other


def _as_rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _readable(job: Job, items: list, sums: Sums, on_skip: Skip) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (image, other image) pairs of a batch that could be read; the rest reported and skipped."""
    good = []
    for i, img, err, oimg, oerr in items:
        name = job.items[i].display
        bad = [(name, err)] if err else []
        if oerr and job.other[i].display != name:  # DATA against itself: one line per file
            bad.append((job.other[i].display, oerr))
        for path, why in bad:
            sums.failed.append((path, why))
            on_skip(path, why)
        if bad:
            continue
        if job.other is not None and img.shape != oimg.shape:  # the headers said one size, the pixels another
            size = lambda t: (t.shape[2], t.shape[1])  # noqa: E731
            raise UserError(size_mismatch(name, size(img), job.other[i].display, size(oimg)))
        good.append((img, oimg))
    return good


def _by_shape(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs stacked into batches of one image size, in order of first appearance."""
    groups: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for a, b in pairs:
        groups.setdefault(tuple(a.shape), []).append((a, b))
    return [(torch.stack([a for a, _ in g]), torch.stack([b for _, b in g])) for g in groups.values()]


def _measure(job: Job, sums: Sums, img: torch.Tensor, oimg: torch.Tensor):
    """Add one batch of one size to the sums; returns (originals, reconstructions) in [0, 1]."""
    x01 = img.to(job.device).float() / 255
    if job.model is None:
        y01 = oimg.to(job.device).float() / 255
    else:
        y01, idx, other_idx = _reconstruct(job.model, x01, job.opts.assign, job.want_usage)
        if job.want_usage:
            sums.counts += codebook_stats(idx, job.model.quantize.n_codes).counts
            sums.agree += int((idx == other_idx).sum())
            sums.tokens += idx.numel()
    _accumulate(job, sums, x01, y01)
    return x01, y01


def _accumulate(job: Job, sums: Sums, x01: torch.Tensor, y01: torch.Tensor) -> None:
    sums.count += x01.shape[0]
    if job.computes("psnr"):
        grey = x01.shape[1] == 1  # one grey channel is its own luma
        sums.psnr_y += float(M.psnr(x01, y01, "rgb" if grey else "y").sum())
        sums.psnr_rgb += float(M.psnr(x01, y01, "rgb").sum())
    if job.computes("ssim"):
        sums.ssim += float(M.ssim(x01, y01, job.channel).sum())
    nets = job.nets
    if nets.lpips is not None:
        sums.lpips += float(nets.lpips(_as_rgb(x01), _as_rgb(y01)).double().sum())
    if nets.inception is not None:
        if sums.real is not None:
            sums.real.update(nets.inception(_as_rgb(x01)))
        sums.fake.update(nets.inception(_as_rgb(y01)))


def _loader(job: Job, rank: int, world_size: int) -> tuple[DataLoader, int]:
    """This process's batches (batch i goes to rank i mod world size) and how many images they hold."""
    n, b = len(job.items), job.opts.batch_size
    mine = [list(range(i, min(i + b, n))) for i in range(0, n, b)][rank::world_size]
    dataset = EvalImages(job.items, job.resolution, job.mode, job.other)
    loader = make_loader(dataset, mine, job.opts.workers, as_list, pin_memory=job.device.type == "cuda")
    return loader, sum(len(x) for x in mine)


def _evaluate(job: Job, loader: DataLoader, total: int, progress: Progress | None, on_skip: Skip):
    """(sums of this process, kept samples)."""
    sums, samples, done = new_sums(job), [], 0
    with torch.inference_mode():
        for items in loader:
            for img, oimg in _by_shape(_readable(job, items, sums, on_skip)):
                x01, y01 = _measure(job, sums, img, oimg)
                room = job.opts.n_samples - len(samples)
                samples += [(a.cpu(), b.cpu()) for a, b in zip(x01[:room], y01[:room], strict=True)]
            done += len(items)
            if progress is not None:
                progress(done, total)
    return sums, samples


def _save_ref(job: Job, sums: Sums, log: Callable[[str], None]) -> None:
    path = job.opts.ref_stats
    if sums.failed:  # the statistics would not be of the images their fingerprint names
        log(f"reference statistics not written to {path}: {len(sums.failed)} image(s) could not be read")
    elif sums.real.n >= 2:
        save_ref_stats(path, sums.real.mean(), sums.real.cov(), job.ref_meta)
        log(f"wrote reference statistics to {path}")


def run_eval(
    opts: EvalOptions,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda m: None,
    on_skip: Skip = lambda path, why: None,
) -> EvalResult:
    """Evaluate; returns an EvalResult whose ``report`` is the JSON report (same on every rank).
    An image that cannot be read is passed to ``on_skip``, left out, and listed in ``failed``."""
    job = prepare(opts, log)
    rank, world_size = world()
    loader, total = _loader(job, rank, world_size)
    sums, samples = _evaluate(job, loader, total, progress, on_skip)
    if rank == 0:  # folders that could not be listed: failures, counted once
        for path, why in job.problems:
            sums.failed.append((path, why))
            on_skip(path, why)
    if world_size > 1:
        sums = reduce(sums)
    report = make_report(job, sums, world_size)
    if sums.real is not None and opts.ref_stats is not None and rank == 0:
        _save_ref(job, sums, log)
    return EvalResult(report=report, counts=sums.counts, samples=samples)
