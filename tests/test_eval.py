"""`optvq eval` without perceptual weights: preprocessing, pairing, PSNR/SSIM by hand, codebook health
recomputed independently, the JSON report, bad input, and 2 gloo processes agreeing with one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from optvq_cli import sources
from optvq_cli.eval.options import EvalOptions
from optvq_cli.eval.run import run_eval

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
TOP_KEYS = {
    "psnr_y",
    "psnr_rgb",
    "ssim",
    "lpips",
    "rfid",
    "codebook_usage",
    "perplexity",
    "count",
    "protocol",
    "per_head",
}


@pytest.fixture(autouse=True)
def _no_weights(tmp_path, monkeypatch):
    """An empty weights cache and no downloads: LPIPS and rFID are unavailable in this module."""
    monkeypatch.setenv("OPTVQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OPTVQ_OFFLINE", "1")


def _skimage(name: str) -> Image.Image:
    import skimage

    return Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", name)).convert("RGB")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Five real photos (two in a class folder), shrunk to keep the tests fast."""
    root = tmp_path_factory.mktemp("photos")
    (root / "cls").mkdir()
    for i, name in enumerate(PHOTOS):
        img = _skimage(name)
        img.thumbnail((96, 96))
        sub = root / "cls" if i >= 3 else root
        img.save(sub / (Path(name).stem + ".png"))
    return root


# -- preprocessing and pairing --------------------------------------------------------------------


def test_eval_sees_the_pixels_encode_sees(tmp_path, preprocess_reference):
    """Eval reads images with the model's protocol (centre square, then resized; transparency on
    white): a 60 x 30 image of three stripes keeps its green middle, and an RGBA image's
    transparent half is white, as `optvq encode` sees them."""
    from optvq_cli.eval.inputs import EvalImages

    arr = np.zeros((30, 60, 3), dtype=np.uint8)
    arr[:, :20, 0], arr[:, 20:40, 1], arr[:, 40:, 2] = 255, 255, 255
    Image.fromarray(arr).save(tmp_path / "stripes.png")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (255, 0, 0, 255)  # opaque red left half, transparent right half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    items = EvalImages(sources.find(tmp_path, unique=False).items, 16)
    _, half, err, _, _ = items[0]
    _, stripes, err2, _, _ = items[1]
    assert err == err2 == ""
    assert np.array_equal(half.permute(1, 2, 0).numpy(), preprocess_reference(tmp_path / "half.png", 16))
    assert np.array_equal(stripes.permute(1, 2, 0).numpy(), preprocess_reference(tmp_path / "stripes.png", 16))
    assert stripes[1, :, 8].min() == 255 and stripes[0, :, 8].max() == 0  # centre column is green
    assert half[:, :, 12].min() == 255  # the transparent half is white


def _flat(tmp: Path, name: str, values: dict[str, int]) -> Path:
    folder = tmp / name
    folder.mkdir()
    for stem, v in values.items():
        Image.fromarray(np.full((32, 32, 3), v, dtype=np.uint8)).save(folder / f"{stem}.png")
    return folder


def test_against_psnr_by_hand_both_protocols(tmp_path):
    orig = _flat(tmp_path, "orig", {"a": 100, "b": 50})
    other = _flat(tmp_path, "other", {"a": 110, "b": 50})  # b identical: 80 dB (the 1e-8 guard)
    rgb = 10 * math.log10(1 / ((10 / 255) ** 2 + 1e-8))
    y = 10 * math.log10(1 / ((219 * 10 / 255 / 255) ** 2 + 1e-8))  # Y moves by 219/255 of a grey step
    for protocol, first in (("rgb", rgb), ("optvq", y)):
        opts = EvalOptions(orig, against=other, protocol=protocol, resolution=32, metrics=("psnr", "ssim"))
        rep = run_eval(opts).report
        assert rep["count"] == 2
        # each key names its channel definition, whatever the protocol (which picks SSIM's channel)
        assert rep["psnr_rgb"] == pytest.approx((rgb + 80.0) / 2, rel=1e-7)  # inputs are float32
        assert rep["psnr_y"] == pytest.approx((y + 80.0) / 2, rel=1e-7)
        assert "psnr" not in rep and first in (rgb, y)
        # flat images: only the luminance term, (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * 255)^2;
        # grey levels are their own luma in both protocols
        c1 = (0.01 * 255) ** 2
        assert rep["ssim"] == pytest.approx(((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1) + 1) / 2, rel=1e-12)


