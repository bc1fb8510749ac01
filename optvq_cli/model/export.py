"""``optvq export``: an inference-only Hugging Face folder, and standalone programs for
images -> indices (nearest assignment) and indices -> images, each checked against the model.

Programs (written into the output folder):
  torchscript   encode_indices.pt / decode_indices.pt     (torch.jit.trace; torch.jit.load)
  torch-export  encode_indices.pt2 / decode_indices.pt2   (torch.export; torch.export.load)
  onnx          encode_indices.onnx / decode_indices.onnx (needs the onnx packages)
Each takes float32 NCHW images in [-1, 1] or int64 (B, heads, h, w) indices; H and W must be
multiples of the downsampling factor. If torch.export cannot keep the sizes symbolic, the .pt2
programs take only the example's shape, and the check says so.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from optvq_cli.core.errors import UserError, first_line
from optvq_cli.core.fileio import atomic_write_text
from optvq_cli.model.checkpoint import CONFIG_NAME, WEIGHTS_NAME, save_model

OptVQModel = Any  # the model class is not imported: it calls this module (save_pretrained)

FORMATS = ("hf", "torchscript", "torch-export", "onnx")
PROGRAM_SUFFIX = {"torchscript": ".pt", "torch-export": ".pt2", "onnx": ".onnx"}
PROGRAMS = ("encode_indices", "decode_indices")
HF_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md")
# Every file `optvq export` writes: a folder of these only may be replaced by --overwrite.
EXPORT_FILES = frozenset(HF_FILES) | {p + s for p in PROGRAMS for s in PROGRAM_SUFFIX.values()}


def looks_like_export(folder: Path) -> bool:
    """True for an empty folder or one holding only files an earlier export writes (with its model
    or programs among them): what ``--overwrite`` may replace without losing anything else."""
    entries = list(folder.iterdir())
    if any(not p.is_file() or p.is_symlink() or p.name not in EXPORT_FILES for p in entries):
        return False
    names = {p.name for p in entries}
    has_model = {CONFIG_NAME, WEIGHTS_NAME} <= names
    return not entries or has_model or any(n.startswith(PROGRAMS) for n in names)


class IndexEncoder(nn.Module):
    """Images (B, C, H, W) in [-1, 1] -> indices (B, heads, H/f, W/f): nearest code per head chunk.

    The projected code table is frozen into buffers, so the program needs no quantizer code.
    """

    def __init__(self, model: OptVQModel):
        super().__init__()
        self.encoder, self.quant_conv = model.encoder, model.quant_conv
        codes = model.quantize.codes().detach().float()
        self.register_buffer("codes", codes.clone())
        self.register_buffer("codes_sq", (codes * codes).sum(1))
        self.heads, self.code_dim = model.config.heads, model.config.code_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.quant_conv(self.encoder(images)).float()
        b, _, h, w = z.shape
        x = z.permute(0, 2, 3, 1).reshape(-1, self.code_dim)
        # argmin ||x - c||^2 = argmin (||c||^2 - 2 x.c): ||x||^2 is the same for every code.
        idx = (self.codes_sq.unsqueeze(0) - 2.0 * (x @ self.codes.t())).argmin(dim=1)
        return idx.reshape(b, h, w, self.heads).permute(0, 3, 1, 2)


class IndexDecoder(nn.Module):
    """Indices (B, heads, h, w) -> images (B, C, h*f, w*f), exact code lookup."""

    def __init__(self, model: OptVQModel):
        super().__init__()
        self.decoder, self.post_quant_conv = model.decoder, model.post_quant_conv
        self.register_buffer("codes", model.quantize.codes().detach().float().clone())
        self.e_dim = model.config.e_dim

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        b, _, h, w = indices.shape
        vec = F.embedding(indices, self.codes)  # (b, heads, h, w, d)
        z = vec.permute(0, 2, 3, 1, 4).reshape(b, h, w, self.e_dim).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z))


@dataclass
class Check:
    """One exported program run against the PyTorch model right after export."""

    path: Path
    max_abs_diff: float | None = None  # images: largest |program - model|
    index_mismatches: int | None = None  # indices: how many differ
    index_total: int | None = None
    static_shape: str | None = None  # torch-export fell back to the example's shape: why

    def line(self) -> str:
        if self.index_total is not None:
            text = f"{self.path.name}: {self.index_mismatches}/{self.index_total} indices differ from the model"
        else:
            text = f"{self.path.name}: largest |difference| from the model {self.max_abs_diff:.3g}"
        if self.static_shape:
            text += f"; warning: {self.static_shape}"
        return text


def example_images(model: OptVQModel, height: int, width: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Smooth deterministic test images in [-1, 1] (upsampled noise: image-like, not white noise)."""
    g = torch.Generator().manual_seed(seed)
    c = model.config.in_channels
    small = torch.rand(batch, c, max(1, height // 4), max(1, width // 4), generator=g) * 2 - 1
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False).clamp(-1, 1)


# -- Hugging Face folder -------------------------------------------------------------------------
def model_card(model: OptVQModel, sha256: str, dtype: str) -> str:
    cfg, meta = model.config, model.metadata
    counts = model.param_counts()
    lines = [
        "---",
        "library_name: optvq",
        "tags: [image-tokenizer, vector-quantization, optvq]",
        "---",
        "",
        "# OptVQ image tokenizer",
        "",
        "An autoencoder with OptVQ quantization (Zhang et al., *Preventing Local Pitfalls in Vector "
        "Quantization via Optimal Transport*), exported by `optvq export`.",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {cfg.arch} |",
        f"| downsampling factor | {cfg.downsample} |",
        f"| codebook | {cfg.n_codes} codes x {cfg.code_dim} dims, {cfg.heads} heads (e_dim {cfg.e_dim}) |",
        f"| input | {cfg.in_channels}-channel images in [-1, 1], sizes a multiple of {cfg.downsample} |",
        f"| parameters | {counts['total']:,} |",
        f"| weights | `{WEIGHTS_NAME}`, {dtype}, sha256 `{sha256}` |",
        "",
        "## Provenance",
        "",
        f"- exported from: `{model.source or 'a freshly built model'}`",
    ]
    if model.sha256:
        lines.append(f"- source weights sha256: `{model.sha256}`")
    for key in ("converted_from", "converted_from_sha256", "checkpoint_format", "preset", "dataset", "steps"):
        if key in meta:
            lines.append(f"- {key.replace('_', ' ')}: `{meta[key]}`")
    metrics = meta.get("metrics")
    if isinstance(metrics, dict) and metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items()]
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        "optvq info MODEL",
        "optvq encode images/ tokens/ --model MODEL",
        "optvq decode tokens/ reconstructions/ --model MODEL",
        "```",
        "",
        "Tokens from `--assign nearest` do not depend on the rest of the batch; `--assign sinkhorn`",
        "assigns the whole batch as one pool, as the authors' models do.",
        "",
    ]
    return "\n".join(lines)


