"""optvq: an image tokenizer built on OptVQ (Zhang et al., "Preventing Local Pitfalls in Vector
Quantization via Optimal Transport")."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from optvq_cli.core import __version__

# The public API, imported on first use so `optvq --help` does not pay for importing torch.
_EXPORTS = {
    "sinkhorn_assign": "optvq_cli.quant.assign",
    "nearest_assign": "optvq_cli.quant.assign",
    "OptVQuantizer": "optvq_cli.quant.quantizer",
    "codebook_stats": "optvq_cli.quant.quantizer",
    "OptVQModel": "optvq_cli.model.optvq",
    "ModelConfig": "optvq_cli.model.optvq",
    "TokenDataset": "optvq_cli.tokenize.dataset",
}
__all__ = [
    "ModelConfig",
    "OptVQModel",
    "OptVQuantizer",
    "TokenDataset",
    "codebook_stats",
    "nearest_assign",
    "sinkhorn_assign",
    "__version__",
]

if TYPE_CHECKING:
    from optvq_cli.model.optvq import ModelConfig, OptVQModel
    from optvq_cli.quant.assign import nearest_assign, sinkhorn_assign
    from optvq_cli.quant.quantizer import OptVQuantizer, codebook_stats
    from optvq_cli.tokenize.dataset import TokenDataset


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
