"""The assignment math against hand calculation, closed forms and the plain formulation."""

import copy
import math

import pytest
import torch

from optvq_cli import nearest_assign, sinkhorn_assign
from optvq_cli.quant import assign as A
from optvq_cli.quant.assign import _best_in_rows, sinkhorn_assign_plain, sinkhorn_plans


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean())


def test_two_by_two_by_hand():
    # x = (0, 0.1), codes = (0, 1) on a line. D = [[0, 1], [0.1, 0.9]]: mean 0.5, squared deviations
    # 0.25 + 0.25 + 0.16 + 0.16 = 0.82, unbiased std = sqrt(0.82 / 3).
    x = torch.tensor([[0.0], [0.1]])
    codes = torch.tensor([[0.0], [1.0]])
    std = math.sqrt(0.82 / 3)
    d1 = [[(v - 0.5) / (std + 1e-6) for v in row] for row in ([0.0, 1.0], [0.1, 0.9])]
    m = min(min(r) for r in d1)
    k = [[math.exp(-1.0 * (v - m)) for v in row] for row in d1]  # epsilon = 1
    # A balanced 2x2 plan with marginals 1/2 is [[a, 1/2 - a], [1/2 - a, a]] and keeps K's cross ratio:
    # a^2 / (1/2 - a)^2 = K11 K22 / (K12 K21).
    r = math.sqrt(k[0][0] * k[1][1] / (k[0][1] * k[1][0]))
    a = 0.5 * r / (1 + r)
    *_, plan = sinkhorn_plans(x, codes, epsilon=1.0, n_iters=200)
    expected = torch.tensor([[a, 0.5 - a], [0.5 - a, a]])
    torch.testing.assert_close(plan, expected, atol=1e-5, rtol=0)
    # Both points are nearest to code 0; the transport plan sends the second one to code 1.
    assert nearest_assign(x, codes).tolist() == [0, 0]
    assert sinkhorn_assign(x, codes, epsilon=1.0, n_iters=50).tolist() == [0, 1]
    assert sinkhorn_assign(x, codes, epsilon=1.0, n_iters=50, chunk_size=1).tolist() == [0, 1]


