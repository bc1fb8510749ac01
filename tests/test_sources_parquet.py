"""Images read in place from Parquet files in the Hugging Face image layout: rows, labels, other
column names, bad files named in one line."""

from __future__ import annotations

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SKIMAGE

from optvq_cli.sources.parquet import ContainerError, ParquetReader, class_names, find_parquet, list_parquet

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")


def _hf_table(start: int, n: int, image: str = "image", label: str = "label", names: bool = False) -> pa.Table:
    """The Hugging Face image layout: image {bytes, path}, label int64 (ClassLabel metadata optional)."""
    photos = [PHOTOS[i % len(PHOTOS)] for i in range(start, start + n)]
    images = [{"bytes": (SKIMAGE / p).read_bytes(), "path": p} for p in photos]
    table = pa.table({image: pa.array(images), label: pa.array([i % 3 for i in range(start, start + n)], pa.int64())})
    if names:
        features = {"image": {"_type": "Image"}, label: {"_type": "ClassLabel", "names": ["cat", "dog", "owl"]}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    return table


def test_rows_and_bytes_equal_what_pyarrow_reads(tmp_path):
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(_hf_table(0, 7, names=True), path, row_group_size=3)  # groups of 3, 3, 1
    rows = list(list_parquet(path))
    reference = pq.read_table(path).to_pylist()
    assert [(r.row_group, r.row_in_group) for r in rows] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    assert [r.member for r in rows] == [str(i) for i in range(7)]
    assert [r.label for r in rows] == [ref["label"] for ref in reference]
    reader = pickle.loads(pickle.dumps(ParquetReader()))  # as a DataLoader worker gets it
    assert [reader.read(r) for r in rows] == [ref["image"]["bytes"] for ref in reference]
    assert reader.read(rows[4]) == (SKIMAGE / PHOTOS[4]).read_bytes()  # the original file
    assert class_names(path) == ["cat", "dog", "owl"]


def test_reading_out_of_order_decodes_only_the_needed_group(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(_hf_table(0, 6), path, row_group_size=2)
    rows = list(list_parquet(path))
    reader = ParquetReader()
    for r in (rows[5], rows[0], rows[3], rows[1]):
        assert reader.read(r) == (SKIMAGE / PHOTOS[int(r.member) % len(PHOTOS)]).read_bytes()
        assert reader._group == (str(path), r.row_group) and len(reader._images) == 2  # one group held


def test_other_column_names_binary_images_and_string_labels(tmp_path):
    path = tmp_path / "x.parquet"
    table = pa.table(
        {
            "jpg": pa.array([(SKIMAGE / p).read_bytes() for p in PHOTOS[:3]], pa.large_binary()),
            "cls": ["tabby", "astronaut", "mug"],
        }
    )
    pq.write_table(table, path)
    rows = list(list_parquet(path, image_column="jpg", label_column="cls"))
    assert [r.label for r in rows] == ["tabby", "astronaut", "mug"]
    assert [ParquetReader("jpg").read(r) for r in rows] == [(SKIMAGE / p).read_bytes() for p in PHOTOS[:3]]
    with pytest.raises(ContainerError, match=r"x.parquet: no column 'image' .*--image-column"):
        list(list_parquet(path))
    with pytest.raises(ContainerError, match=r"no column 'label_id' .*--label-column"):
        list(list_parquet(path, image_column="jpg", label_column="label_id"))
    with pytest.raises(ContainerError, match=r"column 'cls' is string, not image bytes"):
        list(list_parquet(path, image_column="cls"))


def test_without_a_label_column_labels_are_none(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(_hf_table(0, 2).drop_columns(["label"]), path)
    assert [r.label for r in list_parquet(path)] == [None, None]
    assert class_names(path) is None


def test_a_folder_of_files_in_name_order(tmp_path):
    for s in (1, 0):
        pq.write_table(_hf_table(s * 2, 2), tmp_path / f"train-{s:05d}.parquet")
    (tmp_path / "sub").mkdir()
    pq.write_table(_hf_table(0, 1), tmp_path / "sub" / "test-00000.parquet")
    assert [p.name for p in find_parquet(tmp_path)] == ["train-00000.parquet", "train-00001.parquet"]


@pytest.mark.parametrize("damage", ["footer", "truncated", "not parquet"])
def test_a_bad_file_is_one_error_naming_it(tmp_path, damage):
    path = tmp_path / "bad.parquet"
    pq.write_table(_hf_table(0, 3), path)
    data = path.read_bytes()
    if damage == "footer":
        data = data[:-4] + b"XXXX"  # the closing magic
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = (SKIMAGE / PHOTOS[0]).read_bytes()
    path.write_bytes(data)
    with pytest.raises(ContainerError, match=r"bad.parquet: not a readable Parquet file"):
        list(list_parquet(path))


def test_a_row_without_image_bytes_fails_alone(tmp_path):
    path = tmp_path / "x.parquet"
    images = pa.array([{"bytes": (SKIMAGE / PHOTOS[0]).read_bytes(), "path": "a"}, None, {"bytes": None, "path": "c"}])
    pq.write_table(pa.table({"image": images, "label": [0, 1, 2]}), path)
    rows = list(list_parquet(path))
    reader = ParquetReader()
    assert reader.read(rows[0]) == (SKIMAGE / PHOTOS[0]).read_bytes()
    for r in rows[1:]:
        with pytest.raises(OSError, match=rf"x.parquet/{r.member}: no image bytes"):
            reader.read(r)
