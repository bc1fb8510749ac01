"""optvq: an image tokenizer built on OptVQ (Zhang et al., "Preventing Local Pitfalls in Vector
Quantization via Optimal Transport")."""

from .model.assign import nearest_assign, sinkhorn_assign
from .model.quantizer import OptVQuantizer, codebook_stats

__version__ = "0.1.0"
__all__ = ["OptVQuantizer", "codebook_stats", "nearest_assign", "sinkhorn_assign", "__version__"]
