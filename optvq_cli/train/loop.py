"""`optvq train`: the paper's training recipe, resumable, from one CPU to many GPUs.

Read top to bottom: the config (dataclasses, presets, overrides), the pieces (model, losses,
optimizers, schedules, EMA, codebook initialisation), checkpoints, validation, and the loop.

Recipe (paper Sec. 4.1 / 4.2 and the authors' configs): L1 + L2 + LPIPS (weight 3) + quantizer loss
(weight 1, beta 0.25) + a PatchGAN hinge loss with VQGAN's adaptive weight after ``disc_start``
steps; AdamW (weight decay 0.05, none on norms, biases and the codebook, eps 1e-7), gradient norm
clipped at 1, OneCycle (1 % warm-up, cosine), learning rate = base x global batch size
(4.5e-6 x batch). The MNIST / CIFAR-10 presets use L1 + L2 + quantizer loss only.

Distributed: launched by torchrun, each process takes its share of every global batch
(``data.BatchPlan``); DDP averages gradients and the quantizer's Sinkhorn reduces its statistics
across processes, so N processes compute what one process computes on the whole batch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import shutil
import signal
import time
import types
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
from torch import nn

from optvq_cli.core import dist as D
from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import atomic_write
from optvq_cli.model import ModelConfig, OptVQModel, build_model, save_model
from optvq_cli.train.data import BatchPlan, Splits, StepBatches, make_loader, open_splits, val_batches
from optvq_cli.train.losses import (
    PatchDiscriminator,
    adaptive_weight,
    generator_loss,
    hinge_d_loss,
    l1_loss,
    l2_loss,
)

CONFIG_FILE = "train_config.yaml"
METRICS_FILE = "metrics.jsonl"
CKPT_DIR = "checkpoints"
MODEL_DIR = "model"
SAMPLES_DIR = "samples"
TB_DIR = "tensorboard"
STATE_FILE = "training_state.pt"
DISC_FILE = "discriminator.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FORMAT = 1

# =============================================================================================
# Config
# =============================================================================================


@dataclass
class DataConfig:
    path: str = ""
    kind: str = "auto"  # auto | folder | mnist | fashion-mnist | cifar10
    size: int = 32  # training images are size x size
    augment: bool = True  # image folders: random-resized crops + horizontal flips
    crop_scale: tuple[float, float] = (0.2, 1.0)  # area share of a random-resized crop (authors' value)
    val_size: int | None = None  # images in the held-out split (None: the test set / 1 % of a folder)
    val_fraction: float = 0.01  # share held out of a folder without train/ and val/
    workers: int | None = None  # DataLoader processes (None: 0 for in-memory data, else up to 8)
    download: bool = True  # fetch MNIST / Fashion-MNIST / CIFAR-10 when missing (unless OPTVQ_OFFLINE)


@dataclass
class LossConfig:
    l1: float = 1.0
    l2: float = 1.0
    perceptual: float = 0.0  # LPIPS weight (3 in the paper's ImageNet recipe)
    perceptual_net: str = "vgg"
    lpips_weights: str | None = None  # a safetensors file; None: optvq's weight cache
    quantizer: float = 1.0
    gan: float = 0.0  # generator's adversarial weight (times the adaptive weight); 0: no discriminator
    disc: float = 1.0  # the discriminator's hinge-loss weight
    disc_start: int = 0  # steps before the discriminator is switched on
    disc_layers: int = 3
    disc_filters: int = 64
    max_gan_weight: float = 1e4  # clamp of the adaptive weight


@dataclass
class OptimConfig:
    base_lr: float = 4.5e-6  # learning rate = base_lr x global batch size ...
    lr: float | None = None  # ... unless set here
    quantizer_lr_mult: float = 1.0  # the quantizer's learning rate relative to the rest
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-7
    warmup: float = 0.01  # OneCycle's warm-up share of all steps
    grad_clip: float = 1.0  # max gradient norm (0: no clipping)
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclass
class QuantizerConfig:
    method: str = "optvq"  # optvq: Sinkhorn assignment | vq: nearest neighbour (the baseline)
    init: str = "none"  # none | random_select | kmeans: codebook from encoder features at step 0
    init_samples: int | None = None  # feature vectors for the init (None: 20 per code, 2,000..500,000)
    kmeans_iters: int = 20


@dataclass
class TrainConfig:
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields changed from the preset
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    epochs: int = 1
    steps: int | None = None  # optimizer steps in all; overrides epochs
    batch_size: int = 64  # global: all processes and accumulation micro-batches of one step
    seed: int = 42
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 on a GPU that has it) | bf16 | fp32
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0: none
    log_every: int = 50
    val_every: int = 1000  # 0: validate at the end only
    val_batch_size: int | None = None  # None: batch_size / processes
    ckpt_every: int = 1000  # 0: checkpoint at the end (and on a signal) only
    keep_checkpoints: int = 2
    max_bad_steps: int = 5  # non-finite steps in a row before training stops
    tensorboard: str = "auto"  # auto (when installed) | on | off
    grid_images: int = 8  # originals and reconstructions in each validation PNG


# Per-preset recipes: only what differs from the defaults above.
_SMALL = {  # MNIST / CIFAR-10, Sec. 4.2: 32 x 32, L1 + L2 + quantizer loss, batch 1024, 100 epochs
    "data": {"size": 32},
    "batch_size": 1024,
    "epochs": 100,
    "log_every": 10,
    "val_every": 500,
    "ckpt_every": 500,
}
_IMAGENET = {  # Sec. 4.1: 256 x 256, LPIPS 3, PatchGAN from step 150k, batch 64, 50 epochs
    "data": {"size": 256},
    "loss": {"perceptual": 3.0, "gan": 1.0, "disc_start": 150_000},
    "quantizer": {"init": "kmeans"},
    "batch_size": 64,
    "epochs": 50,
    "val_every": 5000,
    "ckpt_every": 2000,
}
RECIPES: dict[str, dict[str, Any]] = {
    "mnist": {**_SMALL, "data": {"kind": "mnist", "size": 32}},
    "cifar10": {**_SMALL, "data": {"kind": "cifar10", "size": 32}},
    "imagenet-f16-h4": _IMAGENET,
    "imagenet-f16-h8": _IMAGENET,
    "tiny": {"data": {"size": 32}, "batch_size": 16, "log_every": 10, "val_every": 200, "ckpt_every": 200},
    "tiny-vqgan": {
        "data": {"size": 16},
        "loss": {"perceptual": 3.0, "gan": 1.0, "disc_start": 200, "disc_layers": 2},  # 16 px: 2 layers fit
        "batch_size": 8,
        "log_every": 10,
        "val_every": 200,
        "ckpt_every": 200,
    },
}
# --quantizer vq: the authors' vanilla baseline (vqbase): one head, nearest-neighbour assignment,
# cross-entropy quantizer loss, codes drawn from encoder features.
METHODS: dict[str, dict[str, Any]] = {
    "optvq": {"model": {"assign": "sinkhorn"}},
    "vq": {"model": {"heads": 1, "loss_type": "ce", "assign": "nearest"}, "quantizer": {"init": "random_select"}},
}
INITS = ("none", "random_select", "kmeans")
AMPS = ("auto", "bf16", "fp32")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` (from YAML, TOML or ``--set``) as type ``hint``; UserError naming ``key`` if it is not."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or str(value).strip().lower() in ("none", "null", "~")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    bad = UserError(f"config key {key}: {value!r} is not a valid {getattr(hint, '__name__', hint)}")
    if origin is Literal:
        if str(value) not in args:
            raise UserError(f"config key {key}: {value!r} is not one of {', '.join(map(str, args))}")
        return str(value)
    if origin is tuple:
        items = [v for v in str(value).strip("()[] ").split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise bad
        elem = args[0] if args else Any
        if len(args) > 1 and args[1] is not Ellipsis:
            if len(items) != len(args):
                raise UserError(f"config key {key}: needs {len(args)} values, got {list(items)}")
            return tuple(_coerce(v, a, key) for v, a in zip(items, args, strict=True))
        return tuple(_coerce(v, elem, key) for v in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise bad
    try:
        if hint is int:
            if isinstance(value, bool):
                raise bad
            f = float(value)
            if not f.is_integer():
                raise bad
            return int(f)
        if hint is float:
            if isinstance(value, bool):
                raise bad
            return float(value)
    except (TypeError, ValueError):
        raise bad from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise bad
        return str(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    return value


def _build(cls, d: dict[str, Any], prefix: str = ""):
    """A (nested) config dataclass from a dict; unknown keys and bad values are UserErrors."""
    if not isinstance(d, dict):
        raise UserError(f"config section {prefix.rstrip('.') or '(top)'} must be a mapping, got {d!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in d.items():
        if k not in names:
            raise UserError(f"unknown config key {prefix}{k}; {prefix or 'top-level '}keys: {', '.join(names)}")
        hint = hints[k]
        if dataclasses.is_dataclass(hint):
            kwargs[k] = _build(hint, v, f"{prefix}{k}.")
        elif k == "model" and cls is TrainConfig:
            kwargs[k] = _model_overrides(v)
        else:
            kwargs[k] = _coerce(v, hint, prefix + k)
    return cls(**kwargs)


def _model_overrides(d: Any) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise UserError(f"config section model must be a mapping of model settings, got {d!r}")
    hints = get_type_hints(ModelConfig)
    out = {}
    for k, v in d.items():
        if k not in hints:
            raise UserError(f"unknown config key model.{k}; model keys: {', '.join(hints)}")
        out[k] = _coerce(v, hints[k], f"model.{k}")
    return out


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set a.b=value`` items as a nested dict (values stay strings; typing happens later)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: write key=value, e.g. --set optim.lr=1e-4")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {p} is both a value and a section")
        node[parts[-1]] = value.strip()
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml / .yml), TOML (.toml) or JSON (.json) config file as a dict."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"--config {path}: use a .yaml, .yml, .toml or .json file")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - yaml / toml / json syntax errors: one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--config {path}: cannot parse ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: the top level must be a mapping of config keys")
    return data


def resolve_config(
    preset: str | None = None,
    file: dict[str, Any] | None = None,
    sets: dict[str, Any] | None = None,
    cli: dict[str, Any] | None = None,
) -> TrainConfig:
    """The config of a new run: defaults < the preset's recipe < the quantizer method's defaults <
    the config file < ``--set`` < the command's own flags."""
    file, sets, cli = file or {}, sets or {}, cli or {}
    layers = [file, sets, cli]
    preset = preset or next((layer["preset"] for layer in reversed(layers) if "preset" in layer), None)
    if preset is None:
        raise UserError("no preset: pass --preset NAME (" + ", ".join(RECIPES) + ")")
    if preset not in RECIPES:
        raise UserError(f"--preset {preset}: unknown; presets: {', '.join(RECIPES)}")
    method = "optvq"
    for layer in layers:
        m = layer.get("quantizer", {}).get("method") if isinstance(layer.get("quantizer"), dict) else None
        method = m if m is not None else method
    if method not in METHODS:
        raise UserError(f"--quantizer {method}: use optvq or vq")
    merged: dict[str, Any] = {"preset": preset}
    for layer in (RECIPES[preset], METHODS[method], *layers):
        merged = _merge(merged, layer)
    merged["preset"] = preset
    cfg = _build(TrainConfig, merged)
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Cross-field checks; UserError naming the key."""
    if cfg.quantizer.init not in INITS:
        raise UserError(f"quantizer.init {cfg.quantizer.init!r}: use one of {', '.join(INITS)}")
    if cfg.amp not in AMPS:
        raise UserError(f"amp {cfg.amp!r}: use one of {', '.join(AMPS)}")
    if cfg.tensorboard not in ("auto", "on", "off"):
        raise UserError(f"tensorboard {cfg.tensorboard!r}: use auto, on or off")
    positive = {
        "batch_size": cfg.batch_size,
        "epochs": cfg.epochs,
        "optim.grad_accum": cfg.optim.grad_accum,
        "data.size": cfg.data.size,
        "max_bad_steps": cfg.max_bad_steps,
        "log_every": cfg.log_every,
    }
    for key, v in positive.items():
        if v < 1:
            raise UserError(f"{key} must be at least 1, got {v}")
    if cfg.steps is not None and cfg.steps < 1:
        raise UserError(f"steps must be at least 1, got {cfg.steps}")
    if not 0.0 <= cfg.ema < 1.0:
        raise UserError(f"ema {cfg.ema}: the decay must be in [0, 1) (0 turns EMA off)")
    if not 0.0 < cfg.optim.warmup < 1.0:
        raise UserError(f"optim.warmup {cfg.optim.warmup}: a share of the steps in (0, 1)")
    try:
        mcfg = build_model(cfg.preset, device="meta", **cfg.model).config
    except UserError as e:
        raise UserError(f"model settings: {e}") from None
    if cfg.data.size % mcfg.downsample:
        raise UserError(
            f"data.size {cfg.data.size} is not a multiple of the model's downsampling factor {mcfg.downsample}"
        )
    layers = cfg.loss.disc_layers
    if cfg.loss.gan > 0 and cfg.data.size // 2**layers < 3:
        # `layers` stride-2 convs, then two 4x4 convs that each take a pixel off: one logit needs 3 left.
        raise UserError(
            f"data.size {cfg.data.size} is too small for a {layers}-layer PatchGAN (needs {3 * 2**layers} px); "
            "lower loss.disc_layers or set loss.gan=0"
        )


def save_config(cfg: TrainConfig, run_dir: Path) -> Path:
    import yaml

    text = "# optvq train: the resolved config of this run (`optvq train --config` accepts it)\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    path = run_dir / CONFIG_FILE
    _atomic_write_bytes(path, text.encode())
    return path


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The saved config of a run (for --resume)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"--resume {run_dir}: no {CONFIG_FILE} inside; not a run directory of `optvq train`")
    cfg = _build(TrainConfig, read_config_file(path))
    check_config(cfg)
    return cfg


# =============================================================================================
# The pieces: model, discriminator, optimizers, schedules, EMA, codebook initialisation
# =============================================================================================


def last_layer(model: OptVQModel) -> torch.Tensor:
    """The decoder's output conv weight: where VQGAN's adaptive weight compares gradients."""
    dec = model.decoder
    return dec.conv_out.weight if hasattr(dec, "conv_out") else dec.out_fc.weight


_DECAYED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.MultiheadAttention)


def param_groups(modules: list[nn.Module], lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: conv / linear weights with weight decay; everything else (norms, biases,
    the codebook embedding) without, as in the authors' trainer."""
    decay, rest, seen = [], [], set()
    for module in modules:
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                (decay if isinstance(sub, _DECAYED) and name.endswith("weight") else rest).append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": rest, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def learning_rate(cfg: TrainConfig) -> float:
    """The peak learning rate: ``optim.lr`` if set, else base_lr x global batch size (the authors'
    rule: 4.5e-6 x 64 = 2.88e-4 for ImageNet at batch 64; the paper prints 2e-6 x 64 = 1.28e-4)."""
    return cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.base_lr * cfg.batch_size


