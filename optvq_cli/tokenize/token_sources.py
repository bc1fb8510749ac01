"""What ``decode`` reads: the token files TOKENS names (a .npy, a folder of them, or a packed
tokens.npy), each grid checked (dtype, shape, heads, index range) and named for its output. With a
manifest only the files it lists are read; every output name must stay inside OUTPUT."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optvq_cli.core.errors import UserError
from optvq_cli.core.walk import iter_files
from optvq_cli.tokenize import tokens as tk


@dataclass
class TokenSource:
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


def manifest_for(tokens: Path) -> dict | None:
    return tk.read_manifest(manifest_path(tokens).parent)


def tokens_model(tokens: Path) -> tuple[str, str | None] | None:
    """(model ref, revision) recorded by the manifest next to TOKENS, or None."""
    manifest = manifest_for(Path(tokens))
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
class Entry:
    """One token file to read, or why an entry of the manifest cannot be."""

    path: Path
    name: str
    row: dict | None = None
    problem: str | None = None


def entries(tokens: Path, manifest: dict | None) -> tuple[list[Entry], list[tuple[str, str]]]:
    """The token files TOKENS names: with a manifest only the ones it lists (a stale file left in
    the folder is not decoded), without one every .npy below it. Also (folder, reason) problems."""
    if not tokens.is_dir():
        return [Entry(tokens, tokens.stem)], []
    where = tokens / tk.MANIFEST
    if manifest is not None and manifest.get("layout") == "packed":
        return [Entry(tokens / tk.PACKED, tk.PACKED)], []
    if manifest is not None and "layout" in manifest:
        if not manifest.get("images"):
            raise UserError(f"{where}: lists no token files; run `optvq encode` again to finish")
        entries = []
        for i, row in enumerate(manifest.get("images", [])):
            name, why = row["name"], tk.name_problem(row["name"])
            if why:
                entries.append(Entry(where, name, problem=f"images[{i}].name {name!r} {why}; not decoded"))
            else:
                entries.append(Entry(tokens / f"{name}.npy", name, row))
        return entries, []
    unreadable: list[tuple[str, str]] = []
    files = list(_walk_npy(tokens, unreadable))
    if not files and not unreadable:
        raise UserError(f"{tokens}: no .npy token files found")
    return [Entry(p, p.relative_to(tokens).with_suffix("").as_posix()) for p in files], unreadable


def row_problem(grid: np.ndarray, row: dict | None, f: int) -> str | None:
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


def read_sources(entry: Entry, manifest: dict | None, heads: int, n_codes: int):
    """(source, grid, problem) for every grid in one .npy file: one for (heads, h, w), N for a
    packed (N, heads, h, w) file whose grids are checked one by one."""
    path, name = entry.path, entry.name
    try:
        array = tk.load_npy(path)
    except tk.TokenError as e:
        listed = f" (listed in {tk.MANIFEST})" if entry.row is not None else ""
        yield TokenSource(path, name), None, f"{e}{listed}"
        return
    problem = tk.check_layout(array, heads)
    if problem or array.ndim == 3:
        yield TokenSource(path, name, row=entry.row), array, problem or tk.check_range(array, n_codes)
        return
    names, origin = _packed_names(path, manifest if path.name == tk.PACKED else None, len(array))
    if not names:
        yield TokenSource(path, name), None, origin
        return
    for i, grid in enumerate(array):  # one bad grid does not sink the other N - 1
        src = TokenSource(path, names[i], packed_index=i)
        why = tk.name_problem(names[i])
        if why:
            yield src, grid, f"output name {names[i]!r} (from {origin}) {why}; not decoded"
            continue
        if path.name != tk.PACKED:  # a packed file met in a folder walk: its grids go in a subfolder
            src.name = f"{name}/{names[i]}"
        yield src, grid, tk.check_range(grid, n_codes)
