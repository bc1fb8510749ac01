"""The built-in kinds: a folder of images (the one walk, core.walk), a ``.txt`` list of paths, and
a single image file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from optvq_cli.core.errors import UserError
from optvq_cli.core.images import image_extensions
from optvq_cli.core.walk import SymlinkLoop, iter_files, relative_posix, walk_relative
from optvq_cli.sources.base import Inputs, Item, NoImages, Problem, Source, register

NO_IMAGES = "no images found (looked for .jpg, .png, .webp, .bmp, .tif, .gif and the like)"


def _os_reason(e: OSError) -> str:
    return "permission denied" if isinstance(e, PermissionError) else (e.strerror or type(e).__name__).lower()


@register
class Folder(Source):
    """A folder, searched recursively in sorted order of relative path. Images that all lie one
    folder deep (INPUT/<class>/<image>) carry their folder's name as their label."""

    kind = "folder"
    fallback = True

    @classmethod
    def recognises(cls, input: Path) -> bool:
        return input.is_dir()

    def check(self, exclude: Sequence[Path] = ()) -> None:
        if not os.access(self.input, os.R_OK | os.X_OK):
            raise UserError(f"{self.input}: cannot read this folder (permission denied)")
        excluded = [Path(p).resolve() for p in exclude]
        try:
            found = next(iter_files(self.input, image_extensions(), excluded, on_error=lambda e: None), None)
        except SymlinkLoop as e:
            raise UserError(str(e)) from None
        if found is None:
            raise NoImages(f"{self.input}: {NO_IMAGES}")

    def list(self, exclude: Sequence[Path] = ()) -> Inputs:
        problems: list[Problem] = []

        def onerror(e: OSError) -> None:
            problems.append((str(e.filename), f"cannot read this folder ({_os_reason(e)}); its images were skipped"))

        excluded = [Path(p).resolve() for p in exclude]
        try:
            found = walk_relative(self.input, image_extensions(), excluded, onerror)
        except SymlinkLoop as e:
            raise UserError(str(e)) from None
        if not found:
            raise NoImages(f"{self.input}: {NO_IMAGES}")
        if all(rel.count("/") == 1 for rel, _ in found):
            items = [Item(rel, path, label=rel.split("/", 1)[0]) for rel, path in found]
            return Inputs(self, self.input, items, problems, "class folders")
        return Inputs(self, self.input, [Item(rel, path) for rel, path in found], problems)


def read_list(list_file: Path) -> list[Path]:
    """A .txt of paths, one a line; relative paths are relative to the list's folder; # comments."""
    try:
        lines = list_file.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM from Windows editors
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{list_file}: cannot read the list of images ({e})") from None
    paths = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line).expanduser()
            paths.append(p if p.is_absolute() else list_file.parent / p)
    return paths


@register
class ImageList(Source):
    """A .txt list of image paths, in the list's order; names are relative to the folder that
    holds them all."""

    kind = "list"
    fallback = True

    @classmethod
    def recognises(cls, input: Path) -> bool:
        return input.suffix.lower() == ".txt" and input.is_file()

    def check(self, exclude: Sequence[Path] = ()) -> None:
        if not read_list(self.input):
            raise UserError(f"{self.input}: the list names no images; put one image path per line")

    def list(self, exclude: Sequence[Path] = ()) -> Inputs:
        paths, problems = [], []
        seen: set[Path] = set()
        for p in read_list(self.input):
            if not p.is_file():
                what = "a folder, not an image" if p.is_dir() else "no such file"
                problems.append((str(p), f"{what} (listed in {self.input})"))
            elif p.resolve() in seen:
                problems.append((str(p), f"listed twice in {self.input}; encoded once"))
            else:
                seen.add(p.resolve())
                paths.append(p.resolve())
        root = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else self.input.parent
        return Inputs(self, root, [Item(relative_posix(p, root), p) for p in paths], problems)


@register
class ImageFile(Source):
    """One image file (or anything else that exists: reading it says what is wrong)."""

    kind = "file"
    fallback = True

    @classmethod
    def recognises(cls, input: Path) -> bool:
        return input.exists()

    def list(self, exclude: Sequence[Path] = ()) -> Inputs:
        return Inputs(self, self.input.parent, [Item(self.input.name, self.input)])
