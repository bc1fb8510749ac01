"""``optvq encode --layout shards``: a whole data set to token shards, resumable, across torchrun ranks.

The plan: the sorted input list cut into shards of ``shard_size`` images; shard ``k`` holds images
``k * shard_size ...`` and is written atomically (``shards.write_shard``) with a fingerprint of its
inputs and settings in its header. Everything a rerun needs to know is in those headers and in
``manifest.json`` (one row per shard), so finding the work done reads no image: a shard whose file
is there with the planned fingerprint is done; any other is encoded again. Batches never span two
shards, so a shard's bytes depend on its own images alone, whichever rank or run writes it.

Under torchrun rank ``r`` of ``W`` takes shards ``r, r + W, ...``; rank 0 holds the OUTPUT lock,
checks the folder, and writes the index once every rank is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from optvq_cli import sources
from optvq_cli.core import dist
from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import atomic_write_text
from optvq_cli.core.images import ImageError, Preprocess, read_image
from optvq_cli.core.lock import folder_lock
from optvq_cli.core.workers import default_workers, make_loader
from optvq_cli.quant import ASSIGN_MODES
from optvq_cli.tokenize import tokens as tk
from optvq_cli.tokenize.batching import full_fp32, make_preprocess
from optvq_cli.tokenize.dataset import MANIFEST
from optvq_cli.tokenize.shards import SHARD_FORMAT, Shard, ShardRows, shard_name, write_shard

DEFAULT_SHARD_SIZE = 10_000
CROPS = ("tl", "tr", "bl", "br", "center")
VIEW_SETS: dict[str, tuple[str, ...]] = {
    "center": ("center",),
    "center,flip": ("center", "flip"),
    "tencrop": CROPS + tuple(f"{c}_flip" for c in CROPS),
}
TENCROP_SCALE = 1.1  # crops of `size` px from the image resized to 1.1 x size, as LlamaGen's extraction does

Progress = Callable[[int, int, int, str], None]  # (images done, total, of those done before, stats text)
OnFailure = Callable[[str, str], None]  # (path, reason)


@dataclass
class ShardSummary:
    """What a sharded run did; the CLI prints it and exits 1 when ``failed`` is not empty. Counts
    are over all ranks."""

    output: Path
    command: str = "encode"
    total: int = 0  # images planned (and inputs that could not be planned)
    written: int = 0  # images encoded by this run
    skipped: int = 0  # images in shards an earlier run finished
    failed: list[tuple[str, str]] = field(default_factory=list)  # every failure the index records
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0  # this rank: time the device waited for decoded images
    mean_psnr_rgb: None = None  # the files pipeline's Summary has it; kept so one report prints both

    @property
    def rate(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    @property
    def wait_share(self) -> float:
        return self.wait_seconds / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------- views


def parse_views(views: str | Sequence[str]) -> tuple[str, ...]:
    """``center`` / ``center,flip`` / ``tencrop`` to the view names, in row order."""
    key = views if isinstance(views, str) else ",".join(views)
    key = ",".join(v.strip().lower() for v in key.split(",") if v.strip())
    if key not in VIEW_SETS:
        raise UserError(f"--views {views}: use one of {', '.join(VIEW_SETS)}")
    return VIEW_SETS[key]


def _pad(a: np.ndarray, f: int) -> np.ndarray:
    """Edge padding on the right and bottom to a multiple of ``f``, as ``Preprocess.apply`` pads."""
    pb, pr = -a.shape[0] % f, -a.shape[1] % f
    return np.pad(a, ((0, pb), (0, pr), (0, 0)), mode="edge") if pb or pr else a


def render_views(im: Image.Image, pre: Preprocess, views: Sequence[str]) -> tuple[np.ndarray, list[list[int]]]:
    """(V, H, W, C) uint8 pixels, one per view, and each view's crop box (left, top, right, bottom)
    in the source's pixels. ``flip`` is the mirrored image put through the same preprocessing; the
    ten crops are the corners and centre of the image resized to 1.1 x size, and their mirrors."""
    if tuple(views) != VIEW_SETS["tencrop"]:
        out, boxes = [], []
        for v in views:
            src = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if v == "flip" else im
            pixels, placement = pre.apply(src)
            left, top, right, bottom = placement.crop_box
            out.append(pixels)
            boxes.append(
                [im.width - right, top, im.width - left, bottom] if v == "flip" else [left, top, right, bottom]
            )
        return np.stack(out), boxes
    return _ten_crop(im, pre)


def _ten_crop(im: Image.Image, pre: Preprocess) -> tuple[np.ndarray, list[list[int]]]:
    size = pre.size
    big = max(size, round(size * TENCROP_SCALE))
    square = pre.place(*im.size).crop_box  # the centre square; raises ImageError for a tiny image
    a = np.array(im.resize((big, big), Image.Resampling.BICUBIC, box=square), dtype=np.uint8)
    a = a[:, :, None] if a.ndim == 2 else a
    m, c = big - size, (big - size) // 2
    corners = [(0, 0), (m, 0), (0, m), (m, m), (c, c)]  # (x, y) of tl, tr, bl, br, centre
    scale = (square[2] - square[0]) / big
    crops, boxes = [], []
    for x, y in corners:
        crops.append(a[y : y + size, x : x + size])
        box = [x, y, x + size, y + size]
        boxes.append(
            [square[0] + round(box[0] * scale), square[1] + round(box[1] * scale)]
            + [square[0] + round(box[2] * scale), square[1] + round(box[3] * scale)]
        )
    flips = [np.ascontiguousarray(p[:, ::-1]) for p in crops]
    return np.stack([_pad(p, pre.multiple) for p in crops + flips]), boxes + boxes


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Plan:
    """One shard of the plan: images ``start .. stop - 1`` of the sorted list, and its fingerprint."""

    index: int
    start: int
    stop: int
    sha256: str

    @property
    def file(self) -> str:
        return shard_name(self.index)


def make_plan(rels: list[str], labels: list[int], shard_size: int, settings: dict) -> list[_Plan]:
    """Shards of ``shard_size`` images in list order; a shard's fingerprint covers the settings and
    its images' paths and labels, so it changes when anything its bytes depend on changes."""
    head = json.dumps(settings, sort_keys=True).encode()
    plans = []
    for k, start in enumerate(range(0, len(rels), shard_size)):
        stop = min(start + shard_size, len(rels))
        h = hashlib.sha256(head)
        for i in range(start, stop):
            h.update(f"\n{rels[i]}\t{labels[i]}".encode())
        plans.append(_Plan(k, start, stop, h.hexdigest()))
    return plans


