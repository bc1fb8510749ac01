"""Images inside tar files, read in place: WebDataset shards (``key.jpg`` beside ``key.cls`` /
``key.json``), one plain tar of images, and ImageNet's nested train tar (one tar per class).

Listing reads only the tar headers and records each image's byte offset and size in its
container, so any image is read later by one ``pread`` (random access, from any DataLoader
worker: every record and ``TarReader`` pickle). Nothing is extracted to disk and no tar is held
in memory; memory grows only with the list of records the caller keeps.

Order (fixed, so ranks and reruns agree): containers in name order; inside a container, members
in tar order (the order the writer put them, which is WebDataset's sample order); inside a nested
tar, the inner tars in outer tar order and their images in inner tar order.

Only plain (uncompressed) tar is read: a compressed tar has no random access (reaching image k
means decompressing everything before it), which would make every resumed or distributed read
start from byte 0; the images inside are JPEG/PNG, which do not compress further anyway.

The headers (ustar, GNU and pax long names) are parsed here, one ``pread`` each, at about a fifth of
the standard library ``tarfile``'s cost per member; the ``webdataset`` package reads tars as a
stream only, which cannot seek to one image on resume.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Iterator
from itertools import product
from pathlib import Path
from typing import NamedTuple

from optvq_cli.core.errors import UserError
from optvq_cli.core.images import image_extensions
from optvq_cli.sources.base import Inputs, Item, NoImages, Problem, Source, register

BLOCK = 512  # a tar header, and the unit tar data is padded to
_image_extensions = functools.cache(image_extensions)  # Pillow's registry: 50 ms a call, once per process
LABEL_SUFFIXES = ("cls", "json")  # a WebDataset sample's label members, in priority order
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class ContainerError(UserError):
    """A whole container (tar or Parquet file) is unreadable: truncated, a corrupt header, a bad
    footer, compressed. The message is one line naming the file; the other containers go on."""


class TarImage(NamedTuple):
    """One image inside a tar: read it with ``TarReader.read(record)``.

    container: the .tar file's path; member: the image's name inside it (``n01440764.tar/x.JPEG``
    inside a nested tar), unique in the container; offset, size: its bytes in the container file;
    label: the raw label (an int or a class name from ``.cls`` / ``.json``, the synset for a nested
    tar), None where the sample has none."""

    container: str
    member: str
    offset: int
    size: int
    label: int | str | None


# ---------------------------------------------------------------- finding containers


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, as the shell expands it: ``a-{0000..0002}.tar`` ->
    a-0000.tar, a-0001.tar, a-0002.tar (zero-padded when either end is), ``{a,b}`` -> a, b; several
    braces combine. ValueError for a range that runs backwards or an unclosed brace."""
    parts: list[list[str]] = []
    pos = 0
    for m in re.finditer(r"\{([^{}]*)\}", pattern):
        parts += [[pattern[pos : m.start()]], _brace_values(m.group(1), pattern)]
        pos = m.end()
    parts.append([pattern[pos:]])
    if "{" in pattern[pos:] or "}" in pattern[pos:]:
        raise ValueError(f"{pattern}: unbalanced brace")
    return ["".join(p) for p in product(*parts)]


def _brace_values(body: str, pattern: str) -> list[str]:
    m = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if m is None:
        if "," not in body:
            raise ValueError(f"{pattern}: {{{body}}} is neither a range {{0000..0146}} nor a list {{a,b}}")
        return body.split(",")
    lo, hi = m.groups()
    if int(hi) < int(lo):
        raise ValueError(f"{pattern}: the range {{{body}}} runs backwards")
    padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (lo, hi))
    width = max(len(lo), len(hi)) if padded else 0
    return [str(v).zfill(width) for v in range(int(lo), int(hi) + 1)]


def is_tar_spec(spec: str | Path) -> bool:
    """Whether INPUT names tar containers: a .tar file, a brace pattern of them, or a folder whose
    files include .tar files."""
    s = str(spec)
    if "{" in s and s.endswith(".tar"):
        return True
    p = Path(s)
    if p.is_dir():
        return any(c.suffix == ".tar" and c.is_file() for c in p.iterdir())
    return p.suffix == ".tar"


def find_tars(spec: str | Path) -> list[Path]:
    """The tar files INPUT names, in name order: a .tar file, a folder's .tar files (not its
    subfolders) or a brace pattern (every file it names must exist). UserError otherwise."""
    s = str(spec)
    if "{" in s:
        try:
            paths = [Path(n) for n in expand_braces(s)]
        except ValueError as e:
            raise UserError(f"{e}; write ranges as train-{{0000..0146}}.tar") from None
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise UserError(
                f"{missing[0]}: no such shard ({len(missing)} of {len(paths)} the pattern names are missing)"
            )
    elif Path(s).is_dir():
        paths = [p for p in Path(s).iterdir() if p.suffix == ".tar" and p.is_file()]
        if not paths:
            raise UserError(f"{s}: no .tar files in this folder")
    elif Path(s).is_file():
        paths = [Path(s)]
    else:
        raise UserError(f"{s}: no such file or folder")
    return sorted(paths, key=lambda p: p.name)


