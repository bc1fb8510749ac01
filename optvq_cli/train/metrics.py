"""What training reports: the running window of loss terms, PSNR and codebook usage between two log
rows, and validation on the held-out split, with the same PSNR as `optvq eval`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from optvq_cli.core import dist as D
from optvq_cli.core.device import peak_memory_gb, pin_memory_for
from optvq_cli.core.fileio import atomic_write
from optvq_cli.eval.metrics import perplexity, psnr, usage_fraction
from optvq_cli.model import OptVQModel
from optvq_cli.train.data import make_loader, val_batches


def psnr01(x01: torch.Tensor, y01: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR as `optvq eval` reports it under ``psnr_y``: BT.601 luma for RGB, the one
    channel for grey."""
    return psnr(x01, y01, "y" if x01.shape[1] == 3 else "rgb")


def save_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path) -> None:
    """Originals on the top row, reconstructions below, as one PNG (written atomically)."""
    from PIL import Image
    from torchvision.utils import make_grid

    k = originals.shape[0]
    grid = make_grid(torch.cat([originals, recons]).float().clamp(-1, 1).add(1).div(2), nrow=k, padding=2)
    arr = grid.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr[:, :, 0] if originals.shape[1] == 1 else arr)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: img.save(p, format="PNG"))


@torch.no_grad()
def validate(model: OptVQModel, dataset, batch: int, device: torch.device, workers: int, grid: int):
    """PSNR and codebook usage of ``model`` on the held-out split, reduced over processes, computed
    as `optvq eval --assign A --batch-size B` computes them (A the model's training assignment, B
    ``batch``: Sinkhorn assigns each batch as one pool); plus the first ``grid`` originals and
    reconstructions."""
    was = model.training
    model.eval()
    n_codes = model.config.n_codes
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    counts = torch.zeros(n_codes, dtype=torch.long, device=device)
    shown = None
    batches = val_batches(len(dataset), batch, D.world_size(), D.rank())
    for x in make_loader(dataset, batches, workers, pin_memory_for(device)):
        x = x.to(device, non_blocking=True)
        # eval's path: indices, then the codes looked up exactly (a straight-through z_q equals them
        # only up to rounding at the features' scale)
        idx = model.quantize.indices(model.features(x), assign=model.config.assign)
        rec = model.decode_indices(idx).clamp(-1, 1)
        sums[0] += psnr01((x + 1) / 2, (rec + 1) / 2).sum()
        sums[1] += x.shape[0]
        counts += torch.bincount(idx.flatten(), minlength=n_codes)
        if shown is None and grid > 0:
            shown = (x[:grid].cpu(), rec[:grid].cpu())
    D.all_reduce_sum(sums)
    D.all_reduce_sum(counts)
    model.train(was)
    c = counts.cpu()
    stats = {
        "psnr_y": float(sums[0] / sums[1]) if sums[1] > 0 else None,
        "codebook_usage": usage_fraction(c),
        "perplexity": perplexity(c),
        "images": int(sums[1]),
        "assign": model.config.assign,
        "batch_size": batch,
    }
    return stats, shown


class Window:
    """Running training metrics between two log rows: mean loss terms, PSNR, codebook usage, speed."""

    def __init__(self, n_codes: int, device: torch.device, start_step: int):
        self.n_codes, self.device = n_codes, device
        self.reset()
        self.t0, self.last_step = time.perf_counter(), start_step

    def reset(self) -> None:
        self.terms: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.psnr = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(self.n_codes, dtype=torch.long, device=self.device)

    def state(self) -> dict[str, Any]:
        return {
            "terms": {k: torch.as_tensor(v).detach().cpu() for k, v in self.terms.items()},
            "steps": self.steps,
            "psnr": self.psnr.cpu(),
            "counts": self.counts.cpu(),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.terms = {k: v.to(self.device) for k, v in state["terms"].items()}
        self.steps = state["steps"]
        self.psnr = state["psnr"].to(self.device)
        self.counts = state["counts"].to(self.device)

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor, rec: torch.Tensor, indices: torch.Tensor) -> None:
        p = psnr01((x + 1) / 2, (rec.clamp(-1, 1) + 1) / 2)
        self.psnr[0] += p.nan_to_num(0.0).sum()
        self.psnr[1] += p.isfinite().sum()
        self.counts += torch.bincount(indices.flatten(), minlength=self.n_codes)

    def add_terms(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v
        self.steps += 1

    def flush(self, step: int, steps_per_epoch: int, lr: float, skipped: int) -> dict[str, Any]:
        """The log row for the steps since the last one (a collective: every process calls it)."""
        reduced = D.mean_of({k: v / max(1, self.steps) for k, v in self.terms.items()})
        D.all_reduce_sum(self.psnr)
        D.all_reduce_sum(self.counts)
        now = time.perf_counter()
        row = {
            "step": step,
            "split": "train",
            "epoch": round(step / steps_per_epoch, 4),
            **{k: round(v, 6) for k, v in reduced.items()},
            "psnr_y": float(self.psnr[0] / self.psnr[1]) if self.psnr[1] > 0 else None,
            "codebook_usage": usage_fraction(self.counts.cpu()),
            "perplexity": perplexity(self.counts.cpu()),
            "lr": lr,
            "steps_per_s": (step - self.last_step) / max(now - self.t0, 1e-9),
            "skipped": skipped,
        }
        mem = peak_memory_gb(self.device)
        if mem is not None:  # CUDA: the largest per-process peak since the last row
            row["gpu_mem_gb"] = round(D.all_reduce_max(torch.tensor([mem], device=self.device)).item(), 3)
        self.reset()
        self.t0, self.last_step = now, step
        return row