def plan_sha256(plans: list[_Plan], shard_size: int) -> str:
    return hashlib.sha256(f"{shard_size}:{','.join(p.sha256 for p in plans)}".encode()).hexdigest()


def _shard_state(output: Path, plan: _Plan) -> dict | None:
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


# ---------------------------------------------------------------- reading


@dataclass
class _Sample:
    pos: int  # index into the sorted input list
    pixels: np.ndarray | None = None  # (V, H, W, C)
    size: tuple[int, int] = (0, 0)
    boxes: list[list[int]] | None = None
    error: str | None = None


class _ViewDataset:
    """Input ``pos`` -> its views' pixels; a bad image comes back as ``error``, never raised, so
    one corrupt file in a DataLoader worker does not sink its batch."""

    def __init__(self, items: list[sources.Item], channels: int, pre: Preprocess, views: Sequence[str]):
        self.items, self.channels, self.pre, self.views = items, channels, pre, tuple(views)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, pos: int) -> _Sample:
        try:
            im = read_image(self.items[pos], self.channels)
            pixels, boxes = render_views(im, self.pre, self.views)
            return _Sample(pos, pixels, im.size, boxes)
        except ImageError as e:
            return _Sample(pos, error=str(e))
        except Exception as e:  # anything Pillow throws on hostile input: reported, not fatal
            return _Sample(pos, error=f"cannot read ({type(e).__name__}: {e})")


def _collate(samples: list[_Sample]) -> tuple[Any, list[_Sample]]:
    """(uint8 (B * V, H, W, C) tensor of the readable samples or None, the samples without pixels):
    stacked in the worker so the loader can pin one tensor."""
    import torch

    ok = [s for s in samples if s.pixels is not None]
    pixels = torch.from_numpy(np.concatenate([s.pixels for s in ok])) if ok else None
    for s in ok:
        s.pixels = None
    return pixels, samples


