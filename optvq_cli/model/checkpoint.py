"""Models onto and off disk: ``save_model`` writes the native folder (``config.json`` +
``model.safetensors``); ``load_model`` builds the model a reference names (see
``optvq_cli.checkpoints.refs``) and ``convert_upstream`` the one in the authors' training
checkpoint. The files themselves are ``optvq_cli.checkpoints``' business; this module turns their
config fields into a ModelConfig, checks the tensors against it and attaches the provenance.

A model's identity (``model.sha256``, what token manifests record) is the sha256 of its weights
file, for our files and the authors' alike: ``sha256sum model.safetensors`` gives it, and a hub
cache blob is named by it. ``save_model`` writes bytes that depend on the model alone (see
``checkpoints.files``); free-form metadata (dataset, metrics, where it was exported from) lives
only in ``config.json``. So saving the same model twice, in any process, or re-exporting it with
the same weights dtype, gives the same file and the same identity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optvq_cli.checkpoints import files
from optvq_cli.checkpoints.configs import read_dialect
from optvq_cli.checkpoints.files import CONFIG_NAME, WEIGHTS_NAME, KeyPlan, normalize_key, plan_keys
from optvq_cli.checkpoints.refs import Located, NotFound, bundled_names, locate
from optvq_cli.checkpoints.upstream import infer_config, read_training_checkpoint
from optvq_cli.core.device import DTYPE_NAMES, resolve_device, resolve_dtype
from optvq_cli.core.errors import UserError, first_line
from optvq_cli.core.fileio import atomic_write_text, sha256_file
from optvq_cli.model.config import ModelConfig, Provenance

# The model class is a parameter (``cls``), as in diffusers' from_pretrained: the loader builds
# whatever class asks, so it never imports the class and the class may call it.
Model = Any

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "Located",
    "NotFound",
    "bundled_names",
    "convert_upstream",
    "load_located",
    "load_model",
    "locate",
    "save_model",
]


# -- saving --------------------------------------------------------------------------------------
def save_model(
    model: Model,
    directory: str | Path,
    metadata: dict[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``directory`` (created), each atomically;
    the config is also stored in the weights' header so the file alone is a complete model.

    The weights file is reproducible: its bytes, and so the model's identity, depend on the config
    and the tensors only; ``metadata`` goes into ``config.json`` alone. ``dtype`` (fp16 / bf16)
    stores the encoder, decoder and connectors in half precision; the quantizer's tensors stay
    fp32. ``config.json`` records the weights' sha256.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    half = resolve_dtype(dtype)
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        if half is not None and t.is_floating_point() and not name.startswith("quantize."):
            t = t.to(half)
        tensors[name] = t.contiguous()
    cfg = model.config.to_dict()
    weights = directory / WEIGHTS_NAME
    files.write_weights(weights, tensors, cfg)
    doc = {
        "optvq_format": files.FORMAT_VERSION,
        "model": cfg,
        "weights_dtype": DTYPE_NAMES.get(half, "fp32") if half is not None else "fp32",
        "weights_sha256": sha256_file(weights),
        "metadata": dict(metadata or {}),
    }
    atomic_write_text(directory / CONFIG_NAME, json.dumps(doc, indent=2, default=str) + "\n")
    return directory


# -- configs -------------------------------------------------------------------------------------
@dataclass
class ParsedConfig:
    config: ModelConfig
    kind: str  # "optvq" (ours) or "upstream" (the authors' PyTorchModelHubMixin config)
    metadata: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str | None = None


def parse_config(raw: Any, where: str) -> ParsedConfig:
    """Our config.json, a bare ModelConfig dict, or the authors' config.json, validated."""
    try:
        d = read_dialect(raw)
        return ParsedConfig(ModelConfig.from_dict(d.fields), d.kind, d.metadata, d.weights_sha256)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{where}: bad model config: {first_line(e)}") from None


def _read_config(located: Located, meta: dict[str, str]) -> ParsedConfig:
    doc = files.find_config(located.weights, located.config_path, meta)
    parsed = parse_config(doc.raw, doc.where)
    if doc.header_metadata is not None:
        parsed.metadata = doc.header_metadata
    return parsed