def refuse_foreign_files(folder: Path) -> None:
    """FileExistsError when ``folder`` holds a file of a name the hf folder uses but no optvq
    config.json: saving there would replace a file optvq did not write."""
    clash = [folder / n for n in HF_FILES if (folder / n).exists()]
    if not clash:
        return
    try:
        ours = "optvq_format" in json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise FileExistsError(f"{clash[0]}: exists and is no optvq model file; save into another folder")


def export_hf(model: OptVQModel, out: Path, dtype: str | None = None) -> Path:
    """Inference-only folder: config.json, model.safetensors, README.md (model card).

    ``dtype`` None keeps the weights dtype the model was loaded from, so re-exporting a model
    writes the same weights file (the same identity, see optvq_cli.model.checkpoint)."""
    metadata = dict(model.metadata)
    metadata["exported_from"] = model.source
    if model.sha256:
        metadata["source_sha256"] = model.sha256
    save_model(model, out, metadata=metadata, dtype=dtype or model.weights_dtype)
    doc = json.loads((out / CONFIG_NAME).read_text())
    atomic_write_text(out / "README.md", model_card(model, doc["weights_sha256"], doc["weights_dtype"]))
    return out


# -- programs ------------------------------------------------------------------------------------
def _programs(model: OptVQModel) -> tuple[nn.Module, nn.Module]:
    return IndexEncoder(model).eval(), IndexDecoder(model).eval()


def _trace(module: nn.Module, example: torch.Tensor):
    return torch.jit.trace(module, (example,), check_trace=False)


