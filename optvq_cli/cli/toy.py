"""`optvq toy`: the paper's 2-D experiment (Fig. 6) and Sinkhorn convergence (Fig. 9), as figures."""

from __future__ import annotations

from pathlib import Path

import typer

from optvq_cli.cli.app import app, console, fatal

FIG6_PNG = "fig6_toy.png"
FIG6_GIF = "fig6_toy.gif"
FIG9_PNG = "fig9_sinkhorn.png"


def _targets(out: Path, gif: bool) -> list[Path]:
    names = [FIG6_PNG, FIG9_PNG] + ([FIG6_GIF] if gif else [])
    return [out / name for name in names]


def _prepare_out(out: Path, targets: list[Path], overwrite: bool) -> None:
    """Checks every target before any work, so a refusal costs nothing and writes nothing."""
    if out.exists() and not out.is_dir():
        fatal(f"--out {out} is a file, not a folder; choose another --out")
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        fatal(f"{existing[0]} already exists; pass --overwrite to replace it or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fatal(f"cannot create --out {out}: {e.strerror}; choose another --out")


@app.command()
def toy(
    out: Path = typer.Option(Path("toy-out"), "--out", help="Folder for the figures (created if missing)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for the random points and codes."),
    steps: int = typer.Option(200, "--steps", min=1, help="Training steps for each code table."),
    gif: bool = typer.Option(False, "--gif", help=f"Also write the animated {FIG6_GIF}."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace figures already in --out."),
) -> None:
    """The paper's 2-D experiment (Fig. 6) and Sinkhorn convergence (Fig. 9).

    Trains 25 random codes on 100 random points by the commitment loss, with vanilla VQ and with OptVQ.

    Writes fig6_toy.png and fig9_sinkhorn.png (fig6_toy.gif with --gif); prints each method's code usage.
    """
    targets = _targets(out, gif)
    _prepare_out(out, targets, overwrite)
    if overwrite and not gif:  # an earlier --gif run's animation would no longer match the new figures
        (out / FIG6_GIF).unlink(missing_ok=True)

    from rich.console import Console
    from rich.table import Table

    from optvq_cli import toy as lib

    with console.status("training the two code tables..."):
        result = lib.run_toy(seed=seed, steps=steps)
        plans = lib.sinkhorn_convergence(seed=seed)
        try:
            lib.save_png(lib.fig6_figure(result), targets[0])
            lib.save_png(lib.fig9_figure(plans), targets[1])
            if gif:
                lib.save_gif(result, targets[2])
        except OSError as e:
            fatal(f"cannot write into --out {out}: {e.strerror or e}; choose another --out")

    table = Table(title=f"Fig. 6: {lib.N_POINTS} points, {lib.N_CODES} codes, seed {seed}")
    table.add_column("method")
    table.add_column("codes used, step 0", justify="right")
    table.add_column(f"codes used, step {steps}", justify="right")
    table.add_column("commitment loss", justify="right")
    for run in (result.vq, result.optvq):
        n = run.n_codes
        table.add_row(run.method, f"{run.usage[0]}/{n}", f"{run.final_usage}/{n}", f"{run.loss[-1]:.3f}")
    stdout = Console(highlight=False, markup=False, soft_wrap=True)  # paths verbatim, on one line
    stdout.print(table)
    stdout.print(
        f"{result.vq.method}: {result.vq.final_usage}/{result.vq.n_codes} codes used; "
        f"{result.optvq.method}: {result.optvq.final_usage}/{result.optvq.n_codes} codes used"
    )
    changes = lib.plan_errors(plans)["change"]
    stdout.print(
        f"Fig. 9: max change of l*A^t: {changes[1]:.3g} at iteration 1, "
        f"{changes[lib.SINKHORN_ITERS]:.3g} at iteration {lib.SINKHORN_ITERS}"
    )
    for path in targets:
        stdout.print(f"wrote {path}")
