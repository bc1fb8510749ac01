"""One model class for every OptVQ autoencoder: encoder -> 1x1 quant_conv -> OptVQuantizer ->
1x1 post_quant_conv -> decoder, with the named presets of the paper.

The state-dict names are the authors' (``encoder.*``, ``decoder.*``, ``quant_conv.*``,
``post_quant_conv.*``, ``quantize.*``): their training checkpoints use exactly these, their hub
checkpoints the same under ``model.``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from PIL import Image
from torch import nn

from optvq_cli.core.device import autocast, resolve_device
from optvq_cli.core.errors import UserError
from optvq_cli.model.plain_cnn import DOWNSAMPLE as PLAIN_DOWNSAMPLE
from optvq_cli.model.plain_cnn import PlainCNNDecoder, PlainCNNEncoder
from optvq_cli.model.vqgan import GROUPS, Decoder, Encoder
from optvq_cli.quant import ASSIGN_MODES
from optvq_cli.quant.quantizer import Assign, Commitment, LossType, OptVQuantizer

ImageInput = str | Path | Image.Image  # what preprocess reads: a path or a Pillow image
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


def device_memory(device: torch.device) -> int | None:
    """Bytes a batch may use on ``device``: a GPU's total memory, or the CPU's available memory
    (MemAvailable; the physical memory where /proc is missing). None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type != "cpu":
        return None
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class Provenance:
    """Where a model came from: what the loader found, attached to the model in one place."""

    source: str | None = None  # the reference as resolved: a path, bundled:NAME, hub:ORG/NAME@commit
    sha256: str | None = None  # of the weights file: the model's identity (see model/checkpoint.py)
    weights_dtype: str = "fp32"  # how the file stored encoder/decoder: a re-export keeps it
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    ignored_keys: list[str] = dataclasses.field(default_factory=list)  # tensors the model does not use


def _build_parts(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    if cfg.arch == "plain_cnn":
        return PlainCNNEncoder(cfg.in_channels, cfg.cnn_widths), PlainCNNDecoder(cfg.out_channels, cfg.cnn_widths)
    common = dict(
        ch=cfg.ch,
        ch_mult=cfg.ch_mult,
        num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=cfg.attn_resolutions,
        resolution=cfg.resolution,
        z_channels=cfg.z_channels,
        dropout=cfg.dropout,
    )
    return Encoder(in_channels=cfg.in_channels, **common), Decoder(out_channels=cfg.out_channels, **common)


class OptVQModel(nn.Module):
    """encode(images in [-1, 1]) -> (z_q, loss, indices); decode(z_q) -> images; plus the token
    paths ``encode_indices`` / ``decode_indices``.

    ``compute_dtype`` (None, torch.bfloat16 or torch.float16) autocasts the encoder, decoder and
    connectors; the quantizer always runs in fp32.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = _build_parts(config)
        if config.use_connector:
            self.quant_conv: nn.Module = nn.Conv2d(config.hidden_dim, config.e_dim, 1)
            self.post_quant_conv: nn.Module = nn.Conv2d(config.e_dim, config.hidden_dim, 1)
        else:
            self.quant_conv, self.post_quant_conv = nn.Identity(), nn.Identity()
        self.quantize = OptVQuantizer(
            n_codes=config.n_codes,
            e_dim=config.e_dim,
            heads=config.heads,
            beta=config.beta,
            epsilon=config.epsilon,
            n_iters=config.n_iters,
            loss_type=config.loss_type,  # type: ignore[arg-type]
            commitment=config.commitment,  # type: ignore[arg-type]
            use_proj=config.use_proj,
            assign=config.assign,  # type: ignore[arg-type]
        )
        self.compute_dtype: torch.dtype | None = None
        self.feature_chunk = 8  # encoder batch shape of nearest tokens on a GPU (see features_fixed)
        self.provenance = Provenance()  # set once, by the loader

    # -- provenance (read-only views of self.provenance) -------------------------------------
    @property
    def source(self) -> str | None:
        return self.provenance.source

    @property
    def sha256(self) -> str | None:
        return self.provenance.sha256

    @property
    def weights_dtype(self) -> str:
        return self.provenance.weights_dtype

    @property
    def metadata(self) -> dict[str, Any]:
        return self.provenance.metadata

    @property
    def ignored_keys(self) -> list[str]:
        return self.provenance.ignored_keys

    # -- description -------------------------------------------------------------------------
    @property
    def quantizer(self) -> OptVQuantizer:
        """Deprecated: the quantizer is ``model.quantize`` (its state-dict name)."""
        warnings.warn("model.quantizer is deprecated; use model.quantize", DeprecationWarning, stacklevel=2)
        return self.quantize

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def param_counts(self) -> dict[str, int]:
        parts = {
            "encoder": self.encoder,
            "quant_conv": self.quant_conv,
            "quantizer": self.quantize,
            "post_quant_conv": self.post_quant_conv,
            "decoder": self.decoder,
        }
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
        counts["total"] = sum(counts.values())
        return counts

    # -- checks ------------------------------------------------------------------------------
    def check_size(self, height: int, width: int, what: str = "image size") -> None:
        """The one check of an image size the model takes as is: positive multiples of f."""
        f = self.downsample
        if height % f or width % f or height < f or width < f:
            raise UserError(f"{what} {height}x{width}: must be a multiple of the model's downsampling factor {f}")

    def check_images(self, images: torch.Tensor) -> None:
        c = self.config.in_channels
        if images.dim() != 4 or images.shape[1] != c:
            raise UserError(f"the model takes (B, {c}, H, W) images, got shape {tuple(images.shape)}")
        self.check_size(int(images.shape[-2]), int(images.shape[-1]))
        self.check_memory(images.shape[0], int(images.shape[-2]), int(images.shape[-1]), images.device)

    def activation_bytes(self, batch: int, height: int, width: int) -> int:
        """About the peak memory of a forward pass: the widest full-resolution layer's activations,
        a few of them alive at once (input, output, a temporary, a norm's statistics), fp32."""
        cfg = self.config
        width_at_full = cfg.ch * cfg.ch_mult[0] if cfg.arch == "vqgan" else cfg.cnn_widths[0]
        return 4 * 4 * width_at_full * batch * height * width

    def check_memory(self, batch: int, height: int, width: int, device: torch.device) -> None:
        """Refuse, in one line naming what to lower, a batch that cannot fit this device's memory,
        instead of exhausting the machine or ending in an allocator's traceback."""
        need, have = self.activation_bytes(batch, height, width), device_memory(device)
        if have is not None and need > have:
            raise MemoryError(
                f"a batch of {batch} image(s) of {width}x{height} needs about {need / 2**30:.1f} GiB, more than "
                f"the {have / 2**30:.1f} GiB here: lower --batch-size or --size"
            )

    def check_indices(self, indices: torch.Tensor) -> None:
        heads, n = self.config.heads, self.config.n_codes
        if indices.dim() != 4 or indices.shape[1] != heads:
            raise UserError(
                f"token grids for this model are (B, {heads} heads, h, w), got shape {tuple(indices.shape)}"
            )
        if indices.is_floating_point() or indices.is_complex():
            raise UserError(f"token grids must hold integers, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise UserError(
                f"token values {int(indices.min())}..{int(indices.max())} are outside this model's "
                f"codebook 0..{n - 1}: the tokens come from a different model"
            )

    # -- the model ---------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-quantization features z_e (B, e_dim, h, w), fp32."""
        self.check_images(images)
        with autocast(images.device, self.compute_dtype):
            h = self.quant_conv(self.encoder(images))
        return h.float()

    def encode(self, images: torch.Tensor, assign: Assign = "nearest"):
        """(z_q with straight-through gradient, quantizer loss, indices (B, heads, h, w)).
        Nearest assignment unless ``assign`` says otherwise: never the batch-dependent Sinkhorn
        plan by surprise (training passes its assignment explicitly)."""
        return self.quantize(self.features(images), assign=assign)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        with autocast(z_q.device, self.compute_dtype):
            out = self.decoder(self.post_quant_conv(z_q))
        return out.float()

    def forward(self, images: torch.Tensor, assign: Assign | None = None):
        """(reconstruction, quantizer loss, indices). Without ``assign``: the config's training
        assignment in training mode (the training step), nearest in eval mode."""
        if assign is None:
            assign = self.quantize.assign if self.training else "nearest"
        z_q, loss, indices = self.encode(images, assign=assign)
        return self.decode(z_q), loss, indices

    @torch.no_grad()
    def encode_indices(self, images: torch.Tensor, assign: Assign = "nearest") -> torch.Tensor:
        """Token grids (B, heads, h, w), int64. ``nearest`` is batch-independent (the encoder runs
        on fixed-shape chunks, see ``features_fixed``); ``sinkhorn`` assigns the whole batch as one
        pool, exactly as the authors' models do."""
        z = self.features_fixed(images) if assign == "nearest" else self.features(images)
        return self.quantize.indices(z, assign=assign)

    @torch.no_grad()
    def features_fixed(self, images: torch.Tensor) -> torch.Tensor:
        """``features`` computed at one fixed batch shape: one image at a time on the CPU, chunks
        of ``feature_chunk`` (the last padded with zeros) on a GPU. Convolution libraries pick their
        algorithm (and so their rounding) by batch shape and memory layout: at batch 1 and 16 the
        same image's features differed by 1e-6, enough to flip 9 of 2.4 M near-tied nearest tokens;
        at one shape and layout an image's features depend on it alone. On this CPU one image at a
        time is no slower than batches (single thread) and pads nothing."""
        n = images.shape[0]
        k = 1 if images.device.type == "cpu" else self.feature_chunk
        images = images.contiguous()  # one memory layout too: channels-last strides take another path
        if n % k:
            images = torch.cat([images, images.new_zeros(k - n % k, *images.shape[1:])])
        return torch.cat([self.features(chunk) for chunk in images.split(k)])[:n]

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Images from token grids, looking the codes up exactly; any h x w."""
        self.check_indices(indices)
        return self.decode(self.quantize.lookup(indices.to(self.device)))

    # -- the Python API ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        ref: str | Path,
        revision: str | None = None,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = None,
    ) -> OptVQModel:
        """The model a reference names, in eval mode: a bundled name (``default``), a folder, a
        ``.safetensors`` file or a hub id ``ORG/NAME`` (``revision``: branch, tag or commit)."""
        from optvq_cli.model.checkpoint import load_model

        return load_model(ref, device=device, revision=revision, dtype=dtype)

    def preprocess(
        self, image: ImageInput | list[ImageInput], size: int | None = None, crop: bool = True
    ) -> torch.Tensor:
        """What ``encode`` does to an image, as the tensor the model takes: (B, C, H, W) in
        [-1, 1] on the model's device. ``image``: a path, a Pillow image or a list of them; the
        shorter side resized to ``size`` (default: the model's resolution), centre-cropped
        (``crop=False``: the whole image), padded to a multiple of the downsampling factor."""
        from optvq_cli.core.images import Preprocess, to_tensor

        images = image if isinstance(image, list) else [image]
        if not images:
            raise ValueError("preprocess: no images given")
        pre = Preprocess(size=size or int(self.config.resolution), crop=crop, multiple=self.downsample)
        tensors = [to_tensor(pre.apply(_open(im, self.config.in_channels))[0]) for im in images]
        if len({tuple(t.shape) for t in tensors}) > 1:
            raise ValueError("preprocess: with crop=False the images differ in size; pass them one at a time")
        return torch.stack(tensors).to(self.device)

    def tokenize(
        self, images: torch.Tensor | ImageInput | list[ImageInput], assign: Assign = "nearest"
    ) -> torch.Tensor:
        """Token grids (B, heads, h, w), int64, of a (B, C, H, W) tensor in [-1, 1] (or of paths /
        Pillow images, preprocessed first). ``nearest`` (default): each image's tokens depend on it
        alone; ``sinkhorn``: the batch is assigned as one pool, as in training."""
        if not isinstance(images, torch.Tensor):
            images = self.preprocess(images)
        if assign not in ASSIGN_MODES:
            raise ValueError(f"assign={assign!r}: use one of {', '.join(ASSIGN_MODES)}")
        return self.encode_indices(images.to(self.device), assign=assign)

    def detokenize(self, indices: Any) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] from token grids (B, heads, h, w) or one grid
        (heads, h, w); a tensor or a NumPy array (e.g. an ``optvq encode`` .npy file)."""
        if not isinstance(indices, torch.Tensor):
            a = np.asarray(indices)
            indices = torch.from_numpy(a.astype(np.int64) if a.dtype.kind in "iu" else a)  # floats refused below
        if indices.dim() == 3:
            indices = indices[None]
        return self.decode_indices(indices)

    def save_pretrained(self, directory: str | Path, dtype: str | None = None) -> Path:
        """Write the model as ``config.json`` + ``model.safetensors`` + ``README.md`` (what
        ``optvq export`` writes; ``from_pretrained(directory)`` loads it back). Files of the same
        names are replaced only when the folder holds an earlier optvq model."""
        from optvq_cli.model.export import export_hf, refuse_foreign_files

        directory = Path(directory)
        refuse_foreign_files(directory)
        return export_hf(self, directory, dtype=dtype)

    def push_to_hub(self, repo_id: str, private: bool = False, message: str | None = None) -> str:
        """Upload the model (the ``save_pretrained`` folder) to a hub model repo; returns its URL."""
        import tempfile

        from optvq_cli.checkpoints import hub

        with tempfile.TemporaryDirectory(prefix="optvq-push-") as tmp:
            return hub.push(self.save_pretrained(tmp), repo_id, private=private, message=message)


def _open(image: ImageInput, channels: int):
    """A Pillow image with the model's channels, from a path or an image; FileNotFoundError or
    ValueError naming the file when it cannot be read."""
    from optvq_cli.core.images import ImageError, read_image, to_channels

    if isinstance(image, Image.Image):
        return to_channels(image, channels)
    path = Path(image).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        return read_image(path, channels)
    except ImageError as e:
        raise ValueError(f"{path}: {e}") from None


def build_model(preset: str | ModelConfig, device: str | torch.device | None = None, **overrides: Any) -> OptVQModel:
    """A freshly initialized model from a preset name or a config (``overrides`` change fields)."""
    if isinstance(preset, ModelConfig):
        cfg = preset
    elif preset in PRESETS:
        cfg = PRESETS[preset]
    else:
        raise UserError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    if overrides:
        try:
            cfg = cfg.replace(**overrides)
        except (TypeError, ValueError) as e:
            raise UserError(f"bad model settings for {preset!r}: {e}") from None
    if device is not None and str(device) == "meta":  # shapes only, no memory: counting, loading
        with torch.device("meta"):
            return OptVQModel(cfg)
    model = OptVQModel(cfg)
    if device is not None:
        model = model.to(resolve_device(device))
    return model
