"""The token file format: dtypes, atomic writes, safe reading, validation, the manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from optvq_cli.core import fileio
from optvq_cli.core.errors import UserError
from optvq_cli.tokenize import tokens as tk


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

    def broken(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        fileio.atomic_write(target, broken)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_temp_files_keeps_those_of_a_running_writer(tmp_path):
    """Another optvq writing into the same OUTPUT: its temp files are not pulled from under it."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f".b.npy{fileio.TMP_MARK}{sleeper.pid}-abcd.npy"
        mine = tmp_path / f".c.png{fileio.TMP_MARK}{os.getpid()}-abcd.png"
        dead = tmp_path / f".a.npy{fileio.TMP_MARK}{_dead_pid()}-abcd.npy"
        for p in (live, mine, dead):
            p.write_bytes(b"half")
        assert tk.remove_temp_files(tmp_path) == 1
        assert live.exists() and mine.exists() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_remove_temp_files_only_removes_ours(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / f".a.npy{fileio.TMP_MARK}{_dead_pid()}-abcd.npy").write_bytes(b"half")
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


@pytest.mark.parametrize(
    "name, ok",
    [
        ("cats/tom", True),
        ("a..b/c", True),  # '..' inside a name is just a name
        ("../x", False),
        ("a/../../x", False),
        ("/etc/passwd", False),
        ("\\\\server\\share\\x", False),
        ("C:x", False),
        ("..\\x", False),
        ("a//b", False),
        ("", False),
        (7, False),
    ],
)
def test_output_names_must_stay_inside_output(name, ok):
    assert (tk.name_problem(name) is None) == ok


def _valid_manifest() -> dict:
    row = {
        "name": "a",
        "source": "a.png",
        "grid": [8, 9],
        "original_size": [40, 36],
        "crop_box": [0, 0, 40, 36],
        "resized": [33, 30],
        "padding": [0, 0, 3, 2],
    }
    model = {"ref": "m", "revision": None, "sha256": "ab" * 32, "downsample": 4}
    return {"format": tk.FORMAT, "version": 1, "model": model, "layout": "files", "complete": True, "images": [row]}


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("model", "sha256"), "xyz", "model.sha256 must be 64 hex digits"),
        (("layout",), "folder", "layout must be one of files, packed"),
        (("complete",), "yes", "complete must be true or false"),
        (("images",), {"a": 1}, "images must be a list of rows"),
        (("images", 0, "grid"), [8], "images[0].grid must be 2 positive integers"),
        (("images", 0, "padding"), [0, 0, -1, 2], "images[0].padding must be 4 non-negative integers"),
        (("images", 0, "padding"), [0, 0, 3, 6], "images[0].padding [0, 0, 3, 6] does not fit resized [33, 30]"),
        (("images", 0, "name"), True, "images[0].name must be a non-empty string"),
    ],
)
def test_manifest_fields_are_checked_on_read(tmp_path, path, value, message):
    m = _valid_manifest()
    (tmp_path / tk.MANIFEST).write_text(json.dumps(m))
    assert tk.read_manifest(tmp_path) == m  # hand-checked: 33 + 3 = 9 * 4 and 30 + 2 = 8 * 4
    target = m
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    (tmp_path / tk.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(UserError) as e:
        tk.read_manifest(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / tk.MANIFEST}: {message}")
    assert "\n" not in str(e.value)


def test_a_reconstruct_manifest_is_not_a_token_manifest(tmp_path):
    (tmp_path / tk.MANIFEST).write_text(json.dumps({**_valid_manifest(), "format": tk.RECONSTRUCT_FORMAT}))
    with pytest.raises(UserError, match="not an optvq token manifest"):
        tk.read_manifest(tmp_path)
    assert tk.read_manifest(tmp_path, tk.RECONSTRUCT_FORMAT)["format"] == tk.RECONSTRUCT_FORMAT


def test_manifests_say_optvq_format_and_older_version_keys_still_read(tmp_path):
    """One form for format versions: "optvq_format": N (as model config.json); a manifest written
    with the older "version": N key is still read, a newer number is refused."""
    doc = _valid_manifest()
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    assert tk.read_manifest(tmp_path)["version"] == 1  # the older spelling
    doc.pop("version")
    doc["optvq_format"] = tk.FORMAT_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(Exception, match="newer than this optvq reads"):
        tk.read_manifest(tmp_path)
