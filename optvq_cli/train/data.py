"""Training data: image folders, MNIST / Fashion-MNIST idx files and CIFAR-10 python batches, the
paper's preprocessing, a held-out validation split, and a sampler whose position is the step number.

Images come out as float tensors (C, H, W) in [-1, 1] (the authors' "plain" normalization).

- MNIST / Fashion-MNIST / CIFAR-10 are small: they are read once, resized to ``size`` (32 x 32 in
  the paper, Sec. 4.2) and kept in memory as uint8; the held-out split is their test set.
- Images through the source layer (a folder, recursive, ImageNet's ``train/<class>/*.JPEG`` layout
  included; or any input a registered kind recognises) are read per item:
  random-resized crops and horizontal flips for training (Sec. 4.1), the centre square for
  validation. A folder with ``train/`` and ``val/`` inside uses them as the two splits; otherwise a
  fixed random share of the images is held out.

Random augmentation draws from a generator seeded by (seed, epoch, index), not from a global
stream, so a sample looks the same whichever worker reads it and after a resume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from optvq_cli import sources
from optvq_cli.core import workers as W
from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import offline
from optvq_cli.core.images import RESAMPLE, ImageError, ImageInput, display_name, image_extensions, read_image
from optvq_cli.train.small_sets import (
    download,
    expected_files,
    find_cifar,
    find_idx,
    read_cifar_batch,
    read_idx_images,
)

log = logging.getLogger("optvq")

KINDS = ("auto", "folder", "mnist", "fashion-mnist", "cifar10")

_SPLIT_SEED = 0  # the held-out share of an image folder does not move with --seed
_MAX_VAL = 10_000


# ---------------------------------------------------------------- samples and batches


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-1, 1]."""
    return pixels.float().div_(127.5).sub_(1.0)


def collate(batch) -> torch.Tensor:
    """A batch is either already one tensor (in-memory data) or a list of (C, H, W) tensors."""
    return batch if isinstance(batch, torch.Tensor) else torch.stack(list(batch))


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index])


class ArrayImages(torch.utils.data.Dataset):
    """Images held in memory as uint8 (N, C, H, W), already at the training size. Items are
    ``(epoch, index)`` pairs (the epoch is ignored: nothing random here)."""

    def __init__(self, pixels: torch.Tensor, name: str):
        self.pixels = pixels
        self.name = name

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        return to_model_range(self.pixels[item[1]])

    def __getitems__(self, items: Sequence[tuple[int, int]]) -> torch.Tensor:  # DataLoader's batched fetch
        return to_model_range(self.pixels[torch.tensor([i for _, i in items], dtype=torch.long)])