def test_against_identical_folder_report_keys_and_protocol(photos, tmp_path, invoke):
    out = tmp_path / "r.json"
    code, text = invoke("eval", photos, "--against", photos, "--json", out, "--size", 64)
    assert code == 0, text
    rep = json.loads(out.read_text())
    assert TOP_KEYS <= set(rep)
    assert rep["count"] == len(PHOTOS)
    assert rep["psnr_y"] == rep["psnr_rgb"] == pytest.approx(80.0) and rep["ssim"] == pytest.approx(1.0)
    # no weights, offline: unavailable with a one-line fix, the rest still computed
    assert rep["lpips"] is None and rep["rfid"] is None
    for key in ("lpips", "rfid"):
        assert "optvq weights fetch" in rep["unavailable"][key] and "\n" not in rep["unavailable"][key]
    assert rep["codebook_usage"] is None and rep["per_head"] == []
    p = rep["protocol"]
    for key in ("resolution", "resize", "crop", "psnr_y", "psnr_rgb", "ssim", "lpips", "rfid"):
        assert key in p
    assert p["resolution"] == 64 and p["name"] == "optvq"
    assert p["lpips"]["net"] == "vgg" and p["lpips"]["weights_sha256"] is None
    assert (
        "YCbCr" in p["psnr_y"]["channel"] and "R, G and B" == p["psnr_rgb"]["channel"] and "YIQ" in p["ssim"]["channel"]
    )
    assert "unavailable" in text  # the table says so too


def test_against_pairs_by_relative_path_ignoring_extension(tmp_path, invoke):
    orig = _flat(tmp_path, "orig", {"a": 10, "b": 20})
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(np.full((32, 32, 3), 20, dtype=np.uint8)).save(other / "b.jpg", quality=100)
    Image.fromarray(np.full((32, 32, 3), 10, dtype=np.uint8)).save(other / "a.bmp")
    rep = run_eval(EvalOptions(orig, against=other, resolution=32, metrics=("psnr",))).report
    assert rep["psnr_y"] > 50  # each paired with its own grey level, not the other one
    (other / "b.jpg").unlink()
    code, text = invoke("eval", orig, "--against", other, "--size", 32)
    assert code == 1 and "no counterpart" in text and "b.png" in text


def _halves(folder: Path, name: str, left: int, right: int, size: tuple[int, int] = (40, 24)) -> Path:
    """A w x h image: grey level ``left`` in the left 30 columns, ``right`` in the rest."""
    folder.mkdir(exist_ok=True)
    w, h = size
    arr = np.full((h, w, 3), left, dtype=np.uint8)
    arr[:, 30:] = right
    Image.fromarray(arr).save(folder / name)
    return folder


def test_against_compares_at_the_images_own_size(tmp_path, invoke):
    """Without --resolution, 40 x 24 pairs are compared as they are: the 10 changed columns are a
    quarter of the pixels (a centre square resized to 256 would see another share)."""
    orig = _halves(tmp_path / "orig", "a.png", 100, 200)
    other = _halves(tmp_path / "other", "a.png", 100, 210)
    out = tmp_path / "r.json"
    code, text = invoke("eval", orig, "--against", other, "--protocol", "rgb", "--metrics", "psnr", "--json", out)
    assert code == 0, text
    rep = json.loads(out.read_text())
    mse = (10 / 255) ** 2 * 10 / 40  # 10 of 40 columns differ by 10 grey levels
    assert rep["psnr_rgb"] == pytest.approx(10 * math.log10(1 / (mse + 1e-8)), rel=1e-6)
    assert rep["protocol"]["resolution"] is None and rep["protocol"]["resize"] == "none"


