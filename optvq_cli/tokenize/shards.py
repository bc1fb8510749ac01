"""The sharded token layout: ``OUTPUT/shards/shard-NNNNN.safetensors``, one file per ``--shard-size``
images, indexed by ``OUTPUT/manifest.json`` (one row per shard).

A shard is a plain safetensors file, so generator-training code reads it with ``safetensors`` (or
numpy) alone, memory-mapped, one row at a time:

    tokens  (N, heads, h, w)  smallest unsigned dtype for n_codes
    label   (N,)  int64, -1 where the data set has no labels
    view    (N,)  uint8, an index into the header's ``views`` list ("center", "flip", "tl", ...)
    size    (N, 2)  int32, the source image's (width, height)
    crop    (N, 4)  int32, the box (left, top, right, bottom) cut from the source, in its pixels
    path_bytes / path_offsets  the rows' source paths (UTF-8, relative to INPUT): row i is
            path_bytes[path_offsets[i]:path_offsets[i + 1]]

The header's one metadata key ``optvq`` holds ``{"optvq_format": 1, "views": [...]}`` and what the
writer adds (``optvq encode`` adds the shard's plan fingerprint and its failed images, so a rerun
learns what is done from the headers alone).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optvq_cli.core.fileio import write_safetensors
from optvq_cli.sources.labels import NO_LABEL  # noqa: F401 - the label column's "no label"

SHARD_DIR = "shards"
SHARD_FORMAT = 1
COLUMNS = ("tokens", "label", "view", "size", "crop", "path_bytes", "path_offsets")


@dataclass
class ShardRows:
    """The rows of one shard, column by column."""

    tokens: np.ndarray  # (N, heads, h, w) unsigned
    paths: list[str]
    labels: np.ndarray  # (N,) int64
    views: np.ndarray  # (N,) uint8 into view_names
    sizes: np.ndarray  # (N, 2) int32
    crops: np.ndarray  # (N, 4) int32
    view_names: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def shard_name(index: int) -> str:
    """The shard's path relative to OUTPUT."""
    return f"{SHARD_DIR}/shard-{index:05d}.safetensors"


def write_shard(path: str | Path, rows: ShardRows, meta: dict[str, Any] | None = None) -> None:
    """Write one shard atomically (readers and a resumed run see all of it or none). ``meta``: more
    JSON-able keys for the header's ``optvq`` entry."""
    n = len(rows)
    encoded = [p.encode("utf-8") for p in rows.paths]
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    columns = {
        "tokens": rows.tokens,
        "label": np.asarray(rows.labels, np.int64),
        "view": np.asarray(rows.views, np.uint8),
        "size": np.asarray(rows.sizes, np.int32).reshape(n, 2),
        "crop": np.asarray(rows.crops, np.int32).reshape(n, 4),
        "path_bytes": np.frombuffer(b"".join(encoded), np.uint8).copy(),
        "path_offsets": offsets,
    }
    for name, col in columns.items():
        if name not in ("path_bytes", "path_offsets") and len(col) != n:
            raise ValueError(f"shard column {name} has {len(col)} rows, expected {n}")
    doc = {**(meta or {}), "optvq_format": SHARD_FORMAT, "views": list(rows.view_names)}
    header = {"optvq": json.dumps(doc, sort_keys=True)}
    write_safetensors(path, columns, header)


class Shard:
    """One shard opened for reading: memory-mapped, a row at a time, nothing read up front but the
    header. Raises ValueError naming the file when it is not a readable shard."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="np")
            meta = json.loads((self._file.metadata() or {}).get("optvq", "{}"))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise ValueError(f"{self.path}: not a readable token shard ({e}); encode it again") from None
        missing = [c for c in COLUMNS if c not in self._file.keys()]
        if missing or meta.get("optvq_format") != SHARD_FORMAT:
            raise ValueError(f"{self.path}: not an optvq token shard (missing {', '.join(missing) or 'header'})")
        self.meta: dict[str, Any] = meta
        self.view_names: list[str] = list(meta.get("views", []))
        self.shape = tuple(self._file.get_slice("tokens").get_shape())

    def __len__(self) -> int:
        return int(self.shape[0])

    def tokens(self, i: int) -> np.ndarray:
        return self._file.get_slice("tokens")[i : i + 1][0]

    def column(self, name: str) -> np.ndarray:
        """A whole small column (label, view, size, crop, path_offsets), read in one go."""
        return self._file.get_tensor(name)

    def row(self, i: int) -> dict[str, Any]:
        """Everything about row ``i``."""
        off = self._file.get_slice("path_offsets")[i : i + 2]
        path = bytes(self._file.get_slice("path_bytes")[int(off[0]) : int(off[1])]).decode("utf-8")
        return {
            "tokens": self.tokens(i),
            "label": int(self._file.get_slice("label")[i : i + 1][0]),
            "view": self.view_names[int(self._file.get_slice("view")[i : i + 1][0])],
            "size": tuple(int(v) for v in self._file.get_slice("size")[i : i + 1][0]),
            "crop": tuple(int(v) for v in self._file.get_slice("crop")[i : i + 1][0]),
            "path": path,
        }

    def read_all(self) -> ShardRows:
        off = self.column("path_offsets")
        raw = self.column("path_bytes").tobytes()
        paths = [raw[off[i] : off[i + 1]].decode("utf-8") for i in range(len(self))]
        return ShardRows(
            tokens=self._file.get_tensor("tokens"),
            paths=paths,
            labels=self.column("label"),
            views=self.column("view"),
            sizes=self.column("size"),
            crops=self.column("crop"),
            view_names=self.view_names,
        )


def verify_shard(path: str | Path, rows: int, heads: int, n_codes: int) -> list[str]:
    """What is wrong with one shard (empty when nothing): unreadable, a row count other than the
    index says, a token grid of another head count, an index outside 0 .. n_codes - 1, columns
    out of step."""
    try:
        shard = Shard(path)
        data = shard.read_all()
    except ValueError as e:
        return [str(e)]
    problems = []
    if len(shard) != rows:
        problems.append(f"{path}: {len(shard)} rows, the index says {rows}")
    if data.tokens.ndim != 4 or data.tokens.shape[1] != heads:
        problems.append(f"{path}: tokens shaped {data.tokens.shape}, expected (N, {heads}, h, w)")
    if data.tokens.size and int(data.tokens.max()) >= n_codes:
        problems.append(f"{path}: token index {int(data.tokens.max())} outside 0..{n_codes - 1}")
    n = len(data.paths)
    for name, col in (("label", data.labels), ("view", data.views), ("size", data.sizes), ("crop", data.crops)):
        if len(col) != n:
            problems.append(f"{path}: column {name} has {len(col)} rows, tokens have {n}")
    if data.views.size and int(data.views.max()) >= len(data.view_names):
        problems.append(f"{path}: a view index outside the header's {len(data.view_names)} views")
    return problems
