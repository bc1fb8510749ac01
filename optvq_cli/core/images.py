"""Images in and out: reading them with Pillow (from a path or an item of ``optvq_cli.sources``),
the model's preprocessing, tensors.

Reading never raises on a bad file inside a run: ``ImageDataset`` returns the reason as data, so
one unreadable photo in a DataLoader worker does not sink its batch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

RESAMPLE = "bicubic"  # Pillow's bicubic resize is antialiased when shrinking
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV")


class ImageError(Exception):
    """Why one input image cannot be used (reported with its path, the run goes on)."""


def image_extensions() -> set[str]:
    """Extensions of every format Pillow can open here (".jpg", ".png", ".webp", ".tif", ...)."""
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


# ---------------------------------------------------------------- reading


def _sixteen_bit_to_l(im: Image.Image) -> Image.Image:
    a = np.asarray(im, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")


def _float_to_l(im: Image.Image) -> Image.Image:
    a = np.nan_to_num(np.asarray(im, dtype=np.float64))
    if a.size and a.max() <= 1.0:  # float images are usually in [0, 1]
        a = a * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_channels(im: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode to "RGB" (channels=3) or "L" (channels=1): transparency composited on
    white, CMYK and other colour spaces converted, 16-bit and float scaled to 8 bits."""
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        im = _sixteen_bit_to_l(im)
    elif mode == "F":
        im = _float_to_l(im)
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        im = _on_white(im)
    elif mode in _TO_RGB or mode == "P":
        im = im.convert("RGB")
    want = "RGB" if channels == 3 else "L"
    return im if im.mode == want else im.convert(want)


@contextmanager
def _pillow_errors() -> Iterator[None]:
    """Pillow's and the OS's ways of failing on one file, as one ImageError with the reason."""
    try:
        yield
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except PermissionError:
        raise ImageError("cannot read (permission denied)") from None
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        raise ImageError(f"truncated or corrupt image ({e})") from None


class ImageWarning(UserWarning):
    """Pillow's complaint about a file it could still read (a decompression-bomb size, corrupt
    EXIF), re-issued once with the file's path."""


@contextmanager
def _named_warnings(name: str) -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    lines = dict.fromkeys(str(w.message).splitlines()[0] if str(w.message) else w.category.__name__ for w in caught)
    for line in lines:
        warnings.warn(f"{name}: {line}", ImageWarning, stacklevel=3)


class Openable(Protocol):
    """An input read through the source layer (``optvq_cli.sources.Item``): its bytes, its name."""

    @property
    def display(self) -> str: ...

    def open(self) -> BinaryIO: ...


ImageInput = Path | Openable


def display_name(src: ImageInput) -> str:
    """How a problem names the input: its path, or its container and member."""
    return str(src) if isinstance(src, (str, os.PathLike)) else src.display


@contextmanager
def _opened(src: ImageInput) -> Iterator[Path | BinaryIO]:
    """A path as it is (Pillow opens it), or the item's bytes as an open binary file."""
    if isinstance(src, (str, os.PathLike)):
        yield Path(src)
        return
    with src.open() as f:
        yield f


def _is_empty(f: Path | BinaryIO) -> bool:
    if isinstance(f, Path):
        return os.path.getsize(f) == 0
    here = f.tell()
    end = f.seek(0, os.SEEK_END)
    f.seek(here)
    return end == here


def read_image(src: ImageInput, channels: int) -> Image.Image:
    """The first frame of ``src`` (a path, or an item of the source layer), EXIF orientation
    applied, as "RGB" or "L". Raises ImageError."""
    with _named_warnings(display_name(src)), _pillow_errors(), _opened(src) as f:
        if _is_empty(f):
            raise ImageError("empty file (0 bytes)")
        with Image.open(f) as im:
            im.seek(0)  # first frame of an animation
            im.load()  # decode now: a truncated file fails here, not later
            oriented = ImageOps.exif_transpose(im)
            return to_channels(oriented if oriented is not None else im, channels)


