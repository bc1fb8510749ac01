"""Labels: the one rule that numbers them, whether they come from the source (class folders, a
tar's ``.cls`` members, a label column) or from a ``--labels`` file.

Class names (strings) are numbered in sorted order, so a class folder and an archive of the same
classes give the same numbers; integers are kept as they are; -1 means "no label".
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optvq_cli.core.errors import UserError
from optvq_cli.sources.base import Inputs

NO_LABEL = -1


def read_label_file(path: Path, root: Path) -> dict[str, Any]:
    """{relative path: label} from a CSV (``path,label`` rows, a header row allowed) or a JSON object."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the labels ({e})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not JSON ({e}); give an object {{path: label}}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: give a JSON object {{path: label}}")
        pairs = list(data.items())
    else:
        rows = [r for r in csv.reader(text.splitlines()) if r and not r[0].startswith("#")]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
            rows = rows[1:]
        bad = next((i for i, r in enumerate(rows) if len(r) != 2), None)
        if bad is not None:
            raise UserError(f"{path}: row {bad + 1} is not `path,label`")
        pairs = [(r[0].strip(), r[1].strip()) for r in rows]
    out = {}
    for key, label in pairs:
        p = Path(key)
        rel = p.resolve().relative_to(root.resolve()).as_posix() if p.is_absolute() else p.as_posix()
        out[rel] = label
    return out


def _int_label(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.lstrip("-").isdigit():
        return int(v)
    return None


def number_classes(names: Sequence[str]) -> tuple[list[int], list[str]]:
    """(number of each name, the sorted class list): the class folders' rule."""
    classes = sorted(set(names))
    number = {c: i for i, c in enumerate(classes)}
    return [number[n] for n in names], classes


def _from_file(inputs: Inputs, labels: Path) -> tuple[list[int], list[str] | None, str]:
    table = read_label_file(Path(labels), inputs.root)
    rels = [it.rel for it in inputs.items]
    missing = [r for r in rels if r not in table]
    if missing:
        raise UserError(
            f"{labels}: no label for {len(missing)} image(s) (first: {missing[0]}); "
            "give every image a label, by its path relative to INPUT"
        )
    values = [table[r] for r in rels]
    ints = [_int_label(v) for v in values]
    if all(i is not None and i >= NO_LABEL for i in ints):  # -1: this image has no label
        return ints, None, f"file {Path(labels).name}"  # type: ignore[return-value]
    numbers, classes = number_classes([str(v) for v in values])
    return numbers, classes, f"file {Path(labels).name}"


def assign_labels(inputs: Inputs, labels: Path | None = None) -> tuple[list[int], list[str] | None, str]:
    """(label per item, class names or None, where the labels came from). A labels file gives
    integers as they are and names numbered in sorted order; without one, the source's labels:
    class names numbered in sorted order, integers as they are (with the names the source declares
    for them, e.g. a Parquet file's ClassLabel); otherwise every label is -1."""
    if labels is not None:
        return _from_file(inputs, labels)
    given = [it.label for it in inputs.items]
    if not given or any(v is None for v in given):
        return [NO_LABEL] * len(given), None, "none"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in given):
        return list(given), inputs.classes, inputs.labels_from  # type: ignore[arg-type]
    numbers, classes = number_classes([str(v) for v in given])
    return numbers, classes, inputs.labels_from