def make_optimizer(groups: list[dict[str, Any]], o: OptimConfig, total_steps: int):
    opt = torch.optim.AdamW(groups, betas=o.betas, eps=o.eps)
    # OneCycle (Smith & Topin): from max/25 up to max in the first `warmup` share, cosine down to
    # max/25e4; it also cycles Adam's beta1 (0.85 <-> 0.95), as the authors' runs did.
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in groups], total_steps=total_steps, pct_start=o.warmup, anneal_strategy="cos"
    )
    return opt, sched


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


@torch.no_grad()
def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii): each next centre is a row drawn with probability
    proportional to its squared distance to the nearest centre so far. Stays on x's device (the
    uniform draws come from ``generator`` on the CPU)."""
    n = x.shape[0]
    u = torch.rand(k, generator=generator, dtype=torch.float64).to(x.device)
    first = int(torch.randint(n, (1,), generator=generator))
    centres = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centres[0] = x[first]
    d2 = (x - centres[0]).pow(2).sum(1).double()
    for j in range(1, k):
        cum = torch.cumsum(d2, 0)
        # All rows already centres (d2 == 0 everywhere): the draw falls back to the last row.
        idx = torch.searchsorted(cum, (u[j] * cum[-1]).reshape(1), right=True).clamp_(max=n - 1)
        centres[j] = x[idx[0]]
        d2 = torch.minimum(d2, (x - centres[j]).pow(2).sum(1).double())
    return centres


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means of rows x (l, d) into k centroids from k-means++ seeds; a cluster that
    empties is restarted at a random row."""
    from optvq_cli.quant.assign import nearest_assign

    n = x.shape[0]
    c = kmeans_plus_plus(x, k, generator)
    for _ in range(iters):
        idx = nearest_assign(x, c)
        sums = torch.zeros_like(c).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k).to(x.dtype)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            c[empty] = x[torch.randint(n, (int(empty.sum()),), generator=generator).to(x.device)]
    return c


