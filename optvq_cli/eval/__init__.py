"""Measuring a tokenizer: PSNR / SSIM / rFID / codebook health (metrics), the perceptual
networks and their weights, and the `optvq eval` run."""