@dataclass
class _Work:
    """One shard to write: the images to encode, and (``retry_failed``) the rows it already has."""

    plan: _Plan
    positions: list[int]
    base: ShardRows | None = None
    results: dict[int, tuple] = field(default_factory=dict)  # pos -> (tokens (V, heads, h, w), size, boxes)
    failures: dict[int, str] = field(default_factory=dict)


def _batches(work: list[_Work], images_per_batch: int) -> tuple[list[list[int]], list[int]]:
    """Loader batches (input positions) that never span two shards, and each batch's work index."""
    batches, owner = [], []
    for w, item in enumerate(work):
        for i in range(0, len(item.positions), images_per_batch):
            batches.append(item.positions[i : i + images_per_batch])
            owner.append(w)
    return batches, owner


def _loader(dataset: _ViewDataset, batches: list[list[int]], workers: int, pin: bool):
    return make_loader(dataset, batches, workers, _collate, pin_memory=pin)


@dataclass
class _Encoder:
    """The model side of a run: pixels to token grids in the index's dtype."""

    model: Any
    assign: str
    dtype: np.dtype
    views: int

    def __call__(self, pixels: Any) -> np.ndarray:
        import torch

        device = self.model.device
        x = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        with torch.inference_mode(), full_fp32(device):
            indices = self.model.encode_indices(x, assign=self.assign)
        grids = indices.cpu().numpy().astype(self.dtype)
        return grids.reshape(-1, self.views, *grids.shape[1:])


def _run(
    encoder: _Encoder,
    work: list[_Work],
    dataset: _ViewDataset,
    images_per_batch: int,
    workers: int,
    on_batch: Callable[[int, list[_Sample], float], None],
    on_shard: Callable[[_Work], None],
) -> float:
    """Encodes every work item, calling ``on_shard`` as each one's last batch is in; returns the
    seconds the device waited for the loader."""
    batches, owner = _batches(work, images_per_batch)
    left = [0] * len(work)
    for w in owner:
        left[w] += 1
    waited = 0.0
    loader = iter(_loader(dataset, batches, workers, pin=encoder.model.device.type == "cuda"))
    for w in owner:
        t0 = time.perf_counter()
        pixels, samples = next(loader)
        waited += time.perf_counter() - t0
        item = work[w]
        ok = [s for s in samples if s.error is None]
        grids = encoder(pixels) if ok else []
        for s, g in zip(ok, grids, strict=True):
            item.results[s.pos] = (g, s.size, s.boxes)
        bad = [s for s in samples if s.error is not None]
        for s in bad:
            item.failures[s.pos] = s.error
        on_batch(len(ok), bad, waited)
        left[w] -= 1
        if left[w] == 0:
            on_shard(item)
    return waited


# ---------------------------------------------------------------- assembling a shard


def _split_base(base: ShardRows, plan: _Plan, rels: list[str], n_views: int) -> dict[int, tuple]:
    """A shard already written, back to per-image results keyed by input position."""
    where = {rels[i]: i for i in range(plan.start, plan.stop)}
    out = {}
    for r in range(0, len(base), n_views):
        out[where[base.paths[r]]] = (
            base.tokens[r : r + n_views],
            tuple(int(v) for v in base.sizes[r]),
            [list(map(int, c)) for c in base.crops[r : r + n_views]],
        )
    return out


def _assemble(
    item: _Work, rels: list[str], labels: list[int], views: Sequence[str], empty: np.ndarray, old_failures: list
) -> tuple[ShardRows, dict]:
    """The shard's rows in input order (each image's views together, in ``views`` order) and its
    header: failures are the images of the shard that have no rows."""
    plan, v = item.plan, len(views)
    results = dict(item.results)
    if item.base is not None:
        results.update(_split_base(item.base, plan, rels, v))
    reasons = {p: r for p, r in old_failures}
    reasons.update({rels[p]: r for p, r in item.failures.items()})
    ok = [p for p in range(plan.start, plan.stop) if p in results]
    failures = [[rels[p], reasons[rels[p]]] for p in range(plan.start, plan.stop) if p not in results]
    rows = ShardRows(
        tokens=np.concatenate([results[p][0] for p in ok]) if ok else empty,
        paths=[rels[p] for p in ok for _ in range(v)],
        labels=np.repeat(np.asarray([labels[p] for p in ok], np.int64), v),
        views=np.tile(np.arange(v, dtype=np.uint8), len(ok)),
        sizes=np.asarray([results[p][1] for p in ok for _ in range(v)], np.int32).reshape(-1, 2),
        crops=np.asarray([b for p in ok for b in results[p][2]], np.int32).reshape(-1, 4),
        view_names=list(views),
    )
    return rows, {"plan": plan.sha256, "images": len(ok), "failures": failures}