@torch.no_grad()
def init_codebook(
    model: OptVQModel, dataset, cfg: TrainConfig, device: torch.device, log: Callable[[str], None]
) -> None:
    """``random_select`` or ``kmeans``: codes from the (untrained) encoder's features of training
    images, per-head chunks pooled (all heads share one codebook). The shared projection is set to
    the identity so the projected codes start exactly there."""
    method = cfg.quantizer.init
    if method == "none":
        return
    q = model.quantize
    want = cfg.quantizer.init_samples or min(max(20 * q.n_codes, 2000), 500_000)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    order = torch.randperm(len(dataset), generator=g).tolist()
    feats, have, bs = [], 0, max(1, min(cfg.batch_size, 256))
    was_training = model.training
    model.eval()
    for s in range(0, len(order), bs):
        x = _fetch(dataset, [(0, i) for i in order[s : s + bs]]).to(device)
        z = model.features(x)  # (B, e_dim, h, w), fp32
        pool = z.permute(0, 2, 3, 1).reshape(-1, q.code_dim)
        feats.append(pool)
        have += pool.shape[0]
        if have >= want:
            break
    model.train(was_training)
    x = torch.cat(feats)[:want].float()
    if method == "random_select":
        pick = torch.randperm(x.shape[0], generator=g)[: q.n_codes]
        if x.shape[0] < q.n_codes:
            pick = torch.randint(x.shape[0], (q.n_codes,), generator=g)
        codes = x[pick.to(x.device)]
    else:
        codes = kmeans(x, q.n_codes, cfg.quantizer.kmeans_iters, g)
    q.embedding.weight.copy_(codes.to(q.embedding.weight))
    if q.proj is not None:
        q.proj.weight.copy_(torch.eye(q.code_dim))
        q.proj.bias.zero_()
    log(f"codebook: {method} init of {q.n_codes} codes from {x.shape[0]} encoder feature vectors")


