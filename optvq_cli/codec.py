"""The encode / decode / reconstruct pipelines, as library functions the CLI wires up.

Images are read and preprocessed in DataLoader workers while the main process runs batched
inference on the device. Every output is written atomically, a rerun skips outputs that exist,
and a bad input is reported (path, reason) and skipped: the run goes on and its summary counts it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import tokens as tk
from .errors import UserError
from .images import (
    ImageDataset,
    ImageItem,
    Placement,
    Preprocess,
    Sample,
    batch_to_tensor,
    collate,
    find_inputs,
    to_pil,
    to_pixels,
    unpad,
)

DEFAULT_MODEL = "default"  # the bundled model's name, resolved by load_model: works offline
ASSIGN_MODES = ("nearest", "sinkhorn")
Progress = Callable[[int, int], None]  # (images finished so far, total)
OnFailure = Callable[[str, str], None]  # (path, reason)


def canonical_ref(ref: str) -> str:
    """The model reference as the manifest records it: a local folder or file becomes an absolute
    path, so ``decode`` finds it from any working directory; names and hub ids stay as given."""
    p = Path(ref).expanduser()
    return str(p.resolve()) if p.exists() else ref


def default_workers() -> int:
    """Reader processes: leave one core for the main process, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


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
    psnr: list[float] = field(default_factory=list)  # reconstruct: one per image written

    @property
    def rate(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_psnr(self) -> float | None:
        return float(np.mean(self.psnr)) if self.psnr else None


class _Run:
    """Bookkeeping shared by the pipelines: progress, failures, --strict."""

    def __init__(self, summary: Summary, strict: bool, on_progress: Progress | None, on_failure: OnFailure | None):
        self.summary, self.strict = summary, strict
        self.on_progress, self.on_failure = on_progress, on_failure
        self.done = 0
        self.start = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.on_progress:
            self.on_progress(self.done, self.summary.total)

    def fail(self, path: str, reason: str, finalize: Callable[[], None] | None = None) -> None:
        self.summary.failed.append((path, reason))
        if self.strict:
            if finalize:
                finalize()
            raise UserError(f"{path}: {reason} (stopped by --strict; fix or remove it and rerun)")
        if self.on_failure:
            self.on_failure(path, reason)
        self.advance()

    def finish(self) -> Summary:
        self.summary.seconds = time.perf_counter() - self.start
        return self.summary


# ---------------------------------------------------------------- shared: images -> indices


def _device(model: Any):
    return next(model.parameters()).device


def _loader(dataset: ImageDataset, batch_size: int, workers: int):
    from torch.utils.data import DataLoader

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if workers < 0:
        raise UserError(f"--workers {workers}: must be 0 or more")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=4 if workers else None,  # keeps the device fed while workers decode
    )


def _by_shape(samples: list[Sample]) -> list[list[Sample]]:
    """Same-shape groups in first-seen order: with --no-crop one batch may hold several sizes."""
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.pixels.shape, []).append(s)
    return list(groups.values())


@contextlib.contextmanager
def _full_fp32(device: Any) -> Iterator[None]:
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
class _Batch:
    failed: list[Sample]
    header_only: list[Sample]  # outputs exist already: only placement was read
    groups: list[tuple[list[Sample], Any]]  # (samples, indices (B, heads, h, w) on the device)


def _encoded_batches(
    model: Any,
    items: list[ImageItem],
    pre: Preprocess,
    assign: str,
    batch_size: int,
    workers: int,
    header_only: set[int],
) -> Iterator[_Batch]:
    import torch

    device = _device(model)
    channels = int(model.config.in_channels)
    dataset = ImageDataset(items, channels, pre, header_only=header_only)
    loader = _loader(dataset, batch_size, workers)
    with torch.inference_mode():
        for samples in loader:
            failed = [s for s in samples if s.error is not None]
            headers = [s for s in samples if s.error is None and s.pixels is None]
            todo = [s for s in samples if s.pixels is not None]
            groups = []
            for group in _by_shape(todo):
                x = batch_to_tensor([s.pixels for s in group], device)
                with _full_fp32(device):
                    groups.append((group, model.encode_indices(x, assign=assign)))
            yield _Batch(failed, headers, groups)


