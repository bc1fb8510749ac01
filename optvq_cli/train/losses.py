"""The training losses of the paper's recipe (Sec. 4.1, after VQGAN): L1, L2, a perceptual loss
(LPIPS), the quantizer loss, and a PatchGAN discriminator with the hinge loss whose generator term
is scaled by VQGAN's adaptive weight.

Images are in [-1, 1] throughout. The losses run in fp32 (as the authors' loss module does, with
autocast off), whatever the model's autocast dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------- the discriminator


class PatchDiscriminator(nn.Module):
    """Pix2Pix's PatchGAN (Isola et al.) as VQGAN uses it: a 4x4 conv with stride 2 and leaky ReLU,
    ``layers - 1`` more stride-2 convs doubling the width (at most 8x) with batch norm, one stride-1
    conv, and a 1-channel stride-1 conv: one real/fake logit per overlapping patch."""

    def __init__(self, in_channels: int = 3, filters: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, filters, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            # No bias before a batch norm: its shift does the job.
            seq += [
                nn.Conv2d(filters * prev, filters * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(filters * mult),
                nn.LeakyReLU(0.2, True),
            ]
        seq.append(nn.Conv2d(filters * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DCGAN's init: conv weights N(0, 0.02), batch-norm scales N(1, 0.02) and shifts 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge GAN: -E[D(x_rec)]."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN's balance: ||grad_L rec|| / (||grad_L g|| + 1e-4) at the decoder's last layer L,
    clamped to [0, max_weight] and detached; 0 when it is not finite."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = rec_grad.norm() / (g_grad.norm() + 1e-4)
    w = w.clamp(0.0, max_weight).detach()
    return torch.where(torch.isfinite(w), w, torch.zeros_like(w))


# ---------------------------------------------------------------- reconstruction


def l1_loss(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    return (x_rec.float() - x.float()).abs().mean()


def l2_loss(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    return (x_rec.float() - x.float()).pow(2).mean()


class PerceptualLoss(nn.Module):
    """Mean LPIPS between [-1, 1] images, through a frozen LPIPS network that takes [0, 1] images.
    One-channel images are repeated to three (LPIPS is defined on RGB)."""

    def __init__(self, lpips: nn.Module):
        super().__init__()
        self.lpips = lpips.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualLoss:  # the network stays in eval mode
        return self

    def forward(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        a, b = (x.float() + 1) / 2, (x_rec.float() + 1) / 2
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        return self.lpips(a, b).mean()


def perceptual_loss(net: str = "vgg", weights: str | Path | None = None, device: torch.device | str = "cpu"):
    """The perceptual loss factory: LPIPS-``net`` with the v0.1 weights from ``weights`` (a
    safetensors file in optvq's layout) or, when None, from optvq's weight cache (fetched when
    online; see ``optvq weights``)."""
    from optvq_cli.eval.perceptual import load_lpips
    from optvq_cli.eval.weights import locate

    path = locate(f"lpips-{net}", Path(weights) if weights else None)
    return PerceptualLoss(load_lpips(path, net, device))
