"""The encode / decode / reconstruct pipelines, as library functions the CLI wires up.

Images are read and preprocessed in DataLoader workers while the main process runs batched
inference on the device. Every output is written atomically, a rerun skips outputs that exist,
and a bad input is reported (path, reason) and skipped: the run goes on and its summary counts it.

OUTPUT safety: each OUTPUT folder carries a manifest (``tokens.MANIFEST``) naming the model and
settings its files came from and listing every file optvq wrote there. A rerun with another model
or other settings is refused unless ``--overwrite``, which first removes the listed files, so the
folder ends up as after a fresh run; files the manifest does not list are never deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import atomic_write
from optvq_cli.core.images import (
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
from optvq_cli.core.walk import iter_files
from optvq_cli.quant import ASSIGN_MODES
from optvq_cli.tokenize import tokens as tk

Progress = Callable[[int, int, int], None]  # (images finished so far, total, how many of those were already done)
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
    psnr: list[float] = field(default_factory=list)  # reconstruct: RGB PSNR, one per image written

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


def make_preprocess(model: Any, size: int | None, crop: bool) -> Preprocess:
    f = int(model.downsample)
    if size is not None and size < 1:
        raise UserError(f"--size {size}: must be a positive number of pixels")
    if size is not None and size < f:
        raise UserError(f"--size {size}: smaller than one token of this model ({f} px); use at least {f}")
    return Preprocess(size=size or int(model.config.resolution), crop=crop, multiple=f)


# ---------------------------------------------------------------- shared: images -> indices


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

    device = model.device
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


def _workers(workers: int | None) -> int:
    return default_workers() if workers is None else workers


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _check_output_dir(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise UserError(f"{output}: exists and is not a folder; give a folder for the outputs")


# ---------------------------------------------------------------- shared: OUTPUT safety


def _check_outputs_apart_from_inputs(output: Path, items: list[ImageItem], suffix: str) -> None:
    """Refuses an OUTPUT that holds input images: outputs written there could replace them (a
    ``<name>.png`` next to ``<name>.png``), and a rerun would take them for inputs."""
    out = output.resolve()
    inputs: set[Path] = set()
    for it in items:
        src = it.path.resolve()
        if src == out or out in src.parents:
            raise UserError(
                f"{output}: holds the input {it.path}; outputs written there could replace the inputs; "
                "choose an OUTPUT folder outside INPUT"
            )
        inputs.add(src)
    if output.is_dir():  # a symlink inside OUTPUT may still lead back to an input
        for it in items:
            target = output / f"{it.name}{suffix}"
            if target.resolve() in inputs:
                raise UserError(f"{target}: is an input image; choose an OUTPUT folder outside INPUT")


def _refuse_foreign(output: Path, targets: Iterable[str]) -> None:
    """Without a manifest, files in OUTPUT were not written by optvq: never skip or replace them."""
    if not output.is_dir():
        return
    for rel in targets:
        if (output / rel).exists():
            raise UserError(
                f"{output / rel}: exists, and OUTPUT has no {tk.MANIFEST}, so optvq did not write it; "
                "pass --overwrite to replace it or choose another OUTPUT"
            )


def _differences(old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in {**old, **new} if old.get(k) != new.get(k)]
        return ", ".join(f"{k} {json.dumps(old.get(k))} vs {json.dumps(new.get(k))}" for k in keys)
    return f"{json.dumps(old)} vs {json.dumps(new)}"


def _check_compatible(existing: dict, header: dict, output: Path, settings: Iterable[str], what: str) -> None:
    """An OUTPUT written by another model or with other settings would mix incompatible outputs."""
    where = output / tk.MANIFEST
    old, new = tk.manifest_sha256(existing), header["model"]["sha256"]
    if old != new:
        raise UserError(
            f"{where}: these {what} belong to another model (sha256 {tk.short(old)}, this one is "
            f"{tk.short(new)}); pass --overwrite to replace them or choose another OUTPUT"
        )
    for key in settings:
        if existing.get(key) != header.get(key):
            raise UserError(
                f"{where}: written with a different {key} ({_differences(existing.get(key), header.get(key))}); "
                "pass --overwrite to replace the outputs or choose another OUTPUT"
            )


def _owned(manifest: dict, suffix: str) -> set[str]:
    """The files (relative to OUTPUT) a manifest says optvq wrote; unsafe names are never ours."""
    if manifest.get("layout") == "packed":
        return {tk.PACKED, tk.PATHS}
    return {f"{r['name']}{suffix}" for r in manifest.get("images", []) if tk.name_problem(r["name"]) is None}


def _remove_outputs(output: Path, rels: Iterable[str], protect: set[Path] = frozenset()) -> None:
    """Deletes OUTPUT/rel for each rel (and the folders that leaves empty, up to OUTPUT)."""
    for rel in sorted(rels):
        path = output / rel
        if path.resolve() in protect or not (path.is_file() or path.is_symlink()):
            continue
        path.unlink()
        parent = path.parent
        while parent != output:
            try:
                parent.rmdir()  # only succeeds when empty
            except OSError:
                break
            parent = parent.parent


def _kept_rows(existing: dict | None, output: Path, suffix: str) -> list[dict]:
    """Rows of an earlier, compatible run whose files are still there: the manifest keeps listing them."""
    if existing is None or existing.get("layout") == "packed":
        return []
    return [
        r
        for r in existing.get("images", [])
        if tk.name_problem(r["name"]) is None and (output / f"{r['name']}{suffix}").is_file()
    ]


def _rebased(rows: list[dict], old_input: Any, new_input: str) -> list[dict]:
    """Kept rows name their source relative to the earlier run's INPUT: absolute once it changed."""
    if not isinstance(old_input, str) or old_input == new_input:
        return rows
    out = []
    for r in rows:
        src = r.get("source")
        out.append({**r, "source": str(Path(old_input) / src)} if src and not Path(src).is_absolute() else r)
    return out