# ---------------------------------------------------------------- the index


_SETTINGS = ("preprocess", "views", "assign", "batch_size", "compute_dtype", "dtype", "labels", "classes", "plan")


def _header(model: Any, ref: str, revision: str | None, pre: Preprocess, opts: dict, root: Path) -> dict:
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


def _settings(header: dict) -> dict:
    """What a shard's bytes depend on besides its images: part of every shard's fingerprint."""
    keys = ("preprocess", "views", "assign", "batch_size", "compute_dtype", "dtype")
    return {"model": header["model"]["sha256"], **{k: header.get(k) for k in keys}}


def _index(header: dict, plans: list[_Plan], states: list[dict | None], rels: list[str], problems: list) -> dict:
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


def _write_index(output: Path, doc: dict) -> None:
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


def _inside(output: Path, rel: str) -> Path:
    """OUTPUT/rel, refused when a symlink would take the write or delete outside OUTPUT."""
    path = output / rel
    if not path.resolve().is_relative_to(output.resolve()):
        raise UserError(f"{path}: leads outside OUTPUT {output} (a symlink); remove the link or choose another OUTPUT")
    return path


def _prepare(output: Path, header: dict, plans: list[_Plan], overwrite: bool) -> None:
    """Rank 0, holding the lock: refuse an OUTPUT of other settings or not ours, or clear it with
    ``overwrite`` (only the shards optvq listed or planned), and drop temporary files."""
    existing = _read_existing(output, overwrite)
    planned = [_inside(output, p.file) for p in plans]
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
            _inside(output, rel).unlink(missing_ok=True)


def _is_shard_name(rel: Any) -> bool:
    import re

    return isinstance(rel, str) and re.fullmatch(r"shards/shard-\d{5,}\.safetensors", rel) is not None


# ---------------------------------------------------------------- the run


def check_shard_options(
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    views: str | Sequence[str] = "center",
    assign: str = "nearest",
    crop: bool = True,
    labels: Path | None = None,
    batch_size: int = 32,
    workers: int | None = None,
) -> tuple[str, ...]:
    """Flag checks that need no model (the CLI runs them before the slow model load); returns the
    view names. Raises UserError."""
    if shard_size < 1:
        raise UserError(f"--shard-size {shard_size}: must be at least 1 image")
    if assign not in ASSIGN_MODES:
        raise UserError(f"--assign {assign}: use one of {', '.join(ASSIGN_MODES)}")
    if not crop:
        raise UserError(
            "--layout shards --no-crop: a shard stacks one grid size for all its images, --no-crop gives "
            "each image its own; drop --no-crop or use --layout files"
        )
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if workers is not None and workers < 0:
        raise UserError(f"--workers {workers}: must be 0 or more")
    if labels is not None and not Path(labels).is_file():
        raise UserError(f"--labels {labels}: no such file; give a CSV (path,label) or JSON {{path: label}} file")
    return parse_views(views)