def test_against_pairs_of_several_sizes_in_one_batch(tmp_path, invoke):
    """Pairs of their own sizes (40 x 24 and 32 x 32) share a batch; the sample grid's cells fit
    the largest image."""
    orig = _halves(tmp_path / "orig", "a.png", 100, 200)
    _halves(orig, "b.png", 100, 200, size=(32, 32))
    other = _halves(tmp_path / "other", "a.png", 100, 210)
    _halves(other, "b.png", 100, 200, size=(32, 32))
    out, grid = tmp_path / "r.json", tmp_path / "grid.png"
    code, text = invoke("eval", orig, "--against", other, "--metrics", "psnr", "--json", out, "--samples", grid)
    assert code == 0, text
    rep = json.loads(out.read_text())
    mse = (10 / 255) ** 2 * 10 / 40
    assert rep["count"] == 2
    assert rep["psnr_rgb"] == pytest.approx((10 * math.log10(1 / (mse + 1e-8)) + 80.0) / 2, rel=1e-6)
    assert Image.open(grid).size == (2 * 40 + 3 * 2, 2 * 32 + 3 * 2)


def test_against_refuses_pairs_of_different_sizes(tmp_path, invoke):
    """A 64 x 32 side-by-side against a 32 x 32 image: one line naming both files and sizes, no
    figure; with --resolution both are cropped and resized as asked."""
    orig = _halves(tmp_path / "orig", "a.png", 100, 200, size=(64, 32))
    other = _halves(tmp_path / "other", "a.png", 100, 200, size=(32, 32))
    out = tmp_path / "r.json"
    code, text = invoke("eval", orig, "--against", other, "--json", out)
    assert code == 1 and not out.exists()
    assert str(orig / "a.png") in text and str(other / "a.png") in text and "64x32" in text and "32x32" in text
    assert "\n" not in text.strip() and "--resolution" in text
    code, text = invoke("eval", orig, "--against", other, "--resolution", 32, "--json", out)
    assert code == 0, text


def test_unreadable_image_is_skipped_counted_and_exit_1(tmp_path, invoke):
    """Like encode: one line for the bad file, the rest evaluated, exit 1 at the end."""
    orig = _flat(tmp_path, "orig", {"a": 100, "b": 50})
    other = _flat(tmp_path, "other", {"a": 110, "b": 50, "c": 7})
    (orig / "c.png").write_bytes(b"not a png")
    out = tmp_path / "r.json"
    code, text = invoke("eval", orig, "--against", other, "--protocol", "rgb", "--metrics", "psnr", "--json", out)
    assert code == 1
    assert [line for line in text.splitlines() if "c.png" in line] == [
        f"skipped {orig / 'c.png'}: not an image Pillow can read"
    ]
    assert "1 image(s) skipped" in text
    rep = json.loads(out.read_text())
    assert rep["count"] == 2 and [f["path"] for f in rep["failed"]] == [str(orig / "c.png")]
    rgb = 10 * math.log10(1 / ((10 / 255) ** 2 + 1e-8))
    assert rep["psnr_rgb"] == pytest.approx((rgb + 80.0) / 2, rel=1e-6)  # a and b only


def test_limit_and_metric_selection(photos):
    rep = run_eval(EvalOptions(photos, against=photos, limit=2, resolution=32, metrics=("ssim",))).report
    assert rep["count"] == 2 and rep["psnr_y"] is None and rep["psnr_rgb"] is None and rep["ssim"] == pytest.approx(1.0)
    assert rep["metrics"] == ["ssim"]


