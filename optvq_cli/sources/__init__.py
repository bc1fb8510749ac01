"""Inputs: one layer that every job (`encode`, `reconstruct`, `eval`, `train`) reads images through.

``find(INPUT)`` picks the first registered kind of source that recognises INPUT and lists its
items (``base``); tar files and shards (``tar``) and Parquet files (``parquet``) are registered
kinds; folders, ``.txt`` lists and single files are the built-in fallbacks (``files``);
labels from the source or a ``--labels`` file are numbered by one rule (``labels``).
"""

from optvq_cli.sources import files, parquet, tar  # registers the kinds
from optvq_cli.sources.base import (
    Inputs,
    Item,
    NoImages,
    Problem,
    Source,
    SourceOptions,
    check,
    file_identity,
    find,
    is_collection,
    kind_of,
    open_source,
    register,
    unregister,
)
from optvq_cli.sources.labels import NO_LABEL, assign_labels, read_label_file

__all__ = [
    "NO_LABEL",
    "Inputs",
    "Item",
    "NoImages",
    "Problem",
    "Source",
    "SourceOptions",
    "assign_labels",
    "check",
    "file_identity",
    "files",
    "find",
    "is_collection",
    "kind_of",
    "open_source",
    "parquet",
    "read_label_file",
    "register",
    "tar",
    "unregister",
]
