"""editserve.threads: a worker thread's OpenMP team is given back after its torch work."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from editserve.threads import in_worker, release_thread_team, releasing_team

needs_libgomp = pytest.mark.skipif(
    not (Path(torch.__file__).parent / "lib" / "libgomp.so.1").is_file()
    or torch.get_num_threads() < 2
    or not Path("/proc/self/task").is_dir(),
    reason="needs torch's bundled libgomp, 2+ threads and /proc (Linux CPU wheels)",
)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _parallel_work() -> torch.Tensor:
    a = torch.ones(512, 512)
    return (a @ a).sum()  # a parallel region: the calling thread gets a team


@needs_libgomp
def test_a_worker_threads_team_is_freed_after_its_work() -> None:
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: None).result()  # the worker thread itself exists now
        before = _threads()
        kept = pool.submit(_parallel_work).result()
        grown = _threads()
        assert grown > before  # the worker's team threads outlive the work
        freed = pool.submit(releasing_team(_parallel_work)).result()
        assert _threads() == before
        assert freed == kept == 512.0 * 512 * 512
        # The next parallel work makes a new team and computes the same.
        assert pool.submit(releasing_team(_parallel_work)).result() == kept


@needs_libgomp
def test_release_reports_success_and_torch_keeps_working() -> None:
    assert release_thread_team()
    assert float(_parallel_work()) == 512.0 * 512 * 512


def test_releasing_team_passes_results_and_errors_through() -> None:
    calls: list[str] = []

    def fails() -> None:
        calls.append(threading.current_thread().name)
        raise ValueError("bad request")

    assert releasing_team(lambda x: x + 1)(1) == 2
    with pytest.raises(ValueError, match="bad request"):
        releasing_team(fails)()
    assert calls


@needs_libgomp
def test_in_worker_leaves_no_team_behind_in_the_event_loops_workers() -> None:
    async def run() -> tuple[int, int, torch.Tensor]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))
        await asyncio.to_thread(lambda: None)  # the worker thread itself exists now
        before = _threads()
        result = await in_worker(_parallel_work)
        return before, _threads(), result

    before, after, result = asyncio.run(run())
    assert after == before
    assert result == 512.0 * 512 * 512