def encode_shards(
    model: Any,
    input: Path,
    output: Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    views: str | Sequence[str] = "center",
    labels: Path | None = None,
    retry_failed: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
    device: str | None = None,
    dtype: str | None = "fp32",
    assign: str = "nearest",
    size: int | None = None,
    crop: bool = True,
    overwrite: bool = False,
    model_ref: str | None = None,
    revision: str | None = None,
    progress: Progress | None = None,
    on_failure: OnFailure | None = None,
) -> ShardSummary:
    """Images under INPUT to OUTPUT/shards/shard-NNNNN.safetensors and OUTPUT/manifest.json.

    ``batch_size`` counts model inputs (rows): a batch holds ``batch_size // len(views)`` images
    (at least one) with all their views. ``device`` (None: where the model is) and ``dtype``
    (fp32, bf16, fp16: the encoder's autocast, the quantizer stays fp32; None: the model's own).
    Under torchrun (or an initialised process group) the shards are divided among the ranks. ``progress(done, total,
    already_done, stats)`` hears of each batch; ``on_failure(path, reason)`` of each bad image.
    """
    from optvq_cli.core.device import DTYPE_NAMES, resolve_dtype

    names = check_shard_options(
        shard_size=shard_size, views=views, assign=assign, crop=crop, labels=labels,
        batch_size=batch_size, workers=workers,
    )  # fmt: skip
    compute = model.compute_dtype if dtype is None else resolve_dtype(dtype)
    if device is not None:
        model = model.to(dist.device_for(device))
    created = dist.init_from_env(model.device)
    before = model.compute_dtype
    model.compute_dtype = compute
    opts = {
        "views": names, "assign": assign, "batch_size": batch_size, "shard_size": shard_size,
        "compute_dtype": DTYPE_NAMES[compute] if compute is not None else "fp32",
        "retry_failed": retry_failed, "overwrite": overwrite, "labels": labels, "size": size,
        "workers": default_workers() if workers is None else workers,
        "model_ref": model_ref or str(model.source or "unnamed"), "revision": revision,
    }  # fmt: skip
    try:
        return _encode(model, Path(input), Path(output), opts, progress, on_failure)
    finally:
        model.compute_dtype = before
        if created:
            dist.destroy()


@dataclass
class _Inputs:
    """The sorted input list as the plan sees it."""

    root: Path
    items: list[sources.Item]
    rels: list[str]  # relative to root, with the extension (or SHARD/member): the shards' path column
    labels: list[int]
    problems: list[tuple[str, str]]  # inputs that could not be planned (missing, unreadable folders)


def _inputs(input: Path, output: Path, labels: Path | None) -> tuple[_Inputs, list[str] | None, str]:
    found = sources.find(input, exclude=[output])
    lab, classes, source = sources.assign_labels(found, labels)
    rels = [it.rel for it in found.items]
    return _Inputs(found.root, found.items, rels, lab, found.problems), classes, source


def _gather_errors(error: BaseException | None, then: Callable[[], None] | None = None) -> None:
    """A barrier at which every rank learns whether any rank failed; ``then`` runs after it (on
    every rank that passes it), and each rank raises (its own error, or one naming the failed
    rank), so no rank waits at a later collective for one that left."""
    messages = dist.all_gather_object(None if error is None else str(error))
    if then is not None:
        then()
    if error is not None:
        raise error
    for r, m in enumerate(messages):
        if m is not None:
            raise UserError(f"rank {r}: {m}")


def _encode(model: Any, input: Path, output: Path, opts: dict, progress: Any, on_failure: Any) -> ShardSummary:
    start = time.perf_counter()
    if output.exists() and not output.is_dir():
        raise UserError(f"{output}: exists and is not a folder; give a folder for the shards")
    pre = make_preprocess(model, opts["size"], True)
    inp, classes, source = _inputs(input, output, opts["labels"])
    header = _header(model, opts["model_ref"], opts["revision"], pre, opts, inp.root)
    header.update(labels=source, classes=classes)
    plans = make_plan(inp.rels, inp.labels, opts["shard_size"], _settings(header))
    digest = plan_sha256(plans, opts["shard_size"])
    header["plan"] = {"shard_size": opts["shard_size"], "inputs": len(inp.rels), "shards": len(plans), "sha256": digest}
    if len(set(dist.all_gather_object(digest))) > 1:
        raise UserError(f"{input}: the ranks see different input lists; give every node the same INPUT")
    summary = ShardSummary(output, total=len(inp.rels) + len(inp.problems))
    with contextlib.ExitStack() as stack:
        error = None
        if dist.is_main():
            try:
                stack.enter_context(folder_lock(output))
                _prepare(output, header, plans, opts["overwrite"])
                states = [_shard_state(output, p) for p in plans]
                _write_index(output, _index(header, plans, states, inp.rels, inp.problems))
            except (ValueError, OSError) as e:  # UserError, FolderBusy
                error = e
        _gather_errors(error)
        error = None
        try:
            _encode_mine(model, output, plans, inp, pre, opts, summary, progress, on_failure)
        except Exception as e:  # noqa: BLE001 - handed to every rank, then raised
            error = e
        doc: dict = {}

        def write_index() -> None:  # rank 0, once every rank is done: the shards on disk, even after a failure
            if dist.is_main():
                doc.update(_index(header, plans, [_shard_state(output, p) for p in plans], inp.rels, inp.problems))
                _write_index(output, doc)

        _gather_errors(error, then=write_index)
    failures = dist.all_gather_object([(f["path"], f["reason"]) for f in doc["failures"]] if dist.is_main() else None)
    summary.failed = failures[0]
    counts = dist.all_gather_object((summary.written, summary.skipped, summary.shards_written, summary.shards_skipped))
    summary.written, summary.skipped, summary.shards_written, summary.shards_skipped = map(
        sum, zip(*counts, strict=True)
    )
    summary.seconds = time.perf_counter() - start
    return summary


