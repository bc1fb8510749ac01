"""The run folder of `optvq train`: its layout, checkpoint folders (written whole or not at all)
and ``metrics.jsonl``. What a checkpoint's training state holds is ``state.py``'s.

    RUN/train_config.yaml   RUN/metrics.jsonl   RUN/samples/step-N.png   RUN/tensorboard/
    RUN/checkpoints/step-N/{model.safetensors, config.json, discriminator.safetensors,
                            ema.safetensors, training_state.pt}
    RUN/model/              the final model
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import atomic_write, atomic_write_text, write_safetensors
from optvq_cli.core.lock import LOCK_NAME
from optvq_cli.model import save_model
from optvq_cli.train.config import CONFIG_FILE

METRICS_FILE = "metrics.jsonl"
CKPT_DIR = "checkpoints"
MODEL_DIR = "model"
SAMPLES_DIR = "samples"
TB_DIR = "tensorboard"
STATE_FILE = "training_state.pt"
DISC_FILE = "discriminator.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FORMAT = "optvq-training-state"  # with "optvq_format": STATE_VERSION, as every optvq file
STATE_VERSION = 1


def ckpt_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. A checkpoint folder appears by one rename once all of it
    is written, so a run killed while saving leaves only a ``.tmp-*`` folder behind."""
    root = Path(run_dir) / CKPT_DIR
    out = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file():
                try:
                    out.append((int(p.name[5:]), p))
                except ValueError:
                    continue
    return sorted(out)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run folder that cannot be used, before anything is written."""
    if resume:
        if not list_checkpoints(run_dir):
            raise UserError(f"--resume {run_dir}: no checkpoint inside ({run_dir}/{CKPT_DIR}/step-*/); start a new run")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir}: is a file; give a folder for the run")
    if run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir()) and not overwrite:
        raise UserError(
            f"--out {run_dir} is not empty: continue it with --resume {run_dir}, or pass --overwrite to start over"
        )


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """Make the folder ready once start-up has succeeded: drop what a killed save left, or (a new
    run with --overwrite) the files of the earlier run; files optvq did not write stay."""
    if resume:
        for p in (run_dir / CKPT_DIR).glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        return
    for name in (CKPT_DIR, MODEL_DIR, SAMPLES_DIR, TB_DIR):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in (METRICS_FILE, CONFIG_FILE):
        (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def write_checkpoint(run_dir: Path, step: int, parts: dict[str, Any], keep: int, metadata: dict[str, Any]) -> Path:
    """Write checkpoints/step-N/ (model dir + discriminator / EMA safetensors + training state)
    under a temporary name, then rename it into place; keep the newest ``keep``."""
    root = run_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / ckpt_name(step)
    if final.is_dir() and (final / STATE_FILE).is_file():
        return final  # this step is saved already (a signal right after a periodic save)
    tmp = root / f".tmp-{ckpt_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(parts["model"], tmp, metadata=metadata)
    for name, file in (("disc", DISC_FILE), ("ema", EMA_FILE)):
        if parts.get(name) is not None:
            write_safetensors(tmp / file, parts[name].state_dict())
    atomic_write(tmp / STATE_FILE, lambda p: torch.save(parts["state"], p))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(run_dir)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The tensors and training state of a checkpoint folder; the state through
    ``torch.load(weights_only=True)`` (no code can run from the file)."""
    from safetensors.torch import load_file

    from optvq_cli.model.checkpoint import WEIGHTS_NAME

    try:
        out: dict[str, Any] = {"model": load_file(str(path / WEIGHTS_NAME))}
        for name, file in (("disc", DISC_FILE), ("ema", EMA_FILE)):
            out[name] = load_file(str(path / file)) if (path / file).is_file() else None
        out["state"] = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint: one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: cannot read the checkpoint ({first}); delete it to use an older one") from None
    version = _state_version(out["state"])
    if version != STATE_VERSION:
        raise UserError(f"{path}: training state format {version}, this optvq reads {STATE_VERSION}")
    return out


def _state_version(state: dict) -> object:
    """The training state's format version; earlier saves wrote it as a bare ``"format": 1``."""
    if state.get("format") == STATE_FORMAT:
        return state.get("optvq_format")
    return state.get("format")


class MetricsLog:
    """``metrics.jsonl`` (one JSON object a line) and, when enabled, TensorBoard scalars."""

    def __init__(self, run_dir: Path, tensorboard: str, enabled: bool):
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / TB_DIR))
            except ImportError:
                if tensorboard == "on":
                    raise UserError(
                        "tensorboard=on but tensorboard is not installed: pip install tensorboard"
                    ) from None

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (written after the checkpoint a resume starts from)."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        atomic_write_text(self.path, "\n".join(keep) + "\n" if keep else "")

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            split = row.get("split", "train")
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "split"):
                    self.tb.add_scalar(f"{split}/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
