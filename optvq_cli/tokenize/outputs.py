"""OUTPUT folders: what optvq owns in one, and the checks every write and delete there passes.

Shared by ``encode``, ``decode`` and ``reconstruct``. Each OUTPUT carries ``manifest.json`` naming
the model and settings and listing every file optvq wrote there, one row per output with the
identity (path, size, mtime) of the source it was made from. The rules:

- an OUTPUT that holds the run's inputs is refused: outputs written there could replace them;
- a file the manifest does not list is never replaced or deleted;
- every write and delete resolves, at that moment and after symlinks, to a path inside OUTPUT;
- each output's row is appended to a journal just before the file takes its name, so after a kill
  the next run knows every file written and ``--overwrite`` still ends as a fresh run;
- one run at a time: the folder is locked (``core.lock.folder_lock``) for the whole run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import atomic_write
from optvq_cli.core.lock import LOCK_NAME, folder_lock
from optvq_cli.tokenize import tokens as tk

DECODE_FORMAT = "optvq-decode"
JOURNAL = ".optvq-journal.jsonl"  # rows written by a run that has not finished; hidden from walks
_KINDS = {
    tk.FORMAT: "a token folder written by `optvq encode`",
    tk.RECONSTRUCT_FORMAT: "an `optvq reconstruct` output",
    DECODE_FORMAT: "an `optvq decode` output",
}
_FORMAT_FIELD = re.compile(rb'"format"\s*:\s*"([^"]*)"')
IDENTITY = ("source_size", "source_mtime_ns")


def same_source(row: dict | None, source: str, identity: dict[str, int] | None, input: str | None) -> bool:
    """Whether ``row`` (of a kept output) was made from the file ``source`` as it is now. Relative
    sources are relative to ``input``, the run's INPUT (``kept`` made an earlier INPUT's absolute)."""
    if row is None or identity is None or not isinstance(row.get("source"), str):
        return False

    def absolute(s: str) -> str:
        return os.path.normpath(s if os.path.isabs(s) or input is None else os.path.join(input, s))

    return absolute(row["source"]) == absolute(source) and all(row.get(k) == v for k, v in identity.items())


def _first_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output_path(output: Path) -> None:
    """OUTPUT is a folder, or can be made one, and can be written: else one line naming the
    folder (or the file in its way), not a temporary file."""
    output = Path(output)
    base = _first_existing(output.absolute())
    if base == output.absolute() and not output.is_dir():
        raise UserError(f"{output}: exists and is not a folder; give a folder for the outputs")
    if not base.is_dir():
        raise UserError(
            f"{base}: is a file, not a folder, so OUTPUT {output} cannot be made in it; choose another OUTPUT"
        )
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{base}: cannot write in this folder (permission denied); choose another OUTPUT")


def refuse_if_busy(output: Path) -> None:
    """Fails at once (FolderBusy naming the holder's pid) when another run holds OUTPUT: for before
    a slow model load. Creates nothing: only an existing lock file is tried."""
    if (Path(output) / LOCK_NAME).is_file():
        with folder_lock(output):
            pass


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class Output:
    """One run's OUTPUT folder. ``fmt``: the manifest format; ``suffix``: of the per-image files."""

    def __init__(self, folder: Path, fmt: str, suffix: str, what: str):
        check_output_path(folder)
        self.folder, self.fmt, self.suffix, self.what = Path(folder), fmt, suffix, what
        self._fd: int | None = None
        self._journal_lock = threading.Lock()
        self._real: Path | None = None  # fixed once the run holds the folder

    @property
    def real(self) -> Path:
        """OUTPUT's real path: every write and delete must land below it."""
        return self._real or self.folder.resolve()

    @property
    def manifest(self) -> Path:
        return self.folder / tk.MANIFEST

    # ------------------------------------------------------------ reading what is there

    def read(self) -> dict | None:
        """The manifest, with the rows a killed run journalled added; None when there is none."""
        if not self.manifest.is_file():
            return None
        try:
            with open(self.manifest, "rb") as f:
                m = _FORMAT_FIELD.search(f.read(4096))
        except OSError:
            m = None
        kind = m.group(1).decode(errors="replace") if m else None
        if kind != self.fmt:
            what = f"is {_KINDS[kind]}" if kind in _KINDS else "is not an optvq manifest"
            raise UserError(f"{self.manifest}: {what}; choose another OUTPUT")
        existing = tk.read_manifest(self.folder, self.fmt)
        rows = {r["name"]: r for r in existing.get("images", [])}
        for row in self._journal_rows():
            rows[row["name"]] = row
        existing["images"] = list(rows.values())
        return existing

    def _journal_rows(self) -> Iterator[dict]:
        try:
            text = (self.folder / JOURNAL).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run killed mid-write
                continue
            if isinstance(row, dict) and tk.name_problem(row.get("name")) is None:
                yield row

    def owned(self, existing: dict | None) -> set[str]:
        """The files (relative to OUTPUT) the manifest says optvq wrote; unsafe names are never ours."""
        if existing is None:
            return set()
        if existing.get("layout") == "packed":
            return {tk.PACKED, tk.PATHS}
        return {f"{r['name']}{self.suffix}" for r in existing["images"] if tk.name_problem(r["name"]) is None}

    def kept(self, existing: dict | None, header: dict) -> dict[str, dict]:
        """name -> row of an earlier run whose file is still there; a source named relative to an
        earlier INPUT becomes absolute once INPUT changed."""
        if existing is None or existing.get("layout") == "packed":
            return {}
        old_input, rows = existing.get("input"), {}
        for r in existing["images"]:
            if tk.name_problem(r["name"]) is None and (self.folder / f"{r['name']}{self.suffix}").is_file():
                src = r.get("source")
                moved = isinstance(old_input, str) and old_input != header.get("input")
                if moved and src and not Path(src).is_absolute():
                    r = {**r, "source": str(Path(old_input) / src)}
                rows[r["name"]] = r
        return rows

    # ------------------------------------------------------------ refusals (read only)

    def refuse_holding(self, inputs: Iterable[Path], what: str = "input") -> None:
        """An OUTPUT that is or holds one of the run's inputs is refused."""
        out = self.real
        for p in inputs:
            if _inside(Path(p).resolve(), out):
                raise UserError(
                    f"{self.folder}: holds the {what} {p}; outputs written there could replace the inputs; "
                    "choose an OUTPUT folder outside INPUT"
                )

    def refuse_inside(self, input: Path) -> None:
        """An OUTPUT inside the INPUT folder: its files would be taken for inputs by other tools."""
        if Path(input).is_dir() and _inside(self.real, Path(input).resolve()):
            raise UserError(f"{self.folder}: lies inside INPUT {input}; choose an OUTPUT folder outside INPUT")

    def refuse_foreign(self, targets: Iterable[str], existing: dict | None) -> None:
        """A file this run would write that the manifest does not list: optvq did not write it."""
        owned = self.owned(existing)
        where = f"{self.manifest} does not list it" if existing else f"OUTPUT has no {tk.MANIFEST}"
        for rel in targets:
            if rel not in owned and os.path.lexists(self.folder / rel):
                raise UserError(
                    f"{self.folder / rel}: exists, and {where}, so optvq did not write it; "
                    "move it away or choose another OUTPUT"
                )

    def check_compatible(self, existing: dict, header: dict, settings: Iterable[str]) -> None:
        """An OUTPUT written by another model or with other settings would mix incompatible outputs."""
        old, new = tk.manifest_sha256(existing), header["model"]["sha256"]
        if old != new:
            raise UserError(
                f"{self.manifest}: these {self.what} belong to another model (sha256 {tk.short(old)}, this one "
                f"is {tk.short(new)}); pass --overwrite to replace them or choose another OUTPUT"
            )
        for key in settings:
            if existing.get(key) != header.get(key):
                raise UserError(
                    f"{self.manifest}: written with a different {key} "
                    f"({_differences(existing.get(key), header.get(key))}); "
                    "pass --overwrite to replace the outputs or choose another OUTPUT"
                )

    def prepare(self, header: dict, settings: Iterable[str], targets: Iterable[str], overwrite: bool) -> dict | None:
        """Every refusal before anything is written; returns the earlier manifest (or None)."""
        existing = self.read()
        targets = set(targets)
        self.refuse_foreign(targets, existing)
        if existing is not None and not overwrite:
            self.check_compatible(existing, header, settings)
        # every folder this run will write in or delete from, once each
        rels = targets | (self.owned(existing) if overwrite else set())
        for parent in {Path(rel).parent for rel in rels}:
            self.check(self.folder / parent / "_")
        return existing

    # ------------------------------------------------------------ the run

    @contextlib.contextmanager
    def locked(self, prepare: Callable[[], dict | None]) -> Iterator[dict | None]:
        """``prepare()`` (the refusals), then the folder's lock for the whole block; ``prepare`` runs
        again under the lock when another run changed the folder meanwhile. Yields its result."""
        existing = prepare()  # a refused run leaves no trace, not even a lock file
        stamp = self._stamp()
        with contextlib.ExitStack() as stack:
            with self._permission():
                stack.enter_context(folder_lock(self.folder))
            self._real = self.folder.resolve()
            stack.callback(self._close_journal)
            if self._stamp() != stamp:
                existing = prepare()
            tk.remove_temp_files(self.folder)
            yield existing

    def _stamp(self) -> tuple:
        def one(p: Path) -> tuple | None:
            try:
                st = os.stat(p)
            except OSError:
                return None
            return st.st_ino, st.st_size, st.st_mtime_ns

        return one(self.manifest), one(self.folder / JOURNAL)

    def start(self, header: dict, existing: dict | None, overwrite: bool, rows: list[dict]) -> None:
        """With --overwrite, removes every file the earlier manifest lists; then records this run's
        header and ``rows`` (earlier outputs kept) and opens the journal."""
        if overwrite and existing is not None:
            self.remove(self.owned(existing))
        self.write_manifest({**header, "complete": False, "failed": 0, "images": rows})
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_NOFOLLOW
        self._fd = os.open(self.folder / JOURNAL, flags, 0o644)

    def finish(self, doc: dict) -> None:
        """The final manifest; the journal's rows are in it, so the journal goes."""
        self.write_manifest(doc)
        self._close_journal()
        (self.folder / JOURNAL).unlink(missing_ok=True)

    def _close_journal(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def journal(self, row: dict) -> None:
        """Appends one row (one write of one line: whole or torn at the end, never interleaved)."""
        if self._fd is None:
            return
        line = (json.dumps(row) + "\n").encode()
        with self._journal_lock:
            os.write(self._fd, line)

    def write_manifest(self, doc: dict) -> None:
        self.check(self.manifest)
        with self._permission():
            tk.write_manifest(self.folder, doc)

    # ------------------------------------------------------------ writes and deletes

    def check(self, path: Path) -> None:
        """``path`` must resolve (its folder after symlinks, now) to a place inside OUTPUT."""
        if _inside(path.parent.resolve(), self.real):
            return
        below = [p for p in [*reversed(path.parents), path] if self.folder in p.parents]
        link = next((p for p in below if p.is_symlink()), path.parent)
        raise UserError(
            f"{link}: a symbolic link to {link.resolve()}, outside OUTPUT {self.folder}; optvq writes and "
            "deletes only inside OUTPUT; remove the link or choose another OUTPUT"
        )

    def write(self, rel: str, write: Callable[[Path], None], row: dict | None = None) -> None:
        """``write(tmp)``, then ``row`` to the journal, then the file takes its name (atomically).
        A file already at ``rel`` is one optvq wrote (``prepare`` refused others): it goes first,
        so a journalled row never describes an old file."""
        path = self.folder / rel
        self.check(path)
        with self._permission():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.check(path)
            if os.path.lexists(path):
                path.unlink()

            def commit(tmp: Path) -> None:
                write(tmp)
                self.check(path)  # again at the moment the file takes its name
                if row is not None:
                    self.journal(row)

            atomic_write(path, commit)

    def remove(self, rels: Iterable[str], protect: Iterable[Path] = ()) -> None:
        """Deletes OUTPUT/rel for each rel (and the folders that leaves empty, up to OUTPUT). Every
        path is checked before the first is deleted, and each again just before it is."""
        protected = {Path(p).resolve() for p in protect}
        paths = [self.folder / rel for rel in sorted(rels)]
        for path in paths:
            self.check(path)
        for path in paths:
            if not (path.is_file() or path.is_symlink()) or path.resolve() in protected:
                continue
            self.check(path)
            path.unlink()
            self._prune(path.parent)

    def _prune(self, folder: Path) -> None:
        while folder != self.folder and _inside(folder.resolve(), self.real) and not folder.is_symlink():
            try:
                folder.rmdir()  # only succeeds when empty
            except OSError:
                return
            folder = folder.parent

    @contextlib.contextmanager
    def _permission(self) -> Iterator[None]:
        try:
            yield
        except PermissionError:
            raise UserError(
                f"{self.folder}: cannot write in this folder (permission denied); choose another OUTPUT"
            ) from None


def _differences(old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in {**old, **new} if old.get(k) != new.get(k)]
        return ", ".join(f"{k} {json.dumps(old.get(k))} vs {json.dumps(new.get(k))}" for k in keys)
    return f"{json.dumps(old)} vs {json.dumps(new)}"
