"""The Typer app every command registers on, and the one way to fail: ``fatal``."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    name="optvq",
    help="OptVQ image tokenizer: images to token grids and back, with optimal-transport quantization.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags show no value placeholder, as they take none
)
console = Console(stderr=True)


def error_line(message: str) -> None:
    """Print ``error: message`` on stderr; the message is plain text (paths may contain brackets)."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fatal(message: str, code: int = 1) -> NoReturn:
    """One clear line on stderr and a non-zero exit: for a user's mistake, never a traceback."""
    error_line(message)
    raise typer.Exit(code)
