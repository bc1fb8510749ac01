"""``optvq encode --layout shards``: a whole data set to token shards, resumable, across torchrun ranks.

The plan: the sorted input list cut into shards of ``shard_size`` images; shard ``k`` holds images
``k * shard_size ...`` and is written atomically (``shards.write_shard``) with a fingerprint of its
inputs and settings in its header. Everything a rerun needs to know is in those headers and in
``manifest.json`` (one row per shard), so finding the work done reads no image: a shard whose file
is there with the planned fingerprint is done; any other is encoded again. Batches never span two
shards, so a shard's bytes depend on its own images alone, whichever rank or run writes it.

Under torchrun rank ``r`` of ``W`` takes shards ``r, r + W, ...``; rank 0 holds the OUTPUT lock,
checks the folder, and writes the index once every rank is done.

Modules: ``views`` (what each image becomes), ``shard_plan`` (plan, shard state, index, OUTPUT),
``shard_batches`` (reading in workers, encoding, a shard's rows), the run here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from optvq_cli import sources
from optvq_cli.core import dist
from optvq_cli.core.errors import UserError
from optvq_cli.core.images import Preprocess
from optvq_cli.core.lock import folder_lock
from optvq_cli.core.workers import default_workers
from optvq_cli.quant import ASSIGN_MODES
from optvq_cli.tokenize import tokens as tk
from optvq_cli.tokenize.batching import make_preprocess
from optvq_cli.tokenize.shard_batches import Encoder, ViewDataset, ViewSample, Work, assemble, encode_work
from optvq_cli.tokenize.shard_plan import (
    Plan,
    index_doc,
    inside,
    make_plan,
    plan_settings,
    plan_sha256,
    prepare,
    shard_header,
    shard_state,
    write_index,
)
from optvq_cli.tokenize.shards import Shard, write_shard
from optvq_cli.tokenize.views import parse_views

DEFAULT_SHARD_SIZE = 10_000

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
    source_options: sources.SourceOptions | None = None,
    progress: Progress | None = None,
    on_failure: OnFailure | None = None,
) -> ShardSummary:
    """Images under INPUT to OUTPUT/shards/shard-NNNNN.safetensors and OUTPUT/manifest.json.

    ``batch_size`` counts model inputs (rows): a batch holds ``batch_size // len(views)`` images
    (at least one) with all their views. ``device`` (None: where the model is) and ``dtype``
    (fp32, bf16, fp16: the encoder's autocast, the quantizer stays fp32; None: the model's own).
    Under torchrun (or an initialised process group) the shards are divided among the ranks.
    ``source_options``: how INPUT is read (Parquet columns). ``progress(done, total, already_done,
    stats)`` hears of each batch; ``on_failure(path, reason)`` of each bad image.
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
        "source_options": source_options or sources.SourceOptions(),
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
    settings: dict  # the source's options that change the pixels (Source.settings)


def _inputs(
    input: Path, output: Path, labels: Path | None, options: sources.SourceOptions
) -> tuple[_Inputs, list[str] | None, str]:
    found = sources.find(input, exclude=[output], options=options)
    lab, classes, source = sources.assign_labels(found, labels)
    rels = [it.rel for it in found.items]
    return _Inputs(found.root, found.items, rels, lab, found.problems, found.source.settings()), classes, source


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
    inp, classes, source = _inputs(input, output, opts["labels"], opts["source_options"])
    header = shard_header(model, opts["model_ref"], opts["revision"], pre, opts, inp.root)
    header.update(labels=source, classes=classes)
    header.update(inp.settings)  # e.g. the Parquet column the pixels came from
    plans = make_plan(inp.rels, inp.labels, opts["shard_size"], plan_settings(header))
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
                prepare(output, header, plans, opts["overwrite"])
                states = [shard_state(output, p) for p in plans]
                write_index(output, index_doc(header, plans, states, inp.rels, inp.problems))
            except (ValueError, OSError) as e:  # UserError, FolderBusy
                error = e
        _gather_errors(error)
        for path, reason in inp.problems if dist.is_main() and on_failure else []:  # e.g. a damaged tar
            on_failure(path, reason)
        error = None
        try:
            _encode_mine(model, output, plans, inp, pre, opts, summary, progress, on_failure)
        except Exception as e:  # noqa: BLE001 - handed to every rank, then raised
            error = e
        doc: dict = {}

        def finish_index() -> None:  # rank 0, once every rank is done: the shards on disk, even after a failure
            if dist.is_main():
                doc.update(index_doc(header, plans, [shard_state(output, p) for p in plans], inp.rels, inp.problems))
                write_index(output, doc)

        _gather_errors(error, then=finish_index)
    failures = dist.all_gather_object([(f["path"], f["reason"]) for f in doc["failures"]] if dist.is_main() else None)
    summary.failed = failures[0]
    counts = dist.all_gather_object((summary.written, summary.skipped, summary.shards_written, summary.shards_skipped))
    summary.written, summary.skipped, summary.shards_written, summary.shards_skipped = map(
        sum, zip(*counts, strict=True)
    )
    summary.seconds = time.perf_counter() - start
    return summary


def _work_left(output: Path, mine: list[Plan], inp: _Inputs, retry_failed: bool, summary: ShardSummary):
    """The shards still to encode (with ``retry_failed``, the failed images of finished ones, and
    those shards' earlier failures); finished shards are counted as skipped in ``summary``."""
    work, old_failures = [], {}
    for plan in mine:
        state = shard_state(output, plan)
        if state is None:
            work.append(Work(plan, list(range(plan.start, plan.stop))))
            continue
        failed = {p for p, _ in state["failures"]}
        if retry_failed and failed:
            base = Shard(output / plan.file).read_all()
            work.append(Work(plan, [i for i in range(plan.start, plan.stop) if inp.rels[i] in failed], base))
            old_failures[plan.index] = state["failures"]
            summary.skipped += plan.stop - plan.start - len(failed)
        else:
            summary.skipped += plan.stop - plan.start
            summary.shards_skipped += 1
    return work, old_failures


def _encode_mine(
    model: Any,
    output: Path,
    plans: list[Plan],
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
    encoder = Encoder(model, opts["assign"], dtype, len(views))
    dataset = ViewDataset(inp.items, int(model.config.in_channels), pre, views)
    began = time.perf_counter()

    def on_batch(ok: int, bad: list[ViewSample], waited: float) -> None:
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

    def on_shard(item: Work) -> None:
        rows, meta = assemble(item, inp.rels, inp.labels, views, empty, old_failures.get(item.plan.index, []))
        write_shard(inside(output, item.plan.file), rows, meta)
        summary.shards_written += 1

    per_batch = max(1, opts["batch_size"] // len(views))
    summary.wait_seconds = encode_work(encoder, work, dataset, per_batch, opts["workers"], on_batch, on_shard)
