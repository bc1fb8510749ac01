"""The encode job: images under INPUT to token grids under OUTPUT, one ``<name>.npy`` per image or
(``--pack``) one ``tokens.npy`` + ``paths.txt``; ``manifest.json`` describes them (``tokens.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optvq_cli import sources
from optvq_cli.core.errors import UserError
from optvq_cli.core.images import Placement, Preprocess
from optvq_cli.sources import Item
from optvq_cli.tokenize import tokens as tk
from optvq_cli.tokenize.batching import (
    OnFailure,
    Progress,
    Run,
    Summary,
    check_counts,
    check_options,
    encoded_batches,
    make_preprocess,
    workers_or_default,
)
from optvq_cli.tokenize.outputs import Output, same_source

_SETTINGS = ("preprocess", "assign", "batch_size", "layout", "dtype", "image_column")  # batch_size: sinkhorn only


def npy_writer(array: np.ndarray) -> Callable[[Path], None]:
    # The temporary name keeps the .npy suffix, so np.save writes to it as given.
    return lambda tmp: np.save(tmp, array, allow_pickle=False)


def lines_writer(lines: list[str]) -> Callable[[Path], None]:
    return lambda tmp: tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


@dataclass
class _Job:
    """One encode run: the model and settings, the inputs and where they go."""

    model: Any
    out: Output
    root: Path
    items: list[Item]
    header: dict
    pre: Preprocess
    assign: str
    batch_size: int
    workers: int
    overwrite: bool

    def __post_init__(self) -> None:
        self.sources = [it.source_name(self.root) for it in self.items]
        self.identities = [it.identity() for it in self.items]
        self.rows: list[dict | None] = [None] * len(self.items)

    def row(self, i: int, placement: Placement) -> dict:
        f = int(self.model.downsample)
        w, h = placement.resized
        pl, pt, pr, pb = placement.padding
        grid = [(h + pt + pb) // f, (w + pl + pr) // f]
        return {"name": self.items[i].name, "source": self.sources[i], **(self.identities[i] or {}), "grid": grid}

    def full_row(self, i: int, placement: Placement) -> dict:
        return {**self.row(i, placement), **placement.to_json()}

    def is_done(self, i: int, row: dict | None) -> bool:
        return same_source(row, self.sources[i], self.identities[i], self.header["input"])


def _header(
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
        "optvq_format": tk.FORMAT_VERSION,
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
    source_options: sources.SourceOptions | None = None,
    on_progress: Progress | None = None,
    on_failure: OnFailure | None = None,
) -> Summary:
    """Images under INPUT to token grids under OUTPUT (see the module doc for the layout);
    ``source_options``: how INPUT is read (Parquet columns)."""
    check_options(assign, pack, crop)
    check_counts(batch_size, workers)
    input, output = Path(input), Path(output)
    out = Output(output, tk.FORMAT, ".npy", "tokens")
    pre = make_preprocess(model, size, crop)
    _check_list_apart_from_output(input, output)
    found = sources.find(input, exclude=[output], options=source_options)
    root, items, problems = found.root, found.items, found.problems
    out.refuse_holding([it.path for it in items])
    header = _header(model, model_ref, revision, pre, assign, batch_size, pack, root)
    header.update(found.source.settings())  # e.g. the Parquet column the pixels come from
    targets = {tk.PACKED, tk.PATHS} if pack else {f"{it.name}.npy" for it in items}
    with out.locked(lambda: out.prepare(header, _SETTINGS, targets, overwrite)) as existing:
        job = _Job(model, out, root, items, header, pre, assign, batch_size, workers_or_default(workers), overwrite)
        run = Run(Summary("encode", output, total=len(items) + len(problems)), strict, on_progress, on_failure)
        for path, reason in problems:
            run.fail(path, reason)
        (_encode_packed if pack else _encode_files)(job, existing, run)
    return run.finish()


def _encode_files(job: _Job, existing: dict | None, run: Run) -> None:
    """One .npy per image; outputs an earlier run made from the same source are kept as they are."""
    kept = {} if job.overwrite else job.out.kept(existing, job.header)
    todo = []
    for i, item in enumerate(job.items):
        row = kept.get(item.name)
        if job.is_done(i, row):
            job.rows[i] = {**row, "source": job.sources[i]}
        else:
            todo.append(i)

    def doc(complete: bool) -> dict:
        rows = [r for r in job.rows if r]
        # earlier outputs this run does not (or not yet) redo stay listed: their files are still there
        named = {r["name"] for r in rows}
        rows += [r for name, r in kept.items() if name not in named]
        return {**job.header, "complete": complete, "failed": len(run.summary.failed), "images": rows}

    # Written first so an interrupted run still says which model and settings its files came from.
    job.out.start(job.header, existing, job.overwrite, doc(False)["images"])
    run.skip(len(job.items) - len(todo))
    try:
        _encode_todo(job, todo, run)
    except BaseException:
        job.out.finish(doc(False))  # Ctrl-C, --strict, a full disk: the manifest lists what was written
        raise
    job.out.finish(doc(not run.summary.failed))


def _encode_todo(job: _Job, todo: list[int], run: Run) -> None:
    dtype = tk.uint_dtype(int(job.model.quantize.n_codes))
    batches = encoded_batches(job.model, [job.items[i] for i in todo], job.pre, job.assign, job.batch_size, job.workers)
    for batch in batches:
        for group, indices in batch.groups:
            for s, grid in zip(group, indices.cpu().numpy().astype(dtype), strict=True):
                i = todo[s.index]
                row = job.full_row(i, s.placement)
                job.out.write(f"{job.items[i].name}.npy", npy_writer(grid), row)
                job.rows[i] = row
                run.summary.written += 1
            run.advance(len(group))
        for s in batch.failed:
            run.fail(job.items[todo[s.index]].display, s.error)


def _packed_is_complete(job: _Job, existing: dict | None) -> bool:
    """An earlier complete --pack run over the same images, each from the same source file."""
    if job.overwrite or not existing or not existing.get("complete") or not (job.out.folder / tk.PACKED).is_file():
        return False
    rows = existing["images"]
    if existing.get("layout") != "packed" or [r["name"] for r in rows] != [it.name for it in job.items]:
        return False
    return all(job.is_done(i, r) for i, r in enumerate(rows))


def _encode_packed(job: _Job, existing: dict | None, run: Run) -> None:
    """One tokens.npy (N, heads, h, w) + paths.txt, written once all images are encoded."""
    if _packed_is_complete(job, existing):
        run.skip(len(job.items))
        return
    job.out.start(job.header, existing, job.overwrite or existing is not None, [])
    grids: dict[int, np.ndarray] = {}
    written = False

    def doc(complete: bool) -> dict:
        rows = [r for r in job.rows if r] if written else []
        return {**job.header, "complete": complete, "failed": len(run.summary.failed), "images": rows}

    dtype = tk.uint_dtype(int(job.model.quantize.n_codes))
    try:
        for batch in encoded_batches(job.model, job.items, job.pre, job.assign, job.batch_size, job.workers):
            for group, indices in batch.groups:
                for s, grid in zip(group, indices.cpu().numpy().astype(dtype), strict=True):
                    grids[s.index] = grid
                    job.rows[s.index] = job.full_row(s.index, s.placement)
                    run.summary.written += 1
                run.advance(len(group))
            for s in batch.failed:
                run.fail(job.items[s.index].display, s.error)
        written = _write_packed(job, grids)
    except BaseException:
        job.out.finish(doc(False))
        raise
    job.out.finish(doc(not run.summary.failed))


def _write_packed(job: _Job, grids: dict[int, np.ndarray]) -> bool:
    order = sorted(grids)
    if not order:
        return False
    shapes = {grids[i].shape for i in order}
    if len(shapes) > 1:  # cannot happen with a centre crop (check_options refuses --pack --no-crop)
        odd = next(i for i in order if grids[i].shape != grids[order[0]].shape)
        raise UserError(
            f"{job.items[odd].display}: its token grid {grids[odd].shape} differs from {grids[order[0]].shape}; "
            "--pack needs one grid size for all images"
        )
    job.out.write(tk.PACKED, npy_writer(np.stack([grids[i] for i in order])))
    job.out.write(tk.PATHS, lines_writer([job.items[i].name for i in order]))
    return True
