"""Sinkhorn across processes: every rank gets what one process gets on the concatenated pool."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optvq_cli import sinkhorn_assign

SPLIT = (100, 157)  # unequal shares on purpose


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(sum(SPLIT), 6, generator=g) * 2 + 1, torch.randn(48, 6, generator=g)


def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, codes = _data()
    start = sum(SPLIT[:rank])
    mine = x[start : start + SPLIT[rank]]
    results = {
        "dense": sinkhorn_assign(mine, codes),
        "stream": sinkhorn_assign(mine, codes, chunk_size=16),
    }
    torch.save(results, f"{out_file}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    out = tmp_path / "out.pt"
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True, start_method="spawn")
    parts = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    got = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    x, codes = _data()
    single = sinkhorn_assign(x, codes, distributed=False)
    assert torch.equal(got["dense"], single)
    assert torch.equal(got["stream"], single)
