"""Naming a model (``--model REF``, ``from_pretrained(REF)``): a local folder, a ``.safetensors``
file whose config is in its header, a bundled name (``checkpoints/<name>/``), or a hub id
``ORG/NAME`` downloaded and cached by huggingface_hub.

A bare name that is both a local folder (or file) and a bundled name is refused rather than
guessed: ``./NAME`` picks the local one, ``bundled:NAME`` the bundled one. A ``Path`` object always
names a path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from optvq_cli.checkpoints import hub
from optvq_cli.checkpoints.files import CONFIG_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME, convert_hint, sniff
from optvq_cli.core.errors import UserError

# Folders searched for bundled names: the source checkout's checkpoints/, then the package's own.
BUNDLED_DIRS: list[Path] = [
    Path(__file__).resolve().parents[2] / "checkpoints",
    Path(__file__).resolve().parent,
]
BUNDLED_PREFIX = "bundled:"
_BUNDLED_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")


class NotFound(UserError):
    """A reference that names nothing: no folder, file, bundled model or hub id."""


@dataclass
class Located:
    """Where a reference points: the weights file, its config.json if any, and a provenance line."""

    weights: Path
    config_path: Path | None
    source: str


def bundled_names() -> list[str]:
    names = set()
    for root in BUNDLED_DIRS:
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if p.is_dir() and (p / WEIGHTS_NAME).exists())
    return sorted(names)


def _bundled(name: str) -> Path | None:
    if not _BUNDLED_NAME.fullmatch(name):
        return None
    for root in BUNDLED_DIRS:
        if (root / name).is_dir():
            return root / name
    return None


def _locate_dir(folder: Path, source: str) -> Located:
    config = folder / CONFIG_NAME
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        shards = sorted(folder.glob("*.safetensors"))
        if len(shards) == 1:
            weights = shards[0]
        elif len(shards) > 1:
            raise UserError(f"{folder}: several .safetensors files and no {WEIGHTS_NAME}; keep one of them")
        else:
            pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = f" ({pickles[0].name} is a pickle: {convert_hint(pickles[0])})" if pickles else ""
            raise UserError(f"{folder}: no model weights in this folder (expected {WEIGHTS_NAME}){hint}")
    return Located(weights, config if config.is_file() else None, source)


def _locate_file(path: Path) -> Located:
    kind = sniff(path)
    if path.suffix == ".safetensors" or kind == "safetensors":
        return Located(path, None, str(path.resolve()))
    if path.suffix in PICKLE_SUFFIXES or kind == "pickle":
        raise UserError(f"{path} is a pickled checkpoint, which is never loaded as is: {convert_hint(path)}")
    raise UserError(f"{path}: not a model; give a folder with {WEIGHTS_NAME} or a .safetensors file")


def _locate_bundled(name: str) -> Located:
    folder = _bundled(name)
    if folder is None:
        names = ", ".join(bundled_names()) or "none installed"
        raise NotFound(f"model {BUNDLED_PREFIX}{name}: no such bundled model ({names})")
    return _locate_dir(folder, f"{BUNDLED_PREFIX}{name}")


def _refuse_ambiguous(text: str, path: Path) -> None:
    if text == path.name and path.exists() and _bundled(text) is not None:
        kind = "folder" if path.is_dir() else "file"
        raise UserError(
            f"model {text}: both a {kind} here and a bundled model; write ./{text} for the {kind} "
            f"or {BUNDLED_PREFIX}{text} for the bundled model"
        )


def locate(ref: str | Path, revision: str | None = None) -> Located:
    """Resolve a model reference to local files (downloading hub models into the cache).
    Raises NotFound when it names nothing at all, UserError for anything else wrong."""
    text = str(ref).strip()
    if not text:
        raise UserError("the model reference is empty: give a folder, a .safetensors file, a bundled name or a hub id")
    path = Path(text).expanduser()
    is_hub = not path.exists() and _bundled(text) is None and hub.looks_like_repo_id(text)
    if revision is not None and not is_hub:
        raise UserError(f"--revision {revision}: only a hub id takes a revision, not {text}")
    if text.startswith(BUNDLED_PREFIX):
        return _locate_bundled(text[len(BUNDLED_PREFIX) :])
    if not isinstance(ref, Path):
        _refuse_ambiguous(text, path)
    if path.is_dir():
        return _locate_dir(path, str(path.resolve()))
    if path.is_file():
        return _locate_file(path)
    if _bundled(text) is not None:
        return _locate_bundled(text)
    if is_hub:
        folder = hub.download(text, revision)
        return _locate_dir(folder, f"hub:{text}@{folder.name}")  # snapshot folder = commit hash
    names = ", ".join(bundled_names()) or "none installed"
    raise NotFound(f"model {text}: no such folder or file, bundled model ({names}) or hub id (ORG/NAME)")
