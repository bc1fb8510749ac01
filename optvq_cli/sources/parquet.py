"""Images inside Parquet files, the Hugging Face image-dataset layout: a column ``image`` holding
``{bytes, path}`` (or plain binary) and a column ``label`` (integers or class names).

Listing reads the file footers and the label column only; an image is read by (file, row group,
row in group), and a ``ParquetReader`` keeps the last row group's image column decoded (one
group per process, never a whole file), so reading rows in order costs one decode per group.
pyarrow reads row groups, projects columns and nested fields; files are read, not memory-mapped:
mapped pages count towards a process's RSS, which then grows with the file (measured in
benchmarks/bench_sources.py), while reads keep it one row group large.

Order (fixed): files in name order (a folder's ``.parquet`` files, not its subfolders), rows in
file order, row group by row group. A row's member name is its row number in the file, which is
unique and stable (the stored ``path`` is often empty or repeated).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from optvq_cli.core.errors import UserError
from optvq_cli.sources.base import Inputs, Item, NoImages, Problem, Source, register
from optvq_cli.sources.tar import ContainerError, container_root, problem_of

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"


class ParquetRow(NamedTuple):
    """One image row: read it with ``ParquetReader.read(record)``.

    container: the .parquet file's path; member: the row's number in the file (as text); row_group,
    row_in_group: where it lies; label: the label column's value (int or class name), None without
    a label column."""

    container: str
    member: str
    row_group: int
    row_in_group: int
    label: int | str | None


def is_parquet_spec(spec: str | Path) -> bool:
    """Whether INPUT names Parquet files: a .parquet file, or a folder holding some."""
    p = Path(spec)
    if p.is_dir():
        return any(c.suffix == ".parquet" and c.is_file() for c in p.iterdir())
    return p.suffix == ".parquet"


def find_parquet(spec: str | Path) -> list[Path]:
    """The .parquet files INPUT names, in name order: the file, or a folder's (not its
    subfolders'). UserError when there are none."""
    p = Path(spec)
    if p.is_dir():
        files = sorted((c for c in p.iterdir() if c.suffix == ".parquet" and c.is_file()), key=lambda c: c.name)
        if not files:
            raise UserError(f"{p}: no .parquet files in this folder")
        return files
    if not p.is_file():
        raise UserError(f"{p}: no such file or folder")
    return [p]


