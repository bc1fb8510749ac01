"""The GPU check: the CUDA tests, then code assignment, encode and train figures, in one run.

    python benchmarks/bench_gpu.py --out bench-gpu-out [--device cuda] [--budget-s 330]
    python benchmarks/bench_gpu.py --out /tmp/b --device cpu --quick    # small shapes, about a minute

Sections, in this order, each recorded even when another fails:
1. ``pytest -m cuda`` (CUDA vs CPU codes, bf16 vs fp32 tokens, training steps, a GPU checkpoint on the CPU).
2. Code assignment at the paper's shape (8192 x 16384 x 64): dense and streaming Sinkhorn against
   the plain formulation, through benchmarks/bench_assign.py's child runs (own process, own peak).
3. Train steps/s and peak memory of imagenet-f16-h4 (random weights) at batch 8 with LPIPS and the
   discriminator on, for fp32, bf16, bf16 + channels-last and bf16 + checkpointing; the Sinkhorn's
   share of a step (the quantizer's assignment timed between two device synchronizations).
4. Encode images/s at 256 px for the bundled default model and imagenet-f16-h4 (random weights):
   fp32, bf16, bf16 + channels-last, bf16 + torch.compile, on a batch already on the device; then
   through a DataLoader that decodes PNGs, with the share of the time spent waiting for data.

Writes ``bench_gpu.json`` and ``bench_gpu.md`` to ``--out``. Later sections are skipped (and said
so) once ``--budget-s`` seconds have passed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench_assign  # noqa: E402 - the assignment benchmark's child runs, reused

from optvq_cli.core import device as G  # noqa: E402
from optvq_cli.quant.quantizer import OptVQuantizer  # noqa: E402

ENCODE_VARIANTS = {  # name: (autocast dtype, channels-last, compile)
    "fp32": (None, False, False),
    "bf16": (torch.bfloat16, False, False),
    "bf16+channels_last": (torch.bfloat16, True, False),
    "bf16+compile": (torch.bfloat16, False, True),
}
TRAIN_VARIANTS = {  # name: --set items
    "fp32": {"amp": "fp32"},
    "bf16": {"amp": "bf16"},
    "bf16+channels_last": {"amp": "bf16", "channels_last": "true"},
    "bf16+checkpointing": {"amp": "bf16", "checkpointing": "true"},
}


class Clock:
    def __init__(self, budget_s: float):
        self.t0, self.budget = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> bool:
        return self.elapsed() < self.budget


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- 1. the CUDA tests


def run_cuda_tests(timeout_s: float) -> dict[str, Any]:
    """``pytest -m cuda`` on tests/test_gpu.py; on a timeout, the outcomes of the tests that finished."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0, status = time.perf_counter(), None
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=env)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), -1
        status = f"timed out after {timeout_s:.0f} s"
    outcomes = dict(re.findall(r"::(test_\w+)\S* (PASSED|FAILED|SKIPPED|ERROR)", out))
    counts: dict[str, int] = {}
    for v in outcomes.values():
        counts[v.lower()] = counts.get(v.lower(), 0) + 1
    ok = rc in (0, 5) and not counts.get("failed") and not counts.get("error")
    return {
        "status": status or ("ok" if ok else "failed"),
        "counts": counts,
        "tests": outcomes,
        "seconds": round(time.perf_counter() - t0, 1),
        "tail": "" if ok else out[-4000:],
    }


# ---------------------------------------------------------------- 2. code assignment


def run_assign(shape: tuple[int, int, int], device: str, reps: int) -> dict[str, Any]:
    l_, n, d = shape
    res: dict[str, Any] = {"shape": list(shape)}
    with tempfile.TemporaryDirectory() as tmp:
        idx = os.path.join(tmp, "plain.pt")
        for method in ("plain", "dense", "stream"):  # plain first: the others' agreement is against it
            cmd = [sys.executable, bench_assign.__file__, "--child", method, str(l_), str(n), str(d), device]
            p = subprocess.run(cmd + [str(reps), idx], capture_output=True, text=True, cwd=ROOT)
            line = [s for s in p.stdout.splitlines() if s.startswith("RESULT ")]
            res[method] = json.loads(line[0][7:]) if line else {"error": p.stderr[-1500:]}
            log(f"assign {method}: {res[method]}")
    return res


# ---------------------------------------------------------------- 4. encode


