"""The perceptual networks of the evaluation, as plain modules whose weights come from safetensors.

- ``LPIPS``: the v0.1 definition of Zhang et al. (2018): ImageNet VGG16 or AlexNet conv features,
  unit-normalized per channel, squared differences weighted by the published linear layers,
  averaged over space and summed over five layers.
- ``FIDInception``: Inception-v3 with the TF 2015-12-05 weights up to the 2048-d pool3 features,
  the network of the original TF FID, pytorch-fid, clean-fid and StyleGAN3. Module and tensor
  names mirror NVIDIA's TorchScript export (``conv``, ``mixed_3``, ``tower_1``, ...), so its state
  dict maps one to one.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# -- LPIPS ----------------------------------------------------------------------------------------

# torchvision's `features` layouts: ("C", in, out, kernel, stride, padding), "R" ReLU, ("M", k, s) max pool.
_VGG16 = [
    *[("C", 3, 64, 3, 1, 1), "R", ("C", 64, 64, 3, 1, 1), "R", ("M", 2, 2)],
    *[("C", 64, 128, 3, 1, 1), "R", ("C", 128, 128, 3, 1, 1), "R", ("M", 2, 2)],
    *[("C", 128, 256, 3, 1, 1), "R", ("C", 256, 256, 3, 1, 1), "R", ("C", 256, 256, 3, 1, 1), "R", ("M", 2, 2)],
    *[("C", 256, 512, 3, 1, 1), "R", ("C", 512, 512, 3, 1, 1), "R", ("C", 512, 512, 3, 1, 1), "R", ("M", 2, 2)],
    *[("C", 512, 512, 3, 1, 1), "R", ("C", 512, 512, 3, 1, 1), "R", ("C", 512, 512, 3, 1, 1), "R"],
]
_ALEX = [
    *[("C", 3, 64, 11, 4, 2), "R", ("M", 3, 2), ("C", 64, 192, 5, 1, 2), "R", ("M", 3, 2)],
    *[("C", 192, 384, 3, 1, 1), "R", ("C", 384, 256, 3, 1, 1), "R", ("C", 256, 256, 3, 1, 1), "R"],
]
# The five LPIPS taps (outputs of these layer indices): relu1_2 .. relu5_3 for VGG16, relu1 .. relu5 for AlexNet.
LPIPS_NETS = {
    "vgg": {"layers": _VGG16, "taps": (3, 8, 15, 22, 29), "channels": (64, 128, 256, 512, 512)},
    "alex": {"layers": _ALEX, "taps": (1, 4, 7, 9, 11), "channels": (64, 192, 384, 256, 256)},
}
# Smallest square input each backbone takes (its last tap shrinks to 1 x 1 there).
LPIPS_MIN_SIZE = {"vgg": 16, "alex": 31}
# v0.1 input scaling from [-1, 1] towards ImageNet statistics (the reference ScalingLayer).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _features(layout: list) -> nn.Sequential:
    mods: list[nn.Module] = []
    for spec in layout:
        if spec == "R":
            mods.append(nn.ReLU())
        elif spec[0] == "M":
            mods.append(nn.MaxPool2d(spec[1], spec[2]))
        else:
            _, cin, cout, k, s, p = spec
            mods.append(nn.Conv2d(cin, cout, k, s, p))
    return nn.Sequential(*mods)


def conv_indices(net: str) -> list[int]:
    """Indices of the conv layers in torchvision's ``features`` of ``net`` (vgg or alex)."""
    return [i for i, spec in enumerate(LPIPS_NETS[net]["layers"]) if spec != "R" and spec[0] == "C"]


