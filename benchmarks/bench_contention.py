"""The streaming code assignment at the paper's shape on a quiet CPU and beside one other busy
process: its sweeps in 128-row blocks (8 MiB a block at 16,384 codes, the rule the dense mode keeps)
against at least ``assign.SINKHORN_MIN_ROWS`` rows a block (the streaming rule), with all cores'
threads and with one thread.

Each configuration runs in a fresh process; times are medians of 3 calls after a warm-up. The busy
process is a spinning Python process at normal priority (another job on the machine).

    python benchmarks/bench_contention.py [--shape 8192x16384x64] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from busy import run_child


def child(rows: int, threads: int, shape: str, reps: int) -> float:
    import torch

    from optvq_cli.quant import assign

    torch.set_num_threads(threads)
    l_, n, d = (int(v) for v in shape.split("x"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(l_, d, generator=g) * 0.8 + 0.1
    codes = torch.randn(n, d, generator=g)
    assign.SINKHORN_MIN_ROWS = rows  # 128 rows at this shape is what 8 MiB blocks give

    def call():
        return assign.sinkhorn_assign(x, codes, max_bytes=1)  # streams, with the default blocks

    call()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _run(rows: int, threads: int, busy: bool, args) -> float:
    cmd = [sys.executable, __file__, "--child", f"{rows},{threads}", "--shape", args.shape, "--reps", str(args.reps)]
    return run_child(cmd, 0 if busy else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8192x16384x64")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        rows, threads = map(int, args.child.split(","))
        print(json.dumps(child(rows, threads, args.shape, args.reps)))
        return
    from optvq_cli.quant.assign import SINKHORN_MIN_ROWS

    cores = os.cpu_count() or 1
    print(f"streaming sinkhorn_assign at {args.shape}; {cores} cores; median of {args.reps} calls\n")
    print(f"| threads | other load | 128-row blocks | {SINKHORN_MIN_ROWS}-row blocks | speed-up |")
    print("|---|---|---|---|---|")
    for threads, busy in ((cores, False), (cores, True), (1, False), (1, True)):
        before, now = _run(128, threads, busy, args), _run(SINKHORN_MIN_ROWS, threads, busy, args)
        load = "one busy process" if busy else "quiet"
        print(f"| {threads} | {load} | {before:.2f} s | {now:.2f} s | {before / now:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