def _images(n: int, size: int) -> torch.Tensor:
    """uint8 photographs (scikit-image's, cropped and resized) or, without it, smooth noise."""
    from PIL import Image

    try:
        import skimage

        src = Path(skimage.__file__).parent / "data"
        names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
        photos = [Image.open(src / name).convert("RGB").resize((size, size)) for name in names]
    except Exception:  # noqa: BLE001 - no scikit-image: upsampled noise has photo-like structure
        g = torch.Generator().manual_seed(0)
        low = torch.randint(0, 256, (n, 3, size // 8, size // 8), generator=g, dtype=torch.uint8)
        return torch.nn.functional.interpolate(low.float(), size=size, mode="bilinear").byte()
    import numpy as np

    arr = torch.from_numpy(np.stack([np.asarray(p) for p in photos])).permute(0, 3, 1, 2)
    return torch.cat([arr.roll(k, dims=3) for k in range(n // len(photos) + 1)])[:n].contiguous()


class PngImages(torch.utils.data.Dataset):
    """Images as PNG bytes, decoded per item: the reading work `optvq encode` does."""

    def __init__(self, pixels: torch.Tensor):
        from PIL import Image

        self.blobs = []
        for p in pixels:
            buf = io.BytesIO()
            Image.fromarray(p.permute(1, 2, 0).numpy()).save(buf, format="PNG")
            self.blobs.append(buf.getvalue())

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        arr = np.asarray(Image.open(io.BytesIO(self.blobs[i])).convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _encode_model(name: str, device: torch.device):
    from optvq_cli.model import build_model, load_model

    if name == "default":
        return load_model("default", device=device)
    torch.manual_seed(0)  # random weights, the same in every variant: tokens comparable
    return build_model(name, device=device).eval()


def _timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        G.synchronize(device)
        t0 = time.perf_counter()
        fn()
        G.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def encode_variant(name: str, variant: str, x: torch.Tensor, reps: int, backend: str) -> dict[str, Any]:
    dtype, cl, comp = ENCODE_VARIANTS[variant]
    device = x.device
    model = _encode_model(name, device)
    model.compute_dtype = dtype
    G.channels_last(model, cl)
    t0 = time.perf_counter()
    G.compile_module(model.encoder, comp, backend)
    xin = G.channels_last(x, cl)
    with G.no_tf32():  # encode's policy
        model.encode_indices(xin)  # compiles, when compiled
        G.synchronize(device)
        warm = time.perf_counter() - t0
        ref = _encode_model(name, device).encode_indices(x)
        agree = float((model.encode_indices(xin) == ref).float().mean())
        s = _timed(lambda: model.encode_indices(xin), device, reps)
    out = {"images_per_s": x.shape[0] / s, "batch": x.shape[0], "agreement_with_fp32": agree}
    if comp:
        out["compile_s"], out["compile_backend"] = round(warm, 1), backend
    return out


def encode_with_loader(name: str, variant: str, pixels: torch.Tensor, batch: int, workers: int, device) -> dict:
    """Images/s through a DataLoader that decodes PNGs, and the share of wall time spent waiting for a batch."""
    dtype, cl, _ = ENCODE_VARIANTS[variant]
    model = _encode_model(name, device)
    model.compute_dtype = dtype
    G.channels_last(model, cl)
    loader = torch.utils.data.DataLoader(
        PngImages(pixels), batch_size=batch, num_workers=workers, pin_memory=G.pin_memory_for(device),
        prefetch_factor=4 if workers else None,
    )  # fmt: skip
    wait = compute = 0.0
    n = 0
    batches = iter(loader)
    with G.no_tf32():
        model.encode_indices(G.to_device(next(batches), device, cl))  # warm-up; the workers are up from here
        G.synchronize(device)
        t_start = t = time.perf_counter()
        for xb in batches:
            t1 = time.perf_counter()
            model.encode_indices(G.to_device(xb, device, cl))
            G.synchronize(device)
            t2 = time.perf_counter()
            wait, compute, n, t = wait + (t1 - t), compute + (t2 - t1), n + xb.shape[0], t2
    total = time.perf_counter() - t_start
    return {"images_per_s": n / total, "images": n, "workers": workers, "data_wait_share": wait / total}


def run_encode(args, device: torch.device, clock: Clock) -> dict[str, Any]:
    size, batch, reps = (32, 2, 2) if args.quick else (256, 32, 5)
    x = (_images(batch, size).float() / 127.5 - 1).to(device)
    out: dict[str, Any] = {"size": size}
    for name in ("default", "imagenet-f16-h4"):
        out[name] = {}
        for variant in ENCODE_VARIANTS:
            if not clock.left():
                out[name][variant] = {"skipped": "time budget spent"}
                continue
            out[name][variant] = _guard(encode_variant, name, variant, x, reps, args.compile_backend)
            log(f"encode {name} {variant}: {out[name][variant]}")
        if clock.left():
            n_imgs = batch * (3 if args.quick else 17)  # the first batch warms up
            pixels = _images(n_imgs, size)
            out[name]["loader_bf16"] = _guard(encode_with_loader, name, "bf16", pixels, batch, args.workers, device)
            log(f"encode {name} through a loader: {out[name]['loader_bf16']}")
    return out


# ---------------------------------------------------------------- 3. train


class AssignTimer:
    """Seconds inside OptVQuantizer.assign_indices, between device synchronizations."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self._orig = device, 0.0, OptVQuantizer.assign_indices

    def __enter__(self):
        orig, timer = self._orig, self

        def timed(q, *a, **k):
            G.synchronize(timer.device)
            t0 = time.perf_counter()
            out = orig(q, *a, **k)
            G.synchronize(timer.device)
            timer.seconds += time.perf_counter() - t0
            return out

        OptVQuantizer.assign_indices = timed
        return self

    def __exit__(self, *exc):
        OptVQuantizer.assign_indices = self._orig


def _perceptual_sets(run: Path) -> tuple[dict[str, str], str]:
    """LPIPS-VGG: the real weights when cached, else the same network with random weights (the same
    cost), else none."""
    from optvq_cli.eval.weights import locate

    try:
        locate("lpips-vgg", None)
        return {}, "LPIPS-VGG (its weights)"
    except Exception:  # noqa: BLE001 - not cached and offline
        pass
    try:
        from safetensors.torch import save_file

        from optvq_cli.eval.perceptual import LPIPS

        path = run / "lpips-vgg-random.safetensors"
        save_file({k: v.contiguous() for k, v in LPIPS("vgg").state_dict().items()}, str(path))
        return {"loss.lpips_weights": str(path)}, "LPIPS-VGG with random weights (same cost; its weights not cached)"
    except Exception as e:  # noqa: BLE001
        return {"loss.perceptual": "0"}, f"no perceptual loss ({e}); perceptual=0"


def train_variant(args, device: torch.device, variant: str, tmp: Path) -> dict[str, Any]:
    from optvq_cli.train.config import parse_sets, resolve_config
    from optvq_cli.train.data import ArrayImages, Splits
    from optvq_cli.train.loop import Hooks, Trainer

    warm, steps = (1, 1) if args.quick else (3, 10)
    size, batch = (32, 4) if args.quick else (256, 8)
    sets = {"steps": str(warm + steps), "batch_size": str(batch), "data.size": str(size), "log_every": "1000",
            "val_every": "0", "ckpt_every": "0", "quantizer.init": "none", "loss.disc_start": "0",
            "device": str(device), "compile_backend": args.compile_backend, "val_batch_size": str(batch)}  # fmt: skip
    if args.quick:  # imagenet-f16-h4's recipe on a model a CPU trains in seconds
        sets |= {"model.ch": "32", "model.ch_mult": "1,2", "model.num_res_blocks": "1", "model.resolution": "32",
                 "model.attn_resolutions": "16", "model.z_channels": "32", "model.n_codes": "1024",
                 "loss.disc_layers": "2"}  # fmt: skip
    lp_sets, lp_note = _perceptual_sets(tmp)
    sets |= lp_sets | TRAIN_VARIANTS.get(variant, {"amp": "bf16", "compile": "true"})
    cfg = resolve_config("imagenet-f16-h4", sets=parse_sets([f"{k}={v}" for k, v in sets.items()]))
    px = _images(batch * (warm + steps) + batch, size)
    splits = Splits(ArrayImages(px[batch:], "train"), ArrayImages(px[:batch], "val"), "array", "bench")
    stamps: list[float] = []
    timer = AssignTimer(device)
    seen: dict[str, Any] = {}

    def on_step(step: int, terms, indices) -> None:
        G.synchronize(device)
        stamps.append(time.perf_counter())
        if step == warm:  # from here on: the measured steps' assignment time and memory
            timer.seconds = 0.0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        if step == warm + steps:  # before the last log row and the final validation
            seen["assign_s"] = timer.seconds
            seen["mem"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None

    trainer = Trainer(cfg, tmp / variant, device, splits=splits, hooks=Hooks(on_step), log=lambda m: None)
    with timer:
        trainer.fit()
    trainer.close()
    span = stamps[-1] - stamps[warm - 1]
    return {"steps_per_s": steps / span, "peak_mem_gb": seen["mem"], "sinkhorn_share": seen["assign_s"] / span,
            "batch": batch, "size": size, "perceptual": lp_note, "measured_steps": steps}  # fmt: skip


def run_train(args, device: torch.device, clock: Clock) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = list(TRAIN_VARIANTS) + (["bf16+compile"] if args.train_compile else [])
        for variant in variants:
            if not clock.left():
                out[variant] = {"skipped": "time budget spent"}
                continue
            out[variant] = _guard(train_variant, args, device, variant, Path(tmp))
            log(f"train {variant}: {out[variant]}")
    return out


# ---------------------------------------------------------------- the report


def _guard(fn, *args) -> dict[str, Any]:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - one section's failure is a result, not the end of the run
        return {"error": f"{type(e).__name__}: {e}"[:1500]}


def _errors(r: Any, where: str = "") -> list[str]:
    """Where the results hold an error (a failed section or variant)."""
    if not isinstance(r, dict):
        return []
    own = [where or "(top)"] if "error" in r else []
    return own + [e for k, v in r.items() for e in _errors(v, f"{where}/{k}")]


def _f(v: Any, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def markdown(r: dict[str, Any]) -> str:
    env = r["env"]
    lines = [f"# bench_gpu on {env['device_name']}", "", f"torch {env['torch']}; {'quick' if env['quick'] else 'full'} "
             f"shapes; {r['seconds']:.0f} s in all.", ""]  # fmt: skip
    t = r.get("tests", {})
    lines += [f"`pytest -m cuda`: {t.get('status')} {t.get('counts', '')}", ""]
    a = r.get("assign", {})
    if "shape" in a:
        lines += [f"| assignment {'x'.join(map(str, a['shape']))} | time (s) | peak extra (MiB) | plain / this "
                  "| agreement with plain |", "|---|---|---|---|---|"]  # fmt: skip
        for m in ("plain", "dense", "stream"):
            x, p = a.get(m, {}), a.get("plain", {})
            ratio = p["time_s"] / x["time_s"] if "time_s" in x and "time_s" in p else None
            mib = x["peak_extra_bytes"] / 2**20 if "peak_extra_bytes" in x else None
            lines.append(f"| {m} | {_f(x.get('time_s'))} | {_f(mib, '.0f')} | {_f(ratio, '.2f')} | "
                         f"{_f(x.get('agreement_with_plain'), '.5f')} |")  # fmt: skip
        lines.append("")
    e = r.get("encode", {})
    lines += [f"| encode at {e.get('size')} px | variant | images/s | agreement with fp32 | data-wait share |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name in ("default", "imagenet-f16-h4"):
        for variant, x in e.get(name, {}).items():
            note = x.get("error") or x.get("skipped") or ""
            agree, wait = _f(x.get("agreement_with_fp32"), ".4f"), _f(x.get("data_wait_share"), ".0%")
            lines.append(f"| {name} | {variant} | {_f(x.get('images_per_s'), '.1f')} | {agree} | {wait} {note} |")
    lines += ["", "| train imagenet-f16-h4 | steps/s | peak memory (GB) | Sinkhorn share of a step | perceptual |",
              "|---|---|---|---|---|"]  # fmt: skip
    for variant, x in r.get("train", {}).items():
        note = x.get("error") or x.get("skipped") or x.get("perceptual", "")
        lines.append(f"| {variant} | {_f(x.get('steps_per_s'))} | {_f(x.get('peak_mem_gb'), '.2f')} | "
                     f"{_f(x.get('sinkhorn_share'), '.1%')} | {note} |")  # fmt: skip
    share = r.get("train", {}).get("bf16", {}).get("sinkhorn_share")
    if share is not None:  # above a fifth, a fused Sinkhorn kernel is worth writing
        lines += ["", f"Sinkhorn share of a bf16 step: {share:.1%}, {'above' if share > 0.2 else 'below'} a fifth."]
    return "\n".join(lines) + "\n"


def _env(device: torch.device, quick: bool) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "quick": quick,
            "cpu_count": os.cpu_count()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for bench_gpu.json and bench_gpu.md")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU: about a minute)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip later sections after this many seconds")
    ap.add_argument("--compile-backend", default=None, help="default: inductor on CUDA, aot_eager on the CPU")
    ap.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 1)))
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--train-compile", action="store_true", help="also train bf16 + torch.compile (minutes to compile)")
    args = ap.parse_args(argv)
    device = G.resolve_device(args.device)
    args.compile_backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    clock = Clock(args.budget_s)
    torch.manual_seed(0)
    r: dict[str, Any] = {"env": _env(device, args.quick)}
    if not args.skip_tests:
        r["tests"] = run_cuda_tests(max(60.0, args.budget_s * 0.45))
        log(f"tests: {r['tests'].get('status')} {r['tests'].get('counts')}")
    shape = (512, 1024, 32) if args.quick else (8192, 16384, 64)  # the paper's: 8192 vectors, 16384 codes
    r["assign"] = _guard(run_assign, shape, str(device), 1 if args.quick else 3)
    r["train"] = _guard(run_train, args, device, clock)  # before encode: it decides on a fused Sinkhorn kernel
    r["encode"] = _guard(run_encode, args, device, clock)
    r["seconds"] = clock.elapsed()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gpu.json").write_text(json.dumps(r, indent=1))
    (args.out / "bench_gpu.md").write_text(markdown(r))
    print(markdown(r))
    bad = _errors(r)
    for where in bad:
        log(f"error in {where}")
    return 1 if bad or r.get("tests", {}).get("status") not in (None, "ok") else 0


if __name__ == "__main__":
    sys.exit(main())
