"""The decode job: token grids to ``OUTPUT/<name>.png``. OUTPUT gets its own manifest (format
``optvq-decode``): one row per PNG naming the token file (and position in a packed file) it came
from, so a rerun skips only PNGs it made from the same, unchanged token file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from optvq_cli.core.errors import UserError
from optvq_cli.core.images import unpad
from optvq_cli.sources import file_identity
from optvq_cli.tokenize import tokens as tk
from optvq_cli.tokenize.batching import (
    OnFailure,
    Progress,
    Run,
    Summary,
    Writer,
    check_counts,
    decode_indices,
    png_writer,
    workers_or_default,
)
from optvq_cli.tokenize.outputs import DECODE_FORMAT, Output, same_source
from optvq_cli.tokenize.token_sources import (
    TokenSource,
    check_tokens_input,
    entries,
    manifest_for,
    manifest_path,
    read_sources,
    row_problem,
)


def _header(model: Any, model_ref: str | None, revision: str | None, tokens: Path) -> dict:
    return {
        "format": DECODE_FORMAT,
        "optvq_format": tk.FORMAT_VERSION,
        "model": tk.model_identity(model, model_ref or str(model.source), revision),
        "tokens": str(tokens.resolve()),
    }


def _check_model(manifest: dict | None, tokens: Path, model: Any) -> None:
    if manifest is not None and tk.manifest_sha256(manifest) != model.sha256:
        raise UserError(
            f"{manifest_path(tokens)}: these tokens were made by another model (sha256 "
            f"{tk.short(tk.manifest_sha256(manifest))}, the given model is {tk.short(model.sha256)}); "
            "pass the model that encoded them with --model"
        )


def _refuse_sources(out: Output, manifest: dict | None, tokens: Path) -> None:
    """An OUTPUT holding the images the tokens were made from: their reconstructions (same names)
    would replace the originals. Compared as paths, without touching each file."""
    if manifest is None or not isinstance(manifest.get("input"), str):
        return
    real = str(out.real)
    for row in manifest.get("images", []):
        src = row.get("source")
        if isinstance(src, str):
            path = os.path.normpath(os.path.join(manifest["input"], src))
            if path == real or path.startswith(real.rstrip(os.sep) + os.sep):
                raise UserError(
                    f"{out.folder}: holds {path}, a source image of these tokens (listed in "
                    f"{manifest_path(tokens)}); decoding there could replace the originals; choose another OUTPUT"
                )


def decode(
    model: Any,
    tokens: Path,
    output: Path,
    *,
    model_ref: str | None = None,
    revision: str | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
    on_progress: Progress | None = None,
    on_failure: OnFailure | None = None,
) -> Summary:
    """Token grids (a .npy, a folder of them, or a packed file) to PNGs under OUTPUT; ``workers``
    threads encode the PNGs (0: the main thread)."""
    tokens, output = Path(tokens), Path(output)
    check_tokens_input(tokens)
    check_counts(batch_size, workers)
    out = Output(output, DECODE_FORMAT, ".png", "images")
    manifest = manifest_for(tokens)
    _check_model(manifest, tokens, model)
    out.refuse_holding([tokens], "token input")
    _refuse_sources(out, manifest, tokens)
    header = _header(model, model_ref, revision, tokens)
    with out.locked(lambda: out.prepare(header, (), (), overwrite)) as existing:
        decoder = _Decoder(model, out, header, manifest, batch_size, overwrite, existing)
        decoder.writer = Writer(workers_or_default(workers))
        return decoder.run(tokens, Run(Summary("decode", output), strict, on_progress, on_failure))


class _Decoder:
    """One decode run: grids are gathered into batches, decoded, and their PNGs written in the
    background; each PNG's row goes to the journal as it is written."""

    def __init__(
        self,
        model: Any,
        out: Output,
        header: dict,
        manifest: dict | None,
        batch_size: int,
        overwrite: bool,
        existing: dict | None,
    ):
        self.model, self.out, self.header, self.manifest = model, out, header, manifest
        self.batch_size, self.overwrite, self.existing = batch_size, overwrite, existing
        self.kept = {} if overwrite else out.kept(existing, header)
        self.owned = out.owned(existing)
        self.rows: dict[str, dict] = {}  # this run's PNGs
        self.pending: list[tuple[TokenSource, np.ndarray, dict]] = []
        self.writer = Writer()

    def doc(self, run: Run, complete: bool) -> dict:
        rows = list({**self.kept, **self.rows}.values())
        return {**self.header, "complete": complete, "failed": len(run.summary.failed), "images": rows}

    def run(self, tokens: Path, run: Run) -> Summary:
        found, unreadable = entries(tokens, self.manifest)
        run.summary.total = len(found) + len(unreadable)  # a packed file adds N - 1
        self.out.start(self.header, self.existing, self.overwrite, list(self.kept.values()))
        try:
            try:
                for folder, reason in unreadable:
                    run.fail(folder, reason)
                self._all(found, run)
                self._flush(run)
            finally:
                self.writer.close()  # the PNGs already handed to the writer are finished, even on Ctrl-C
        except BaseException:
            self.out.finish(self.doc(run, complete=False))
            raise
        self.out.finish(self.doc(run, complete=not run.summary.failed))
        return run.finish()

    def _all(self, found: list, run: Run) -> None:
        q = self.model.quantize
        heads, n_codes, f = int(q.heads), int(q.n_codes), int(self.model.downsample)
        rows = {r["name"]: r for r in (self.manifest or {}).get("images", [])}
        for entry in found:
            if entry.problem:
                run.fail(str(entry.path), entry.problem)
                continue
            for src, grid, problem in read_sources(entry, self.manifest, heads, n_codes):
                run.summary.total += 1 if src.packed_index else 0
                if src.row is None:
                    src.row = rows.get(src.name)
                self._one(src, grid, problem or row_problem(grid, src.row, f), run)

    def _one(self, src: TokenSource, grid: np.ndarray, problem: str | None, run: Run) -> None:
        if problem:
            run.fail(src.label, problem)
            return
        identity = file_identity(src.path)
        row = {"name": src.name, "source": str(src.path.resolve()), **(identity or {})}
        if src.packed_index is not None:
            row["index"] = src.packed_index
        old = self.kept.get(src.name)
        if same_source(old, row["source"], identity, None) and old.get("index") == row.get("index"):
            run.skip()
            return
        rel = f"{src.name}.png"
        why = self._unwritable(rel)
        if why:
            run.fail(str(self.out.folder / rel), why)
            return
        self.pending.append((src, grid, row))
        if len(self.pending) >= self.batch_size:
            self._flush(run)

    def _unwritable(self, rel: str) -> str | None:
        """Why OUTPUT/rel may not be written: it leads outside OUTPUT, or is a file optvq did not write."""
        try:
            self.out.check(self.out.folder / rel)
        except UserError as e:
            return f"not written: {e}"
        if rel not in self.owned and os.path.lexists(self.out.folder / rel):
            where = f"{self.out.manifest} does not list it" if self.existing else f"OUTPUT has no {tk.MANIFEST}"
            return f"exists, and {where}, so optvq did not write it; not replaced"
        return None

    def _flush(self, run: Run) -> None:
        groups: dict[tuple, list] = {}
        for item in self.pending:
            groups.setdefault(item[1].shape, []).append(item)
        for group in groups.values():
            import torch

            indices = torch.from_numpy(np.stack([g for _, g, _ in group]).astype(np.int64)).to(self.model.device)
            for (src, _, row), pixels in zip(group, decode_indices(self.model, indices), strict=True):
                self.writer.submit(self.out.write, f"{src.name}.png", png_writer(_unpad_row(pixels, src.row)), row)
                self.rows[src.name] = row
                self.kept.pop(src.name, None)
                run.summary.written += 1
            run.advance(len(group))
        self.pending.clear()


def _unpad_row(pixels: np.ndarray, row: dict | None) -> np.ndarray:
    if row is None or "padding" not in row:
        return pixels
    return unpad(pixels, tuple(int(p) for p in row["padding"]))
