"""``--device auto|cpu|cuda|cuda:N`` and ``--dtype fp32|bf16|fp16``: one way to read them everywhere."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

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


# -- the GPU speed features (all of them run on the CPU too, where tests cover them) ---------------

# TF32 policy, in one place. Training: TF32 on for CUDA convolutions and matmuls (``train.tf32``,
# default on): the weights' updates do not need fp32's 23-bit mantissa. Encoding: TF32 off for
# convolutions and matmuls, because its 10-bit mantissa lets a feature near a tie between two
# codes pick the other code depending on the batch size (cuDNN picks its algorithm by shape), and a
# token must be a property of the image alone. The CPU has no TF32: these switches change nothing there.


def set_tf32(enabled: bool) -> tuple[bool, bool]:
    """Switch TF32 for CUDA matmuls and cuDNN convolutions; returns the previous (matmul, cudnn)."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return before


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Full fp32 in CUDA matmuls and convolutions for the block (encoding's policy), restored after."""
    matmul, cudnn = set_tf32(False)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def compile_module(module: torch.nn.Module, enabled: bool, backend: str = "inductor") -> torch.nn.Module:
    """``torch.compile`` the module's forward in place (``nn.Module.compile``), so its parameter
    names, state dict and checkpoints stay those of the plain module. ``backend`` eager / aot_eager
    skip code generation (tests, debugging). Returns the module."""
    if not enabled:
        return module
    if backend not in COMPILE_BACKENDS:
        raise UserError(f"compile backend {backend}: use one of {', '.join(COMPILE_BACKENDS)}")
    # Validation and the last batch of an epoch change the batch size: dynamic shapes then, not a
    # recompilation per size.
    module.compile(backend=backend, dynamic=None)
    return module


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def channels_last(obj: Any, enabled: bool) -> Any:
    """A module or 4-d tensor in channels-last memory format when ``enabled`` (cuDNN's and oneDNN's
    fast layout for convolutions); anything else unchanged. Values and names do not change."""
    if not enabled:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.contiguous(memory_format=torch.channels_last) if obj.dim() == 4 else obj
    return obj.to(memory_format=torch.channels_last)


def pin_memory_for(device: torch.device) -> bool:
    """DataLoaders pin their batches for CUDA, so ``.to(device, non_blocking=True)`` overlaps the copy."""
    return torch.device(device).type == "cuda"


def to_device(x: torch.Tensor, device: torch.device, channels_last_format: bool = False) -> torch.Tensor:
    """A batch on ``device``: a non-blocking copy (from pinned memory, it overlaps compute), in
    channels-last format when asked."""
    return channels_last(x.to(device, non_blocking=True), channels_last_format)


def peak_memory_gb(device: torch.device, reset: bool = True) -> float | None:
    """This process's peak CUDA memory allocated by tensors on ``device`` since the last reset, in
    GB (1e9 bytes); None off CUDA. ``reset`` starts the next window."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 1e9
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
