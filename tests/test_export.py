"""`optvq export` and `optvq info` through the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from optvq_cli.cli import app
from optvq_cli.model import build_model, load_model, save_model

runner = CliRunner()


def photos(size_hw=(32, 32), names=("astronaut.png", "coffee.png")) -> torch.Tensor:
    """Real photos from scikit-image's installed data, (B, 3, H, W) in [-1, 1]."""
    import skimage

    out = []
    for name in names:
        img = Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB")
        arr = np.asarray(img.resize((size_hw[1], size_hw[0]))).copy()
        out.append(torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_model(build_model("tiny"), tmp_path / "tiny", metadata={"metrics": {"rFID": 1.23}})


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_export_hf_folder(tiny_dir, tmp_path):
    out = tmp_path / "export"
    r = invoke("export", tiny_dir, out)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    doc = json.loads((out / "config.json").read_text())
    assert doc["weights_sha256"] == sha(out / "model.safetensors")
    assert doc["metadata"]["source_sha256"] == sha(tiny_dir / "model.safetensors")
    card = (out / "README.md").read_text()
    assert doc["weights_sha256"] in card and "rFID" in card and str(tiny_dir.resolve()) in card
    x = photos()
    assert torch.equal(
        load_model(out, device="cpu").encode_indices(x), load_model(tiny_dir, device="cpu").encode_indices(x)
    )
    # no leftovers next to OUT, and OUT is never overwritten silently
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "tiny"]
    r = invoke("export", tiny_dir, out)
    assert r.exit_code == 1 and "--overwrite" in r.output
    r = invoke("export", tiny_dir, out, "--overwrite", "--dtype", "bf16")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["weights_dtype"] == "bf16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "tiny"]


def test_export_programs_match_the_model(tiny_dir, tmp_path):
    out = tmp_path / "programs"
    r = invoke("export", tiny_dir, out, "--format", "torchscript", "--format", "torch-export", "--size", "32")
    assert r.exit_code == 0, r.output
    assert "0/256 indices differ" in r.output and "largest |difference|" in r.output
    assert {p.name for p in out.iterdir()} == {
        "encode_indices.pt",
        "decode_indices.pt",
        "encode_indices.pt2",
        "decode_indices.pt2",
    }
    model = load_model(tiny_dir, device="cpu")
    x = photos((48, 32))  # another size than the export's example
    want_idx = model.encode_indices(x, assign="nearest")
    want_img = model.decode_indices(want_idx)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ts_enc, ts_dec = (
            torch.jit.load(str(out / "encode_indices.pt")),
            torch.jit.load(str(out / "decode_indices.pt")),
        )
    ex_enc = torch.export.load(str(out / "encode_indices.pt2")).module()
    ex_dec = torch.export.load(str(out / "decode_indices.pt2")).module()
    for enc, dec in ((ts_enc, ts_dec), (ex_enc, ex_dec)):
        with torch.no_grad():
            assert torch.equal(enc(x), want_idx)
            torch.testing.assert_close(dec(want_idx), want_img, rtol=1e-4, atol=1e-5)


