"""One evaluation, settled before the first image is read: the model, the images and their pairs,
the metrics that can be computed and the networks they need, the reference statistics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from optvq_cli.core import dist as D
from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import sha256_file
from optvq_cli.eval import metrics as M
from optvq_cli.eval.inputs import check_pair_sizes, list_items, pair_by_name
from optvq_cli.eval.options import EvalOptions, check_options, select_metrics
from optvq_cli.eval.ref_stats import fingerprint, load_ref_stats
from optvq_cli.eval.sums import Sums
from optvq_cli.sources import Item, Problem


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
class Job:
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


def prepare(opts: EvalOptions, log: Callable[[str], None]) -> Job:
    check_options(opts)
    wanted = select_metrics(opts)
    device = D.device_for(opts.device)
    model = _load_model(opts, device)
    resolution = opts.resolution or (model.config.resolution if model is not None else None)
    mode = "L" if model is not None and model.config.in_channels == 1 else "RGB"
    channel = "y" if opts.protocol == "optvq" and mode == "RGB" else "rgb"  # one grey channel is its own luma
    items, problems = list_items(opts.data, opts.limit, opts.source_options)
    other = pair_by_name(items, opts.against, opts.source_options) if opts.against is not None else None
    job = Job(opts, wanted, device, model, resolution, mode, channel, items, other, problems)
    smallest = resolution if other is None or resolution is not None else check_pair_sizes(items, other)
    job.unavailable = _too_small(wanted, smallest, opts.lpips_net)
    job.nets = _Perceptual(opts, [m for m in wanted if m not in job.unavailable], device, log)
    job.unavailable.update(job.nets.unavailable)
    if job.nets.inception is not None:
        job.ref_meta = fingerprint([it.rel for it in items], resolution, job.nets.sha["rfid"], mode)
        if opts.ref_stats is not None and opts.ref_stats.is_file():
            job.ref_loaded = load_ref_stats(opts.ref_stats, job.ref_meta)
            log(f"reference statistics from {opts.ref_stats}")
    return job


def new_sums(job: Job) -> Sums:
    sums = Sums()
    if job.nets.inception is not None:
        sums.fake = M.FeatureStats(job.nets.inception.DIM)
        if job.ref_loaded is None:
            sums.real = M.FeatureStats(job.nets.inception.DIM)
    if job.want_usage:
        q = job.model.quantize
        sums.counts = torch.zeros(q.heads, q.n_codes, dtype=torch.int64)
    return sums
