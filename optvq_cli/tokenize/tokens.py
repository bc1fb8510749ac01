"""The token file format and the manifests that describe an OUTPUT folder.

A token grid is one ``.npy`` file shaped (heads, h, w) in the smallest unsigned dtype that holds
n_codes - 1. A folder of them carries ``manifest.json`` (model identity, preprocessing, assignment,
layout, one row per image). ``--pack`` writes ``tokens.npy`` (N, heads, h, w) and ``paths.txt``
(the N output names in order) instead. Files are read with ``allow_pickle=False``: never unpickled.

``reconstruct`` keeps a smaller manifest of its own (format ``optvq-reconstruct``) so a rerun can
tell whether the PNGs already there came from the same model and settings. A manifest lists every
output file optvq wrote in its folder: ``--overwrite`` removes those (and only those) it no longer needs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np

from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import TMP_MARK, atomic_write, atomic_write_text
from optvq_cli.quant import ASSIGN_MODES

FORMAT = "optvq-tokens"
RECONSTRUCT_FORMAT = "optvq-reconstruct"
FORMAT_VERSION = 1  # written as "optvq_format": N beside the "format" kind, as in model config.json
MANIFEST = "manifest.json"
PACKED = "tokens.npy"
PATHS = "paths.txt"
LAYOUTS = ("files", "packed")
_NPY_MAGIC = b"\x93NUMPY"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class TokenError(Exception):
    """Why one token file cannot be decoded (reported with its path)."""


def uint_dtype(n_codes: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every index 0 .. n_codes - 1."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if n_codes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"n_codes={n_codes} does not fit in 64 bits")


# ---------------------------------------------------------------- writing


def save_npy(path: Path, array: np.ndarray) -> None:
    # The temporary name keeps the .npy suffix, so np.save writes to it as given.
    atomic_write(path, lambda tmp: np.save(tmp, array, allow_pickle=False))


def write_manifest(folder: Path, manifest: dict) -> None:
    """``folder/manifest.json``: indented, but one line per image row so a million rows stay
    readable (and grep-able) without tripling the file."""
    head = {k: v for k, v in manifest.items() if k != "images"}
    text = json.dumps(head, indent=2)[:-2]  # drop the closing "\n}"
    rows = ",\n".join("    " + json.dumps(r) for r in manifest.get("images", []))
    text += ',\n  "images": [\n' + rows + ("\n  ]\n}\n" if rows else "  ]\n}\n")
    atomic_write_text(Path(folder) / MANIFEST, text)


def _temp_owner(name: str) -> int | None:
    """The pid in a temporary file's name (``.<target><TMP_MARK><pid>-<hex><suffix>``), or None."""
    m = re.match(r"(\d+)-", name.split(TMP_MARK, 1)[1])
    return int(m.group(1)) if m else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def remove_temp_files(root: Path) -> int:
    """Deletes temporary files that an interrupted run left under ``root``; returns how many.

    A temporary file whose writer is still running (another optvq on the same OUTPUT) is left
    alone: its name carries the writer's pid."""
    n = 0
    if not Path(root).is_dir():
        return 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name.startswith(".") and TMP_MARK in name:
                pid = _temp_owner(name)
                if pid is not None and _alive(pid):
                    continue
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
    except PermissionError:
        raise TokenError("cannot read (permission denied)") from None
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


