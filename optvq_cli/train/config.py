"""The training config: typed sections, the paper's per-preset recipes, and how a run's config is
assembled (defaults < preset < quantizer method < config file < ``--set`` < the command's flags).

The sections are pydantic dataclasses: types, ranges and unknown keys are checked by pydantic, and
``check_config`` adds the checks that need the model (downsampling, PatchGAN depth).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from optvq_cli.core.errors import UserError
from optvq_cli.core.fileio import atomic_write_text
from optvq_cli.model import ModelConfig, build_model

CONFIG_FILE = "train_config.yaml"


def _none_word(v: Any) -> Any:
    """``--set key=none`` (or null, ~) clears an optional key."""
    return None if isinstance(v, str) and v.strip().lower() in ("none", "null", "~") else v


def _split(v: Any) -> Any:
    """``--set data.crop_scale=0.2,1.0``: a comma list as a tuple."""
    return [s for s in v.strip("()[] ").split(",") if s.strip()] if isinstance(v, str) else v


_Opt = BeforeValidator(_none_word)
_Tuple = BeforeValidator(_split)
Count = Annotated[int, Field(ge=1)]
Steps = Annotated[int, Field(ge=0)]
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Share = Annotated[float, Field(gt=0, lt=1)]
Beta = Annotated[float, Field(ge=0, lt=1)]
_FORBID = ConfigDict(extra="forbid")


@dataclass(config=_FORBID)
class DataConfig:
    path: str = ""
    kind: Literal["auto", "folder", "mnist", "fashion-mnist", "cifar10"] = "auto"
    size: Annotated[int, Field(ge=1, le=8192)] = 32  # training images are size x size
    augment: bool = True  # image folders: random-resized crops + horizontal flips
    # area share of a random-resized crop (authors' value)
    crop_scale: Annotated[tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]], _Tuple] = (
        0.2,
        1.0,
    )
    val_size: Annotated[Count | None, _Opt] = None  # held-out images (None: the test set / 1 % of a folder)
    val_fraction: Share = 0.01  # share held out of a folder without train/ and val/
    workers: Annotated[Steps | None, _Opt] = None  # DataLoader processes (None: 0 in memory, else up to 8)
    download: bool = True  # fetch MNIST / Fashion-MNIST / CIFAR-10 when missing (unless OPTVQ_OFFLINE)
    image_column: str = "image"  # Parquet inputs: the column of image bytes
    label_column: str = "label"  # Parquet inputs: the column of labels


@dataclass(config=_FORBID)
class LossConfig:
    l1: Weight = 1.0
    l2: Weight = 1.0
    perceptual: Weight = 0.0  # LPIPS weight (3 in the paper's ImageNet recipe)
    perceptual_net: Literal["vgg", "alex"] = "vgg"
    lpips_weights: Annotated[str | None, _Opt] = None  # a safetensors file; None: optvq's weight cache
    quantizer: Weight = 1.0
    gan: Weight = 0.0  # generator's adversarial weight (times the adaptive weight); 0: no discriminator
    disc: Weight = 1.0  # the discriminator's hinge-loss weight
    disc_start: Steps = 0  # steps before the discriminator is switched on
    disc_layers: Annotated[int, Field(ge=1, le=8)] = 3
    disc_filters: Count = 64
    max_gan_weight: Rate = 1e4  # clamp of the adaptive weight


@dataclass(config=_FORBID)
class OptimConfig:
    base_lr: Rate = 4.5e-6  # learning rate = base_lr x global batch size ...
    lr: Annotated[Rate | None, _Opt] = None  # ... unless set here
    quantizer_lr_mult: Weight = 1.0  # the quantizer's learning rate relative to the rest
    weight_decay: Weight = 0.05
    betas: Annotated[tuple[Beta, Beta], _Tuple] = (0.9, 0.999)
    eps: Rate = 1e-7
    warmup: Share = 0.01  # OneCycle's warm-up share of all steps
    grad_clip: Weight = 1.0  # max gradient norm (0: no clipping)
    grad_accum: Count = 1  # micro-batches per optimizer step


@dataclass(config=_FORBID)
class QuantizerConfig:
    method: Literal["optvq", "vq"] = "optvq"  # optvq: Sinkhorn assignment | vq: nearest (the baseline)
    init: Literal["none", "random_select", "kmeans"] = "none"  # codebook from encoder features at step 0
    init_samples: Annotated[Count | None, _Opt] = None  # vectors for the init (None: 20 per code, 2k..500k)
    kmeans_iters: Steps = 20


@dataclass(config=_FORBID)
class TrainConfig:
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields changed from the preset
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    epochs: Count = 1
    steps: Annotated[Count | None, _Opt] = None  # optimizer steps in all; overrides epochs
    batch_size: Count = 64  # global: all processes and accumulation micro-batches of one step
    seed: Steps = 42
    device: str = "auto"
    amp: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on a GPU that has it (model, LPIPS, discriminator)
    tf32: bool = True  # CUDA: TF32 convolutions and matmuls in training (the CPU has none)
    channels_last: bool = False  # convolutions in channels-last memory format
    compile: bool = False  # torch.compile the encoder and decoder (the first steps pay the compilation)
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"  # aot_eager / eager: no codegen
    checkpointing: bool = False  # VQGAN presets: recompute block activations in backward (memory for time)
    ema: Beta = 0.0  # decay of an exponential moving average of the weights; 0: none
    log_every: Count = 50
    val_every: Steps = 1000  # 0: validate at the end only
    val_batch_size: Annotated[Count | None, _Opt] = None  # None: batch_size / processes
    ckpt_every: Steps = 1000  # 0: checkpoint at the end (and on a signal) only
    keep_checkpoints: Count = 2
    max_bad_steps: Count = 5  # non-finite steps in a row before training stops
    tensorboard: Literal["auto", "on", "off"] = "auto"  # auto: when installed
    grid_images: Steps = 8  # originals and reconstructions in each validation PNG


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
    # Photographs (the bundled `default` model): 128 px random-resized crops (2-50 % of a photo stored
    # with its shorter side at 768 px: 1x to 4.6x downscaled), L1 + L2 + a light LPIPS-AlexNet term, EMA.
    "photo": {
        "data": {"size": 128, "crop_scale": (0.02, 0.5), "val_size": 6},
        "loss": {"perceptual": 0.1, "perceptual_net": "alex"},
        "optim": {"lr": 1e-3},
        "batch_size": 16,
        "steps": 6000,
        "ema": 0.999,
        "log_every": 25,
        "val_every": 250,
        "ckpt_every": 100,
    },
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


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _keys(section: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(section))


def _one_line(e: ValidationError) -> UserError:
    """pydantic's first complaint as one line naming the config key."""
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        section = TrainConfig
        for part in err["loc"][:-1]:
            section = get_type_hints(section)[part]
        where = ".".join(map(str, err["loc"][:-1]))
        return UserError(f"unknown config key {key}; {where or 'top-level'} keys: {_keys(section)}")
    if err["type"] == "dataclass_type" or err["type"].endswith("dict_type"):
        return UserError(f"config section {key or '(top)'} must be a mapping, got {err.get('input')!r}")
    return UserError(f"config key {key}: {err['input']!r}: {err['msg'].lower()}")


