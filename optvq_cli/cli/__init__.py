"""The ``optvq`` command line: each command lives in its own module and only wires the library."""

from __future__ import annotations

import typer

from optvq_cli import __version__
from optvq_cli.cli import encode, eval, export, toy, train, weights  # noqa: F401  (registers the commands)
from optvq_cli.cli.app import app, error_line
from optvq_cli.core.errors import UserError


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
    try:
        app()
    except UserError as e:  # a user's mistake raised below the CLI: one line, exit 1
        error_line(str(e))
        raise SystemExit(1) from None
    except OSError as e:  # a path the user gave that cannot be written or read (permissions, a file as folder)
        where = f"{e.filename}: " if e.filename else ""
        error_line(f"{where}{e.strerror or e}; check the path and its permissions")
        raise SystemExit(1) from None
