"""Shared fixtures and helpers: a tiny saved model, real-photo patches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SKIMAGE = Path(__import__("skimage").__file__).parent / "data"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")

# A shards run slowed to be SIGKILLed between two shards: argv model, INPUT, OUTPUT[, size].
_SLOW_SHARDS_RUN = """
import sys, time
from pathlib import Path
from optvq_cli.model import load_model
from optvq_cli.tokenize import extract, shard_batches

call = shard_batches.Encoder.__call__
def slow(self, pixels):  # time to be killed between two shards
    time.sleep(0.3)
    return call(self, pixels)
shard_batches.Encoder.__call__ = slow
model = load_model(sys.argv[1], device="cpu")
size = {"size": int(sys.argv[4])} if len(sys.argv) > 4 else {}
extract.encode_shards(model, Path(sys.argv[2]), Path(sys.argv[3]), shard_size=2, batch_size=1, workers=0, **size)
"""


def sigkill_a_shards_run(model_dir: Path, input: str | Path, out: Path, *size: str) -> None:
    """Start a slowed `encode_shards` (shards of 2 images) in a subprocess and SIGKILL it once its
    first shard is written: OUTPUT then holds shard 0 and not shard 2."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from optvq_cli.tokenize.shards import shard_name

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [sys.executable, "-c", _SLOW_SHARDS_RUN, str(model_dir), str(input), str(out), *size]
    proc = subprocess.Popen(args, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / shard_name(0)).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert (out / shard_name(0)).exists() and not (out / shard_name(2)).exists()


def photo_crops(n: int, size: int, grey: bool = False) -> np.ndarray:
    """n real-photo patches (skimage's test images), resized to size x size: (n, 3, s, s) or (n, s, s)."""
    out = []
    for i in range(n):
        im = Image.open(SKIMAGE / PHOTOS[i % len(PHOTOS)]).convert("L" if grey else "RGB")
        w, h = im.size
        k = i // len(PHOTOS)
        side = min(w, h) // 2
        left, top = (k * 37) % (w - side), (k * 53) % (h - side)
        a = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)))
        out.append(a if grey else a.transpose(2, 0, 1))
    return np.stack(out)


@pytest.fixture(scope="session")
def lpips_file(tmp_path_factory) -> Path:
    """LPIPS-VGG in optvq's layout with random VGG weights (the real ones need a download)."""
    import torch

    from optvq_cli.core.fileio import write_safetensors
    from optvq_cli.eval.perceptual import LPIPS

    torch.manual_seed(0)
    net = LPIPS("vgg")
    for k in range(5):
        getattr(net, f"lin{k}").data.fill_(0.1)
    path = tmp_path_factory.mktemp("lpips") / "lpips-vgg.safetensors"
    write_safetensors(path, net.state_dict())
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """build_model("tiny") with fixed weights, saved once per session (config.json + model.safetensors)."""
    import torch

    from optvq_cli.model import build_model, save_model

    torch.manual_seed(0)
    return save_model(build_model("tiny"), tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """A second tiny model (other weights, so another sha256) for the "another model" refusals."""
    import torch

    from optvq_cli.model import build_model, save_model

    torch.manual_seed(123)
    return save_model(build_model("tiny"), tmp_path_factory.mktemp("other-model"))


def _invoke_cli(*args):
    """(exit code, output) of `optvq ARGS` run in-process; a UserError counts as exit 1 with its message."""
    from typer.testing import CliRunner

    from optvq_cli.cli import app
    from optvq_cli.core.errors import UserError

    result = CliRunner().invoke(app, [str(a) for a in args])
    if isinstance(result.exception, UserError):
        return 1, str(result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture
def invoke():
    """The in-process CLI runner: ``invoke("eval", folder, "--json", path) -> (code, output)``."""
    return _invoke_cli


def preprocess_reference(path: Path, size: int = 32):
    """The model's protocol done independently: EXIF-less RGB on white, centre square of the shorter
    side, resized to size x size with Pillow's bicubic filter; (size, size, 3) uint8."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, im).convert("RGB")
    w, h = rgb.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return np.array(rgb.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC))


@pytest.fixture(name="preprocess_reference")
def preprocess_reference_fixture():
    """``preprocess_reference(path, size=32)``: what the model should see of an image, by hand."""
    return preprocess_reference
