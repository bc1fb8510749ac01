"""Cached reference statistics for rFID: the Inception features' mean and covariance of DATA, in a
safetensors file whose metadata fingerprints the images and settings they were made from."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import write_safetensors
from optvq_cli.core.images import RESAMPLE

_REF_FORMAT, _REF_VERSION = "optvq-ref-stats", "1"
_REF_FORMAT_V0 = "optvq-ref-stats-1"  # earlier files: kind and version in one string


def fingerprint(rel: list[str], resolution: int | None, inception_sha: str, mode: str) -> dict[str, str]:
    names = hashlib.sha256("\n".join(rel).encode()).hexdigest()
    return {
        "format": _REF_FORMAT,
        "optvq_format": _REF_VERSION,
        "images_sha256": names,
        "count": str(len(rel)),
        "resolution": str(resolution) if resolution is not None else "own",
        "resize": RESAMPLE if resolution is not None else "none",
        "crop": "center-square-then-resize" if resolution is not None else "none",
        "channels": mode,
        "inception_sha256": inception_sha,
    }


def load_ref_stats(path: Path, expect: dict[str, str]) -> tuple[np.ndarray, np.ndarray, int]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = _current_ref_meta(f.metadata() or {})
            mu, sigma = f.get_tensor("mu"), f.get_tensor("sigma")
    except (SafetensorError, OSError, KeyError) as e:
        raise UserError(f"--ref-stats {path}: not a reference-statistics file ({e}); delete it to recompute") from None
    diff = [k for k, v in expect.items() if meta.get(k) != v]
    if diff:
        raise UserError(
            f"--ref-stats {path}: made for other images or settings ({', '.join(diff)} differ); "
            "delete it or choose another path"
        )
    return mu.numpy(), sigma.numpy(), int(meta["count"])


def _current_ref_meta(meta: dict[str, str]) -> dict[str, str]:
    """An earlier file's fingerprint in today's spelling, so a cached file stays usable."""
    if meta.get("format") == _REF_FORMAT_V0:
        return {**meta, "format": _REF_FORMAT, "optvq_format": _REF_VERSION}
    return meta


def save_ref_stats(path: Path, mu: np.ndarray, sigma: np.ndarray, meta: dict[str, str]) -> None:
    write_safetensors(path, {"mu": mu, "sigma": sigma}, metadata=meta)
