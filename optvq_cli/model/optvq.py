"""One model class for every OptVQ autoencoder: encoder -> 1x1 quant_conv -> OptVQuantizer ->
1x1 post_quant_conv -> decoder, with the named presets of the paper.

The state-dict names are the authors' (``encoder.*``, ``decoder.*``, ``quant_conv.*``,
``post_quant_conv.*``, ``quantize.*``): their training checkpoints use exactly these, their hub
checkpoints the same under ``model.``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from optvq_cli.core.device import autocast, resolve_device
from optvq_cli.core.errors import UserError
from optvq_cli.model import checkpoint, export
from optvq_cli.model.config import PRESETS, ModelConfig, Provenance
from optvq_cli.model.plain_cnn import PlainCNNDecoder, PlainCNNEncoder
from optvq_cli.model.vqgan import Decoder, Encoder
from optvq_cli.quant import ASSIGN_MODES
from optvq_cli.quant.quantizer import Assign, OptVQuantizer

ImageInput = str | Path | Image.Image  # what preprocess reads: a path or a Pillow image


_ALWAYS_FITS = 2**30  # estimated bytes below which a batch is not checked against the device's memory


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
        need = self.activation_bytes(batch, height, width)
        if need < _ALWAYS_FITS:  # every encoder call passes here: no /proc read for ordinary batches
            return
        have = device_memory(device)
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
        return checkpoint.load_model(cls, ref, device, revision, dtype)

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
        directory = Path(directory)
        export.refuse_foreign_files(directory)
        return export.export_hf(self, directory, dtype=dtype)

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