def test_workers_give_the_same_figures(photos):
    opts = dict(against=photos, resolution=32, metrics=("psnr", "ssim"), batch_size=2)
    a = run_eval(EvalOptions(photos, workers=0, **opts)).report
    b = run_eval(EvalOptions(photos, workers=1, **opts)).report
    assert (a["psnr_y"], a["psnr_rgb"], a["ssim"], a["count"]) == (b["psnr_y"], b["psnr_rgb"], b["ssim"], b["count"])


# -- with a model ---------------------------------------------------------------------------------


def test_model_reconstruction_and_codebook_health(photos, tiny_model_dir, tmp_path, invoke, preprocess_reference):
    from optvq_cli.model import load_model

    out, plot, grid = tmp_path / "r.json", tmp_path / "usage.png", tmp_path / "grid.png"
    args = ["eval", photos, "--model", tiny_model_dir, "-b", 5, "--json", out, "--plot", plot, "--samples", grid]
    code, text = invoke(*args)
    assert code == 0, text
    rep = json.loads(out.read_text())
    assert TOP_KEYS <= set(rep)

    # Recompute independently with the model's own token path (encode_indices/decode_indices).
    model = load_model(str(tiny_model_dir), device="cpu")
    x = torch.stack(
        [
            torch.from_numpy(preprocess_reference(it.path)).permute(2, 0, 1)
            for it in sources.find(photos, unique=False).items
        ]
    ).float()
    x = x / 255
    idx = model.encode_indices(x * 2 - 1, assign="sinkhorn")  # one batch of 5, as with -b 5
    near = model.encode_indices(x * 2 - 1, assign="nearest")
    rec = ((model.decode_indices(idx) + 1) / 2).clamp(0, 1)
    n = model.quantize.n_codes
    used = torch.unique(idx).numel()
    assert rep["codebook_usage"] == pytest.approx(used / n)
    assert rep["assignment_agreement"] == pytest.approx(float((idx == near).double().mean()))
    assert rep["codebook"]["tokens"] == idx.numel()
    assert len(rep["per_head"]) == model.quantize.heads
    for h, head in enumerate(rep["per_head"]):
        assert head["codebook_usage"] == pytest.approx(torch.unique(idx[:, h]).numel() / n)
    assert 1.0 <= rep["perplexity"] <= used
    mse_rgb = ((rec.double() - x.double()) ** 2).mean(dim=(1, 2, 3))
    psnr_rgb = float((10 * torch.log10(1 / (mse_rgb + 1e-8))).mean())
    assert rep["psnr_rgb"] == pytest.approx(psnr_rgb, rel=1e-3)  # float32 encoder paths differ slightly
    assert rep["psnr_y"] != pytest.approx(psnr_rgb)  # Y, not RGB
    assert rep["protocol"]["assign"] == "sinkhorn"
    assert rep["protocol"]["model"]["sha256"] == model.sha256
    assert rep["protocol"]["resolution"] == 32  # the model's

    assert Image.open(plot).format == "PNG"
    g = Image.open(grid)
    assert g.size[1] == 2 * 32 + 3 * 2  # originals over reconstructions

    code, text = invoke(*args)  # outputs exist now
    assert code == 1 and "--overwrite" in text


def test_text_report_keeps_per_head_rows_in_the_codebook_table(photos, tiny_model_dir, invoke):
    """Per-head usage sits under its own column headers, not under the assignment agreement, which
    is one figure (a share of tokens) stated once, after the heads."""
    code, text = invoke("eval", photos, "--model", tiny_model_dir, "--metrics", "psnr,usage", "--limit", 2)
    assert code == 0, text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if "codebook usage" in line and "perplexity" in line)
    heads = [i for i, line in enumerate(lines) if "head " in line and "│" in line]
    agreement = [i for i, line in enumerate(lines) if "same code" in line]
    assert heads and len(agreement) == 1
    assert header < min(heads) and max(heads) < agreement[0]
    assert not any("perplexity" in lines[i] for i in heads)  # a column of its own, not a note


