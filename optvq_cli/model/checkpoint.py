"""Model checkpoints: the native folder (``config.json`` + ``model.safetensors``), the ways to name
one (``--model``), the authors' formats, and the converter for their training checkpoints.

A model reference is, in this order: a local folder; a ``.safetensors`` file whose config is in
its header metadata; a bundled name (``checkpoints/<name>/``); a hub id ``ORG/NAME`` downloaded
and cached by huggingface_hub. Nothing here unpickles a file, except ``convert_upstream`` which
goes through ``torch.load(weights_only=True)``.

A model's identity (``model.sha256``, what token manifests record) is the sha256 of its weights
file, for our files and the authors' alike: ``sha256sum model.safetensors`` gives it, and a hub
cache blob is named by it. For that to name the *model*, ``save_model`` writes reproducible bytes
that depend on the model alone: the tensors, in the order safetensors sorts them, and ONE header
metadata key holding the config as sorted JSON (safetensors writes several keys in a
process-random order). Free-form metadata (dataset, metrics, where it was exported from) lives
only in ``config.json``. So saving the same model twice, in any process, or re-exporting it with
the same weights dtype, gives the same file and the same identity.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optvq_cli.checkpoints import hub
from optvq_cli.core.device import DTYPE_NAMES, resolve_device, resolve_dtype
from optvq_cli.core.errors import UserError, first_line
from optvq_cli.core.fileio import atomic_write, atomic_write_text, sha256_file
from optvq_cli.model.optvq import ModelConfig, OptVQModel, build_model

log = logging.getLogger("optvq")

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1
META_KEY = "optvq"  # the one header metadata key: {"optvq_format": 1, "model": config} as sorted JSON
# Written by earlier versions (with "format": "pt", in a random order); still read.
META_CONFIG = "optvq_config"
META_METADATA = "optvq_metadata"
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")
# Folders searched for bundled names: the source checkout's checkpoints/, then the package's own.
BUNDLED_DIRS: list[Path] = [
    Path(__file__).resolve().parents[2] / "checkpoints",
    Path(__file__).resolve().parents[1] / "checkpoints",
]
_BUNDLED_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")


# -- small helpers -------------------------------------------------------------------------------


def _shape(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


# -- saving --------------------------------------------------------------------------------------
def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, header: dict[str, str]) -> None:
    """safetensors.save_file, then the usual umask's mode: safetensors creates its files 0600,
    and a saved model is as readable as any other file the user writes."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=header)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_model(
    model: OptVQModel,
    directory: str | Path,
    metadata: dict[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``directory`` (created), each atomically;
    the config is also stored in the weights' header so the file alone is a complete model.

    The weights file is reproducible (see the module doc): its bytes, and so the model's identity,
    depend on the config and the tensors only; ``metadata`` goes into ``config.json`` alone.
    ``dtype`` (fp16 / bf16) stores the encoder, decoder and connectors in half precision; the
    quantizer's tensors stay fp32. ``config.json`` records the weights' sha256.
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
    header = {META_KEY: json.dumps({"optvq_format": FORMAT_VERSION, "model": cfg}, sort_keys=True)}
    weights = directory / WEIGHTS_NAME

    atomic_write(weights, lambda p: _save_safetensors(tensors, p, header))
    doc = {
        "optvq_format": FORMAT_VERSION,
        "model": cfg,
        "weights_dtype": DTYPE_NAMES.get(half, "fp32") if half is not None else "fp32",
        "weights_sha256": sha256_file(weights),
        "metadata": dict(metadata or {}),
    }
    atomic_write_text(directory / CONFIG_NAME, json.dumps(doc, indent=2, default=str) + "\n")
    return directory


# -- naming a model ------------------------------------------------------------------------------
class NotFound(UserError):
    """A reference that names nothing: no folder, file, bundled model or hub id."""


@dataclass
class Located:
    """Where a reference points: the weights file, its config.json if any, and a provenance line."""

    weights: Path
    config_path: Path | None
    source: str


def bundled_names() -> list[str]:
    names = set()
    for root in BUNDLED_DIRS:
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if p.is_dir() and (p / WEIGHTS_NAME).exists())
    return sorted(names)


def _bundled(name: str) -> Path | None:
    if not _BUNDLED_NAME.fullmatch(name):
        return None
    for root in BUNDLED_DIRS:
        if (root / name).is_dir():
            return root / name
    return None


def _convert_hint(path: Path) -> str:
    return f"convert it with `optvq export --from-upstream {path} OUT`"


