"""Model files on disk: the names in a model folder, what a file holds by its first bytes, the
safetensors header (config metadata, tensor shapes and dtypes), reading and writing the tensors,
and which file tensor feeds which model tensor. Nothing here builds a model or unpickles a file.

The weights file's bytes depend on the model alone (its sha256 is the model's identity): the
tensors, in the order safetensors sorts them, and ONE header metadata key holding the config as
sorted JSON (safetensors writes several keys in a process-random order).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optvq_cli.core.errors import UserError, first_line
from optvq_cli.core.fileio import write_safetensors

log = logging.getLogger("optvq")

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1  # written as "optvq_format": N, in config.json and in the header
META_KEY = "optvq"  # the one header metadata key: {"optvq_format": 1, "model": config} as sorted JSON
# Written by earlier versions (with "format": "pt", in a random order); still read.
META_CONFIG = "optvq_config"
META_METADATA = "optvq_metadata"
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")


def shape_text(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def convert_hint(path: Path) -> str:
    return f"convert it with `optvq export --from-upstream {path} OUT`"


# -- what a file is ------------------------------------------------------------------------------
def sniff(path: Path) -> str:
    """What a file holds, by its first bytes, whatever its name: ``safetensors``, ``pickle``
    (torch.save's zip or a bare pickle) or ``unknown``."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "pickle"
    return "unknown"


def _check_not_pickle(path: Path) -> None:
    if sniff(path) == "pickle":
        raise UserError(
            f"{path} is a pickle (torch.save) file named .safetensors and is never unpickled: {convert_hint(path)}"
        )
    size = path.stat().st_size
    if size < 9:
        raise UserError(f"{path}: truncated ({size} bytes), not a safetensors file; download or export it again")


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]], dict[str, str]]:
    """(header metadata, shape of every tensor, dtype of every tensor) without reading the data."""
    from safetensors import SafetensorError, safe_open

    _check_not_pickle(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            shapes, dtypes = {}, {}
            for k in f.keys():
                s = f.get_slice(k)
                shapes[k] = tuple(int(v) for v in s.get_shape())
                dtypes[k] = str(s.get_dtype())
    except (SafetensorError, OSError, ValueError) as e:
        msg = first_line(e)
        if "incomplete" in msg or "not fully covered" in msg or "header length" in msg:
            why = "truncated or corrupted"
        else:
            why = "not a valid safetensors file"
        raise UserError(f"{path}: {why} ({msg}); download or export it again") from None
    return meta, shapes, dtypes


def read_tensors(path: Path, keys: dict[str, str]) -> dict[str, Any]:
    """{name: tensor} for ``keys`` ({name: key in the file}), on the CPU."""
    from safetensors import SafetensorError, safe_open

    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name, k in keys.items():
                tensors[name] = f.get_tensor(k)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: could not read the tensors ({first_line(e)}); download or export it again") from None
    return tensors


def write_weights(path: Path, tensors: dict[str, Any], config: dict[str, Any]) -> None:
    """The weights file, atomically, reproducibly: the tensors and the config in one header key."""
    header = {META_KEY: json.dumps({"optvq_format": FORMAT_VERSION, "model": config}, sort_keys=True)}
    write_safetensors(path, tensors, metadata=header)


# -- the config: in config.json or in the header --------------------------------------------------
@dataclass
class ConfigDoc:
    """A model config as found: the JSON object, where it was read, metadata from the header."""

    raw: Any
    where: str
    header_metadata: dict[str, Any] | None = None  # only earlier versions' header key


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({first_line(e)}); fix or re-export the model") from None


def find_config(weights: Path, config_path: Path | None, meta: dict[str, str]) -> ConfigDoc:
    """The config of a weights file: ``config_path``, else the header's, else a config.json
    beside a weights file named directly."""
    in_header = META_KEY in meta or META_CONFIG in meta
    sibling = weights.parent / CONFIG_NAME
    if config_path is None and not in_header and sibling.is_file():
        config_path = sibling
    if config_path is not None:
        return ConfigDoc(_read_json(config_path), str(config_path))
    if not in_header:
        raise UserError(
            f"{weights}: no model config (no {CONFIG_NAME} beside it and none in its metadata); "
            f"put its {CONFIG_NAME} next to it, or {convert_hint(weights)}"
        )
    where = f"{weights} (header metadata)"
    try:
        raw = json.loads(meta[META_KEY] if META_KEY in meta else meta[META_CONFIG])
        extra = json.loads(meta.get(META_METADATA) or "{}")  # earlier versions only
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: the stored config is not valid JSON ({first_line(e)})") from None
    return ConfigDoc(raw, where, extra if isinstance(extra, dict) else {})


# -- key names -----------------------------------------------------------------------------------
def normalize_key(key: str) -> str:
    """The authors' names -> ours: drop torch.compile's ``_orig_mod.``, DDP's ``module.`` and the
    hub wrapper's ``model.`` prefix."""
    key = key.replace("_orig_mod.", "")
    for prefix in ("module.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _summarize(keys: list[str]) -> str:
    groups = Counter(".".join(k.split(".")[:2]) for k in keys)
    return ", ".join(f"{g}.* ({n})" for g, n in sorted(groups.items()))


@dataclass
class KeyPlan:
    """Which file tensor feeds which model tensor, and what the file has that the model does not use."""

    sources: dict[str, str]  # model key -> file key
    ignored: list[str]  # file keys not used (training-only loss tensors, unknown extras)


def plan_keys(
    file_shapes: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    where: str,
    config_name: str,
) -> KeyPlan:
    """Map file keys onto the model's; missing tensors and wrong shapes are errors."""
    sources: dict[str, str] = {}
    ignored = []
    for k in file_shapes:
        nk = normalize_key(k)
        if nk in expected and nk not in sources:
            sources[nk] = k
        else:
            ignored.append(k)
    missing = [k for k in expected if k not in sources]
    if missing:
        sample = ", ".join(missing[:3]) + (f", ... ({len(missing) - 3} more)" if len(missing) > 3 else "")
        raise UserError(
            f"{where}: {len(missing)} tensor(s) the model needs are missing ({sample}); "
            f"the file is incomplete or does not belong to {config_name}"
        )
    for nk, k in sources.items():
        if tuple(file_shapes[k]) != tuple(expected[nk]):
            raise UserError(
                f"{where}: tensor {k} is {shape_text(file_shapes[k])} but {config_name} needs "
                f"{shape_text(expected[nk])}; the config does not match the tensors"
            )
    return KeyPlan(sources, ignored)


def report_ignored(ignored: list[str], where: str) -> None:
    if not ignored:
        return
    training = [k for k in ignored if normalize_key(k).startswith("loss.")]
    other = [k for k in ignored if not normalize_key(k).startswith("loss.")]
    if training:
        log.warning(
            f"note: {where}: ignored {len(training)} training-only tensor(s) "
            f"({_summarize([normalize_key(k) for k in training])}); inference does not need them"
        )
    if other:
        log.warning(f"warning: {where}: ignored {len(other)} unknown tensor(s): {_summarize(other)}")
