"""`optvq eval`'s options: the metrics, protocols and networks to choose from, and the checks that
need no model or image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from optvq_cli import sources
from optvq_cli.core.errors import UserError
from optvq_cli.quant import ASSIGN_MODES

METRICS = ("psnr", "ssim", "lpips", "rfid", "usage")
PROTOCOLS = ("optvq", "rgb")
LPIPS_NETS = ("vgg", "alex")


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
    source_options: sources.SourceOptions = sources.SourceOptions()  # how DATA and OTHER are read


def parse_metrics(text: str | None) -> tuple[str, ...] | None:
    if text is None or text.strip() in ("", "all"):
        return None
    names = tuple(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))
    bad = [n for n in names if n not in METRICS]
    if bad:
        raise UserError(f"--metrics {text}: unknown {', '.join(bad)}; choose from {','.join(METRICS)}")
    return names


def select_metrics(opts: EvalOptions) -> list[str]:
    if opts.metrics is None:
        return [m for m in METRICS if not (m == "usage" and opts.model is None)]
    if "usage" in opts.metrics and opts.model is None:
        raise UserError("--metrics usage needs --model (codebook health is a property of a model)")
    return list(opts.metrics)


def check_options(opts: EvalOptions) -> None:
    if not sources.is_collection(opts.data):
        raise UserError(f"{opts.data}: not a folder of images, tar shards or Parquet files")
    if (opts.model is None) == (opts.against is None):
        raise UserError("give one of --model REF (reconstruct DATA) or --against OTHER (compare folders), not both")
    if opts.against is not None and not sources.is_collection(opts.against):
        raise UserError(f"--against {opts.against}: not a folder of images, tar shards or Parquet files")
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