def _locate_dir(folder: Path, source: str) -> Located:
    config = folder / CONFIG_NAME
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        shards = sorted(folder.glob("*.safetensors"))
        if len(shards) == 1:
            weights = shards[0]
        elif len(shards) > 1:
            raise UserError(f"{folder}: several .safetensors files and no {WEIGHTS_NAME}; keep one of them")
        else:
            pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = f" ({pickles[0].name} is a pickle: {_convert_hint(pickles[0])})" if pickles else ""
            raise UserError(f"{folder}: no model weights in this folder (expected {WEIGHTS_NAME}){hint}")
    return Located(weights, config if config.is_file() else None, source)


def locate(ref: str | Path, revision: str | None = None) -> Located:
    """Resolve a model reference to local files (downloading hub models into the cache).
    Raises NotFound when it names nothing at all, UserError for anything else wrong."""
    text = str(ref).strip()
    if not text:
        raise UserError("the model reference is empty: give a folder, a .safetensors file, a bundled name or a hub id")
    path = Path(text).expanduser()
    is_hub = not path.exists() and _bundled(text) is None and hub.looks_like_repo_id(text)
    if revision is not None and not is_hub:
        raise UserError(f"--revision {revision}: only a hub id takes a revision, not {text}")
    if path.is_dir():
        return _locate_dir(path, str(path.resolve()))
    if path.is_file():
        kind = sniff(path)
        if path.suffix == ".safetensors" or kind == "safetensors":
            return Located(path, None, str(path.resolve()))
        if path.suffix in PICKLE_SUFFIXES or kind == "pickle":
            raise UserError(f"{path} is a pickled checkpoint, which is never loaded as is: {_convert_hint(path)}")
        raise UserError(f"{path}: not a model; give a folder with {WEIGHTS_NAME} or a .safetensors file")
    bundled = _bundled(text)
    if bundled is not None:
        return _locate_dir(bundled, f"bundled:{text}")
    if is_hub:
        folder = hub.download(text, revision)
        return _locate_dir(folder, f"hub:{text}@{folder.name}")  # snapshot folder = commit hash
    names = ", ".join(bundled_names()) or "none installed"
    raise NotFound(f"model {text}: no such folder or file, bundled model ({names}) or hub id (ORG/NAME)")


# -- reading a weights file ----------------------------------------------------------------------
def sniff(path: Path) -> str:
    """What a file holds, by its first bytes, whatever its name: ``safetensors``, ``pickle``
    (torch.save's zip or a bare pickle) or ``unknown``."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "pickle"
    return "unknown"


def _check_not_pickle(path: Path) -> None:
    if sniff(path) == "pickle":
        raise UserError(
            f"{path} is a pickle (torch.save) file named .safetensors and is never unpickled: {_convert_hint(path)}"
        )
    size = path.stat().st_size
    if size < 9:
        raise UserError(f"{path}: truncated ({size} bytes), not a safetensors file; download or export it again")


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]], dict[str, str]]:
    """(header metadata, shape of every tensor, dtype of every tensor) without reading the data."""
    from safetensors import SafetensorError, safe_open

    _check_not_pickle(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            shapes, dtypes = {}, {}
            for k in f.keys():
                s = f.get_slice(k)
                shapes[k] = tuple(int(v) for v in s.get_shape())
                dtypes[k] = str(s.get_dtype())
    except (SafetensorError, OSError, ValueError) as e:
        msg = first_line(e)
        if "incomplete" in msg or "not fully covered" in msg or "header length" in msg:
            why = "truncated or corrupted"
        else:
            why = "not a valid safetensors file"
        raise UserError(f"{path}: {why} ({msg}); download or export it again") from None
    return meta, shapes, dtypes


# -- configs: ours and the authors' --------------------------------------------------------------
@dataclass
class ParsedConfig:
    config: ModelConfig
    kind: str  # "optvq" (ours) or "upstream" (the authors' PyTorchModelHubMixin config)
    metadata: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str | None = None


def config_from_upstream(raw: dict[str, Any]) -> tuple[ModelConfig, dict[str, Any]]:
    """The authors' hub ``config.json`` (VQModelHF's constructor arguments) as a ModelConfig.
    Raises ValueError for settings this implementation does not reproduce."""
    enc, dec, q = raw.get("encoder") or {}, raw.get("decoder") or {}, raw.get("quantize") or {}
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
    cfg = ModelConfig(
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
    return cfg, {"upstream_config": raw}


def parse_config(raw: Any, where: str) -> ParsedConfig:
    """Our config.json, a bare ModelConfig dict, or the authors' config.json."""
    try:
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        if "optvq_format" in raw:
            if raw["optvq_format"] > FORMAT_VERSION:
                raise ValueError(f"format version {raw['optvq_format']} is newer than this optvq; upgrade")
            return ParsedConfig(
                ModelConfig.from_dict(raw.get("model")),
                "optvq",
                dict(raw.get("metadata") or {}),
                raw.get("weights_sha256"),
            )
        if "encoder" in raw and "quantize" in raw:
            cfg, meta = config_from_upstream(raw)
            return ParsedConfig(cfg, "upstream", meta)
        if "arch" in raw:
            return ParsedConfig(ModelConfig.from_dict(raw), "optvq")
        raise ValueError("neither an optvq config nor the authors' config (no 'model', 'arch' or 'encoder')")
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{where}: bad model config: {first_line(e)}") from None


