"""The one folder walk: what `encode`, `eval`, `train` and `decode` see in a folder."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator
from pathlib import Path


class SymlinkLoop(ValueError):
    """A symlinked folder that points back at one of its own parents."""


def iter_files(
    root: str | Path,
    suffixes: Collection[str],
    exclude: Collection[Path] = (),
    on_error: Callable[[OSError], None] | None = None,
) -> Iterator[Path]:
    """Files under ``root`` whose lower-cased suffix is in ``suffixes``, folder by folder in sorted
    order. Hidden files and folders (a leading dot) are skipped; symlinked files and folders are
    followed; a symlink back into its own parents raises :class:`SymlinkLoop`; folders in ``exclude``
    (compared resolved) are skipped. ``on_error`` hears of folders that cannot be listed (default:
    the OSError is raised)."""
    root = Path(root)
    excluded = {Path(p).resolve() for p in exclude}

    def onerror(e: OSError) -> None:
        if on_error is None:
            raise e
        on_error(e)

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=True):
        here = Path(dirpath)
        real_here = here.resolve()
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            real = (here / d).resolve()
            if real in excluded:
                continue
            if real_here.is_relative_to(real):
                raise SymlinkLoop(f"{here / d}: a symlink to its own parent folder {real}; remove the link")
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):  # string work per file: a walk of millions stays seconds
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in suffixes:
                yield here / f


def walk_files(
    root: str | Path,
    suffixes: Collection[str],
    exclude: Collection[Path] = (),
    on_error: Callable[[OSError], None] | None = None,
) -> list[Path]:
    """:func:`iter_files` as a list sorted by relative posix path ("a/b" before "ab", like ls -R)."""
    root = Path(root)
    found = iter_files(root, suffixes, exclude, on_error)
    return sorted(found, key=lambda p: relative_posix(p, root))


def relative_posix(path: Path, root: Path) -> str:
    """``path.relative_to(root).as_posix()`` for a path the walk found under ``root``, by string
    slicing (pathlib's relative_to parses both paths again: 60 % of a 50,000-file walk)."""
    head, text = str(root), str(path)
    prefix = head if head.endswith(os.sep) else head + os.sep
    if not text.startswith(prefix):
        return path.relative_to(root).as_posix()
    rest = text[len(prefix) :]
    return rest.replace(os.sep, "/") if os.sep != "/" else rest
