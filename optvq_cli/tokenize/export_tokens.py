"""``optvq tokens export``: an encode OUTPUT's token rows as one file that generator code loads
without optvq: Parquet (``datasets.load_dataset("parquet", data_files=...)``, pandas, polars) or a
WebDataset tar.

Parquet: one row per token row, columns

    tokens  fixed_size_list<int16 (int32 past 32 768 codes)>[heads * h * w]  row-major (heads, h, w)
    label   int64, -1 where the data set has none
    path    string, the source image (relative to INPUT; the output name for files / packed layouts)
    view    string ("center", "flip", ...)

and the file metadata key ``optvq`` holding JSON: the grid ``shape`` [heads, h, w], ``n_codes``, the
``views``, the ``classes`` (label i is classes[i]) and the model's identity. Rows are written a
row group at a time (``ROWS_PER_GROUP``), so memory stays flat in the number of rows.

WebDataset: per row ``NNNNNNNN.tokens.npy`` (heads, h, w), ``NNNNNNNN.cls`` (the label) and
``NNNNNNNN.json`` ({path, view, label}), in row order.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import atomic_write, offline
from optvq_cli.tokenize.dataset import read_index
from optvq_cli.tokenize.shards import NO_LABEL, Shard

FORMATS = {"parquet": ".parquet", "webdataset": ".tar"}
ROWS_PER_GROUP = 8192  # at 256 int16 tokens a row: 4 MiB of tokens a group
META_KEY = b"optvq"
EXPORT_FORMAT = "optvq-token-rows"
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_WDS_TOKENS = re.compile(r"\d{8}\.tokens\.npy")


def token_rows(tokens_dir: str | Path, batch: int = ROWS_PER_GROUP) -> Iterator[dict[str, Any]]:
    """The OUTPUT's rows in TokenDataset's order, a batch at a time: {tokens (n, heads, h, w),
    label (n,), path [n], view [n]}. Reads one shard (or ``batch`` token files) at a time."""
    root = Path(tokens_dir)
    index = read_index(root)
    if index["layout"] == "shards":
        for s in index["shards"]:
            rows = Shard(root / s["file"]).read_all()
            for a in range(0, len(rows), batch):
                b = min(a + batch, len(rows))
                yield {
                    "tokens": rows.tokens[a:b],
                    "label": np.asarray(rows.labels[a:b], np.int64),
                    "path": rows.paths[a:b],
                    "view": [rows.view_names[int(v)] for v in rows.views[a:b]],
                }
        return
    from optvq_cli.tokenize import tokens as tk
    from optvq_cli.tokenize.dataset import TokenDataset

    data = TokenDataset(root)
    if index["layout"] == "packed":
        names = (root / tk.PATHS).read_text(encoding="utf-8").splitlines()
    else:
        names = [row["name"] for row in index.get("images", [])]
    for a in range(0, len(data), batch):
        b = min(a + batch, len(data))
        yield {
            "tokens": np.stack([data[i][0].numpy() for i in range(a, b)]),
            "label": np.full(b - a, NO_LABEL, np.int64),
            "path": names[a:b],
            "view": ["center"] * (b - a),
        }


def check_export(tokens_dir: str | Path, out: str | Path, format: str, overwrite: bool, repo_id: str | None) -> None:
    """Every refusal that needs no writing: an unknown format, OUT of another suffix, an existing
    OUT without --overwrite or not written by this command, a bad repo id, offline with a push."""
    if format not in FORMATS:
        raise UserError(f"--format {format}: give one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.suffix != FORMATS[format]:
        raise UserError(f"{out}: a {format} export is one {FORMATS[format]} file; name it NAME{FORMATS[format]}")
    read_index(tokens_dir)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; name the {FORMATS[format]} file to write")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; give --overwrite to replace it")
    if out.exists() and not _written_by_export(out, format):
        raise UserError(f"{out}: not a token export optvq wrote; refusing to replace it, choose another OUT")
    if repo_id is not None:
        if not _REPO_ID.fullmatch(repo_id):
            raise UserError(f"--push-to-hub {repo_id}: give a dataset repository as ORG/NAME")
        if offline():
            raise UserError("--push-to-hub needs the network, and OPTVQ_OFFLINE or HF_HUB_OFFLINE is set; unset it")


def _written_by_export(out: Path, format: str) -> bool:
    try:
        if format == "parquet":
            import pyarrow.parquet as pq

            meta = pq.read_schema(out).metadata or {}
            return json.loads(meta.get(META_KEY, b"{}")).get("format") == EXPORT_FORMAT
        with tarfile.open(out, "r:") as tf:
            first = tf.next()
            return first is not None and _WDS_TOKENS.fullmatch(first.name) is not None
    except Exception:  # noqa: BLE001 - whatever cannot be read as our export is not ours
        return False


def export_tokens(
    tokens_dir: str | Path, out: str | Path, format: str = "parquet", overwrite: bool = False
) -> dict[str, Any]:
    """Write the export atomically (readers see the old file or the whole new one) and return
    {rows, file, shape}. UserError for what ``check_export`` refuses or rows of mixed grid shapes."""
    check_export(tokens_dir, out, format, overwrite, None)
    index = read_index(tokens_dir)
    model = index.get("model") or {}
    meta = {
        "format": EXPORT_FORMAT,
        "optvq_format": 1,
        "n_codes": model.get("n_codes"),
        "views": list(index.get("views") or ["center"]),
        "classes": index.get("classes"),
        "model": {k: model.get(k) for k in ("ref", "sha256", "n_codes", "heads")},
    }
    result: dict[str, Any] = {}
    writer = _write_parquet if format == "parquet" else _write_webdataset
    atomic_write(out, lambda tmp: result.update(writer(tmp, token_rows(tokens_dir), meta)))
    return {"file": str(out), **result}


def _shape_of(batch: dict[str, Any], shape: tuple | None) -> tuple:
    got = tuple(int(d) for d in batch["tokens"].shape[1:])
    if shape is not None and got != shape:
        raise UserError(f"token grids of two shapes ({shape} and {got}); export outputs of one grid size")
    return got


def _write_parquet(path: Path, batches: Iterator[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_codes = meta.get("n_codes") or 2**31
    dtype = np.int16 if n_codes <= 2**15 else np.int32
    writer, shape, rows, pending = None, None, 0, []
    for batch in batches:
        shape = _shape_of(batch, shape)
        if writer is None:
            schema = _schema(pa, dtype, shape, {**meta, "shape": list(shape)})
            writer = pq.ParquetWriter(str(path), schema, compression="zstd")
        n = len(batch["path"])
        flat = np.ascontiguousarray(batch["tokens"].reshape(n, -1).astype(dtype))
        tokens = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        columns = [tokens, pa.array(batch["label"]), pa.array(batch["path"], pa.string()), pa.array(batch["view"])]
        pending.append(pa.Table.from_arrays(columns, schema=schema))
        rows += n
        if sum(len(t) for t in pending) >= ROWS_PER_GROUP:
            pending = _flush(writer, pending, full_only=True)
    if writer is None:
        raise UserError("the OUTPUT holds no token rows; nothing to export")
    _flush(writer, pending, full_only=False)
    writer.close()
    return {"rows": rows, "shape": list(shape)}


def _schema(pa, dtype, shape: tuple, meta: dict[str, Any]):
    size = int(np.prod(shape))
    return pa.schema(
        [
            pa.field("tokens", pa.list_(pa.from_numpy_dtype(dtype), size)),
            pa.field("label", pa.int64()),
            pa.field("path", pa.string()),
            pa.field("view", pa.string()),
        ],
        metadata={META_KEY: json.dumps(meta, sort_keys=True).encode()},
    )


def _flush(writer, pending: list, full_only: bool) -> list:
    """Write the pending rows as row groups of ROWS_PER_GROUP; keep a short remainder when
    ``full_only`` (the last group of the file may be short)."""
    import pyarrow as pa

    table = pa.concat_tables(pending)
    full = len(table) - len(table) % ROWS_PER_GROUP if full_only else len(table)
    if full:
        writer.write_table(table.slice(0, full), row_group_size=ROWS_PER_GROUP)
    return [table.slice(full)] if full < len(table) else []


def _write_webdataset(path: Path, batches: Iterator[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    rows, shape = 0, None
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for batch in batches:
            shape = _shape_of(batch, shape)
            for i in range(len(batch["path"])):
                key = f"{rows:08d}"
                label = int(batch["label"][i])
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(batch["tokens"][i]), allow_pickle=False)
                info = {"path": batch["path"][i], "view": batch["view"][i], "label": label}
                _add(tf, f"{key}.tokens.npy", buf.getvalue())
                _add(tf, f"{key}.cls", f"{label}\n".encode())
                _add(tf, f"{key}.json", json.dumps(info, ensure_ascii=False).encode())
                rows += 1
    if shape is None:
        raise UserError("the OUTPUT holds no token rows; nothing to export")
    return {"rows": rows, "shape": list(shape)}


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed fields: the same rows give the same bytes
    tf.addfile(info, io.BytesIO(data))


def push_to_hub(out: str | Path, repo_id: str, format: str) -> str:
    """Upload the export into the dataset repository ``repo_id`` (created when missing) as its
    train split; returns the repository's URL. UserError with the hub's one line on failure."""
    from huggingface_hub import HfApi

    if offline():
        raise UserError("--push-to-hub needs the network, and OPTVQ_OFFLINE or HF_HUB_OFFLINE is set; unset it")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
        api.upload_file(
            path_or_fileobj=str(out),
            path_in_repo=f"data/train-00000-of-00001{FORMATS[format]}",
            repo_id=repo_id,
            repo_type="dataset",
        )
    except Exception as e:  # noqa: BLE001 - the hub raises many types (HTTP, auth, network); one line each
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--push-to-hub {repo_id}: {line} (log in with `hf auth login`; {out} is written)") from None
    return str(url)