def test_export_onnx(tiny_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    r = invoke("export", tiny_dir, out, "--format", "onnx")
    assert r.exit_code == 0, r.output
    model = load_model(tiny_dir, device="cpu")
    x = photos((32, 48))
    idx = model.encode_indices(x, assign="nearest")
    enc = ort.InferenceSession(str(out / "encode_indices.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(out / "decode_indices.onnx"), providers=["CPUExecutionProvider"])
    got = enc.run(None, {"images": x.numpy()})[0]
    assert np.array_equal(got, idx.numpy())
    img = dec.run(None, {"indices": idx.numpy()})[0]
    np.testing.assert_allclose(img, model.decode_indices(idx).numpy(), rtol=1e-4, atol=1e-5)


def test_export_from_upstream_training_checkpoint(tmp_path):
    torch.manual_seed(5)
    original = build_model("cifar10")
    sd = {"_orig_mod." + k: v for k, v in original.state_dict().items()}
    torch.save({"model": sd, "step": 10}, tmp_path / "checkpoint.pth")
    out = tmp_path / "converted"
    r = invoke("export", "--from-upstream", tmp_path / "checkpoint.pth", out)
    assert r.exit_code == 0, r.output
    model = load_model(out, device="cpu")
    assert model.metadata["converted_from"] == "checkpoint.pth"
    x = photos()
    assert torch.equal(model.encode_indices(x), original.eval().encode_indices(x))


def test_push_to_hub_uploads_the_folder(tiny_dir, tmp_path, monkeypatch):
    calls = []

    def fake_push(folder, repo_id, private=False, message=None):
        calls.append((Path(folder), repo_id, private, sorted(p.name for p in Path(folder).iterdir())))
        return f"https://huggingface.co/{repo_id}"

    import optvq_cli.checkpoints.hub

    monkeypatch.setattr(optvq_cli.checkpoints.hub, "push", fake_push)
    out = tmp_path / "to-push"
    r = invoke("export", tiny_dir, out, "--push-to-hub", "me/optvq-tiny", "--private")
    assert r.exit_code == 0, r.output
    assert calls == [(out, "me/optvq-tiny", True, ["README.md", "config.json", "model.safetensors"])]
    r = invoke("export", tiny_dir, tmp_path / "x", "--format", "torchscript", "--push-to-hub", "me/x")
    assert r.exit_code == 1 and "--format hf" in r.output


def test_export_flag_errors(tiny_dir, tmp_path):
    r = invoke("export", tiny_dir, tmp_path / "a", "--format", "tflite")
    assert r.exit_code == 1 and "--format tflite" in r.output
    r = invoke("export", tiny_dir, tmp_path / "b", "--format", "torchscript", "--dtype", "fp16")
    assert r.exit_code == 1 and "--dtype" in r.output
    r = invoke("export", tiny_dir, tmp_path / "c", "--format", "torchscript", "--size", "30")
    assert r.exit_code == 1 and "multiple" in r.output
    assert not any(p.name.startswith((".c", "c")) for p in tmp_path.iterdir())


def test_info_text_and_json(tiny_dir):
    r = invoke("info", tiny_dir, "--size", "64x32")
    assert r.exit_code == 0, r.output
    assert "f = 4" in r.output and "64x32 -> 2 heads x 16 x 8 = 256 tokens" in r.output
    assert sha(tiny_dir / "model.safetensors") in r.output
    lines = dict(line.split("  ", 1) for line in r.output.splitlines())  # key, padding, value
    assert lines["source"].strip() == str(tiny_dir.resolve()) and lines["metrics"].strip() == "{'rFID': 1.23}"
    assert lines["weights dtype"].strip() == "fp32"  # the provenance the help promises
    r = invoke("info", tiny_dir, "--json")
    d = json.loads(r.output)
    model = load_model(tiny_dir, device="cpu")
    assert d["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert d["parameters"]["encoder"] == sum(p.numel() for p in model.encoder.parameters())
    assert (d["downsample"], d["heads"], d["n_codes"], d["code_dim"]) == (4, 2, 64, 4)
    assert d["token_grid"] == [2, 8, 8] and d["sha256"] == sha(tiny_dir / "model.safetensors")


def test_info_of_a_preset():
    r = invoke("info", "imagenet-f16-h8", "--size", "256")
    assert r.exit_code == 0, r.output
    assert "preset:imagenet-f16-h8" in r.output and "8 heads x 16 x 16 = 2048 tokens" in r.output
    assert "16384 codes x 32 dims" in r.output


@pytest.mark.parametrize("case", ["truncated", "missing", "no-weights"])
def test_info_bad_checkpoint_is_one_line(tiny_dir, tmp_path, case):
    w = tiny_dir / "model.safetensors"
    if case == "truncated":
        w.write_bytes(w.read_bytes()[:200])
        ref = w
    elif case == "missing":
        ref = tmp_path / "nope"
    else:
        w.unlink()
        ref = tiny_dir
    r = invoke("info", ref)
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert "Traceback" not in r.output


# -- identity: the same model, the same weights file ----------------------------------------------
def test_re_export_keeps_the_identity(tiny_dir, tmp_path):
    """Exporting twice, and exporting an export, writes the same weights file: tokens encoded with
    one decode with the others. A half-precision export stays half precision when re-exported."""
    digests = []
    for i, src in enumerate([tiny_dir, tiny_dir, tmp_path / "e0"]):
        r = invoke("export", src, tmp_path / f"e{i}")
        assert r.exit_code == 0, r.output
        digests.append(sha(tmp_path / f"e{i}" / "model.safetensors"))
        assert f"sha256: {digests[-1]}" in r.output
    assert digests == [sha(tiny_dir / "model.safetensors")] * 3
    assert invoke("export", tiny_dir, tmp_path / "h0", "--dtype", "fp16").exit_code == 0
    r = invoke("export", tmp_path / "h0", tmp_path / "h1")
    assert r.exit_code == 0 and "(fp16)" in r.output, r.output
    assert sha(tmp_path / "h1" / "model.safetensors") == sha(tmp_path / "h0" / "model.safetensors") != digests[0]


# -- what export writes, and what it refuses to replace ------------------------------------------
def test_exported_files_get_the_usual_modes(tiny_dir, tmp_path):
    old = os.umask(0o022)
    try:
        r = invoke("export", tiny_dir, tmp_path / "new" / "out", "--format", "hf", "--format", "torchscript")
        save_model(build_model("tiny"), tmp_path / "saved")
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    out = tmp_path / "new" / "out"
    for folder in (tmp_path / "new", out, tmp_path / "saved"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    files = [*out.iterdir(), *(tmp_path / "saved").iterdir()]
    assert len(files) == 7
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def _one_error_line(r) -> str:
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.output, r.output
    return lines[0]


def test_overwrite_replaces_only_an_earlier_export(tiny_dir, tmp_path, monkeypatch):
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "thesis.tex").write_text("x")
    line = _one_error_line(invoke("export", tiny_dir, user, "--overwrite"))
    assert "does not write" in line and (user / "thesis.tex").read_text() == "x"
    # an earlier export with a stray file in it is refused too; without it, it is replaced
    assert invoke("export", tiny_dir, tmp_path / "prev").exit_code == 0
    (tmp_path / "prev" / "notes.txt").write_text("mine")
    _one_error_line(invoke("export", tiny_dir, tmp_path / "prev", "--overwrite"))
    (tmp_path / "prev" / "notes.txt").unlink()
    r = invoke("export", tiny_dir, tmp_path / "prev", "--overwrite", "--format", "torchscript")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "prev").iterdir()) == ["decode_indices.pt", "encode_indices.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev", "tiny", "userdir"]  # nothing left aside
    # the current folder, or one above it, is never OUT
    monkeypatch.chdir(tmp_path / "prev")
    for out in (".", "..", "/"):
        assert "current folder" in _one_error_line(invoke("export", tiny_dir, out, "--overwrite"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev", "tiny", "userdir"]


def test_out_under_a_file_is_one_line(tiny_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert "afile is a file" in _one_error_line(invoke("export", tiny_dir, tmp_path / "afile" / "sub"))
    assert "is a file" in _one_error_line(invoke("export", tiny_dir, tmp_path / "afile", "--overwrite"))
    r = invoke("export", tiny_dir, tmp_path / "missing" / "parents" / "out")  # parents are created
    assert r.exit_code == 0, r.output
    assert (tmp_path / "missing" / "parents" / "out" / "model.safetensors").is_file()


def test_torch_export_fallback_is_reported(tiny_dir, tmp_path, monkeypatch):
    real = torch.export.export

    def no_dynamic(module, args, dynamic_shapes=None, **kw):
        if dynamic_shapes is not None:
            raise RuntimeError("cannot keep it dynamic\nsecond line")
        return real(module, args, **kw)

    monkeypatch.setattr(torch.export, "export", no_dynamic)
    r = invoke("export", tiny_dir, tmp_path / "p", "--format", "torch-export", "--size", "16")
    assert r.exit_code == 0, r.output
    assert r.output.count("warning: takes only inputs of shape") == 2
    assert "(2, 3, 16, 16)" in r.output and "(2, 2, 4, 4)" in r.output and "cannot keep it dynamic" in r.output


# -- info: which model is described ---------------------------------------------------------------
def test_info_falls_back_to_a_preset_only_when_nothing_has_the_name(tiny_dir, tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = invoke("info", "tiny", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["described"] == "preset"
    # flags are not ignored for a preset
    assert "--device" in _one_error_line(invoke("info", "tiny", "--device", "cuda:99"))
    assert "--revision" in _one_error_line(invoke("info", "tiny", "--revision", "v1"))
    # a folder of that name is what every command would load: it is described, and says so
    monkeypatch.chdir(tmp_path)
    r = invoke("info", "tiny")
    assert r.exit_code == 0, r.output
    assert f"checkpoint {tiny_dir.resolve()}" in r.output and "optvq info preset:tiny" in r.output
    assert sha(tiny_dir / "model.safetensors") in r.output
    r = invoke("info", "preset:tiny")
    assert r.exit_code == 0 and "preset:tiny (untrained" in r.output, r.output
    # a broken folder of that name is an error, not the preset
    (tiny_dir / "model.safetensors").write_bytes(b"12345")
    assert "truncated" in _one_error_line(invoke("info", "tiny"))


def test_info_of_nothing_names_the_model_and_the_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _one_error_line(invoke("info", "nope"))
    assert "model nope:" in line and "--model" not in line and "imagenet-f16-h4" in line
    line = _one_error_line(invoke("export", "nope", tmp_path / "out"))
    assert "model nope:" in line and "--model" not in line


def test_info_grid_after_padding_and_fields_of_the_architecture(tiny_dir):
    r = invoke("info", tiny_dir, "--size", "63")
    assert r.exit_code == 0, r.output
    assert "63x63 (padded to 64x64, a multiple of 4, as encode does) -> 2 heads x 16 x 16 = 512 tokens" in r.output
    assert "smaller than one token" in _one_error_line(invoke("info", tiny_dir, "--size", "1x1"))
    d = json.loads(invoke("info", tiny_dir, "--json").output)
    assert "cnn_widths" in d["config"] and "ch_mult" not in d["config"] and "z_channels" not in d["config"]
    assert "ch_mult" not in json.loads((tiny_dir / "config.json").read_text())["model"]


def test_from_upstream_refusal_is_one_plain_line(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"encoder.x": torch.zeros(1)}, "cfg": Path("/etc")}, path)  # an object besides tensors
    r = invoke("export", "--from-upstream", path, tmp_path / "out")
    assert r.exit_code == 1
    line = r.output.strip()
    assert "\n" not in line and "\x1b" not in line, r.output
    assert line.startswith(f"error: {path}: holds a Python object (pathlib.") and "never unpickles" in line
    assert "weights_only" not in line  # torch's advice to unpickle it is not passed on
    path.write_bytes(path.read_bytes()[:200])  # truncated
    r = invoke("export", "--from-upstream", path, tmp_path / "out")
    assert r.exit_code == 1 and "\n" not in r.output.strip() and "truncated or corrupt" in r.output


def test_model_help_names_safetensors_files():
    for command in ("export", "info"):
        r = invoke(command, "--help")
        assert r.exit_code == 0 and ".safetensors file" in " ".join(r.output.split())


@pytest.mark.slow
def test_cli_refuses_nan_weights_and_ambiguous_names(tiny_dir, tmp_path):
    import subprocess
    import sys

    from optvq_cli.model.optvq import Provenance

    model = load_model(tiny_dir, device="cpu")
    with torch.no_grad():
        model.quantize.embedding.weight[3, 0] = float("nan")
    model.provenance = Provenance()
    save_model(model, tmp_path / "nan-model")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = [sys.executable, "-m", "optvq_cli", "info"]
    r = subprocess.run([*run, str(tmp_path / "nan-model")], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "tensor quantize.embedding.weight holds 1 NaN" in r.stderr and "model.safetensors" in r.stderr
    (tmp_path / "default").symlink_to(tiny_dir, target_is_directory=True)
    r = subprocess.run([*run, "default"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 1 and "./default" in r.stderr and "bundled:default" in r.stderr, r.stderr
    r = subprocess.run([*run, "./default", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["sha256"] == sha(tiny_dir / "model.safetensors")
