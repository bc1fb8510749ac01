"""The GPU speed features (bf16 autocast, channels-last, torch.compile, pinned loaders, TF32 policy,
gradient checkpointing, the memory column) on the CPU, and the CUDA paths (``-m cuda``) where a GPU is."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import photo_crops
from torch import nn

from optvq_cli.core import device as G
from optvq_cli.core.errors import UserError
from optvq_cli.model import build_model, load_model
from optvq_cli.model.vqgan import ResnetBlock, set_checkpointing
from optvq_cli.train import loop, metrics
from optvq_cli.train.config import parse_sets, resolve_config
from optvq_cli.train.data import ArrayImages, Splits
from optvq_cli.train.loop import Hooks, Trainer

QUIET = dict(log=lambda m: None)


def _splits(n_train: int = 8, size: int = 16) -> Splits:
    px = torch.from_numpy(photo_crops(n_train + 4, size))
    return Splits(ArrayImages(px[:n_train], "train"), ArrayImages(px[n_train:], "val"), "array", "photos")


def _cfg(preset: str = "tiny-vqgan", steps: int = 2, **sets):
    base = {"steps": str(steps), "log_every": "1", "val_every": "0", "ckpt_every": "0", "batch_size": "4"}
    base |= {"loss.gan": "0", "loss.perceptual": "0", "quantizer.init": "none"}
    return resolve_config(preset, sets=parse_sets([f"{k}={v}" for k, v in {**base, **sets}.items()]))


def _trainer(tmp_path: Path, cfg, name: str = "run", losses: list | None = None) -> Trainer:
    hooks = Hooks(lambda step, terms, idx: losses.append(terms)) if losses is not None else None
    return Trainer(cfg, tmp_path / name, torch.device("cpu"), splits=_splits(size=cfg.data.size), hooks=hooks, **QUIET)


def _run(tmp_path: Path, cfg, name: str = "run") -> list[dict[str, float]]:
    losses: list[dict[str, float]] = []
    t = _trainer(tmp_path, cfg, name, losses)
    try:
        t.fit()
    finally:
        t.close()
    return losses


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


# ---------------------------------------------------------------- bf16 autocast


@pytest.mark.slow
def test_bf16_runs_model_lpips_and_discriminator_in_bf16_and_the_quantizer_in_fp32(tmp_path, lpips_file):
    full = {"loss.perceptual": "3", "loss.gan": "1", "loss.disc_start": "0", "loss.disc_layers": "2"}
    cfg = _cfg(amp="bf16", **full, **{"loss.lpips_weights": str(lpips_file), "data.size": "32"})
    losses: list = []
    t = _trainer(tmp_path, cfg, losses=losses)
    seen: dict[str, set] = {}

    def record(name):
        def hook(m, args, out):
            out = out[0] if isinstance(out, tuple) else out  # the quantizer: (z_q, loss, indices)
            seen.setdefault(name, set()).add((args[0].dtype, out.dtype))

        return hook

    _first_conv(t.model.encoder).register_forward_hook(record("encoder"))
    _first_conv(t.model.decoder).register_forward_hook(record("decoder"))
    _first_conv(t.perceptual.lpips.features).register_forward_hook(record("lpips"))
    _first_conv(t.disc).register_forward_hook(record("disc"))
    t.model.quantize.register_forward_hook(record("quantizer"))
    t.fit()
    t.close()
    for name in ("encoder", "decoder", "lpips", "disc"):
        assert {out for _, out in seen[name]} == {torch.bfloat16}, name
    assert seen["quantizer"] == {(torch.float32, torch.float32)}
    assert len(losses) == 2 and all(math.isfinite(v) for terms in losses for v in terms.values())
    assert {"perceptual", "gan", "disc"} <= set(losses[0])


@pytest.mark.slow
def test_fp32_runs_no_autocast(tmp_path):
    t = _trainer(tmp_path, _cfg(amp="fp32"))
    seen = []
    _first_conv(t.model.decoder).register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    t.fit()
    t.close()
    assert set(seen) == {torch.float32}


# ---------------------------------------------------------------- channels-last


@pytest.mark.slow
def test_channels_last_trains_in_that_layout_to_the_same_losses(tmp_path):
    plain = _run(tmp_path, _cfg(amp="fp32"), "plain")
    got: list = []
    t = _trainer(tmp_path, _cfg(amp="fp32", channels_last="true"), "cl", got)
    w = t.model.encoder.conv_in.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    layouts = []
    t.model.encoder.conv_in.register_forward_hook(
        lambda m, a, out: layouts.append(a[0].is_contiguous(memory_format=torch.channels_last) and a[0].shape[1] > 1)
    )
    t.fit()
    t.close()
    assert layouts and all(layouts)
    saved = load_model(tmp_path / "cl" / "model", device="cpu")  # the layout is not part of the weights
    assert set(saved.state_dict()) == set(build_model("tiny-vqgan").state_dict())
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in plain], rel=1e-4)


def test_channels_last_helper_leaves_values_and_other_tensors_alone():
    x = torch.randn(2, 3, 4, 5)
    y = G.channels_last(x, True)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, y)
    assert G.channels_last(x, False) is x
    v = torch.randn(3, 4)
    assert G.channels_last(v, True) is v


# ---------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_compile_keeps_state_dict_names_and_losses(tmp_path):
    plain = _run(tmp_path, _cfg(amp="fp32"), "plain")
    t = _trainer(tmp_path, _cfg(amp="fp32", compile="true", compile_backend="aot_eager"), "compiled")
    assert G.is_compiled(t.model.encoder) and G.is_compiled(t.model.decoder)
    assert set(t.model.state_dict()) == set(build_model("tiny-vqgan").state_dict())
    got: list = []
    t.hooks.on_step = lambda s, terms, idx: got.append(terms)
    t.fit()
    t.close()
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    load_model(tmp_path / "compiled" / "model", device="cpu")  # names of the plain module


def test_compile_off_is_a_no_op_and_a_bad_backend_is_named():
    m = nn.Conv2d(1, 1, 1)
    assert G.compile_module(m, False) is m and not G.is_compiled(m)
    with pytest.raises(UserError, match="compile backend tvm"):
        G.compile_module(m, True, "tvm")
    with pytest.raises(UserError, match="compile_backend"):
        _cfg(compile_backend="tvm")


# ---------------------------------------------------------------- pinned loaders, non-blocking copies


def test_loaders_pin_memory_for_cuda_only(tmp_path, monkeypatch):
    assert G.pin_memory_for(torch.device("cuda", 0)) and not G.pin_memory_for(torch.device("cpu"))
    asked = []
    real = loop.make_loader
    monkeypatch.setattr(loop.G, "pin_memory_for", lambda device: device.type == "cpu")  # as if the CPU were CUDA
    monkeypatch.setattr(loop, "make_loader", lambda *a: asked.append(a[3]) or real(*a[:3]))
    _run(tmp_path, _cfg(amp="fp32", steps=1))
    assert asked == [True]


def test_to_device_copies_without_blocking_in_the_asked_layout():
    x = torch.randn(2, 3, 4, 4)
    y = G.to_device(x, torch.device("cpu"), channels_last_format=True)
    assert torch.equal(x, y) and y.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- TF32 policy


def test_no_tf32_switches_both_off_and_restores():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    G.set_tf32(True)
    try:
        with G.no_tf32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_training_on_the_cpu_leaves_the_tf32_switches_alone(tmp_path):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    _run(tmp_path, _cfg(amp="fp32", steps=1, tf32="false"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


# ---------------------------------------------------------------- gradient checkpointing


def _loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    rec, q_loss, _ = model(x, assign="nearest")
    loss = (rec - x).abs().mean() + q_loss
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_gives_the_same_loss_and_gradients_and_recomputes():
    torch.manual_seed(0)
    model = build_model("tiny-vqgan").train()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    loss0, grads0 = _loss_and_grads(model, x)
    calls = []
    block = next(m for m in model.encoder.modules() if isinstance(m, ResnetBlock))
    forward = block.forward
    block.forward = lambda h: calls.append(1) or forward(h)  # counts recomputations too (hooks do not)
    _loss_and_grads(model, x)
    plain_calls = len(calls)
    assert set_checkpointing(model, True) == 2  # the encoder and the decoder
    calls.clear()
    loss1, grads1 = _loss_and_grads(model, x)
    assert len(calls) == 2 * plain_calls  # the forward, then the recomputation in backward
    assert torch.allclose(loss0, loss1, atol=1e-5, rtol=0)
    assert grads0.keys() == grads1.keys()
    for k in grads0:
        assert torch.allclose(grads0[k], grads1[k], atol=1e-5, rtol=1e-5), k
    with torch.no_grad():  # no gradients: nothing to save, nothing recomputed
        calls.clear()
        model(x, assign="nearest")
        assert len(calls) == plain_calls


@pytest.mark.slow
def test_checkpointing_config_key_trains_the_full_recipe(tmp_path, lpips_file):
    full = {"loss.perceptual": "3", "loss.gan": "1", "loss.disc_start": "0", "loss.disc_layers": "2"}
    cfg = _cfg(amp="fp32", checkpointing="true", **full, **{"loss.lpips_weights": str(lpips_file), "data.size": "32"})
    got: list = []
    t = _trainer(tmp_path, cfg, losses=got)
    assert t.model.encoder.checkpointing and t.model.decoder.checkpointing
    t.fit()  # the adaptive weight's extra backward passes go through the recomputed blocks too
    t.close()
    assert len(got) == 2 and all(math.isfinite(v) for terms in got for v in terms.values()) and "gan" in got[0]
    with pytest.raises(UserError, match="checkpointing applies to the VQGAN presets"):
        _cfg("tiny", checkpointing="true")


# ---------------------------------------------------------------- the memory column


def test_training_rows_have_no_gpu_memory_on_the_cpu(tmp_path):
    import json

    assert G.peak_memory_gb(torch.device("cpu")) is None
    _run(tmp_path, _cfg(amp="fp32", steps=1))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("gpu_mem_gb" not in r for r in rows)


def test_training_rows_carry_the_gpu_memory_when_there_is_one(monkeypatch):
    monkeypatch.setattr(metrics, "peak_memory_gb", lambda device: 1.23456)
    w = metrics.Window(4, torch.device("cpu"), 0)
    w.add_terms({"loss": torch.tensor(1.0)})
    assert w.flush(1, 10, 1e-3, 0)["gpu_mem_gb"] == 1.235


# ---------------------------------------------------------------- on a CUDA GPU (pytest -m cuda)


GPU = torch.device("cuda", 0)
BACKEND = "inductor"  # the GPU compiler (the CPU tests use aot_eager)


def on_cuda(fn):
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn))


def _near_ties(a: torch.Tensor, b: torch.Tensor, score: torch.Tensor, rel: float) -> bool:
    """Where two assignments differ, the two chosen entries of ``score`` (per row) are within ``rel``."""
    rows = (a != b).nonzero().flatten()
    sa, sb = score[rows, a[rows]], score[rows, b[rows]]
    return bool(((sa - sb).abs() <= rel * torch.maximum(sa.abs(), sb.abs()).clamp_min(1e-30)).all())


@on_cuda
def test_cuda_nearest_and_sinkhorn_pick_the_cpus_codes():
    from optvq_cli.quant.assign import nearest_assign, sinkhorn_assign, sinkhorn_plans

    g = torch.Generator().manual_seed(0)
    x, codes = torch.randn(4096, 64, generator=g), torch.randn(1024, 64, generator=g)
    xc, cc = x.to(GPU), codes.to(GPU)
    with G.no_tf32():
        near = (nearest_assign(x, codes), nearest_assign(xc, cc).cpu())
        dense = (sinkhorn_assign(x, codes), sinkhorn_assign(xc, cc).cpu())
        stream = sinkhorn_assign(xc, cc, chunk_size=128).cpu()
    assert (near[0] == near[1]).float().mean() >= 0.999
    assert _near_ties(near[0], near[1], -torch.cdist(x.double(), codes.double()), 1e-5)
    *_, plan = sinkhorn_plans(x.double(), codes.double(), 10.0, 5)
    for got in (dense[1], stream):
        assert (got == dense[0]).float().mean() >= 0.999
        assert _near_ties(dense[0], got, plan, 1e-3)


@on_cuda
def test_cuda_bf16_encode_tokens_agree_with_fp32():
    model = load_model("default", device=GPU)
    x = (torch.from_numpy(photo_crops(32, 64)).float() / 127.5 - 1).to(GPU)
    with G.no_tf32():
        fp32 = model.encode_indices(x)
        model.compute_dtype = torch.bfloat16
        bf16 = model.encode_indices(x)
    share = float((fp32 == bf16).float().mean())
    print(f"bf16 vs fp32 token agreement on CUDA: {share:.4f}")
    assert share >= 0.9  # 0.967 on the CPU's bf16 for the same images


def _cuda_run(tmp_path: Path, lpips_file: Path, name: str, **sets) -> Trainer:
    full = {"loss.perceptual": "3", "loss.gan": "1", "loss.disc_start": "0", "loss.disc_layers": "2"}
    cfg = _cfg(
        device=str(GPU), ckpt_every="2", **full, **{"loss.lpips_weights": str(lpips_file), "data.size": "32"}, **sets
    )
    t = Trainer(cfg, tmp_path / name, GPU, splits=_splits(size=32), **QUIET)
    t.losses = []
    t.hooks.on_step = lambda step, terms, idx: t.losses.append(terms["loss"])
    t.fit()
    t.close()
    return t


@on_cuda
def test_cuda_two_steps_of_tiny_vqgan_with_the_full_recipe(tmp_path, lpips_file):
    import json

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    t = _cuda_run(tmp_path, lpips_file, "run")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before  # restored
    assert t.model.compute_dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else None)  # amp=auto
    rows = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert len(train_rows) == 2 and all(math.isfinite(r["loss"]) and r["gpu_mem_gb"] > 0 for r in train_rows)
    assert {"perceptual", "gan", "disc"} <= set(train_rows[0])


@on_cuda
def test_a_checkpoint_saved_on_the_gpu_loads_on_the_cpu(tmp_path, lpips_file):
    from optvq_cli.train.run import list_checkpoints, read_checkpoint

    t = _cuda_run(tmp_path, lpips_file, "run")
    cpu = load_model(tmp_path / "run" / "model", device="cpu")
    for k, v in t.model.state_dict().items():
        assert torch.equal(cpu.state_dict()[k], v.cpu()), k
    step, path = list_checkpoints(tmp_path / "run")[-1]
    ck = read_checkpoint(path)
    assert step == 2 and all(v.device.type == "cpu" for v in ck["model"].values())
    x = torch.from_numpy(photo_crops(8, 32)).float() / 127.5 - 1
    t.model.compute_dtype = None  # as the CPU model: fp32
    with G.no_tf32():
        on_gpu = t.model.eval().encode_indices(x.to(GPU)).cpu()
    assert (cpu.encode_indices(x) == on_gpu).float().mean() >= 0.99


@on_cuda
def test_cuda_compiled_channels_last_checkpointed_steps_match_plain(tmp_path, lpips_file):
    """Last in the file: the slowest (inductor compiles forward and backward)."""
    plain = _cuda_run(tmp_path, lpips_file, "plain", amp="fp32", tf32="false")
    fast = _cuda_run(
        tmp_path, lpips_file, "fast", amp="fp32", tf32="false", compile="true", compile_backend=BACKEND,
        channels_last="true", checkpointing="true",
    )  # fmt: skip
    assert G.is_compiled(fast.model.encoder) and fast.model.decoder.checkpointing
    assert fast.losses == pytest.approx(plain.losses, rel=1e-3)
    for (k, a), b in zip(plain.model.state_dict().items(), fast.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), k


# ---------------------------------------------------------------- the prepared GPU check, on the CPU


@pytest.mark.slow
def test_bench_gpu_runs_quick_on_the_cpu(tmp_path):
    """`benchmarks/bench_gpu.py --device cpu --quick`: every section runs and reports numbers."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, str(root / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--quick"]
    p = subprocess.run(cmd + ["--out", str(tmp_path), "--workers", "1"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert r["tests"]["status"] == "ok" and r["tests"]["counts"]["skipped"] == 5  # no CUDA here
    assert r["assign"]["shape"] == [512, 1024, 32]
    assert r["assign"]["dense"]["agreement_with_plain"] == r["assign"]["stream"]["agreement_with_plain"] == 1.0
    for name in ("default", "imagenet-f16-h4"):
        assert set(r["encode"][name]) == {"fp32", "bf16", "bf16+channels_last", "bf16+compile", "loader_bf16"}
        assert r["encode"][name]["fp32"]["agreement_with_fp32"] == 1.0
        assert all(v["images_per_s"] > 0 for v in r["encode"][name].values())
        assert 0 <= r["encode"][name]["loader_bf16"]["data_wait_share"] < 1
    for v in r["train"].values():
        assert v["steps_per_s"] > 0 and 0 < v["sinkhorn_share"] < 1 and v["peak_mem_gb"] is None
    md = (tmp_path / "bench_gpu.md").read_text()
    assert "| train imagenet-f16-h4 |" in md and "| encode at 32 px |" in md