# ---------------------------------------------------------------- encode


def _row(item: ImageItem, root: Path, placement: Placement, f: int) -> dict:
    w, h = placement.resized
    pl, pt, pr, pb = placement.padding
    return {
        "name": item.name,
        "source": _relative(item.path, root),
        "grid": [(h + pt + pb) // f, (w + pl + pr) // f],
        **placement.to_json(),
    }


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
        "dtype": tk.uint_dtype(int(model.quantize.n_codes)).name,
        "input": str(root.resolve()),
    }


_SETTINGS = ("preprocess", "assign", "batch_size", "layout", "dtype")  # batch_size: sinkhorn only


def _check_list_apart_from_output(input: Path, output: Path) -> None:
    """A .txt list inside OUTPUT under a name encode writes (paths.txt) would be replaced."""
    if input.is_file():
        mine = {(output / n).resolve() for n in (tk.MANIFEST, tk.PATHS, tk.PACKED)}
        if input.resolve() in mine:
            raise UserError(f"{input}: encode writes this file in OUTPUT {output}; choose another OUTPUT")


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
    check_options(assign, pack, crop)
    input, output = Path(input), Path(output)
    _check_output_dir(output)
    pre = make_preprocess(model, size, crop)
    _check_list_apart_from_output(input, output)
    root, items, problems = find_inputs(input, exclude=[output])
    header = _manifest_header(model, model_ref, revision, pre, assign, batch_size, pack, root)
    existing = tk.read_manifest(output)
    targets = {tk.PACKED, tk.PATHS} if pack else {f"{it.name}.npy" for it in items}
    if existing is None and not overwrite:
        _refuse_foreign(output, targets)
    if existing is not None and not overwrite:
        _check_compatible(existing, header, output, _SETTINGS, "tokens")
    tk.remove_temp_files(output)

    f = int(model.downsample)
    n = len(items)
    summary = Summary("encode", output, total=n + len(problems))
    run = _Run(summary, strict, on_progress, on_failure)
    rows: list[dict | None] = [None] * n

    if pack and _packed_is_complete(existing, output, items, overwrite):
        for path, reason in problems:
            run.fail(path, reason)
        run.skip(n)
        return run.finish()

    if overwrite and existing is not None:
        # The earlier outputs go first: a run killed midway then leaves none to be taken for new ones.
        _remove_outputs(output, _owned(existing, ".npy") | targets)
    kept: list[dict] = []
    if existing is not None and not (overwrite or pack):
        kept = _rebased(_kept_rows(existing, output, ".npy"), existing.get("input"), header["input"])
    names = {it.name for it in items}
    carried = [r for r in kept if r["name"] not in names]  # outputs of earlier runs this one does not redo
    done = set() if (overwrite or pack) else {i for i, it in enumerate(items) if (output / f"{it.name}.npy").is_file()}
    output.mkdir(parents=True, exist_ok=True)
    # Written first so an interrupted run still says which model and settings its files came from.
    tk.write_manifest(output, {**header, "complete": False, "failed": 0, "images": kept})
    packed_written = False

    def finalize(complete: bool) -> None:
        listed = [r for r in rows if r] if (packed_written or not pack) else []
        doc = {**header, "complete": complete, "failed": len(summary.failed), "images": listed + carried}
        tk.write_manifest(output, doc)

    grids: dict[int, np.ndarray] = {}
    dtype = tk.uint_dtype(int(model.quantize.n_codes))
    try:
        for path, reason in problems:
            run.fail(path, reason)
        for batch in _encoded_batches(model, items, pre, assign, batch_size, _workers(workers), done):
            for s in batch.header_only:
                rows[s.index] = _row(items[s.index], root, s.placement, f)
            run.skip(len(batch.header_only))
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
                run.fail(str(items[s.index].path), s.error)
        if pack:
            _write_packed(output, items, grids)
            packed_written = True
    except BaseException:
        finalize(complete=False)  # Ctrl-C, --strict, a full disk: the manifest still lists what was written
        raise
    finalize(complete=not summary.failed)
    return run.finish()


