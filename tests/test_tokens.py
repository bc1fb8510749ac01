"""The token file format: dtypes, atomic writes, safe reading, validation, the manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from optvq_cli import tokens as tk
from optvq_cli.errors import UserError


@pytest.mark.parametrize(
    "n, dtype",
    [
        (1, np.uint8),
        (256, np.uint8),
        (257, np.uint16),
        (16384, np.uint16),
        (65536, np.uint16),
        (65537, np.uint32),
    ],
)
def test_smallest_unsigned_dtype_holding_n_minus_1(n, dtype):
    assert tk.uint_dtype(n) == np.dtype(dtype)


def test_save_and_load_round_trip(tmp_path):
    a = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    tk.save_npy(tmp_path / "sub" / "a.npy", a)
    b = tk.load_npy(tmp_path / "sub" / "a.npy")
    assert b.dtype == np.uint16 and (a == b).all()
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.npy"]  # no temp left behind


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "x.npy"
    tk.save_npy(target, np.zeros(3, np.uint8))
    before = target.read_bytes()

    def broken(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        tk.atomic_write(target, broken)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]


def test_remove_temp_files_only_removes_ours(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / f".a.npy{tk.TMP_MARK}123-abcd").write_bytes(b"half")
    (tmp_path / "keep.npy").write_bytes(b"x")
    (tmp_path / ".hidden").write_bytes(b"x")
    assert tk.remove_temp_files(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [".hidden", "keep.npy"]


def test_pickled_arrays_are_refused_not_loaded(tmp_path):
    p = tmp_path / "evil.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(tk.TokenError, match="pickled"):
        tk.load_npy(p)


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"garbage bytes here", "not a .npy file")])
def test_broken_npy_files(tmp_path, content, reason):
    p = tmp_path / "bad.npy"
    p.write_bytes(content)
    with pytest.raises(tk.TokenError, match=reason):
        tk.load_npy(p)


def test_truncated_npy_is_reported(tmp_path):
    p = tmp_path / "t.npy"
    np.save(p, np.zeros((4, 16, 16), np.uint16))
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(tk.TokenError, match="not a valid .npy"):
        tk.load_npy(p)


def test_check_tokens():
    ok = np.zeros((2, 4, 4), np.uint16)
    assert tk.check_tokens(ok, heads=2, n_codes=10) is None
    assert tk.check_tokens(ok[None], heads=2, n_codes=10) is None
    assert tk.check_tokens(ok.astype(np.int64) + 9, heads=2, n_codes=10) is None  # n - 1 is valid
    assert "not an integer" in tk.check_tokens(ok.astype(np.float32), 2, 10)
    assert "not an integer" in tk.check_tokens(ok.astype(bool), 2, 10)
    assert "is not (heads, h, w)" in tk.check_tokens(ok[0], 2, 10)
    assert "(N, heads, h, w)" in tk.check_tokens(ok, 2, 10, packed=True)
    assert "has 2 heads" in tk.check_tokens(ok, 4, 10)
    assert "index 10 is outside [0, 10)" in tk.check_tokens(ok + 10, 2, 10)
    neg = ok.astype(np.int32)
    neg[1, 2, 3] = -1
    assert "index -1 is outside" in tk.check_tokens(neg, 2, 10)
    assert "no tokens" in tk.check_tokens(np.zeros((2, 0, 4), np.uint8), 2, 10)


def test_manifest_is_valid_json_with_one_line_per_image(tmp_path):
    rows = [{"name": f"img{i}", "grid": [8, 8]} for i in range(3)]
    m = {"format": tk.FORMAT, "model": {"sha256": "cd" * 32}, "images": rows}
    tk.write_manifest(tmp_path, m)
    assert tk.read_manifest(tmp_path) == m
    text = (tmp_path / tk.MANIFEST).read_text()
    assert sum('"name": "img' in line for line in text.splitlines()) == 3
    tk.write_manifest(tmp_path, {**m, "images": []})
    assert tk.read_manifest(tmp_path)["images"] == []


def test_manifest_read(tmp_path):
    assert tk.read_manifest(tmp_path) is None
    tk.write_manifest(tmp_path, {"format": tk.FORMAT, "model": {"sha256": "ab" * 32}})
    m = tk.read_manifest(tmp_path)
    assert tk.manifest_sha256(m) == "ab" * 32
    (tmp_path / tk.MANIFEST).write_text("{broken")
    with pytest.raises(UserError, match="not a readable manifest"):
        tk.read_manifest(tmp_path)
    (tmp_path / tk.MANIFEST).write_text(json.dumps({"something": "else"}))
    with pytest.raises(UserError, match="not an optvq token manifest"):
        tk.read_manifest(tmp_path)
