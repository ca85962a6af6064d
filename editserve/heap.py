"""The C heap's free memory given back to the system after an edit.

An edit's optimisation allocates and frees thousands of tensors of sizes that change with every
prompt. glibc keeps what they freed in its heap, fragmented, and reuses little of it: a server
making sequential MEMIT edits on the embedded model grew 60-70 MB of resident memory per edit
(2 cores, 24 GiB), swapped at ~380 edits, and one edit then ran past 10 minutes. Trimming after
each edit kept it flat (bench/edit_rss.py measures both).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None on another C library (nothing known to give back)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def resident_mb(pid: int | str = "self") -> float:
    """A process's resident memory (Linux /proc), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def give_back_free_memory() -> bool:
    """Returns the heap's free pages to the system (every arena). False where not available."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
