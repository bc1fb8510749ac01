"""``--device auto|cpu|cuda|cuda:N`` and ``--dtype fp32|bf16|fp16``: one way to read them everywhere."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from optvq_cli.core.errors import UserError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU. A CUDA device that this
    machine does not have is the user's mistake, not a silent fallback."""
    if isinstance(spec, torch.device):
        return spec
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not m:
        raise UserError(f"--device {spec}: not a device; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {spec}: CUDA is not available on this machine; use --device cpu or auto")
    index = int(m.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise UserError(f"--device {spec}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def resolve_dtype(spec: str | torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype for ``--dtype``: None for fp32 (no autocast), else bf16 / fp16."""
    if spec is None or isinstance(spec, torch.dtype):
        return None if spec == torch.float32 else spec
    key = spec.strip().lower()
    if key not in DTYPES:
        raise UserError(f"--dtype {spec}: use one of {', '.join(DTYPES)}")
    return DTYPES[key]


@contextlib.contextmanager
def autocast(device: torch.device | str, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device`` (nothing for None). The quantizer turns it off for itself."""
    if dtype is None:
        yield
        return
    device_type = torch.device(device).type
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield
