"""The quantizer module: layout, straight-through gradient, losses, fp32 under autocast, statistics."""

import math

import pytest
import torch
import torch.nn.functional as F

from optvq_cli import OptVQuantizer, codebook_stats
from optvq_cli.quant.assign import sinkhorn_assign_plain


def make(n=32, e_dim=8, heads=2, **kw) -> OptVQuantizer:
    torch.manual_seed(0)
    return OptVQuantizer(n_codes=n, e_dim=e_dim, heads=heads, **kw)


def test_indices_layout_follows_channel_chunks():
    q = make(use_proj=False)
    codes = q.codes()
    # Position (i, j) of image b holds code (7b + 3i + j + k) % 32 in channel chunk k.
    want = torch.zeros(2, 2, 3, 4, dtype=torch.long)
    z = torch.zeros(2, 8, 3, 4)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                for k in range(2):
                    c = (7 * b + 3 * i + j + k) % 32
                    want[b, k, i, j] = c
                    z[b, 4 * k : 4 * k + 4, i, j] = codes[c]
    _, _, idx = q(z, assign="nearest")
    assert torch.equal(idx, want)
    torch.testing.assert_close(q.lookup(want), z)


def test_sequence_input_layout():
    q = make()
    z = torch.randn(3, 5, 8)
    z_q, _, idx = q(z, assign="nearest")
    assert idx.shape == (3, 2, 5) and z_q.shape == z.shape
    torch.testing.assert_close(q.lookup(idx), z_q)


def test_pool_is_every_head_of_every_position_of_every_image():
    q = make(n=16, heads=2)
    z = torch.randn(3, 8, 2, 5)
    _, _, idx = q(z)  # default assign is sinkhorn
    pool = z.permute(0, 2, 3, 1).reshape(-1, 4)  # (B*H*W*heads, d)
    ref = sinkhorn_assign_plain(pool, q.codes()).reshape(3, 2, 5, 2).permute(0, 3, 1, 2)
    assert float((idx == ref).float().mean()) >= 0.999


def test_straight_through_gradient_is_identity():
    q = make()
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    z_q, _, _ = q(z)
    g = torch.randn_like(z)
    (z_q * g).sum().backward()
    torch.testing.assert_close(z.grad, g)


def test_lookup_equals_forward_values():
    q = make()
    z = torch.randn(2, 8, 3, 5)
    z_q, _, idx = q(z)
    torch.testing.assert_close(q.lookup(idx), z_q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("commitment,enc_w,code_w", [("authors", 1.0, 0.25), ("paper", 0.25, 1.0)])
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_commitment_loss_weighting(commitment, enc_w, code_w, loss_type):
    q = make(commitment=commitment, loss_type=loss_type)
    z = torch.randn(2, 8, 2, 2, requires_grad=True)
    _, loss, idx = q(z, assign="nearest")
    zq = q.lookup(idx)
    diff = (z - zq).detach()
    per = diff.pow(2) if loss_type == "l2" else diff.abs()
    # Both terms have the same value; the weights only decide where the gradient goes.
    torch.testing.assert_close(loss, (enc_w + code_w) * per.mean())
    loss.backward()
    want = (2 * diff if loss_type == "l2" else diff.sign()) * enc_w / diff.numel()
    torch.testing.assert_close(z.grad, want)
    emb_grad = q.embedding.weight.grad
    assert emb_grad is not None and emb_grad.abs().sum() > 0


def test_cross_entropy_loss_form():
    q = make(loss_type="ce")
    z = torch.randn(2, 8, 2, 2)
    _, loss, idx = q(z, assign="nearest")
    pool = z.permute(0, 2, 3, 1).reshape(-1, 4)
    target = idx.permute(0, 2, 3, 1).reshape(-1)
    want = F.cross_entropy(-torch.cdist(pool, q.codes()), target)
    torch.testing.assert_close(loss, want)


def test_runs_in_fp32_under_autocast():
    q = make()
    z = torch.randn(2, 8, 4, 4)
    ref_zq, ref_loss, ref_idx = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, loss, idx = q(z.bfloat16())
    assert z_q.dtype == torch.float32 and loss.dtype == torch.float32
    ref_idx_bf = q(z.bfloat16().float())[2]
    assert torch.equal(idx, ref_idx_bf)
    assert torch.isfinite(z_q).all() and torch.isfinite(loss)


def test_initialization_matches_the_authors():
    q = OptVQuantizer(n_codes=4096, e_dim=256, heads=4)
    w = q.embedding.weight
    assert abs(float(w.detach().std()) - 1.0) < 0.02  # N(0, 1)
    assert abs(float(q.proj.weight.detach().std()) - 1 / math.sqrt(64)) < 0.01  # N(0, 1/d)


def test_codebook_stats_by_hand():
    # head 0 uses codes 0,0,1,1 ; head 1 uses 2,2,2,2 ; n = 4.
    idx = torch.tensor([[[[0, 0], [1, 1]], [[2, 2], [2, 2]]]])  # (B=1, heads=2, 2, 2)
    s = codebook_stats(idx, 4)
    assert s.counts.tolist() == [[2, 2, 0, 0], [0, 0, 4, 0]]
    assert s.usage_per_head == [0.5, 0.25]
    assert s.usage == 0.75
    assert s.perplexity_per_head[0] == pytest.approx(2.0)
    assert s.perplexity_per_head[1] == pytest.approx(1.0)
    # all heads: p = (1/4, 1/4, 1/2) -> exp(H) = 2^1.5
    assert s.perplexity == pytest.approx(2**1.5)


def test_bad_shapes_are_refused():
    q = make()
    with pytest.raises(ValueError, match="e_dim"):
        q(torch.randn(1, 6, 2, 2))
    with pytest.raises(ValueError, match="heads"):
        q.lookup(torch.zeros(1, 3, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        OptVQuantizer(n_codes=4, e_dim=6, heads=4)
