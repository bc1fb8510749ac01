"""Table 3's trend from the runs of scripts/table3.sh: test PSNR and codebook usage against the
codebook size, vanilla VQ vs OptVQ, as a markdown table and a PNG.

python scripts/table3_summary.py RUNS_DIR OUT.png
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from plot_runs import save_panels  # noqa: E402  (scripts/ is on sys.path when run as a script)

SIZES = [128, 1024, 4096, 16384]
LABELS = {"vq": "vanilla VQ (nearest)", "optvq": "OptVQ (Sinkhorn)"}


def final_val(run: Path) -> dict | None:
    """The last validation row (the 10,000 test digits) and the last training row's l2."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    val = [r for r in rows if r.get("split") == "val"]
    train = [r for r in rows if r.get("split") == "train" and "l2" in r]
    if not val:
        return None
    row = val[-1]
    return {**row, "psnr_y": row.get("psnr_y", row.get("psnr")), "train_l2": train[-1]["l2"] if train else None}


def main() -> None:
    runs, out = Path(sys.argv[1]), sys.argv[2]
    results = {(q, n): final_val(runs / f"{q}-{n}") for q in LABELS for n in SIZES}
    print("| codebook size | " + " | ".join(str(n) for n in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for key, name, fmt in [("psnr_y", "test PSNR (dB)", "{:.2f}"), ("codebook_usage", "code usage", "{:.2%}")]:
        for q, label in LABELS.items():
            cells = [fmt.format(r[key]) if (r := results[q, n]) else "–" for n in SIZES]
            print(f"| {name}, {label} | " + " | ".join(cells) + " |")
    fig, (ax_psnr, ax_use) = plt.subplots(1, 2, figsize=(10, 3.6))
    for q, label in LABELS.items():
        done = [(n, r) for n in SIZES if (r := results[q, n])]
        ax_psnr.plot([n for n, _ in done], [r["psnr_y"] for _, r in done], "o-", label=label)
        ax_use.plot([n for n, _ in done], [100 * r["codebook_usage"] for _, r in done], "o-", label=label)
    ax_psnr.set(xlabel="codebook size", ylabel="test PSNR (dB)", title="reconstruction", xscale="log")
    ax_use.set(xlabel="codebook size", ylabel="codes used (%)", title="codebook usage", xscale="log", yscale="log")
    for ax in (ax_psnr, ax_use):
        ax.set_xticks(SIZES, [str(n) for n in SIZES])
    save_panels(fig, (ax_psnr, ax_use), out)


if __name__ == "__main__":
    main()
