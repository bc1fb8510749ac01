"""What the encode / decode / reconstruct jobs share: option checks, the run's bookkeeping, batched
reading and encoding of images, decoding, and background PNG writing.

Images are read and preprocessed in DataLoader workers while the main process runs batched
inference on the device; a bad input comes back as data (path, reason), never as an exception.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from optvq_cli.core.errors import UserError
from optvq_cli.core.images import (
    ImageDataset,
    Preprocess,
    Sample,
    batch_to_tensor,
    collate,
    to_pil,
    to_pixels,
)
from optvq_cli.core.workers import default_workers, make_loader
from optvq_cli.quant import ASSIGN_MODES
from optvq_cli.sources import Item

Progress = Callable[[int, int, int], None]  # (images finished so far, total, how many of those were already done)
OnFailure = Callable[[str, str], None]  # (path, reason)


def canonical_ref(ref: str) -> str:
    """The model reference as the manifest records it: a local folder or file becomes an absolute
    path, so ``decode`` finds it from any working directory; names and hub ids stay as given."""
    p = Path(ref).expanduser()
    return str(p.resolve()) if p.exists() else ref


def workers_or_default(workers: int | None) -> int:
    return default_workers() if workers is None else workers


@dataclass
class Summary:
    """What a run did; the CLI prints it and exits non-zero when ``failed`` is not empty."""

    command: str
    output: Path
    total: int = 0
    written: int = 0  # outputs written by this run
    skipped: int = 0  # outputs that already existed (finished by an earlier run)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0
    psnr_rgb: list[float] = field(default_factory=list)  # reconstruct: one per image written

    @property
    def rate(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_psnr_rgb(self) -> float | None:
        return float(np.mean(self.psnr_rgb)) if self.psnr_rgb else None


class Run:
    """Bookkeeping shared by the jobs: progress, failures, --strict."""

    def __init__(self, summary: Summary, strict: bool, on_progress: Progress | None, on_failure: OnFailure | None):
        self.summary, self.strict = summary, strict
        self.on_progress, self.on_failure = on_progress, on_failure
        self.done = 0
        self.already = 0  # of ``done``: outputs an earlier run had finished
        self.start = time.perf_counter()

    def advance(self, n: int = 1, already_done: bool = False) -> None:
        self.done += n
        self.already += n if already_done else 0
        if self.on_progress:
            self.on_progress(self.done, self.summary.total, self.already)

    def skip(self, n: int = 1) -> None:
        self.summary.skipped += n
        self.advance(n, already_done=True)

    def fail(self, path: str, reason: str) -> None:
        self.summary.failed.append((path, reason))
        if self.strict:
            raise UserError(f"{path}: {reason} (stopped by --strict; fix or remove it and rerun)")
        if self.on_failure:
            self.on_failure(path, reason)
        self.advance()

    def finish(self) -> Summary:
        self.summary.seconds = time.perf_counter() - self.start
        return self.summary


def check_options(assign: str = "nearest", pack: bool = False, crop: bool = True) -> None:
    """Flag checks that need no model: the CLI runs them before the (slow) model load."""
    if assign not in ASSIGN_MODES:
        raise UserError(f"--assign {assign}: use one of {', '.join(ASSIGN_MODES)}")
    if pack and not crop:
        raise UserError(
            "--pack --no-crop: --pack stacks one grid size for all images, --no-crop gives each image "
            "its own; drop one of the two flags"
        )


def check_counts(batch_size: int, workers: int | None = 0) -> None:
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if workers is not None and workers < 0:
        raise UserError(f"--workers {workers}: must be 0 or more")


def make_preprocess(model: Any, size: int | None, crop: bool) -> Preprocess:
    f = int(model.downsample)
    if size is not None and size < 1:
        raise UserError(f"--size {size}: must be a positive number of pixels")
    if size is not None and size < f:
        raise UserError(f"--size {size}: smaller than one token of this model ({f} px); use at least {f}")
    return Preprocess(size=size or int(model.config.resolution), crop=crop, multiple=f)


# ---------------------------------------------------------------- images -> indices


def _loader(dataset: Any, batch_size: int, workers: int) -> Any:
    check_counts(batch_size, workers)
    return make_loader(dataset, batch_size, workers, collate)


def by_shape(samples: list[Sample]) -> list[list[Sample]]:
    """Same-shape groups in first-seen order: with --no-crop one batch may hold several sizes."""
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.pixels.shape, []).append(s)
    return list(groups.values())


@contextlib.contextmanager
def full_fp32(device: Any) -> Iterator[None]:
    """No TF32 in cuDNN convolutions while encoding: its 10-bit mantissa would let a token near a
    tie flip with the batch size (the chosen algorithm changes with it); plain fp32 keeps tokens
    a property of the image. Restored afterwards."""
    import torch

    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


@dataclass
class Batch:
    failed: list[Sample]
    groups: list[tuple[list[Sample], Any]]  # (samples, indices (B, heads, h, w) on the device)


def encoded_batches(
    model: Any, items: list[Item], pre: Preprocess, assign: str, batch_size: int, workers: int
) -> Iterator[Batch]:
    """``items`` read in workers and encoded in batches of ``batch_size``, in order."""
    import torch

    device = model.device
    dataset = ImageDataset(items, int(model.config.in_channels), pre)
    with torch.inference_mode():
        for samples in _loader(dataset, batch_size, workers):
            failed = [s for s in samples if s.error is not None]
            groups = []
            for group in by_shape([s for s in samples if s.pixels is not None]):
                x = batch_to_tensor([s.pixels for s in group], device)
                with full_fp32(device):
                    groups.append((group, model.encode_indices(x, assign=assign)))
            yield Batch(failed, groups)


# ---------------------------------------------------------------- indices -> images


def decode_indices(model: Any, indices: Any) -> np.ndarray:
    """(B, heads, h, w) indices -> (B, H, W, C) uint8 pixels: the one decoding path for decode and
    reconstruct, so both give the same images."""
    import torch

    with torch.inference_mode():
        return to_pixels(model.decode_indices(indices))


class Writer:
    """Runs writes (PNG encoding: zlib releases the GIL) in background threads, overlapped with
    decoding; at most ``max_pending`` in flight. A write's error (disk full) surfaces in the caller."""

    def __init__(self, threads: int = 2, max_pending: int = 64):
        self.pool = ThreadPoolExecutor(threads) if threads > 0 else None  # 0: write in the caller
        self.pending: deque[Future] = deque()
        self.max_pending = max_pending

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        if self.pool is None:
            fn(*args)
            return
        while self.pending and (self.pending[0].done() or len(self.pending) >= self.max_pending):
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(fn, *args))

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)


def png_writer(pixels: np.ndarray) -> Callable[[Path], None]:
    """A ``write(tmp)`` for ``Output.write`` that saves ``pixels`` as a PNG."""
    image = to_pil(pixels)
    return lambda tmp: image.save(tmp, format="PNG")
