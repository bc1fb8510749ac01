"""`encode --layout shards` as a library call: shards, resume, labels, views, failures, ranks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from conftest import sigkill_a_shards_run
from PIL import Image

from optvq_cli.core.errors import UserError
from optvq_cli.core.lock import FolderBusy, folder_lock
from optvq_cli.model import load_model
from optvq_cli.tokenize import extract, shard_batches, views
from optvq_cli.tokenize.dataset import TokenDataset, describe_output, verify_output
from optvq_cli.tokenize.extract import encode_shards
from optvq_cli.tokenize.shards import Shard, shard_name

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny preset with its codes taken from its own features of noise images: a random codebook
    gives one token everywhere, which would make every equality of tokens below trivially true."""
    from optvq_cli.core.images import to_tensor
    from optvq_cli.model import build_model, save_model

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    rng = np.random.default_rng(0)
    x = torch.stack([to_tensor(rng.integers(0, 256, (32, 32, 3), np.uint8)) for _ in range(8)])
    q = model.quantize
    with torch.no_grad():
        pool = model.features(x).permute(0, 2, 3, 1).reshape(-1, q.code_dim)
        q.embedding.weight.copy_(
            pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[: q.n_codes]]
        )
        q.proj.weight.copy_(torch.eye(q.code_dim))
        q.proj.bias.zero_()
    return save_model(model, tmp_path_factory.mktemp("spread-model"))


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, device="cpu")


def test_the_test_model_gives_many_tokens(model):
    rng = np.random.default_rng(7)
    x = torch.stack([torch.from_numpy(rng.integers(0, 256, (3, 32, 32))).float() / 127.5 - 1 for _ in range(2)])
    assert model.encode_indices(x).unique().numel() > 20


def _picture(rng, h=40, w=52):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))


def _class_folders(root: Path, per_class: int = 3) -> Path:
    """root/{cat,dog}/{0..per_class-1}.png, random pixels."""
    rng = np.random.default_rng(0)
    for c in ("dog", "cat"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            _picture(rng).save(root / c / f"{i}.png")
    return root


def _encode(model, src, out, **kw):
    kw.setdefault("workers", 0)
    return encode_shards(model, src, out, **kw)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file optvq wrote under folder (the lock file aside), by relative path."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".optvq.lock"
    }


