"""End-to-end figures: `optvq encode` images/s and `optvq train` steps/s, with the share of wall time
spent in the quantizer's code assignment.

Each command runs in-process through the real CLI, with `OptVQuantizer.assign_indices` wrapped by
a timer. Inputs are real: the photographs inside the installed scikit-image package (copied at a
few sizes) and MNIST from `make data` (or the idx files given with --mnist).

    python benchmarks/bench_e2e.py [--model default] [--mnist .data/mnist] [--device cpu] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from optvq_cli.cli import app
from optvq_cli.quant.quantizer import OptVQuantizer

_spent = {"assign": 0.0, "calls": 0}
_orig = OptVQuantizer.assign_indices


def _timed_assign(self, *args, **kwargs):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = _orig(self, *args, **kwargs)
    sync()
    _spent["assign"] += time.perf_counter() - t0
    _spent["calls"] += 1
    return out


OptVQuantizer.assign_indices = _timed_assign


def _run(args: list[str]) -> tuple[float, float]:
    _spent.update(assign=0.0, calls=0)
    t0 = time.perf_counter()
    try:
        app(args, standalone_mode=False)
    except SystemExit as e:
        if e.code:
            raise
    return time.perf_counter() - t0, _spent["assign"]


def _photos(dest: Path, copies: int) -> int:
    import skimage
    from PIL import Image

    src = Path(skimage.__file__).parent / "data"
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg"]
    n = 0
    for name in names:
        img = Image.open(src / name).convert("RGB")
        for k in range(copies):  # the same photo at a few scales: more images, still real content
            scale = 1.0 - 0.1 * k
            img.resize((max(64, int(img.width * scale)), max(64, int(img.height * scale)))).save(dest / f"{n}.png")
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="model for encode")
    ap.add_argument("--mnist", default=".data/mnist", help="MNIST idx folder for the train figure")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        n = _photos(tmp / "in", args.copies)
        for assign in ("nearest", "sinkhorn"):
            out = tmp / f"tok-{assign}"
            common = ["--model", args.model, "--device", args.device, "--assign", assign, "--batch-size", "32"]
            wall, q = _run(["encode", str(tmp / "in"), str(out), *common])
            rows.append((f"encode ({assign}), {n} photos", f"{n / wall:.1f} images/s", wall, q))
            shutil.rmtree(out)
        if Path(args.mnist).exists():
            run = tmp / "run"
            for quant in ("optvq", "vq"):
                cmd = ["train", "--preset", "mnist", "--data", args.mnist, "--out", str(run), "--quantizer", quant]
                cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--device", args.device]
                # a small held-out set: the final validation is not what is measured
                cmd += ["--set", "val_every=0", "--set", "ckpt_every=0", "--set", "data.val_size=256", "-q"]
                wall, q = _run(cmd)
                label = f"train mnist ({quant}), batch {args.batch_size}, {args.steps} steps"
                rows.append((label, f"{args.steps / wall:.2f} steps/s", wall, q))
                shutil.rmtree(run)
        else:
            print(f"no MNIST at {args.mnist} (run `make data`): train figure skipped", file=sys.stderr)

    print(f"\ndevice {args.device}; torch {torch.__version__}; {os.cpu_count()} cores\n")
    print("| run | throughput | wall (s) | in the quantizer's assignment |")
    print("|---|---|---|---|")
    for label, rate, wall, q in rows:
        print(f"| {label} | {rate} | {wall:.1f} | {q:.1f} s ({100 * q / wall:.0f} %) |")


if __name__ == "__main__":
    main()
