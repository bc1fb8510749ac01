"""The ``optvq`` command line: each command lives in its own module and only wires the library."""

from __future__ import annotations

import typer

from optvq_cli import __version__
from optvq_cli.cli import encode, eval, export, toy, train, weights  # noqa: F401  (registers the commands)
from optvq_cli.cli.app import app, error_line
from optvq_cli.core.errors import first_line


def _version(value: bool) -> None:
    if value:
        typer.echo(f"optvq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    sinkhorn_chunk: int = typer.Option(
        None,
        "--sinkhorn-chunk",
        min=1,
        help="Stream the Sinkhorn assignment in blocks of N rows (never holds the l x n matrix); "
        "by default it streams only above 2 GiB.",
    ),
) -> None:
    """OptVQ image tokenizer."""
    if sinkhorn_chunk:
        from optvq_cli.quant import assign

        assign.STREAM_CHUNK = sinkhorn_chunk


def main() -> None:
    """Run the CLI. A library error (ValueError, OSError, MemoryError) becomes one ``error:`` line
    and exit 1; ``OPTVQ_DEBUG=1`` shows the traceback instead."""
    import os

    if os.environ.get("OPTVQ_DEBUG", "").strip().lower() in {"1", "on", "yes", "true"}:
        app()
        return
    try:
        app()
    except ValueError as e:  # bad input raised below the CLI: its message names the file and the fix
        error_line(first_line(e))
        raise SystemExit(1) from None
    except OSError as e:  # a path that cannot be written or read (permissions, a file as folder)
        if e.filename:
            error_line(f"{e.filename}: {e.strerror or first_line(e)}; check the path and its permissions")
        else:
            error_line(first_line(e))
        raise SystemExit(1) from None
    except MemoryError:
        error_line("out of memory: lower --batch-size (or the image size) and run again")
        raise SystemExit(1) from None
