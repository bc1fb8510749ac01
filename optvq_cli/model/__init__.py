"""OptVQ models: the architectures, the quantizer, checkpoints and the ways to name a model."""

from optvq_cli.model.checkpoint import convert_upstream, load_model, locate, save_model
from optvq_cli.model.optvq import PRESETS, ModelConfig, OptVQModel, build_model

__all__ = [
    "PRESETS",
    "ModelConfig",
    "OptVQModel",
    "build_model",
    "convert_upstream",
    "load_model",
    "locate",
    "save_model",
]
