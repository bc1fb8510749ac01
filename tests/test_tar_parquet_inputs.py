"""Tar shards and Parquet files as inputs, through the CLI: the same photographs give the same
tokens and labels from class folders, one tar, WebDataset shards, a brace pattern, ImageNet's
nested tar and a Hugging Face Parquet file; damaged containers and members; resume; ranks."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch.multiprocessing as mp
from conftest import SKIMAGE, sigkill_a_shards_run
from PIL import Image
from test_extract import _files, _rank
from test_extract import model_dir as model_dir  # noqa: F401 - the fixture: a model whose codes spread

from optvq_cli import sources
from optvq_cli.tokenize.dataset import TokenDataset
from optvq_cli.tokenize.shard_batches import in_worker_runs
from optvq_cli.tokenize.shards import Shard, shard_name

# three classes (synset-like names, so ImageNet's nested tar names them too) of two photographs
CLASSES = {
    "n01443537": ["astronaut", "chelsea"],
    "n02123045": ["coffee", "rocket"],
    "n03000134": ["motorcycle_left", "hubble_deep_field"],
}
SOURCE = {"rocket": "rocket.jpg", "hubble_deep_field": "hubble_deep_field.jpg"}


def _small_png(name: str) -> bytes:
    """A skimage photograph made small (the longer side 64 px), as PNG bytes."""
    im = Image.open(SKIMAGE / SOURCE.get(name, f"{name}.png")).convert("RGB")
    im.thumbnail((64, 64))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _photos() -> list[tuple[str, str, bytes]]:
    """(class, name, PNG bytes) in class-folder order (class, then name)."""
    return [(c, n, _small_png(n)) for c in sorted(CLASSES) for n in sorted(CLASSES[c])]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _webdataset(path: Path, photos, label: str) -> None:
    """Samples CLASS_NAME.png with a .cls member: the class number (label="int") or its name."""
    classes = sorted(CLASSES)
    with tarfile.open(path, "w") as tf:
        for c, n, data in photos:
            _add(tf, f"{c}_{n}.png", data)
            _add(tf, f"{c}_{n}.cls", (str(classes.index(c)) if label == "int" else c).encode())


def _hf_table(photos, image: str = "image", label: str = "label") -> pa.Table:
    """The Hugging Face image layout: image {bytes, path}, an int64 label in sorted class order,
    and the ClassLabel names in the file's metadata."""
    classes = sorted(CLASSES)
    images = [{"bytes": data, "path": f"{n}.png"} for _, n, data in photos]
    table = pa.table({image: pa.array(images), label: pa.array([classes.index(c) for c, _, _ in photos], pa.int64())})
    features = {image: {"_type": "Image"}, label: {"_type": "ClassLabel", "names": classes}}
    return table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path | str]:
    """The same six photographs in every layout."""
    root = tmp_path_factory.mktemp("inputs")
    photos = _photos()
    for c, n, data in photos:
        (root / "folders" / c).mkdir(parents=True, exist_ok=True)
        (root / "folders" / c / f"{n}.png").write_bytes(data)
    _webdataset(root / "one.tar", photos, label="name")
    (root / "shards").mkdir()
    for s in range(3):
        _webdataset(root / "shards" / f"train-{s:04d}.tar", photos[2 * s : 2 * s + 2], label="int")
    with tarfile.open(root / "imagenet.tar", "w") as outer:
        for c in sorted(CLASSES):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tf:
                for cc, n, data in photos:
                    if cc == c:
                        _add(tf, f"{n}.JPEG", data)  # ImageNet's members are JPEG by name; Pillow reads the bytes
            _add(outer, f"{c}.tar", inner.getvalue())
    (root / "parquet").mkdir()
    pq.write_table(_hf_table(photos[:4]), root / "parquet" / "train-00000-of-00002.parquet", row_group_size=3)
    pq.write_table(_hf_table(photos[4:]), root / "parquet" / "train-00001-of-00002.parquet")
    pq.write_table(_hf_table(photos, image="img", label="y"), root / "columns.parquet", row_group_size=2)
    return {
        "folders": root / "folders",
        "one tar": root / "one.tar",
        "shards": root / "shards",
        "brace": f"{root}/shards/train-{{0000..0002}}.tar",
        "nested": root / "imagenet.tar",
        "parquet": root / "parquet",
        "columns": root / "columns.parquet",
    }


