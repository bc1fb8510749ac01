"""OptVQ models: the config and the model class (optvq), the architectures (vqgan, plain_cnn),
loading and saving them (checkpoint) and exporting them (export)."""

from optvq_cli.model.checkpoint import convert_upstream, load_model, locate, save_model
from optvq_cli.model.optvq import PRESETS, ModelConfig, OptVQModel, Provenance, build_model

__all__ = [
    "PRESETS",
    "ModelConfig",
    "OptVQModel",
    "Provenance",
    "build_model",
    "convert_upstream",
    "load_model",
    "locate",
    "save_model",
]