def _fetch(dataset, items: list[tuple[int, int]]) -> torch.Tensor:
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(items)
    return torch.stack([dataset[i] for i in items])


# =============================================================================================
# Files: atomic writes, checkpoints, metrics
# =============================================================================================


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _ckpt_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. A checkpoint folder appears by one rename once all of it
    is written, so a run killed while saving leaves only a ``.tmp-*`` folder behind."""
    root = run_dir / CKPT_DIR
    out = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file():
                try:
                    out.append((int(p.name[5:]), p))
                except ValueError:
                    continue
    return sorted(out)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(run_dir: Path, step: int, parts: dict[str, Any], keep: int, metadata: dict[str, Any]) -> Path:
    """Write checkpoints/step-N/ (model dir + discriminator / EMA safetensors + training state)
    under a temporary name, then rename it into place; keep the newest ``keep``."""
    from safetensors.torch import save_file

    root = run_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / _ckpt_name(step)
    if final.is_dir() and (final / STATE_FILE).is_file():
        return final  # this step is saved already (a signal right after a periodic save)
    tmp = root / f".tmp-{_ckpt_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(parts["model"], tmp, metadata=metadata)
    for name, module in (("disc", DISC_FILE), ("ema", EMA_FILE)):
        if parts.get(name) is not None:
            tensors = {k: v.detach().cpu().contiguous() for k, v in parts[name].state_dict().items()}
            atomic_write(tmp / module, lambda p, t=tensors: save_file(t, str(p)))
    atomic_write(tmp / STATE_FILE, lambda p: torch.save(parts["state"], p))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(run_dir)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The tensors and training state of a checkpoint folder; the state through
    ``torch.load(weights_only=True)`` (no code can run from the file)."""
    from safetensors.torch import load_file

    from optvq_cli.model.checkpoint import WEIGHTS_NAME

    try:
        out: dict[str, Any] = {"model": load_file(str(path / WEIGHTS_NAME))}
        for name, file in (("disc", DISC_FILE), ("ema", EMA_FILE)):
            out[name] = load_file(str(path / file)) if (path / file).is_file() else None
        out["state"] = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint: one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: cannot read the checkpoint ({first}); delete it to use an older one") from None
    if out["state"].get("format") != STATE_FORMAT:
        raise UserError(f"{path}: training state format {out['state'].get('format')}, this optvq reads {STATE_FORMAT}")
    return out