# ---------------------------------------------------------------- listing one container


def list_tar(path: str | Path) -> Iterator[TarImage]:
    """The images in one tar, in tar order, with their labels (see the module's docstring). An
    inner member named ``*.tar`` is read as a class tar (ImageNet's train layout): its images get the
    inner tar's stem as their label. ContainerError naming the file for a compressed, truncated or
    corrupt tar, raised when the listing reaches the damage (records before it are yielded first:
    a caller that wants all or nothing lists into a list)."""
    path = str(path)
    extensions = _image_extensions()
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            _refuse_compressed(f, path)
            yield from _samples(_members(f.fileno(), 0, size, path), path, f.fileno(), extensions)
    except OSError as e:
        raise ContainerError(f"{path}: unreadable ({e.strerror or e})") from None


def _refuse_compressed(f: io.BufferedReader, path: str) -> None:
    head = f.read(6)
    f.seek(0)
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            raise ContainerError(
                f"{path}: a {kind}-compressed tar; only plain tar can be read in place (random access), "
                "so decompress it once (the images inside do not shrink further)"
            )


class _Member(NamedTuple):
    """A regular file's header: its name and where its bytes lie in the container file."""

    name: str
    offset_data: int
    size: int


_ZERO = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # regular and contiguous files (tarfile's REGULAR_TYPES, less sparse)


def _number(field: bytes) -> int:
    """A header's numeric field: octal text, or GNU's base-256 for values past 8 GiB."""
    if field[0] & 0x80:
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * len(field) - 8)) if field[0] == 0xFF else n
    return int(field.strip(b"\0 ") or b"0", 8)


