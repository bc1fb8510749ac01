"""`optvq tokens export`: an encode OUTPUT's rows as Parquet or a WebDataset tar, read back without
optvq and compared with TokenDataset row by row."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PHOTOS, SKIMAGE

from optvq_cli.tokenize.dataset import TokenDataset
from optvq_cli.tokenize.shards import Shard


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "optvq_cli", *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, tiny_model_dir):
    """Four real photographs in two class folders, encoded as shards of 3 images with two views."""
    root = tmp_path_factory.mktemp("export")
    for i, name in enumerate(PHOTOS):
        folder = root / "in" / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes((SKIMAGE / name).read_bytes())
    out = root / "tokens"
    res = _cli("encode", root / "in", out, "--model", tiny_model_dir, "--layout", "shards", "--shard-size", "3")
    assert res.returncode == 0, res.stderr
    return out


def _reference(out):
    """Every row as TokenDataset and the shards give it: (tokens, label, path, view)."""
    data = TokenDataset(out)
    index = json.loads((out / "manifest.json").read_text())
    shard_rows = [Shard(out / s["file"]).row(r) for s in index["shards"] for r in range(int(s["rows"]))]
    return [(data[i][0].numpy(), data[i][1], shard_rows[i]["path"], shard_rows[i]["view"]) for i in range(len(data))]


@pytest.mark.slow
def test_parquet_export_round_trips_every_row(encoded, tmp_path):
    out = tmp_path / "tokens.parquet"
    res = _cli("tokens", "export", encoded, out)
    assert res.returncode == 0, res.stderr
    reference = _reference(encoded)
    assert len(reference) == 4 and sorted({r[1] for r in reference}) == [0, 1]  # two classes
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[b"optvq"])
    shape = tuple(meta["shape"])
    assert shape == reference[0][0].shape and meta["classes"] == ["cats", "dogs"]
    kind = table.schema.field("tokens").type
    assert pa.types.is_fixed_size_list(kind) and kind.value_type == pa.int16() and kind.list_size == np.prod(shape)
    assert f"{len(reference)} rows" in res.stdout
    for row, (tokens, label, path, view) in zip(table.to_pylist(), reference, strict=True):
        np.testing.assert_array_equal(np.array(row["tokens"]).reshape(shape), tokens)
        assert (row["label"], row["path"], row["view"]) == (label, path, view)
    assert sorted(r[2] for r in reference) == sorted(f"{'cats' if i % 2 else 'dogs'}/{p}" for i, p in enumerate(PHOTOS))
    try:
        import datasets
    except ImportError:
        return
    loaded = datasets.load_dataset("parquet", data_files=str(out), split="train")
    assert [np.array(r["tokens"]).reshape(shape).tolist() for r in loaded] == [r[0].tolist() for r in reference]


@pytest.mark.slow
def test_webdataset_export_round_trips_every_row(encoded, tmp_path):
    out = tmp_path / "tokens.tar"
    res = _cli("tokens", "export", encoded, out, "--format", "webdataset")
    assert res.returncode == 0, res.stderr
    reference = _reference(encoded)
    with tarfile.open(out) as tf:
        members = tf.getmembers()
        assert [m.name for m in members[:3]] == ["00000000.tokens.npy", "00000000.cls", "00000000.json"]
        files = {m.name: tf.extractfile(m).read() for m in members}
    for i, (tokens, label, path, view) in enumerate(reference):
        got = np.load(io.BytesIO(files[f"{i:08d}.tokens.npy"]), allow_pickle=False)
        np.testing.assert_array_equal(got, tokens)
        assert int(files[f"{i:08d}.cls"]) == label
        assert json.loads(files[f"{i:08d}.json"]) == {"path": path, "view": view, "label": label}


@pytest.mark.slow
def test_export_refusals_are_one_line(encoded, tmp_path):
    out = tmp_path / "t.parquet"
    assert _cli("tokens", "export", encoded, out).returncode == 0
    first = out.read_bytes()
    again = _cli("tokens", "export", encoded, out)
    assert again.returncode == 1 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert _cli("tokens", "export", encoded, out, "--overwrite").returncode == 0
    assert out.read_bytes() == first  # the same rows give the same file
    foreign = tmp_path / "mine.parquet"
    pq.write_table(pq.read_table(out).drop_columns(["tokens"]).replace_schema_metadata(None), foreign)
    kept = foreign.read_bytes()
    res = _cli("tokens", "export", encoded, foreign, "--overwrite")
    assert res.returncode == 1 and "not a token export optvq wrote" in res.stderr and foreign.read_bytes() == kept
    res = _cli("tokens", "export", encoded, tmp_path / "t.csv")
    assert res.returncode == 1 and "name it NAME.parquet" in res.stderr
    res = _cli("tokens", "export", encoded, tmp_path / "t.tar", "--format", "hdf5")
    assert res.returncode == 1 and "--format hdf5" in res.stderr
    res = _cli("tokens", "export", tmp_path, tmp_path / "u.parquet")
    assert res.returncode == 1 and "no manifest" in res.stderr and not (tmp_path / "u.parquet").exists()


@pytest.mark.slow
def test_push_to_hub_offline_and_bad_repo_ids_are_one_line_before_writing(encoded, tmp_path):
    import os

    out = tmp_path / "p.parquet"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = _cli("tokens", "export", encoded, out, "--push-to-hub", "someone/tokens", env=env)
    assert res.returncode == 1 and "HF_HUB_OFFLINE" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = _cli("tokens", "export", encoded, out, "--push-to-hub", "not a repo")
    assert res.returncode == 1 and "ORG/NAME" in res.stderr
    assert not out.exists()


def test_row_groups_stay_bounded(tmp_path, monkeypatch):
    """Rows arriving in uneven batches are written as groups of ROWS_PER_GROUP (the last may be short)."""
    from optvq_cli.tokenize import export_tokens as ex

    monkeypatch.setattr(ex, "ROWS_PER_GROUP", 4)
    sizes = [3, 5, 1, 2]
    batches, k = [], 0
    for n in sizes:
        tokens = np.arange(k * 8, (k + n) * 8, dtype=np.uint16).reshape(n, 2, 2, 2)
        batches.append({"tokens": tokens, "label": np.arange(k, k + n), "path": [f"p{i}" for i in range(k, k + n)]})
        batches[-1]["view"] = ["center"] * n
        k += n
    path = tmp_path / "g.parquet"
    done = ex._write_parquet(path, iter(batches), {"n_codes": 1000})
    assert done == {"rows": 11, "shape": [2, 2, 2]}
    f = pq.ParquetFile(path)
    assert [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)] == [4, 4, 3]
    flat = np.array(f.read().column("tokens").to_pylist())
    np.testing.assert_array_equal(flat.reshape(-1), np.arange(11 * 8))
    assert f.read().column("path").to_pylist() == [f"p{i}" for i in range(11)]
