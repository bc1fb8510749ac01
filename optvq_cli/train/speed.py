"""The speed settings of a training run: the autocast dtype ``amp`` selects, and the one-line
description of all of them (dtype, TF32, channels-last, compile, activation checkpointing)."""

from __future__ import annotations

import torch

from optvq_cli.core import device as G
from optvq_cli.train.config import TrainConfig


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: None (fp32) for ``fp32``; bf16 for ``bf16``; ``auto``: bf16 where CUDA has it."""
    if amp == "fp32":
        return None
    if amp == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def describe_speed(cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None) -> str:
    """E.g. ``bf16 + tf32 + channels-last + compiled (inductor)``."""
    parts = [G.DTYPE_NAMES.get(dtype, "fp32") if dtype is not None else "fp32"]
    if device.type == "cuda":
        parts.append("tf32" if cfg.tf32 else "no tf32")
    parts += ["channels-last"] * cfg.channels_last + [f"compiled ({cfg.compile_backend})"] * cfg.compile
    return " + ".join(parts + ["checkpointing"] * cfg.checkpointing)
