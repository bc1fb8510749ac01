"""The ``optvq`` command line: each command lives in its own module and only wires the library."""

from __future__ import annotations

import os
import sys
import warnings

import typer
from typer import Abort

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer on the real click
    from click.exceptions import ClickException, NoArgsIsHelpError

from optvq_cli import __version__
from optvq_cli.cli import encode, eval, export, tokens, toy, train, weights  # noqa: F401  (registers the commands)
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
    """Run the CLI. A usage mistake (missing argument, unknown option, bad value) and a library error
    (ValueError, OSError, MemoryError) become one ``error:`` line and a non-zero exit;
    ``OPTVQ_DEBUG=1`` shows the traceback of a library error instead."""
    debug = os.environ.get("OPTVQ_DEBUG", "").strip().lower() in {"1", "on", "yes", "true"}
    if not debug:
        warnings.showwarning = _warning_line
    try:
        code = app(standalone_mode=False, prog_name="optvq")
    except NoArgsIsHelpError as e:
        e.show()
        code = e.exit_code
    except ClickException as e:  # typer's parsing: one line instead of a box, and where help is
        where = f"; see `{e.ctx.command_path} --help`" if getattr(e, "ctx", None) is not None else ""
        error_line(f"{e.format_message().rstrip('.')}{where}")
        code = e.exit_code
    except Abort:
        error_line("interrupted")
        code = 130
    except (ValueError, OSError, MemoryError) as e:
        if debug:
            raise
        error_line(_library_error(e))
        code = 1
    except RuntimeError as e:  # torch's allocators report running out of memory this way
        if debug or not any(s in str(e) for s in ("can't allocate memory", "out of memory")):
            raise
        error_line("out of memory: lower --batch-size (or --size) and run again")
        code = 1
    raise SystemExit(code or 0)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning (Pillow's about one file, torch's, ...) as one line on stderr, not two with source."""
    text = str(message).splitlines()[0] if str(message) else category.__name__
    print(f"warning: {text}", file=sys.stderr if file is None else file)


def _library_error(e: BaseException) -> str:
    """One line for an error raised below the CLI: its message names the file and the fix."""
    if isinstance(e, MemoryError):
        return first_line(e) if str(e) else "out of memory: lower --batch-size (or the image size) and run again"
    if isinstance(e, OSError) and e.filename:  # a path that cannot be read or written
        return f"{e.filename}: {e.strerror or first_line(e)}; check the path and its permissions"
    return first_line(e)
