"""Benchmark of the code assignment: time and peak memory against the plain dense formulation.

Each (shape, method) runs in a fresh subprocess, so its peak memory is its own: peak extra memory
is the process's maximum resident size minus its resident size just before the first call (CPU),
or torch.cuda.max_memory_allocated minus the inputs (CUDA). Times are medians after one warm-up
call. Every ratio in the table comes from this one run.

    python benchmarks/bench_assign.py [--device cpu|cuda] [--shapes 8192x16384x64,...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT_SHAPES = "8192x16384x64,65536x1024x2,32768x16384x64,8192x100000x64"
METHODS = ["plain", "dense", "stream", "nearest", "floor", "stream_floor"]
N_ITERS = 5


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run_one(method: str, l_: int, n: int, d: int, device: str, reps: int, idx_path: str) -> dict:
    """Runs in the child process."""
    import torch

    from optvq_cli.quant.assign import nearest_assign, sinkhorn_assign, sinkhorn_assign_plain

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(l_, d, generator=g) * 0.8 + 0.1).to(device)
    codes = torch.randn(n, d, generator=g).to(device)

    # The floors exponentiate scaled products, which stay in fp32's normal range: subnormal or
    # infinite values would time the CPU's slow paths instead of the work.
    xs = x * (0.5 / d)

    def floor():
        # One l x n x d multiply, one exp pass, 2T matrix-vector passes: what any dense Sinkhorn must do.
        k = torch.mm(xs, codes.t())
        k.exp_()
        u, v = torch.ones(l_, device=device), torch.ones(n, device=device)
        for _ in range(N_ITERS):
            v = torch.mv(k.t(), u)
            u = torch.mv(k, v)
        return u

    def stream_floor():
        # T + 2 blocked passes of multiply + exp + column sums in 128-row blocks: the passes our streaming
        # mode makes (distance statistics, first column sums, T - 1 fused sweeps, argmax), each at its
        # cheapest. The premise was one such pass in about 0.11 s at 8192 x 16384 x 64.
        buf = torch.empty(128, n, device=device)
        col = torch.zeros(n, device=device)
        for _ in range(N_ITERS + 2):
            for s in range(0, l_, 128):
                col += torch.mm(xs[s : s + 128], codes.t(), out=buf[: min(128, l_ - s)]).exp_().sum(0)
        return col

    fn = {
        "plain": lambda: sinkhorn_assign_plain(x, codes, n_iters=N_ITERS),
        "dense": lambda: sinkhorn_assign(x, codes, n_iters=N_ITERS, max_bytes=1 << 62),
        "stream": lambda: sinkhorn_assign(x, codes, n_iters=N_ITERS, chunk_size=128),
        "nearest": lambda: nearest_assign(x, codes),
        "floor": floor,
        "stream_floor": stream_floor,
    }[method]
    # Load the libraries' lazily initialised parts (BLAS buffers, thread pools) before the baseline,
    # so the peak below is the call's own.
    small = torch.randn(64, d, device=device)
    sinkhorn_assign(small, small, chunk_size=16)
    sinkhorn_assign(small, small)
    torch.mm(small, small.t()).exp_()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    out = None
    for i in range(reps + 1):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        if i:  # the first call is the warm-up
            times.append(time.perf_counter() - t0)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    result = {"time_s": statistics.median(times), "peak_extra_bytes": max(peak, 0)}
    if method in ("plain", "dense", "stream"):
        if method == "plain":
            torch.save(out.cpu(), idx_path)
        elif os.path.exists(idx_path):
            ref = torch.load(idx_path, weights_only=True)
            result["agreement_with_plain"] = float((out.cpu() == ref).float().mean())
    return result


def _child_main(argv: list[str]) -> None:
    method, l_, n, d, device, reps, idx_path = argv
    res = _run_one(method, int(l_), int(n), int(d), device, int(reps), idx_path)
    print("RESULT " + json.dumps(res))


def _fits(method: str, l_: int, n: int, budget: int) -> bool:
    matrix = l_ * n * 4
    need = {"plain": 5 * matrix, "dense": 1.2 * matrix, "floor": 1.2 * matrix}.get(method, 0)
    return need <= budget


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated LxNxD")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--memory-budget-gb", type=float, default=16.0, help="skip methods that would need more")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import torch

    mib = 1024**2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            l_, n, d = (int(v) for v in shape.lower().split("x"))
            idx_path = os.path.join(tmp, f"{shape}.pt")
            matrix = l_ * n * 4
            reps = args.reps if l_ * n <= 2**28 else 1
            res = {}
            for method in args.methods.split(","):
                if not _fits(method, l_, n, int(args.memory_budget_gb * 1024**3)):
                    print(f"{shape} {method}: skipped (needs more than the memory budget)", file=sys.stderr)
                    continue
                cmd = [sys.executable, __file__, "--child", method, str(l_), str(n), str(d), args.device]
                cmd += [str(reps), idx_path]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not line:
                    print(f"{shape} {method}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                res[method] = json.loads(line[0][7:])
                r = res[method]
                print(
                    f"{shape:>18} {method:>8}: {r['time_s']:8.3f} s  peak +{r['peak_extra_bytes'] / mib:9.1f} MiB"
                    f"  ({r['peak_extra_bytes'] / matrix:.2f} x one l*n fp32 matrix)"
                    + (f"  agreement {r['agreement_with_plain']:.5f}" if "agreement_with_plain" in r else ""),
                    file=sys.stderr,
                )
            rows.append({"shape": [l_, n, d], "matrix_bytes": matrix, "results": res})

    def ratio(res, a, b):
        return f"{res[a]['time_s'] / res[b]['time_s']:.2f}" if a in res and b in res else "-"

    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__};"
        f" device {args.device}; T = {N_ITERS}\n"
    )
    print("| l x n x d | method | time (s) | peak extra (MiB) | x one l*n matrix | agreement with plain |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        for m, r in row["results"].items():
            agree = r.get("agreement_with_plain")
            print(
                f"| {'x'.join(map(str, row['shape']))} | {m} | {r['time_s']:.3f} | {r['peak_extra_bytes'] / mib:.0f} | "
                f"{r['peak_extra_bytes'] / row['matrix_bytes']:.2f} | {'-' if agree is None else f'{agree:.5f}'} |"
            )
    print(
        "\n| l x n x d | plain / dense | plain / stream | stream / dense | dense / nearest | dense / floor"
        " | stream / stream floor |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        r = row["results"]
        print(
            f"| {'x'.join(map(str, row['shape']))} | {ratio(r, 'plain', 'dense')} | {ratio(r, 'plain', 'stream')} | "
            f"{ratio(r, 'stream', 'dense')} | {ratio(r, 'dense', 'nearest')} | {ratio(r, 'dense', 'floor')} | "
            f"{ratio(r, 'stream', 'stream_floor')} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child_main(sys.argv[2:])
    else:
        main()