def open_parquet(path: str | Path):
    """``pyarrow.parquet.ParquetFile``; ContainerError naming the file when it is
    not a readable Parquet file (a bad footer, truncated, not Parquet at all)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(str(path))
    except (pa.ArrowException, OSError) as e:
        raise ContainerError(
            f"{path}: not a readable Parquet file ({_first_line(e)}); copy or convert it again"
        ) from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def image_field(pf, path: str | Path, column: str = IMAGE_COLUMN) -> str:
    """The column path holding the image bytes: ``image.bytes`` for a {bytes, path} struct,
    ``image`` for a binary column. ContainerError naming the file and the option otherwise."""
    import pyarrow as pa

    schema = pf.schema_arrow
    if column not in schema.names:
        raise ContainerError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)}); fix --image-column")
    kind = schema.field(column).type
    binary = (pa.types.is_binary, pa.types.is_large_binary)
    if any(t(kind) for t in binary):
        return column
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        if any(t(kind.field("bytes").type) for t in binary):
            return f"{column}.bytes"
    raise ContainerError(f"{path}: column {column!r} is {kind}, not image bytes (binary, or a struct with bytes)")


def list_parquet(
    path: str | Path, image_column: str = IMAGE_COLUMN, label_column: str = LABEL_COLUMN
) -> Iterator[ParquetRow]:
    """The rows of one Parquet file, in file order (see the module's docstring). Reads the label
    column one row group at a time. Without ``label_column`` in the file, labels are None when it
    is the default name and a ContainerError (naming --label-column) when it was asked for."""
    import pyarrow as pa

    pf = open_parquet(path)
    has_label = check_columns(pf, path, image_column, label_column)
    row, container = 0, str(path)  # one string for the file's rows, not one a row
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        labels: list = [None] * n
        if has_label:
            try:
                labels = pf.read_row_group(g, columns=[label_column]).column(0).to_pylist()
            except (pa.ArrowException, OSError) as e:
                raise ContainerError(f"{path}: row group {g} unreadable ({_first_line(e)})") from None
        for i, value in enumerate(labels):
            yield ParquetRow(container, str(row + i), g, i, _label(value, path, label_column))
        row += n


def check_columns(pf, path: str | Path, image_column: str, label_column: str) -> bool:
    """Whether the file has the label column; ContainerError naming the option when the image
    column is missing or not image bytes, or a ``label_column`` other than the default is missing."""
    image_field(pf, path, image_column)
    has_label = label_column in pf.schema_arrow.names
    if not has_label and label_column != LABEL_COLUMN:
        raise ContainerError(
            f"{path}: no column {label_column!r} (columns: {', '.join(pf.schema_arrow.names)}); fix --label-column"
        )
    return has_label


def _label(value, path, column: str) -> int | str | None:
    if value is None or isinstance(value, int | str) and not isinstance(value, bool):
        return value
    raise ContainerError(f"{path}: column {column!r} holds {type(value).__name__}; labels are integers or class names")


def class_names(path: str | Path, label_column: str = LABEL_COLUMN) -> list[str] | None:
    """The class names a Hugging Face ``ClassLabel`` column declares in the file's metadata (index
    = the integer label), None where there are none."""
    meta = open_parquet(path).schema_arrow.metadata or {}
    try:
        features = json.loads(meta[b"huggingface"])["info"]["features"]
        names = features[label_column]["names"]
    except (KeyError, TypeError, ValueError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


class ParquetReader:
    """Reads image bytes by record, keeping the last decoded row group's image column (only that
    column, of one group) and the open files: reading a file's rows in order decodes each group
    once and memory stays one group large. Pickles empty (a DataLoader worker builds its own)."""

    def __init__(self, image_column: str = IMAGE_COLUMN):
        self.image_column = image_column
        self._files: dict[str, tuple] = {}  # path -> (ParquetFile, image field)
        self._group: tuple[str, int] | None = None
        self._images = None

    def read(self, record: ParquetRow) -> bytes:
        """The row's image bytes. OSError naming the row when it is empty or its row group is
        unreadable (a failed item; the other rows go on)."""
        import pyarrow as pa

        key = (record.container, record.row_group)
        if self._group != key:
            pf, field = self._open(record.container)
            self._images = None  # let the last group go before decoding the next
            try:
                table = pf.read_row_group(record.row_group, columns=[field])
            except (pa.ArrowException, OSError) as e:
                raise OSError(
                    f"{record.container}: row group {record.row_group} unreadable ({_first_line(e)})"
                ) from None
            column = table.column(0)
            images = column.combine_chunks()
            self._images = images.flatten()[0] if "." in field else images  # flatten: parent nulls kept
            self._group = key
        value = self._images[record.row_in_group].as_py()
        if not value:
            raise OSError(f"{record.container}/{record.member}: no image bytes in this row")
        return value

    def _open(self, path: str) -> tuple:
        if path not in self._files:
            pf = open_parquet(path)
            self._files[path] = (pf, image_field(pf, path, self.image_column))
        return self._files[path]

    def __getstate__(self) -> dict:
        return {"image_column": self.image_column}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["image_column"])


# ---------------------------------------------------------------- the source kind


@register
class ParquetFiles(Source):
    """A .parquet file or a folder of them (the Hugging Face layout). Items are ``FILE/row`` in
    the module's order; labels are the label column's values: integers kept as the file numbers
    them (with its ClassLabel names as the classes), class names numbered in sorted order. A
    damaged file is one problem line and the other files still list."""

    kind = "parquet"

    @classmethod
    def recognises(cls, input: Path) -> bool:
        return is_parquet_spec(input)

    def settings(self) -> dict:
        return {"image_column": self.options.image_column}

    def check(self, exclude=()) -> None:
        """The file list, and the columns of the first readable file: a wrong --image-column or
        --label-column is one line before the model loads."""
        for path in find_parquet(self.input):
            try:
                pf = open_parquet(path)
            except ContainerError:
                continue  # listed as a problem; the other files go on
            try:
                check_columns(pf, path, self.options.image_column, self.options.label_column)
            except ContainerError as e:
                raise UserError(str(e)) from None
            return

    def list(self, exclude=()) -> Inputs:
        opts, root = self.options, container_root(self.input)
        items: list[Item] = []
        problems: list[Problem] = []
        declared: list[str] | None = None
        for path in find_parquet(self.input):
            try:
                rows = list(list_parquet(path, opts.image_column, opts.label_column))
                names = class_names(path, opts.label_column)
            except ContainerError as e:
                problems.append(problem_of(e, path))
                continue
            if names is not None and declared is not None and names != declared:
                problems.append((str(path), "its ClassLabel names differ from the first file's; it was skipped"))
                continue
            declared = declared or names
            for r in rows:
                items.append(
                    Item(f"{path.name}/{r.member}", path, r.member, r.label, (r.row_group, r.row_in_group), self)
                )
        if not items and not problems:
            raise NoImages(f"{self.input}: no rows in the Parquet file(s)")
        return Inputs(self, root, items, problems, f"column {opts.label_column}", declared)

    def open(self, item: Item) -> io.BytesIO:
        reader = self.cache.setdefault("reader", ParquetReader(self.options.image_column))
        group, row = item.at
        return io.BytesIO(reader.read(ParquetRow(str(item.path), item.member or "", group, row, None)))