def _check_assign(assign: str) -> None:
    if assign not in ASSIGN_MODES:
        raise UserError(f"--assign {assign}: use one of {', '.join(ASSIGN_MODES)}")


def make_preprocess(model: Any, size: int | None, crop: bool) -> Preprocess:
    if size is not None and size < 1:
        raise UserError(f"--size {size}: must be a positive number of pixels")
    return Preprocess(size=size or int(model.config.resolution), crop=crop, multiple=int(model.downsample))


def _row(item: ImageItem, root: Path, placement: Placement, f: int) -> dict:
    w, h = placement.resized
    pl, pt, pr, pb = placement.padding
    return {
        "name": item.name,
        "source": _relative(item.path, root),
        "grid": [(h + pt + pb) // f, (w + pl + pr) // f],
        **placement.to_json(),
    }


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _check_output_dir(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise UserError(f"{output}: exists and is not a folder; give a folder for the outputs")


# ---------------------------------------------------------------- encode


def _manifest_header(
    model: Any,
    model_ref: str,
    revision: str | None,
    pre: Preprocess,
    assign: str,
    batch_size: int,
    pack: bool,
    root: Path,
) -> dict:
    return {
        "format": tk.FORMAT,
        "version": tk.FORMAT_VERSION,
        "model": tk.model_identity(model, model_ref, revision),
        "preprocess": pre.to_json(),
        "assign": assign,
        # nearest: each image's tokens depend on that image only; sinkhorn: on its whole batch.
        "batch_dependent": assign == "sinkhorn",
        **({"batch_size": batch_size} if assign == "sinkhorn" else {}),
        "layout": "packed" if pack else "files",
        "dtype": tk.uint_dtype(int(model.quantizer.n_codes)).name,
        "input": str(root.resolve()),
    }


_SETTINGS = ("preprocess", "assign", "batch_size", "layout", "dtype")  # batch_size: sinkhorn only


def _check_compatible(existing: dict, header: dict, output: Path) -> None:
    """An OUTPUT written by another model or with other settings would mix incompatible tokens."""
    where = output / tk.MANIFEST
    old, new = tk.manifest_sha256(existing), header["model"]["sha256"]
    if old != new:
        raise UserError(
            f"{where}: these tokens belong to another model (sha256 {tk.short(old)}, this one is "
            f"{tk.short(new)}); pass --overwrite to replace them or choose another OUTPUT"
        )
    for key in _SETTINGS:
        if existing.get(key) != header.get(key):
            raise UserError(
                f"{where}: written with a different {key} ({existing.get(key)} vs {header.get(key)}); "
                "pass --overwrite to replace the outputs or choose another OUTPUT"
            )


def encode(
    model: Any,
    input: Path,
    output: Path,
    *,
    model_ref: str,
    revision: str | None = None,
    size: int | None = None,
    crop: bool = True,
    assign: str = "nearest",
    pack: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
    on_progress: Progress | None = None,
    on_failure: OnFailure | None = None,
) -> Summary:
    """Images under INPUT to token grids under OUTPUT (see the module doc for the layout)."""
    _check_assign(assign)
    input, output = Path(input), Path(output)
    _check_output_dir(output)
    pre = make_preprocess(model, size, crop)
    root, items, problems = find_inputs(input, exclude=[output])
    header = _manifest_header(model, model_ref, revision, pre, assign, batch_size, pack, root)
    existing = tk.read_manifest(output)
    if existing is not None and not overwrite:
        _check_compatible(existing, header, output)
    tk.remove_temp_files(output)

    f = int(model.downsample)
    n = len(items)
    summary = Summary("encode", output, total=n + len(problems))
    run = _Run(summary, strict, on_progress, on_failure)
    rows: list[dict | None] = [None] * n

    if pack and _packed_is_complete(existing, output, items, overwrite):
        summary.skipped = n
        for path, reason in problems:
            run.fail(path, reason)
        run.advance(n)
        return run.finish()

    done = set() if (overwrite or pack) else {i for i, it in enumerate(items) if (output / f"{it.name}.npy").is_file()}
    output.mkdir(parents=True, exist_ok=True)
    # Written first so an interrupted run still says which model and settings its files came from.
    tk.write_manifest(output, {**header, "complete": False, "images": []})

    def finalize(complete: bool = False) -> None:
        tk.write_manifest(output, {**header, "complete": complete, "images": [r for r in rows if r]})

    for path, reason in problems:
        run.fail(path, reason, finalize)

    grids: dict[int, np.ndarray] = {}
    dtype = tk.uint_dtype(int(model.quantizer.n_codes))
    for batch in _encoded_batches(model, items, pre, assign, batch_size, _workers(workers), done):
        for s in batch.header_only:
            rows[s.index] = _row(items[s.index], root, s.placement, f)
            summary.skipped += 1
        run.advance(len(batch.header_only))
        for group, indices in batch.groups:
            arr = indices.cpu().numpy().astype(dtype)
            for s, grid in zip(group, arr, strict=True):
                item = items[s.index]
                if pack:
                    grids[s.index] = grid
                else:
                    tk.save_npy(output / f"{item.name}.npy", grid)
                rows[s.index] = _row(item, root, s.placement, f)
                summary.written += 1
            run.advance(len(group))
        for s in batch.failed:
            run.fail(str(items[s.index].path), s.error, finalize)

    if pack:
        _write_packed(output, items, rows, grids)
    finalize(complete=True)
    return run.finish()


def _workers(workers: int | None) -> int:
    return default_workers() if workers is None else workers


def _packed_is_complete(existing: dict | None, output: Path, items: list[ImageItem], overwrite: bool) -> bool:
    if overwrite or not existing or not existing.get("complete") or not (output / tk.PACKED).is_file():
        return False
    return existing.get("layout") == "packed" and [r["name"] for r in existing["images"]] == [it.name for it in items]


def _write_packed(output: Path, items: list[ImageItem], rows: list[dict | None], grids: dict[int, np.ndarray]) -> None:
    order = sorted(grids)
    if not order:
        return
    shapes = {grids[i].shape for i in order}
    if len(shapes) > 1:
        odd = next(i for i in order if grids[i].shape != grids[order[0]].shape)
        raise UserError(
            f"{items[odd].path}: its token grid {grids[odd].shape} differs from {grids[order[0]].shape}; "
            "--pack needs one grid size for all images: drop --no-crop or --pack"
        )
    tk.save_npy(output / tk.PACKED, np.stack([grids[i] for i in order]))
    tk.write_lines(output / tk.PATHS, [items[i].name for i in order])


# ---------------------------------------------------------------- decode


@dataclass
class _TokenSource:
    path: Path  # the .npy file
    name: str  # output name (no extension)
    packed_index: int | None = None  # position inside a packed (N, heads, h, w) file
    row: dict | None = None  # the manifest row, for the recorded padding


def tokens_model(tokens: Path) -> tuple[str, str | None] | None:
    """(model ref, revision) recorded by the manifest next to TOKENS, or None."""
    manifest = _manifest_for(Path(tokens))
    if manifest is None:
        return None
    model = manifest.get("model") or {}
    return (model["ref"], model.get("revision")) if model.get("ref") else None


def _manifest_for(tokens: Path) -> dict | None:
    folder = tokens if tokens.is_dir() else tokens.parent
    return tk.read_manifest(folder)


def _walk_npy(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, f) for f in sorted(filenames) if f.endswith(".npy") and not f.startswith(".")]
    return found


def _packed_names(path: Path, manifest: dict | None, count: int) -> list[str]:
    if manifest and manifest.get("layout") == "packed" and path.name == tk.PACKED:
        names = [r["name"] for r in manifest.get("images", [])]
        if len(names) == count:
            return names
    paths_txt = path.parent / tk.PATHS
    if path.name == tk.PACKED and paths_txt.is_file():
        names = paths_txt.read_text(encoding="utf-8").splitlines()
        if len(names) == count:
            return names
    return [f"{path.stem}_{i:06d}" if path.name != tk.PACKED else f"{i:06d}" for i in range(count)]


def decode(
    model: Any,
    tokens: Path,
    output: Path,
    *,
    batch_size: int = 32,
    overwrite: bool = False,
    strict: bool = False,
    on_progress: Progress | None = None,
    on_failure: OnFailure | None = None,
) -> Summary:
    """Token grids (a .npy, a folder of them, or a packed file) to PNGs under OUTPUT."""
    tokens, output = Path(tokens), Path(output)
    if not tokens.exists():
        raise UserError(f"{tokens}: no such file or folder; give a .npy token file or a folder of them")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    _check_output_dir(output)
    manifest = _manifest_for(tokens)
    if manifest is not None and tk.manifest_sha256(manifest) != model.sha256:
        where = (tokens if tokens.is_dir() else tokens.parent) / tk.MANIFEST
        raise UserError(
            f"{where}: these tokens were made by another model (sha256 "
            f"{tk.short(tk.manifest_sha256(manifest))}, the given model is {tk.short(model.sha256)}); "
            "pass the model that encoded them with --model"
        )
    rows = {r["name"]: r for r in (manifest or {}).get("images", [])}
    if tokens.is_dir():
        files = _walk_npy(tokens)
        if not files:
            raise UserError(f"{tokens}: no .npy token files found")
        names = [p.relative_to(tokens).with_suffix("").as_posix() for p in files]
    else:
        files, names = [tokens], [tokens.stem]
    tk.remove_temp_files(output)
    heads, n_codes = int(model.quantizer.heads), int(model.quantizer.n_codes)

    summary = Summary("decode", output, total=len(files))  # a packed file adds its N - 1 when read
    run = _Run(summary, strict, on_progress, on_failure)
    writer = _Writer()
    pending: list[tuple[_TokenSource, np.ndarray]] = []

    def flush() -> None:
        for group in _grids_by_shape(pending):
            images = _decode_grids(model, [g for _, g in group])
            for (src, _), pixels in zip(group, images, strict=True):
                writer.png(output / f"{src.name}.png", _unpad_row(pixels, src.row))
                summary.written += 1
            run.advance(len(group))
        pending.clear()

    try:
        for path, name in zip(files, names, strict=True):
            for src, grid, problem in _read_sources(path, name, manifest, heads, n_codes):
                summary.total += 1 if src.packed_index else 0
                if src.row is None:
                    src.row = rows.get(src.name)
                if problem:
                    run.fail(
                        src.path.as_posix() if src.packed_index is None else f"{src.path}[{src.packed_index}]",
                        problem,
                    )
                elif not overwrite and (output / f"{src.name}.png").is_file():
                    summary.skipped += 1
                    run.advance()
                else:
                    pending.append((src, grid))
                    if len(pending) >= batch_size:
                        flush()
        flush()
    finally:
        writer.close()
    return run.finish()


def _read_sources(path: Path, name: str, manifest: dict | None, heads: int, n_codes: int):
    """(source, grid, problem) for every grid in one .npy file: one for (heads, h, w), N for a
    packed (N, heads, h, w) file whose grids are checked one by one."""
    try:
        array = tk.load_npy(path)
    except tk.TokenError as e:
        yield _TokenSource(path, name), None, str(e)
        return
    problem = tk.check_layout(array, heads)
    if problem or array.ndim == 3:
        yield _TokenSource(path, name), array, problem or tk.check_range(array, n_codes)
        return
    names = _packed_names(path, manifest, len(array))
    if path.name != tk.PACKED:  # a packed file met in a folder walk: its grids go in a subfolder
        names = [f"{name}/{n}" for n in names]
    for i, grid in enumerate(array):  # one bad grid does not sink the other N - 1
        yield _TokenSource(path, names[i], packed_index=i), grid, tk.check_range(grid, n_codes)


def _grids_by_shape(
    pending: list[tuple[_TokenSource, np.ndarray]],
) -> list[list[tuple[_TokenSource, np.ndarray]]]:
    groups: dict[tuple, list] = {}
    for src, grid in pending:
        groups.setdefault(grid.shape, []).append((src, grid))
    return list(groups.values())


def _decode_grids(model: Any, grids: list[np.ndarray]) -> np.ndarray:
    import torch

    return _decode_indices(model, torch.from_numpy(np.stack(grids).astype(np.int64)).to(_device(model)))


def _decode_indices(model: Any, indices: Any) -> np.ndarray:
    """(B, heads, h, w) indices -> (B, H, W, C) uint8 pixels: the one decoding path for decode and
    reconstruct, so both give the same images."""
    import torch

    with torch.inference_mode():
        return to_pixels(model.decode_indices(indices))


def _unpad_row(pixels: np.ndarray, row: dict | None) -> np.ndarray:
    if row is None or "padding" not in row:
        return pixels
    return unpad(pixels, tuple(int(p) for p in row["padding"]))


class _Writer:
    """PNG encoding in background threads (zlib releases the GIL), overlapped with decoding."""

    def __init__(self, threads: int = 2, max_pending: int = 64):
        self.pool = ThreadPoolExecutor(threads)
        self.pending: deque[Future] = deque()
        self.max_pending = max_pending

    def png(self, path: Path, pixels: np.ndarray) -> None:
        while self.pending and (self.pending[0].done() or len(self.pending) >= self.max_pending):
            self.pending.popleft().result()  # bounded memory; a write error (disk full) surfaces here
        self.pending.append(self.pool.submit(_save_png, path, pixels))

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True)


