"""The reconstruct job: encode and decode in one pass, ``OUTPUT/<name>.png`` and each image's RGB
PSNR (``psnr_rgb``) against the preprocessed input. OUTPUT gets a manifest (format
``optvq-reconstruct``) of the model and settings, one row per PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from optvq_cli import sources
from optvq_cli.core.errors import UserError
from optvq_cli.core.images import Preprocess, unpad
from optvq_cli.sources import Item
from optvq_cli.tokenize import tokens as tk
from optvq_cli.tokenize.batching import (
    OnFailure,
    Progress,
    Run,
    Summary,
    Writer,
    check_counts,
    check_options,
    decode_indices,
    encoded_batches,
    make_preprocess,
    png_writer,
    workers_or_default,
)
from optvq_cli.tokenize.outputs import Output, same_source

_SETTINGS = ("preprocess", "assign", "batch_size", "side_by_side", "image_column")


def psnr_rgb(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB over all channels of two (H, W, C) uint8 images: ``metrics.psnr`` on RGB (the
    ``eval`` command's definition, so identical images read 80 dB, not inf)."""
    import torch

    from optvq_cli.eval.metrics import psnr

    def batch(x: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].double() / 255.0

    return float(psnr(batch(a), batch(b), channel="rgb")[0])


def _renamed(row: dict) -> dict:
    """A row as written now: rows written before the key said so call the RGB PSNR ``psnr``."""
    if "psnr" not in row:
        return row
    row = dict(row)
    row.setdefault("psnr_rgb", row.pop("psnr"))
    return row


def _header(
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
        "optvq_format": tk.FORMAT_VERSION,
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
    source_options: sources.SourceOptions | None = None,
    on_progress: Progress | None = None,
    on_failure: OnFailure | None = None,
) -> Summary:
    """Encode and decode in one pass (see the module doc). OUTPUT must lie outside INPUT;
    ``source_options``: how INPUT is read (the Parquet image column)."""
    check_options(assign)
    check_counts(batch_size, workers)
    input, output = Path(input), Path(output)
    out = Output(output, tk.RECONSTRUCT_FORMAT, ".png", "reconstructions")
    pre = make_preprocess(model, size, crop)
    out.refuse_inside(input)
    found = sources.find(input, exclude=[output], options=source_options)
    root, items, problems = found.root, found.items, found.problems
    out.refuse_holding([it.path for it in items])
    _refuse_links_to_inputs(output, items)
    header = _header(model, model_ref, revision, pre, assign, batch_size, side_by_side, root)
    header.update(found.source.settings())  # e.g. the Parquet column the pixels come from
    targets = {f"{it.name}.png" for it in items}
    with out.locked(lambda: out.prepare(header, _SETTINGS, targets, overwrite)) as existing:
        run = Run(Summary("reconstruct", output, total=len(items) + len(problems)), strict, on_progress, on_failure)
        for path, reason in problems:
            run.fail(path, reason)
        job = _Reconstruction(model, out, root, items, header, overwrite, existing)
        job.run(run, pre, assign, batch_size, workers_or_default(workers), side_by_side)
    return run.finish()


def _refuse_links_to_inputs(output: Path, items: list[Item]) -> None:
    """A symlink inside OUTPUT may still lead back to an input."""
    if not output.is_dir():
        return
    inputs = {it.path.resolve() for it in items}
    for it in items:
        target = output / f"{it.name}.png"
        if target.resolve() in inputs:
            raise UserError(f"{target}: is an input image; choose an OUTPUT folder outside INPUT")


class _Reconstruction:
    def __init__(
        self,
        model: Any,
        out: Output,
        root: Path,
        items: list[Item],
        header: dict,
        overwrite: bool,
        existing: dict | None,
    ):
        self.model, self.out, self.root, self.items, self.header = model, out, root, items, header
        self.overwrite, self.existing = overwrite, existing
        self.sources = [it.source_name(root) for it in items]
        self.identities = [it.identity() for it in items]
        kept = {} if overwrite else {k: _renamed(r) for k, r in out.kept(existing, header).items()}
        self.rows: list[dict | None] = [None] * len(items)
        self.todo = []
        for i, it in enumerate(items):
            row = kept.get(it.name)
            if same_source(row, self.sources[i], self.identities[i], header["input"]):
                self.rows[i] = {**row, "source": self.sources[i]}
            else:
                self.todo.append(i)
        self.kept = kept

    def doc(self, run: Run, complete: bool) -> dict:
        rows = [r for r in self.rows if r]
        # earlier outputs this run does not (or not yet) redo stay listed: their files are still there
        named = {r["name"] for r in rows}
        rows += [r for name, r in self.kept.items() if name not in named]
        return {**self.header, "complete": complete, "failed": len(run.summary.failed), "images": rows}

    def run(self, run: Run, pre: Preprocess, assign: str, batch_size: int, workers: int, side_by_side: bool) -> None:
        self.out.start(self.header, self.existing, self.overwrite, self.doc(run, False)["images"])
        run.skip(len(self.items) - len(self.todo))
        writer = Writer()
        try:
            try:
                todo_items = [self.items[i] for i in self.todo]
                for batch in encoded_batches(self.model, todo_items, pre, assign, batch_size, workers):
                    for group, indices in batch.groups:
                        self._write_group(group, indices, writer, run, side_by_side)
                    for s in batch.failed:
                        run.fail(todo_items[s.index].display, s.error)
            finally:
                writer.close()  # the PNGs already handed to the writer are finished, even on Ctrl-C
        except BaseException:
            self.out.finish(self.doc(run, complete=False))  # the manifest still lists what was written
            raise
        self.out.finish(self.doc(run, complete=not run.summary.failed))

    def _write_group(self, group: list, indices: Any, writer: Writer, run: Run, side_by_side: bool) -> None:
        for s, pixels in zip(group, decode_indices(self.model, indices), strict=True):
            original = unpad(s.pixels, s.placement.padding)
            restored = unpad(pixels, s.placement.padding)
            if original.shape[2] != restored.shape[2]:  # e.g. a gray-in, colour-out model
                original = np.broadcast_to(original, restored.shape)
            value = psnr_rgb(original, restored)
            run.summary.psnr_rgb.append(value)
            i = self.todo[s.index]
            row = {
                "name": self.items[i].name,
                "source": self.sources[i],
                **(self.identities[i] or {}),
                "psnr_rgb": round(value, 4),
            }
            out = np.concatenate([original, restored], axis=1) if side_by_side else restored
            writer.submit(self.out.write, f"{self.items[i].name}.png", png_writer(out), row)
            self.rows[i] = row
            run.summary.written += 1
        run.advance(len(group))