def name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be an output name, or None. An output name comes from files a user may
    have edited (manifest.json, paths.txt) and is joined to OUTPUT: it must stay inside it."""
    if not isinstance(name, str) or not name:
        return "is not a non-empty string"
    if "\x00" in name:
        return "contains a NUL character"
    win = PureWindowsPath(name)
    if name.startswith(("/", "\\")) or win.drive or win.root:
        return "is an absolute path"
    parts = re.split(r"[\\/]", name)
    if ".." in parts:
        return "has a '..' part, which would lead out of OUTPUT"
    if any(part in ("", ".") for part in parts):
        return "has an empty or '.' part"
    return None


# ---------------------------------------------------------------- manifest


class _Bad(Exception):
    """A manifest field that is not what optvq writes: edited or damaged."""

    def __init__(self, field: str, why: str):
        super().__init__(f"{field} {why}")


class _Newer(Exception):
    """A manifest from a later optvq: not damaged, only not understood."""


def _ints(value: Any, n: int, lo: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == n
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= lo for v in value)
    )


def _int(value: Any, lo: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


def _check_model(model: Any) -> None:
    if not isinstance(model, dict):
        raise _Bad("model", f"must be an object, got {json.dumps(model)}")
    if not isinstance(model.get("sha256"), str) or not _SHA256.fullmatch(model["sha256"]):
        raise _Bad("model.sha256", f"must be 64 hex digits, got {json.dumps(model.get('sha256'))}")
    for key in ("ref", "revision", "source"):
        if model.get(key) is not None and not isinstance(model[key], str):
            raise _Bad(f"model.{key}", f"must be a string, got {json.dumps(model[key])}")
    for key in ("n_codes", "heads", "downsample", "resolution", "in_channels"):
        if key in model and not _int(model[key], 1):
            raise _Bad(f"model.{key}", f"must be a positive integer, got {json.dumps(model[key])}")


def _check_header(data: dict) -> None:
    version = data.get("optvq_format", data.get("version", FORMAT_VERSION))  # "version": older manifests
    if not _int(version, 1):
        raise _Bad("optvq_format", f"must be a positive integer, got {json.dumps(version)}")
    if version > FORMAT_VERSION:
        raise _Newer(f"version {version} is newer than this optvq reads ({FORMAT_VERSION}); upgrade optvq")
    _check_model(data.get("model"))
    checks = {
        "preprocess": (lambda v: isinstance(v, dict), "must be an object"),
        "assign": (lambda v: v in ASSIGN_MODES, f"must be one of {', '.join(ASSIGN_MODES)}"),
        "layout": (lambda v: v in LAYOUTS, f"must be one of {', '.join(LAYOUTS)}"),
        "dtype": (lambda v: isinstance(v, str), "must be a string"),
        "input": (lambda v: isinstance(v, str), "must be a string"),
        "complete": (lambda v: isinstance(v, bool), "must be true or false"),
        "side_by_side": (lambda v: isinstance(v, bool), "must be true or false"),
        "batch_dependent": (lambda v: isinstance(v, bool), "must be true or false"),
        "batch_size": (lambda v: _int(v, 1), "must be a positive integer"),
        "failed": (lambda v: _int(v, 0), "must be a count (0 or more)"),
    }
    for key, (ok, why) in checks.items():
        if key in data and not ok(data[key]):
            raise _Bad(key, f"{why}, got {json.dumps(data[key])}")


_PLACEMENT = {"original_size": (2, 1), "crop_box": (4, 0), "resized": (2, 1), "padding": (4, 0), "grid": (2, 1)}


def _check_row(row: Any, where: str, f: int | None) -> None:
    if not isinstance(row, dict):
        raise _Bad(where, f"must be an object with a name, got {json.dumps(row)}")
    if not isinstance(row.get("name"), str) or not row["name"]:
        raise _Bad(f"{where}.name", f"must be a non-empty string, got {json.dumps(row.get('name'))}")
    if "source" in row and not isinstance(row["source"], str):
        raise _Bad(f"{where}.source", f"must be a string, got {json.dumps(row['source'])}")
    for key, (n, lo) in _PLACEMENT.items():
        if key in row and not _ints(row[key], n, lo):
            what = "non-negative" if lo == 0 else "positive"
            raise _Bad(f"{where}.{key}", f"must be {n} {what} integers, got {json.dumps(row[key])}")
    if f and all(k in row for k in ("resized", "padding", "grid")):
        (w, h), (pl, pt, pr, pb), (gh, gw) = row["resized"], row["padding"], row["grid"]
        if (w + pl + pr, h + pt + pb) != (gw * f, gh * f):
            raise _Bad(
                f"{where}.padding",
                f"{row['padding']} does not fit resized {row['resized']} and grid {row['grid']} (f = {f})",
            )


def _check_rows(data: dict) -> None:
    rows = data.get("images", [])
    if not isinstance(rows, list):
        raise _Bad("images", f"must be a list of rows, got {json.dumps(rows)[:60]}")
    f = data["model"].get("downsample")
    seen: set[str] = set()
    for i, row in enumerate(rows):
        _check_row(row, f"images[{i}]", f)
        if row["name"] in seen:
            raise _Bad(f"images[{i}].name", f"{json.dumps(row['name'])} is listed twice")
        seen.add(row["name"])


def read_manifest(folder: Path, fmt: str = FORMAT) -> dict | None:
    """``folder/manifest.json`` checked field by field, or None when there is none. A broken or
    edited one is the user's to fix: UserError naming the file and the bad field."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable manifest ({e}); delete it or use another folder") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        what = "optvq token" if fmt == FORMAT else "optvq reconstruct"
        raise UserError(f"{path}: not an {what} manifest; use another folder")
    try:
        _check_header(data)
        _check_rows(data)
    except _Bad as e:
        raise UserError(f"{path}: {e}; restore the file or write to a new folder") from None
    except _Newer as e:
        raise UserError(f"{path}: {e}") from None
    return data


def model_identity(model: Any, ref: str, revision: str | None) -> dict:
    """What the manifest records about the model; ``sha256`` of the weights is its identity."""
    return {
        "ref": ref,
        "revision": revision,
        "source": str(getattr(model, "source", ref)),
        "sha256": model.sha256,
        "n_codes": int(model.quantize.n_codes),
        "heads": int(model.quantize.heads),
        "downsample": int(model.downsample),
        "resolution": int(model.config.resolution),
        "in_channels": int(model.config.in_channels),
    }


def manifest_sha256(manifest: dict) -> str | None:
    return (manifest.get("model") or {}).get("sha256")


def short(sha: str | None) -> str:
    return (sha or "?")[:12]
