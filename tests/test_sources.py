"""The source layer: the built-in folder, list and file kinds, the registry of kinds, labels, and
a kind added in a few lines that `encode` (files and shards), `reconstruct`, `eval` and `train`
all read."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_images import _rgb, _save

from optvq_cli import sources
from optvq_cli.core.errors import UserError


def find_inputs(input: Path, exclude=()) -> tuple[Path, list[sources.Item], list[tuple[str, str]]]:
    found = sources.find(input, exclude)
    return found.root, found.items, found.problems


# ---------------------------------------------------------------- finding inputs


def test_folder_is_walked_recursively_in_sorted_order_skipping_non_images_hidden_and_output(tmp_path):
    src = tmp_path / "src"
    for rel in ["b.png", "a.jpg", "sub/c.webp", "sub/deeper/d.bmp", ".hidden.png", ".git/e.png", "out/f.png"]:
        _save(src / rel, _rgb())
    (src / "notes.txt").write_text("not an image")
    root, items, problems = find_inputs(src, exclude=[src / "out"])
    assert root == src
    assert [it.name for it in items] == ["a", "b", "sub/c", "sub/deeper/d"]
    assert items[2].path == src / "sub" / "c.webp"
    assert problems == []


def test_a_relative_input_folder_names_its_images_relative_to_itself(tmp_path, monkeypatch):
    for rel in ["top.png", "sub/low.png"]:
        _save(tmp_path / "in" / rel, _rgb())
    monkeypatch.chdir(tmp_path / "in")
    root, items, _ = find_inputs(Path("."))
    assert [it.name for it in items] == ["sub/low", "top"]
    assert [it.path.resolve() for it in items] == [tmp_path / "in/sub/low.png", tmp_path / "in/top.png"]


def test_single_file_is_named_by_its_stem(tmp_path):
    p = _save(tmp_path / "cat.photo.png", _rgb())
    root, items, problems = find_inputs(p)
    assert (root, [it.name for it in items], problems) == (tmp_path, ["cat.photo"], [])


def test_txt_list_relative_paths_comments_and_missing_files(tmp_path):
    _save(tmp_path / "imgs/x/one.png", _rgb())
    _save(tmp_path / "imgs/y/two.png", _rgb())
    lst = tmp_path / "list.txt"
    lst.write_text("# my photos\nimgs/x/one.png\n\n" + str(tmp_path / "imgs/y/two.png") + "\nimgs/gone.png\n")
    root, items, problems = find_inputs(lst)
    assert root == (tmp_path / "imgs").resolve()
    assert [it.name for it in items] == ["x/one", "y/two"]
    assert len(problems) == 1 and problems[0][0].endswith("gone.png") and "no such file" in problems[0][1]


def test_two_inputs_with_the_same_output_name_are_reported_not_overwritten(tmp_path):
    _save(tmp_path / "a.jpg", _rgb())
    _save(tmp_path / "a.png", _rgb())
    _, items, problems = find_inputs(tmp_path)
    assert [it.path.name for it in items] == ["a.jpg"]
    assert problems[0][0].endswith("a.png") and "same output name" in problems[0][1]


def test_missing_input_and_empty_folder_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        find_inputs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        find_inputs(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("# nothing\n")
    with pytest.raises(UserError, match="names no images"):
        find_inputs(tmp_path / "blank.txt")


def test_txt_list_with_a_bom_and_a_path_listed_twice(tmp_path):
    _save(tmp_path / "a.png", _rgb())
    _save(tmp_path / "b.png", _rgb())
    lst = tmp_path / "list.txt"
    lst.write_bytes("a.png\nb.png\n./a.png\n".encode("utf-8-sig"))  # Notepad's BOM before the first path
    _, items, problems = find_inputs(lst)
    assert [it.name for it in items] == ["a", "b"]
    assert len(problems) == 1 and problems[0][1] == f"listed twice in {lst}; encoded once"


def test_unreadable_subfolders_are_reported(tmp_path, monkeypatch):
    import os

    _save(tmp_path / "ok" / "a.png", _rgb())
    _save(tmp_path / "locked" / "b.png", _rgb())
    real = os.scandir

    def scandir(path="."):
        if Path(path) == tmp_path / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    _, items, problems = find_inputs(tmp_path)
    assert [it.name for it in items] == ["ok/a"]
    assert problems == [
        (str(tmp_path / "locked"), "cannot read this folder (permission denied); its images were skipped")
    ]


def test_check_input_is_cheap_and_says_what_is_wrong(tmp_path):
    check_input = sources.check
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no images found"):
        check_input(tmp_path / "empty")
    _save(tmp_path / "empty" / "out" / "a.png", _rgb())  # images only inside OUTPUT do not count
    with pytest.raises(UserError, match="no images found"):
        check_input(tmp_path / "empty", exclude=[tmp_path / "empty" / "out"])
    check_input(tmp_path / "empty")  # finds out/a.png


def test_a_folder_lists_sorted_recursive_and_skips_hidden(tmp_path):
    for rel in ["b.png", "ab.png", "a/c.jpg", ".hidden/x.png", "a/.y.png", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    rels = [it.rel for it in sources.find(tmp_path, unique=False).items]
    assert rels == ["a/c.jpg", "ab.png", "b.png"]  # by relative path, as ls -R


# ---------------------------------------------------------------- labels


def test_class_folders_and_class_names_of_any_source_number_alike(tmp_path):
    for rel in ["dog/1.png", "cat/2.png", "cat/3.png"]:
        _save(tmp_path / "in" / rel, _rgb())
    found = sources.find(tmp_path / "in")
    assert sources.assign_labels(found) == ([0, 0, 1], ["cat", "dog"], "class folders")
    named = [sources.Item(f"x.tar/{i}.png", tmp_path / "x.tar", f"{i}.png", c) for i, c in enumerate("bab")]
    given = sources.Inputs(found.source, tmp_path, named, labels_from="cls members")
    assert sources.assign_labels(given) == ([1, 0, 1], ["a", "b"], "cls members")
    numbered = [sources.Item(f"{i}.png", tmp_path / f"{i}.png", label=v) for i, v in enumerate([7, 3])]
    assert sources.assign_labels(sources.Inputs(found.source, tmp_path, numbered)) == ([7, 3], None, "none")


def test_images_not_one_folder_deep_carry_no_label(tmp_path):
    for rel in ["top.png", "dog/1.png"]:
        _save(tmp_path / rel, _rgb())
    assert sources.assign_labels(sources.find(tmp_path)) == ([-1, -1], None, "none")


# ---------------------------------------------------------------- a kind added in a few lines


class Strip(sources.Source):
    """A test kind: images back to back in one ``.strip`` file after a JSON line [[member, class, bytes], ...]."""

    kind = "strip"

    @classmethod
    def recognises(cls, input: Path) -> bool:
        return input.suffix == ".strip"

    def list(self, exclude=()) -> sources.Inputs:
        with open(self.input, "rb") as f:
            index, offset = json.loads(f.readline()), f.tell()
        items = []
        for member, label, size in index:
            items.append(sources.Item(f"{self.input.name}/{member}", self.input, member, label, (offset, size), self))
            offset += size
        return sources.Inputs(self, self.input.parent, items, labels_from="strip classes")

    def open(self, item: sources.Item):
        self.cache["opened"] = self.cache.get("opened", 0) + 1  # per process: never pickled
        with open(item.path, "rb") as f:
            f.seek(item.at[0])
            return io.BytesIO(f.read(item.at[1]))


def write_strip(path: Path, n: int, cut: str | None = None) -> list[np.ndarray]:
    """``n`` 40 x 52 random pictures p0.png ... in classes b, a, b, a...; ``cut``: that member's
    bytes are cut short."""
    rng = np.random.default_rng(0)
    pixels, blobs = [], []
    for i in range(n):
        a = rng.integers(0, 256, (40, 52, 3), np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        blob = buf.getvalue()
        blobs.append((f"p{i}.png", "ba"[i % 2], blob[: len(blob) // 2] if cut == f"p{i}.png" else blob))
        pixels.append(a)
    head = json.dumps([[m, c, len(b)] for m, c, b in blobs]).encode() + b"\n"
    path.write_bytes(head + b"".join(b for _, _, b in blobs))
    return pixels


@pytest.fixture
def strip_kind():
    sources.register(Strip)
    yield Strip
    sources.unregister(Strip)


def test_a_registered_kind_is_asked_before_the_built_in_ones(tmp_path, strip_kind):
    write_strip(tmp_path / "set.strip", 3)
    assert sources.kind_of(tmp_path / "set.strip") is Strip and sources.is_collection(tmp_path / "set.strip")
    assert sources.kind_of(tmp_path) is sources.files.Folder
    found = sources.find(tmp_path / "set.strip")
    assert [it.rel for it in found.items] == ["set.strip/p0.png", "set.strip/p1.png", "set.strip/p2.png"]
    assert [it.name for it in found.items] == ["set.strip/p0", "set.strip/p1", "set.strip/p2"]
    assert found.items[1].display == f"{tmp_path / 'set.strip'}/p1.png"
    stat = (tmp_path / "set.strip").stat()
    assert found.items[1].identity() == {
        "source_size": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        "source_member": "p1.png",
    }
    sources.unregister(Strip)
    assert sources.kind_of(tmp_path / "set.strip") is sources.files.ImageFile


def test_members_open_in_worker_processes_and_the_cache_stays_behind(tmp_path, strip_kind):
    from torch.utils.data import DataLoader

    from optvq_cli.core.images import ImageDataset, Preprocess, collate

    pixels = write_strip(tmp_path / "set.strip", 4, cut="p2.png")
    items = sources.find(tmp_path / "set.strip").items
    items[0].open().close()
    assert items[0].source.cache == {"opened": 1}
    again = pickle.loads(pickle.dumps(items))
    assert again[0].source.cache == {} and again[0].source is again[3].source  # one source, pickled once
    ds = ImageDataset(items, 3, Preprocess(40, crop=False, multiple=4))
    samples = [s for batch in DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate) for s in batch]
    assert np.array_equal(samples[3].pixels, pixels[3])  # 52 x 40, shorter side 40 already: no resize, no padding
    assert "truncated" in samples[2].error and samples[2].pixels is None


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from optvq_cli.model import load_model

    return load_model(tiny_model_dir, device="cpu")


def test_encode_in_both_layouts_and_reconstruct_read_a_registered_kind(tmp_path, strip_kind, tiny_model):
    from optvq_cli.tokenize.dataset import TokenDataset
    from optvq_cli.tokenize.extract import encode_shards
    from optvq_cli.tokenize.pipeline import encode, reconstruct

    write_strip(tmp_path / "set.strip", 4, cut="p3.png")
    files = encode(tiny_model, tmp_path / "set.strip", tmp_path / "files", model_ref="tiny", workers=0)
    assert files.written == 3 and files.failed[0][0] == f"{tmp_path / 'set.strip'}/p3.png"
    assert sorted(p.name for p in (tmp_path / "files" / "set.strip").iterdir()) == ["p0.npy", "p1.npy", "p2.npy"]
    rows = json.loads((tmp_path / "files" / "manifest.json").read_text())["images"]
    assert [r["source"] for r in rows] == ["set.strip/p0.png", "set.strip/p1.png", "set.strip/p2.png"]
    assert rows[0]["source_member"] == "p0.png"
    rerun = encode(tiny_model, tmp_path / "set.strip", tmp_path / "files", model_ref="tiny", workers=0)
    assert (rerun.written, rerun.skipped) == (0, 3)  # the container and member are as they were
    shards = encode_shards(tiny_model, tmp_path / "set.strip", tmp_path / "shards", shard_size=2, workers=0)
    assert shards.written == 3 and len(shards.failed) == 1
    index = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert index["classes"] == ["a", "b"] and index["labels"] == "strip classes"
    assert [TokenDataset(tmp_path / "shards")[i][1] for i in range(3)] == [1, 0, 1]  # b, a, b
    rec = reconstruct(tiny_model, tmp_path / "set.strip", tmp_path / "rec", workers=0)
    assert rec.written == 3 and (tmp_path / "rec" / "set.strip" / "p0.png").is_file()


def test_eval_and_train_read_a_registered_kind(tmp_path, strip_kind, tiny_model_dir, invoke):
    from optvq_cli.eval.options import EvalOptions
    from optvq_cli.eval.run import run_eval
    from optvq_cli.train.data import open_splits

    write_strip(tmp_path / "set.strip", 6)
    report = run_eval(EvalOptions(tmp_path / "set.strip", against=tmp_path / "set.strip", metrics=("psnr",))).report
    assert report["count"] == 6 and report["psnr_rgb"] == pytest.approx(80.0)  # identical pairs: the MSE floor
    code, out = invoke(
        "eval", tmp_path / "set.strip", "--model", tiny_model_dir, "--metrics", "psnr", "--json", tmp_path / "r.json"
    )
    assert code == 0, out
    assert json.loads((tmp_path / "r.json").read_text())["count"] == 6
    splits = open_splits(tmp_path / "set.strip", "auto", channels=3, size=16, val_size=1)
    assert (len(splits.train), len(splits.val), splits.kind) == (5, 1, "folder")
    assert tuple(splits.train[(0, 0)].shape) == (3, 16, 16)
    run = tmp_path / "run"
    code, out = invoke(
        "train", "--preset", "tiny", "--data", tmp_path / "set.strip", "--out", run,
        "--steps", "1", "--batch-size", "4", "-q", "--set", "val_every=0",
    )  # fmt: skip
    assert code == 0, out
    assert (run / "model" / "model.safetensors").is_file()
