"""`optvq encode / decode / reconstruct`: images to token grids and back. Thin: parse, call
``optvq_cli.tokenize.pipeline``, report."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from optvq_cli.checkpoints import DEFAULT_MODEL
from optvq_cli.cli.app import app, console, fatal

_MODEL_HELP = (
    "Model: a bundled name (bundled:NAME where a folder has that name), a local folder, a .safetensors file "
    "or a Hugging Face repo id (ORG/NAME)."
)


def _model_option(default: str | None) -> Any:
    return typer.Option(
        default,
        "--model",
        "-m",
        help=_MODEL_HELP + (" (default: the manifest's model)" if default is None else ""),
    )


_REVISION = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit) of --model.")
_DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
_BATCH = typer.Option(32, "--batch-size", "-b", min=1, help="Images per forward pass.")
_WORKERS = typer.Option(None, "--workers", "-j", min=0, help="Reader processes (default: CPU cores - 1, at most 8).")
_SIZE = typer.Option(None, "--size", min=1, help="Resize the shorter side to N px (default: the model's resolution).")
_NO_CROP = typer.Option(
    False, "--no-crop", help="Keep the whole image (padded to a multiple of f) instead of a centre crop."
)
_ASSIGN = typer.Option(
    "nearest",
    "--assign",
    help="nearest: each image's tokens depend on it alone. sinkhorn: the paper's batch-level assignment.",
)
_OVERWRITE = typer.Option(
    False,
    "--overwrite",
    help="Redo outputs that exist, even another model's; earlier outputs listed in OUTPUT/manifest.json are "
    "removed, files it does not list are never replaced.",
)
_STRICT = typer.Option(False, "--strict", help="Stop at the first bad input instead of skipping it.")
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar; the summary, skipped inputs and errors only.")


def _escape(text: object) -> str:
    """User text (paths, names, reasons quoting them) printed through rich: ``[bold]`` in a file
    name is shown as is, never taken for markup."""
    from rich.markup import escape

    return escape(str(text))


def _load(ref: str, revision: str | None, device: str, compile: bool = False, recorded_in: Path | None = None) -> Any:
    """The model (its encoder compiled with ``compile``); ``recorded_in``: the manifest the reference
    came from (not the user's --model)."""
    from optvq_cli.core.errors import UserError
    from optvq_cli.model import load_model
    from optvq_cli.model.checkpoint import bundled_names

    if ref == DEFAULT_MODEL and not Path(ref).exists() and DEFAULT_MODEL not in bundled_names():
        fatal("no bundled default model is installed; pass --model REF")
    try:
        with console.status(f"loading model {_escape(ref)}..."):
            model = load_model(ref, device=device, revision=revision)
        if compile:
            from optvq_cli.core.device import compile_module

            compile_module(model.encoder, True)
        return model
    except UserError as e:
        if recorded_in is None:
            raise
        fatal(f"the model recorded in {recorded_in} ({ref}) cannot be loaded: {e}; pass --model")


_COMPILE = typer.Option(
    False,
    "--compile",
    help="torch.compile the encoder: faster on a GPU after a one-off compilation (about a minute); tokens "
    "can differ from an uncompiled run only at near-ties.",
)
_LAYOUTS = ("files", "packed", "shards")
_LAYOUT = typer.Option(
    "files",
    "--layout",
    help="files: one .npy per image (folders of photos). packed: one tokens.npy (as --pack). shards: "
    "safetensors shards of --shard-size images with labels and views, resumable, split across torchrun "
    "ranks (training sets).",
)
_SHARD_SIZE = typer.Option(10000, "--shard-size", min=1, help="Images per shard (--layout shards).")
_VIEWS = typer.Option(
    "center",
    "--views",
    help="center, center,flip or tencrop (4 corners + centre and their mirrors); a row per view (--layout shards).",
)
_LABELS = typer.Option(
    None,
    "--labels",
    help="CSV (path,label) or JSON {path: label}; default: class folders INPUT/<class>/<image>, else -1 "
    "(--layout shards).",
)
_RETRY_FAILED = typer.Option(
    False, "--retry-failed", help="Encode again only the images the index lists as failed (--layout shards)."
)
_IMAGE_COLUMN = typer.Option("image", "--image-column", help="Parquet inputs: the column of image bytes.")
_LABEL_COLUMN = typer.Option("label", "--label-column", help="Parquet inputs: the column of labels.")
_INPUT_HELP = (
    "An image, a folder of images (recursive), a .txt list of paths, a .tar, a folder of .tar shards, a brace "
    "pattern (train-{0000..0146}.tar), ImageNet's nested train tar, or a .parquet file or folder of them."
)
_DTYPE = typer.Option(
    "fp32", "--dtype", help="Encoder compute: fp32, bf16 or fp16; the quantizer stays fp32 (--layout shards)."
)


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C: one line and exit 130. Every finished output is on disk (written atomically) and
    the manifest lists it, so the same command resumes."""
    try:
        yield
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


@contextlib.contextmanager
def _progress(verb: str, quiet: bool) -> Iterator[tuple[Any, Any]]:
    """The one ProgressBar (off with -q); yields (on_progress, on_failure) for the library. Skipped
    inputs are printed even with -q: they make the run exit 1."""
    from optvq_cli.cli.progress import ProgressBar

    with ProgressBar(verb, console, enabled=not quiet) as bar:

        def on_failure(path: str, reason: str) -> None:
            bar.line(f"[yellow]skipped[/] {_escape(path)}: {_escape(reason)}")

        yield bar.update, on_failure


def _report(summary: Any, verb: str, retry: str = "fix or remove them and rerun to finish") -> None:
    """The summary on stdout (scripts parse it); non-zero exit when any input failed."""
    parts = [f"{verb} {summary.written} of {summary.total}"]
    if summary.skipped:
        parts.append(f"{summary.skipped} already done")
    if summary.failed:
        parts.append(f"{len(summary.failed)} failed")
    line = ", ".join(parts) + f" in {summary.seconds:.1f} s ({summary.rate:.1f} images/s) -> {summary.output}"
    typer.echo(line)
    if summary.mean_psnr_rgb is not None:
        typer.echo(
            f"mean PSNR (RGB) {summary.mean_psnr_rgb:.2f} dB over {len(summary.psnr_rgb)} images "
            "(psnr_rgb per image in OUTPUT/manifest.json)"
        )
    if summary.failed:
        fatal(f"{len(summary.failed)} input(s) failed (listed above); {retry}")


@app.command()
def encode(
    input: Path = typer.Argument(..., help=_INPUT_HELP),
    output: Path = typer.Argument(..., help="Folder for the token grids and manifest.json."),
    model: str = _model_option(DEFAULT_MODEL),
    revision: str | None = _REVISION,
    size: int | None = _SIZE,
    no_crop: bool = _NO_CROP,
    assign: str = _ASSIGN,
    pack: bool = typer.Option(
        False, "--pack", help="One tokens.npy (N, heads, h, w) + paths.txt instead of one file per image."
    ),
    layout: str = _LAYOUT,
    shard_size: int = _SHARD_SIZE,
    views: str = _VIEWS,
    labels: Path | None = _LABELS,
    retry_failed: bool = _RETRY_FAILED,
    dtype: str = _DTYPE,
    image_column: str = _IMAGE_COLUMN,
    label_column: str = _LABEL_COLUMN,
    compile: bool = _COMPILE,
    batch_size: int = _BATCH,
    workers: int | None = _WORKERS,
    device: str = _DEVICE,
    overwrite: bool = _OVERWRITE,
    strict: bool = _STRICT,
    quiet: bool = _QUIET,
) -> None:
    """Encode images to token grids: OUTPUT/<relative path>.npy shaped (heads, h, w); a training
    set to safetensors shards with --layout shards.

    A rerun skips finished outputs; --overwrite redoes them.

    Unreadable inputs are reported and skipped; the run encodes the rest, then exits 1.
    """
    from optvq_cli import sources
    from optvq_cli.tokenize import pipeline as codec

    if layout not in _LAYOUTS:
        fatal(f"--layout {layout}: use one of {', '.join(_LAYOUTS)}")
    columns = sources.SourceOptions(image_column=image_column, label_column=label_column)
    if layout == "shards":
        if pack or strict:
            fatal("--layout shards: --pack and --strict do not apply (a shard is the unit; failures are listed)")
        shards = dict(shard_size=shard_size, views=views, labels=labels, retry_failed=retry_failed, dtype=dtype)
        shards["source_options"] = columns
        common = dict(size=size, assign=assign, batch_size=batch_size, workers=workers, overwrite=overwrite)
        return _encode_shards(input, output, model, revision, device, quiet, shards, common, compile)
    if layout == "packed":
        pack = True
    if (views, labels, retry_failed, dtype) != ("center", None, False, "fp32"):
        fatal("--views, --labels, --retry-failed and --dtype need --layout shards")
    with _interruptible():
        codec.check_options(assign, pack, not no_crop)
        sources.check(input, exclude=[output], options=columns)  # before the slow model load
        codec.check_output_path(output)
        codec.refuse_if_busy(output)  # at once, not after the model load
        m = _load(model, revision, device, compile)
        opts = dict(size=size, crop=not no_crop, assign=assign, pack=pack, batch_size=batch_size, workers=workers)
        with _progress("encoding", quiet) as (on_progress, on_failure):
            summary = codec.encode(
                m, input, output, model_ref=codec.canonical_ref(model), revision=revision, **opts,
                overwrite=overwrite, strict=strict, source_options=columns, on_progress=on_progress,
                on_failure=on_failure,
            )  # fmt: skip
    _report(summary, "encoded")


def _encode_shards(input: Path, output: Path, ref: str, revision, device: str, quiet: bool, shards, common, compile):
    """`encode --layout shards`: the dataset-scale job (every torchrun process runs it)."""
    import os

    from optvq_cli import sources
    from optvq_cli.core import dist
    from optvq_cli.tokenize import extract
    from optvq_cli.tokenize import pipeline as codec

    main = os.environ.get("RANK", "0") == "0"
    with _interruptible():
        extract.check_shard_options(
            shard_size=shards["shard_size"], views=shards["views"], assign=common["assign"], labels=shards["labels"],
            batch_size=common["batch_size"], workers=common["workers"],
        )  # fmt: skip
        sources.check(input, exclude=[output], options=shards["source_options"])
        m = _load(ref, revision, str(dist.device_for(device)), compile)
        with _progress("encoding", quiet or not main) as (on_progress, on_failure):
            summary = extract.encode_shards(
                m, input, output, **shards, **common, model_ref=codec.canonical_ref(ref), revision=revision,
                progress=on_progress, on_failure=on_failure,
            )  # fmt: skip
    if main:
        _report(summary, "encoded", retry="rerun with --retry-failed to encode only those again")
    elif summary.failed:
        raise typer.Exit(1)


@app.command()
def decode(
    tokens: Path = typer.Argument(..., help="A .npy token file, a folder of them, or a packed tokens.npy."),
    output: Path = typer.Argument(..., help="Folder for the PNGs (names mirror the token files)."),
    model: str | None = _model_option(None),
    revision: str | None = _REVISION,
    batch_size: int = _BATCH,
    workers: int | None = typer.Option(
        None, "--workers", "-j", min=0, help="PNG writer threads (default: CPU cores - 1, at most 8)."
    ),
    device: str = _DEVICE,
    overwrite: bool = _OVERWRITE,
    strict: bool = _STRICT,
    quiet: bool = _QUIET,
) -> None:
    """Decode token grids to PNG images.

    Each file is checked first: integer dtype, shape, heads, every index in [0, n).

    With a manifest.json, only the files it lists are decoded; names must stay inside OUTPUT.

    OUTPUT/manifest.json lists the PNGs written: a rerun skips those made from the same token files.

    A bad file is reported in one line and skipped; the run decodes the rest, then exits 1.
    """
    from optvq_cli.tokenize import pipeline as codec

    with _interruptible():
        codec.check_tokens_input(tokens)  # before the slow model load
        codec.check_output_path(output)
        codec.refuse_if_busy(output)  # at once, not after the model load
        recorded_in = None
        if model is None:
            recorded = codec.tokens_model(tokens)
            if recorded:
                (model, revision), recorded_in = recorded, codec.manifest_path(tokens)
            else:
                model = DEFAULT_MODEL
        m = _load(model, revision, device, recorded_in=recorded_in)
        with _progress("decoding", quiet) as (on_progress, on_failure):
            summary = codec.decode(
                m,
                tokens,
                output,
                model_ref=codec.canonical_ref(model),
                revision=revision,
                batch_size=batch_size,
                workers=workers,
                overwrite=overwrite,
                strict=strict,
                on_progress=on_progress,
                on_failure=on_failure,
            )
    _report(summary, "decoded")


@app.command()
def reconstruct(
    input: Path = typer.Argument(..., help=_INPUT_HELP),
    output: Path = typer.Argument(..., help="Folder for the reconstructed PNGs."),
    model: str = _model_option(DEFAULT_MODEL),
    revision: str | None = _REVISION,
    size: int | None = _SIZE,
    no_crop: bool = _NO_CROP,
    assign: str = _ASSIGN,
    side_by_side: bool = typer.Option(False, "--side-by-side", help="Write original | reconstruction."),
    image_column: str = _IMAGE_COLUMN,
    batch_size: int = _BATCH,
    workers: int | None = _WORKERS,
    device: str = _DEVICE,
    overwrite: bool = _OVERWRITE,
    strict: bool = _STRICT,
    quiet: bool = _QUIET,
) -> None:
    """Encode and decode in one pass; prints the mean RGB PSNR against the preprocessed inputs.

    OUTPUT must lie outside INPUT.

    OUTPUT/manifest.json records the model and settings: a rerun with others needs --overwrite.
    """
    from optvq_cli import sources
    from optvq_cli.tokenize import pipeline as codec

    columns = sources.SourceOptions(image_column=image_column)
    with _interruptible():
        codec.check_options(assign)
        sources.check(input, exclude=[output], options=columns)  # before the slow model load
        codec.check_output_path(output)
        codec.refuse_if_busy(output)  # at once, not after the model load
        m = _load(model, revision, device)
        with _progress("reconstructing", quiet) as (on_progress, on_failure):
            summary = codec.reconstruct(
                m,
                input,
                output,
                model_ref=codec.canonical_ref(model),
                revision=revision,
                size=size,
                crop=not no_crop,
                assign=assign,
                side_by_side=side_by_side,
                batch_size=batch_size,
                workers=workers,
                overwrite=overwrite,
                strict=strict,
                source_options=columns,
                on_progress=on_progress,
                on_failure=on_failure,
            )
    _report(summary, "reconstructed")
