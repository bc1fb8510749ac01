"""Atomic writes and the numpy-only unpickler."""

import io
import pickle

import numpy as np
import pytest

from optvq_cli.core.fileio import atomic_write, atomic_write_text, load_numpy_pickle


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")

    def boom(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
    assert target.read_bytes() == b"old"


def test_atomic_write_keeps_the_suffix_for_format_sniffing_writers(tmp_path):
    target = tmp_path / "sub" / "a.npy"
    atomic_write(target, lambda tmp: np.save(tmp, np.arange(3)))  # np.save would append .npy to other names
    assert np.load(target).tolist() == [0, 1, 2]
    assert [p.name for p in target.parent.iterdir()] == ["a.npy"]
    atomic_write_text(tmp_path / "t.json", "{}")
    assert (tmp_path / "t.json").read_text() == "{}"


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickle_loads_arrays(protocol):
    obj = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, 2], "f": 1.5}
    got = load_numpy_pickle(io.BytesIO(pickle.dumps(obj, protocol=protocol)), encoding="bytes")
    assert got[b"labels"] == [1, 2] and got["f"] == 1.5
    assert got[b"data"].tolist() == [[0, 1, 2], [3, 4, 5]]


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_numpy_pickle_refuses_code():
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        load_numpy_pickle(io.BytesIO(pickle.dumps({"x": _Evil()})))


def test_atomic_write_gives_the_umask_mode_even_to_private_writers(tmp_path):
    import os

    from optvq_cli.core import fileio

    atomic_write(tmp_path / "w.bin", lambda tmp: (tmp.write_bytes(b"x"), os.chmod(tmp, 0o600)))
    assert (tmp_path / "w.bin").stat().st_mode & 0o777 == 0o666 & ~fileio._UMASK
