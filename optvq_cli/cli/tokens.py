"""`optvq tokens info|verify|export`: what an encode OUTPUT holds, whether all of it reads back, and
its rows as one Parquet or WebDataset file."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from optvq_cli.cli.app import app, console, fatal

tokens_app = typer.Typer(
    name="tokens", help="Inspect, check and export an `optvq encode` OUTPUT.", no_args_is_help=True
)
app.add_typer(tokens_app, name="tokens")


@tokens_app.command()
def info(
    path: Path = typer.Argument(..., help="The OUTPUT folder of `optvq encode`."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Layout, images and rows, shards, views, labels, model and failures of an encode OUTPUT."""
    from optvq_cli.tokenize.dataset import describe_output

    d = describe_output(path)
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    model = d["model"]
    lines = [
        f"{d['path']}: {d['layout']} layout, {d['images']} images, {d['rows']} rows",
        *([f"shards: {d['shards']}"] if d["shards"] is not None else []),
        f"views: {', '.join(d['views'])}",
        f"labels: {d['classes']} classes ({d['labels']})" if d["classes"] else f"labels: {d['labels']}",
        f"model: {model.get('ref')} (sha256 {str(model.get('sha256'))[:12]}), "
        f"{model.get('heads')} heads x {model.get('n_codes')} codes; assignment {d['assign']}",
        f"failures: {d['failures']}",
    ]
    typer.echo("\n".join(lines))


@tokens_app.command()
def verify(path: Path = typer.Argument(..., help="The OUTPUT folder of `optvq encode`.")) -> None:
    """Read every shard or token file back: readable, every index inside the codebook, counts as
    the index says. Exit 1 listing each problem, 0 when all is well."""
    from optvq_cli.tokenize.dataset import describe_output, verify_output

    problems = verify_output(path)
    for p in problems[:50]:
        console.print(f"[red]bad[/] {p}", highlight=False, soft_wrap=True)
    if problems:
        fatal(f"{path}: {len(problems)} problem(s); encode the affected images again (--overwrite)")
    d = describe_output(path)
    typer.echo(f"ok: {d['rows']} rows in {d['path']} read back, every index inside the codebook")


@tokens_app.command()
def export(
    tokens: Path = typer.Argument(..., help="The OUTPUT folder of `optvq encode`."),
    out: Path = typer.Argument(..., help="The file to write: NAME.parquet, or NAME.tar for --format webdataset."),
    format: str = typer.Option("parquet", "--format", help="parquet (datasets, pandas, polars) or webdataset."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT when an earlier export wrote it."),
    push_to_hub: str = typer.Option(
        None, "--push-to-hub", help="Then upload OUT to this Hugging Face dataset repository (ORG/NAME)."
    ),
) -> None:
    """Write the token rows (tokens as a fixed-size integer list, label, path, view) as one file
    generator code loads without optvq; optionally upload it as a Hugging Face dataset."""
    from optvq_cli.tokenize.export_tokens import check_export, export_tokens
    from optvq_cli.tokenize.export_tokens import push_to_hub as push

    check_export(tokens, out, format, overwrite, push_to_hub)
    done = export_tokens(tokens, out, format, overwrite)
    typer.echo(f"{done['file']}: {done['rows']} rows, tokens {'x'.join(map(str, done['shape']))}")
    if push_to_hub:
        typer.echo(f"uploaded to {push(out, push_to_hub, format)}")
