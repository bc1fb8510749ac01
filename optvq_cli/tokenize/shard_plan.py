"""The shard plan of `encode --layout shards` and what OUTPUT holds of it.

The sorted input list is cut into shards of ``shard_size`` images, each with a fingerprint of its
inputs and settings (``make_plan``); a shard file whose header carries its planned fingerprint is
done (``shard_state``); ``manifest.json`` is the header, one row per finished shard and every
failure (``index_doc``), a function of the plan and the shards alone. ``prepare`` readies OUTPUT:
it refuses a folder of other settings or not optvq's, and with ``--overwrite`` clears only the
shards optvq listed or planned.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import atomic_write_text
from optvq_cli.core.images import Preprocess
from optvq_cli.tokenize import tokens as tk
from optvq_cli.tokenize.dataset import MANIFEST
from optvq_cli.tokenize.shards import SHARD_FORMAT, Shard, shard_name
from optvq_cli.tokenize.views import TENCROP_SCALE


@dataclass(frozen=True)
class Plan:
    """One shard of the plan: images ``start .. stop - 1`` of the sorted list, and its fingerprint."""

    index: int
    start: int
    stop: int
    sha256: str

    @property
    def file(self) -> str:
        return shard_name(self.index)


def make_plan(rels: list[str], labels: list[int], shard_size: int, settings: dict) -> list[Plan]:
    """Shards of ``shard_size`` images in list order; a shard's fingerprint covers the settings and
    its images' paths and labels, so it changes when anything its bytes depend on changes."""
    head = json.dumps(settings, sort_keys=True).encode()
    plans = []
    for k, start in enumerate(range(0, len(rels), shard_size)):
        stop = min(start + shard_size, len(rels))
        h = hashlib.sha256(head)
        for i in range(start, stop):
            h.update(f"\n{rels[i]}\t{labels[i]}".encode())
        plans.append(Plan(k, start, stop, h.hexdigest()))
    return plans


def plan_sha256(plans: list[Plan], shard_size: int) -> str:
    return hashlib.sha256(f"{shard_size}:{','.join(p.sha256 for p in plans)}".encode()).hexdigest()


def shard_state(output: Path, plan: Plan) -> dict | None:
    """The header of the shard file when it is there, readable and made by this plan; else None."""
    path = output / plan.file
    if not path.is_file():
        return None
    try:
        shard = Shard(path)
    except ValueError:
        return None
    if shard.meta.get("plan") != plan.sha256:
        return None
    return {"images": int(shard.meta.get("images", 0)), "rows": len(shard), "failures": shard.meta.get("failures", [])}


# ---------------------------------------------------------------- the index


_SETTINGS = ("preprocess", "views", "assign", "batch_size", "compute_dtype", "dtype", "labels", "classes", "plan")


def shard_header(model: Any, ref: str, revision: str | None, pre: Preprocess, opts: dict, root: Path) -> dict:
    views = list(opts["views"])
    sinkhorn = opts["assign"] == "sinkhorn"
    return {
        "format": tk.FORMAT,
        "optvq_format": SHARD_FORMAT,
        "layout": "shards",
        "model": tk.model_identity(model, ref, revision),
        "preprocess": {**pre.to_json(), **({"tencrop_scale": TENCROP_SCALE} if len(views) == 10 else {})},
        "views": views,
        "assign": opts["assign"],
        # nearest: an image's tokens depend on it alone. sinkhorn: each batch (inside one shard, on
        # whichever rank writes the shard) is one pool.
        "pools": f"each batch (at most {opts['batch_size']} rows) within a shard, on its own rank"
        if sinkhorn
        else None,
        **({"batch_size": opts["batch_size"]} if sinkhorn else {}),
        "compute_dtype": opts["compute_dtype"],
        "dtype": tk.uint_dtype(int(model.quantize.n_codes)).name,
        "input": str(root.resolve()),
    }


def plan_settings(header: dict) -> dict:
    """What a shard's bytes depend on besides its images: part of every shard's fingerprint."""
    keys = ("preprocess", "views", "assign", "batch_size", "compute_dtype", "dtype")
    column = {"image_column": header["image_column"]} if "image_column" in header else {}  # Parquet inputs
    return {"model": header["model"]["sha256"], **{k: header.get(k) for k in keys}, **column}