def export_programs(model: OptVQModel, out: Path, fmt: str, height: int, width: int) -> list[Check]:
    """Write the two programs in ``fmt`` into ``out`` and check them against the model (on CPU)."""
    model.check_size(height, width, "--size")
    model.to("cpu").float().eval()  # programs are exported and checked on the CPU, in fp32
    model.compute_dtype = None
    enc, dec = _programs(model)
    images = example_images(model, height, width)
    with torch.no_grad():
        ref_idx = model.encode_indices(images, assign="nearest")
        ref_img = model.decode_indices(ref_idx)
    if fmt not in PROGRAM_SUFFIX:
        raise UserError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    suffix = PROGRAM_SUFFIX[fmt]
    enc_path, dec_path = (out / f"{name}{suffix}" for name in PROGRAMS)
    static: list[str | None] = [None, None]
    # Exporters warn about tracing shape arithmetic and their own deprecations; the programs are
    # checked against the model below instead.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            torch.jit.save(_trace(enc, images), str(enc_path))
            torch.jit.save(_trace(dec, ref_idx), str(dec_path))
            run_enc, run_dec = torch.jit.load(str(enc_path)), torch.jit.load(str(dec_path))
        elif fmt == "torch-export":
            static = [_torch_export(enc, images, enc_path), _torch_export(dec, ref_idx, dec_path)]
            run_enc = torch.export.load(str(enc_path)).module()
            run_dec = torch.export.load(str(dec_path)).module()
        elif fmt == "onnx":
            run_enc = _onnx_export(enc, images, enc_path, "images", "indices")
            run_dec = _onnx_export(dec, ref_idx, dec_path, "indices", "images")
        got_idx = run_enc(images)
        got_img = run_dec(ref_idx)
    mismatches = int((got_idx.long() != ref_idx.cpu()).sum())
    diff = float((got_img.float() - ref_img.cpu()).abs().max())
    return [
        Check(enc_path, index_mismatches=mismatches, index_total=ref_idx.numel(), static_shape=static[0]),
        Check(dec_path, max_abs_diff=diff, static_shape=static[1]),
    ]


def _torch_export(module: nn.Module, example: torch.Tensor, path: Path) -> str | None:
    """Export with symbolic batch and grid sizes; where torch.export cannot, with the example's
    shape only. Returns None, or what the fallback means for the user."""
    from torch.export import Dim

    # Batch and grid sizes stay symbolic, so one program serves any size the model accepts.
    spec = {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}
    note = None
    try:
        program = torch.export.export(module, (example,), dynamic_shapes=(spec,))
    except Exception as e:  # some graphs specialize: fall back to the example's static shape
        note = (
            f"takes only inputs of shape {tuple(example.shape)} (torch.export could not keep the sizes "
            f"dynamic: {first_line(e)}); use --format torchscript or onnx for other sizes"
        )
        program = torch.export.export(module, (example,))
    torch.export.save(program, str(path))
    return note


def _onnx_export(module: nn.Module, example: torch.Tensor, path: Path, name_in: str, name_out: str):
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("--format onnx needs the onnx packages: pip install onnx onnxruntime") from None
    axes = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=[name_in],
        output_names=[name_out],
        dynamic_axes={name_in: axes, name_out: axes},
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name_in: x.cpu().numpy()})[0])

    return run


def describe(model: OptVQModel, height: int | None = None, width: int | None = None) -> dict[str, Any]:
    """What ``optvq info`` prints, as a dict. With a size: the token grid of such an image after
    ``encode`` pads it on the right and bottom to a multiple of f (``padded_size``)."""
    cfg = model.config
    info: dict[str, Any] = {
        "arch": cfg.arch,
        "downsample": cfg.downsample,
        "heads": cfg.heads,
        "n_codes": cfg.n_codes,
        "code_dim": cfg.code_dim,
        "e_dim": cfg.e_dim,
        "bits_per_token": round(math.log2(cfg.n_codes), 3),
        "in_channels": cfg.in_channels,
        "resolution": cfg.resolution,
        "parameters": model.param_counts(),
        "source": model.source,
        "sha256": model.sha256,
        "ignored_tensors": len(model.ignored_keys),
        "config": cfg.to_dict(),
        "metadata": {k: v for k, v in model.metadata.items() if k != "upstream_config"},
    }
    if height is not None and width is not None:
        f = cfg.downsample
        if height < f or width < f:
            raise UserError(f"--size {height}x{width}: smaller than one token of this model ({f}x{f} px)")
        ph, pw = -(-height // f) * f, -(-width // f) * f
        info["size"] = [height, width]
        info["padded_size"] = [ph, pw]
        info["token_grid"] = [cfg.heads, ph // f, pw // f]
        info["tokens_per_image"] = cfg.heads * (ph // f) * (pw // f)
    return info
