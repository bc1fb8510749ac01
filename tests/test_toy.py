"""`optvq toy`: the 2-D experiment (Fig. 6) and Sinkhorn convergence (Fig. 9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from optvq_cli import toy
from optvq_cli.cli import app
from optvq_cli.quant.assign import sinkhorn_assign_plain


@pytest.fixture(scope="module")
def seed0() -> toy.ToyResult:
    return toy.run_toy(seed=0)


def _nearest_usage(data: np.ndarray, codes: np.ndarray) -> int:
    """Independent reference: brute-force nearest code in float64 numpy."""
    d = ((data[:, None, :].astype(np.float64) - codes[None, :, :]) ** 2).sum(-1)
    return len(np.unique(d.argmin(1)))


# ---------------------------------------------------------------- Fig. 6: the paper's claim


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_optvq_uses_every_code_and_vanilla_vq_strands_most(seed, seed0):
    result = seed0 if seed == 0 else toy.run_toy(seed=seed)
    # Sec. 4.3 / Tab. 3: OptVQ reaches 100% usage; vanilla VQ engages only the codes facing the data.
    assert result.optvq.final_usage == toy.N_CODES == 25
    assert result.vq.final_usage <= toy.N_CODES // 2
    assert result.vq.n_codes == result.optvq.n_codes == 25


def test_usage_matches_independent_assignments(seed0):
    assert seed0.vq.final_usage == _nearest_usage(seed0.data, seed0.vq.path[-1])
    final = torch.from_numpy(seed0.optvq.path[-1])
    plain = sinkhorn_assign_plain(torch.from_numpy(seed0.data), final, toy.EPSILON, toy.SINKHORN_ITERS)
    assert seed0.optvq.final_usage == len(plain.unique()) == 25
    # counts are the points per code at the end: they cover every point exactly once.
    for run in (seed0.vq, seed0.optvq):
        assert run.counts.sum() == toy.N_POINTS
        assert (run.counts > 0).sum() == run.final_usage


def test_stranded_vanilla_codes_never_move(seed0):
    # Sec. 3.2: a code outside every point's Voronoi cell gets no gradient, so it stays where it began.
    unused = seed0.vq.counts == 0
    assert unused.sum() == toy.N_CODES - seed0.vq.final_usage > 0
    np.testing.assert_array_equal(seed0.vq.path[-1][unused], seed0.vq.path[0][unused])
    assert not np.array_equal(seed0.vq.path[-1][~unused], seed0.vq.path[0][~unused])


def test_both_methods_start_from_the_same_codes_and_optvq_commits_closer(seed0):
    np.testing.assert_array_equal(seed0.vq.path[0], seed0.optvq.path[0])
    assert seed0.vq.path.shape == (toy.DEFAULT_STEPS + 1, 25, 2)
    assert seed0.optvq.loss[-1] < seed0.vq.loss[-1]
    assert seed0.optvq.loss[-1] < 0.5 * seed0.optvq.loss[0]


def test_deterministic_under_seed():
    a, b, c = toy.run_toy(seed=3, steps=20), toy.run_toy(seed=3, steps=20), toy.run_toy(seed=4, steps=20)
    for x, y in ((a.vq, b.vq), (a.optvq, b.optvq)):
        np.testing.assert_array_equal(x.path, y.path)
        np.testing.assert_array_equal(x.usage, y.usage)
        np.testing.assert_array_equal(x.loss, y.loss)
    np.testing.assert_array_equal(a.data, b.data)
    assert not np.array_equal(a.data, c.data)
    p, q = toy.sinkhorn_convergence(seed=3), toy.sinkhorn_convergence(seed=3)
    for x, y in zip(p, q, strict=True):
        np.testing.assert_array_equal(x, y)


def test_toy_data_shapes_and_misalignment():
    data, codes = toy.toy_data(0)
    assert data.shape == (100, 2) and codes.shape == (25, 2)
    # The codes start away from the data (offset (3, 3), each cloud of unit spread).
    gap = (codes.mean(0) - data.mean(0)).norm()
    assert 3.0 < float(gap) < 5.5


def test_commitment_loss_and_one_adam_step_by_hand():
    data = torch.tensor([[1.0, 0.0]])
    codes0 = torch.tensor([[0.0, 0.0]])
    idx = torch.tensor([0])
    assert float(toy.commitment_loss(data, codes0, idx)) == pytest.approx(1.0)
    run = toy.train_codes(data, codes0, toy.nearest_assign, steps=1, method="m", lr=0.1)
    # Adam's first step moves each coordinate by lr * sign(gradient); a zero gradient moves nothing.
    np.testing.assert_allclose(run.path[-1], [[0.1, 0.0]], atol=1e-6)
    np.testing.assert_allclose(run.loss, [1.0, 0.81], atol=1e-6)
    assert run.usage.tolist() == [1, 1] and run.counts.tolist() == [1]


def test_adam_matches_torch_optim_adam():
    g = torch.Generator().manual_seed(0)
    start = torch.randn(25, 2, generator=g)
    ours, ref = start.clone(), torch.nn.Parameter(start.clone())
    mine, theirs = toy.Adam(ours, lr=0.05), torch.optim.Adam([ref], lr=0.05)
    for i in range(30):
        grad = torch.randn(25, 2, generator=g) * (i % 3)  # includes all-zero gradients
        mine.step(grad)
        ref.grad = grad.clone()
        theirs.step()
    torch.testing.assert_close(ours, ref.detach(), rtol=0, atol=1e-6)


def test_run_toy_rejects_no_steps():
    with pytest.raises(ValueError, match="steps"):
        toy.run_toy(seed=0, steps=0)


# ---------------------------------------------------------------- Fig. 9


def test_sinkhorn_convergence_plans():
    plans = toy.sinkhorn_convergence(seed=0)
    assert len(plans) == toy.FIG9_ITERS + 1
    assert all(a.shape == (10, 10) for a in plans)
    assert all(abs(a.sum() - 1.0) < 1e-4 for a in plans)
    err = toy.plan_errors(plans)
    assert np.isnan(err["change"][0])
    # Each iteration ends with the row normalization: every point carries 1/l, up to the authors'
    # +1e-8 guard, which still shows on iteration 1 for rows that started with almost no mass.
    assert err["row"][1] < 1e-2 and np.all(err["row"][2:] < 1e-5)
    # Sec. 4.4: the plan settles within a few iterations (the change shrinks by an order of magnitude).
    assert err["change"][toy.SINKHORN_ITERS] < 0.1 * err["change"][1]
    assert err["column"][-1] < err["column"][0]


def test_plan_errors_by_hand():
    uniform = np.full((4, 5), 1 / 20)
    skewed = np.zeros((4, 5))
    skewed[:, 0] = 1 / 4  # every point on code 0: code 0 holds 5x its share, the others none
    err = toy.plan_errors([uniform, skewed])
    np.testing.assert_allclose(err["column"], [0.0, 4.0])
    np.testing.assert_allclose(err["row"], [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(err["change"][1], (1 / 4 - 1 / 20) * 4)


# ---------------------------------------------------------------- CLI

runner = CliRunner()


def _files(out):
    return sorted(p.name for p in out.iterdir())


def test_cli_writes_figures_prints_usage_and_refuses_overwrite(tmp_path):
    out = tmp_path / "toy-out"
    res = runner.invoke(app, ["toy", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert _files(out) == ["fig6_toy.png", "fig9_sinkhorn.png"]  # no temp files left behind
    for name in ("fig6_toy.png", "fig9_sinkhorn.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 800
    assert "OptVQ: 25/25 codes used" in res.stdout
    assert "vanilla VQ: " in res.stdout and f"wrote {out / 'fig6_toy.png'}" in res.stdout
    vq_used = int(res.stdout.split("vanilla VQ: ")[1].split("/")[0])
    assert vq_used <= 12

    before = (out / "fig6_toy.png").read_bytes()
    again = runner.invoke(app, ["toy", "--out", str(out)])
    assert again.exit_code == 1
    assert "--overwrite" in again.output and "fig6_toy.png" in again.output
    assert len(again.output.strip().splitlines()) == 1 and "Traceback" not in again.output
    assert (out / "fig6_toy.png").read_bytes() == before


@pytest.mark.slow
def test_cli_gif_and_overwrite(tmp_path):
    out = tmp_path / "o"
    args = ["toy", "--out", str(out), "--steps", "5", "--seed", "1", "--gif"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    with Image.open(out / "fig6_toy.gif") as im:
        assert im.format == "GIF" and im.n_frames == 6  # steps 0..5, one frame each
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "--overwrite" in refused.output
    forced = runner.invoke(app, [*args, "--overwrite"])
    assert forced.exit_code == 0, forced.output
    assert _files(out) == ["fig6_toy.gif", "fig6_toy.png", "fig9_sinkhorn.png"]
    # --overwrite without --gif: the earlier animation no longer matches the figures, so it goes
    plain = runner.invoke(app, ["toy", "--out", str(out), "--steps", "5", "--seed", "2", "--overwrite"])
    assert plain.exit_code == 0, plain.output
    assert _files(out) == ["fig6_toy.png", "fig9_sinkhorn.png"]


def test_cli_bad_out_and_bad_steps(tmp_path):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    res = runner.invoke(app, ["toy", "--out", str(afile)])
    assert res.exit_code == 1 and "--out" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["toy", "--out", str(tmp_path / "o"), "--steps", "0"])
    assert res.exit_code == 2 and "--steps" in res.output
    assert not (tmp_path / "o").exists()
