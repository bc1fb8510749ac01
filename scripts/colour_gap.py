"""Where a model's colour error lies: PSNR-RGB, PSNR-Y (eval's BT.601 studio-swing luma) and their
gap, for the model's reconstructions and for references with no colour shift.

python scripts/colour_gap.py FOLDER [--model default] [--size 256]

Rows (means over the images, each at the model's protocol: centre square resized to --size):
- model: the reconstructions (nearest assignment, rounded to 8 bits as the PNGs are);
- model, original chroma: the reconstruction's luma with the original's Cb/Cr (JPEG's full-range
  YCbCr): the gap that luma error alone leaves;
- model, original luma: the original's luma with the reconstruction's Cb/Cr: its chroma error alone;
- gaussian blur 1 px: the original blurred, a loss of detail with no colour shift.
The colour shift column is the mean over images of |mean Cb error| + |mean Cr error| in 8-bit steps.
Studio-swing Y spans 219 of 255 steps, so any error confined to luma reads 20 log10(255/219) = 1.32 dB
higher on Y than on RGB.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from optvq_cli.core.images import Preprocess
from optvq_cli.eval.metrics import psnr
from optvq_cli.model import OptVQModel
from optvq_cli.sources import find

_TO_YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def ycc(x: torch.Tensor) -> torch.Tensor:
    """Full-range (JPEG) YCbCr of [0, 1] RGB, (B, 3, H, W)."""
    return torch.einsum("ij,bjhw->bihw", _TO_YCC.to(x.dtype), x)


def rgb(y: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB of full-range YCbCr, rounded to 8 bits."""
    x = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_TO_YCC.double()).to(y.dtype), y)
    return (x.clamp(0, 1) * 255).round() / 255


def as_unit(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].double() / 255


def rows_for(model: OptVQModel, image: Image.Image, size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pixels, _ = Preprocess(size).apply(image)
    x = as_unit(pixels)
    with torch.no_grad():
        out, _, _ = model(x.float() * 2 - 1, assign="nearest")
    r = ((out.double().clamp(-1, 1) + 1) * 127.5).round() / 255
    cx, cr = ycc(x), ycc(r)
    blur = as_unit(np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(1))))
    return {
        "model": (r, x),
        "model, original chroma": (rgb(torch.cat([cr[:, :1], cx[:, 1:]], 1)), x),
        "model, original luma": (rgb(torch.cat([cx[:, :1], cr[:, 1:]], 1)), x),
        "gaussian blur 1 px": (blur, x),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--model", default="default")
    ap.add_argument("--size", type=int, default=None)
    args = ap.parse_args()
    model = OptVQModel.from_pretrained(args.model, device="cpu")
    size = args.size or model.config.resolution
    sums: dict[str, list[tuple[float, float, float]]] = {}
    for item in find(Path(args.folder)).items:
        with item.open() as f:
            image = Image.open(f).convert("RGB")
        for name, (a, b) in rows_for(model, image, size).items():
            shift = (ycc(a) - ycc(b))[:, 1:].mean(dim=(2, 3)).abs().sum().item() * 255
            sums.setdefault(name, []).append((psnr(a, b, "rgb").item(), psnr(a, b, "y").item(), shift))
    print(f"{len(sums['model'])} images, {size} px, model {args.model}")
    print(f"{'':24s} {'PSNR-RGB':>8s} {'PSNR-Y':>8s} {'Y - RGB':>8s} {'colour shift':>12s}")
    for name, vals in sums.items():
        p_rgb, p_y, shift = np.mean(vals, axis=0)
        print(f"{name:24s} {p_rgb:8.2f} {p_y:8.2f} {p_y - p_rgb:8.2f} {shift:12.2f}")


if __name__ == "__main__":
    main()