def _model_overrides(d: Any) -> dict[str, Any]:
    """The ``model`` section: ModelConfig field names, each typed by ModelConfig's own hint."""
    if not isinstance(d, dict):
        raise UserError(f"config section model must be a mapping of model settings, got {d!r}")
    hints = get_type_hints(ModelConfig)
    out = {}
    for k, v in d.items():
        if k not in hints:
            raise UserError(f"unknown config key model.{k}; model keys: {', '.join(hints)}")
        try:
            out[k] = TypeAdapter(hints[k]).validate_python(_none_word(_split(v) if "tuple" in str(hints[k]) else v))
        except ValidationError as e:
            raise UserError(f"config key model.{k}: {v!r}: {e.errors()[0]['msg'].lower()}") from None
    return out


def build_config(d: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a (nested) dict; UserError naming the first bad or unknown key."""
    if not isinstance(d, dict):
        raise UserError(f"the config must be a mapping of config keys, got {d!r}")
    d = {**d, "model": _model_overrides(d.get("model", {}))}
    try:
        return TypeAdapter(TrainConfig).validate_python(d)
    except ValidationError as e:
        raise _one_line(e) from None


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


def _parse(path: Path, text: str) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    if suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    if suffix == ".json":
        return json.loads(text)
    raise UserError(f"--config {path}: use a .yaml, .yml, .toml or .json file")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml / .yml), TOML (.toml) or JSON (.json) config file as a dict."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = _parse(path, path.read_text(encoding="utf-8"))
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
    layers = [file or {}, sets or {}, cli or {}]
    preset = preset or next((layer["preset"] for layer in reversed(layers) if "preset" in layer), None)
    if preset is None:
        raise UserError("no preset: pass --preset NAME (" + ", ".join(RECIPES) + ")")
    if preset not in RECIPES:
        raise UserError(f"--preset {preset}: unknown; presets: {', '.join(RECIPES)}")
    method = "optvq"
    for layer in layers:
        section = layer.get("quantizer")
        method = section.get("method", method) if isinstance(section, dict) else method
    if method not in METHODS:
        raise UserError(f"--quantizer {method}: use optvq or vq")
    merged: dict[str, Any] = {"preset": preset}
    for layer in (RECIPES[preset], METHODS[method], *layers):
        merged = _merge(merged, layer)
    merged["preset"] = preset
    cfg = build_config(merged)
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """The checks that need the model; UserError naming the key."""
    if cfg.preset not in RECIPES:
        raise UserError(f"preset {cfg.preset}: unknown; presets: {', '.join(RECIPES)}")
    try:
        mcfg = build_model(cfg.preset, device="meta", **cfg.model).config
    except ValueError as e:
        raise UserError(f"model settings: {e}") from None
    if cfg.data.size % mcfg.downsample:
        raise UserError(
            f"data.size {cfg.data.size} is not a multiple of the model's downsampling factor {mcfg.downsample}"
        )
    if cfg.checkpointing and mcfg.arch != "vqgan":
        raise UserError(
            f"checkpointing applies to the VQGAN presets; {cfg.preset} is {mcfg.arch}: set checkpointing=false"
        )
    layers = cfg.loss.disc_layers
    if cfg.loss.gan > 0 and cfg.data.size // 2**layers < 3:
        # `layers` stride-2 convs, then two 4x4 convs that each take a pixel off: one logit needs 3 left.
        raise UserError(
            f"data.size {cfg.data.size} is too small for a {layers}-layer PatchGAN (needs {3 * 2**layers} px); "
            "lower loss.disc_layers or set loss.gan=0"
        )


def learning_rate(cfg: TrainConfig) -> float:
    """The peak learning rate: ``optim.lr`` if set, else base_lr x global batch size (the authors'
    rule: 4.5e-6 x 64 = 2.88e-4 for ImageNet at batch 64; the paper prints 2e-6 x 64 = 1.28e-4)."""
    return cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.base_lr * cfg.batch_size


def save_config(cfg: TrainConfig, run_dir: Path) -> Path:
    import yaml

    text = "# optvq train: the resolved config of this run (`optvq train --config` accepts it)\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    path = run_dir / CONFIG_FILE
    atomic_write_text(path, text)
    return path


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The saved config of a run (for --resume)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"--resume {run_dir}: no {CONFIG_FILE} inside; not a run directory of `optvq train`")
    cfg = build_config(read_config_file(path))
    check_config(cfg)
    return cfg