class LPIPS(nn.Module):
    """LPIPS v0.1; ``forward(x, y)`` of [0, 1] images (B, 3, H, W) -> (B,) distances.

    Tensors: ``features.{i}.weight/bias`` (torchvision's names) and ``lin{k}.weight`` (1, C, 1, 1).
    """

    def __init__(self, net: str = "vgg"):
        super().__init__()
        if net not in LPIPS_NETS:
            raise ValueError(f"LPIPS net must be one of {', '.join(LPIPS_NETS)}, got {net!r}")
        spec = LPIPS_NETS[net]
        self.net = net
        self.taps = spec["taps"]
        self.features = _features(spec["layers"])
        for k, c in enumerate(spec["channels"]):
            self.register_parameter(f"lin{k}", nn.Parameter(torch.zeros(1, c, 1, 1)))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
            if i == self.taps[-1]:
                break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = ((x.float() * 2 - 1) - self.shift) / self.scale
        y = ((y.float() * 2 - 1) - self.shift) / self.scale
        total = torch.zeros(x.shape[0], device=x.device)
        for k, (fx, fy) in enumerate(zip(self._taps(x), self._taps(y), strict=True)):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = F.conv2d((fx - fy) ** 2, getattr(self, f"lin{k}"))
            total = total + d.mean(dim=(1, 2, 3))
        return total


# -- Inception-v3 for FID ------------------------------------------------------------------------


class ConvBN(nn.Module):
    """Conv (no bias) -> batch norm with fixed statistics and shift only (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.register_buffer("weight", torch.zeros(cout, cin, kh, kw))
        self.register_buffer("beta", torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3)
        return F.relu(x)


def _seq(*mods: tuple[str, nn.Module]) -> nn.Sequential:
    s = nn.Sequential()
    for name, m in mods:
        s.add_module(name, m)
    return s


class _AvgPool3(nn.Module):
    def forward(self, x):  # TF's average pool excludes the padding
        return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_ch: int):
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = _seq(("conv", ConvBN(cin, 48, 1)), ("conv_1", ConvBN(48, 64, 5, padding=2)))
        self.tower_1 = _seq(
            ("conv", ConvBN(cin, 64, 1)),
            ("conv_1", ConvBN(64, 96, 3, padding=1)),
            ("conv_2", ConvBN(96, 96, 3, padding=1)),
        )
        self.tower_2 = _seq(("pool", _AvgPool3()), ("conv", ConvBN(cin, pool_ch, 1)))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = _seq(
            ("conv", ConvBN(cin, 64, 1)),
            ("conv_1", ConvBN(64, 96, 3, padding=1)),
            ("conv_2", ConvBN(96, 96, 3, stride=2)),
        )
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, mid: int):
        super().__init__()
        self.conv = ConvBN(cin, 192, 1)
        self.tower = _seq(
            ("conv", ConvBN(cin, mid, 1)),
            ("conv_1", ConvBN(mid, mid, (1, 7), padding=(0, 3))),
            ("conv_2", ConvBN(mid, 192, (7, 1), padding=(3, 0))),
        )
        self.tower_1 = _seq(
            ("conv", ConvBN(cin, mid, 1)),
            ("conv_1", ConvBN(mid, mid, (7, 1), padding=(3, 0))),
            ("conv_2", ConvBN(mid, mid, (1, 7), padding=(0, 3))),
            ("conv_3", ConvBN(mid, mid, (7, 1), padding=(3, 0))),
            ("conv_4", ConvBN(mid, 192, (1, 7), padding=(0, 3))),
        )
        self.tower_2 = _seq(("pool", _AvgPool3()), ("conv", ConvBN(cin, 192, 1)))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.tower = _seq(("conv", ConvBN(cin, 192, 1)), ("conv_1", ConvBN(192, 320, 3, stride=2)))
        self.tower_1 = _seq(
            ("conv", ConvBN(cin, 192, 1)),
            ("conv_1", ConvBN(192, 192, (1, 7), padding=(0, 3))),
            ("conv_2", ConvBN(192, 192, (7, 1), padding=(3, 0))),
            ("conv_3", ConvBN(192, 192, 3, stride=2)),
        )
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class InceptionE(nn.Module):
    """``max_pool`` in the last block: the TF graph's pool_3 tower there is a max pool, not average."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = nn.MaxPool2d(3, 1, 1) if max_pool else _AvgPool3()
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        parts = [
            self.conv(x),
            self.tower_mixed_conv(a),
            self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b),
            self.tower_1_mixed_conv_1(b),
            self.tower_2_conv(self.tower_2_pool(x)),
        ]
        return torch.cat(parts, 1)