def _shards(invoke, model_dir, input, out, *extra) -> tuple[list[np.ndarray], list[int], dict]:
    code, output = invoke("encode", input, out, "--model", model_dir, "--layout", "shards", "--size", "32",
                          "--shard-size", "4", "-j", "0", "-q", *extra)  # fmt: skip
    assert code == 0, output
    data = TokenDataset(out)
    rows = [data[i] for i in range(len(data))]
    return (
        [t.numpy() for t, _ in rows],
        [int(label) for _, label in rows],
        json.loads((out / "manifest.json").read_text()),
    )


# ---------------------------------------------------------------- the same tokens from every layout


def test_every_layout_gives_the_class_folders_tokens_and_labels(inputs, model_dir, invoke, tmp_path):
    tokens, labels, index = _shards(invoke, model_dir, inputs["folders"], tmp_path / "folders")
    assert labels == [0, 0, 1, 1, 2, 2] and index["classes"] == sorted(CLASSES)
    assert len(np.unique(np.stack(tokens))) > 10  # the codes spread: equal tokens below mean something
    for kind in ("one tar", "shards", "brace", "nested", "parquet"):
        got, got_labels, got_index = _shards(invoke, model_dir, inputs[kind], tmp_path / kind.replace(" ", "-"))
        assert got_labels == labels, kind
        assert all(np.array_equal(a, b) for a, b in zip(got, tokens, strict=True)), kind
        assert got_index["failures"] == [], kind
    got, got_labels, _ = _shards(invoke, model_dir, inputs["columns"], tmp_path / "columns",
                                 "--image-column", "img", "--label-column", "y")  # fmt: skip
    assert got_labels == labels and all(np.array_equal(a, b) for a, b in zip(got, tokens, strict=True))


def test_rows_name_their_container_and_member_and_labels_their_origin(inputs, model_dir, invoke, tmp_path):
    _, _, index = _shards(invoke, model_dir, inputs["shards"], tmp_path / "s")
    paths = Shard(tmp_path / "s" / shard_name(0)).read_all().paths
    assert paths[:3] == ["train-0000.tar/n01443537_astronaut.png", "train-0000.tar/n01443537_chelsea.png",
                         "train-0001.tar/n02123045_coffee.png"]  # fmt: skip
    assert index["classes"] is None  # .cls numbers: kept as they are, no names given
    _, _, index = _shards(invoke, model_dir, inputs["nested"], tmp_path / "n")
    assert Shard(tmp_path / "n" / shard_name(0)).read_all().paths[0] == "imagenet.tar/n01443537.tar/astronaut.JPEG"
    assert (index["classes"], index["labels"]) == (sorted(CLASSES), "class tars")
    _, _, index = _shards(invoke, model_dir, inputs["parquet"], tmp_path / "p")
    assert Shard(tmp_path / "p" / shard_name(1)).read_all().paths == [
        "train-00001-of-00002.parquet/0",
        "train-00001-of-00002.parquet/1",
    ]
    assert (index["classes"], index["labels"]) == (sorted(CLASSES), "column label")  # the ClassLabel names


def test_the_files_layout_reads_tar_and_parquet_members(inputs, model_dir, invoke, tmp_path):
    outs = {}
    for kind in ("folders", "one tar", "parquet"):
        out = outs[kind] = tmp_path / kind.replace(" ", "-")
        code, output = invoke("encode", inputs[kind], out, "--model", model_dir, "--size", "32", "-j", "0", "-q")
        assert code == 0, output
    folder = np.load(outs["folders"] / "n02123045" / "rocket.npy")
    assert np.array_equal(np.load(outs["one tar"] / "one.tar" / "n02123045_rocket.npy"), folder)
    assert np.array_equal(np.load(outs["parquet"] / "train-00000-of-00002.parquet" / "3.npy"), folder)
    rows = json.loads((outs["one tar"] / "manifest.json").read_text())["images"]
    assert rows[0]["source"] == "one.tar/n01443537_astronaut.png" and rows[0]["source_member"] == (
        "n01443537_astronaut.png"
    )
    code, output = invoke("encode", inputs["one tar"], outs["one tar"], "--model", model_dir, "--size", "32", "-j", "0")
    assert code == 0 and "encoded 0 of 6, 6 already done" in output  # the container and members as they were


def test_reader_workers_follow_the_input_order_and_write_the_same_bytes(inputs, model_dir, tmp_path):
    from optvq_cli.model import load_model
    from optvq_cli.tokenize.extract import encode_shards

    # the DataLoader hands place g to worker g % 2: worker 0 gets a, b, c; worker 1 gets d, e
    assert in_worker_runs(list("abcde"), 0, 2) == list("adbec")
    # starting at place 1: places 1, 3 (worker 0) get a, b; places 0, 2, 4 (worker 1) get c, d, e
    assert in_worker_runs(list("abcde"), 1, 2) == list("cadbe")
    model = load_model(model_dir, device="cpu")
    for kind in ("parquet", "shards"):
        one = encode_shards(model, Path(inputs[kind]), tmp_path / f"{kind}0", size=32, shard_size=4, workers=0)
        two = encode_shards(model, Path(inputs[kind]), tmp_path / f"{kind}2", size=32, shard_size=4, workers=2)
        assert one.written == two.written == 6
        assert _files(tmp_path / f"{kind}0") == _files(tmp_path / f"{kind}2")


