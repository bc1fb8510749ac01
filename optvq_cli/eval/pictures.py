"""Pictures beside the eval report: the codebook-usage plot and the grid of samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import atomic_write


def save_usage_plot(counts: torch.Tensor, path: Path, title: str = "") -> None:
    """Selections per code over the data set (bars, code index order) and their histogram, like the
    paper's Fig. 10."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = counts.sum(0).numpy()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6))
    ax1.bar(np.arange(total.size), total, width=1.0, color="#3b7dd8")
    ax1.set_xlabel("code index")
    ax1.set_ylabel("times selected")
    ax1.set_xlim(-0.5, total.size - 0.5)
    ax1.set_title(title or f"codebook usage: {int((total > 0).sum())}/{total.size} codes used")
    ax2.hist(total, bins=min(100, max(10, int(total.max()) + 1)), color="#d8823b")
    ax2.set_xlabel("times selected")
    ax2.set_ylabel("number of codes")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def save_sample_grid(samples: list[tuple[torch.Tensor, torch.Tensor]], path: Path, pad: int = 2) -> None:
    """Originals (top row) above their reconstructions (bottom row), as one PNG; images of their
    own sizes sit top-left in cells of the largest one."""
    if not samples:
        raise UserError("--samples: no images were evaluated")
    c = samples[0][0].shape[0]
    h = max(a.shape[1] for a, _ in samples)
    w = max(a.shape[2] for a, _ in samples)
    n = len(samples)
    grid = np.full((2 * h + 3 * pad, n * w + (n + 1) * pad, c), 255, dtype=np.uint8)
    for j, (a, b) in enumerate(samples):
        for row, img in enumerate((a, b)):
            arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            y0, x0 = pad + row * (h + pad), pad + j * (w + pad)
            grid[y0 : y0 + arr.shape[0], x0 : x0 + arr.shape[1]] = arr
    image = Image.fromarray(grid[:, :, 0] if c == 1 else grid)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