def random_resized_box(
    width: int, height: int, scale: tuple[float, float], rng: np.random.Generator, ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) of a random crop covering ``scale`` of the area with an
    aspect ratio in ``ratio`` (log-uniform), as in Inception-style random-resized cropping; after 10
    misses the largest centred crop of an allowed ratio."""
    area = width * height
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(lo, hi))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= width and 0 < ch <= height:
            return int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1)), cw, ch
    in_ratio = width / height
    if in_ratio < ratio[0]:
        cw, ch = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        cw, ch = int(round(height * ratio[1])), height
    else:
        cw, ch = width, height
    return (width - cw) // 2, (height - ch) // 2, cw, ch


def centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


class FolderImages(torch.utils.data.Dataset):
    """Images (paths, or items of the source layer) read per item, as ``size`` x ``size`` crops:
    random-resized crops and flips when ``augment``, else the centre square (shorter side resized
    to ``size``). Items are ``(epoch, index)``."""

    def __init__(
        self,
        paths: list[ImageInput],
        channels: int,
        size: int,
        augment: bool,
        seed: int = 0,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        name: str = "images",
    ):
        self.paths, self.channels, self.size = paths, channels, size
        self.augment, self.seed, self.crop_scale = augment, seed, tuple(crop_scale)
        self.name = name
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int) -> Image.Image:
        # A corrupt file in a million-image folder must not end a day-long run: use the next one.
        for k in range(len(self.paths)):
            i = (index + k) % len(self.paths)
            try:
                return read_image(self.paths[i], self.channels)
            except ImageError as e:
                if i not in self._warned:
                    self._warned.add(i)
                    log.warning(f"warning: {display_name(self.paths[i])}: {e}; using another image in its place")
        raise UserError(f"{self.name}: none of the {len(self.paths)} images can be read")

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        epoch, index = item
        im = self._load(index)
        w, h = im.size
        if self.augment:
            rng = sample_rng(self.seed, epoch, index)
            left, top, cw, ch = random_resized_box(w, h, self.crop_scale, rng)
            flip = rng.random() < 0.5
        else:
            left, top, cw, ch = centre_square(w, h)
            flip = False
        im = im.resize((self.size, self.size), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        a = np.asarray(im, dtype=np.uint8)
        a = a[:, :, None] if a.ndim == 2 else a
        return to_model_range(torch.from_numpy(a.copy()).permute(2, 0, 1))


def detect_kind(root: Path) -> str:
    """``auto``: idx files -> mnist, CIFAR batches -> cifar10, else images through the source layer
    (a folder, or an input a registered kind recognises)."""
    kind = sources.kind_of(root)
    if kind is not None and not kind.fallback:
        return "folder"
    if find_idx(root) is not None:
        return "mnist"
    if root.is_dir() and find_cifar(root) is not None:
        return "cifar10"
    return "folder"


DATA_KINDS = (
    "a folder of images (recursive; train/ and val/ inside are used as the splits), tar shards or Parquet "
    "files, MNIST / Fashion-MNIST idx files or their folder, or CIFAR-10's cifar-10-batches-py/"
)


# ---------------------------------------------------------------- the two splits


@dataclass
class Splits:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    kind: str
    description: str  # one line for the log


def _resize_pixels(pixels: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), resized exactly as `optvq eval` and `encode`
    resize an image file (Pillow, ``images.RESAMPLE``), so validation and eval see the same pixels."""
    t = torch.from_numpy(np.ascontiguousarray(pixels))
    if t.shape[-2:] == (size, size):
        return t.clone()
    method = getattr(Image.Resampling, RESAMPLE.upper())
    out = np.empty((t.shape[0], t.shape[1], size, size), np.uint8)
    for i, a in enumerate(t.numpy()):
        im = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
        r = np.asarray(im.resize((size, size), method))
        out[i] = r[None] if r.ndim == 2 else r.transpose(2, 0, 1)
    return torch.from_numpy(out)