def index_doc(header: dict, plans: list[Plan], states: list[dict | None], rels: list[str], problems: list) -> dict:
    """manifest.json: the header, one row per finished shard, every failure. A function of the plan
    and the shards alone, so a resumed run writes the same bytes as an uninterrupted one."""
    shards, failures = [], [{"path": p, "reason": r, "shard": None} for p, r in problems]
    for plan, state in zip(plans, states, strict=True):
        if state is None:
            continue
        shards.append(
            {
                "file": plan.file,
                "images": state["images"],
                "rows": state["rows"],
                "inputs": plan.stop - plan.start,
                "first": rels[plan.start],
                "last": rels[plan.stop - 1],
                "sha256": plan.sha256,
            }
        )
        failures += [{"path": p, "reason": r, "shard": plan.index} for p, r in state["failures"]]
    complete = all(s is not None for s in states)
    return {**header, "complete": complete, "failed": len(failures), "failures": failures, "shards": shards}


def write_index(output: Path, doc: dict) -> None:
    """One line per shard and per failure: a million images are a few hundred rows, still grep-able."""
    head = {k: v for k, v in doc.items() if k not in ("failures", "shards")}
    text = json.dumps(head, indent=2)[:-2]
    for key in ("failures", "shards"):
        rows = ",\n".join("    " + json.dumps(r, ensure_ascii=False) for r in doc[key])
        text += f',\n  "{key}": [\n{rows}\n  ]' if rows else f',\n  "{key}": []'
    atomic_write_text(output / MANIFEST, text + "\n}\n")


def _read_existing(output: Path, overwrite: bool) -> dict | None:
    """An earlier run's index; None when there is none (or, with ``overwrite``, an unreadable one)."""
    path = output / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if overwrite:
            return None
        raise UserError(f"{path}: not a readable manifest ({e}); pass --overwrite or choose another OUTPUT") from None
    if not isinstance(data, dict) or data.get("format") != tk.FORMAT:
        raise UserError(f"{path}: not written by `optvq encode`; choose another OUTPUT")
    if data.get("layout") != "shards":
        raise UserError(
            f"{path}: OUTPUT holds a {data.get('layout')} layout; choose another OUTPUT for --layout shards"
        )
    return data


def _differs(old: dict, new: dict) -> str | None:
    """The first setting an earlier run's index has otherwise, as `key old vs new`; None if none."""
    if (old.get("model") or {}).get("sha256") != new["model"]["sha256"]:
        return f"model (sha256 {tk.short(old.get('model', {}).get('sha256'))} vs {tk.short(new['model']['sha256'])})"
    for key in _SETTINGS:
        a, b = old.get(key), new.get(key)
        if a != b:
            if key == "plan":
                return (
                    f"input list or --shard-size ({a and a.get('inputs')} images in shards of "
                    f"{a and a.get('shard_size')} vs {b['inputs']} in shards of {b['shard_size']})"
                )
            return f"{key} ({json.dumps(a)} vs {json.dumps(b)})"
    return None


def inside(output: Path, rel: str) -> Path:
    """OUTPUT/rel, refused when a symlink would take the write or delete outside OUTPUT."""
    path = output / rel
    if not path.resolve().is_relative_to(output.resolve()):
        raise UserError(f"{path}: leads outside OUTPUT {output} (a symlink); remove the link or choose another OUTPUT")
    return path


def prepare(output: Path, header: dict, plans: list[Plan], overwrite: bool) -> None:
    """Rank 0, holding the lock: refuse an OUTPUT of other settings or not ours, or clear it with
    ``overwrite`` (only the shards optvq listed or planned), and drop temporary files."""
    existing = _read_existing(output, overwrite)
    planned = [inside(output, p.file) for p in plans]
    if existing is None and not overwrite:
        present = next((p for p in planned if p.exists()), None)
        if present is not None:
            raise UserError(
                f"{present}: exists, and OUTPUT has no {MANIFEST}, so optvq did not write it; "
                "pass --overwrite to replace it or choose another OUTPUT"
            )
    if existing is not None and not overwrite:
        why = _differs(existing, header)
        if why:
            raise UserError(
                f"{output / MANIFEST}: written with a different {why}; "
                "pass --overwrite to redo it or choose another OUTPUT"
            )
    tk.remove_temp_files(output)
    if overwrite:
        listed = [s.get("file") for s in (existing or {}).get("shards", [])]
        for rel in {*filter(_is_shard_name, listed), *(p.file for p in plans)}:
            inside(output, rel).unlink(missing_ok=True)


def _is_shard_name(rel: Any) -> bool:
    return isinstance(rel, str) and re.fullmatch(r"shards/shard-\d{5,}\.safetensors", rel) is not None
