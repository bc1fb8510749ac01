"""The plain CNN of the paper's Table 4 (MNIST / CIFAR-10 experiments): f = 4, ReLU.

Names follow the authors' checkpoints (``in_fc``, ``down1``, ``conv1``, ``down2``, ``conv2``,
``out_fc``, and ``up1`` / ``up2`` in the decoder). With the paper's widths (16, 16, 32):
encoder 3x3 conv in -> 16, 2x2/2 conv, 3x3 conv, 2x2/2 conv, 3x3 conv -> 32, 3x3 conv 32 -> 32;
the decoder mirrors it with 2x2/2 transposed convolutions. Neither ends with an activation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DOWNSAMPLE = 4


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1)


class PlainCNNEncoder(nn.Module):
    """Images (B, in_channels, H, W) -> features (B, widths[2], H/4, W/4)."""

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (16, 16, 32)):
        super().__init__()
        a, b, c = widths
        self.in_fc = _conv3(in_channels, a)
        self.down1 = nn.Conv2d(a, a, kernel_size=2, stride=2)
        self.conv1 = _conv3(a, b)
        self.down2 = nn.Conv2d(b, b, kernel_size=2, stride=2)
        self.conv2 = _conv3(b, c)
        self.out_fc = _conv3(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.in_fc(x))
        h = F.relu(self.conv1(self.down1(h)))
        h = F.relu(self.conv2(self.down2(h)))
        return self.out_fc(h)


class PlainCNNDecoder(nn.Module):
    """Features (B, widths[2], h, w) -> images (B, out_channels, 4h, 4w)."""

    def __init__(self, out_channels: int = 3, widths: Sequence[int] = (16, 16, 32)):
        super().__init__()
        a, b, c = widths
        self.in_fc = _conv3(c, c)
        self.up1 = nn.ConvTranspose2d(c, b, kernel_size=2, stride=2)
        self.conv1 = _conv3(b, b)
        self.up2 = nn.ConvTranspose2d(b, a, kernel_size=2, stride=2)
        self.conv2 = _conv3(a, a)
        self.out_fc = _conv3(a, out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.in_fc(z)
        h = self.conv1(self.up1(F.relu(h)))
        h = self.conv2(self.up2(F.relu(h)))
        return self.out_fc(F.relu(h))
