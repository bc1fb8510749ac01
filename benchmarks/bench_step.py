"""One training step of the `mnist` preset at batch 1024 on the CPU: steps/s with the quantizer's
Sinkhorn workspace kept between steps (ours) against a fresh matrix every step (the baseline), on a
quiet machine and with one other busy process, plus peak resident memory.

Each configuration runs in a fresh process: forward (Sinkhorn over 262,144 vectors x 1,024 codes of
dimension 2), L1 + L2 + quantizer loss, backward, AdamW step; one warm-up step, then the median of
``--steps`` timed steps. Real MNIST digits from `make data` when present, else uniform noise.

    python benchmarks/bench_step.py [--steps 3] [--threads 1,2] [--mnist .data/mnist]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _batch(mnist: str, size: int):
    import torch

    from optvq_cli.train.data import open_splits, to_model_range

    if Path(mnist).exists():
        return to_model_range(open_splits(mnist, "mnist", channels=1, size=32).train.pixels[:size])
    return torch.rand(size, 1, 32, 32) * 2 - 1


def child(threads: int, keep: bool, steps: int, mnist: str) -> dict:
    import torch

    from optvq_cli.model import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model("mnist", device="cpu")
    model.train()
    if not keep:
        model.quantize.workspace = None  # sinkhorn_assign then makes a fresh matrix every call
    x = _batch(mnist, 1024)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        rec, qloss, _ = model(x)
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + qloss
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step = sorted(times[1:])[len(times[1:]) // 2]
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {"step_s": step, "peak_gb": peak_gb}


def _run(threads: int, keep: bool, busy: bool, args) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{threads},{int(keep)}", "--steps", str(args.steps)]
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([*cmd, "--mnist", args.mnist], capture_output=True, text=True, check=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--mnist", default=".data/mnist")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        threads, keep = map(int, args.child.split(","))
        print(json.dumps(child(threads, bool(keep), args.steps, args.mnist)))
        return
    print(f"torch threads {args.threads}; {os.cpu_count()} cores; batch 1024; median of {args.steps} steps\n")
    head = "| threads | other load | baseline (fresh matrix) | ours (workspace kept) | ours / baseline |"
    print(head + " peak RSS base / ours |")
    print("|---|---|---|---|---|---|")
    for busy in (False, True):
        for threads in map(int, args.threads.split(",")):
            base, ours = _run(threads, False, busy, args), _run(threads, True, busy, args)
            print(
                f"| {threads} | {'one busy process' if busy else 'quiet'} | {1 / base['step_s']:.3f} steps/s "
                f"| {1 / ours['step_s']:.3f} steps/s | {base['step_s'] / ours['step_s']:.2f}x "
                f"| {base['peak_gb']:.2f} / {ours['peak_gb']:.2f} GB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
