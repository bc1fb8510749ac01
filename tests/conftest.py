"""Shared fixtures and helpers: a tiny saved model, real-photo patches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SKIMAGE = Path(__import__("skimage").__file__).parent / "data"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")


def photo_crops(n: int, size: int, grey: bool = False) -> np.ndarray:
    """n real-photo patches (skimage's test images), resized to size x size: (n, 3, s, s) or (n, s, s)."""
    out = []
    for i in range(n):
        im = Image.open(SKIMAGE / PHOTOS[i % len(PHOTOS)]).convert("L" if grey else "RGB")
        w, h = im.size
        k = i // len(PHOTOS)
        side = min(w, h) // 2
        left, top = (k * 37) % (w - side), (k * 53) % (h - side)
        a = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)))
        out.append(a if grey else a.transpose(2, 0, 1))
    return np.stack(out)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """build_model("tiny") with fixed weights, saved once per session (config.json + model.safetensors)."""
    import torch

    from optvq_cli.model import build_model, save_model

    torch.manual_seed(0)
    return save_model(build_model("tiny"), tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """A second tiny model (other weights, so another sha256) for the "another model" refusals."""
    import torch

    from optvq_cli.model import build_model, save_model

    torch.manual_seed(123)
    return save_model(build_model("tiny"), tmp_path_factory.mktemp("other-model"))