def test_help_describes_resolution_as_crop_then_resize(invoke):
    code, text = invoke("eval", "--help")
    assert code == 0
    flat = " ".join(text.replace("│", " ").split())
    assert "--resolution" in flat and "--size" in flat  # the old spelling keeps working
    assert flat.index("centre square") < flat.index("resized to N x N")
    assert "Shorter side resized" not in flat


def test_no_model_means_the_bundled_default(photos, tmp_path, invoke):
    out = tmp_path / "r.json"
    code, text = invoke("eval", photos, "--metrics", "psnr,usage", "--limit", 2, "--json", out)
    assert code == 0, text
    rep = json.loads(out.read_text())
    assert rep["protocol"]["model"]["ref"] == "default" and rep["count"] == 2
    bundled = json.loads((Path(__file__).parents[1] / "checkpoints/default/config.json").read_text())
    assert rep["protocol"]["model"]["n_codes"] == bundled["model"]["n_codes"]


def test_bad_input_is_one_line(photos, tmp_path, tiny_model_dir, invoke):
    cases = [
        (["eval", tmp_path / "nope", "--against", photos], "not a folder"),
        (["eval", photos, "--model", tiny_model_dir, "--against", photos], "not both"),
        (["eval", photos, "--against", photos, "--metrics", "psnr,bogus"], "bogus"),
        (["eval", photos, "--against", photos, "--metrics", "usage"], "needs --model"),
        (["eval", photos, "--model", tiny_model_dir, "--size", 30], "multiple"),
        (["eval", photos, "--against", photos, "--protocol", "srgb"], "--protocol"),
    ]
    for args, needle in cases:
        code, text = invoke(*args)
        assert code != 0 and needle in text, (args, text)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    code, text = invoke("eval", broken, "--against", broken)
    assert code == 1 and "x.png" in text and "cannot read" in text


@pytest.mark.slow
def test_cli_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "optvq_cli", "eval", str(tmp_path), "--against", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env={**os.environ, "OPTVQ_OFFLINE": "1"},
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "--against" in proc.stderr


@pytest.mark.slow
def test_two_gloo_processes_report_what_one_does(photos, tiny_model_dir, tmp_path):
    common = ["eval", str(photos), "--model", str(tiny_model_dir), "-b", "2", "--metrics", "psnr,ssim,usage"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, "-m", "optvq_cli", *common, "--json", str(one)], check=True, env=env)
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*run, "-m", "optvq_cli", *common, "--json", str(two)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["protocol"]["world_size"] == 2 and a["protocol"]["world_size"] == 1
    assert a["count"] == b["count"] == len(PHOTOS)
    for key in ("psnr_y", "psnr_rgb", "ssim", "codebook_usage", "perplexity", "assignment_agreement"):
        assert a[key] == pytest.approx(b[key], rel=1e-9), key
    assert a["codebook"]["most_used"] == b["codebook"]["most_used"]


@pytest.mark.slow
def test_two_gloo_processes_gather_the_skipped_images(photos, tmp_path):
    """An unreadable image met by the second process is listed in the first one's report."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(photos, data)
    (data / "cls" / "a_broken.png").write_bytes(b"not a png")  # third in sorted order: batch 1, rank 1
    out = tmp_path / "r.json"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "optvq_cli"]
    args = ["eval", str(data), "--against", str(data), "-b", "2", "--metrics", "psnr", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPTVQ_OFFLINE": "1"}
    proc = subprocess.run([*run, *args], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "1 image(s) skipped" in proc.stderr, proc.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["protocol"]["world_size"] == 2 and rep["count"] == len(PHOTOS)
    assert [f["path"] for f in rep["failed"]] == [str(data / "cls" / "a_broken.png")]
