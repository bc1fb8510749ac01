"""PSNR, SSIM, the Fréchet distance, feature moments and codebook health against hand calculations,
closed forms and independent implementations (scikit-image, pytorch-fid)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from optvq_cli.eval import metrics as M
from optvq_cli.eval.perceptual import tf_bilinear_matrix, tf_resize
from optvq_cli.quant.quantizer import codebook_stats


def _photo(name: str, size: int = 64) -> torch.Tensor:
    """A real photo shipped inside scikit-image, resized: (1, 3, size, size) in [0, 1]."""
    import skimage

    path = os.path.join(os.path.dirname(skimage.__file__), "data", name)
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].double() / 255


# -- PSNR -----------------------------------------------------------------------------------------


def test_psnr_rgb_by_hand():
    x = torch.zeros(1, 3, 4, 4)
    y = torch.full((1, 3, 4, 4), 0.1)
    # MSE = 0.01 -> 10 log10(1 / 0.01) = 20 dB (the 1e-8 guard moves it by 4e-6 dB)
    assert M.psnr(x, y, "rgb").item() == pytest.approx(20.0, abs=1e-5)


def test_psnr_y_channel_by_hand():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.zeros(2, 3, 4, 4)
    y[0, 0] = 1.0  # pure red: Y moves by 65.481 / 255
    y[1, :, 0, 0] = 0.5  # one grey pixel of 16: Y moves by (65.481 + 128.553 + 24.966) * 0.5 / 255 there
    d_red = 65.481 / 255
    d_grey = 219.0 * 0.5 / 255
    expect = [10 * math.log10(1 / (d_red**2 + 1e-8)), 10 * math.log10(1 / (d_grey**2 / 16 + 1e-8))]
    assert M.psnr(x, y, "y").tolist() == pytest.approx(expect, rel=1e-12)


def test_psnr_identical_is_capped_at_80db():
    x = torch.rand(1, 3, 8, 8)
    assert M.psnr(x, x, "y").item() == pytest.approx(80.0)


def test_luma_of_white_and_black():
    white, black = torch.ones(1, 3, 1, 1), torch.zeros(1, 3, 1, 1)
    assert M.luma_ycbcr(white).item() == pytest.approx(235 / 255)
    assert M.luma_ycbcr(black).item() == pytest.approx(16 / 255)
    assert M.luma_yiq(white).item() == pytest.approx(1.0)


def test_psnr_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        M.psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))


# -- SSIM -----------------------------------------------------------------------------------------


def _skimage_ssim(a: np.ndarray, b: np.ndarray, channel_axis=None) -> float:
    from skimage.metrics import structural_similarity

    return structural_similarity(
        a,
        b,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
        channel_axis=channel_axis,
    )


@pytest.mark.parametrize("photo", ["astronaut.png", "coffee.png"])
def test_ssim_y_matches_scikit_image(photo):
    x = _photo(photo)
    gen = torch.Generator().manual_seed(0)
    y = (x + 0.05 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    ours = M.ssim(x, y, "y").item()
    # Independent: scikit-image on the rounded 8-bit YIQ luma (its Gaussian filter, its formula).
    ya = (M.luma_yiq(x)[0, 0] * 255).round().numpy()
    yb = (M.luma_yiq(y)[0, 0] * 255).round().numpy()
    assert ours == pytest.approx(_skimage_ssim(ya, yb), abs=1e-7)
    assert 0.2 < ours < 0.95


def test_ssim_rgb_matches_scikit_image():
    x = _photo("chelsea.png")
    y = _photo("chelsea.png", size=32)
    y = torch.nn.functional.interpolate(y, size=64, mode="bilinear", align_corners=False)  # a blurred copy
    ours = M.ssim(x, y, "rgb").item()
    a = (x[0] * 255).round().permute(1, 2, 0).numpy()
    b = (y[0] * 255).round().permute(1, 2, 0).numpy()
    assert ours == pytest.approx(_skimage_ssim(a, b, channel_axis=2), abs=1e-7)


def test_ssim_identical_is_one_and_batch_is_per_image():
    x = torch.cat([_photo("astronaut.png"), _photo("coffee.png")]).float()
    y = x.clone()
    y[1] = 1 - y[1]
    s = M.ssim(x, y)
    assert s[0].item() == pytest.approx(1.0)
    assert s[1].item() < 0.5


def test_ssim_clips_negative_structure_at_zero():
    # A checkerboard against its negative: the structure term is negative in every window; pyiqa
    # (and so the authors) clip it to 0, where scikit-image's unclipped SSIM is negative.
    board = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2
    x = (0.2 + 0.6 * board).double().expand(1, 3, 32, 32)
    y = 1 - x
    assert M.ssim(x, y, "y").item() == 0.0
    a = (M.luma_yiq(x)[0, 0] * 255).round().numpy()
    b = (M.luma_yiq(y)[0, 0] * 255).round().numpy()
    assert _skimage_ssim(a, b) < -0.9


def test_ssim_too_small_raises():
    with pytest.raises(ValueError, match="11x11"):
        M.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_gaussian_window_is_normalized_and_symmetric():
    w = M.gaussian_window()
    assert w.shape == (11, 11) and w.sum().item() == pytest.approx(1.0)
    assert torch.allclose(w, w.T) and torch.allclose(w, w.flip(0))
    # centre over its 4-neighbour: exp(1 / (2 * 1.5^2))
    assert (w[5, 5] / w[5, 6]).item() == pytest.approx(math.exp(1 / 4.5))


# -- Fréchet distance -----------------------------------------------------------------------------


def test_frechet_diagonal_gaussians_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    # ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2 = 5 + (1 + 1 + 0)
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(7.0, rel=1e-12)


def test_frechet_rotated_gaussians_closed_form():
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(4, 4)))
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 2.0, 1.0, 9.0])
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expect = float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert M.frechet_distance(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(expect, rel=1e-10)


def test_frechet_non_commuting_2d_closed_form():
    # For 2 x 2, Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)) with M = S1 S2.
    s1 = np.array([[2.0, 0.5], [0.5, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    mu1, mu2 = np.array([0.5, 0.0]), np.array([0.0, 2.0])
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    expect = 0.25 + 4.0 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-12)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pytorch-fid passes scipy's deprecated `disp`
def test_frechet_equals_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    d = 48
    a = rng.normal(size=(400, d)) @ rng.normal(size=(d, d))
    b = rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) * 0.7 + 0.2
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert M.frechet_distance(*args) == pytest.approx(calculate_frechet_distance(*args), rel=1e-8)


def test_frechet_of_identical_statistics_is_zero_even_rank_deficient():
    f = np.random.default_rng(2).normal(size=(5, 32))  # 5 samples in 32-d: covariance of rank 4
    mu, s = f.mean(0), np.cov(f, rowvar=False)
    # 0 up to the square roots of rounding-level eigenvalues (sqrt(1e-16) each): relative 1e-6
    assert abs(M.frechet_distance(mu, s, mu, s)) < 1e-6 * np.trace(s)


def test_feature_stats_match_numpy_and_merge_by_sums():
    f = torch.randn(50, 6, dtype=torch.float64)
    whole, a, b = M.FeatureStats(6), M.FeatureStats(6), M.FeatureStats(6)
    whole.update(f)
    a.update(f[:20])
    b.update(f[20:])
    np.testing.assert_allclose(whole.mean(), f.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(whole.cov(), np.cov(f.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)
    a.n, a.total, a.outer = a.n + b.n, a.total + b.total, a.outer + b.outer
    np.testing.assert_allclose(a.cov(), whole.cov(), rtol=1e-12)


# -- codebook health ------------------------------------------------------------------------------


def test_usage_and_perplexity_by_hand():
    counts = torch.tensor([[2, 2, 0, 0], [0, 0, 0, 0]])
    assert M.usage_fraction(counts) == 0.5
    assert M.perplexity(counts) == pytest.approx(2.0)  # two codes, equally likely
    assert M.perplexity(torch.ones(1, 16)) == pytest.approx(16.0)
    assert M.perplexity(torch.tensor([0, 5, 0])) == pytest.approx(1.0)
    assert M.perplexity(torch.zeros(3)) == 0.0
    # p = (3/4, 1/4): exp(-(3/4 ln 3/4 + 1/4 ln 1/4))
    expect = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert M.perplexity(torch.tensor([3, 1])) == pytest.approx(expect)


def test_count_codes_and_extremes():
    idx = torch.tensor([[[[0, 1], [1, 1]], [[3, 3], [3, 2]]]])  # (B=1, heads=2, 2, 2)
    counts = codebook_stats(idx, 5).counts  # the one counting function, in the quantizer
    assert counts.tolist() == [[1, 3, 0, 0, 0], [0, 0, 1, 3, 0]]
    most, least = M.extreme_codes(counts, k=2)
    assert most == [[1, 3], [3, 3]]  # tie broken by the lower index
    assert least == [[4, 0], [0, 1]]


# -- FID input resize -----------------------------------------------------------------------------


def test_tf_bilinear_by_hand():
    # upsampling 2 -> 4: outputs sample inputs 0, 0.5, 1, 1.5 (the last clamps to pixel 1)
    assert tf_bilinear_matrix(2, 4).tolist() == [[1, 0], [0.5, 0.5], [0, 1], [0, 1]]
    # downsampling 4 -> 2: outputs sample inputs 0 and 2 (no half-pixel centres)
    assert tf_bilinear_matrix(4, 2).tolist() == [[1, 0, 0, 0], [0, 0, 1, 0]]
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert tf_resize(x, 4).equal(x)
    assert tf_resize(x, 2)[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]