def _packed_is_complete(existing: dict | None, output: Path, items: list[ImageItem], overwrite: bool) -> bool:
    if overwrite or not existing or not existing.get("complete") or not (output / tk.PACKED).is_file():
        return False
    return existing.get("layout") == "packed" and [r["name"] for r in existing["images"]] == [it.name for it in items]


def _write_packed(output: Path, items: list[ImageItem], grids: dict[int, np.ndarray]) -> None:
    order = sorted(grids)
    if not order:
        return
    shapes = {grids[i].shape for i in order}
    if len(shapes) > 1:  # cannot happen with a centre crop (check_options refuses --pack --no-crop)
        odd = next(i for i in order if grids[i].shape != grids[order[0]].shape)
        raise UserError(
            f"{items[odd].path}: its token grid {grids[odd].shape} differs from {grids[order[0]].shape}; "
            "--pack needs one grid size for all images"
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

    @property
    def label(self) -> str:
        return self.path.as_posix() if self.packed_index is None else f"{self.path}[{self.packed_index}]"


def manifest_path(tokens: Path) -> Path:
    """Where the manifest describing TOKENS (a folder or a file in one) lives."""
    tokens = Path(tokens)
    return (tokens if tokens.is_dir() else tokens.parent) / tk.MANIFEST


def _manifest_for(tokens: Path) -> dict | None:
    return tk.read_manifest(manifest_path(tokens).parent)


def tokens_model(tokens: Path) -> tuple[str, str | None] | None:
    """(model ref, revision) recorded by the manifest next to TOKENS, or None."""
    manifest = _manifest_for(Path(tokens))
    if manifest is None:
        return None
    model = manifest["model"]
    return (model["ref"], model.get("revision")) if model.get("ref") else None


def check_tokens_input(tokens: Path) -> None:
    """The cheap checks of TOKENS, for before a slow model load. Raises UserError."""
    tokens = Path(tokens)
    if not tokens.exists():
        raise UserError(f"{tokens}: no such file or folder; give a .npy token file or a folder of them")
    if tokens.is_dir() and not (tokens / tk.MANIFEST).is_file() and not any(True for _ in _walk_npy(tokens, [])):
        raise UserError(f"{tokens}: no .npy token files found")


def _walk_npy(folder: Path, unreadable: list[tuple[str, str]]) -> Iterator[Path]:
    def onerror(e: OSError) -> None:
        why = "permission denied" if isinstance(e, PermissionError) else (e.strerror or type(e).__name__)
        unreadable.append((str(e.filename), f"cannot read this folder ({why}); its token files were skipped"))

    yield from iter_files(folder, {".npy"}, on_error=onerror)


@dataclass
class _Entry:
    """One token file to read, or why an entry of the manifest cannot be."""

    path: Path
    name: str
    row: dict | None = None
    problem: str | None = None


def _entries(tokens: Path, manifest: dict | None) -> tuple[list[_Entry], list[tuple[str, str]]]:
    """The token files TOKENS names: with a manifest only the ones it lists (a stale file left in
    the folder is not decoded), without one every .npy below it. Also (folder, reason) problems."""
    if not tokens.is_dir():
        return [_Entry(tokens, tokens.stem)], []
    where = tokens / tk.MANIFEST
    if manifest is not None and manifest.get("layout") == "packed":
        return [_Entry(tokens / tk.PACKED, tk.PACKED)], []
    if manifest is not None and "layout" in manifest:
        if not manifest.get("images"):
            raise UserError(f"{where}: lists no token files; run `optvq encode` again to finish")
        entries = []
        for i, row in enumerate(manifest.get("images", [])):
            name, why = row["name"], tk.name_problem(row["name"])
            if why:
                entries.append(_Entry(where, name, problem=f"images[{i}].name {name!r} {why}; not decoded"))
            else:
                entries.append(_Entry(tokens / f"{name}.npy", name, row))
        return entries, []
    unreadable: list[tuple[str, str]] = []
    files = list(_walk_npy(tokens, unreadable))
    if not files and not unreadable:
        raise UserError(f"{tokens}: no .npy token files found")
    return [_Entry(p, p.relative_to(tokens).with_suffix("").as_posix()) for p in files], unreadable


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
    check_tokens_input(tokens)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    _check_output_dir(output)
    manifest = _manifest_for(tokens)
    if manifest is not None and tk.manifest_sha256(manifest) != model.sha256:
        raise UserError(
            f"{manifest_path(tokens)}: these tokens were made by another model (sha256 "
            f"{tk.short(tk.manifest_sha256(manifest))}, the given model is {tk.short(model.sha256)}); "
            "pass the model that encoded them with --model"
        )
    rows = {r["name"]: r for r in (manifest or {}).get("images", [])}
    entries, unreadable = _entries(tokens, manifest)
    tk.remove_temp_files(output)
    heads, n_codes, f = int(model.quantize.heads), int(model.quantize.n_codes), int(model.downsample)

    summary = Summary("decode", output, total=len(entries) + len(unreadable))  # a packed file adds N - 1
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
        for folder, reason in unreadable:
            run.fail(folder, reason)
        for entry in entries:
            if entry.problem:
                run.fail(str(entry.path), entry.problem)
                continue
            for src, grid, problem in _read_sources(entry, manifest, heads, n_codes):
                summary.total += 1 if src.packed_index else 0
                if src.row is None:
                    src.row = rows.get(src.name)
                problem = problem or _row_problem(grid, src.row, f)
                if problem:
                    run.fail(src.label, problem)
                elif not overwrite and (output / f"{src.name}.png").is_file():
                    run.skip()
                else:
                    pending.append((src, grid))
                    if len(pending) >= batch_size:
                        flush()
        flush()
    finally:
        writer.close()
    return run.finish()


def _row_problem(grid: np.ndarray, row: dict | None, f: int) -> str | None:
    """A manifest row that does not describe ``grid`` (edited, or another file's) would cut the
    image wrongly: the grid is reported instead."""
    if row is None:
        return None
    h, w = grid.shape[-2:]
    if "grid" in row and list(row["grid"]) != [h, w]:
        return f"grid {h}x{w} differs from the {row['grid'][0]}x{row['grid'][1]} recorded in {tk.MANIFEST}"
    if "padding" in row:
        pl, pt, pr, pb = row["padding"]
        if pl + pr >= w * f or pt + pb >= h * f:
            return f"padding {row['padding']} in {tk.MANIFEST} leaves nothing of the {w * f}x{h * f} px image"
    return None


def _packed_names(path: Path, manifest: dict | None, count: int) -> tuple[list[str], str | None]:
    """(the output names of a packed file's grids, where they come from); a manifest that lists
    another number of names than the file holds grids is a problem."""
    if path.name == tk.PACKED and manifest is not None and manifest.get("layout") == "packed":
        names = [r["name"] for r in manifest.get("images", [])]
        if len(names) != count:
            return [], f"holds {count} grids but {tk.MANIFEST} lists {len(names)} images"
        return names, tk.MANIFEST
    paths_txt = path.parent / tk.PATHS
    if path.name == tk.PACKED and paths_txt.is_file():
        try:
            names = paths_txt.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError):
            names = []
        if len(names) == count:
            return names, tk.PATHS
    numbered = [f"{path.stem}_{i:06d}" if path.name != tk.PACKED else f"{i:06d}" for i in range(count)]
    return numbered, None


