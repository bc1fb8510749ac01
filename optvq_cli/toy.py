"""The paper's two small experiments: 2-D code dynamics (Fig. 6, Sec. 4.3) and Sinkhorn convergence (Fig. 9).

Fig. 6: 100 data points and 25 codes, drawn at random; the codes are free parameters trained by
the commitment loss (mean squared distance between each point and its assigned code, the data held
fixed) once with nearest-neighbour assignment (vanilla VQ) and once with OptVQ's Sinkhorn
assignment. The codes start misaligned with the data (same spread, shifted away), the situation of
Sec. 3.2 where nearest-neighbour search only ever reaches the codes facing the data.

Fig. 9: 10 points, 10 codes, dimension 16, epsilon 10: the plain Sinkhorn plans A^0 ... A^T.

Everything runs on the CPU: the problems are tiny (GPU launches would dominate) and a fixed device
keeps the figures identical from machine to machine. Same seed, same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from optvq_cli.core.fileio import atomic_write
from optvq_cli.quant.assign import nearest_assign, sinkhorn_assign, sinkhorn_plans

# Fig. 6 set-up (Sec. 4.3): 100 points, 25 codes in 2-D.
N_POINTS = 100
N_CODES = 25
# Codes ~ N(offset, I) while data ~ N(0, I): same shape, about 4.2 data standard deviations away.
CODE_OFFSET = (3.0, 3.0)
DEFAULT_STEPS = 200
LEARNING_RATE = 0.05  # Adam, the optimizer family the paper trains with (AdamW)
# Sinkhorn settings used throughout the paper (Sec. 4.1).
EPSILON = 10.0
SINKHORN_ITERS = 5
# Fig. 9 set-up (Sec. 4.4).
FIG9_POINTS = 10
FIG9_CODES = 10
FIG9_DIM = 16
FIG9_ITERS = 10  # the curve runs past the paper's 5 to show what the 5 leave on the table
FIG9_HEATMAPS = 6  # A^0 ... A^5

VQ_COLOR = "#d62728"  # red, as in the paper
OPTVQ_COLOR = "#2ca02c"  # green, as in the paper
DATA_COLOR = "#9a9a9a"

Assign = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CodeRun:
    """One method's training run; index t of each array is the state before step t (last: final)."""

    method: str
    path: np.ndarray  # (steps + 1, n_codes, 2) code positions
    usage: np.ndarray  # (steps + 1,) number of distinct codes assigned
    loss: np.ndarray  # (steps + 1,) commitment loss
    counts: np.ndarray  # (n_codes,) points per code at the end

    @property
    def final_usage(self) -> int:
        return int(self.usage[-1])

    @property
    def n_codes(self) -> int:
        return int(self.path.shape[1])


@dataclass(frozen=True)
class ToyResult:
    seed: int
    steps: int
    data: np.ndarray  # (n_points, 2)
    vq: CodeRun
    optvq: CodeRun


