"""OptVQ models: the architectures, the quantizer, checkpoints and the ways to name a model."""

from .checkpoint import convert_upstream, load_model, locate, save_model
from .optvq import PRESETS, ModelConfig, OptVQModel, build_model

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
