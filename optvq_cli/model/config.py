"""The model's config (every field validated, the named presets of the paper) and its provenance:
plain data, so the loader and the exporter never need the model class itself."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from optvq_cli.model.plain_cnn import DOWNSAMPLE as PLAIN_DOWNSAMPLE
from optvq_cli.model.vqgan import GROUPS
from optvq_cli.quant import ASSIGN_MODES
from optvq_cli.quant.quantizer import Commitment, LossType

Arch = Literal["plain_cnn", "vqgan"]
ARCHS = ("plain_cnn", "vqgan")
LOSS_TYPES = get_args(LossType)
COMMITMENTS = get_args(Commitment)
_TUPLE_FIELDS = ("ch_mult", "attn_resolutions", "cnn_widths")
_FLOAT_FIELDS = ("dropout", "beta", "epsilon")
_INT_FIELDS = ("in_channels", "out_channels", "resolution", "ch", "num_res_blocks", "z_channels")
_INT_FIELDS += ("n_codes", "e_dim", "heads", "n_iters")
# Fields that only one architecture reads; config.json stores only the ones that apply.
ARCH_FIELDS = {
    "vqgan": ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "dropout"),
    "plain_cnn": ("cnn_widths",),
}


# Upper bounds far above any real model, so that a hostile or mistyped config fails at load, by
# name, instead of as an overflow on every image or a Sinkhorn loop that never ends.
_MAX = {
    "in_channels": 64,
    "out_channels": 64,
    "resolution": 16384,
    "ch": 4096,
    "num_res_blocks": 64,
    "z_channels": 16384,
    "n_codes": 2**24,
    "e_dim": 16384,
    "heads": 1024,
    "n_iters": 1000,
    "ch_mult value": 64,
    "attn_resolutions value": 16384,
    "cnn_widths value": 16384,
    "epsilon": 1e6,
    "beta": 1e6,
}
_MAX_LEVELS = 12  # entries of ch_mult: f = 2^11 at most


def _int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    if value > _MAX.get(name, value):
        raise ValueError(f"{name}={value!r} is out of range (at most {_MAX[name]})")


def _ints(name: str, value: Any) -> tuple[int, ...]:
    """A list of integers from JSON (or a tuple); anything else (a string, 2.5) is refused."""
    if not isinstance(value, list | tuple) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ValueError(f"{name}={value!r} must be a list of integers")
    return tuple(value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    return float(value)  # 10 and 10.0 are one value, written one way


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; ``config.json`` stores these fields (those of the
    other architecture left out). Construction validates every field (ValueError)."""

    arch: Arch = "vqgan"
    in_channels: int = 3
    out_channels: int | None = None  # None: same as in_channels
    resolution: int = 256  # nominal training size; places the VQGAN's attention levels
    # VQGAN encoder/decoder (taming-transformers' names)
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    dropout: float = 0.0
    # plain CNN widths (paper's Table 4: 16, 16, 32)
    cnn_widths: tuple[int, ...] = (16, 16, 32)
    use_connector: bool = True  # 1x1 quant_conv / post_quant_conv around the quantizer
    # quantizer (OptVQuantizer's arguments)
    n_codes: int = 16384
    e_dim: int = 256
    heads: int = 4
    beta: float = 0.25
    epsilon: float = 10.0
    n_iters: int = 5
    loss_type: str = "l2"
    commitment: str = "authors"
    use_proj: bool = True
    assign: str = "sinkhorn"  # the training assignment; encode_indices chooses its own

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:
            setattr(self, name, _ints(name, getattr(self, name)))
        for name in _FLOAT_FIELDS:
            setattr(self, name, _number(name, getattr(self, name)))
        if self.out_channels is None:
            self.out_channels = self.in_channels
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad or inconsistent field."""
        if self.arch not in ARCHS:
            raise ValueError(f"arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        for name in _INT_FIELDS:
            _int(name, getattr(self, name))
        for name in _TUPLE_FIELDS:
            for v in getattr(self, name):
                _int(f"{name} value", v)
        if self.e_dim % self.heads:
            raise ValueError(f"e_dim={self.e_dim} is not divisible by heads={self.heads}")
        if not 0 < self.epsilon <= _MAX["epsilon"]:
            raise ValueError(f"epsilon={self.epsilon} must be in (0, {_MAX['epsilon']:g}] (Sinkhorn's regularization)")
        if not 0 <= self.beta <= _MAX["beta"]:
            raise ValueError(f"beta={self.beta} must be in [0, {_MAX['beta']:g}]")
        if len(self.ch_mult) > _MAX_LEVELS:
            raise ValueError(f"ch_mult has {len(self.ch_mult)} levels, at most {_MAX_LEVELS}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        for name, allowed in (("loss_type", LOSS_TYPES), ("commitment", COMMITMENTS), ("assign", ASSIGN_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("use_connector", "use_proj"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.arch == "vqgan":
            self._validate_vqgan()
        elif len(self.cnn_widths) != 3:
            raise ValueError(f"cnn_widths needs 3 values, got {list(self.cnn_widths)}")
        if self.resolution % self.downsample:
            raise ValueError(
                f"resolution={self.resolution} is not a multiple of the downsampling factor {self.downsample}"
            )
        if not self.use_connector and self.hidden_dim != self.e_dim:
            raise ValueError(f"use_connector=false needs hidden width {self.hidden_dim} == e_dim {self.e_dim}")

    def _validate_vqgan(self) -> None:
        if not self.ch_mult:
            raise ValueError("ch_mult is empty")
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % GROUPS for w in widths):
            raise ValueError(f"VQGAN widths {widths} must be multiples of {GROUPS} (GroupNorm groups)")
        levels = [self.resolution >> i for i in range(len(self.ch_mult))]
        stray = [r for r in self.attn_resolutions if r not in levels]
        if stray:
            raise ValueError(
                f"attn_resolutions {list(self.attn_resolutions)}: {stray} is no level size of resolution "
                f"{self.resolution} (levels {levels}); attention would be silently left out"
            )

    @property
    def downsample(self) -> int:
        """f: one token per f x f pixels."""
        return PLAIN_DOWNSAMPLE if self.arch == "plain_cnn" else 2 ** (len(self.ch_mult) - 1)

    @property
    def code_dim(self) -> int:
        return self.e_dim // self.heads

    @property
    def hidden_dim(self) -> int:
        """Channels the encoder emits and the decoder takes (before/after the 1x1 connectors)."""
        return self.cnn_widths[2] if self.arch == "plain_cnn" else self.z_channels

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values, without those only the other architecture reads."""
        other = ARCH_FIELDS["plain_cnn" if self.arch == "vqgan" else "vqgan"]
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in other}
        for name in _TUPLE_FIELDS:
            if name in d:
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict`` (also takes the other architecture's fields, as older files have
        them); unknown or ill-typed fields raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError("the model config is not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"bad config field: {e}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes``; changing in_channels moves out_channels along when they were equal."""
        if "in_channels" in changes and "out_channels" not in changes and self.out_channels == self.in_channels:
            changes["out_channels"] = changes["in_channels"]
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # Table 4 / Sec. 4.2: plain CNN, n = 1024, e_dim 8, 4 heads (code dimension 2).
    "mnist": ModelConfig(arch="plain_cnn", in_channels=1, resolution=32, n_codes=1024, e_dim=8, heads=4),
    "cifar10": ModelConfig(arch="plain_cnn", in_channels=3, resolution=32, n_codes=1024, e_dim=8, heads=4),
    # The bundled `default` model: the same quantizer, the plain CNN widened for RGB photographs at 256 px
    # (encodes at >= 10 images/s on a 2-core CPU; see the model card).
    "photo": ModelConfig(
        arch="plain_cnn", in_channels=3, resolution=256, cnn_widths=(48, 96, 128), n_codes=1024, e_dim=8, heads=4
    ),
    # Sec. 4.1: VQGAN f = 16, n = 16384, e_dim 256 cut into 4 (or 8) heads.
    "imagenet-f16-h4": ModelConfig(arch="vqgan", n_codes=16384, e_dim=256, heads=4),
    "imagenet-f16-h8": ModelConfig(arch="vqgan", n_codes=16384, e_dim=256, heads=8),
    # Small models for tests and quick experiments (a few thousand / a few hundred thousand parameters).
    "tiny": ModelConfig(
        arch="plain_cnn", in_channels=3, resolution=32, cnn_widths=(8, 8, 16), n_codes=64, e_dim=8, heads=2
    ),
    "tiny-vqgan": ModelConfig(
        arch="vqgan",
        in_channels=3,
        resolution=16,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        z_channels=32,
        n_codes=64,
        e_dim=16,
        heads=2,
    ),
}


@dataclass
class Provenance:
    """Where a model came from: what the loader found, attached to the model in one place."""

    source: str | None = None  # the reference as resolved: a path, bundled:NAME, hub:ORG/NAME@commit
    sha256: str | None = None  # of the weights file: the model's identity (see model/checkpoint.py)
    weights_dtype: str = "fp32"  # how the file stored encoder/decoder: a re-export keeps it
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    ignored_keys: list[str] = dataclasses.field(default_factory=list)  # tensors the model does not use
