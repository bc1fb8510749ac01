"""What an input is: items with a stable name, a way to open their bytes, an identity for resume
and an optional label, found by the first registered kind of source that recognises INPUT.

A kind is a :class:`Source` subclass: ``recognises(input)`` says whether INPUT is one of its, and
``list()`` gives the items. Kinds registered with :func:`register` are asked first, in the order
they were registered; the built-in folder, ``.txt`` list and single-file kinds are the fallbacks.
Items and sources travel to DataLoader worker processes by pickling; a source's ``cache`` (for
example the last decoded Parquet row group) stays behind and starts empty in each worker.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from optvq_cli.core.errors import UserError

Problem = tuple[str, str]  # (path, reason): an input that cannot be used; the others still run


class NoImages(UserError):
    """INPUT names no images at all."""


def file_identity(path: Path) -> dict[str, int] | None:
    """What a manifest row records of its source file: size and mtime (ns); None when it cannot
    be read. A changed source gets its output redone; hashing the contents instead would read
    every input again on each rerun."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}


@dataclass(frozen=True)
class Item:
    """One input image."""

    rel: str  # stable name: the path relative to the root with its extension, or "SHARD/member"
    path: Path  # the file on disk; for a member, its container
    member: str | None = None  # the member's name inside ``path``; None for a plain file
    label: int | str | None = None  # from the source: a class name (str) or a class number (int)
    at: Any = None  # where a member lies in its container, in its kind's terms (a byte range, a row)
    source: Source | None = field(default=None, repr=False, compare=False)  # None: a plain file

    @property
    def name(self) -> str:
        """The output name: ``rel`` less its extension (``cats/tom.jpg`` -> ``cats/tom``)."""
        return os.path.splitext(self.rel)[0]

    @property
    def display(self) -> str:
        """How problems name it: the file, or ``container/member``."""
        return str(self.path) if self.member is None else f"{self.path}/{self.member}"

    def open(self) -> BinaryIO:
        """A binary file of the image's bytes (works in any process: the item carries its source)."""
        return open(self.path, "rb") if self.source is None else self.source.open(self)

    def identity(self) -> dict[str, Any] | None:
        """The file's (or container's) size and mtime, and the member's name: what resume compares."""
        ident = file_identity(self.path)
        if ident is None or self.member is None:
            return ident
        return {**ident, "source_member": self.member}

    def source_name(self, root: Path) -> str:
        """The manifest's ``source``: the path relative to ``root`` (absolute when outside it),
        then ``/member`` for a member."""
        try:
            where = self.path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            where = str(self.path)
        return where if self.member is None else f"{where}/{self.member}"


@dataclass
class Inputs:
    """What INPUT names: the items in a stable order, names relative to ``root``."""

    source: Source
    root: Path
    items: list[Item]
    problems: list[Problem] = field(default_factory=list)
    labels_from: str = "none"  # what the items' labels are, for the index: "class folders", ...
    classes: list[str] | None = None  # the names of integer labels, where the source declares them


@dataclass(frozen=True)
class SourceOptions:
    """What a command tells every kind of source (each kind reads the options it knows): the
    Parquet columns holding the images and the labels (``--image-column`` / ``--label-column``)."""

    image_column: str = "image"
    label_column: str = "label"


class Source:
    """One INPUT read as items. Subclass it, say which inputs it ``recognises``, ``list`` them,
    and (for members of a container) ``open`` one; then :func:`register` the class."""

    kind: ClassVar[str] = "source"
    fallback: ClassVar[bool] = False  # the built-in kinds: asked after every registered one

    def __init__(self, input: Path, options: SourceOptions | None = None):
        self.input = Path(input)
        self.options = options or SourceOptions()

    @classmethod
    def recognises(cls, input: Path) -> bool:
        raise NotImplementedError

    def check(self, exclude: Sequence[Path] = ()) -> None:
        """The cheap checks, for before a slow model load: raises UserError when INPUT cannot be
        used at all."""

    def list(self, exclude: Sequence[Path] = ()) -> Inputs:
        """Every item in a stable order; what cannot be read becomes a problem line. ``exclude``:
        folders to leave out (the run's own OUTPUT)."""
        raise NotImplementedError

    def open(self, item: Item) -> BinaryIO:
        """A member's bytes as a binary file (plain files are opened by the item itself)."""
        return open(item.path, "rb")

    def settings(self) -> dict[str, Any]:
        """The options that change which pixels an item yields: part of an output's fingerprint,
        so a rerun with others is refused rather than resumed onto stale outputs."""
        return {}

    @property
    def cache(self) -> dict:
        """A per-process store (e.g. the last decoded row group); not pickled to workers."""
        if "_cache" not in self.__dict__:
            self.__dict__["_cache"] = {}
        return self.__dict__["_cache"]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}


_KINDS: list[type[Source]] = []


def register(kind: type[Source]) -> type[Source]:
    """Adds a kind (usable as a class decorator): registered kinds are asked in order, before the
    fallbacks."""
    if kind not in _KINDS:
        at = next((i for i, k in enumerate(_KINDS) if k.fallback), len(_KINDS))
        _KINDS.insert(len(_KINDS) if kind.fallback else at, kind)
    return kind


def unregister(kind: type[Source]) -> None:
    if kind in _KINDS:
        _KINDS.remove(kind)


def kind_of(input: Path) -> type[Source] | None:
    """The first kind that recognises INPUT; None when none does."""
    input = Path(input)
    return next((k for k in _KINDS if k.recognises(input)), None)


def is_collection(input: Path) -> bool:
    """INPUT names many images: a folder, or an input a registered (container) kind recognises."""
    kind = kind_of(input)
    return kind is not None and (not kind.fallback or Path(input).is_dir())


def open_source(input: Path, options: SourceOptions | None = None) -> Source:
    kind = kind_of(input)
    if kind is None:
        raise UserError(
            f"{input}: no such file or folder; give an image, a folder of images, a .txt list, "
            "a .tar, a folder of .tar shards or .parquet files"
        )
    return kind(Path(input), options)


def check(input: Path, exclude: Iterable[Path] = (), options: SourceOptions | None = None) -> None:
    """The cheap part of :func:`find`, for before a slow model load. Raises UserError."""
    open_source(input, options).check([Path(p) for p in exclude])


def find(
    input: Path, exclude: Iterable[Path] = (), unique: bool = True, options: SourceOptions | None = None
) -> Inputs:
    """The images INPUT names. ``unique``: an image whose output name (``Item.name``) another one
    already has is a problem, not an item (``a.jpg`` and ``a.png`` would both write ``a.npy``).
    ``options``: the command's source options (Parquet columns)."""
    source = open_source(input, options)
    exclude = [Path(p) for p in exclude]
    source.check(exclude)
    found = source.list(exclude)
    if unique:
        found.items = _unique(found.items, found.problems)
    return found


def _unique(items: list[Item], problems: list[Problem]) -> list[Item]:
    out: list[Item] = []
    owner: dict[str, str] = {}
    for it in items:
        if it.name in owner:
            problems.append((it.display, f"same output name {it.name!r} as {owner[it.name]}; rename one of them"))
            continue
        owner[it.name] = it.display
        out.append(it)
    return out
