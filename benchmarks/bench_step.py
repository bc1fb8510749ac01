"""One training step of the `mnist` preset at batch 1024 on the CPU: steps/s with the quantizer's
Sinkhorn workspace kept between steps (ours) against a fresh matrix every step (the baseline), on a
quiet machine, beside one other busy process, and beside one at the priority optvq's reader workers
run at, plus peak resident memory.

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

from busy import run_child

from optvq_cli.core.workers import READER_NICE


def _batch(mnist: str, size: int):
    import torch

    from optvq_cli.train.data import open_splits, to_model_range

    if Path(mnist).exists():
        return to_model_range(open_splits(mnist, "mnist", channels=1, size=32).train.pixels[:size])
    return torch.rand(size, 1, 32, 32) * 2 - 1


def child(threads: int, keep: bool, steps: int, mnist: str, layout: bool = False, compiled: bool = False) -> dict:
    import torch

    from optvq_cli.core import device as G
    from optvq_cli.model import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = G.channels_last(build_model("mnist", device="cpu"), layout)
    model.train()
    if not keep:
        model.quantize.workspace = None  # sinkhorn_assign then makes a fresh matrix every call
    for part in (model.encoder, model.decoder):  # as the training loop does with compile=true
        G.compile_module(part, compiled)
    x = G.channels_last(_batch(mnist, 1024), layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1 + 2 * compiled):  # compiling: the first calls build the kernels
        t0 = time.perf_counter()
        rec, qloss, _ = model(x)
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + qloss
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    timed = times[1 + 2 * compiled :]
    step = sorted(timed)[len(timed) // 2]
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {"step_s": step, "peak_gb": peak_gb, "warmup_s": sum(times) - sum(timed)}


# Other load on the machine: none, one busy process at normal priority, or one at the priority
# optvq's reader workers run at (core.workers.READER_NICE).
LOADS = {
    "quiet": None,
    "one busy process": 0,
    f"one busy process at nice {READER_NICE} (as optvq's readers)": READER_NICE,
}


def _run(threads: int, keep: bool, nice: int | None, args, layout: bool = False, compiled: bool = False) -> dict:
    spec = ",".join(str(int(v)) for v in (threads, keep, layout, compiled))
    return run_child(
        [sys.executable, __file__, "--child", spec, "--steps", str(args.steps), "--mnist", args.mnist], nice
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--mnist", default=".data/mnist")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        threads, keep, layout, compiled = map(int, args.child.split(","))
        print(json.dumps(child(threads, bool(keep), args.steps, args.mnist, bool(layout), bool(compiled))))
        return
    print(f"torch threads {args.threads}; {os.cpu_count()} cores; batch 1024; median of {args.steps} steps\n")
    head = "| threads | other load | baseline (fresh matrix) | ours (workspace kept) | ours / baseline |"
    print(head + " peak RSS base / ours |")
    print("|---|---|---|---|---|---|")
    for load, nice in LOADS.items():
        for threads in map(int, args.threads.split(",")):
            base, ours = _run(threads, False, nice, args), _run(threads, True, nice, args)
            print(
                f"| {threads} | {load} | {1 / base['step_s']:.3f} steps/s "
                f"| {1 / ours['step_s']:.3f} steps/s | {base['step_s'] / ours['step_s']:.2f}x "
                f"| {base['peak_gb']:.2f} / {ours['peak_gb']:.2f} GB |",
                flush=True,
            )
    _conv_table(args)


def _conv_table(args) -> None:
    """The convolutions' share (about 35-40 % of a step): channels-last memory format and
    torch.compile (inductor, as the training key ``compile=true``) against the plain eager step, workspace kept."""
    threads = max(map(int, args.threads.split(",")))
    print(f"\n{threads} threads, quiet, workspace kept\n")
    print("| convolutions | steps/s | / eager | warm-up steps (compiling) | peak RSS |")
    print("|---|---|---|---|---|")
    base = None
    for name, layout, compiled in (
        ("eager", 0, 0),
        ("channels-last", 1, 0),
        ("compiled", 0, 1),
        ("channels-last + compiled", 1, 1),
    ):
        try:
            r = _run(threads, True, None, args, bool(layout), bool(compiled))
        except subprocess.CalledProcessError as e:  # inductor needs a C++ compiler
            print(f"| {name} | failed: {(e.stderr or '').strip().splitlines()[-1:]} | | | |", flush=True)
            continue
        base = base or r["step_s"]
        row = f"| {name} | {1 / r['step_s']:.3f} | {base / r['step_s']:.2f}x | {r['warmup_s']:.1f} s |"
        print(f"{row} {r['peak_gb']:.2f} GB |", flush=True)


if __name__ == "__main__":
    main()