def _read_config(located: Located, meta: dict[str, str]) -> ParsedConfig:
    in_header = META_KEY in meta or META_CONFIG in meta
    sibling = located.weights.parent / CONFIG_NAME
    if located.config_path is None and not in_header and sibling.is_file():
        located.config_path = sibling  # a bare weights file named directly, its config beside it
    if located.config_path is not None:
        where = str(located.config_path)
        try:
            raw = json.loads(located.config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{where}: not valid JSON ({first_line(e)}); fix or re-export the model") from None
        return parse_config(raw, where)
    if in_header:
        where = f"{located.weights} (header metadata)"
        try:
            raw = json.loads(meta[META_KEY] if META_KEY in meta else meta[META_CONFIG])
            extra = json.loads(meta.get(META_METADATA) or "{}")  # earlier versions only
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: the stored config is not valid JSON ({first_line(e)})") from None
        parsed = parse_config(raw, where)
        parsed.metadata = extra if isinstance(extra, dict) else {}
        return parsed
    raise UserError(
        f"{located.weights}: no model config (no {CONFIG_NAME} beside it and none in its metadata); "
        f"put its {CONFIG_NAME} next to it, or convert it with `optvq export --from-upstream`"
    )


# -- key names -----------------------------------------------------------------------------------
def normalize_key(key: str) -> str:
    """The authors' names -> ours: drop torch.compile's ``_orig_mod.``, DDP's ``module.`` and the
    hub wrapper's ``model.`` prefix."""
    key = key.replace("_orig_mod.", "")
    for prefix in ("module.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _summarize(keys: list[str]) -> str:
    groups = Counter(".".join(k.split(".")[:2]) for k in keys)
    return ", ".join(f"{g}.* ({n})" for g, n in sorted(groups.items()))


@dataclass
class KeyPlan:
    """Which file tensor feeds which model tensor, and what the file has that the model does not use."""

    sources: dict[str, str]  # model key -> file key
    ignored: list[str]  # file keys not used (training-only loss tensors, unknown extras)


def plan_keys(
    file_shapes: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    where: str,
    config_name: str,
) -> KeyPlan:
    """Map file keys onto the model's; missing tensors and wrong shapes are errors."""
    sources: dict[str, str] = {}
    ignored = []
    for k in file_shapes:
        nk = normalize_key(k)
        if nk in expected and nk not in sources:
            sources[nk] = k
        else:
            ignored.append(k)
    missing = [k for k in expected if k not in sources]
    if missing:
        sample = ", ".join(missing[:3]) + (f", ... ({len(missing) - 3} more)" if len(missing) > 3 else "")
        raise UserError(
            f"{where}: {len(missing)} tensor(s) the model needs are missing ({sample}); "
            f"the file is incomplete or does not belong to {config_name}"
        )
    for nk, k in sources.items():
        if tuple(file_shapes[k]) != tuple(expected[nk]):
            raise UserError(
                f"{where}: tensor {k} is {_shape(file_shapes[k])} but {config_name} needs "
                f"{_shape(expected[nk])}; the config does not match the tensors"
            )
    return KeyPlan(sources, ignored)


def _report_ignored(ignored: list[str], where: str) -> None:
    if not ignored:
        return
    training = [k for k in ignored if normalize_key(k).startswith("loss.")]
    other = [k for k in ignored if not normalize_key(k).startswith("loss.")]
    if training:
        log.warning(
            f"note: {where}: ignored {len(training)} training-only tensor(s) "
            f"({_summarize([normalize_key(k) for k in training])}); inference does not need them"
        )
    if other:
        log.warning(f"warning: {where}: ignored {len(other)} unknown tensor(s): {_summarize(other)}")


# -- loading -------------------------------------------------------------------------------------
def _expected_shapes(cfg: ModelConfig, device: str = "cpu") -> tuple[OptVQModel, dict[str, tuple[int, ...]]]:
    """The model to load into, and the shape of every tensor it needs. Built on the CPU: a meta
    build would be free of memory but pulls in torch's decomposition machinery (seconds per process)."""
    skeleton = build_model(cfg, device=device)
    return skeleton, {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}


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
                f"{where}: tensor {k} is {_shape(file_shapes[k])} but {config_name} needs "
                f"{_shape(want)}; the config does not match the tensors"
            )


def _config_name(parsed: ParsedConfig) -> str:
    c = parsed.config
    return f"its config ({c.arch}, n_codes={c.n_codes}, e_dim={c.e_dim}, heads={c.heads})"


def _materialize(skeleton: OptVQModel, tensors: dict[str, torch.Tensor], device: torch.device) -> OptVQModel:
    state = {k: (t.float() if t.is_floating_point() else t) for k, t in tensors.items()}
    skeleton.load_state_dict(state, strict=True, assign=True)
    return skeleton.to(device).eval()


def _stored_dtype(plan: KeyPlan, dtypes: dict[str, str]) -> str:
    """fp16 / bf16 when the file stores the encoder, decoder and connectors so, else fp32."""
    stored = {dtypes[k] for nk, k in plan.sources.items() if not nk.startswith("quantize.")}
    return {frozenset({"F16"}): "fp16", frozenset({"BF16"}): "bf16"}.get(frozenset(stored), "fp32")


@dataclass
class LoadedState:
    parsed: ParsedConfig
    plan: KeyPlan
    skeleton: OptVQModel  # the model the tensors go into
    tensors: dict[str, torch.Tensor]  # model key -> tensor read from the file (CPU)
    weights_dtype: str  # fp32, fp16 or bf16: how the file stores encoder and decoder


def load_state(located: Located) -> LoadedState:
    """Validate a located checkpoint and read the tensors the model needs (on the CPU).
    The config is checked against the header's shapes before the model is built."""
    from safetensors import SafetensorError, safe_open

    meta, shapes, dtypes = read_header(located.weights)
    parsed = _read_config(located, meta)
    where = str(located.weights)
    check_config_against_header(parsed.config, shapes, where, _config_name(parsed))
    skeleton, expected = _expected_shapes(parsed.config)
    plan = plan_keys(shapes, expected, where, _config_name(parsed))
    for k in plan.sources.values():
        if not dtypes[k].startswith(("F", "BF")):
            raise UserError(f"{where}: tensor {k} holds {dtypes[k]}, not floating point; the file is not a model")
    tensors = {}
    try:
        with safe_open(str(located.weights), framework="pt", device="cpu") as f:
            for nk, k in plan.sources.items():
                tensors[nk] = f.get_tensor(k)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{where}: could not read the tensors ({first_line(e)}); download or export it again") from None
    return LoadedState(parsed, plan, skeleton, tensors, _stored_dtype(plan, dtypes))


def load_located(
    located: Located, device: str | torch.device = "auto", dtype: str | torch.dtype | None = None
) -> OptVQModel:
    """``load_model`` for a reference ``locate`` has resolved already."""
    dev = resolve_device(device)
    compute = resolve_dtype(dtype)
    state = load_state(located)
    parsed, plan = state.parsed, state.plan
    digest = sha256_file(located.weights)
    if parsed.weights_sha256 and parsed.weights_sha256 != digest:
        raise UserError(
            f"{located.weights}: sha256 {digest[:12]}... differs from the {parsed.weights_sha256[:12]}... recorded "
            f"in {CONFIG_NAME}; the weights were corrupted or replaced (export the model again)"
        )
    model = _materialize(state.skeleton, state.tensors, dev)
    model.compute_dtype = compute
    model.source = located.source
    model.sha256 = digest
    model.weights_dtype = state.weights_dtype
    model.metadata = dict(parsed.metadata)
    model.metadata.setdefault("checkpoint_format", parsed.kind)
    model.ignored_keys = list(plan.ignored)
    _report_ignored(plan.ignored, located.source)
    return model


def load_model(
    ref: str | Path,
    device: str | torch.device = "auto",
    revision: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> OptVQModel:
    """The model a reference names, in eval mode on ``device`` (``auto``: CUDA when available).

    ``dtype`` (bf16 / fp16) sets the model's autocast dtype for encoder and decoder. Tensors in the
    file that the model does not use (the authors' loss networks) are reported and skipped;
    missing ones, wrong shapes or a corrupt file raise UserError. ``model.sha256`` is the
    identity (the weights file's sha256, see the module doc).
    """
    resolve_device(device)  # a bad --device fails before any download
    resolve_dtype(dtype)
    return load_located(locate(ref, revision), device, dtype)


# -- the authors' training checkpoints -----------------------------------------------------------
def _count(prefix: str, keys: set[str]) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def infer_config(shapes: dict[str, tuple[int, ...]], **quantizer: Any) -> ModelConfig:
    """Rebuild a ModelConfig from normalized key names and shapes (the authors' training
    checkpoints carry no config). Quantizer settings that leave no trace in the tensors
    (epsilon, n_iters, beta) default to the authors' (10, 5, 0.25) unless given."""
    keys = set(shapes)
    if "quantize.embedding.weight" not in keys:
        raise ValueError("no quantize.embedding.weight: not an OptVQ/VQ autoencoder state dict")
    n_codes, code_dim = shapes["quantize.embedding.weight"]
    common: dict[str, Any] = dict(
        n_codes=n_codes, use_proj="quantize.proj.weight" in keys, use_connector="quant_conv.weight" in keys
    )
    if "encoder.in_fc.weight" in keys:
        a, in_ch = shapes["encoder.in_fc.weight"][:2]
        widths = (a, shapes["encoder.conv1.weight"][0], shapes["encoder.conv2.weight"][0])
        hidden = widths[2]
        arch: dict[str, Any] = dict(
            arch="plain_cnn",
            in_channels=in_ch,
            cnn_widths=widths,
            out_channels=shapes["decoder.out_fc.weight"][0],
            resolution=32,  # the paper's plain-CNN data: MNIST and CIFAR-10 resized to 32x32 (Sec. 4.2)
        )
    elif "encoder.conv_in.weight" in keys:
        ch, in_ch = shapes["encoder.conv_in.weight"][:2]
        levels = _count("encoder.down.", keys)
        ch_mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
        # Attention placement is all the nominal resolution decides; the f16 models use 256 / [16].
        resolution = 16 * 2 ** (levels - 1)
        attn = tuple(resolution >> i for i in range(levels) if f"encoder.down.{i}.attn.0.norm.weight" in keys)
        hidden = shapes["encoder.conv_out.weight"][0]
        arch = dict(
            arch="vqgan",
            in_channels=in_ch,
            out_channels=shapes["decoder.conv_out.weight"][0],
            resolution=resolution,
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=_count("encoder.down.0.block.", keys),
            attn_resolutions=attn,
            z_channels=hidden,
        )
    else:
        raise ValueError("neither the plain CNN (encoder.in_fc) nor the VQGAN (encoder.conv_in) encoder")
    e_dim = shapes["quant_conv.weight"][0] if common["use_connector"] else hidden
    heads = e_dim // code_dim if code_dim else 0
    return ModelConfig(**arch, **common, e_dim=e_dim, heads=heads, **quantizer)


def _state_dict_from_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        # A file object, not the path: torch.load picks safetensors for a name ending .safetensors.
        with open(path, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary objects; a corrupt zip raises RuntimeError
        raise UserError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({first_line(e)}); it is refused"
        ) from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: no state dict inside (expected {{'model': state_dict}}); not a training checkpoint")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def convert_upstream(path: str | Path, **quantizer: Any) -> OptVQModel:
    """An OptVQModel (CPU, eval) from the authors' training checkpoint (``checkpoint.pth`` holding
    ``{"model": state_dict}``, names without ``model.``, maybe ``_orig_mod.``), or from a bare
    state-dict safetensors file without config; which of the two is told by the content, not the
    name. The config is inferred from the tensor shapes."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--from-upstream {path}: no such file (give the authors' checkpoint.pth)")
    if sniff(path) == "safetensors":  # by content: a torch.save file named .safetensors is a pickle
        read_header(path)
        from safetensors.torch import load_file

        raw = load_file(str(path))
    else:
        raw = _state_dict_from_pickle(path)
    shapes = {normalize_key(k): tuple(v.shape) for k, v in raw.items()}
    try:
        cfg = infer_config(shapes, **quantizer)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: cannot tell the architecture from its tensors ({first_line(e)})") from None
    skeleton, expected = _expected_shapes(cfg)
    file_shapes = {k: tuple(v.shape) for k, v in raw.items()}
    plan = plan_keys(file_shapes, expected, str(path), f"the inferred {cfg.arch} config")
    model = _materialize(skeleton, {nk: raw[k] for nk, k in plan.sources.items()}, torch.device("cpu"))
    digest = sha256_file(path)
    model.source = str(path.resolve())
    model.sha256 = digest
    model.metadata = {
        "converted_from": path.name,
        "converted_from_sha256": digest,
        "checkpoint_format": "upstream",
    }
    model.ignored_keys = plan.ignored
    _report_ignored(plan.ignored, str(path))
    return model