def _read_sources(entry: _Entry, manifest: dict | None, heads: int, n_codes: int):
    """(source, grid, problem) for every grid in one .npy file: one for (heads, h, w), N for a
    packed (N, heads, h, w) file whose grids are checked one by one."""
    path, name = entry.path, entry.name
    try:
        array = tk.load_npy(path)
    except tk.TokenError as e:
        listed = f" (listed in {tk.MANIFEST})" if entry.row is not None else ""
        yield _TokenSource(path, name), None, f"{e}{listed}"
        return
    problem = tk.check_layout(array, heads)
    if problem or array.ndim == 3:
        yield _TokenSource(path, name, row=entry.row), array, problem or tk.check_range(array, n_codes)
        return
    names, origin = _packed_names(path, manifest if path.name == tk.PACKED else None, len(array))
    if not names:
        yield _TokenSource(path, name), None, origin
        return
    for i, grid in enumerate(array):  # one bad grid does not sink the other N - 1
        src = _TokenSource(path, names[i], packed_index=i)
        why = tk.name_problem(names[i])
        if why:
            yield src, grid, f"output name {names[i]!r} (from {origin}) {why}; not decoded"
            continue
        if path.name != tk.PACKED:  # a packed file met in a folder walk: its grids go in a subfolder
            src.name = f"{name}/{names[i]}"
        yield src, grid, tk.check_range(grid, n_codes)