def _match_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    if t.shape[1] == channels:
        return t
    if channels == 3 and t.shape[1] == 1:
        return t.expand(-1, 3, -1, -1).contiguous()
    if channels == 1 and t.shape[1] == 3:  # ITU-R 601-2 luma, Pillow's "L"
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (t.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise UserError(f"cannot turn {t.shape[1]}-channel images into {channels}-channel ones")


def _split_off(n: int, pixels_or_paths, val_size: int | None, val_fraction: float):
    """A fixed random (seed 0) held-out share of one list."""
    if n < 2:
        raise UserError(f"only {n} image(s): a training run needs at least 2 (one is held out for validation)")
    k = val_size if val_size is not None else int(round(n * val_fraction))
    k = max(1, min(k, n - 1, _MAX_VAL if val_size is None else n - 1))
    order = np.random.default_rng(_SPLIT_SEED).permutation(n)
    return order[k:], order[:k]


def _small_dataset(
    kind: str, root: Path, channels: int, size: int, val_size: int | None, val_fraction: float
) -> Splits:
    if kind == "cifar10":
        found = find_cifar(root) if root.is_dir() else None
        if found is None:
            return None  # type: ignore[return-value]
        train_files, test_file = found
        train = np.concatenate([read_cifar_batch(p) for p in train_files])
        test = read_cifar_batch(test_file) if test_file else None
        where = train_files[0].parent
    else:
        found_idx = find_idx(root)
        if found_idx is None:
            return None  # type: ignore[return-value]
        train_file, test_file = found_idx
        train = read_idx_images(train_file)[:, None]
        test = read_idx_images(test_file)[:, None] if test_file else None
        where = train_file.parent
    if test is None:
        keep, held = _split_off(len(train), train, val_size, val_fraction)
        train, test = train[np.sort(keep)], train[np.sort(held)]
        split = f"{len(test)} held out of the training files (no test file)"
    else:
        if val_size is not None:
            test = test[:val_size]
        split = f"{len(test)} from the test file"
    tr = _match_channels(_resize_pixels(train, size), channels)
    va = _match_channels(_resize_pixels(test, size), channels)
    desc = f"{kind} in {where}: {len(tr)} training images, {split}; {size}x{size}"
    return Splits(ArrayImages(tr, f"{kind} train"), ArrayImages(va, f"{kind} val"), kind, desc)


def _list_images(input: Path, options: sources.SourceOptions | None = None) -> list[sources.Item]:
    """The images `encode` and `eval` see in the same INPUT (the source layer); none: []. What
    cannot be listed is logged and left out."""
    try:
        found = sources.find(input, unique=False, options=options)
    except sources.NoImages:
        return []
    for path, why in found.problems:
        log.warning(f"warning: {path}: {why}")
    return found.items


def _folder_dataset(
    root: Path,
    channels: int,
    size: int,
    augment: bool,
    seed: int,
    crop_scale: tuple[float, float],
    val_size: int | None,
    val_fraction: float,
    options: sources.SourceOptions | None = None,
) -> Splits:
    if not sources.is_collection(root):
        raise UserError(f"--data {root}: no such folder; give a folder of images (searched recursively)")
    val_dir = next((root / d for d in ("val", "validation") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:  # ImageNet's layout: train/<class>/, val/
        train_paths, val_paths = _list_images(root / "train"), _list_images(val_dir)
        if not train_paths or not val_paths:
            empty = root / "train" if not train_paths else val_dir
            raise UserError(f"--data {root}: {empty} holds no images")
        if val_size is not None:
            val_paths = val_paths[:val_size]
        split = f"{len(val_paths)} from {val_dir.name}/"
    else:
        paths = _list_images(root, options)
        if not paths:
            raise UserError(
                f"--data {root}: no images found (searched recursively for .jpg, .png, ...); "
                "for MNIST or CIFAR-10 give the folder holding their files"
            )
        keep, held = _split_off(len(paths), paths, val_size, val_fraction)
        train_paths = [paths[i] for i in sorted(keep)]
        val_paths = [paths[i] for i in sorted(held)]
        split = f"{len(val_paths)} held out"
    train = FolderImages(train_paths, channels, size, augment, seed, crop_scale, name=f"{root} (train)")
    val = FolderImages(val_paths, channels, size, False, seed, crop_scale, name=f"{root} (val)")
    aug = "random-resized crops + flips" if augment else "centre crops"
    desc = f"images in {root}: {len(train_paths)} for training ({aug}), {split}; {size}x{size}"
    return Splits(train, val, "folder", desc)


def open_splits(
    path: str | Path,
    kind: str = "auto",
    channels: int = 3,
    size: int = 32,
    *,
    augment: bool = True,
    seed: int = 0,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    val_size: int | None = None,
    val_fraction: float = 0.01,
    allow_download: bool = False,
    source_options: sources.SourceOptions | None = None,
) -> Splits:
    """The training and validation sets under ``path``. ``kind``: auto, folder, mnist,
    fashion-mnist, cifar10. Missing MNIST / CIFAR files are downloaded when ``allow_download`` and
    not OPTVQ_OFFLINE; otherwise the error names the files expected. ``source_options``: how an
    image source is read (Parquet columns: the config's data.image_column / data.label_column)."""
    if kind not in KINDS:
        raise UserError(f"data.kind {kind!r}: use one of {', '.join(KINDS)}")
    root = Path(path).expanduser()
    if not str(path):
        raise UserError("no training data: pass --data PATH (a folder of images, MNIST idx files or CIFAR-10)")
    if kind == "auto":
        if not root.exists() and sources.kind_of(root) is None:
            raise UserError(f"--data {root}: no such file or folder")
        if root.is_file() and root.suffix.lower() in image_extensions():
            raise UserError(f"--data {root}: one image is not a training set; --data takes {DATA_KINDS}")
        kind = detect_kind(root)
    if kind == "folder":
        return _folder_dataset(root, channels, size, augment, seed, crop_scale, val_size, val_fraction, source_options)
    splits = _small_dataset(kind, root, channels, size, val_size, val_fraction)
    if splits is not None:
        return splits
    expected = expected_files(kind, root)
    if not allow_download or offline():
        why = "offline (OPTVQ_OFFLINE / HF_HUB_OFFLINE)" if offline() else "downloads are off (data.download=false)"
        raise UserError(f"--data {root}: no {kind} files; expected {expected}; {why}")
    try:
        download(kind, root)
    except Exception as e:  # noqa: BLE001 - no network, a proxy, a checksum mismatch: one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"--data {root}: no {kind} files and the download failed ({first}); expected {expected}"
        ) from None
    splits = _small_dataset(kind, root, channels, size, val_size, val_fraction)
    if splits is None:
        raise UserError(f"--data {root}: downloaded, but found no {kind} files; expected {expected}")
    return splits


# ---------------------------------------------------------------- sampling by step


@dataclass(frozen=True)
class BatchPlan:
    """Which samples every process sees at every step, from the step number alone.

    Each epoch is one permutation of the training set (seeded by seed and epoch); global step s of
    an epoch takes the next ``global_batch`` samples (the remainder of an epoch is dropped), cut into
    ``accum`` consecutive micro-batches, each cut into ``world`` consecutive per-process shares. So
    the run is the same on 1 or N processes, and resuming at step s needs nothing but s.
    """

    n: int
    global_batch: int
    accum: int = 1
    world: int = 1
    rank: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.global_batch % (self.accum * self.world):
            raise UserError(
                f"batch_size {self.global_batch} is not divisible by grad_accum x processes = "
                f"{self.accum} x {self.world}; choose a batch size that is"
            )
        if self.n < self.global_batch:
            raise UserError(
                f"the training set has {self.n} images, fewer than one batch of {self.global_batch}; lower --batch-size"
            )

    @property
    def micro(self) -> int:
        """Samples per process per micro-batch."""
        return self.global_batch // (self.accum * self.world)

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def micro_batches(self, start_step: int, stop_step: int) -> Iterator[list[tuple[int, int]]]:
        """This process's micro-batches for steps start..stop-1, ``accum`` per step, as lists of
        (epoch, index)."""
        spe = self.steps_per_epoch
        perm, perm_epoch = None, -1
        for step in range(start_step, stop_step):
            epoch, k = divmod(step, spe)
            if epoch != perm_epoch:
                perm, perm_epoch = self.permutation(epoch), epoch
            base = k * self.global_batch
            for a in range(self.accum):
                s = base + (a * self.world + self.rank) * self.micro
                yield [(epoch, int(i)) for i in perm[s : s + self.micro]]


class StepBatches(torch.utils.data.Sampler):
    """A batch sampler over ``BatchPlan.micro_batches`` (for a DataLoader's ``batch_sampler``)."""

    def __init__(self, plan: BatchPlan, start_step: int, stop_step: int):
        self.plan, self.start, self.stop = plan, start_step, stop_step

    def __iter__(self):
        return self.plan.micro_batches(self.start, self.stop)

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.plan.accum


def val_batches(n: int, batch: int, world: int, rank: int) -> list[list[tuple[int, int]]]:
    """This process's validation batches: the first n - n % world images (so every process runs
    the same number of batches, as the distributed Sinkhorn needs), in contiguous shares."""
    n -= n % world
    share = n // world
    idx = list(range(rank * share, (rank + 1) * share))
    return [[(0, i) for i in idx[s : s + batch]] for s in range(0, share, batch)]


def make_loader(dataset, batch_sampler, workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Training and validation batches through the one loader (``core.workers``)."""
    return W.make_loader(dataset, batch_sampler, workers, collate, pin_memory=pin_memory)
