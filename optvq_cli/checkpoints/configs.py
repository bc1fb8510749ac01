"""The three config dialects a model folder may hold, as ModelConfig fields: ours
(``{"optvq_format": N, "model": {...}}``), a bare field dict, and the authors' hub config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from optvq_cli.checkpoints.files import FORMAT_VERSION
from optvq_cli.checkpoints.upstream import config_from_upstream


@dataclass
class ConfigFields:
    fields: dict[str, Any]  # ModelConfig fields, not yet validated
    kind: str  # "optvq" (ours) or "upstream" (the authors' PyTorchModelHubMixin config)
    metadata: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str | None = None


def read_dialect(raw: Any) -> ConfigFields:
    """The fields of any of the three dialects; ValueError when it is none of them."""
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    if "optvq_format" in raw:
        version = raw["optvq_format"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"optvq_format {version!r} is not a version number")
        if version > FORMAT_VERSION:
            raise ValueError(f"format version {version} is newer than this optvq; upgrade")
        if not isinstance(raw.get("model"), dict):
            raise ValueError("the model config is not a JSON object")
        return ConfigFields(dict(raw["model"]), "optvq", dict(raw.get("metadata") or {}), raw.get("weights_sha256"))
    if "encoder" in raw and "quantize" in raw:
        return ConfigFields(config_from_upstream(raw), "upstream", {"upstream_config": raw})
    if "arch" in raw:
        return ConfigFields(dict(raw), "optvq")
    raise ValueError("neither an optvq config nor the authors' config (no 'model', 'arch' or 'encoder')")
