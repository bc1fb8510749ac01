"""The quantization math: Sinkhorn and nearest assignment as pure functions (assign), and the
multi-head quantizer module over one shared codebook (quantizer). Imports nothing else of optvq."""

# The token assignments: nearest code (vanilla VQ, Eq. 1) or the Sinkhorn plan (OptVQ, Alg. 1).
ASSIGN_MODES = ("nearest", "sinkhorn")
