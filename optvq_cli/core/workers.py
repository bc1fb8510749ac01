"""Reader workers: how many a job starts by default, the one DataLoader every job reads through,
and the priority the workers run at.

torch's intra-op threads split every operation evenly and wait for the slowest, so a thread that
shares its core with a busy reader holds all the others back (a `mnist` training step beside one
busy process on 2 cores took twice as long with 2 threads as alone). Readers therefore run at the
lowest CPU priority: while the main process computes, a core it shares with a reader is its own,
and whenever it waits for a batch, the readers get every core. Cores-minus-workers threads would
do the first but not the second: encoding with 1 reader on 2 cores measured faster with 2 threads
than with 1 (the reader is idle most of the time).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: taskset, cgroup cpusets), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def cores_per_process() -> int:
    """This process's share of the cores when torchrun starts several on the machine."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, usable_cores() // max(1, int(local) if local.isdigit() else 1))


def default_workers() -> int:
    """Reader processes: one core of this process's share left for the main process, at most 8."""
    return max(0, min(8, cores_per_process() - 1))


READER_NICE = 19  # the lowest priority: readers take only what the main process leaves


def lowest_priority(_worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: this process gives way to every other."""
    with contextlib.suppress(OSError, AttributeError):  # a system without nice runs unchanged
        os.nice(READER_NICE - os.nice(0))


def make_loader(dataset: Any, batches: Any, workers: int, collate_fn: Any, pin_memory: bool = False) -> Any:
    """A DataLoader over ``batches`` (a batch sampler: lists of dataset indices; or an int, the
    batch size, over the dataset in order) read by ``workers`` processes at the lowest priority,
    4 batches ahead of the main process; ``workers=0`` reads in the main process."""
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler  # torch only once a job runs

    if isinstance(batches, int):
        batches = BatchSampler(SequentialSampler(dataset), batches, drop_last=False)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,  # keeps the device fed while workers decode
        worker_init_fn=lowest_priority if workers else None,
    )