# ---------------------------------------------------------------- eval and train


def test_eval_and_train_read_tar_and_parquet(inputs, model_dir, invoke, tmp_path):
    from optvq_cli.train.data import open_splits

    reports = {}
    for kind in ("folders", "shards", "parquet"):
        code, output = invoke("eval", inputs[kind], "--model", model_dir, "--metrics", "psnr", "--resolution", "32",
                              "--json", tmp_path / f"{kind}.json")  # fmt: skip
        assert code == 0, output
        reports[kind] = json.loads((tmp_path / f"{kind}.json").read_text())
    assert reports["shards"]["count"] == reports["parquet"]["count"] == 6
    assert reports["shards"]["psnr_rgb"] == reports["folders"]["psnr_rgb"] == reports["parquet"]["psnr_rgb"]
    options = sources.SourceOptions(image_column="img", label_column="y")
    splits = open_splits(inputs["columns"], channels=3, size=16, val_size=1, source_options=options)
    assert (len(splits.train), len(splits.val)) == (5, 1) and tuple(splits.train[(0, 0)].shape) == (3, 16, 16)
    code, output = invoke("train", "--preset", "tiny", "--data", inputs["shards"], "--out", tmp_path / "run",
                          "--steps", "1", "--batch-size", "4", "-q", "--set", "val_every=0")  # fmt: skip
    assert code == 0, output
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    base = ["train", "--preset", "tiny", "--data", inputs["columns"], "--steps", "1", "--batch-size", "4", "-q"]
    base += ["--set", "val_every=0", "--set", "data.val_size=1"]
    code, output = invoke(*base, "--out", tmp_path / "run-columns", "--set", "data.image_column=img")
    assert code == 0, output  # the image column named in the config reaches the Parquet reader
    code, output = invoke(*base, "--out", tmp_path / "run-default")
    assert code != 0 and "img" in output and "columns.parquet" in output, output  # the default 'image' is absent


# ---------------------------------------------------------------- damage


def test_a_damaged_container_is_one_line_and_the_others_finish(inputs, model_dir, invoke, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):
        (shards / f"train-{s:04d}.tar").write_bytes((Path(inputs["shards"]) / f"train-{s:04d}.tar").read_bytes())
    cut = shards / "train-0001.tar"
    cut.write_bytes(cut.read_bytes()[:1500])  # inside the first image
    code, output = invoke("encode", shards, tmp_path / "out", "--model", model_dir, "--layout", "shards",
                          "--size", "32", "-j", "0", "-q")  # fmt: skip
    assert code == 1
    assert f"{cut}: truncated" in output and output.count("truncated") == 1
    assert "encoded 4 of 5" in output  # 4 images of the two good tars, and the bad tar as one line
    index = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [f["path"] for f in index["failures"]] == [str(cut)]
    folder = tmp_path / "parquet"
    folder.mkdir()
    for p in sorted(Path(inputs["parquet"]).iterdir()):
        (folder / p.name).write_bytes(p.read_bytes())
    bad = folder / "train-00000-of-00002.parquet"
    bad.write_bytes(bad.read_bytes()[:-12])  # the footer's length and magic gone
    code, output = invoke("encode", folder, tmp_path / "pout", "--model", model_dir, "--layout", "shards",
                          "--size", "32", "-j", "0", "-q")  # fmt: skip
    assert code == 1 and f"{bad}: not a readable Parquet file" in output and "encoded 2 of 3" in output


def test_a_corrupt_member_is_recorded_and_skipped(inputs, model_dir, invoke, tmp_path):
    photos = _photos()
    photos[1] = (photos[1][0], photos[1][1], photos[1][2][:200])  # chelsea cut short inside the tar
    _webdataset(tmp_path / "one.tar", photos, label="name")
    args = ["encode", tmp_path / "one.tar", tmp_path / "out", "--model", model_dir, "--layout", "shards",
            "--size", "32", "-j", "0", "-q"]  # fmt: skip
    code, output = invoke(*args)
    assert code == 1 and output.count("skipped") == 1
    assert f"{tmp_path / 'one.tar'}/n01443537_chelsea.png" in output
    index = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [f["path"] for f in index["failures"]] == ["one.tar/n01443537_chelsea.png"]
    assert len(TokenDataset(tmp_path / "out")) == 5
    code, output = invoke(*args, "--retry-failed")  # still cut: tried again, recorded again
    assert code == 1 and "encoded 0 of 6, 5 already done, 1 failed" in output


