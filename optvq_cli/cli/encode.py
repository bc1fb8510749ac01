"""`optvq encode / decode / reconstruct`: images to token grids and back. Thin: parse, call
``optvq_cli.codec``, report."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from .app import app, console, fatal

DEFAULT_MODEL = "default"  # = codec.DEFAULT_MODEL (a test checks); repeated so --help skips numpy and Pillow

_MODEL_HELP = "Model: a bundled name, a local folder, or a Hugging Face repo id."


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
_OVERWRITE = typer.Option(False, "--overwrite", help="Redo outputs that exist (and replace another model's).")
_STRICT = typer.Option(False, "--strict", help="Stop at the first bad input instead of skipping it.")


def _require(path: Path, what: str) -> None:
    """A missing INPUT is reported before the (slow) model load."""
    if not path.exists():
        fatal(f"{path}: no such file or folder; give {what}")


def _load(ref: str, revision: str | None, device: str) -> Any:
    from ..model import load_model

    with console.status(f"loading model {ref}..."):
        return load_model(ref, device=device, revision=revision)


@contextlib.contextmanager
def _progress(verb: str) -> Iterator[tuple[Any, Any]]:
    """A rich progress bar on stderr with images/s and ETA; yields (on_progress, on_failure)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    class Rate(TextColumn):
        def __init__(self) -> None:
            super().__init__("")

        def render(self, task: Any) -> Any:
            from rich.text import Text

            return Text(f"{task.speed:.1f} img/s" if task.speed else "-- img/s")

    bar = Progress(
        TextColumn(f"{verb}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )
    task = bar.add_task(verb, total=None)
    started = False

    def on_progress(done: int, total: int) -> None:
        nonlocal started
        if not started:  # drawn once work begins: an early refusal prints only its error line
            bar.start()
            started = True
        bar.update(task, completed=done, total=total)

    def on_failure(path: str, reason: str) -> None:
        bar.console.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False, soft_wrap=True)

    try:
        yield on_progress, on_failure
    finally:
        if started:
            bar.stop()


def _report(summary: Any, verb: str) -> None:
    """The summary on stdout (scripts parse it); non-zero exit when any input failed."""
    parts = [f"{verb} {summary.written} of {summary.total}"]
    if summary.skipped:
        parts.append(f"{summary.skipped} already done")
    if summary.failed:
        parts.append(f"{len(summary.failed)} failed")
    line = ", ".join(parts) + f" in {summary.seconds:.1f} s ({summary.rate:.1f} images/s) -> {summary.output}"
    typer.echo(line)
    if summary.mean_psnr is not None:
        typer.echo(f"mean PSNR {summary.mean_psnr:.2f} dB over {len(summary.psnr)} images")
    if summary.failed:
        console.print(
            f"[bold red]error:[/] {len(summary.failed)} input(s) failed (listed above); "
            "fix or remove them and rerun to finish",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)


@app.command()
def encode(
    input: Path = typer.Argument(..., help="An image, a folder of images (recursive) or a .txt list of paths."),
    output: Path = typer.Argument(..., help="Folder for the token grids and manifest.json."),
    model: str = _model_option(DEFAULT_MODEL),
    revision: str | None = _REVISION,
    size: int | None = _SIZE,
    no_crop: bool = _NO_CROP,
    assign: str = _ASSIGN,
    pack: bool = typer.Option(
        False, "--pack", help="One tokens.npy (N, heads, h, w) + paths.txt instead of one file per image."
    ),
    batch_size: int = _BATCH,
    workers: int | None = _WORKERS,
    device: str = _DEVICE,
    overwrite: bool = _OVERWRITE,
    strict: bool = _STRICT,
) -> None:
    """Encode images to token grids: OUTPUT/<relative path>.npy shaped (heads, h, w).

    A rerun skips finished outputs; --overwrite redoes them.

    Unreadable inputs are reported and skipped; the run encodes the rest, then exits 1.
    """
    from .. import codec

    _require(input, "an image, a folder of images or a .txt list")
    m = _load(model, revision, device)
    with _progress("encoding") as (on_progress, on_failure):
        summary = codec.encode(
            m,
            input,
            output,
            model_ref=codec.canonical_ref(model),
            revision=revision,
            size=size,
            crop=not no_crop,
            assign=assign,
            pack=pack,
            batch_size=batch_size,
            workers=workers,
            overwrite=overwrite,
            strict=strict,
            on_progress=on_progress,
            on_failure=on_failure,
        )
    _report(summary, "encoded")


@app.command()
def decode(
    tokens: Path = typer.Argument(..., help="A .npy token file, a folder of them, or a packed tokens.npy."),
    output: Path = typer.Argument(..., help="Folder for the PNGs (names mirror the token files)."),
    model: str | None = _model_option(None),
    revision: str | None = _REVISION,
    batch_size: int = _BATCH,
    device: str = _DEVICE,
    overwrite: bool = _OVERWRITE,
    strict: bool = _STRICT,
) -> None:
    """Decode token grids to PNG images.

    Each file is checked first: integer dtype, shape, heads, every index in [0, n).

    A bad file is reported in one line and skipped; the run decodes the rest, then exits 1.
    """
    from .. import codec

    _require(tokens, "a .npy token file or a folder of them")
    if model is None:
        recorded = codec.tokens_model(tokens)
        model, revision = recorded if recorded else (DEFAULT_MODEL, revision)
    m = _load(model, revision, device)
    with _progress("decoding") as (on_progress, on_failure):
        summary = codec.decode(
            m,
            tokens,
            output,
            batch_size=batch_size,
            overwrite=overwrite,
            strict=strict,
            on_progress=on_progress,
            on_failure=on_failure,
        )
    _report(summary, "decoded")


@app.command()
def reconstruct(
    input: Path = typer.Argument(..., help="An image, a folder of images (recursive) or a .txt list of paths."),
    output: Path = typer.Argument(..., help="Folder for the reconstructed PNGs."),
    model: str = _model_option(DEFAULT_MODEL),
    revision: str | None = _REVISION,
    size: int | None = _SIZE,
    no_crop: bool = _NO_CROP,
    assign: str = _ASSIGN,
    side_by_side: bool = typer.Option(False, "--side-by-side", help="Write original | reconstruction."),
    batch_size: int = _BATCH,
    workers: int | None = _WORKERS,
    device: str = _DEVICE,
    overwrite: bool = _OVERWRITE,
    strict: bool = _STRICT,
) -> None:
    """Encode and decode in one pass; prints the mean PSNR against the preprocessed inputs."""
    from .. import codec

    _require(input, "an image, a folder of images or a .txt list")
    m = _load(model, revision, device)
    with _progress("reconstructing") as (on_progress, on_failure):
        summary = codec.reconstruct(
            m,
            input,
            output,
            size=size,
            crop=not no_crop,
            assign=assign,
            side_by_side=side_by_side,
            batch_size=batch_size,
            workers=workers,
            overwrite=overwrite,
            strict=strict,
            on_progress=on_progress,
            on_failure=on_failure,
        )
    _report(summary, "reconstructed")
