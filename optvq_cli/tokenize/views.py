"""The views of one image that `encode --layout shards` stores: the centre crop, its mirror, or
LlamaGen's ten crops (corners and centre of the image resized to 1.1 x size, and their mirrors)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from optvq_cli.core.errors import UserError
from optvq_cli.core.images import Preprocess

CROPS = ("tl", "tr", "bl", "br", "center")
VIEW_SETS: dict[str, tuple[str, ...]] = {
    "center": ("center",),
    "center,flip": ("center", "flip"),
    "tencrop": CROPS + tuple(f"{c}_flip" for c in CROPS),
}
TENCROP_SCALE = 1.1  # crops of `size` px from the image resized to 1.1 x size, as LlamaGen's extraction does


def parse_views(views: str | Sequence[str]) -> tuple[str, ...]:
    """``center`` / ``center,flip`` / ``tencrop`` to the view names, in row order."""
    key = views if isinstance(views, str) else ",".join(views)
    key = ",".join(v.strip().lower() for v in key.split(",") if v.strip())
    if key not in VIEW_SETS:
        raise UserError(f"--views {views}: use one of {', '.join(VIEW_SETS)}")
    return VIEW_SETS[key]


def _pad(a: np.ndarray, f: int) -> np.ndarray:
    """Edge padding on the right and bottom to a multiple of ``f``, as ``Preprocess.apply`` pads."""
    pb, pr = -a.shape[0] % f, -a.shape[1] % f
    return np.pad(a, ((0, pb), (0, pr), (0, 0)), mode="edge") if pb or pr else a


def render_views(im: Image.Image, pre: Preprocess, views: Sequence[str]) -> tuple[np.ndarray, list[list[int]]]:
    """(V, H, W, C) uint8 pixels, one per view, and each view's crop box (left, top, right, bottom)
    in the source's pixels. ``flip`` is the mirrored image put through the same preprocessing; the
    ten crops are the corners and centre of the image resized to 1.1 x size, and their mirrors."""
    if tuple(views) != VIEW_SETS["tencrop"]:
        out, boxes = [], []
        for v in views:
            src = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if v == "flip" else im
            pixels, placement = pre.apply(src)
            left, top, right, bottom = placement.crop_box
            out.append(pixels)
            boxes.append(
                [im.width - right, top, im.width - left, bottom] if v == "flip" else [left, top, right, bottom]
            )
        return np.stack(out), boxes
    return _ten_crop(im, pre)


def _ten_crop(im: Image.Image, pre: Preprocess) -> tuple[np.ndarray, list[list[int]]]:
    size = pre.size
    big = max(size, round(size * TENCROP_SCALE))
    square = pre.place(*im.size).crop_box  # the centre square; raises ImageError for a tiny image
    a = np.array(im.resize((big, big), Image.Resampling.BICUBIC, box=square), dtype=np.uint8)
    a = a[:, :, None] if a.ndim == 2 else a
    m, c = big - size, (big - size) // 2
    corners = [(0, 0), (m, 0), (0, m), (m, m), (c, c)]  # (x, y) of tl, tr, bl, br, centre
    scale = (square[2] - square[0]) / big
    crops, boxes = [], []
    for x, y in corners:
        crops.append(a[y : y + size, x : x + size])
        box = [x, y, x + size, y + size]
        boxes.append(
            [square[0] + round(box[0] * scale), square[1] + round(box[1] * scale)]
            + [square[0] + round(box[2] * scale), square[1] + round(box[3] * scale)]
        )
    flips = [np.ascontiguousarray(p[:, ::-1]) for p in crops]
    return np.stack([_pad(p, pre.multiple) for p in crops + flips]), boxes + boxes
