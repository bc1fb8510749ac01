"""The named presets: every training recipe has its model, the command line lists them all, and the
photo recipe (the bundled default model's) resolves to what its model card says."""

from __future__ import annotations

from optvq_cli.cli import train as cli_train
from optvq_cli.model import PRESETS
from optvq_cli.train.config import RECIPES, resolve_config


def test_every_recipe_has_a_model_and_is_listed_by_the_cli():
    listed = cli_train._PRESET.help
    for name in RECIPES:
        assert name in PRESETS, name
        assert f" {name}," in listed or f" {name}." in listed, (name, listed)


def test_photo_recipe():
    cfg = resolve_config("photo")
    model = PRESETS["photo"]
    # f = 4 at 256 px: 4 heads x 64 x 64 tokens of 1024 codes, as the paper's CIFAR-10 quantizer
    assert (model.downsample, model.resolution, model.n_codes, model.heads, model.code_dim) == (4, 256, 1024, 4, 2)
    assert cfg.data.size % model.downsample == 0 and cfg.data.size < model.resolution
    assert cfg.loss.perceptual > 0 and cfg.loss.perceptual_net == "alex" and cfg.ema > 0
    assert cfg.loss.l1 > 0 and cfg.loss.l2 > 0 and cfg.loss.gan == 0
    assert cfg.model == {"assign": "sinkhorn"} and cfg.quantizer.method == "optvq"


def test_the_bundled_default_model_is_the_photo_preset():
    """What the model card says: the `photo` architecture, trained by `optvq train` with that
    preset, small enough to ship (<= 25 MB), and its weights the file the config records."""
    import hashlib
    import json
    from pathlib import Path

    folder = Path(__file__).parents[1] / "checkpoints" / "default"
    doc = json.loads((folder / "config.json").read_text())
    weights = (folder / "model.safetensors").read_bytes()
    assert doc["model"] == PRESETS["photo"].to_dict()
    assert doc["metadata"]["preset"] == "photo" and doc["metadata"]["trained_with"] == "optvq train"
    assert len(weights) <= 25 * 2**20 and hashlib.sha256(weights).hexdigest() == doc["weights_sha256"]
