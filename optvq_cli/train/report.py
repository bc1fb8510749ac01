"""What a run of `optvq train` returns and the lines it prints: a training row's stats, a
validation's line, the summary at the end."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    status: str  # completed | interrupted
    step: int
    total_steps: int
    run_dir: Path
    model_dir: Path | None
    skipped_steps: int
    val: dict[str, Any] | None


def train_text(row: dict[str, Any]) -> str:
    """A training metrics row as the progress bar's stats (or a log line's)."""
    psnr = f"{row['psnr_y']:.2f}" if row.get("psnr_y") is not None else "-"
    text = (
        f"loss {row.get('loss', float('nan')):.4f}  psnr_y {psnr}  usage {row['codebook_usage']:.1%}  "
        f"{row['steps_per_s']:.2f} steps/s"
    )
    if "gpu_mem_gb" in row:  # CUDA: the peak of the fullest process
        text += f"  {row['gpu_mem_gb']:.1f} GB"
    return text


def val_text(step: int, stats: dict[str, Any]) -> str:
    psnr = f"{stats['psnr_y']:.2f} dB" if stats["psnr_y"] is not None else "n/a"
    return (
        f"val step {step}: psnr_y {psnr}, codebook usage {stats['codebook_usage']:.1%}, "
        f"perplexity {stats['perplexity']:.1f} ({stats['images']} images)"
    )


def format_summary(result: TrainResult) -> str:
    v = result.val or {}
    psnr = f"{v['psnr_y']:.2f} dB" if v.get("psnr_y") is not None else "n/a"
    usage = f"{v['codebook_usage']:.1%}" if v.get("codebook_usage") is not None else "n/a"
    return f"step {result.step}/{result.total_steps}: val psnr_y {psnr}, codebook usage {usage}"
