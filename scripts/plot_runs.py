"""Training curves (PSNR and codebook usage against epoch) of several runs' metrics.jsonl.

python scripts/plot_runs.py OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    out, runs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
    fig, (ax_psnr, ax_use) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, run in runs:
        rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train = [r for r in rows if r.get("split") == "train"]
        ax_psnr.plot([r["epoch"] for r in train], [r.get("psnr_y", r.get("psnr")) for r in train], label=label)
        ax_use.plot([r["epoch"] for r in train], [100 * r["codebook_usage"] for r in train], label=label)
    ax_psnr.set(xlabel="epoch", ylabel="training-batch PSNR (dB)", title="reconstruction")
    ax_use.set(xlabel="epoch", ylabel="codes used in the batch (%)", title="codebook usage", yscale="log")
    save_panels(fig, (ax_psnr, ax_use), out)


def save_panels(fig, axes, out: str) -> None:
    """Grid, legend and layout shared by the docs/ figures, then the PNG."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