def _work_left(output: Path, mine: list[_Plan], inp: _Inputs, retry_failed: bool, summary: ShardSummary):
    """The shards still to encode (with ``retry_failed``, the failed images of finished ones, and
    those shards' earlier failures); finished shards are counted as skipped in ``summary``."""
    work, old_failures = [], {}
    for plan in mine:
        state = _shard_state(output, plan)
        if state is None:
            work.append(_Work(plan, list(range(plan.start, plan.stop))))
            continue
        failed = {p for p, _ in state["failures"]}
        if retry_failed and failed:
            base = Shard(output / plan.file).read_all()
            work.append(_Work(plan, [i for i in range(plan.start, plan.stop) if inp.rels[i] in failed], base))
            old_failures[plan.index] = state["failures"]
            summary.skipped += plan.stop - plan.start - len(failed)
        else:
            summary.skipped += plan.stop - plan.start
            summary.shards_skipped += 1
    return work, old_failures


def _encode_mine(
    model: Any,
    output: Path,
    plans: list[_Plan],
    inp: _Inputs,
    pre: Preprocess,
    opts: dict,
    summary: ShardSummary,
    progress: Progress | None,
    on_failure: OnFailure | None,
) -> None:
    """This rank's shards (r, r + W, ...): the missing ones encoded, the finished ones skipped."""
    views = opts["views"]
    mine = plans[dist.rank() :: dist.world_size()]
    total = sum(p.stop - p.start for p in mine)
    work, old_failures = _work_left(output, mine, inp, opts["retry_failed"], summary)
    done = summary.skipped
    if progress:
        progress(done, total, summary.skipped, "")
    if not work:
        return
    heads, f = int(model.quantize.heads), int(model.downsample)
    grid = -(-pre.size // f)
    dtype = tk.uint_dtype(int(model.quantize.n_codes))
    empty = np.zeros((0, heads, grid, grid), dtype)
    encoder = _Encoder(model, opts["assign"], dtype, len(views))
    dataset = _ViewDataset(inp.items, int(model.config.in_channels), pre, views)
    began = time.perf_counter()

    def on_batch(ok: int, bad: list[_Sample], waited: float) -> None:
        nonlocal done
        done += ok + len(bad)
        summary.written += ok
        summary.wait_seconds = waited
        for s in bad:
            if on_failure:
                on_failure(inp.items[s.pos].display, s.error)
        if progress:
            share = summary.wait_seconds / max(time.perf_counter() - began, 1e-9)
            progress(done, total, summary.skipped, f"device waited {share:.0%}")

    def on_shard(item: _Work) -> None:
        rows, meta = _assemble(item, inp.rels, inp.labels, views, empty, old_failures.get(item.plan.index, []))
        write_shard(_inside(output, item.plan.file), rows, meta)
        summary.shards_written += 1

    per_batch = max(1, opts["batch_size"] // len(views))
    summary.wait_seconds = _run(encoder, work, dataset, per_batch, opts["workers"], on_batch, on_shard)