def _save_png(path: Path, pixels: np.ndarray) -> None:
    image = to_pil(pixels)
    tk.atomic_write(path, lambda f: image.save(f, format="PNG"))


# ---------------------------------------------------------------- reconstruct


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images (peak 255); inf when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def reconstruct(
    model: Any,
    input: Path,
    output: Path,
    *,
    size: int | None = None,
    crop: bool = True,
    assign: str = "nearest",
    side_by_side: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
    on_progress: Progress | None = None,
    on_failure: OnFailure | None = None,
) -> Summary:
    """Encode and decode in one pass: OUTPUT/<name>.png, PSNR against the preprocessed input."""
    _check_assign(assign)
    input, output = Path(input), Path(output)
    _check_output_dir(output)
    pre = make_preprocess(model, size, crop)
    _, items, problems = find_inputs(input, exclude=[output])
    tk.remove_temp_files(output)
    summary = Summary("reconstruct", output, total=len(items) + len(problems))
    run = _Run(summary, strict, on_progress, on_failure)
    for path, reason in problems:
        run.fail(path, reason)
    todo = [it for it in items if overwrite or not (output / f"{it.name}.png").is_file()]
    summary.skipped = len(items) - len(todo)
    run.advance(summary.skipped)
    writer = _Writer()
    try:
        for batch in _encoded_batches(model, todo, pre, assign, batch_size, _workers(workers), set()):
            for group, indices in batch.groups:
                recon = _decode_indices(model, indices)
                for s, pixels in zip(group, recon, strict=True):
                    original = unpad(s.pixels, s.placement.padding)
                    restored = unpad(pixels, s.placement.padding)
                    if original.shape[2] != restored.shape[2]:  # e.g. a gray-in, colour-out model
                        original = np.broadcast_to(original, restored.shape)
                    summary.psnr.append(psnr(original, restored))
                    out = np.concatenate([original, restored], axis=1) if side_by_side else restored
                    writer.png(output / f"{todo[s.index].name}.png", out)
                    summary.written += 1
                run.advance(len(group))
            for s in batch.failed:
                run.fail(str(todo[s.index].path), s.error)
    finally:
        writer.close()
    return run.finish()
