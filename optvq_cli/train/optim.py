"""Optimizers and schedules of the authors' recipe: AdamW with decay on conv / linear weights only,
OneCycle (warm-up, cosine), an optional EMA of the weights."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from optvq_cli.model import OptVQModel
from optvq_cli.train.config import OptimConfig

_DECAYED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.MultiheadAttention)


def last_layer(model: OptVQModel) -> torch.Tensor:
    """The decoder's output conv weight: where VQGAN's adaptive weight compares gradients."""
    dec = model.decoder
    return dec.conv_out.weight if hasattr(dec, "conv_out") else dec.out_fc.weight


def param_groups(modules: list[nn.Module], lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: conv / linear weights with weight decay; everything else (norms, biases,
    the codebook embedding) without, as in the authors' trainer."""
    decay, rest, seen = [], [], set()
    for module in modules:
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                (decay if isinstance(sub, _DECAYED) and name.endswith("weight") else rest).append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": rest, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(groups: list[dict[str, Any]], o: OptimConfig, total_steps: int):
    opt = torch.optim.AdamW(groups, betas=o.betas, eps=o.eps)
    # OneCycle (Smith & Topin): from max/25 up to max in the first `warmup` share, cosine down to
    # max/25e4; it also cycles Adam's beta1 (0.85 <-> 0.95), as the authors' runs did.
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in groups], total_steps=total_steps, pct_start=o.warmup, anneal_strategy="cos"
    )
    return opt, sched


def load_schedule(sched: torch.optim.lr_scheduler.OneCycleLR, state: dict[str, Any]) -> None:
    """Restore a schedule's position but keep its length: a run extended with ``--steps`` goes on
    along the schedule stretched to the new length (OneCycle keeps its phase ends in its state)."""
    total, phases = sched.total_steps, sched._schedule_phases
    sched.load_state_dict(state)
    sched.total_steps, sched._schedule_phases = total, phases


def step_schedules(*schedules) -> None:
    """Advance the schedules every step, also when the optimizer did not step (a skipped step, the
    discriminator before ``disc_start``): the learning rate follows the step count."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        for s in schedules:
            if s is not None:
                s.step()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)
