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


_PRESET = typer.Option(
    None,
    "--preset",
    "-p",
    help="Model and recipe: mnist, cifar10, photo, imagenet-f16-h4, imagenet-f16-h8, tiny, tiny-vqgan.",
)
_DATA = typer.Option(
    None,
    "--data",
    "-d",
    help="Training data: an image folder (recursive), tar shards (a .tar, a folder of them, a brace pattern, "
    "ImageNet's nested tar), Parquet files (columns: data.image_column / data.label_column), MNIST idx files "
    "or CIFAR-10 batches.",
)
_OUT = typer.Option(None, "--out", "-o", help="Run directory: config, checkpoints, metrics, final model.")
_CONFIG = typer.Option(None, "--config", "-c", help="A YAML or TOML file of config keys.")
_SET = typer.Option([], "--set", "-s", help="Override one config key, e.g. --set optim.lr=1e-4 (repeatable).")
_QUANTIZER = typer.Option(None, "--quantizer", help="optvq (Sinkhorn, the paper) or vq (nearest baseline).")
_EPOCHS = typer.Option(None, "--epochs", min=1, help="Passes over the training set.")
_STEPS = typer.Option(
    None,
    "--steps",
    min=1,
    help="Optimizer steps in all (overrides --epochs); with --resume, extends a run to this length.",
)
_BATCH_SIZE = typer.Option(None, "--batch-size", "-b", min=1, help="Global batch size per step.")
_SEED = typer.Option(None, "--seed", help="Random seed (weights, data order, augmentation).")
_DEVICE = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N.")
_RESUME = typer.Option(None, "--resume", help="Continue the run in this directory from its last checkpoint.")
_OVERWRITE = typer.Option(False, "--overwrite", help="Start over in a non-empty --out directory.")
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar or log lines, errors only.")


@app.command()
def train(
    preset: str = _PRESET,
    data: str = _DATA,
    out: Path = _OUT,
    config: Path = _CONFIG,
    set_: list[str] = _SET,
    quantizer: str = _QUANTIZER,
    epochs: int = _EPOCHS,
    steps: int = _STEPS,
    batch_size: int = _BATCH_SIZE,
    seed: int = _SEED,
    device: str = _DEVICE,
    resume: Path = _RESUME,
    overwrite: bool = _OVERWRITE,
    quiet: bool = _QUIET,
) -> None:
    """Train a tokenizer: `optvq train --preset mnist --data DIR --out RUN`; multi-GPU with
    `torchrun --nproc_per_node N -m optvq_cli train ...`; continue with `--resume RUN`."""
    from optvq_cli.core.errors import UserError

    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        if resume is not None:
            refused = {"--preset": preset, "--out": out, "--config": config, "--set": set_ or None}
            refused.update({"--quantizer": quantizer, "--batch-size": batch_size, "--seed": seed})
            cfg = _resumed_config(resume, refused, steps, epochs, data, device)
            run_dir = resume
        else:
            if out is None:
                fatal("no run directory: pass --out RUN_DIR (or --resume RUN_DIR to continue one)")
            flags = {"epochs": epochs, "steps": steps, "batch_size": batch_size, "seed": seed, "device": device}
            cfg = _new_config(preset, config, set_, quantizer, data, flags)
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


def _resumed_config(resume: Path, refused: dict, steps, epochs, data, device):
    """The run's saved config; only the data path, the device and the length may change."""
    from optvq_cli.train.config import load_run_config

    given = [flag for flag, v in refused.items() if v is not None]
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
    return cfg


def _new_config(preset, config: Path | None, sets: list[str], quantizer, data, flags: dict):
    """preset < --config < --set < the command's flags."""
    from optvq_cli.train.config import parse_sets, read_config_file, resolve_config

    if quantizer is not None and quantizer not in _QUANTIZERS:
        fatal(f"--quantizer {quantizer}: use optvq or vq")
    cli: dict = {k: v for k, v in flags.items() if v is not None}
    if data is not None:
        cli["data"] = {"path": data}
    if quantizer is not None:
        cli["quantizer"] = {"method": quantizer}
    file = read_config_file(config) if config is not None else {}
    return resolve_config(preset, file, parse_sets(sets), cli)
