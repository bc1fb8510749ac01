"""OptVQ models: the config (config) and the model class (optvq), the architectures (vqgan,
plain_cnn), loading and saving them (checkpoint) and exporting them (export)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optvq_cli.model import checkpoint
from optvq_cli.model.checkpoint import locate, save_model
from optvq_cli.model.config import PRESETS, ModelConfig, Provenance
from optvq_cli.model.optvq import OptVQModel, build_model

__all__ = [
    "PRESETS",
    "ModelConfig",
    "OptVQModel",
    "Provenance",
    "build_model",
    "convert_upstream",
    "load_located",
    "load_model",
    "locate",
    "save_model",
]


def load_model(ref: str | Path, device: Any = "auto", revision: str | None = None, dtype: Any = None) -> OptVQModel:
    """The model a reference names (see ``checkpoint.load_model``); ``OptVQModel.from_pretrained``."""
    return checkpoint.load_model(OptVQModel, ref, device, revision, dtype)


def load_located(located: checkpoint.Located, device: Any = "auto", dtype: Any = None) -> OptVQModel:
    return checkpoint.load_located(OptVQModel, located, device, dtype)


def convert_upstream(path: str | Path, **quantizer: Any) -> OptVQModel:
    """An OptVQModel from the authors' training checkpoint (see ``checkpoint.convert_upstream``)."""
    return checkpoint.convert_upstream(OptVQModel, path, **quantizer)