def _pax(raw: bytes) -> dict[str, str]:
    """A pax extended header's records ("LEN key=value\n") as a dict."""
    out, i = {}, 0
    while i < len(raw):
        sp = raw.index(b" ", i)
        n = int(raw[i:sp])
        key, _, value = raw[sp + 1 : i + n - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        i += n
    return out


def _members(fd: int, base: int, size: int, path: str) -> Iterator[_Member]:
    """The header of every regular file in the tar at bytes base .. base + size of ``fd``, parsed
    here (ustar, GNU long names, pax): a header is one 512-byte ``pread`` and a few slices, about
    a fifth of ``tarfile``'s cost per member. A checksum that fails is a corrupt header, never the
    end; a member whose data runs past the end, or a missing end-of-archive block, is a truncation."""
    pos, long_name, pax = 0, None, {}
    while True:
        hdr = os.pread(fd, BLOCK, base + pos) if pos + BLOCK <= size else b""
        if len(hdr) < BLOCK:
            raise ContainerError(
                f"{path}: truncated or damaged tar (ends without the end-of-archive blocks at byte {base + pos}); "
                "copy or download it again"
            )
        if hdr == _ZERO:
            return
        try:
            stored = _number(hdr[148:156])
            n = _number(hdr[124:136])
        except ValueError:
            stored, n = -1, 0
        # a header's checksum: the unsigned byte sum, or the signed one some old writers stored
        unsigned = 256 + sum(hdr[:148]) + sum(hdr[156:])  # the checksum field counts as 8 spaces
        if stored != unsigned and stored != unsigned - 256 * sum(b > 127 for b in hdr[:148] + hdr[156:]):
            what = "not a readable tar (no tar header at byte 0)" if pos == 0 else "truncated or damaged tar"
            raise ContainerError(f"{path}: {what} (a corrupt header at byte {base + pos}); copy or download it again")
        kind, data = hdr[156:157], pos + BLOCK
        if kind in (b"L", b"x", b"g"):
            raw = os.pread(fd, n, base + data)
            if kind == b"L":
                long_name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax(raw)
        else:
            name = long_name or pax.get("path")
            if name is None:
                name = hdr[:100].split(b"\0", 1)[0]
                prefix = hdr[345:500].split(b"\0", 1)[0] if hdr[257:262] == b"ustar" else b""
                name = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
            n = int(pax.get("size", n))
            if kind in _REGULAR:
                if data + n > size:
                    raise ContainerError(
                        f"{path}: truncated ({name} needs {data + n} bytes, the tar has {size}); "
                        "copy or download it again"
                    )
                yield _Member(name, base + data, n)
            long_name, pax = None, {}
        pos = data + -(-n // BLOCK) * BLOCK


def _inner_tar(fd: int, info: _Member, path: str, extensions: set[str]) -> Iterator[TarImage]:
    """The images of a class tar inside the container, labelled with its stem (the synset)."""
    where = f"{path} (inside {info.name})"
    synset = Path(info.name).stem
    for inner in _members(fd, info.offset_data, info.size, where):
        if _suffix(inner.name) in extensions:
            yield TarImage(path, f"{info.name}/{inner.name}", inner.offset_data, inner.size, synset)


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: the key up to the first dot of the file name, and the
    rest (``a/b.seg.png`` -> ``a/b``, ``seg.png``)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext if dot else ""


def _suffix(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _samples(members: Iterator[_Member], path: str, fd: int, extensions: set[str]) -> Iterator[TarImage]:
    """Group consecutive members by key (a WebDataset sample) and yield its images with the
    sample's label; a member named ``*.tar`` is a class tar, read in place. A key that reappears
    later in the tar is a new sample, as in WebDataset."""
    key, group = None, []
    for info in members:
        if info.name.endswith(".tar"):
            if group:
                yield from _sample_images(group, path, fd, extensions)
            key, group = None, []
            yield from _inner_tar(fd, info, path, extensions)
            continue
        k, _ = _split_key(info.name)
        if k != key and group:
            yield from _sample_images(group, path, fd, extensions)
            group = []
        key = k
        group.append(info)
    if group:
        yield from _sample_images(group, path, fd, extensions)


def _sample_images(group: list[_Member], path: str, fd: int, extensions: set[str]) -> Iterator[TarImage]:
    by_ext = {_split_key(i.name)[1].lower(): i for i in group}
    label = None
    for ext in LABEL_SUFFIXES:
        if ext in by_ext:
            info = by_ext[ext]
            label = _parse_label(os.pread(fd, info.size, info.offset_data), ext, f"{path}/{info.name}")
            break
    for info in group:
        if "." + _split_key(info.name)[1].lower() in extensions:  # key.jpg, not key.seg.png
            yield TarImage(path, info.name, info.offset_data, info.size, label)


def _parse_label(raw: bytes, ext: str, where: str) -> int | str | None:
    """A ``.cls`` member's text (an integer or a class name) or a ``.json`` member's "label" /
    "cls" field. ContainerError naming the member when it holds neither."""
    import json

    try:
        text = raw.decode("utf-8").strip()
        value = json.loads(text) if ext == "json" else text
        if ext == "json":
            value = value.get("label", value.get("cls")) if isinstance(value, dict) else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ContainerError(f"{where}: not a readable label ({e})") from None
    if isinstance(value, bool) or value is None or value == "":
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value) if re.fullmatch(r"-?\d+", value) else value
    raise ContainerError(f"{where}: the label {value!r} is neither an integer nor a class name")


# ---------------------------------------------------------------- reading


class TarReader:
    """Reads images by record: one ``pread`` each, open files kept per process (at most
    ``max_open``), so a shard is opened once, not once per image. Pickles without its files (a
    DataLoader worker opens its own)."""

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def read(self, record: TarImage) -> bytes:
        """The image's bytes. OSError naming the member when the container has changed since
        listing (shorter than the record says)."""
        data = os.pread(self._fd(record.container), record.size, record.offset)
        if len(data) != record.size:
            raise OSError(f"{record.container}/{record.member}: {len(data)} of {record.size} bytes (file changed?)")
        return data

    def _fd(self, path: str) -> int:
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors are not ours to close
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.pop(path, None)
        if fd is None:
            if len(self._fds) >= self.max_open:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = os.open(path, os.O_RDONLY)
        self._fds[path] = fd  # most recently used last
        return fd

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_open"])

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


# ---------------------------------------------------------------- the source kind


def problem_of(error: ContainerError, container: Path) -> Problem:
    """A damaged container as an input problem: (the file, the reason without the file's name)."""
    text = str(error)
    prefix = f"{container}: "
    return str(container), text[len(prefix) :] if text.startswith(prefix) else text


def container_root(input: Path) -> Path:
    """The folder a container kind names its items from: INPUT itself when it is a folder, else
    the folder of the file (or of the brace pattern)."""
    return input if input.is_dir() else input.parent


@register
class TarShards(Source):
    """A .tar file, a folder of .tar shards or a brace pattern of them (WebDataset samples, plain
    tars of images, ImageNet's nested train tar). Items are ``SHARD/member`` in the module's order;
    a damaged tar is one problem line and the other tars still list."""

    kind = "tar"

    @classmethod
    def recognises(cls, input: Path) -> bool:
        return is_tar_spec(input)

    def check(self, exclude=()) -> None:
        find_tars(self.input)

    def list(self, exclude=()) -> Inputs:
        root = container_root(self.input)
        items: list[Item] = []
        problems: list[Problem] = []
        nested = plain = 0
        for tar in find_tars(self.input):
            try:
                records = list(list_tar(tar))  # all or nothing: a damaged tar is downloaded again
            except ContainerError as e:
                problems.append(problem_of(e, tar))
                continue
            for r in records:  # every tar lies in root: its name is the shard's
                items.append(Item(f"{tar.name}/{r.member}", tar, r.member, r.label, (r.offset, r.size), self))
                nested += r.member.count(".tar/") > 0
                plain += r.member.count(".tar/") == 0
        if not items and not problems:
            raise NoImages(f"{self.input}: no images in the tar (looked for .jpg, .png, .webp and the like)")
        labels_from = "class tars" if nested and not plain else "sample .cls/.json members"
        return Inputs(self, root, items, problems, labels_from)

    def open(self, item: Item) -> io.BytesIO:
        reader = self.cache.setdefault("reader", TarReader())
        offset, size = item.at
        return io.BytesIO(reader.read(TarImage(str(item.path), item.member or "", offset, size, None)))
