"""Reading and encoding for `encode --layout shards`: each image's views rendered in DataLoader
workers (a bad image comes back as data), batches that never span two shards, the model turning
pixels into token grids, and a shard's rows assembled in input order."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optvq_cli import sources
from optvq_cli.core.images import ImageError, Preprocess, read_image
from optvq_cli.core.workers import make_loader
from optvq_cli.tokenize.batching import full_fp32
from optvq_cli.tokenize.shard_plan import Plan
from optvq_cli.tokenize.shards import ShardRows
from optvq_cli.tokenize.views import render_views


@dataclass
class ViewSample:
    pos: int  # index into the sorted input list
    pixels: np.ndarray | None = None  # (V, H, W, C)
    size: tuple[int, int] = (0, 0)
    boxes: list[list[int]] | None = None
    error: str | None = None


class ViewDataset:
    """Input ``pos`` -> its views' pixels; a bad image comes back as ``error``, never raised, so
    one corrupt file in a DataLoader worker does not sink its batch."""

    def __init__(self, items: list[sources.Item], channels: int, pre: Preprocess, views: Sequence[str]):
        self.items, self.channels, self.pre, self.views = items, channels, pre, tuple(views)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, pos: int) -> ViewSample:
        try:
            im = read_image(self.items[pos], self.channels)
            pixels, boxes = render_views(im, self.pre, self.views)
            return ViewSample(pos, pixels, im.size, boxes)
        except ImageError as e:
            return ViewSample(pos, error=str(e))
        except Exception as e:  # anything Pillow throws on hostile input: reported, not fatal
            return ViewSample(pos, error=f"cannot read ({type(e).__name__}: {e})")


def _collate(samples: list[ViewSample]) -> tuple[Any, list[ViewSample]]:
    """(uint8 (B * V, H, W, C) tensor of the readable samples or None, the samples without pixels):
    stacked in the worker so the loader can pin one tensor."""
    import torch

    ok = [s for s in samples if s.pixels is not None]
    pixels = torch.from_numpy(np.concatenate([s.pixels for s in ok])) if ok else None
    for s in ok:
        s.pixels = None
    return pixels, samples


@dataclass
class Work:
    """One shard to write: the images to encode, and (``retry_failed``) the rows it already has."""

    plan: Plan
    positions: list[int]
    base: ShardRows | None = None
    results: dict[int, tuple] = field(default_factory=dict)  # pos -> (tokens (V, heads, h, w), size, boxes)
    failures: dict[int, str] = field(default_factory=dict)


def _batches(work: list[Work], images_per_batch: int, workers: int = 0) -> tuple[list[list[int]], list[int]]:
    """Loader batches (input positions) that never span two shards, and each batch's work index;
    within a shard, in the order that gives each reader worker one contiguous run of it."""
    batches, owner = [], []
    for w, item in enumerate(work):
        mine = [item.positions[i : i + images_per_batch] for i in range(0, len(item.positions), images_per_batch)]
        batches += in_worker_runs(mine, len(batches), workers)
        owner += [w] * len(mine)
    return batches, owner


def in_worker_runs(batches: list, start: int, workers: int) -> list:
    """``batches`` reordered so that each of ``workers`` readers gets one contiguous run of them:
    the DataLoader hands the batch at place ``g`` of its list (``start`` is this list's first
    place) to worker ``g % workers``. A worker then reads its images in input order, so a Parquet
    row group is decoded by one worker rather than by each, and a tar is read forward. The
    batches' contents are unchanged, so the shard's bytes are too."""
    if workers <= 1:
        return batches
    out: list = [None] * len(batches)
    runs = iter(batches)
    for w in range(workers):
        for g in range(len(batches)):
            if (start + g) % workers == w:
                out[g] = next(runs)
    return out


def _loader(dataset: ViewDataset, batches: list[list[int]], workers: int, pin: bool):
    return make_loader(dataset, batches, workers, _collate, pin_memory=pin)


@dataclass
class Encoder:
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


def encode_work(
    encoder: Encoder,
    work: list[Work],
    dataset: ViewDataset,
    images_per_batch: int,
    workers: int,
    on_batch: Callable[[int, list[ViewSample], float], None],
    on_shard: Callable[[Work], None],
) -> float:
    """Encodes every work item, calling ``on_shard`` as each one's last batch is in; returns the
    seconds the device waited for the loader."""
    batches, owner = _batches(work, images_per_batch, workers)
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


def _split_base(base: ShardRows, plan: Plan, rels: list[str], n_views: int) -> dict[int, tuple]:
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


def assemble(
    item: Work, rels: list[str], labels: list[int], views: Sequence[str], empty: np.ndarray, old_failures: list
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