def test_converged_plan_has_the_prescribed_marginals():
    g = torch.Generator().manual_seed(0)
    x, codes = torch.randn(40, 3, generator=g), torch.randn(10, 3, generator=g)
    *_, plan = sinkhorn_plans(x, codes, epsilon=2.0, n_iters=500)
    torch.testing.assert_close(plan.sum(1), torch.full((40,), 1 / 40), atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.sum(0), torch.full((10,), 1 / 10), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_data_off_to_one_side_reaches_many_more_codes(seed):
    # Fig. 2's local pitfall: data far from a codebook all fall into one or two Voronoi cells, while
    # the transport plan must spread each code's mass over the data.
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(16, 2, generator=g)
    x = torch.randn(256, 2, generator=g) * 0.3 + 3.0
    used_nearest = nearest_assign(x, codes).unique().numel()
    used_sinkhorn = sinkhorn_assign(x, codes).unique().numel()
    assert used_nearest <= 3
    assert used_sinkhorn >= 2 * used_nearest + 2


@pytest.mark.parametrize("chunk_size", [None, 7, 64])
@pytest.mark.parametrize("shape", [(300, 64, 2), (257, 1024, 8), (512, 128, 64)])
def test_matches_plain_formulation(shape, chunk_size):
    l_, n, d = shape
    g = torch.Generator().manual_seed(l_ + n)
    x = torch.randn(l_, d, generator=g) * 0.7 + 0.2
    codes = torch.randn(n, d, generator=g)
    ref = sinkhorn_assign_plain(x, codes)
    assert agreement(sinkhorn_assign(x, codes, chunk_size=chunk_size), ref) >= 0.999


def test_streaming_is_used_above_the_memory_budget():
    g = torch.Generator().manual_seed(2)
    x, codes = torch.randn(200, 4, generator=g), torch.randn(50, 4, generator=g)
    ref = sinkhorn_assign_plain(x, codes)
    assert agreement(sinkhorn_assign(x, codes, max_bytes=1000), ref) >= 0.999


def test_streaming_blocks_of_at_least_min_rows_give_the_indices_of_any_other_blocking():
    # 16,384 codes: 8 MiB blocks would be 128 rows; streaming takes 512 (3 blocks, the last partial).
    g = torch.Generator().manual_seed(4)
    x, codes = torch.randn(1100, 8, generator=g), torch.randn(16384, 8, generator=g)
    assert A._block_rows(16384, x.device, None, A.SINKHORN_MIN_ROWS) == 512
    streamed = sinkhorn_assign(x, codes, max_bytes=1)
    assert torch.equal(streamed, sinkhorn_assign(x, codes, chunk_size=128))
    assert agreement(streamed, sinkhorn_assign_plain(x, codes)) >= 0.999


def test_permutation_equivariance():
    g = torch.Generator().manual_seed(3)
    x, codes = torch.randn(120, 5, generator=g), torch.randn(30, 5, generator=g)
    idx = sinkhorn_assign(x, codes)
    rows = torch.randperm(120, generator=g)
    assert torch.equal(sinkhorn_assign(x[rows], codes), idx[rows])
    cols = torch.randperm(30, generator=g)  # new code j is old code cols[j]
    new_idx = sinkhorn_assign(x, codes[cols])
    assert torch.equal(cols[new_idx], idx)


@pytest.mark.parametrize("scale,shift", [(1e-3, 0.0), (1e3, 5.0), (1.0, -100.0), (1e6, 1e6)])
def test_invariant_to_global_shift_and_scale(scale, shift):
    g = torch.Generator().manual_seed(4)
    x, codes = torch.randn(400, 4, generator=g), torch.randn(64, 4, generator=g)
    base = sinkhorn_assign(x, codes)
    moved = sinkhorn_assign(x * scale + shift, codes * scale + shift)
    assert agreement(moved, base) >= 0.995  # ties aside: fp32 rounding moves near-equal distances
    moved_nn = nearest_assign(x * scale + shift, codes * scale + shift)
    assert agreement(moved_nn, nearest_assign(x, codes)) >= 0.995


@pytest.mark.parametrize("n", [1024, 1000, 100000 // 8, 1021, 64])
def test_best_in_rows_equals_torch_max_and_min_with_ties(n):
    g = torch.Generator().manual_seed(n)
    t = torch.randint(0, 50, (37, n), generator=g).float()  # many ties: first index must win
    t[5, n // 3] = t[5, n - 1] = 99.0  # a tie for the top spread over two column groups
    for largest, ref in ((True, t.max(1)), (False, t.min(1))):
        best, idx = _best_in_rows(t, largest)
        assert torch.equal(best, ref.values) and torch.equal(idx, ref.indices)
    assert int(_best_in_rows(t)[1][5]) == n // 3


def test_nearest_matches_cdist_argmin():
    g = torch.Generator().manual_seed(5)
    x, codes = torch.randn(1000, 16, generator=g), torch.randn(300, 16, generator=g)
    ref = torch.cdist(x.double(), codes.double()).argmin(1)
    assert agreement(nearest_assign(x, codes, chunk_size=77), ref) >= 0.999


HOSTILE = {
    "huge range": lambda g: (torch.randn(64, 4, generator=g) * 1e6, torch.randn(16, 4, generator=g) * 1e6),
    "constant D": lambda g: (torch.ones(64, 4), torch.ones(16, 4)),
    "identical vectors": lambda g: (torch.ones(64, 4) * 0.3, torch.randn(16, 4, generator=g)),
    "a code far from all data": lambda g: (
        torch.randn(64, 4, generator=g),
        torch.cat([torch.randn(15, 4, generator=g), torch.full((1, 4), 1e4)]),
    ),
    "a vector far from all codes": lambda g: (
        torch.cat([torch.randn(63, 4, generator=g), torch.full((1, 4), 1e4)]),
        torch.randn(16, 4, generator=g),
    ),
    "tiny values": lambda g: (
        torch.randn(64, 4, generator=g) * 1e-30,
        torch.randn(16, 4, generator=g) * 1e-30,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_hostile_inputs_give_valid_indices(case, dtype, chunk_size):
    g = torch.Generator().manual_seed(6)
    x, codes = HOSTILE[case](g)
    x, codes = x.to(dtype), codes.to(dtype)
    # fp16 overflows 1e6 to inf: saturate to the largest finite value instead.
    x, codes = torch.nan_to_num(x), torch.nan_to_num(codes)
    if not (torch.isfinite(x).all() and torch.isfinite(codes).all()):
        pytest.skip("input not finite in this dtype")
    for fn in (lambda: sinkhorn_assign(x, codes, chunk_size=chunk_size), lambda: nearest_assign(x, codes)):
        idx = fn()
        assert idx.dtype == torch.long and idx.shape == (x.shape[0],)
        assert int(idx.min()) >= 0 and int(idx.max()) < codes.shape[0]


def test_far_vector_gets_its_nearest_live_code():
    # Its whole row of exp(-eps D'') underflows to 0; it must still get a sensible code, not index 0.
    g = torch.Generator().manual_seed(7)
    codes = torch.randn(16, 4, generator=g)
    far = codes[9] * 1e4
    x = torch.cat([torch.randn(63, 4, generator=g), far[None]])
    expected = int(torch.cdist(far[None], codes).argmin())
    assert int(sinkhorn_assign(x, codes)[-1]) == expected
    assert int(sinkhorn_assign(x, codes, chunk_size=8)[-1]) == expected


def test_half_precision_inputs_are_computed_in_fp32():
    g = torch.Generator().manual_seed(8)
    x, codes = torch.randn(256, 8, generator=g), torch.randn(32, 8, generator=g)
    xh, ch = x.half(), codes.half()
    assert torch.equal(sinkhorn_assign(xh, ch), sinkhorn_assign(xh.float(), ch.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(sinkhorn_assign(x, codes), sinkhorn_assign_plain(x, codes))


def test_empty_pool():
    assert sinkhorn_assign(torch.empty(0, 3), torch.randn(4, 3)).numel() == 0
    assert nearest_assign(torch.empty(0, 3), torch.randn(4, 3)).numel() == 0


def test_quantizer_chunk_size_streams(monkeypatch):
    import optvq_cli.quant.assign as A
    from optvq_cli import OptVQuantizer

    g = torch.Generator().manual_seed(9)
    x, codes = torch.randn(200, 4, generator=g), torch.randn(50, 4, generator=g)
    seen = []
    real = A._Pairs.dist

    def spy(self, s, e, out):
        seen.append(out.shape[0])
        return real(self, s, e, out)

    monkeypatch.setattr(A._Pairs, "dist", spy)
    q = OptVQuantizer(n_codes=50, e_dim=4, heads=1, chunk_size=16)
    idx = q.assign_indices(x, codes)
    assert max(seen) == 16  # blocks of the streaming size, not one 200-row matrix
    assert agreement(idx, sinkhorn_assign_plain(x, codes)) >= 0.999
    seen.clear()
    q.chunk_size = None  # the attribute is read at each call: back to one dense 200-row matrix
    q.assign_indices(x, codes)
    assert max(seen) == 200
    assert not hasattr(A, "STREAM_CHUNK")  # no process-wide switch


def test_a_workspace_is_reused_and_changes_no_index():
    g = torch.Generator().manual_seed(3)
    x, codes = torch.randn(300, 4, generator=g), torch.randn(50, 4, generator=g)
    ws = A.Workspace()
    first = sinkhorn_assign(x, codes, workspace=ws)
    buf = ws._buf.data_ptr()
    assert torch.equal(first, sinkhorn_assign(x, codes))
    assert torch.equal(sinkhorn_assign(x[:200], codes, workspace=ws), sinkhorn_assign(x[:200], codes))
    assert ws._buf.data_ptr() == buf  # a smaller pool fits the memory already there
    assert torch.equal(sinkhorn_assign(x, codes, chunk_size=7, workspace=ws), sinkhorn_assign(x, codes, chunk_size=7))
    assert copy.deepcopy(ws)._buf is None  # a copied model does not copy the matrix