def optvq_assign(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """OptVQ's assignment with the paper's settings (epsilon 10, 5 Sinkhorn iterations)."""
    return sinkhorn_assign(x, codes, epsilon=EPSILON, n_iters=SINKHORN_ITERS)


def toy_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Data ~ N(0, I) (100 x 2) and initial codes ~ N(CODE_OFFSET, I) (25 x 2), from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(N_POINTS, 2, generator=g)
    codes = torch.randn(N_CODES, 2, generator=g) + torch.tensor(CODE_OFFSET)
    return data, codes


class Adam:
    """Adam (Kingma & Ba) for one tensor, as torch.optim.Adam computes it with its defaults.

    Written out because constructing torch.optim.Adam first imports about 900 modules (2 s), most
    of this command's run time; tests check it against torch.optim.Adam."""

    def __init__(self, param: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.t += 1
        self.m.lerp_(grad, 1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v.sqrt() / math.sqrt(1 - b2**self.t)).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-self.lr / (1 - b1**self.t))


def commitment_loss(data: torch.Tensor, codes: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Mean squared distance from each point to its code: the commitment term that moves the codes."""
    return ((data - codes[idx]) ** 2).sum(1).mean()


def train_codes(
    data: torch.Tensor,
    codes0: torch.Tensor,
    assign: Assign,
    steps: int,
    method: str,
    lr: float = LEARNING_RATE,
) -> CodeRun:
    """Train the code table alone by the commitment loss under ``assign``, recording every step."""
    codes = codes0.clone().requires_grad_(True)
    adam = Adam(codes, lr)
    path, usage, losses = [], [], []
    for t in range(steps + 1):
        idx = assign(data, codes.detach())
        loss = commitment_loss(data, codes, idx)
        path.append(codes.detach().clone())
        usage.append(int(idx.unique().numel()))
        losses.append(float(loss.detach()))
        if t == steps:  # the last pass only measures the trained codes
            break
        (grad,) = torch.autograd.grad(loss, codes)
        adam.step(grad)
    counts = torch.bincount(idx, minlength=codes.shape[0])
    return CodeRun(
        method=method,
        path=torch.stack(path).numpy(),
        usage=np.asarray(usage),
        loss=np.asarray(losses),
        counts=counts.numpy(),
    )


@contextmanager
def single_thread() -> Iterator[None]:
    """One torch thread for the duration: on tensors this small, extra threads only wait on each other
    (measured: 0.3 s instead of 4-9 s for the default run on a busy 2-core machine). The ops stay
    below torch's parallel grain size either way, so the numbers do not change."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_toy(seed: int = 0, steps: int = DEFAULT_STEPS) -> ToyResult:
    """Fig. 6: the same data and initial codes trained with vanilla VQ and with OptVQ."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    data, codes0 = toy_data(seed)
    with single_thread():
        vq = train_codes(data, codes0, nearest_assign, steps, "vanilla VQ")
        opt = train_codes(data, codes0, optvq_assign, steps, "OptVQ")
    return ToyResult(seed=seed, steps=steps, data=data.numpy(), vq=vq, optvq=opt)


def sinkhorn_convergence(seed: int = 0, n_iters: int = FIG9_ITERS) -> list[np.ndarray]:
    """Fig. 9: the plans A^0 ... A^T for 10 random points and 10 random codes in 16-D, epsilon 10."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(FIG9_POINTS, FIG9_DIM, generator=g)
    codes = torch.randn(FIG9_CODES, FIG9_DIM, generator=g)
    with single_thread():
        return [a.numpy() for a in sinkhorn_plans(x, codes, EPSILON, n_iters)]


def plan_errors(plans: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per iteration t: the largest change since A^(t-1) and the marginal errors, all in units of
    1/l or 1/n (the target masses), so 1.0 means "off by a whole point's mass"."""
    l_, n = plans[0].shape
    change = [np.nan] + [float(np.abs(b - a).max() * l_) for a, b in zip(plans, plans[1:], strict=False)]
    col = [float(np.abs(a.sum(0) * n - 1).max()) for a in plans]
    row = [float(np.abs(a.sum(1) * l_ - 1).max()) for a in plans]
    return {"change": np.asarray(change), "column": np.asarray(col), "row": np.asarray(row)}


# ---------------------------------------------------------------- figures (matplotlib, no pyplot)


def _figure(figsize: tuple[float, float], dpi: int = 100):
    # A bare Figure never touches pyplot's global state or a display: Agg renders it.
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=dpi, layout="constrained")


def _limits(result: ToyResult) -> tuple[tuple[float, float], tuple[float, float]]:
    pts = np.concatenate([result.data, result.vq.path.reshape(-1, 2), result.optvq.path.reshape(-1, 2)])
    lo, hi = pts.min(0), pts.max(0)
    pad = 0.06 * (hi - lo).max()
    return (lo[0] - pad, hi[0] + pad), (lo[1] - pad, hi[1] + pad)


def _title(run: CodeRun, t: int | None = None) -> str:
    used = run.final_usage if t is None else int(run.usage[t])
    return f"{run.method}: {used}/{run.n_codes} codes used"


def _draw_run(ax, result: ToyResult, run: CodeRun, color: str) -> None:
    ax.scatter(*result.data.T, s=14, c=DATA_COLOR, label="data point", zorder=1)
    for j in range(run.n_codes):
        ax.plot(*run.path[:, j].T, color=color, lw=0.8, alpha=0.45, zorder=2)
    ax.scatter(*run.path[0].T, s=30, facecolors="none", edgecolors=color, lw=1.0, label="initial code", zorder=3)
    used = run.counts > 0
    end = run.path[-1]
    ax.scatter(*end[used].T, s=42, c=color, edgecolors="black", lw=0.6, label="final code, used", zorder=4)
    if (~used).any():
        ax.scatter(*end[~used].T, s=46, c=color, marker="x", lw=1.6, label="final code, unused", zorder=4)
    xlim, ylim = _limits(result)
    ax.set(xlim=xlim, ylim=ylim, aspect="equal", xticks=[], yticks=[])
    ax.set_title(_title(run), color=color, fontweight="bold")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)


def fig6_figure(result: ToyResult):
    """Both trajectories side by side and the number of codes used at each step."""
    fig = _figure((15.5, 5.4))
    axes = fig.subplots(1, 3, width_ratios=[1, 1, 0.9])
    _draw_run(axes[0], result, result.vq, VQ_COLOR)
    _draw_run(axes[1], result, result.optvq, OPTVQ_COLOR)
    ax = axes[2]
    steps = np.arange(result.steps + 1)
    for run, color in ((result.vq, VQ_COLOR), (result.optvq, OPTVQ_COLOR)):
        ax.plot(steps, run.usage, color=color, lw=2, label=run.method)
    ax.axhline(result.vq.n_codes, color="black", lw=0.8, ls=":", label="all codes")
    ax.set(xlabel="training step", ylabel="codes used", ylim=(0, result.vq.n_codes + 1), xlim=(0, result.steps))
    ax.set_title("Code usage during training")
    ax.legend(loc="center right", fontsize=9)
    fig.suptitle(
        f"Fig. 6 (Sec. 4.3): {N_POINTS} points, {N_CODES} codes trained by the commitment loss "
        f"({result.steps} Adam steps, seed {result.seed})"
    )
    return fig


def fig9_figure(plans: Sequence[np.ndarray], n_heatmaps: int = FIG9_HEATMAPS):
    """A^t as heatmaps (rows scaled to the data point's mass) and the convergence curves."""
    from matplotlib.colors import LogNorm

    n_heatmaps = min(n_heatmaps, len(plans))
    l_, n = plans[0].shape
    final = plans[-1].argmax(1)
    fig = _figure((17, 4.2))
    axes = fig.subplots(1, n_heatmaps + 1, width_ratios=[1] * n_heatmaps + [2.2])
    norm = LogNorm(vmin=1e-4, vmax=1.0)
    for t, ax in enumerate(axes[:n_heatmaps]):
        a = plans[t] * l_
        im = ax.imshow(np.clip(a, 1e-4, None), cmap="viridis", norm=norm)
        k = a.argmax(1)
        ax.scatter(k, np.arange(l_), s=10, c="white", marker="o")
        off = int((k != final).sum())
        ax.set_title(f"$A^{{{t}}}$ ({off} argmax $\\neq A^{{{len(plans) - 1}}}$)", fontsize=10)
        ax.set(xticks=[], yticks=[])
        ax.set_xlabel("codes", fontsize=8)
    axes[0].set_ylabel("data points", fontsize=8)
    fig.colorbar(im, ax=list(axes[:n_heatmaps]), shrink=0.8, label="$l \\cdot A_{ij}$ (row mass 1)")
    err = plan_errors(plans)
    ax = axes[-1]
    t = np.arange(len(plans))
    ax.semilogy(t[1:], err["change"][1:], "o-", label=r"change $\max|A^t-A^{t-1}|\cdot l$")
    ax.semilogy(t, err["column"], "s-", label=r"code-mass error $\max_j|n\sum_i A_{ij}-1|$")
    ax.axvline(SINKHORN_ITERS, color="gray", ls=":", lw=1)
    ax.text(SINKHORN_ITERS + 0.1, ax.get_ylim()[1], " 5 iterations\n (OptVQ default)", va="top", fontsize=8)
    ax.set(xlabel="Sinkhorn iteration t", title="Convergence")
    ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(
        f"Fig. 9 (Sec. 4.4): Sinkhorn plans for {l_} points, {n} codes, dimension {FIG9_DIM}, "
        f"$\\epsilon$ = {EPSILON:g} (white dot: each point's argmax code)"
    )
    return fig


def _gif_frames(result: ToyResult, n_frames: int, dpi: int):
    """Renders the two panels at evenly spaced steps, moving the artists instead of redrawing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    fig = _figure((10, 5.2), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    xlim, ylim = _limits(result)
    artists = []
    for ax, run, color in ((axes[0], result.vq, VQ_COLOR), (axes[1], result.optvq, OPTVQ_COLOR)):
        ax.scatter(*result.data.T, s=12, c=DATA_COLOR)
        ax.scatter(*run.path[0].T, s=24, facecolors="none", edgecolors=color, lw=0.8, alpha=0.6)
        trails = [ax.plot([], [], color=color, lw=0.8, alpha=0.45)[0] for _ in range(run.n_codes)]
        dots = ax.scatter(*run.path[0].T, s=38, c=color, edgecolors="black", lw=0.6, zorder=4)
        ax.set(xlim=xlim, ylim=ylim, aspect="equal", xticks=[], yticks=[])
        artists.append((ax, run, color, trails, dots))
    frames = []
    for t in np.unique(np.linspace(0, result.steps, n_frames).round().astype(int)):
        for ax, run, color, trails, dots in artists:
            for j, line in enumerate(trails):
                line.set_data(run.path[: t + 1, j, 0], run.path[: t + 1, j, 1])
            dots.set_offsets(run.path[t])
            ax.set_title(_title(run, t), color=color, fontweight="bold")
        fig.suptitle(f"step {t}/{result.steps} (seed {result.seed})")
        canvas.draw()
        rgb = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
        frames.append(rgb.quantize(colors=64, method=Image.Quantize.MEDIANCUT))
    return frames


def save_png(fig, path: Path, dpi: int = 110) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def save_gif(result: ToyResult, path: Path, n_frames: int = 60, dpi: int = 80) -> None:
    """Animated Fig. 6: both code tables moving step by step; the last frame holds for 2 s."""
    frames = _gif_frames(result, n_frames, dpi)
    durations = [80] * (len(frames) - 1) + [2000]

    def write(tmp: Path) -> None:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)

    atomic_write(path, write)