class MetricsLog:
    """``metrics.jsonl`` (one JSON object a line) and, when enabled, TensorBoard scalars."""

    def __init__(self, run_dir: Path, tensorboard: str, enabled: bool):
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / TB_DIR))
            except ImportError:
                if tensorboard == "on":
                    raise UserError(
                        "tensorboard=on but tensorboard is not installed: pip install tensorboard"
                    ) from None

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (written after the checkpoint a resume starts from)."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        _atomic_write_bytes(self.path, ("\n".join(keep) + "\n" if keep else "").encode())

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            split = row.get("split", "train")
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "split"):
                    self.tb.add_scalar(f"{split}/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# =============================================================================================
# Validation
# =============================================================================================


def psnr01(x01: torch.Tensor, y01: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR as `optvq eval` reports it: BT.601 luma for RGB, the one channel for grey."""
    from optvq_cli.eval.metrics import psnr

    return psnr(x01, y01, "y" if x01.shape[1] == 3 else "rgb")


def save_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path) -> None:
    """Originals on the top row, reconstructions below, as one PNG (written atomically)."""
    from PIL import Image
    from torchvision.utils import make_grid

    k = originals.shape[0]
    grid = make_grid(torch.cat([originals, recons]).float().clamp(-1, 1).add(1).div(2), nrow=k, padding=2)
    arr = grid.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr[:, :, 0] if originals.shape[1] == 1 else arr)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: img.save(p, format="PNG"))


@torch.no_grad()
def validate(model: OptVQModel, dataset, batch: int, device: torch.device, workers: int, grid: int):
    """PSNR and codebook usage of ``model`` (eval mode, its own assignment) on the held-out split,
    reduced over processes; plus the first ``grid`` originals and reconstructions (main process)."""
    was = model.training
    model.eval()
    n_codes = model.config.n_codes
    batches = val_batches(len(dataset), batch, D.world_size(), D.rank())
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    counts = torch.zeros(n_codes, dtype=torch.long, device=device)
    shown = None
    for x in make_loader(dataset, batches, workers):
        x = x.to(device, non_blocking=True)
        z_q, _, idx = model.encode(x, assign=model.config.assign)
        rec = model.decode(z_q).clamp(-1, 1)
        sums[0] += psnr01((x + 1) / 2, (rec + 1) / 2).sum()
        sums[1] += x.shape[0]
        counts += torch.bincount(idx.flatten(), minlength=n_codes)
        if shown is None and grid > 0:
            shown = (x[:grid].cpu(), rec[:grid].cpu())
    D.all_reduce_sum(sums)
    D.all_reduce_sum(counts)
    model.train(was)
    from optvq_cli.eval.metrics import perplexity, usage_fraction

    c = counts.cpu()
    stats = {
        "psnr": float(sums[0] / sums[1]) if sums[1] > 0 else None,
        "codebook_usage": usage_fraction(c),
        "perplexity": perplexity(c),
        "images": int(sums[1]),
    }
    return stats, shown


# =============================================================================================
# The training loop
# =============================================================================================


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row; the message names the last good checkpoint."""


@dataclass
class TrainResult:
    status: str  # completed | interrupted
    step: int
    total_steps: int
    run_dir: Path
    model_dir: Path | None
    skipped_steps: int
    val: dict[str, Any] | None


@dataclass
class Hooks:
    """Test / research hooks. ``on_step(step, losses, indices)`` after each optimizer step with this
    process's loss terms (floats) and its micro-batches' indices."""

    on_step: Callable[[int, dict[str, float], list[torch.Tensor]], None] | None = None


class _Stop:
    """SIGINT / SIGTERM ask the loop to checkpoint and leave; a second SIGINT interrupts at once."""

    def __init__(self):
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "fp32":
        return None
    if amp == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not list_checkpoints(run_dir):
            raise UserError(f"--resume {run_dir}: no checkpoint inside ({run_dir}/{CKPT_DIR}/step-*/); start a new run")
        for p in (run_dir / CKPT_DIR).glob(".tmp-*"):  # left by a run killed while saving
            shutil.rmtree(p, ignore_errors=True)
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir}: is a file; give a folder for the run")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(
                f"--out {run_dir} is not empty: continue it with --resume {run_dir}, or pass --overwrite to start over"
            )
        for name in (CKPT_DIR, MODEL_DIR, SAMPLES_DIR, TB_DIR):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in (METRICS_FILE, CONFIG_FILE):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def _on_main_first(fn: Callable[[], Any], others: Callable[[], Any] | None = None) -> Any:
    """Run ``fn`` on the main process first (downloads, run-dir setup), then on the others; an
    error on the main process stops every process."""
    ok = torch.ones(1)
    result, error = None, None
    if D.is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the others
            error, ok = e, torch.zeros(1)
    if D.world_size() > 1:
        D.broadcast(ok.to(_collective_device()))
        ok = ok.cpu()
    if error is not None:
        raise error
    if not bool(ok.item()):
        raise UserError("the main process (rank 0) failed; see its message")
    if not D.is_main():
        result = (others or fn)()
    return result


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if D.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce_mean(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    if not values:
        return {}
    keys = sorted(values)
    t = torch.stack([values[k].detach().double().to(device) for k in keys])
    D.all_reduce_mean(t)
    return dict(zip(keys, t.tolist(), strict=True))


def _step_schedules(*schedules) -> None:
    """Advance the schedules every step, also when the optimizer did not step (a skipped step, the
    discriminator before ``disc_start``): the learning rate follows the step count."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        for s in schedules:
            if s is not None:
                s.step()


def _flag_max(flag: float, device: torch.device) -> float:
    """The largest of every process's ``flag`` (one collective; the same answer everywhere)."""
    if D.world_size() == 1:
        return flag
    t = torch.tensor([flag], dtype=torch.float32, device=device)
    return float(D.all_reduce_max(t).item())


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    splits: Splits | None = None,
    hooks: Hooks | None = None,
    log: Callable[[str], None] = print,
    progress: Any = None,
) -> TrainResult:
    """Train (or, with ``resume``, continue) the run in ``run_dir``. Launched by torchrun it joins
    the process group; every process calls this. ``splits`` replaces the data named by
    ``cfg.data`` (tests). ``log`` takes the main process's log lines; ``progress`` is a rich
    Console to draw a progress bar on (on a terminal; elsewhere log lines every ``log_every``).
    Raises UserError for bad input, TrainingDiverged after ``max_bad_steps`` non-finite steps in
    a row."""
    run_dir = Path(run_dir)
    device = D.device_for(cfg.device)
    own_group = D.init_from_env(device)
    try:
        with ExitStack() as cleanup:
            return _train(cfg, run_dir, resume, overwrite, splits, hooks or Hooks(), log, progress, device, cleanup)
    finally:
        if own_group:
            D.destroy()