def test_a_wrong_column_is_one_line_before_the_model_loads(inputs, invoke, tmp_path):
    code, output = invoke("encode", inputs["columns"], tmp_path / "out", "--model", tmp_path / "no-model")
    assert code == 1 and "no column 'image'" in output and "fix --image-column" in output
    code, output = invoke("encode", inputs["columns"], tmp_path / "out", "--model", tmp_path / "no-model",
                          "--image-column", "img", "--label-column", "class")  # fmt: skip
    assert code == 1 and "no column 'class'" in output and "fix --label-column" in output


def _mirrored(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buf, format="PNG")
    return buf.getvalue()


def test_reconstruct_and_encode_read_the_image_column_named_and_refuse_another_on_a_rerun(
    inputs, model_dir, invoke, tmp_path
):
    photos = _photos()
    table = _hf_table(photos, image="img", label="y")
    mirrored = pa.array([{"bytes": _mirrored(d), "path": f"{n}.png"} for _, n, d in photos])
    pq.write_table(table.append_column("mirrored", mirrored), tmp_path / "two.parquet")

    def run(command, input, out, *extra):
        return invoke(command, input, out, "--model", model_dir, "--size", "32", "-j", "0", "-q", *extra)

    assert run("reconstruct", inputs["folders"], tmp_path / "from-folders")[0] == 0
    code, output = run("reconstruct", tmp_path / "two.parquet", tmp_path / "rec", "--image-column", "img")
    assert code == 0, output
    pngs = sorted(p.read_bytes() for p in (tmp_path / "rec").rglob("*.png"))
    assert pngs == sorted(p.read_bytes() for p in (tmp_path / "from-folders").rglob("*.png"))  # the same pixels
    for command, out in (("reconstruct", "rec"), ("encode", "enc")):
        if command == "encode":
            assert run(command, tmp_path / "two.parquet", tmp_path / out, "--image-column", "img")[0] == 0
        code, output = run(command, tmp_path / "two.parquet", tmp_path / out, "--image-column", "mirrored")
        assert code == 1 and "different image_column" in output and "--overwrite" in output, output
    code, output = run("reconstruct", tmp_path / "two.parquet", tmp_path / "rec", "--image-column", "mirrored",
                       "--overwrite")  # fmt: skip
    assert code == 0, output
    assert sorted(p.read_bytes() for p in (tmp_path / "rec").rglob("*.png")) != pngs


# ---------------------------------------------------------------- resume and ranks


@pytest.mark.slow
def test_a_sigkilled_tar_run_resumes_to_the_same_bytes(inputs, model_dir, tmp_path):
    from optvq_cli.model import load_model
    from optvq_cli.tokenize.extract import encode_shards

    out, whole = tmp_path / "out", tmp_path / "whole"
    src = str(inputs["shards"])
    sigkill_a_shards_run(model_dir, src, out, "32")
    model = load_model(model_dir, device="cpu")
    resumed = encode_shards(model, Path(src), out, size=32, shard_size=2, batch_size=1, workers=0)
    assert resumed.shards_skipped >= 1 and resumed.written <= 4
    encode_shards(model, Path(src), whole, size=32, shard_size=2, batch_size=1, workers=0)
    assert _files(out) == _files(whole)


@pytest.mark.slow
def test_two_gloo_processes_over_tar_shards_write_what_one_does(inputs, model_dir, tmp_path):
    from optvq_cli.model import load_model
    from optvq_cli.tokenize.extract import encode_shards

    two, one = tmp_path / "two", tmp_path / "one"
    args = (2, str(tmp_path / "init"), str(model_dir), str(inputs["shards"]), str(two))
    mp.start_processes(_rank, args=args, nprocs=2, join=True, start_method="spawn")
    summaries = [json.loads((two / f"summary{r}.json").read_text()) for r in range(2)]
    assert summaries == [[6, 3], [6, 3]]  # every rank reports the whole run: 6 images, 3 shards of 2
    for r in range(2):
        (two / f"summary{r}.json").unlink()
    model = load_model(model_dir, device="cpu")
    encode_shards(model, Path(inputs["shards"]), one, shard_size=2, views="center,flip", workers=0)
    assert _files(two) == _files(one)
