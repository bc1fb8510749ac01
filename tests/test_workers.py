"""Reader workers: their default count, their priority, and the one loader every job reads through."""

from __future__ import annotations

import os

import pytest

from optvq_cli.core import workers as W


class _Niceness:
    """Item i is (i, the niceness of the process that read it)."""

    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int) -> tuple[int, int]:
        return i, os.nice(0)


def _as_list(items):
    return list(items)


@pytest.mark.parametrize(
    ("cores", "local", "expected"), [(1, "1", 0), (2, "1", 1), (4, "1", 3), (16, "4", 3), (32, "1", 8), (2, "4", 0)]
)
def test_default_workers_leave_one_core_of_each_process_share(monkeypatch, cores, local, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert W.default_workers() == expected


def test_readers_run_at_the_lowest_priority_and_the_main_process_keeps_its_own():
    before = os.nice(0)
    batches = list(W.make_loader(_Niceness(), 3, 2, _as_list))
    assert [i for batch in batches for i, _ in batch] == list(range(7))  # in order, last batch partial
    assert [len(b) for b in batches] == [3, 3, 1]
    assert {nice for batch in batches for _, nice in batch} == {W.READER_NICE}
    assert os.nice(0) == before


def test_without_workers_the_main_process_reads_at_its_own_priority():
    before = os.nice(0)
    batches = list(W.make_loader(_Niceness(), [[4, 0], [2]], 0, _as_list))
    assert batches == [[(4, before), (0, before)], [(2, before)]]
