"""What `optvq eval` reads: DATA's images through the source layer, each paired with OTHER's image
of the same name for ``--against``, the pairs' sizes checked, and the dataset the loader reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from optvq_cli import sources
from optvq_cli.core.errors import UserError
from optvq_cli.core.images import ImageError, ImageInput, Preprocess, image_extensions, read_image, read_size
from optvq_cli.sources import Item, Problem


def list_items(
    data: Path, limit: int | None = None, options: sources.SourceOptions | None = None
) -> tuple[list[Item], list[Problem]]:
    """DATA's images in the source's order (a folder: sorted by relative path), the first ``limit``
    of them, and what could not be listed."""
    try:
        found = sources.find(data, unique=False, options=options)
    except sources.NoImages:
        found = None
    if found is None or not found.items:
        raise UserError(f"{data}: no images found (looked for {', '.join(sorted(image_extensions())[:6])}, ...)")
    return found.items[:limit] if limit is not None else found.items, found.problems


def pair_by_name(items: list[Item], other: Path, options: sources.SourceOptions | None = None) -> list[Item]:
    """For each DATA image, OTHER's image of the same name (relative path less its extension)."""
    try:
        found = sources.find(other, unique=False, options=options).items
    except sources.NoImages:
        found = []
    by_name: dict[str, list[Item]] = {}
    for it in found:
        by_name.setdefault(it.name, []).append(it)
    out, missing = [], []
    for it in items:
        cands = by_name.get(it.name, [])
        if len(cands) > 1:
            names = ", ".join(c.rel for c in cands)
            raise UserError(f"--against {other}: {names} all pair with {it.rel}; keep one of them")
        if not cands:
            missing.append(it.rel)
        else:
            out.append(cands[0])
    if missing:
        raise UserError(
            f"--against {other}: {len(missing)} of {len(items)} images have no counterpart by relative path "
            f"(first: {missing[0]}); pass --limit or complete the folder"
        )
    return out


def size_mismatch(a: str, size_a: tuple[int, int], b: str, size_b: tuple[int, int]) -> str:
    return (
        f"{a} is {size_a[0]}x{size_a[1]} but {b} is {size_b[0]}x{size_b[1]}: compared pairs must have one size; "
        "pass --resolution N to compare centre squares resized to N x N"
    )


def check_pair_sizes(data: list[Item], other: list[Item]) -> int | None:
    """The smallest side among the pairs (None when none can be read), from the image headers.
    Raises UserError naming both files of the first pair of different sizes. Unreadable files are
    left to the evaluation, which reports and skips them."""
    smallest = None
    for a, b in zip(data, other, strict=True):
        try:
            size_a, size_b = read_size(a), read_size(b)
        except ImageError:
            continue
        if size_a != size_b:
            raise UserError(size_mismatch(a.display, size_a, b.display, size_b))
        smallest = min(size_a) if smallest is None else min(smallest, *size_a)
    return smallest


def _read(src: ImageInput, resolution: int | None, mode: str) -> tuple[torch.Tensor, str]:
    """(C, H, W) uint8 and "", or an empty tensor and why the file cannot be read. With a
    ``resolution``, the model's own protocol (images.Preprocess: centre square, resized to
    resolution^2), so eval sees exactly what `optvq encode` feeds the model; without, the image as
    it is (EXIF orientation applied, transparency on white)."""
    try:
        im = read_image(src, len(mode))
        if resolution is None:
            pixels = np.array(im, dtype=np.uint8)
            pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
        else:
            pixels, _ = Preprocess(resolution).apply(im)
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), ""
    except ImageError as e:  # reported by the main process with the path: one bad file, one clear line
        return torch.zeros(0, dtype=torch.uint8), str(e)


class EvalImages(Dataset):
    """Item i: (i, image uint8 (C, H, W), error, other image or empty, error); images at
    ``resolution`` x ``resolution`` (centre square, resized), or at their own size for None."""

    def __init__(
        self, items: list[ImageInput], resolution: int | None, mode: str = "RGB", other: list[ImageInput] | None = None
    ):
        self.items, self.resolution, self.mode, self.other = items, resolution, mode, other

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        img, err = _read(self.items[i], self.resolution, self.mode)
        if self.other is None:
            return i, img, err, torch.zeros(0, dtype=torch.uint8), ""
        oimg, oerr = _read(self.other[i], self.resolution, self.mode)
        return i, img, err, oimg, oerr


def as_list(items: list) -> list:
    """DataLoader collate that keeps items apart: images of their own size do not stack."""
    return items
