"""The authors' checkpoints: their hub ``config.json`` (VQModelHF's constructor arguments) and
their training checkpoints (``checkpoint.pth`` holding ``{"model": state_dict}``, no config), read
as plain data: a config dict of ModelConfig fields, and tensors by name. Only
``torch.load(weights_only=True)`` ever opens a pickle."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from optvq_cli.checkpoints.files import read_header, sniff
from optvq_cli.core.errors import UserError, first_line


def _check_supported(raw: dict[str, Any], enc: dict, dec: dict, q: dict) -> None:
    if raw.get("quantize_type", "optvq") != "optvq":
        raise ValueError(f"quantize_type {raw.get('quantize_type')!r} is not supported (only 'optvq')")
    if enc.get("double_z", False):
        raise ValueError("encoder.double_z=true is not supported")
    shared = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels")
    for k in shared:
        if k in dec and enc.get(k) != dec.get(k):
            raise ValueError(f"encoder.{k}={enc.get(k)} differs from decoder.{k}={dec.get(k)}; not supported")
    if q.get("normalize_mode", "all") != "all":
        raise ValueError(f"quantize.normalize_mode={q.get('normalize_mode')!r} is not supported (only 'all')")


def config_from_upstream(raw: dict[str, Any]) -> dict[str, Any]:
    """The authors' hub config.json as ModelConfig fields. Raises ValueError for settings this
    implementation does not reproduce."""
    enc, dec, q = raw.get("encoder") or {}, raw.get("decoder") or {}, raw.get("quantize") or {}
    _check_supported(raw, enc, dec, q)
    return dict(
        arch="vqgan",
        in_channels=enc.get("in_channels", 3),
        out_channels=dec.get("out_ch", enc.get("in_channels", 3)),
        resolution=enc.get("resolution", 256),
        ch=enc.get("ch", 128),
        ch_mult=enc.get("ch_mult", (1, 1, 2, 2, 4)),
        num_res_blocks=enc.get("num_res_blocks", 2),
        attn_resolutions=enc.get("attn_resolutions", (16,)),
        z_channels=enc.get("z_channels", 256),
        dropout=float(enc.get("dropout", 0.0)),
        use_connector=bool(raw.get("use_connector", True)),
        n_codes=q.get("n_e", 16384),
        e_dim=q.get("e_dim", 256),
        heads=q.get("num_head", 1),
        beta=float(q.get("beta", 0.25)),
        epsilon=float(q.get("epsilon", 10.0)),
        n_iters=int(q.get("n_iters", 5)),
        loss_type=q.get("loss_q_type", "l2"),
        use_proj=bool(q.get("use_proj", True)),
    )


# -- training checkpoints: the config from the tensors' shapes ------------------------------------
def _count(prefix: str, keys: set[str]) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _plain_cnn_fields(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    a, in_ch = shapes["encoder.in_fc.weight"][:2]
    widths = (a, shapes["encoder.conv1.weight"][0], shapes["encoder.conv2.weight"][0])
    return dict(
        arch="plain_cnn",
        in_channels=in_ch,
        cnn_widths=widths,
        out_channels=shapes["decoder.out_fc.weight"][0],
        resolution=32,  # the paper's plain-CNN data: MNIST and CIFAR-10 resized to 32x32 (Sec. 4.2)
    )


def _vqgan_fields(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    keys = set(shapes)
    ch, in_ch = shapes["encoder.conv_in.weight"][:2]
    levels = _count("encoder.down.", keys)
    ch_mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
    # Attention placement is all the nominal resolution decides; the f16 models use 256 / [16].
    resolution = 16 * 2 ** (levels - 1)
    attn = tuple(resolution >> i for i in range(levels) if f"encoder.down.{i}.attn.0.norm.weight" in keys)
    return dict(
        arch="vqgan",
        in_channels=in_ch,
        out_channels=shapes["decoder.conv_out.weight"][0],
        resolution=resolution,
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=_count("encoder.down.0.block.", keys),
        attn_resolutions=attn,
        z_channels=shapes["encoder.conv_out.weight"][0],
    )


def infer_config(shapes: dict[str, tuple[int, ...]], **quantizer: Any) -> dict[str, Any]:
    """ModelConfig fields from normalized key names and shapes (the authors' training checkpoints
    carry no config). Quantizer settings that leave no trace in the tensors (epsilon, n_iters,
    beta) default to the authors' (10, 5, 0.25) unless given."""
    keys = set(shapes)
    if "quantize.embedding.weight" not in keys:
        raise ValueError("no quantize.embedding.weight: not an OptVQ/VQ autoencoder state dict")
    n_codes, code_dim = shapes["quantize.embedding.weight"]
    if "encoder.in_fc.weight" in keys:
        fields = _plain_cnn_fields(shapes)
        hidden = fields["cnn_widths"][2]
    elif "encoder.conv_in.weight" in keys:
        fields = _vqgan_fields(shapes)
        hidden = fields["z_channels"]
    else:
        raise ValueError("neither the plain CNN (encoder.in_fc) nor the VQGAN (encoder.conv_in) encoder")
    use_connector = "quant_conv.weight" in keys
    e_dim = shapes["quant_conv.weight"][0] if use_connector else hidden
    fields.update(n_codes=n_codes, use_proj="quantize.proj.weight" in keys, use_connector=use_connector)
    fields.update(e_dim=e_dim, heads=e_dim // code_dim if code_dim else 0, **quantizer)
    return fields


def _pickle_refusal(path: Path, e: BaseException) -> str:
    """One plain line for a torch.load(weights_only=True) failure, instead of torch's several
    ANSI-coloured lines of advice (which suggest unpickling the file)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found or "Weights only load failed" in text:
        what = f"a Python object ({found.group(1)})" if found else "Python objects"
        return (
            f"{path}: holds {what} besides tensors, and optvq never unpickles objects; it is refused "
            f"(keep only the state dict: torch.save({{'model': model.state_dict()}}, PATH))"
        )
    reason = first_line(Exception(text)).split(". ")[0].rstrip(".")
    return f"{path}: cannot be read as a torch checkpoint, truncated or corrupt ({reason}); it is refused"


def _state_dict_from_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        # A file object, not the path: torch.load picks safetensors for a name ending .safetensors.
        with open(path, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary objects; a corrupt zip raises RuntimeError
        raise UserError(_pickle_refusal(path, e)) from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: no state dict inside (expected {{'model': state_dict}}); not a training checkpoint")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_training_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the authors' training checkpoint or of a bare state-dict safetensors file;
    which of the two is told by the content, not the name."""
    if not path.is_file():
        raise UserError(f"--from-upstream {path}: no such file (give the authors' checkpoint.pth)")
    if sniff(path) == "safetensors":  # by content: a torch.save file named .safetensors is a pickle
        read_header(path)
        from safetensors.torch import load_file

        return load_file(str(path))
    return _state_dict_from_pickle(path)