def _grids_by_shape(
    pending: list[tuple[_TokenSource, np.ndarray]],
) -> list[list[tuple[_TokenSource, np.ndarray]]]:
    groups: dict[tuple, list] = {}
    for src, grid in pending:
        groups.setdefault(grid.shape, []).append((src, grid))
    return list(groups.values())


def _decode_grids(model: Any, grids: list[np.ndarray]) -> np.ndarray:
    import torch

    return _decode_indices(model, torch.from_numpy(np.stack(grids).astype(np.int64)).to(model.device))


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
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


# ---------------------------------------------------------------- reconstruct


def psnr_rgb(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB over all channels of two (H, W, C) uint8 images: ``metrics.psnr`` on RGB (the
    ``eval`` command's definition, so identical images read 80 dB, not inf)."""
    import torch

    from optvq_cli.eval.metrics import psnr

    def batch(x: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].double() / 255.0

    return float(psnr(batch(a), batch(b), channel="rgb")[0])


_RECONSTRUCT_SETTINGS = ("preprocess", "assign", "batch_size", "side_by_side")


def _reconstruct_header(
    model: Any,
    model_ref: str | None,
    revision: str | None,
    pre: Preprocess,
    assign: str,
    batch_size: int,
    side_by_side: bool,
    root: Path,
) -> dict:
    return {
        "format": tk.RECONSTRUCT_FORMAT,
        "version": tk.FORMAT_VERSION,
        "model": tk.model_identity(model, model_ref or str(model.source), revision),
        "preprocess": pre.to_json(),
        "assign": assign,
        **({"batch_size": batch_size} if assign == "sinkhorn" else {}),
        "side_by_side": side_by_side,
        "input": str(root.resolve()),
    }


def reconstruct(
    model: Any,
    input: Path,
    output: Path,
    *,
    model_ref: str | None = None,
    revision: str | None = None,
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
    """Encode and decode in one pass: OUTPUT/<name>.png, RGB PSNR against the preprocessed input.
    OUTPUT gets a manifest (format ``optvq-reconstruct``) of the model and settings."""
    check_options(assign)
    input, output = Path(input), Path(output)
    _check_output_dir(output)
    pre = make_preprocess(model, size, crop)
    root, items, problems = find_inputs(input, exclude=[output])
    _check_outputs_apart_from_inputs(output, items, ".png")
    header = _reconstruct_header(model, model_ref, revision, pre, assign, batch_size, side_by_side, root)
    existing = tk.read_manifest(output, tk.RECONSTRUCT_FORMAT)
    targets = {f"{it.name}.png" for it in items}
    if existing is None and not overwrite:
        _refuse_foreign(output, targets)
    if existing is not None and not overwrite:
        _check_compatible(existing, header, output, _RECONSTRUCT_SETTINGS, "reconstructions")
    tk.remove_temp_files(output)
    if overwrite and existing is not None:
        _remove_outputs(output, _owned(existing, ".png") | targets, protect={it.path.resolve() for it in items})
    kept: list[dict] = []
    if existing is not None and not overwrite:
        kept = _rebased(_kept_rows(existing, output, ".png"), existing.get("input"), header["input"])
    names = {it.name for it in items}
    carried = [r for r in kept if r["name"] not in names]

    summary = Summary("reconstruct", output, total=len(items) + len(problems))
    run = _Run(summary, strict, on_progress, on_failure)
    todo = [it for it in items if overwrite or not (output / f"{it.name}.png").is_file()]
    todo_names = {it.name for it in todo}
    listed = [{"name": it.name, "source": _relative(it.path, root)} for it in items if it.name not in todo_names]
    output.mkdir(parents=True, exist_ok=True)
    tk.write_manifest(output, {**header, "complete": False, "failed": 0, "images": kept})

    def finalize(complete: bool) -> None:
        doc = {**header, "complete": complete, "failed": len(summary.failed), "images": listed + carried}
        tk.write_manifest(output, doc)

    writer = _Writer()
    try:
        try:
            for path, reason in problems:
                run.fail(path, reason)
            run.skip(len(items) - len(todo))
            for batch in _encoded_batches(model, todo, pre, assign, batch_size, _workers(workers), set()):
                for group, indices in batch.groups:
                    recon = _decode_indices(model, indices)
                    for s, pixels in zip(group, recon, strict=True):
                        original = unpad(s.pixels, s.placement.padding)
                        restored = unpad(pixels, s.placement.padding)
                        if original.shape[2] != restored.shape[2]:  # e.g. a gray-in, colour-out model
                            original = np.broadcast_to(original, restored.shape)
                        summary.psnr.append(psnr_rgb(original, restored))
                        out = np.concatenate([original, restored], axis=1) if side_by_side else restored
                        item = todo[s.index]
                        writer.png(output / f"{item.name}.png", out)
                        listed.append({"name": item.name, "source": _relative(item.path, root)})
                        summary.written += 1
                    run.advance(len(group))
                for s in batch.failed:
                    run.fail(str(todo[s.index].path), s.error)
        finally:
            writer.close()  # the PNGs already handed to the writer are finished, even on Ctrl-C
    except BaseException:
        finalize(complete=False)  # the manifest still lists what was written
        raise
    finalize(complete=not summary.failed)
    return run.finish()