def read_size(src: ImageInput) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only (no pixel decoding)."""
    with _named_warnings(display_name(src)), _pillow_errors(), _opened(src) as f, Image.open(f) as im:
        w, h = im.size
        if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):  # rotated by 90 degrees
            w, h = h, w
        return w, h


# ---------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Placement:
    """Where an image's pixels went: recorded per image in the manifest."""

    original_size: tuple[int, int]  # (width, height) after EXIF orientation
    crop_box: tuple[int, int, int, int]  # (left, top, right, bottom) in original pixels
    resized: tuple[int, int]  # (width, height) the box was resized to
    padding: tuple[int, int, int, int]  # (left, top, right, bottom) pixels added after resizing

    def to_json(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> Placement:
        return cls(*(tuple(int(x) for x in d[k]) for k in ("original_size", "crop_box", "resized", "padding")))


@dataclass(frozen=True)
class Preprocess:
    """The model's protocol: shorter side resized to ``size``, centre crop to size x size (or, with
    ``crop=False``, the whole image), then padded on the right and bottom to a multiple of the
    downsampling factor by repeating the edge pixels."""

    size: int
    crop: bool = True
    multiple: int = 1

    def place(self, width: int, height: int) -> Placement:
        """The crop box, resize and padding for an image of this size. Raises ImageError if what
        the model would see is smaller than one token: the crop square (upscaling a few pixels
        makes no picture), or without cropping the image after resizing."""
        f = self.multiple
        if self.crop and min(width, height) < f:
            raise ImageError(f"image is {width}x{height} px, smaller than one token ({f}x{f} px)")
        if self.crop:
            s = min(width, height)
            left, top = (width - s) // 2, (height - s) // 2
            box = (left, top, left + s, top + s)
            resized = (self.size, self.size)
        else:
            box = (0, 0, width, height)
            if width <= height:  # the shorter side becomes exactly `size`, the other keeps the aspect
                resized = (self.size, max(1, round(height * self.size / width)))
            else:
                resized = (max(1, round(width * self.size / height)), self.size)
        if min(resized) < f:
            raise ImageError(
                f"image is {width}x{height} px, resized to {resized[0]}x{resized[1]} px: smaller than one token "
                f"({f}x{f} px); use a larger --size"
            )
        pad_r = -resized[0] % f
        pad_b = -resized[1] % f
        return Placement((width, height), box, resized, (0, 0, pad_r, pad_b))

    def apply(self, im: Image.Image) -> tuple[np.ndarray, Placement]:
        """(H, W, C) uint8 pixels ready for the model, and where they came from."""
        placement = self.place(*im.size)
        out = im.resize(placement.resized, Image.Resampling.BICUBIC, box=placement.crop_box)
        a = np.array(out, dtype=np.uint8)  # a writable copy: torch.from_numpy wants one
        a = a[:, :, None] if a.ndim == 2 else a
        pl, pt, pr, pb = placement.padding
        if pr or pb or pl or pt:
            a = np.pad(a, ((pt, pb), (pl, pr), (0, 0)), mode="edge")
        return a, placement

    def to_json(self) -> dict:
        return {
            "size": self.size,
            "resize": "shorter-side",
            "crop": "center" if self.crop else "none",
            "resample": RESAMPLE,
            "pad_to_multiple_of": self.multiple,
            "pad": "edge",
            "range": [-1.0, 1.0],
        }


def unpad(a: np.ndarray, padding: tuple[int, int, int, int]) -> np.ndarray:
    """Removes recorded padding from (H, W, C) pixels."""
    pl, pt, pr, pb = padding
    h, w = a.shape[:2]
    return a[pt : h - pb, pl : w - pr]


# ---------------------------------------------------------------- tensors


def to_tensor(pixels: np.ndarray):
    """(H, W, C) uint8 -> float32 (C, H, W) in [-1, 1], contiguous (see ``batch_to_tensor``)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous().float()
    return t.div_(127.5).sub_(1.0)


def batch_to_tensor(pixels: list[np.ndarray], device=None):
    """Same-shape (H, W, C) uint8 images -> float32 (B, C, H, W) in [-1, 1] on ``device``; moved
    as uint8 (a quarter of the bytes) and converted there. Contiguous: a channels-last view would
    take other convolution kernels than a tensor built by hand, flipping near-tied tokens."""
    import torch

    x = torch.from_numpy(np.stack(pixels)).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).contiguous().float().div_(127.5).sub_(1.0)


def to_pixels(images) -> np.ndarray:
    """Model output (B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, rounded, clipped."""
    import torch

    x = images.detach().float().clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
    return x.to("cpu", dtype=torch.uint8).permute(0, 2, 3, 1).numpy()


def to_pil(pixels: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 with C in {1, 3} -> a Pillow image ("L" or "RGB")."""
    return Image.fromarray(pixels[:, :, 0], "L") if pixels.shape[2] == 1 else Image.fromarray(pixels, "RGB")


# ---------------------------------------------------------------- dataset


@dataclass
class Sample:
    """What a worker returns for one input: pixels and placement, or the reason it failed."""

    index: int
    pixels: np.ndarray | None = None  # (H, W, C) uint8; None when failed or header only
    placement: Placement | None = None
    error: str | None = None


class ImageDataset:
    """Map-style dataset (works with torch DataLoader workers) over ``items`` (paths or items of
    the source layer).

    ``header_only`` holds indices whose outputs already exist: for those only the header is read,
    enough to rebuild their manifest row. Errors come back as ``Sample.error``, never raised.
    """

    def __init__(
        self,
        items: list[ImageInput],
        channels: int,
        preprocess: Preprocess,
        header_only: set[int] | frozenset[int] = frozenset(),
    ):
        self.items, self.channels, self.preprocess = items, channels, preprocess
        self.header_only = header_only

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        src = self.items[index]
        try:
            if index in self.header_only:
                return Sample(index, placement=self.preprocess.place(*read_size(src)))
            pixels, placement = self.preprocess.apply(read_image(src, self.channels))
            return Sample(index, pixels, placement)
        except ImageError as e:
            return Sample(index, error=str(e))
        except Exception as e:  # anything Pillow throws on hostile input: reported, not fatal
            return Sample(index, error=f"cannot read ({type(e).__name__}: {e})")


def collate(samples: list[Sample]) -> list[Sample]:
    """Keeps samples as a list: shapes may differ (--no-crop) and failed ones carry no pixels."""
    return samples
