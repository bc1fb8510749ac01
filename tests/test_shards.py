"""The sharded token layout, TokenDataset over every layout, and `optvq tokens info|verify`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from optvq_cli.tokenize.dataset import TokenDataset
from optvq_cli.tokenize.shards import Shard, ShardRows, shard_name, write_shard

VIEWS = ["center", "flip"]


def _rows(start: int, images: int, heads: int = 2, grid: int = 3) -> ShardRows:
    """``images`` images x 2 views; token values encode (image, view, position) so every row differs."""
    n = images * len(VIEWS)
    tokens = np.zeros((n, heads, grid, grid), np.uint16)
    for r in range(n):
        image, view = divmod(r, len(VIEWS))
        tokens[r] = (start + image) * 10 + view + np.arange(heads * grid * grid).reshape(heads, grid, grid) * 1000
    return ShardRows(
        tokens=tokens,
        paths=[f"class{(start + i) % 2}/img{start + i}é.jpg" for i in range(images) for _ in VIEWS],
        labels=np.array([(start + i) % 2 for i in range(images) for _ in VIEWS], np.int64),
        views=np.array([v for _ in range(images) for v in range(len(VIEWS))], np.uint8),
        sizes=np.array([[640, 480]] * n, np.int32),
        crops=np.array([[80, 0, 560, 480]] * n, np.int32),
        view_names=VIEWS,
    )


@pytest.fixture()
def sharded(tmp_path):
    """Two shards (3 and 2 images, two views each) and their index, as `encode --layout shards` lays them."""
    root = tmp_path / "out"
    index = {
        "optvq_format": 1,
        "format": "optvq-tokens",
        "layout": "shards",
        "views": VIEWS,
        "classes": ["class0", "class1"],
        "assign": "nearest",
        "failures": [],
        "model": {"ref": "tiny", "sha256": "0" * 64, "n_codes": 20000, "heads": 2},
        "shards": [],
    }
    for s, (start, images) in enumerate([(0, 3), (3, 2)]):
        write_shard(root / shard_name(s), _rows(start, images))
        index["shards"].append({"file": shard_name(s), "images": images, "rows": images * 2})
    (root / "manifest.json").write_text(json.dumps(index))
    return root


def test_dataset_rows_labels_and_view_filter(sharded):
    data = TokenDataset(sharded)
    assert len(data) == 10  # 5 images x 2 views
    tokens, label = data[7]  # image 3 (second shard's first), view flip
    assert tokens.dtype.is_floating_point is False and tuple(tokens.shape) == (2, 3, 3)
    assert int(tokens[0, 0, 0]) == 3 * 10 + 1 and int(tokens[1, 2, 2]) == 31 + 17 * 1000
    assert label == 1  # image 3 -> class 3 % 2
    flips = TokenDataset(sharded, view="flip")
    assert len(flips) == 5
    assert [int(flips[i][0][0, 0, 0]) for i in range(5)] == [1, 11, 21, 31, 41]
    assert [flips[i][1] for i in range(5)] == [0, 1, 0, 1, 0]
    assert int(data[-1][0][0, 0, 0]) == 41
    with pytest.raises(IndexError):
        data[10]
    with pytest.raises(ValueError, match="tencrop"):
        TokenDataset(sharded, view="tencrop")


def test_shard_reads_back_without_optvq(sharded):
    """A shard is plain safetensors: numpy alone reads every column."""
    from safetensors.numpy import load_file

    cols = load_file(str(sharded / shard_name(1)))
    np.testing.assert_array_equal(cols["tokens"], _rows(3, 2).tokens)
    assert cols["tokens"].dtype == np.uint16
    off, raw = cols["path_offsets"], cols["path_bytes"].tobytes()
    assert raw[off[2] : off[3]].decode("utf-8") == "class0/img4é.jpg"
    row = Shard(sharded / shard_name(1)).row(3)
    assert row["view"] == "flip" and row["size"] == (640, 480) and row["crop"] == (80, 0, 560, 480)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "optvq_cli", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_tokens_info_and_verify_ok(sharded):
    info = _cli("tokens", "info", str(sharded), "--json")
    assert info.returncode == 0, info.stderr
    d = json.loads(info.stdout)
    assert (d["layout"], d["images"], d["rows"], d["shards"], d["classes"]) == ("shards", 5, 10, 2, 2)
    ok = _cli("tokens", "verify", str(sharded))
    assert ok.returncode == 0 and "10 rows" in ok.stdout


@pytest.mark.slow
def test_verify_catches_a_truncated_shard(sharded):
    path = sharded / shard_name(1)
    path.write_bytes(path.read_bytes()[:-40])
    res = _cli("tokens", "verify", str(sharded))
    assert res.returncode == 1 and shard_name(1) in res.stderr and "Traceback" not in res.stderr


def test_verify_catches_an_index_outside_the_codebook(sharded):
    index = json.loads((sharded / "manifest.json").read_text())
    index["model"]["n_codes"] = 17000  # the tokens reach 17 * 1000 + 41
    (sharded / "manifest.json").write_text(json.dumps(index))
    res = _cli("tokens", "verify", str(sharded))
    assert res.returncode == 1 and "outside 0..16999" in res.stderr


@pytest.mark.slow
def test_verify_catches_a_row_count_other_than_the_index(sharded):
    index = json.loads((sharded / "manifest.json").read_text())
    index["shards"][0]["rows"] = 7
    (sharded / "manifest.json").write_text(json.dumps(index))
    res = _cli("tokens", "verify", str(sharded))
    assert res.returncode == 1 and "6 rows, the index says 7" in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["files", "packed"])
def test_dataset_over_files_and_packed_outputs(tmp_path, tiny_model_dir, layout):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(images / f"im{i}.png")
    out = tmp_path / "tok"
    args = ["encode", str(images), str(out), "--model", str(tiny_model_dir)] + (
        ["--pack"] if layout == "packed" else []
    )
    res = _cli(*args)
    assert res.returncode == 0, res.stderr
    data = TokenDataset(out)
    assert len(data) == 3
    if layout == "files":
        expected = [np.load(out / f"im{i}.npy") for i in range(3)]
    else:
        packed = np.load(out / "tokens.npy")
        order = (out / "paths.txt").read_text().split()
        expected = [packed[order.index(f"im{i}")] for i in range(3)]
    for i in range(3):
        tokens, label = data[i]
        np.testing.assert_array_equal(tokens.numpy(), expected[i])
        assert label == -1
    assert _cli("tokens", "verify", str(out)).returncode == 0
