"""Training data: each format from small files written here, the splits, augmentation, the sampler."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTOS, SKIMAGE, photo_crops
from PIL import Image

from optvq_cli.core.errors import UserError
from optvq_cli.train.data import (
    ArrayImages,
    BatchPlan,
    FolderImages,
    open_splits,
    random_resized_box,
    val_batches,
)
from optvq_cli.train.small_sets import read_cifar_batch, read_idx_images


def write_idx(path: Path, images: np.ndarray, gz: bool = False) -> Path:
    """The idx3-ubyte format by hand: magic 0x00000803, big-endian count/rows/cols, then the bytes."""
    n, rows, cols = images.shape
    header = (0x00000803).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, rows, cols))
    raw = header + images.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_cifar(path: Path, images: np.ndarray) -> Path:
    """A CIFAR-10 python batch: a dict with bytes keys, 'data' rows of 1024 R, 1024 G, 1024 B values."""
    n = images.shape[0]
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [i % 10 for i in range(n)],
        b"data": images.reshape(n, 3 * 32 * 32).astype(np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return path


# ---------------------------------------------------------------- MNIST / Fashion-MNIST idx


def test_idx_roundtrip_exact_values(tmp_path):
    imgs = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    assert np.array_equal(read_idx_images(write_idx(tmp_path / "a", imgs)), imgs)
    assert np.array_equal(read_idx_images(write_idx(tmp_path / "b.gz", imgs, gz=True)), imgs)


def test_idx_bad_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes((0x00000801).to_bytes(4, "big") + bytes(12))  # a labels file, not images
    with pytest.raises(UserError, match="not an idx image file"):
        read_idx_images(bad)
    p = write_idx(tmp_path / "short", np.zeros((2, 4, 4), np.uint8))
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(UserError, match="truncated"):
        read_idx_images(p)


@pytest.mark.parametrize("layout", ["flat", "torchvision", "gz"])
def test_mnist_splits_use_the_test_file(tmp_path, layout):
    train = np.full((6, 28, 28), 255, np.uint8)
    train[:, 0, 0] = 0
    test = np.zeros((2, 28, 28), np.uint8)
    folder = tmp_path / ("MNIST/raw" if layout == "torchvision" else "")
    gz = layout == "gz"
    write_idx(folder / ("train-images-idx3-ubyte" + (".gz" if gz else "")), train, gz)
    write_idx(folder / ("t10k-images-idx3-ubyte" + (".gz" if gz else "")), test, gz)
    s = open_splits(tmp_path, "auto", channels=1, size=28)
    assert s.kind == "mnist" and len(s.train) == 6 and len(s.val) == 2
    x = s.train[(0, 0)]
    assert x.shape == (1, 28, 28)
    assert x[0, 0, 0] == -1.0 and x[0, 5, 5] == 1.0  # 0 -> -1, 255 -> 1
    assert torch.equal(s.val[(0, 1)], torch.full((1, 28, 28), -1.0))


def test_mnist_resized_to_32_as_in_the_paper(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.full((4, 28, 28), 51, np.uint8))
    s = open_splits(tmp_path / "train-images-idx3-ubyte", "mnist", channels=1, size=32)
    x = s.train.__getitems__([(0, 0), (0, 1)])
    assert x.shape == (2, 1, 32, 32)
    assert torch.allclose(x, torch.full_like(x, 51 / 127.5 - 1))  # a flat image stays flat
    assert len(s.train) + len(s.val) == 4  # no test file: some training images are held out


def test_fashion_mnist_layout_and_rgb_models(tmp_path):
    write_idx(tmp_path / "FashionMNIST/raw/train-images-idx3-ubyte", np.full((3, 28, 28), 255, np.uint8))
    write_idx(tmp_path / "FashionMNIST/raw/t10k-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
    s = open_splits(tmp_path, "fashion-mnist", channels=3, size=32)
    assert s.train[(0, 2)].shape == (3, 32, 32)  # grey repeated for an RGB model


def test_missing_mnist_names_the_files(tmp_path, monkeypatch):
    with pytest.raises(UserError) as e:
        open_splits(tmp_path, "mnist", channels=1, allow_download=False)
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "t10k-images-idx3-ubyte" in msg and "\n" not in msg
    monkeypatch.setenv("OPTVQ_OFFLINE", "1")
    with pytest.raises(UserError, match="offline"):
        open_splits(tmp_path, "mnist", channels=1, allow_download=True)


# ---------------------------------------------------------------- CIFAR-10 python batches


def test_cifar_batch_channel_planes(tmp_path):
    img = np.zeros((2, 3, 32, 32), np.uint8)
    img[0, 0], img[0, 1], img[0, 2] = 10, 20, 30  # R, G, B planes
    img[1, :, 5, 7] = 255
    got = read_cifar_batch(write_cifar(tmp_path / "data_batch_1", img))
    assert got.shape == (2, 3, 32, 32)
    assert np.array_equal(got, img)


def test_cifar_splits(tmp_path):
    photos = photo_crops(6, 32)
    write_cifar(tmp_path / "cifar-10-batches-py/data_batch_1", photos[:4])
    write_cifar(tmp_path / "cifar-10-batches-py/data_batch_2", photos[4:5])
    write_cifar(tmp_path / "cifar-10-batches-py/test_batch", photos[5:])
    s = open_splits(tmp_path, "auto", channels=3, size=32)
    assert s.kind == "cifar10" and len(s.train) == 5 and len(s.val) == 1
    expected = torch.from_numpy(photos[4]).float() / 127.5 - 1
    assert torch.equal(s.train[(0, 4)], expected)


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_cifar_unpickler_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "data_batch_1"
    with open(bad, "wb") as f:
        pickle.dump({b"data": _Boom()}, f, protocol=2)
    with pytest.raises(UserError, match="refus"):
        read_cifar_batch(bad)
    assert not (tmp_path / "pwned").exists()


def test_missing_cifar_names_the_files(tmp_path):
    with pytest.raises(UserError, match="data_batch_1..5 and test_batch"):
        open_splits(tmp_path, "cifar10", allow_download=False)


# ---------------------------------------------------------------- image folders


def _folder(root: Path, names: list[str]) -> None:
    for i, rel in enumerate(names):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.open(SKIMAGE / PHOTOS[i % len(PHOTOS)]).convert("RGB").resize((64, 48)).save(p)


def test_imagenet_layout_uses_train_and_val(tmp_path):
    _folder(tmp_path, ["train/n01/a.png", "train/n01/b.png", "train/n02/c.jpg", "val/n01/d.png", "val/n02/e.png"])
    s = open_splits(tmp_path, "auto", channels=3, size=32)
    assert s.kind == "folder" and len(s.train) == 3 and len(s.val) == 2
    x = s.train[(0, 0)]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_plain_folder_holds_out_a_fixed_share(tmp_path):
    _folder(tmp_path, [f"d{i % 3}/img{i}.png" for i in range(10)])
    a = open_splits(tmp_path, "folder", size=16, val_size=3, seed=1)
    b = open_splits(tmp_path, "folder", size=16, val_size=3, seed=2)
    assert len(a.train) == 7 and len(a.val) == 3
    assert a.val.paths == b.val.paths  # the split does not move with the training seed
    assert set(a.val.paths).isdisjoint(a.train.paths)
    assert len(set(a.val.paths) | set(a.train.paths)) == 10


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no images found"):
        open_splits(tmp_path, "folder")


def test_validation_crop_is_the_centre_square(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 10:30] = 200  # the centre 20 x 20 square
    Image.fromarray(a).save(tmp_path / "wide.png")
    ds = FolderImages([tmp_path / "wide.png"], 3, 20, augment=False)
    assert torch.equal(ds[(0, 0)], torch.full((3, 20, 20), 200 / 127.5 - 1))


def test_augmentation_is_seeded_per_sample(tmp_path):
    _folder(tmp_path, ["a.png"])
    ds = FolderImages([tmp_path / "a.png"], 3, 16, augment=True, seed=3)
    assert torch.equal(ds[(0, 0)], ds[(0, 0)])  # the same sample, the same crop, in any process
    views = {tuple(ds[(e, 0)].flatten()[:64].tolist()) for e in range(6)}
    assert len(views) > 1  # other epochs see other crops


def test_random_resized_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, cw, ch = random_resized_box(300, 200, (0.2, 1.0), rng)
        assert 0 <= left and left + cw <= 300 and 0 <= top and top + ch <= 200
        assert 0.2 * 60000 * 0.95 <= cw * ch <= 60000
        assert 3 / 4 * 0.95 <= cw / ch <= 4 / 3 * 1.05


def test_unreadable_image_is_replaced(tmp_path):
    _folder(tmp_path, ["a.png"])
    (tmp_path / "b.png").write_bytes(b"not a png")
    ds = FolderImages([tmp_path / "a.png", tmp_path / "b.png"], 3, 8, augment=False)
    assert torch.equal(ds[(0, 1)], ds[(0, 0)])


# ---------------------------------------------------------------- sampling


def test_plan_shares_concatenate_to_the_single_process_batch():
    one = BatchPlan(n=40, global_batch=8, accum=2, world=1, seed=5)
    two = [BatchPlan(n=40, global_batch=8, accum=2, world=2, rank=r, seed=5) for r in range(2)]
    singles = list(one.micro_batches(0, 10))
    shares = [list(p.micro_batches(0, 10)) for p in two]
    assert len(singles) == 20 and all(len(b) == 4 for b in singles)
    for k, b in enumerate(singles):
        assert shares[0][k] + shares[1][k] == b


def test_plan_epochs_are_permutations_and_resumable():
    plan = BatchPlan(n=10, global_batch=3, seed=1)
    assert plan.steps_per_epoch == 3
    full = list(plan.micro_batches(0, 9))
    for e in range(3):
        seen = [i for b in full[3 * e : 3 * e + 3] for (ep, i) in b]
        assert all(ep == e for b in full[3 * e : 3 * e + 3] for ep, _ in b)
        assert len(set(seen)) == 9  # 9 distinct images per epoch (the 10th is dropped)
    assert list(plan.micro_batches(4, 9)) == full[4:]  # a resume at step 4 sees what a full run sees
    assert full[:3] != full[3:6]


def test_plan_errors():
    with pytest.raises(UserError, match="not divisible"):
        BatchPlan(n=100, global_batch=10, accum=3)
    with pytest.raises(UserError, match="fewer than one batch"):
        BatchPlan(n=5, global_batch=8)


def test_val_batches_are_equal_per_process():
    parts = [val_batches(11, 2, 2, r) for r in range(2)]
    assert [len(p) for p in parts] == [3, 3]
    flat = [i for p in parts for b in p for _, i in b]
    assert sorted(flat) == list(range(10))


def test_array_images_batched_fetch():
    px = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 2, 2).contiguous()
    ds = ArrayImages(px, "x")
    assert torch.equal(ds.__getitems__([(0, 1), (0, 0)])[:, 0, 0, 0], torch.tensor([1.0, -1.0]))