def tf_bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of TF1's ResizeBilinear (align_corners=False, no half-pixel centers):
    output i samples input i * n_in / n_out, the last pixel repeated past the edge. StyleGAN3's
    FID detector resizes this way."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), i0] += 1 - w1
    m[torch.arange(n_out), i1] += w1
    return m


def tf_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 bilinear resize of (B, C, H, W) to size x size, in float32."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x.float()
    rh = tf_bilinear_matrix(h, size).to(x.device, torch.float32)
    rw = tf_bilinear_matrix(w, size).to(x.device, torch.float32)
    return torch.einsum("oh,bchw,pw->bcop", rh, x.float(), rw)


class FIDInception(nn.Module):
    """Inception-v3 (TF 2015-12-05) -> pool3 features. ``forward`` takes [0, 1] images, any size:
    quantized to 8-bit levels, resized to 299 x 299 as TF did, mapped by (v - 128) / 128."""

    SIZE = 299
    DIM = 2048

    def __init__(self):
        super().__init__()
        self.conv = ConvBN(3, 32, 3, stride=2)
        self.conv_1 = ConvBN(32, 32, 3)
        self.conv_2 = ConvBN(32, 64, 3, padding=1)
        self.pool0 = nn.MaxPool2d(3, 2)
        self.conv_3 = ConvBN(64, 80, 1)
        self.conv_4 = ConvBN(80, 192, 3)
        self.pool1 = nn.MaxPool2d(3, 2)
        self.mixed = InceptionA(192, 32)
        self.mixed_1 = InceptionA(256, 64)
        self.mixed_2 = InceptionA(288, 64)
        self.mixed_3 = InceptionB(288)
        self.mixed_4 = InceptionC(768, 128)
        self.mixed_5 = InceptionC(768, 160)
        self.mixed_6 = InceptionC(768, 160)
        self.mixed_7 = InceptionC(768, 192)
        self.mixed_8 = InceptionD(768)
        self.mixed_9 = InceptionE(1280, max_pool=False)
        self.mixed_10 = InceptionE(2048, max_pool=True)
        self.requires_grad_(False)
        self.eval()

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The network on inputs already at 299 x 299 and scaled to [-1, 1): (B, 2048)."""
        for m in self.children():
            x = m(x)
        return F.avg_pool2d(x, 8).flatten(1)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        v = (images01.float().clamp(0, 1) * 255).round()
        v = tf_resize(v, self.SIZE)
        return self.trunk((v - 128) / 128)


# -- loading --------------------------------------------------------------------------------------


def load_state(module: nn.Module, path: Path, what: str) -> None:
    """Load a safetensors file into ``module``, strictly; a mismatch is a UserError naming ``path``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from optvq_cli.core.errors import UserError

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not readable {what} weights ({e}); run `optvq weights fetch --rebuild`") from None
    own = module.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise UserError(f"{path}: these are not {what} weights in optvq's layout; run `optvq weights fetch`")
    module.load_state_dict(state)


def load_lpips(path: Path, net: str, device: torch.device | str = "cpu") -> LPIPS:
    m = LPIPS(net)
    load_state(m, path, f"LPIPS-{net}")
    return m.to(device)


def load_inception(path: Path, device: torch.device | str = "cpu") -> FIDInception:
    m = FIDInception()
    load_state(m, path, "FID Inception-v3")
    return m.to(device)


def inception_from_state(state: dict, device: torch.device | str = "cpu") -> FIDInception:
    """From a state dict already checked against the network's layout (weights.torchscript_inception)."""
    m = FIDInception()
    m.load_state_dict(state)
    return m.to(device)
