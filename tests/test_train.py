"""`optvq train`: config, losses, a few steps of each preset, the vq / optvq switch, the NaN path,
an exact resume after a real kill, and 2 gloo processes against one."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import photo_crops
from PIL import Image
from typer.testing import CliRunner

from optvq_cli.cli import app
from optvq_cli.core.errors import UserError
from optvq_cli.model import build_model, load_model
from optvq_cli.train.codebook import init_codebook, kmeans
from optvq_cli.train.config import learning_rate, load_run_config, parse_sets, read_config_file, resolve_config
from optvq_cli.train.data import ArrayImages, Splits
from optvq_cli.train.loop import Hooks, TrainingDiverged, train
from optvq_cli.train.losses import PatchDiscriminator, adaptive_weight, hinge_d_loss
from optvq_cli.train.optim import param_groups
from optvq_cli.train.run import list_checkpoints

QUIET = dict(log=lambda m: None)


# ---------------------------------------------------------------- small real data sets


def write_cifar_dir(root: Path, n_train: int = 16, n_test: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    photos = photo_crops(n_train + n_test, 32)
    for name, part in (("data_batch_1", photos[:n_train]), ("test_batch", photos[n_train:])):
        batch = {b"data": part.reshape(len(part), -1), b"labels": [0] * len(part)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return root


def write_mnist_dir(root: Path, n_train: int = 16, n_test: int = 4) -> Path:
    photos = photo_crops(n_train + n_test, 28, grey=True)
    root.mkdir(parents=True, exist_ok=True)
    for name, part in (("train-images-idx3-ubyte", photos[:n_train]), ("t10k-images-idx3-ubyte", photos[n_train:])):
        header = (0x00000803).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in part.shape)
        (root / name).write_bytes(header + part.tobytes())
    return root


def write_photo_dir(root: Path, n: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(photo_crops(i + 1, 48)[i].transpose(1, 2, 0)).save(root / f"p{i}.png")
    return root


def rows(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == split and "event" not in r]


def quick(preset: str, data: Path, steps: int, **sets) -> object:
    """A config for a few steps: logs every step, no periodic validation or checkpoint."""
    base = {"steps": steps, "log_every": 1, "val_every": 0, "ckpt_every": 0, "data__path": str(data)}
    return resolve_config(preset, sets=_nest({**base, **sets}))


def _nest(flat: dict) -> dict:
    out: dict = {}
    for k, v in flat.items():
        node = out
        *head, last = k.split("__")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return out


# ---------------------------------------------------------------- config


def test_presets_carry_the_papers_recipes():
    m = resolve_config("mnist")
    assert (m.data.kind, m.data.size, m.batch_size, m.epochs) == ("mnist", 32, 1024, 100)
    assert m.loss.perceptual == 0 and m.loss.gan == 0 and m.loss.l1 == 1 and m.loss.l2 == 1
    i = resolve_config("imagenet-f16-h4")
    assert (i.data.size, i.batch_size, i.epochs) == (256, 64, 50)
    assert (i.loss.perceptual, i.loss.gan, i.loss.disc_start, i.loss.disc_layers, i.loss.disc_filters) == (
        3.0,
        1.0,
        150_000,
        3,
        64,
    )
    assert i.quantizer.init == "kmeans" and i.optim.weight_decay == 0.05 and i.optim.warmup == 0.01
    assert learning_rate(i) == pytest.approx(4.5e-6 * 64)  # base x global batch
    assert learning_rate(resolve_config("mnist")) == pytest.approx(4.5e-6 * 1024)


def test_override_order_file_then_set_then_flags():
    file = {"batch_size": 32, "optim": {"lr": 0.1, "eps": 1e-8}, "seed": 1}
    cfg = resolve_config("tiny", file, parse_sets(["batch_size=48", "optim.eps=1e-6"]), {"batch_size": 16})
    assert cfg.batch_size == 16 and cfg.optim.lr == 0.1 and cfg.optim.eps == 1e-6 and cfg.seed == 1


def test_quantizer_switch_sets_the_baseline():
    vq = resolve_config("mnist", cli={"quantizer": {"method": "vq"}})
    assert vq.model == {"heads": 1, "loss_type": "ce", "assign": "nearest"} and vq.quantizer.init == "random_select"
    mine = resolve_config("mnist", sets=parse_sets(["model.heads=2"]), cli={"quantizer": {"method": "vq"}})
    assert mine.model["heads"] == 2  # what the user sets wins over the method's defaults
    opt = resolve_config("mnist")
    assert opt.model == {"assign": "sinkhorn"} and opt.quantizer.init == "none"


@pytest.mark.parametrize(
    "sets, match",
    [
        (["optim.lrr=1"], "optim.lrr"),
        (["batch_size=abc"], "batch_size"),
        (["model.foo=1"], "model.foo"),
        (["quantizer.init=magic"], "quantizer.init"),
        (["data.size=30"], "downsampling"),
        (["quantizer.method=kmeans"], "optvq or vq"),
        (["loss.gan=1", "data.size=16"], "too small"),
    ],
)
def test_bad_config_is_one_line(sets, match):
    with pytest.raises(UserError, match=match) as e:
        resolve_config("tiny", sets=parse_sets(sets))
    assert "\n" not in str(e.value)


def test_set_needs_key_value():
    with pytest.raises(UserError, match="key=value"):
        parse_sets(["optim.lr"])


def test_config_files_yaml_and_toml(tmp_path):
    (tmp_path / "a.yaml").write_text("preset: mnist\noptim:\n  lr: 2.0e-4\nmodel:\n  n_codes: 512\n")
    (tmp_path / "b.toml").write_text('preset = "cifar10"\nbatch_size = 256\n[loss]\nl2 = 0.5\n')
    a = resolve_config(None, read_config_file(tmp_path / "a.yaml"))
    b = resolve_config(None, read_config_file(tmp_path / "b.toml"))
    assert a.preset == "mnist" and a.optim.lr == 2e-4 and a.model["n_codes"] == 512
    assert b.preset == "cifar10" and b.batch_size == 256 and b.loss.l2 == 0.5
    (tmp_path / "bad.yaml").write_text("optim: [1, 2\n")
    with pytest.raises(UserError, match="cannot parse"):
        read_config_file(tmp_path / "bad.yaml")


# ---------------------------------------------------------------- losses and pieces


def test_hinge_loss_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # real: relu(1 - 2) = 0, relu(1 - 0.5) = 0.5 -> 0.25; fake: relu(1 - 2) = 0, relu(1.5) = 1.5 -> 0.75
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))


def test_adaptive_weight_closed_form():
    w = torch.randn(3, 4, requires_grad=True)
    n = w.numel()
    rec, g = 3.0 * w.sum(), 0.5 * w.sum()  # gradients: all 3 and all 0.5
    expected = 3 * math.sqrt(n) / (0.5 * math.sqrt(n) + 1e-4)
    assert adaptive_weight(rec, g, w).item() == pytest.approx(expected, rel=1e-5)
    assert adaptive_weight(3.0 * w.sum(), 0.0 * w.sum(), w, max_weight=1e4).item() == 1e4  # clamped
    nan = adaptive_weight(float("nan") * w.sum(), w.sum(), w)
    assert nan.item() == 0.0


def test_patchgan_three_layers_64_filters():
    d = PatchDiscriminator(3, 64, 3)
    # conv 3->64 (+bias), 64->128, 128->256, 256->512 (no bias, batch norm), 512->1 (+bias); 4x4 kernels.
    convs = 3 * 64 * 16 + 64 + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 + 512 * 16 + 1
    norms = 2 * (128 + 256 + 512)
    assert sum(p.numel() for p in d.parameters()) == convs + norms
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 64 / 8 = 8, then two 4x4 convs: 7, 6


def test_param_groups_no_decay_on_norms_biases_codebook():
    model = build_model("tiny-vqgan")
    decay, rest = param_groups([model], 1.0, 0.05)
    ids = {id(p) for p in decay["params"]}
    assert id(model.encoder.conv_in.weight) in ids and id(model.quantize.proj.weight) in ids
    for p in (model.encoder.conv_in.bias, model.encoder.norm_out.weight, model.quantize.embedding.weight):
        assert id(p) not in ids
    assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_kmeans_finds_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    got = kmeans(x, 3, 10, torch.Generator().manual_seed(0))
    means = torch.stack([x[50 * i : 50 * (i + 1)].mean(0) for i in range(3)])
    order = torch.cdist(means, got).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2]
    assert torch.allclose(got[order], means, atol=1e-5)  # each centroid is the mean of its blob


def test_random_select_init_uses_encoder_features():
    torch.manual_seed(0)
    model = build_model("tiny")
    data = ArrayImages(torch.from_numpy(photo_crops(8, 32)), "photos")
    cfg = resolve_config("tiny", sets=parse_sets(["quantizer.init=random_select"]))
    init_codebook(model, data, cfg, torch.device("cpu"), log=lambda m: None)
    q = model.quantize
    feats = model.features(data.__getitems__([(0, i) for i in range(8)]))
    pool = feats.permute(0, 2, 3, 1).reshape(-1, q.code_dim)
    assert torch.equal(q.proj.weight, torch.eye(q.code_dim)) and not q.proj.bias.any()
    exact = torch.cdist(q.codes(), pool, compute_mode="donot_use_mm_for_euclid_dist")
    assert exact.min(1).values.max() < 1e-6  # every code is one of the feature vectors


# ---------------------------------------------------------------- presets: a few steps each


def _decreases(run_dir: Path) -> None:
    r = rows(run_dir)
    rec = [x["l1"] + x["l2"] for x in r]
    assert sum(rec[-2:]) < sum(rec[:2]), rec
    assert all(0 < x["codebook_usage"] <= 1 for x in r)


@pytest.mark.slow
def test_mnist_preset(tmp_path):
    data = write_mnist_dir(tmp_path / "mnist")
    cfg = quick("mnist", data, 10, batch_size=8, optim__lr=5e-3)
    res = train(cfg, tmp_path / "run", **QUIET)
    _decreases(tmp_path / "run")
    assert set(rows(tmp_path / "run")[0]) >= {"l1", "l2", "quantizer", "loss", "psnr_y", "codebook_usage"}
    assert "perceptual" not in rows(tmp_path / "run")[0] and "gan" not in rows(tmp_path / "run")[0]
    assert res.val["images"] == 4 and 0 < res.val["codebook_usage"] <= 1
    model = load_model(tmp_path / "run" / "model", device="cpu")
    assert model.config.in_channels == 1 and model.metadata["preset"] == "mnist"
    assert (tmp_path / "run" / "samples" / "step-00000010.png").is_file()


@pytest.mark.slow
def test_cifar10_preset(tmp_path):
    data = write_cifar_dir(tmp_path / "cifar")
    train(quick("cifar10", data, 10, batch_size=8, optim__lr=5e-3), tmp_path / "run", **QUIET)
    _decreases(tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-vqgan", "imagenet-f16-h4"])
def test_full_recipe_with_perceptual_and_gan(tmp_path, lpips_file, preset):
    data = write_photo_dir(tmp_path / "photos")
    small = {}
    if preset == "imagenet-f16-h4":  # the ImageNet recipe on a model small enough for a CPU test
        small = dict(
            model__ch=32, model__ch_mult="1,2", model__num_res_blocks=1, model__attn_resolutions="8",
            model__z_channels=32, model__n_codes=32, model__e_dim=16, model__resolution=16,
            data__size=16, loss__disc_layers=2, quantizer__init_samples=256, quantizer__kmeans_iters=3,
        )  # fmt: skip
    cfg = quick(
        preset, data, 4, batch_size=4, loss__lpips_weights=str(lpips_file), loss__disc_start=2,
        optim__lr=1e-3, ckpt_every=4, **small,
    )  # fmt: skip
    assert cfg.loss.perceptual == 3.0 and cfg.loss.gan == 1.0
    train(cfg, tmp_path / "run", **QUIET)
    r = rows(tmp_path / "run")
    assert all("perceptual" in x for x in r)
    assert ["gan" in x for x in r] == [False, False, True, True]  # the discriminator joins at step 2
    assert all(math.isfinite(x["disc"]) and x["gan_weight"] >= 0 for x in r[2:])
    assert (tmp_path / "run" / "checkpoints" / "step-00000004" / "discriminator.safetensors").is_file()


@pytest.mark.slow
def test_vq_and_optvq_switch(tmp_path):
    data = write_cifar_dir(tmp_path / "cifar")
    for method in ("vq", "optvq"):
        cfg = quick("tiny", data, 2, batch_size=8, quantizer__method=method)
        seen: list[torch.Tensor] = []
        train(cfg, tmp_path / method, hooks=Hooks(lambda s, losses, idx, seen=seen: seen.append(idx[0])), **QUIET)
        model = load_model(tmp_path / method / "model", device="cpu")
        c = model.config
        if method == "vq":
            assert (c.assign, c.heads, c.loss_type) == ("nearest", 1, "ce")
        else:
            assert (c.assign, c.heads, c.loss_type) == ("sinkhorn", 2, "l2")
        assert seen[0].shape[1] == c.heads and model.metadata["quantizer"] == method


# ---------------------------------------------------------------- non-finite steps


class Poisoned(ArrayImages):
    """NaN images in the given epochs (one step per epoch here)."""

    def __init__(self, pixels, bad_epochs):
        super().__init__(pixels, "poisoned")
        self.bad = set(bad_epochs)

    def __getitems__(self, items):
        x = super().__getitems__(items)
        return torch.full_like(x, float("nan")) if items[0][0] in self.bad else x


def _splits(bad_epochs) -> Splits:
    px = torch.from_numpy(photo_crops(12, 32))
    return Splits(Poisoned(px[:8], bad_epochs), ArrayImages(px[8:], "val"), "array", "photos")


def test_a_non_finite_step_is_skipped_and_counted(tmp_path):
    cfg = quick("tiny", tmp_path, 5, batch_size=8, optim__grad_accum=2)  # the bad step's 2nd micro-batch is dropped too
    res = train(cfg, tmp_path / "run", splits=_splits({2}), **QUIET)
    assert res.status == "completed" and res.skipped_steps == 1
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "skipped_step"] == [3]
    model = load_model(tmp_path / "run" / "model", device="cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_non_finite_steps_stop_with_last_good_checkpoint(tmp_path):
    cfg = quick("tiny", tmp_path, 10, batch_size=8, ckpt_every=1, max_bad_steps=2, keep_checkpoints=5)
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, tmp_path / "run", splits=_splits(range(3, 10)), **QUIET)
    msg = str(e.value)
    assert "step-00000003" in msg and "2 non-finite steps in a row" in msg and "\n" not in msg
    steps = [s for s, _ in list_checkpoints(tmp_path / "run")]
    assert steps == [1, 2, 3]
    good = load_model(tmp_path / "run" / "checkpoints" / "step-00000003", device="cpu")
    assert all(torch.isfinite(p).all() for p in good.parameters())
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_on_without_tensorboard_is_one_line(tmp_path):
    cfg = quick("tiny", tmp_path, 1, batch_size=8, tensorboard="on")
    with pytest.raises(UserError, match="pip install tensorboard"):
        train(cfg, tmp_path / "run", splits=_splits(()), **QUIET)


# ---------------------------------------------------------------- resume after a real kill


def _cli_args(data: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "optvq_cli", "train", "--preset", "tiny", "--data", str(data), "--out", str(out),
        "--steps", "40", "--batch-size", "4", "--seed", "3", "-q",
        "--set", "ckpt_every=1", "--set", "val_every=0", "--set", "log_every=3", "--set", "optim.lr=3e-3",
    ]  # fmt: skip


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run_until(cmd: list[str], run_dir: Path, min_step: int, sig: int) -> tuple[int, str]:
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        done = list_checkpoints(run_dir)
        if done and done[-1][0] >= min_step:
            p.send_signal(sig)
            break
        time.sleep(0.01)
    _, err = p.communicate(timeout=120)
    return p.returncode, err


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.slow
def test_killed_and_resumed_run_ends_bit_identical(tmp_path):
    data = write_cifar_dir(tmp_path / "cifar", n_train=12, n_test=2)
    a, b = tmp_path / "a", tmp_path / "b"
    done = subprocess.run(_cli_args(data, a), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    rc, err = _run_until(_cli_args(data, b), b, 4, signal.SIGTERM)  # a polite stop: checkpoint, exit 130
    assert rc == 130, err
    first = list_checkpoints(b)[-1][0]
    assert 4 <= first < 40 and "--resume" in err
    resume = [sys.executable, "-m", "optvq_cli", "train", "--resume", str(b), "-q"]
    rc, err = _run_until(resume, b, first + 4, signal.SIGKILL)  # a hard kill, maybe mid-checkpoint
    assert rc == -signal.SIGKILL, err
    done = subprocess.run(resume, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    ta, tb = _tensors(a / "model"), _tensors(b / "model")
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    strip = [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows(a)]
    assert strip == [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows(b)]  # no duplicates


# ---------------------------------------------------------------- 2 gloo processes = 1 process


def _gloo_cfg(data: Path):
    return quick("tiny", data, 2, batch_size=8, device="cpu", keep_checkpoints=1)


def _gloo_worker(rank: int, world: int, init_file: str, data: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    seen = {}
    hooks = Hooks(lambda step, losses, idx: seen.setdefault(step, (losses, idx[0])))
    train(_gloo_cfg(Path(data)), Path(out) / "ddp", hooks=hooks, **QUIET)
    torch.save({"losses": seen[1][0], "indices": seen[1][1]}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    data = write_cifar_dir(tmp_path / "cifar", n_train=16, n_test=4)
    mp.start_processes(
        _gloo_worker,
        args=(2, str(tmp_path / "init"), str(data), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    seen = {}
    torch.set_num_threads(1)
    hooks = Hooks(lambda step, losses, idx: seen.setdefault(step, (losses, idx[0])))
    train(_gloo_cfg(data), tmp_path / "single", hooks=hooks, **QUIET)
    losses, indices = seen[1]
    assert torch.equal(torch.cat([p["indices"] for p in parts]), indices)
    for k in ("l1", "l2", "quantizer", "loss"):
        assert (parts[0]["losses"][k] + parts[1]["losses"][k]) / 2 == pytest.approx(losses[k], rel=1e-5)
    ddp_rows, single_rows = rows(tmp_path / "ddp"), rows(tmp_path / "single")
    assert ddp_rows[0]["loss"] == pytest.approx(single_rows[0]["loss"], rel=1e-5)  # the logged mean
    assert ddp_rows[0]["codebook_usage"] == single_rows[0]["codebook_usage"]
    ta, tb = _tensors(tmp_path / "ddp" / "model"), _tensors(tmp_path / "single" / "model")
    assert all(torch.allclose(ta[k], tb[k], atol=1e-5) for k in ta)


# ---------------------------------------------------------------- the command


runner = CliRunner()


def _cli(*args) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stderr


def test_cli_trains_refuses_overwrite_and_resume_changes(tmp_path):
    data = write_photo_dir(tmp_path / "photos", 6)
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", data, "--out", run, "--steps", "2", "--batch-size", "4", "-q"]
    code, err = _cli(*args, "--set", "val_every=0", "--quantizer", "vq")
    assert code == 0, err
    cfg = load_run_config(run)
    assert cfg.quantizer.method == "vq" and cfg.steps == 2 and cfg.batch_size == 4
    model = load_model(run / "model", device="cpu")  # a normal model directory
    x = torch.zeros(1, 3, 32, 32)
    assert model.encode_indices(x).shape == (1, 1, 8, 8)

    code, err = _cli(*args)
    assert code == 1 and "--resume" in err and "--overwrite" in err
    code, err = _cli("train", "--resume", run, "--batch-size", "8")
    assert code == 1 and "--batch-size" in err
    code, err = _cli("train", "--data", data, "--out", tmp_path / "x")
    assert code == 1 and "--preset" in err
    code, err = _cli("train", "--preset", "tiny", "--data", data, "--out", tmp_path / "y", "--set", "epochs=0")
    assert code == 1 and "epochs" in err


def test_resume_with_more_steps_extends_a_finished_run(tmp_path):
    data = write_photo_dir(tmp_path / "photos", 6)
    run = tmp_path / "run"
    args = ["--preset", "tiny", "--data", data, "--out", run, "--batch-size", "4", "-q", "--set", "val_every=0"]
    code, err = _cli("train", *args, "--steps", "2", "--set", "log_every=1")
    assert code == 0, err
    code, err = _cli("train", "--resume", run, "--steps", "4", "-q")
    assert code == 0, err
    assert load_run_config(run).steps == 4 and [s for s, _ in list_checkpoints(run)][-1] == 4
    lrs = {r["step"]: r["lr"] for r in rows(run)}
    assert sorted(lrs) == [1, 2, 3, 4]
    # steps 3 and 4 follow the 4-step OneCycle schedule (torch's own scheduler as the reference)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lr = learning_rate(load_run_config(run))
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=4, pct_start=0.01, anneal_strategy="cos")
    expected = []
    for _ in range(4):
        opt.step()
        ref.step()
        expected.append(opt.param_groups[0]["lr"])
    assert lrs[3] == pytest.approx(expected[2]) and lrs[4] == pytest.approx(expected[3])
    code, err = _cli("train", "--resume", run, "--steps", "3")
    assert code == 1 and "step 4" in err


@pytest.mark.parametrize(
    "data, extra",
    [
        ("missing", []),
        ("apple.jpg", []),
        ("photos", ["--batch-size", "64"]),
    ],
)
def test_failed_start_up_writes_nothing(tmp_path, data, extra):
    write_photo_dir(tmp_path / "photos", 6)
    (tmp_path / "apple.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    run = tmp_path / "run"
    code, err = _cli("train", "--preset", "tiny", "--data", tmp_path / data, "--out", run, "--steps", "1", *extra)
    assert code == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip().splitlines()[-1]]
    assert not run.exists()  # a corrected rerun needs no --overwrite or --resume
    if data == "apple.jpg":
        assert "--data takes a folder of images" in err


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_learning_rate_must_be_finite_and_positive(value):
    with pytest.raises(UserError, match="optim.lr") as e:
        resolve_config("tiny", sets=parse_sets([f"optim.lr={value}"]))
    assert "\n" not in str(e.value)


def _assert_eval_agrees(val: dict, folder: Path, tmp_path: Path, images: int) -> None:
    """`optvq eval` of the run's model on ``folder``, same assignment and batch: the val row's figure."""
    report = tmp_path / "report.json"
    args = ["eval", folder, "--model", tmp_path / "run" / "model", "--metrics", "psnr", "--size", "32"]
    code, err = _cli(*args, "--assign", val["assign"], "--batch-size", val["batch_size"], "--json", report)
    assert code == 0, err
    got = json.loads(report.read_text())
    assert val["images"] == got["count"] == images
    assert abs(val["psnr_y"] - got["psnr_y"]) < 1e-6


def test_validation_psnr_is_evals_psnr(tmp_path):
    """The loop's val row and `optvq eval` of the saved model on the same images, with the same
    assignment and batch (one Sinkhorn pool), agree to 1e-6 dB."""
    px = torch.from_numpy(photo_crops(14, 32))
    splits = Splits(ArrayImages(px[:8], "train"), ArrayImages(px[8:], "val"), "array", "photos")
    cfg = quick("tiny", tmp_path, 1, val_batch_size=6, batch_size=4)
    train(cfg, tmp_path / "run", splits=splits, **QUIET)
    val = rows(tmp_path / "run", "val")[-1]
    folder = tmp_path / "val"
    folder.mkdir()
    for i, p in enumerate(px[8:]):
        Image.fromarray(p.permute(1, 2, 0).numpy()).save(folder / f"v{i}.png")
    _assert_eval_agrees(val, folder, tmp_path, images=6)


def test_mnist_validation_psnr_is_evals_psnr_on_the_test_digits(tmp_path):
    """28 x 28 digits resized to 32 by the loader and by eval alike: the same figure."""
    data = write_mnist_dir(tmp_path / "mnist", n_train=16, n_test=4)
    cfg = quick("mnist", data, 1, batch_size=8, val_batch_size=4)
    train(cfg, tmp_path / "run", **QUIET)
    val = rows(tmp_path / "run", "val")[-1]
    raw = (data / "t10k-images-idx3-ubyte").read_bytes()[16:]
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(4):
        digit = torch.frombuffer(bytearray(raw[i * 784 : (i + 1) * 784]), dtype=torch.uint8).reshape(28, 28)
        Image.fromarray(digit.numpy()).save(folder / f"d{i}.png")
    _assert_eval_agrees(val, folder, tmp_path, images=4)


def test_a_second_run_on_a_locked_run_folder_fails_at_once(tmp_path):
    from optvq_cli.core.lock import FolderBusy, folder_lock

    data = write_photo_dir(tmp_path / "photos", 6)
    run = tmp_path / "run"
    cfg = quick("tiny", data, 1, batch_size=4)
    with folder_lock(run), pytest.raises(FolderBusy, match=f"pid {os.getpid()}"):
        train(cfg, run, **QUIET)
    assert [p.name for p in run.iterdir()] == [".optvq.lock"]  # nothing else written
    train(cfg, run, **QUIET)  # the lock was released: the same run goes ahead, no --overwrite needed
    with folder_lock(run), pytest.raises(FolderBusy):
        train(cfg, run, resume=True, **QUIET)


def test_training_state_names_its_format_and_earlier_states_still_resume(tmp_path):
    data = write_photo_dir(tmp_path / "photos", 6)
    run = tmp_path / "run"
    args = ["--preset", "tiny", "--data", data, "--out", run, "--batch-size", "4", "-q", "--set", "val_every=0"]
    assert _cli("train", *args, "--steps", "2")[0] == 0
    state_file = list_checkpoints(run)[-1][1] / "training_state.pt"
    state = torch.load(state_file, weights_only=True)
    assert (state["format"], state["optvq_format"]) == ("optvq-training-state", 1)
    # the spelling of earlier saves: a bare version number under "format"
    torch.save({**{k: v for k, v in state.items() if k != "optvq_format"}, "format": 1}, state_file)
    code, err = _cli("train", "--resume", run, "--steps", "3", "-q")
    assert code == 0, err
    newer = list_checkpoints(run)[-1][1] / "training_state.pt"
    torch.save({**torch.load(newer, weights_only=True), "optvq_format": 2}, newer)
    code, err = _cli("train", "--resume", run, "--steps", "4", "-q")
    assert code == 1 and "training state format 2, this optvq reads 1" in err


def test_validation_decodes_the_codes_themselves_as_eval_does():
    """Features far from every code (a collapsed baseline's encoder drifts so): the straight-through
    z_q differs from the codes by rounding at the features' scale; validation decodes the codes, as
    eval decodes tokens, so it reports eval's reconstruction."""
    from optvq_cli.eval.metrics import psnr
    from optvq_cli.train.data import to_model_range
    from optvq_cli.train.metrics import validate

    torch.manual_seed(0)
    model = build_model("tiny", device="cpu")
    with torch.no_grad():
        model.quant_conv.weight.mul_(1e7)
    px = torch.from_numpy(photo_crops(4, 32))
    x = to_model_range(px)
    stats, _ = validate(model, ArrayImages(px, "val"), 4, torch.device("cpu"), 0, 0)
    model.eval()
    rec = model.decode_indices(model.encode_indices(x, assign=model.config.assign)).clamp(-1, 1)
    expected = float(psnr((x + 1) / 2, (rec + 1) / 2).mean())
    assert abs(stats["psnr_y"] - expected) < 1e-6
