"""Small torch.distributed helpers: one process group from torchrun's environment, who am I, and the
few collectives the trainer needs. Every helper is a no-op (or the identity) in a single process, so
callers never branch on "am I distributed"."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK): which GPU it drives."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device | None = None) -> bool:
    """Join the process group torchrun describes (env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT; multi-node works the same way). NCCL when this process drives a GPU, else gloo.
    Returns True when it created the group (the caller then owns ``destroy``)."""
    if is_initialized() or env_world_size() <= 1:
        return False
    use_nccl = device is not None and device.type == "cuda" and dist.is_nccl_available()
    if use_nccl:
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns ``t``."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place (floating tensors); returns ``t``."""
    n = world_size()
    if n > 1:
        all_reduce_sum(t)
        t.div_(n)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_initialized() and world_size() > 1:
        dist.broadcast(t, src=src)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (picklable Python objects; small ones only)."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def device_for(spec: str) -> torch.device:
    """The device this process drives for ``--device spec``. Under torchrun, ``auto`` and a bare
    ``cuda`` mean this process's own GPU (cuda:LOCAL_RANK, one GPU per process); ``cuda:N`` and
    ``cpu`` are taken as given."""
    from optvq_cli.core.device import resolve_device

    dev = resolve_device(spec)
    if dev.type == "cuda" and env_world_size() > 1 and spec.strip().lower() in ("auto", "cuda"):
        dev = torch.device("cuda", local_rank() % torch.cuda.device_count())
    return dev


def collective_device() -> torch.device:
    """Where small collective tensors live: the current GPU under NCCL, else the CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def flag_max(flag: float) -> float:
    """The largest of every process's ``flag`` (one collective; the same answer everywhere)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([flag], dtype=torch.float32, device=collective_device())
    return float(all_reduce_max(t).item())


def mean_of(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each value averaged over the processes (one collective for all keys)."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.stack([values[k].detach().double().to(collective_device()) for k in keys])
    all_reduce_mean(t)
    return dict(zip(keys, t.tolist(), strict=True))


def on_main_first(fn: Any, others: Any = None) -> Any:
    """Run ``fn`` on the main process first (downloads, folder set-up), then ``others`` (default
    ``fn``) on the rest; an error on the main process stops every process."""
    ok, result, error = torch.ones(1), None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the others
            error, ok = e, torch.zeros(1)
    if world_size() > 1:
        ok = broadcast(ok.to(collective_device())).cpu()
    if error is not None:
        raise error
    if not bool(ok.item()):
        from optvq_cli.core.errors import UserError

        raise UserError("the main process (rank 0) failed; see its message")
    if not is_main():
        result = (others or fn)()
    return result
