"""The VQGAN encoder and decoder (taming-transformers' ResNet + attention design), as the OptVQ
ImageNet models use them.

Module and parameter names follow the published checkpoints exactly (``conv_in``,
``down.{i}.block.{j}``, ``down.{i}.attn.{j}``, ``down.{i}.downsample.conv``, ``mid.block_1``,
``mid.attn_1``, ``mid.block_2``, ``up.{i}...``, ``norm_out``, ``conv_out``), and every layer
computes what theirs computes, so the authors' weights load and give their numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

GROUPS = 32
NORM_EPS = 1e-6


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    if channels % GROUPS:
        raise ValueError(f"GroupNorm with {GROUPS} groups needs channels divisible by {GROUPS}, got {channels}")
    return nn.GroupNorm(GROUPS, channels, eps=NORM_EPS, affine=True)


def run_block(module: nn.Module, h: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """``module(h)``; with ``checkpointing`` while gradients are on, the module's activations are
    recomputed in the backward pass instead of kept (memory for compute; same values and gradients)."""
    if checkpointing and torch.is_grad_enabled() and h.requires_grad:
        return torch.utils.checkpoint.checkpoint(module, h, use_reentrant=False)
    return module(h)


def set_checkpointing(module: nn.Module, enabled: bool) -> int:
    """Gradient checkpointing of every VQGAN encoder / decoder inside ``module``, block by block;
    returns how many it switched (0: no VQGAN part)."""
    parts = [m for m in module.modules() if isinstance(m, (Encoder, Decoder))]
    for part in parts:
        part.checkpointing = enabled
    return len(parts)


def conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1)


def conv1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1)


class ResnetBlock(nn.Module):
    """norm, swish, conv, norm, swish, (dropout), conv, plus a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = conv3(cin, cout)
        self.norm2 = group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3(cout, cout)
        self.nin_shortcut = conv1(cin, cout) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, 1x1 q/k/v/proj_out, scores scaled by 1/sqrt(c)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v = (
            conv1(channels, channels),
            conv1(channels, channels),
            conv1(channels, channels),
        )
        self.proj_out = conv1(channels, channels)
        self.scale = float(channels) ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).transpose(1, 2)  # (b, hw, c)
        k = self.k(h).reshape(b, c, hh * ww)  # (b, c, hw)
        v = self.v(h).reshape(b, c, hh * ww)
        attn = torch.softmax(torch.bmm(q, k) * self.scale, dim=2)  # (b, hw_q, hw_k)
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero pad (0, 1, 0, 1), then a 3x3 stride-2 convolution: halves H and W (even sizes)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (empty or one per block), and an
    optional ``downsample`` / ``upsample`` attached by the caller."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run_blocks(self, h: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = run_block(block, h, checkpointing)
            if len(self.attn) > 0:
                h = run_block(self.attn[i], h, checkpointing)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
        for part in (self.block_1, self.attn_1, self.block_2):
            h = run_block(part, h, checkpointing)
        return h


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> features (B, z_channels, H/f, W/f), f = 2**(len(ch_mult)-1).

    Attention follows every block of a level whose nominal size (``resolution`` halved per level)
    is in ``attn_resolutions``: it depends on the configured resolution, not the input's size.
    """

    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        resolution: int = 256,
        z_channels: int = 256,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.conv_in = conv3(in_channels, ch)
        widths = [ch * m for m in (1, *ch_mult)]
        res = resolution
        levels = []
        for i in range(len(ch_mult)):
            cin, cout = widths[i], widths[i + 1]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, dropout) for j in range(num_res_blocks)]
            attns = [AttnBlock(cout) for _ in range(num_res_blocks)] if res in attn_resolutions else []
            level = _Level(blocks, attns)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(cout)
                res //= 2
            levels.append(level)
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(widths[-1], dropout)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = conv3(widths[-1], z_channels)
        self.checkpointing = False  # see set_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h, self.checkpointing)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h, self.checkpointing)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Features (B, z_channels, h, w) -> images (B, out_channels, h*f, w*f).

    ``up`` is indexed like the encoder's ``down`` (level 0 = full resolution) but run from the
    coarsest level; each level has ``num_res_blocks + 1`` blocks.
    """

    def __init__(
        self,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        resolution: int = 256,
        z_channels: int = 256,
        dropout: float = 0.0,
    ):
        super().__init__()
        n_levels = len(ch_mult)
        cin = ch * ch_mult[-1]
        res = resolution // 2 ** (n_levels - 1)
        self.conv_in = conv3(z_channels, cin)
        self.mid = _Mid(cin, dropout)
        levels: list[nn.Module] = [nn.Module()] * n_levels
        for i in reversed(range(n_levels)):
            cout = ch * ch_mult[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, dropout) for j in range(num_res_blocks + 1)]
            attns = [AttnBlock(cout) for _ in range(num_res_blocks + 1)] if res in attn_resolutions else []
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(cout)
                res *= 2
            levels[i] = level
            cin = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(cin)
        self.conv_out = conv3(cin, out_channels)
        self.checkpointing = False  # see set_checkpointing

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z), self.checkpointing)
        for level in reversed(self.up):
            h = level.run_blocks(h, self.checkpointing)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))