def test_shards_rows_and_class_labels(tmp_path, model):
    src = _class_folders(tmp_path / "in")
    summary = _encode(model, src, tmp_path / "out", shard_size=4)
    assert (summary.written, summary.failed, summary.shards_written) == (6, [], 2)
    index = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert index["classes"] == ["cat", "dog"] and index["labels"] == "class folders"
    assert [s["images"] for s in index["shards"]] == [4, 2]
    assert index["model"]["sha256"] == model.sha256 and index["complete"] is True
    data = TokenDataset(tmp_path / "out")
    assert len(data) == 6 and [data[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]  # cat/*, then dog/*
    row = Shard(tmp_path / "out" / shard_name(1)).row(1)
    assert row["path"] == "dog/2.png" and row["size"] == (52, 40) and row["crop"] == (6, 0, 46, 40)
    assert verify_output(tmp_path / "out") == []
    assert describe_output(tmp_path / "out")["classes"] == 2


def test_progress_counts_images_and_the_wait_for_data(tmp_path, model):
    src = _class_folders(tmp_path / "in")
    calls = []
    _encode(model, src, tmp_path / "out", shard_size=4, batch_size=2, progress=lambda *a: calls.append(a))
    assert [c[:3] for c in calls] == [(0, 6, 0)] + [(k, 6, 0) for k in range(2, 7, 2)]
    assert all(c[3].startswith("device waited ") and c[3].endswith("%") for c in calls[1:])


def test_reader_workers_write_the_same_bytes(tmp_path, model):
    src = _class_folders(tmp_path / "in")
    _encode(model, src, tmp_path / "w0", shard_size=4, workers=0)
    _encode(model, src, tmp_path / "w2", shard_size=4, workers=2, batch_size=2)
    assert _files(tmp_path / "w0") == _files(tmp_path / "w2")


@pytest.mark.slow
def test_shards_hold_the_files_layout_tokens(tmp_path, model, model_dir):
    """The per-file layout, through the CLI, is the reference for the tokens."""
    src = _class_folders(tmp_path / "in")
    _encode(model, src, tmp_path / "out", shard_size=4)
    files = tmp_path / "files"
    res = subprocess.run(
        [sys.executable, "-m", "optvq_cli", "encode", str(src), str(files), "--model", str(model_dir)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    data = TokenDataset(tmp_path / "out")
    order = [f"{c}/{i}" for c in ("cat", "dog") for i in range(3)]  # sorted paths
    for row, name in enumerate(order):
        np.testing.assert_array_equal(data[row][0].numpy(), np.load(files / f"{name}.npy"))


@pytest.mark.parametrize("kind", ["csv", "json"])
def test_labels_from_a_file(tmp_path, model, kind):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png", "c.png"):
        _picture(rng).save(src / name)
    table = {"a.png": "zebra", "b.png": "ant", "c.png": "zebra"}
    labels = tmp_path / f"labels.{kind}"
    if kind == "csv":
        labels.write_text("path,label\n" + "".join(f"{k},{v}\n" for k, v in table.items()))
    else:
        labels.write_text(json.dumps({str(src / k): v for k, v in table.items()}))  # absolute paths work too
    _encode(model, src, tmp_path / "out", labels=labels)
    index = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert index["classes"] == ["ant", "zebra"]
    assert [TokenDataset(tmp_path / "out")[i][1] for i in range(3)] == [1, 0, 1]


def test_integer_labels_kept_and_a_missing_label_refused(tmp_path, model):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(2)
    for name in ("a.png", "b.png"):
        _picture(rng).save(src / name)
    labels = tmp_path / "labels.csv"
    labels.write_text("a.png,7\nb.png,3\n")
    _encode(model, src, tmp_path / "out", labels=labels)
    assert [TokenDataset(tmp_path / "out")[i][1] for i in range(2)] == [7, 3]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["classes"] is None
    labels.write_text("a.png,7\n")
    with pytest.raises(UserError, match=r"no label for 1 image\(s\) \(first: b.png\)"):
        _encode(model, src, tmp_path / "out2", labels=labels)


def test_no_labels_outside_class_folders(tmp_path, model):
    src = tmp_path / "in"
    (src / "deep" / "er").mkdir(parents=True)
    rng = np.random.default_rng(3)
    _picture(rng).save(src / "top.png")
    _picture(rng).save(src / "deep" / "er" / "x.png")
    _encode(model, src, tmp_path / "out")
    assert [TokenDataset(tmp_path / "out")[i][1] for i in range(2)] == [-1, -1]


def test_flip_view_is_the_flipped_image(tmp_path, model):
    rng = np.random.default_rng(4)
    src, mirrored = tmp_path / "in", tmp_path / "mirrored"
    src.mkdir()
    mirrored.mkdir()
    for i in range(3):
        im = _picture(rng, 37, 50)  # odd margins: the mirrored centre box is not the same box
        im.save(src / f"{i}.png")
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored / f"{i}.png")
    _encode(model, src, tmp_path / "a", views="center,flip", batch_size=2)
    _encode(model, mirrored, tmp_path / "b", views="center,flip", batch_size=2)
    a, b = TokenDataset(tmp_path / "a"), TokenDataset(tmp_path / "b")
    assert len(a) == 6 and a.views == ["center", "flip"]
    for i in range(3):
        assert torch.equal(a[2 * i + 1][0], b[2 * i][0])  # flip of the image == centre of the mirrored file
        assert torch.equal(a[2 * i][0], b[2 * i + 1][0])
    flips = TokenDataset(tmp_path / "a", view="flip")
    assert torch.equal(flips[1][0], b[2][0])
    # 50 x 37: the centre square is x 6..43; mirrored, the flipped image's box 6..43 is x 7..44 here
    assert Shard(tmp_path / "a" / shard_name(0)).row(1)["crop"] == (7, 0, 44, 37)


def test_tencrop_views_are_the_corner_and_centre_crops(tmp_path, model):
    """A 35 px square is what 1.1 x 32 rounds to: no resize, so each crop is a slice of the file."""
    rng = np.random.default_rng(5)
    src, crops = tmp_path / "in", tmp_path / "crops"
    src.mkdir()
    crops.mkdir()
    a = rng.integers(0, 256, (35, 35, 3), np.uint8)
    Image.fromarray(a).save(src / "x.png")
    corners = {"tl": (0, 0), "tr": (3, 0), "bl": (0, 3), "br": (3, 3), "center": (1, 1)}
    for name, (x, y) in corners.items():
        Image.fromarray(a[y : y + 32, x : x + 32]).save(crops / f"{name}.png")
        Image.fromarray(a[y : y + 32, x : x + 32][:, ::-1]).save(crops / f"{name}_flip.png")
    _encode(model, src, tmp_path / "ten", views="tencrop")
    _encode(model, crops, tmp_path / "ref")
    ten, ref = TokenDataset(tmp_path / "ten"), TokenDataset(tmp_path / "ref")
    assert ten.views == list(views.VIEW_SETS["tencrop"]) and len(ten) == 10
    ref_names = sorted(f"{n}{s}" for n in corners for s in ("", "_flip"))  # the walk's sorted order
    for v, view in enumerate(ten.views):
        assert torch.equal(ten[v][0], ref[ref_names.index(view)][0]), view
    shard = Shard(tmp_path / "ten" / shard_name(0))
    assert shard.row(3)["crop"] == (3, 3, 35, 35) and shard.row(8)["view"] == "br_flip"


def test_a_corrupt_image_is_recorded_and_retried(tmp_path, model):
    src = _class_folders(tmp_path / "in")
    good = (src / "dog" / "1.png").read_bytes()
    (src / "dog" / "1.png").write_bytes(good[: len(good) // 2])  # truncated
    out = tmp_path / "out"
    seen = []
    summary = _encode(model, src, out, shard_size=4, on_failure=lambda p, r: seen.append(p))
    assert [p for p, _ in summary.failed] == ["dog/1.png"] and seen == [str(src / "dog" / "1.png")]
    assert "truncated" in summary.failed[0][1]
    index = json.loads((out / "manifest.json").read_text())
    assert index["failures"][0]["path"] == "dog/1.png" and index["failures"][0]["shard"] == 1
    assert [s["images"] for s in index["shards"]] == [4, 1]  # the rest of shard 1 is there
    assert Shard(out / shard_name(1)).read_all().paths == ["dog/2.png"]
    (src / "dog" / "1.png").write_bytes(good)
    again = _encode(model, src, out, shard_size=4)  # a plain rerun keeps the failure on record
    assert again.written == 0 and [p for p, _ in again.failed] == ["dog/1.png"]
    retried = _encode(model, src, out, shard_size=4, retry_failed=True)
    assert retried.written == 1 and retried.failed == [] and retried.skipped == 5
    fresh = tmp_path / "fresh"
    _encode(model, src, fresh, shard_size=4)
    assert _files(out) == _files(fresh)


def test_a_finished_run_reads_no_image_again(tmp_path, model, monkeypatch):
    src = _class_folders(tmp_path / "in")
    out = tmp_path / "out"
    _encode(model, src, out, shard_size=4)
    before = _files(out)

    def no_reading(*a, **k):
        raise AssertionError("an image was read")

    monkeypatch.setattr(shard_batches, "read_image", no_reading)
    calls = []
    summary = _encode(model, src, out, shard_size=4, progress=lambda *a: calls.append(a))
    assert (summary.written, summary.skipped, summary.shards_skipped) == (0, 6, 2)
    assert calls == [(6, 6, 6, "")]
    assert _files(out) == before


def test_a_missing_shard_is_redone_alone(tmp_path, model):
    src = _class_folders(tmp_path / "in")
    out = tmp_path / "out"
    _encode(model, src, out, shard_size=2)
    before = _files(out)
    (out / shard_name(1)).unlink()
    summary = _encode(model, src, out, shard_size=2)
    assert (summary.written, summary.shards_written, summary.shards_skipped) == (2, 1, 2)
    assert _files(out) == before


def test_other_inputs_or_settings_are_refused(tmp_path, model):
    src = _class_folders(tmp_path / "in")
    out = tmp_path / "out"
    _encode(model, src, out, shard_size=4)
    _picture(np.random.default_rng(9)).save(src / "cat" / "new.png")
    with pytest.raises(UserError, match=r"input list or --shard-size \(6 images .* vs 7"):
        _encode(model, src, out, shard_size=4)
    with pytest.raises(UserError, match="views"):
        _encode(model, src, out, shard_size=4, views="center,flip")
    summary = _encode(model, src, out, shard_size=4, overwrite=True)
    assert summary.written == 7 and len(TokenDataset(out)) == 7


def test_a_foreign_file_and_a_busy_folder_are_refused(tmp_path, model):
    src = _class_folders(tmp_path / "in")
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / shard_name(0)).write_bytes(b"mine")
    with pytest.raises(UserError, match="optvq did not write it"):
        _encode(model, src, out)
    assert (out / shard_name(0)).read_bytes() == b"mine"
    with folder_lock(tmp_path / "busy"), pytest.raises(FolderBusy, match=f"pid {os.getpid()}"):
        _encode(model, src, tmp_path / "busy")


def test_option_mistakes_are_one_line():
    with pytest.raises(UserError, match="--views fivecrop"):
        extract.check_shard_options(views="fivecrop")
    with pytest.raises(UserError, match="--no-crop"):
        extract.check_shard_options(crop=False)
    with pytest.raises(UserError, match="--shard-size 0"):
        extract.check_shard_options(shard_size=0)


def test_sinkhorn_index_says_batches_are_pools(tmp_path, model):
    src = _class_folders(tmp_path / "in")
    _encode(model, src, tmp_path / "out", assign="sinkhorn", batch_size=4)
    index = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert index["assign"] == "sinkhorn" and index["batch_size"] == 4
    assert "own rank" in index["pools"]


@pytest.mark.slow
def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path, model, model_dir):
    src = _class_folders(tmp_path / "in")
    out, whole = tmp_path / "out", tmp_path / "whole"
    sigkill_a_shards_run(model_dir, src, out)
    resumed = _encode(model, src, out, shard_size=2, batch_size=1)
    assert resumed.shards_skipped >= 1 and resumed.written <= 4
    _encode(model, src, whole, shard_size=2, batch_size=1)
    assert _files(out) == _files(whole)


def _rank(rank: int, world: int, init_file: str, model_dir: str, src: str, out: str) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    if rank == 1:  # the last rank to finish a shard: rank 0 must wait for it before the index
        call = shard_batches.Encoder.__call__
        shard_batches.Encoder.__call__ = lambda self, pixels: (time.sleep(0.5), call(self, pixels))[1]
    model = load_model(model_dir, device="cpu")
    summary = encode_shards(model, Path(src), Path(out), shard_size=2, views="center,flip", workers=0)
    Path(out, f"summary{rank}.json").write_text(json.dumps([summary.written, summary.shards_written]))
    torch_dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_write_what_one_does(tmp_path, model, model_dir):
    src = _class_folders(tmp_path / "in", per_class=5)  # 10 images, 5 shards: ranks take 3 and 2
    two, one = tmp_path / "two", tmp_path / "one"
    args = (2, str(tmp_path / "init"), str(model_dir), str(src), str(two))
    mp.start_processes(_rank, args=args, nprocs=2, join=True, start_method="spawn")
    summaries = [json.loads((two / f"summary{r}.json").read_text()) for r in range(2)]
    assert summaries == [[10, 5], [10, 5]]  # every rank reports the whole run
    for r in range(2):
        (two / f"summary{r}.json").unlink()
    _encode(model, src, one, shard_size=2, views="center,flip")
    assert _files(two) == _files(one)


_TORCHRUN_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from optvq_cli.core import dist
from optvq_cli.model import load_model
from optvq_cli.tokenize.extract import encode_shards

torch.set_num_threads(1)
model = load_model(sys.argv[1], device="cpu")
summary = encode_shards(model, Path(sys.argv[2]), Path(sys.argv[3]), shard_size=3, workers=0)
assert not dist.is_initialized()  # the group encode_shards made is gone again
print(json.dumps([summary.written, summary.shards_written]))
"""


@pytest.mark.slow
def test_torchrun_ranks_join_by_themselves(tmp_path, model, model_dir):
    src = _class_folders(tmp_path / "in")
    script = tmp_path / "run.py"
    script.write_text(_TORCHRUN_SCRIPT)
    out, one = tmp_path / "out", tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [*cmd, str(script), str(model_dir), str(src), str(out)], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # both ranks report all 6 images (their lines may interleave on the shared pipe)
    assert len(re.findall(r"\[6, \d+\]", res.stdout)) == 2, res.stdout
    _encode(model, src, one, shard_size=3)
    assert _files(out) == _files(one)


def test_tokens_info_names_the_labels_and_failures(tmp_path, model):
    src = _class_folders(tmp_path / "in")
    (src / "cat" / "broken.png").write_bytes(b"not a png")
    _encode(model, src, tmp_path / "out", views="center,flip")
    res = subprocess.run(
        [sys.executable, "-m", "optvq_cli", "tokens", "info", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert "6 images, 12 rows" in res.stdout and "labels: 2 classes (class folders)" in res.stdout
    assert "views: center, flip" in res.stdout and "failures: 1" in res.stdout


@pytest.mark.slow
def test_optvq_encode_layout_shards_through_the_cli(tmp_path, model_dir):
    """`optvq encode --layout shards` writes shards that `tokens verify` accepts and TokenDataset reads
    with the class-folder labels and one row per view; a rerun has nothing left to do."""
    src = _class_folders(tmp_path / "in", per_class=2)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "optvq_cli", "encode", str(src), str(out), "--model", str(model_dir)]
    args += ["--layout", "shards", "--shard-size", "3", "--views", "center,flip", "-q"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("encoded 4 of 4")
    import optvq_cli

    data = optvq_cli.TokenDataset(out)  # the public name
    assert len(data) == 8 and sorted({data[i][1] for i in range(8)}) == [0, 1]
    assert len(TokenDataset(out, view="flip")) == 4
    check = subprocess.run([sys.executable, "-m", "optvq_cli", "tokens", "verify", str(out)], capture_output=True)
    assert check.returncode == 0, check.stderr
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "encoded 0 of 4, 4 already done" in again.stdout
    bad = subprocess.run([*args, "--pack"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --layout shards")
