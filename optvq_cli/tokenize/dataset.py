"""Reading an encode OUTPUT back for training a generator: ``TokenDataset``, a map-style torch
Dataset of ``(tokens, label)`` over any of the three layouts (shards, files, packed).

Opening reads only ``manifest.json``: shards are opened on first use and memory-mapped, so opening
a million rows takes milliseconds and memory does not grow with N. In a sharded output every image
has all of the run's views, in the index's ``views`` order, so a view filter is arithmetic on row
numbers and reads nothing.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from optvq_cli.tokenize.shards import NO_LABEL, Shard

MANIFEST = "manifest.json"


def read_index(folder: str | Path) -> dict[str, Any]:
    """``folder/manifest.json`` as written by ``optvq encode``; ValueError naming the file if absent
    or unreadable."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest; give the OUTPUT folder of `optvq encode`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable manifest ({e})") from None
    if not isinstance(data, dict) or data.get("layout") not in ("shards", "files", "packed"):
        raise ValueError(f"{path}: not the manifest of an `optvq encode` output")
    return data


class TokenDataset(Dataset):
    """``TokenDataset(path, view=None)[i] -> (tokens, label)``: tokens an int64 tensor (heads, h, w),
    label an int (-1 where the data set has none). ``view`` keeps only the rows of one view
    ("center", "flip", ...; sharded outputs only)."""

    def __init__(self, path: str | Path, view: str | None = None):
        self.root = Path(path)
        self.index = read_index(self.root)
        self.layout: str = self.index["layout"]
        self.views: list[str] = list(self.index.get("views") or ["center"])
        if view is not None and view not in self.views:
            raise ValueError(f"{self.root}: no view {view!r}; this output has {', '.join(self.views)}")
        self._view = None if view is None or len(self.views) == 1 else self.views.index(view)
        self._open: dict[int, Any] = {}
        if self.layout == "shards":
            self._shard_files = [s["file"] for s in self.index["shards"]]
            self._starts = np.cumsum([0] + [int(s["images"]) for s in self.index["shards"]]).tolist()
            self._n = self._starts[-1] * (1 if self._view is not None else len(self.views))
        elif self.layout == "packed":
            self._packed = np.load(self.root / "tokens.npy", mmap_mode="r", allow_pickle=False)
            self._n = len(self._packed)
        else:
            self._names = [row["name"] for row in self.index.get("images", [])]
            self._n = len(self._names)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -self._n <= i < self._n:
            raise IndexError(f"row {i} of {self._n}")
        i %= self._n
        if self.layout == "packed":
            return torch.from_numpy(np.array(self._packed[i], np.int64)), NO_LABEL
        if self.layout == "files":
            grid = np.load(self.root / f"{self._names[i]}.npy", allow_pickle=False)
            return torch.from_numpy(grid.astype(np.int64)), NO_LABEL
        shard, row = self._locate(i)
        tokens = shard.tokens(row).astype(np.int64)
        return torch.from_numpy(tokens), int(shard.column_item("label", row))

    def _locate(self, i: int) -> tuple[Any, int]:
        """(shard, row inside it) of dataset row ``i``, opening the shard on first use."""
        per_image = len(self.views)
        image, pos = (i, self._view) if self._view is not None else divmod(i, per_image)
        s = bisect.bisect_right(self._starts, image) - 1
        if s not in self._open:
            self._open[s] = _ShardRows(Shard(self.root / self._shard_files[s]))
        return self._open[s], (image - self._starts[s]) * per_image + pos


class _ShardRows:
    """A shard with its small columns cached after the first read (labels: 8 bytes a row)."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self._columns: dict[str, np.ndarray] = {}

    def tokens(self, row: int) -> np.ndarray:
        return self.shard.tokens(row)

    def column_item(self, name: str, row: int) -> Any:
        if name not in self._columns:
            self._columns[name] = self.shard.column(name)
        return self._columns[name][row]


def describe_output(path: str | Path) -> dict[str, Any]:
    """What ``optvq tokens info`` prints: layout, counts, shards, views, labels, model, failures."""
    root = Path(path)
    index = read_index(root)
    layout = index["layout"]
    if layout == "shards":
        images = sum(int(s["images"]) for s in index["shards"])
        rows = sum(int(s["rows"]) for s in index["shards"])
    else:
        rows = images = len(TokenDataset(root))
    model = index.get("model") or {}
    return {
        "path": str(root),
        "layout": layout,
        "images": images,
        "rows": rows,
        "shards": len(index.get("shards", [])) if layout == "shards" else None,
        "views": list(index.get("views") or ["center"]),
        "classes": len(index["classes"]) if index.get("classes") else None,
        # where the labels came from: "class folders", "file NAME" or "none"
        "labels": index.get("labels") or ("class names" if index.get("classes") else "none"),
        "model": {k: model.get(k) for k in ("ref", "sha256", "n_codes", "heads")},
        "assign": index.get("assign"),
        "failures": len(index.get("failures") or []) if "failures" in index else index.get("failed", 0),
    }


def verify_output(path: str | Path) -> list[str]:
    """Every problem ``optvq tokens verify`` finds (empty: all good): each shard or token file
    readable, every index inside the codebook, the row counts equal to the index's."""
    root = Path(path)
    index = read_index(root)
    model = index.get("model") or {}
    heads, n_codes = int(model.get("heads", 1)), int(model.get("n_codes", 2**63))
    if index["layout"] == "shards":
        from optvq_cli.tokenize.shards import verify_shard

        problems = []
        for s in index["shards"]:
            problems += verify_shard(root / s["file"], int(s["rows"]), heads, n_codes)
        return problems
    problems = []
    try:
        data = TokenDataset(root)
    except (OSError, ValueError) as e:
        return [f"{root}: {e}"]
    for i in range(len(data)):
        try:
            tokens, _ = data[i]
        except (OSError, ValueError) as e:
            problems.append(f"row {i}: unreadable ({e})")
            continue
        if tokens.shape[0] != heads or (tokens.numel() and int(tokens.max()) >= n_codes) or int(tokens.min()) < 0:
            problems.append(f"row {i}: tokens shaped {tuple(tokens.shape)} or outside 0..{n_codes - 1}")
    return problems
