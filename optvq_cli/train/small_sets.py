"""The small data sets training reads whole into memory: MNIST / Fashion-MNIST idx files and
CIFAR-10 python batches, where they lie (as given, or in torchvision's layout) and their download."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import load_numpy_pickle

IDX_TRAIN = "train-images-idx3-ubyte"
IDX_TEST = "t10k-images-idx3-ubyte"
IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte data, 3 dimensions (count, rows, cols)
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
# torchvision puts its downloads under these folders of the root it is given.
_TORCHVISION_IDX_DIRS = {"mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw"}


def read_idx_images(path: Path) -> np.ndarray:
    """An idx3-ubyte image file (``.gz`` or not) as uint8 (N, rows, cols)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: cannot read ({e}); download the file again") from None
    if len(raw) < 16:
        raise UserError(f"{path}: too short for an idx image file; download it again")
    magic, n, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (0, 4, 8, 12))
    if magic != IDX_IMAGES_MAGIC:
        raise UserError(f"{path}: not an idx image file (magic {magic:#010x}, expected {IDX_IMAGES_MAGIC:#010x})")
    if len(raw) != 16 + n * rows * cols:
        raise UserError(
            f"{path}: holds {len(raw) - 16} bytes of pixels but its header says {n} x {rows} x {cols}; "
            "the file is truncated, download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols).copy()


def read_cifar_batch(path: Path) -> np.ndarray:
    """A CIFAR-10 python batch as uint8 (N, 3, 32, 32), through the numpy-only unpickler."""
    try:
        with open(path, "rb") as f:
            obj = load_numpy_pickle(f, encoding="bytes")  # Python 2 strings stay bytes
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: not a CIFAR-10 batch ({e}); it is refused") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"{path}: cannot read as a CIFAR-10 batch ({e}); download it again") from None
    data = None
    if isinstance(obj, dict):
        data = obj.get(b"data", obj.get("data"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: no uint8 'data' array of shape (N, 3072) inside; not a CIFAR-10 python batch")
    return data.reshape(-1, 3, 32, 32)


def _first_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_folders(root: Path) -> list[Path]:
    return [root, root / "raw", *(root / d for d in _TORCHVISION_IDX_DIRS.values())]


def find_idx(root: Path) -> tuple[Path, Path | None] | None:
    """(train images, test images or None) under ``root``: the folder itself, ``raw/`` or
    torchvision's ``MNIST/raw`` / ``FashionMNIST/raw``; or ``root`` is the train-images file."""
    if root.is_file():
        return root, _first_file(root.parent, IDX_TEST)
    for folder in _idx_folders(root):
        train = _first_file(folder, IDX_TRAIN)
        if train is not None:
            return train, _first_file(folder, IDX_TEST)
    return None


def find_cifar(root: Path) -> tuple[list[Path], Path | None] | None:
    """(train batches, test batch or None) in ``root`` or ``root/cifar-10-batches-py``."""
    for folder in (root, root / CIFAR_FOLDER):
        train = [folder / n for n in CIFAR_TRAIN if (folder / n).is_file()]
        if train:
            test = folder / CIFAR_TEST
            return train, test if test.is_file() else None
    return None


def expected_files(kind: str, root: Path) -> str:
    if kind == "cifar10":
        return (
            f"{root}/{CIFAR_FOLDER}/data_batch_1..5 and test_batch (the python version of CIFAR-10, as "
            "torchvision downloads it)"
        )
    sub = _TORCHVISION_IDX_DIRS[kind]
    return f"{root}/{sub}/{IDX_TRAIN}[.gz] and {IDX_TEST}[.gz] (or the same files directly in {root})"


def download(kind: str, root: Path) -> None:
    """Fetch a small data set with torchvision's downloader (checksums verified), into torchvision's
    layout under ``root``. Only the archives are fetched; nothing is unpickled here."""
    from torchvision.datasets import CIFAR10, MNIST, FashionMNIST
    from torchvision.datasets.utils import download_and_extract_archive

    root.mkdir(parents=True, exist_ok=True)
    if kind == "cifar10":
        download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
        return
    cls = MNIST if kind == "mnist" else FashionMNIST
    raw = root / _TORCHVISION_IDX_DIRS[kind]
    for filename, md5 in cls.resources:
        if not filename.startswith(("train-images", "t10k-images")):
            continue  # labels are not needed to train an autoencoder
        errors = []
        for mirror in cls.mirrors:
            try:
                download_and_extract_archive(mirror + filename, str(raw), filename=filename, md5=md5)
                break
            except Exception as e:  # noqa: BLE001 - try the next mirror, report all at the end
                errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
        else:
            raise OSError("; ".join(errors))