def _train(cfg, run_dir, resume, overwrite, splits, hooks, log, progress, device, cleanup) -> TrainResult:  # noqa: C901
    main, world, rank = D.is_main(), D.world_size(), D.rank()
    say = log if main else (lambda msg: None)
    check_config(cfg)
    if cfg.data.path and not resume:  # the saved config must still find the data from another folder
        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, path=str(Path(cfg.data.path).expanduser().absolute()))
        )

    # -- run directory, seeds ----------------------------------------------------------------
    def setup_dir():
        _prepare_run_dir(run_dir, resume, overwrite)
        if not resume:
            save_config(cfg, run_dir)

    _on_main_first(setup_dir, others=lambda: None)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # -- model -------------------------------------------------------------------------------
    model = build_model(cfg.preset, **cfg.model).to(device).train()
    mcfg: ModelConfig = model.config
    model.compute_dtype = _amp_dtype(cfg.amp, device)

    # -- data --------------------------------------------------------------------------------
    if splits is None:
        d = cfg.data

        def open_data(download: bool):
            return open_splits(
                d.path, d.kind, mcfg.in_channels, d.size, augment=d.augment, seed=cfg.seed,
                crop_scale=d.crop_scale, val_size=d.val_size, val_fraction=d.val_fraction,
                allow_download=download,
            )  # fmt: skip

        splits = _on_main_first(lambda: open_data(d.download), others=lambda: open_data(False))
    say(f"data: {splits.description}")
    accum = cfg.optim.grad_accum
    plan = BatchPlan(len(splits.train), cfg.batch_size, accum, world, rank, cfg.seed)
    total = cfg.steps if cfg.steps is not None else cfg.epochs * plan.steps_per_epoch
    workers = cfg.data.workers
    if workers is None:
        workers = 0 if splits.kind != "folder" else min(8, max(0, (os.cpu_count() or 1) // max(1, world) - 1))
    pin = device.type == "cuda"

    # -- losses ------------------------------------------------------------------------------
    perceptual = None
    if cfg.loss.perceptual > 0:
        from optvq_cli.train.losses import perceptual_loss

        def load_lpips():
            return perceptual_loss(cfg.loss.perceptual_net, cfg.loss.lpips_weights, device)

        perceptual = _on_main_first(load_lpips)
    disc = None
    if cfg.loss.gan > 0:
        disc = PatchDiscriminator(mcfg.out_channels, cfg.loss.disc_filters, cfg.loss.disc_layers).to(device).train()
        if world > 1 and device.type == "cuda":  # batch statistics over the global batch
            disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)

    # -- optimizers and schedules: lr = base x global batch ------------------------------------
    lr = learning_rate(cfg)
    o = cfg.optim
    body = [model.encoder, model.decoder, model.quant_conv, model.post_quant_conv]
    groups = param_groups(body, lr, o.weight_decay)
    groups += param_groups([model.quantize], lr * o.quantizer_lr_mult, o.weight_decay)
    opt, sched = make_optimizer(groups, o, total)
    opt_d = sched_d = None
    if disc is not None:
        opt_d, sched_d = make_optimizer(param_groups([disc], lr, o.weight_decay), o, total)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema > 0 else None

    # -- fresh start or resume ---------------------------------------------------------------
    metrics = MetricsLog(run_dir, cfg.tensorboard, main)
    cleanup.callback(metrics.close)
    step, skipped, bad_in_row = 0, 0, 0
    window_state = None
    if resume:
        ckpt_step, ckpt_path = list_checkpoints(run_dir)[-1]
        ck = read_checkpoint(ckpt_path)
        st = ck["state"]
        sampler = st["sampler"]
        if (sampler["n"], sampler["global_batch"], st["total_steps"]) != (len(splits.train), cfg.batch_size, total):
            raise UserError(
                f"--resume {run_dir}: the checkpoint was made with {sampler['n']} training images, batch "
                f"{sampler['global_batch']} and {st['total_steps']} steps; now {len(splits.train)}, "
                f"{cfg.batch_size} and {total}: use the same data and config"
            )
        model.load_state_dict(ck["model"])
        if disc is not None and ck["disc"] is not None:
            disc.load_state_dict(ck["disc"])
        if ema is not None and ck["ema"] is not None:
            ema.load_state_dict(ck["ema"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if opt_d is not None and st.get("disc_optimizer") is not None:
            opt_d.load_state_dict(st["disc_optimizer"])
            sched_d.load_state_dict(st["disc_scheduler"])
        ranks = st["ranks"]
        _set_rng_state(ranks[rank]["rng"] if rank < len(ranks) else ranks[0]["rng"])
        if len(ranks) == world:  # the log window in progress, so the next metrics row is unchanged
            window_state = ranks[rank]["window"]
        step, skipped, bad_in_row = st["step"], st["skipped"], st["bad_in_row"]
        metrics.truncate_after(step)
        say(f"resumed {run_dir} at step {step}/{total} from {ckpt_path.name}")
    else:
        if main:
            init_codebook(model, splits.train, cfg, device, say)
        if world > 1:  # every process starts from the main process's codebook
            for p in model.quantize.parameters():
                D.broadcast(p.data)
        if ema is not None:
            ema.load_state_dict(model.state_dict())

    counts = model.param_counts()
    say(
        f"model: {cfg.preset} ({counts['total'] / 1e6:.2f} M parameters), quantizer {cfg.quantizer.method} "
        f"({mcfg.assign}, {mcfg.heads} head(s), n={mcfg.n_codes}); {world} process(es) on {device}; "
        f"batch {cfg.batch_size} = {plan.micro} x {world} x {accum}; lr {lr:.3g}; {total} steps "
        f"({plan.steps_per_epoch} per epoch)"
    )

    # -- distributed wrappers -----------------------------------------------------------------
    net, dnet = model, disc
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        net = DDP(model, device_ids=ids)
        if disc is not None:
            dnet = DDP(disc, device_ids=ids)
    final_layer = last_layer(model)

    # -- helpers over the loop's state ---------------------------------------------------------
    def state_dict() -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "step": step,
            "total_steps": total,
            "skipped": skipped,
            "bad_in_row": bad_in_row,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "disc_optimizer": opt_d.state_dict() if opt_d is not None else None,
            "disc_scheduler": sched_d.state_dict() if sched_d is not None else None,
            "ranks": D.all_gather_object({"rng": _rng_state(), "window": window.state()}),
            "sampler": {
                "epoch": step // plan.steps_per_epoch,
                "batch": step % plan.steps_per_epoch,
                "n": plan.n,
                "global_batch": plan.global_batch,
                "seed": plan.seed,
            },
            "world_size": world,
        }

    def model_metadata() -> dict[str, Any]:
        return {
            "trained_with": "optvq train",
            "preset": cfg.preset,
            "quantizer": cfg.quantizer.method,
            "step": step,
            "total_steps": total,
            "weights": "ema" if ema is not None else "raw",
        }

    last_saved = -1

    def checkpoint() -> None:
        nonlocal last_saved
        state = state_dict()  # a collective (RNG states): every process
        if main and step != last_saved:
            parts = {"model": model, "disc": disc, "ema": ema, "state": state}
            write_checkpoint(run_dir, step, parts, cfg.keep_checkpoints, model_metadata())
        last_saved = step
        D.barrier()

    val_bs = cfg.val_batch_size or max(1, cfg.batch_size // world)

    def run_validation() -> dict[str, Any]:
        stats, shown = validate(ema or model, splits.val, val_bs, device, workers, cfg.grid_images)
        if main:
            metrics.write({"step": step, "split": "val", **stats})
            if shown is not None:
                save_grid(shown[0], shown[1], run_dir / SAMPLES_DIR / f"{_ckpt_name(step)}.png")
            psnr = f"{stats['psnr']:.2f} dB" if stats["psnr"] is not None else "n/a"
            say(
                f"val step {step}: psnr {psnr}, codebook usage {stats['codebook_usage']:.1%}, "
                f"perplexity {stats['perplexity']:.1f} ({stats['images']} images)"
            )
        return stats

    # -- the loop ------------------------------------------------------------------------------
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    bar = _Progress(progress if main else None, total, step)
    window = _Window(mcfg.n_codes, device, step)
    if window_state is not None:
        window.load(window_state)
    loader = make_loader(splits.train, StepBatches(plan, step, total), workers, pin)
    batches = iter(loader)
    val_stats = None
    start_step = step
    with _Stop() as stop, bar:
        while step < total:
            disc_on = disc is not None and step >= cfg.loss.disc_start
            opt.zero_grad(set_to_none=True)
            if opt_d is not None:
                opt_d.zero_grad(set_to_none=True)
            bad, step_terms, step_indices = False, {}, []
            for a in range(accum):
                x = next(batches).to(device, non_blocking=True)
                last = a == accum - 1
                with nullcontext() if last or world == 1 else net.no_sync():
                    rec, q_loss, indices = net(x)
                    terms = {"l1": l1_loss(x, rec), "l2": l2_loss(x, rec), "quantizer": q_loss.float()}
                    if perceptual is not None:
                        terms["perceptual"] = perceptual(x, rec)
                    rec_loss = cfg.loss.l1 * terms["l1"] + cfg.loss.l2 * terms["l2"]
                    if perceptual is not None:
                        rec_loss = rec_loss + cfg.loss.perceptual * terms["perceptual"]
                    loss = rec_loss + cfg.loss.quantizer * terms["quantizer"]
                    if disc_on:
                        disc.requires_grad_(False)
                        terms["gan"] = generator_loss(disc(rec.float()))
                        terms["gan_weight"] = adaptive_weight(
                            rec_loss, terms["gan"], final_layer, cfg.loss.max_gan_weight
                        )
                        loss = loss + cfg.loss.gan * terms["gan_weight"] * terms["gan"]
                        disc.requires_grad_(True)
                    terms["loss"] = loss
                    # Every process agrees on skipping before any of them calls backward.
                    if _flag_max(float(not torch.isfinite(loss).item()), device) > 0:
                        bad = True
                        for _ in range(accum - 1 - a):  # the step's other micro-batches: skipped too
                            next(batches)
                        break
                    (loss / accum).backward()
                if disc_on:
                    with nullcontext() if last or world == 1 else dnet.no_sync():
                        logits_real = dnet(x.detach().float())
                        logits_fake = dnet(rec.detach().float())
                        terms["disc"] = hinge_d_loss(logits_real, logits_fake)
                        (cfg.loss.disc * terms["disc"] / accum).backward()
                for k, v in terms.items():
                    step_terms[k] = step_terms.get(k, 0.0) + v.detach().float() / accum
                window.add_batch(x, rec.detach(), indices)
                if hooks.on_step is not None:
                    step_indices.append(indices.detach().cpu())
            if not bad:
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                bad = not bool(torch.isfinite(gnorm).item())  # gradients are reduced: same everywhere
            if bad:
                skipped += 1
                bad_in_row += 1
                opt.zero_grad(set_to_none=True)
                if opt_d is not None:
                    opt_d.zero_grad(set_to_none=True)
                metrics.write({"step": step + 1, "split": "train", "event": "skipped_step", "skipped": skipped})
                say(f"step {step + 1}: non-finite loss or gradient; step skipped ({bad_in_row} in a row)")
                if bad_in_row >= cfg.max_bad_steps:
                    saved = list_checkpoints(run_dir)
                    where = f"{saved[-1][1]} (step {saved[-1][0]})" if saved else "none written yet"
                    raise TrainingDiverged(
                        f"training stopped at step {step + 1}: {bad_in_row} non-finite steps in a row; "
                        f"the last good checkpoint is {where}; lower optim.lr or check the data, then --resume"
                    )
            else:
                bad_in_row = 0
                opt.step()
                if disc_on:
                    torch.nn.utils.clip_grad_norm_(disc.parameters(), clip)
                    opt_d.step()
                if ema is not None:
                    ema_update(ema, model, cfg.ema)
                window.add_terms(step_terms)
            _step_schedules(sched, sched_d)
            step += 1
            if hooks.on_step is not None and not bad:
                hooks.on_step(step, {k: float(v) for k, v in step_terms.items()}, step_indices)

            # -- logging, validation, checkpoints, signals ---------------------------------------
            bar.advance(step)
            if step % cfg.log_every == 0 or step == total:
                row = window.flush(step, total, plan, opt, skipped)
                if main and row:
                    metrics.write(row)
                    bar.show(row, say)
            if cfg.val_every and step % cfg.val_every == 0 and step < total:
                val_stats = run_validation()
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and bad_in_row == 0:
                checkpoint()  # not in a streak of skipped steps: the newest checkpoint stays a good one
            stop_now = _flag_max(1.0 if stop.requested else 0.0, device) > 0
            if stop_now and step < total:
                checkpoint()
                say(
                    f"stopped by {stop.requested or 'a signal'} at step {step}/{total}; "
                    f"continue with --resume {run_dir}"
                )
                return TrainResult("interrupted", step, total, run_dir, None, skipped, val_stats)

    # -- the end: validation, checkpoint, the model directory ----------------------------------
    val_stats = run_validation()
    checkpoint()
    model_dir = run_dir / MODEL_DIR
    if main:
        meta = model_metadata()
        meta.update({"val_psnr": val_stats["psnr"], "val_codebook_usage": val_stats["codebook_usage"]})
        save_model(ema or model, model_dir, metadata=meta)
        say(f"done: {step - start_step} steps, {skipped} skipped; model in {model_dir}")
    D.barrier()
    return TrainResult("completed", step, total, run_dir, model_dir, skipped, val_stats)


class _Window:
    """Running training metrics between two log rows: mean loss terms, PSNR, codebook usage, speed."""

    def __init__(self, n_codes: int, device: torch.device, start_step: int):
        self.n_codes, self.device = n_codes, device
        self.reset()
        self.t0, self.last_step = time.perf_counter(), start_step

    def reset(self) -> None:
        self.terms: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.psnr = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(self.n_codes, dtype=torch.long, device=self.device)

    def state(self) -> dict[str, Any]:
        return {
            "terms": {k: torch.as_tensor(v).detach().cpu() for k, v in self.terms.items()},
            "steps": self.steps,
            "psnr": self.psnr.cpu(),
            "counts": self.counts.cpu(),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.terms = {k: v.to(self.device) for k, v in state["terms"].items()}
        self.steps = state["steps"]
        self.psnr = state["psnr"].to(self.device)
        self.counts = state["counts"].to(self.device)

    def add_batch(self, x: torch.Tensor, rec: torch.Tensor, indices: torch.Tensor) -> None:
        with torch.no_grad():
            p = psnr01((x + 1) / 2, (rec.clamp(-1, 1) + 1) / 2)
            self.psnr[0] += p.nan_to_num(0.0).sum()
            self.psnr[1] += p.isfinite().sum()
            self.counts += torch.bincount(indices.flatten(), minlength=self.n_codes)

    def add_terms(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v
        self.steps += 1

    def flush(self, step: int, total: int, plan: BatchPlan, opt, skipped: int) -> dict[str, Any] | None:
        from optvq_cli.eval.metrics import perplexity, usage_fraction

        means = {k: v / max(1, self.steps) for k, v in self.terms.items()}
        reduced = _reduce_mean(means, self.device) if means else {}
        D.all_reduce_sum(self.psnr)
        D.all_reduce_sum(self.counts)
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.t0, 1e-9)
        row = {
            "step": step,
            "split": "train",
            "epoch": round(step / plan.steps_per_epoch, 4),
            **{k: round(v, 6) for k, v in reduced.items()},
            "psnr": float(self.psnr[0] / self.psnr[1]) if self.psnr[1] > 0 else None,
            "codebook_usage": usage_fraction(self.counts.cpu()),
            "perplexity": perplexity(self.counts.cpu()),
            "lr": opt.param_groups[0]["lr"],
            "steps_per_s": rate,
            "skipped": skipped,
        }
        self.reset()
        self.t0, self.last_step = now, step
        return row


class _Progress:
    """A rich progress bar (loss, PSNR, codebook usage, steps/s, ETA) on a terminal; plain log
    lines otherwise."""

    def __init__(self, console: Any, total: int, start: int):
        self.bar = None
        self.enabled = console is not None
        if console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            if console.is_terminal:
                self.bar = Progress(
                    TextColumn("[bold]train"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[stats]}"),
                    TimeRemainingColumn(),
                    console=console,
                    transient=False,
                )
                self.task = self.bar.add_task("train", total=total, completed=start, stats="")

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def show(self, row: dict[str, Any], say: Callable[[str], None]) -> None:
        psnr = f"{row['psnr']:.2f}" if row.get("psnr") is not None else "-"
        text = (
            f"loss {row.get('loss', float('nan')):.4f}  psnr {psnr}  usage {row['codebook_usage']:.1%}  "
            f"{row['steps_per_s']:.2f} steps/s"
        )
        if self.bar is not None:
            self.bar.update(self.task, stats=text)
        elif self.enabled:
            say(f"step {row['step']}: {text}")


def format_summary(result: TrainResult) -> str:
    v = result.val or {}
    psnr = f"{v['psnr']:.2f} dB" if v.get("psnr") is not None else "n/a"
    usage = f"{v['codebook_usage']:.1%}" if v.get("codebook_usage") is not None else "n/a"
    return f"step {result.step}/{result.total_steps}: val psnr {psnr}, codebook usage {usage}"