def config_witnesses(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """A few tensors whose shapes pin every size the config gives (channels, widths, levels, blocks,
    codebook): when the file has them with these shapes, the model the config builds is no bigger
    than the file, so it is safe to build it and compare every tensor."""
    w = {"quantize.embedding.weight": (cfg.n_codes, cfg.code_dim)}
    if cfg.use_proj:
        w["quantize.proj.weight"] = (cfg.code_dim, cfg.code_dim)
    if cfg.use_connector:
        w["quant_conv.weight"] = (cfg.e_dim, cfg.hidden_dim, 1, 1)
    if cfg.arch == "plain_cnn":
        a, b, c = cfg.cnn_widths
        w["encoder.in_fc.weight"] = (a, cfg.in_channels, 3, 3)
        w["encoder.conv1.weight"] = (b, a, 3, 3)
        w["encoder.conv2.weight"] = (c, b, 3, 3)
        w["decoder.out_fc.weight"] = (cfg.out_channels, a, 3, 3)
        return w
    widths = [cfg.ch * m for m in (1, *cfg.ch_mult)]
    w["encoder.conv_in.weight"] = (cfg.ch, cfg.in_channels, 3, 3)
    for i in range(len(cfg.ch_mult)):
        w[f"encoder.down.{i}.block.0.conv1.weight"] = (widths[i + 1], widths[i], 3, 3)
        last = cfg.num_res_blocks - 1
        w[f"encoder.down.{i}.block.{last}.conv2.weight"] = (widths[i + 1], widths[i + 1], 3, 3)
    w["encoder.conv_out.weight"] = (cfg.z_channels, widths[-1], 3, 3)
    w["decoder.conv_out.weight"] = (cfg.out_channels, widths[1], 3, 3)
    return w


def check_config_against_header(
    cfg: ModelConfig, file_shapes: dict[str, tuple[int, ...]], where: str, config_name: str
) -> None:
    """Compare the config with the tensors' shapes from the header, before anything is built: a
    config that asks for a bigger model than the file holds is refused here."""
    by_name: dict[str, str] = {}
    for k in file_shapes:
        by_name.setdefault(normalize_key(k), k)
    for nk, want in config_witnesses(cfg).items():
        if nk not in by_name:
            raise UserError(
                f"{where}: tensor {nk}, which {config_name} needs, is missing; "
                f"the file is incomplete or does not belong to that config"
            )
        k = by_name[nk]
        if tuple(file_shapes[k]) != tuple(want):
            raise UserError(
                f"{where}: tensor {k} is {files.shape_text(file_shapes[k])} but {config_name} needs "
                f"{files.shape_text(want)}; the config does not match the tensors"
            )


def _config_name(parsed: ParsedConfig) -> str:
    c = parsed.config
    return f"its config ({c.arch}, n_codes={c.n_codes}, e_dim={c.e_dim}, heads={c.heads})"


# -- loading -------------------------------------------------------------------------------------
def _expected_shapes(cls: type, cfg: ModelConfig, device: str = "cpu") -> tuple[Model, dict[str, tuple[int, ...]]]:
    """The model to load into, and the shape of every tensor it needs. Built on the CPU: a meta
    build would be free of memory but pulls in torch's decomposition machinery (seconds per process)."""
    with torch.device(device):
        skeleton = cls(cfg)
    return skeleton, {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}


def _materialize(skeleton: Model, tensors: dict[str, torch.Tensor], device: torch.device) -> Model:
    state = {k: (t.float() if t.is_floating_point() else t) for k, t in tensors.items()}
    skeleton.load_state_dict(state, strict=True, assign=True)
    return skeleton.to(device).eval()


def check_finite(tensors: dict[str, torch.Tensor], file_keys: dict[str, str], where: str) -> None:
    """Refuse weights holding NaN or inf (a diverged training run), naming the first bad tensor:
    such a model gives all-zero tokens and blank images without a word."""
    for nk, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise UserError(
                f"{where}: tensor {file_keys.get(nk, nk)} holds {nan} NaN and {inf} inf values; "
                f"the weights are broken (a diverged training run?), use another checkpoint"
            )


def _stored_dtype(plan: KeyPlan, dtypes: dict[str, str]) -> str:
    """fp16 / bf16 when the file stores the encoder, decoder and connectors so, else fp32."""
    stored = {dtypes[k] for nk, k in plan.sources.items() if not nk.startswith("quantize.")}
    return {frozenset({"F16"}): "fp16", frozenset({"BF16"}): "bf16"}.get(frozenset(stored), "fp32")


def _attach(model: Model, provenance: Provenance) -> Model:
    """The one place a loaded model gets its provenance (and the skipped tensors are reported)."""
    model.provenance = provenance
    files.report_ignored(provenance.ignored_keys, provenance.source or "the model")
    return model


@dataclass
class LoadedState:
    parsed: ParsedConfig
    plan: KeyPlan
    skeleton: Model  # the model the tensors go into
    tensors: dict[str, torch.Tensor]  # model key -> tensor read from the file (CPU)
    weights_dtype: str  # fp32, fp16 or bf16: how the file stores encoder and decoder


def load_state(cls: type, located: Located) -> LoadedState:
    """Validate a located checkpoint and read the tensors the model needs (on the CPU).
    The config is checked against the header's shapes before the model is built."""
    meta, shapes, dtypes = files.read_header(located.weights)
    parsed = _read_config(located, meta)
    where = str(located.weights)
    check_config_against_header(parsed.config, shapes, where, _config_name(parsed))
    skeleton, expected = _expected_shapes(cls, parsed.config)
    plan = plan_keys(shapes, expected, where, _config_name(parsed))
    for k in plan.sources.values():
        if not dtypes[k].startswith(("F", "BF")):
            raise UserError(f"{where}: tensor {k} holds {dtypes[k]}, not floating point; the file is not a model")
    tensors = files.read_tensors(located.weights, plan.sources)
    check_finite(tensors, plan.sources, where)
    return LoadedState(parsed, plan, skeleton, tensors, _stored_dtype(plan, dtypes))


def load_located(
    cls: type, located: Located, device: str | torch.device = "auto", dtype: str | torch.dtype | None = None
) -> Model:
    """``load_model`` for a reference ``locate`` has resolved already."""
    dev = resolve_device(device)
    compute = resolve_dtype(dtype)
    state = load_state(cls, located)
    parsed = state.parsed
    digest = sha256_file(located.weights)
    if parsed.weights_sha256 and parsed.weights_sha256 != digest:
        raise UserError(
            f"{located.weights}: sha256 {digest[:12]}... differs from the {parsed.weights_sha256[:12]}... recorded "
            f"in {CONFIG_NAME}; the weights were corrupted or replaced (export the model again)"
        )
    model = _materialize(state.skeleton, state.tensors, dev)
    model.compute_dtype = compute
    metadata = dict(parsed.metadata)
    metadata.setdefault("checkpoint_format", parsed.kind)
    return _attach(model, Provenance(located.source, digest, state.weights_dtype, metadata, list(state.plan.ignored)))


def load_model(
    cls: type,
    ref: str | Path,
    device: str | torch.device = "auto",
    revision: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> Model:
    """The model (of class ``cls``) a reference names, in eval mode on ``device`` (``auto``: CUDA when available).

    ``dtype`` (bf16 / fp16) sets the model's autocast dtype for encoder and decoder. Tensors in the
    file that the model does not use (the authors' loss networks) are reported and skipped;
    missing ones, wrong shapes or a corrupt file raise UserError. ``model.sha256`` is the
    identity (the weights file's sha256, see the module doc).
    """
    resolve_device(device)  # a bad --device fails before any download
    resolve_dtype(dtype)
    return load_located(cls, locate(ref, revision), device, dtype)


def convert_upstream(cls: type, path: str | Path, **quantizer: Any) -> Model:
    """An Model (CPU, eval) from the authors' training checkpoint (``checkpoint.pth`` holding
    ``{"model": state_dict}``, names without ``model.``, maybe ``_orig_mod.``), or from a bare
    state-dict safetensors file without config; which of the two is told by the content, not the
    name. The config is inferred from the tensor shapes."""
    path = Path(path).expanduser()
    raw = read_training_checkpoint(path)
    shapes = {normalize_key(k): tuple(v.shape) for k, v in raw.items()}
    try:
        cfg = ModelConfig.from_dict(infer_config(shapes, **quantizer))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: cannot tell the architecture from its tensors ({first_line(e)})") from None
    skeleton, expected = _expected_shapes(cls, cfg)
    file_shapes = {k: tuple(v.shape) for k, v in raw.items()}
    plan = plan_keys(file_shapes, expected, str(path), f"the inferred {cfg.arch} config")
    tensors = {nk: raw[k] for nk, k in plan.sources.items()}
    check_finite(tensors, plan.sources, str(path))
    model = _materialize(skeleton, tensors, torch.device("cpu"))
    digest = sha256_file(path)
    metadata = {"converted_from": path.name, "converted_from_sha256": digest, "checkpoint_format": "upstream"}
    return _attach(model, Provenance(str(path.resolve()), digest, "fp32", metadata, list(plan.ignored)))
