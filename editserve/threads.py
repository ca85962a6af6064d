"""OpenMP thread teams, given back when a thread goes idle.

torch's CPU kernels run on OpenMP (libgomp, bundled in torch's Linux wheels). Every thread that
runs torch work gets a team of its own that outlives the work: the engine thread's, and one per
worker thread that computed an edit. libgomp keeps team threads spinning between parallel regions
only while the process has no more OpenMP threads than cores; past that they sleep, and each of
the thousands of small parallel regions of a forward pays a wake-up. Measured on 2 cores: a
10-request MEMIT edit computed in a worker thread took 43 s while the main thread's idle team
existed and 20 s without it; the engine's forwards ran ~50 % slower after a worker had computed
anything (its team lived on). So each thread gives its team back when it goes idle.

A single team left behind is enough: through the server, a 10-request MEMIT edit took 22-38 s
against 16 s in-process while the event-loop thread kept the team it made computing the delta
summary of an edit's response. So the server does no torch work on its event loop, and runs
every off-loop call through `in_worker`, never bare `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch

_PAUSE_SOFT = 1  # omp_pause_soft: free the threads, keep the settings
P = ParamSpec("P")
T = TypeVar("T")


@functools.cache
def _pause_resource_all() -> Callable[[int], int] | None:
    """libgomp's omp_pause_resource_all, from the copy torch loaded (None without one)."""
    lib = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if not lib.is_file():
        return None  # another OpenMP runtime (or none): nothing known to give back
    try:
        pause = ctypes.CDLL(str(lib)).omp_pause_resource_all
    except (OSError, AttributeError):
        return None
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause


def release_thread_team() -> bool:
    """Frees the calling thread's OpenMP team (its next parallel region makes a new one).
    True if it was freed (or there was none); False where this runtime offers no way."""
    pause = _pause_resource_all()
    return pause is not None and pause(_PAUSE_SOFT) == 0


def releasing_team(fn: Callable[P, T]) -> Callable[P, T]:
    """`fn`, then the calling thread's team given back: for torch work in worker threads."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        finally:
            release_thread_team()

    return run


async def in_worker(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn` in a worker thread (`asyncio.to_thread`), its OpenMP team given back after: how the
    server runs anything that may touch torch off the event loop."""
    return await asyncio.to_thread(releasing_team(fn), *args, **kwargs)
