"""`optvq train`: train a tokenizer with the paper's recipe, or continue a run (--resume)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from optvq_cli.cli.app import app, console, fatal
from optvq_cli.cli.progress import ProgressBar

_QUANTIZERS = ("optvq", "vq")


def _say(message: str) -> None:
    console.print(message, highlight=False, soft_wrap=True, markup=False)


@app.command()
def train(
    preset: str = typer.Option(
        None,
        "--preset",
        "-p",
        help="Model and recipe: mnist, cifar10, imagenet-f16-h4, imagenet-f16-h8, tiny, tiny-vqgan.",
    ),
    data: str = typer.Option(
        None, "--data", "-d", help="Training data: an image folder (recursive), MNIST idx files or CIFAR-10 batches."
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Run directory: config, checkpoints, metrics, final model."),
    config: Path = typer.Option(None, "--config", "-c", help="A YAML or TOML file of config keys."),
    set_: list[str] = typer.Option(
        [], "--set", "-s", help="Override one config key, e.g. --set optim.lr=1e-4 (repeatable)."
    ),
    quantizer: str = typer.Option(None, "--quantizer", help="optvq (Sinkhorn, the paper) or vq (nearest baseline)."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Passes over the training set."),
    steps: int = typer.Option(
        None,
        "--steps",
        min=1,
        help="Optimizer steps in all (overrides --epochs); with --resume, extends a run to this length.",
    ),
    batch_size: int = typer.Option(None, "--batch-size", "-b", min=1, help="Global batch size per step."),
    seed: int = typer.Option(None, "--seed", help="Random seed (weights, data order, augmentation)."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this directory from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in a non-empty --out directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or log lines, errors only."),
) -> None:
    """Train a tokenizer: `optvq train --preset mnist --data DIR --out RUN`; multi-GPU with
    `torchrun --nproc_per_node N -m optvq_cli train ...`; continue with `--resume RUN`."""
    from optvq_cli.core.errors import UserError
    from optvq_cli.train.config import load_run_config, parse_sets, read_config_file, resolve_config

    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        if resume is not None:
            changed = {
                "--preset": preset,
                "--out": out,
                "--config": config,
                "--set": set_ or None,
                "--quantizer": quantizer,
                "--batch-size": batch_size,
                "--seed": seed,
            }
            given = [flag for flag, v in changed.items() if v is not None]
            if given:
                fatal(
                    f"--resume continues {resume} with its saved config; {', '.join(given)} cannot change it "
                    "(only --data, --device, and --steps / --epochs to extend it, can)"
                )
            cfg = load_run_config(resume)
            if steps is not None or epochs is not None:  # extend the schedule to the new length
                cfg.steps, cfg.epochs = steps, epochs if epochs is not None else cfg.epochs
            if data is not None:
                cfg.data.path = data
            if device is not None:
                cfg.device = device
            run_dir = resume
        else:
            if out is None:
                fatal("no run directory: pass --out RUN_DIR (or --resume RUN_DIR to continue one)")
            if quantizer is not None and quantizer not in _QUANTIZERS:
                fatal(f"--quantizer {quantizer}: use optvq or vq")
            cli: dict = {}
            for key, value in (
                ("epochs", epochs),
                ("steps", steps),
                ("batch_size", batch_size),
                ("seed", seed),
                ("device", device),
            ):
                if value is not None:
                    cli[key] = value
            if data is not None:
                cli["data"] = {"path": data}
            if quantizer is not None:
                cli["quantizer"] = {"method": quantizer}
            file = read_config_file(config) if config is not None else {}
            cfg = resolve_config(preset, file, parse_sets(set_), cli)
            run_dir = out
        from optvq_cli.train.loop import format_summary
        from optvq_cli.train.loop import train as run_training

        log = _say if not quiet else lambda m: None
        with ProgressBar("train", console, unit="steps", enabled=not quiet and is_main and console.is_terminal) as bar:
            progress = bar.update if bar.enabled else None
            result = run_training(
                cfg, run_dir, resume=resume is not None, overwrite=overwrite, log=log, progress=progress
            )
    except UserError as e:
        if is_main:
            fatal(str(e))
        raise typer.Exit(1) from None
    if is_main and not quiet:
        _say(format_summary(result))
    if result.status == "interrupted":
        if is_main and quiet:  # the one line --quiet still prints: how to continue
            _say(f"stopped at step {result.step}/{result.total_steps}; continue with --resume {result.run_dir}")
        raise typer.Exit(130)
