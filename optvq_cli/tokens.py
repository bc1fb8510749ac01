"""The token file format, and atomic writes.

A token grid is one ``.npy`` file shaped (heads, h, w) in the smallest unsigned dtype that holds
n_codes - 1. A folder of them carries ``manifest.json`` (model identity, preprocessing, assignment,
layout, one row per image). ``--pack`` writes ``tokens.npy`` (N, heads, h, w) and ``paths.txt``
(the N output names in order) instead. Files are read with ``allow_pickle=False``: never unpickled.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import UserError

FORMAT = "optvq-tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PACKED = "tokens.npy"
PATHS = "paths.txt"
_NPY_MAGIC = b"\x93NUMPY"
TMP_MARK = ".optvq-tmp-"  # in the name of every temporary file; a rerun removes leftovers


class TokenError(Exception):
    """Why one token file cannot be decoded (reported with its path)."""


def uint_dtype(n_codes: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every index 0 .. n_codes - 1."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if n_codes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"n_codes={n_codes} does not fit in 64 bits")


# ---------------------------------------------------------------- atomic writes


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Writes through ``write(file)`` to a temporary name in the same folder, then renames: readers
    (and a rerun after a kill) see either no file or the whole file, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def write_manifest(folder: Path, manifest: dict) -> None:
    """``folder/manifest.json``: indented, but one line per image row so a million rows stay
    readable (and grep-able) without tripling the file."""
    head = {k: v for k, v in manifest.items() if k != "images"}
    text = json.dumps(head, indent=2)[:-2]  # drop the closing "\n}"
    rows = ",\n".join("    " + json.dumps(r) for r in manifest.get("images", []))
    text += ',\n  "images": [\n' + rows + ("\n  ]\n}\n" if rows else "  ]\n}\n")
    atomic_write(Path(folder) / MANIFEST, lambda f: f.write(text.encode("utf-8")))


def write_lines(path: Path, lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_temp_files(root: Path) -> int:
    """Deletes temporary files an interrupted run left under ``root``; returns how many."""
    n = 0
    if not Path(root).is_dir():
        return 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name.startswith(".") and TMP_MARK in name:
                Path(dirpath, name).unlink(missing_ok=True)
                n += 1
    return n


# ---------------------------------------------------------------- reading and validation


def load_npy(path: Path) -> np.ndarray:
    """An array from a .npy file, refusing pickled objects. Raises TokenError."""
    try:
        if os.path.getsize(path) == 0:
            raise TokenError("empty file (0 bytes)")
        with open(path, "rb") as f:
            if f.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
                raise TokenError("not a .npy file (no NumPy header)")
        return np.load(path, allow_pickle=False)
    except TokenError:
        raise
    except FileNotFoundError:
        raise TokenError("no such file") from None
    except ValueError as e:
        if "allow_pickle" in str(e):  # an object array: loading it would unpickle
            raise TokenError("holds pickled Python objects, not integer tokens; refused") from None
        raise TokenError(f"not a valid .npy file ({e})") from None
    except (OSError, EOFError) as e:
        raise TokenError(f"not a valid .npy file ({e})") from None


def check_layout(array: np.ndarray, heads: int, packed: bool | None = None) -> str | None:
    """The problem with ``array``'s dtype and shape as token grids with ``heads`` heads, or None.
    ``packed``: True wants (N, heads, h, w), False (heads, h, w), None either."""
    if array.dtype.kind not in "iu":
        return f"dtype {array.dtype} is not an integer type; token files hold integer code indices"
    want = {True: (4,), False: (3,), None: (3, 4)}[packed]
    if array.ndim not in want:
        shapes = " or ".join({3: "(heads, h, w)", 4: "(N, heads, h, w)"}[d] for d in want)
        return f"shape {tuple(array.shape)} is not {shapes}"
    if array.shape[-3] != heads:
        return f"has {array.shape[-3]} heads (shape {tuple(array.shape)}), the model has {heads}"
    if array.size == 0:
        return f"shape {tuple(array.shape)} holds no tokens"
    return None


def check_range(array: np.ndarray, n_codes: int) -> str | None:
    """The first index outside [0, n_codes), as a problem, or None."""
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi >= n_codes:
        bad = lo if lo < 0 else hi
        return f"index {bad} is outside [0, {n_codes}) for this model's codebook"
    return None


def check_tokens(array: np.ndarray, heads: int, n_codes: int, packed: bool | None = None) -> str | None:
    """The problem with ``array`` as token grids for a model with ``heads`` and ``n_codes``, or None."""
    return check_layout(array, heads, packed) or check_range(array, n_codes)


# ---------------------------------------------------------------- manifest


def read_manifest(folder: Path) -> dict | None:
    """``folder/manifest.json`` or None when there is none; a broken one is the user's to fix."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable manifest ({e}); delete it or use another folder") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path}: not an optvq token manifest; use another folder")
    return data


def model_identity(model: Any, ref: str, revision: str | None) -> dict:
    """What the manifest records about the model; ``sha256`` of the weights is its identity."""
    return {
        "ref": ref,
        "revision": revision,
        "source": str(getattr(model, "source", ref)),
        "sha256": model.sha256,
        "n_codes": int(model.quantizer.n_codes),
        "heads": int(model.quantizer.heads),
        "downsample": int(model.downsample),
        "resolution": int(model.config.resolution),
        "in_channels": int(model.config.in_channels),
    }


def manifest_sha256(manifest: dict) -> str | None:
    return (manifest.get("model") or {}).get("sha256")


def short(sha: str | None) -> str:
    return (sha or "?")[:12]
