"""The quantization math: Sinkhorn and nearest assignment as pure functions (assign), and the
multi-head quantizer module over one shared codebook (quantizer). Imports nothing else of optvq."""
