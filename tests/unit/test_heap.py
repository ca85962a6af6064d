"""Giving the C heap's free memory back after an edit (editserve.heap)."""

from __future__ import annotations

import platform

import pytest
import torch

from editserve.heap import give_back_free_memory, resident_mb


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="malloc_trim is glibc's",
)
def test_freed_tensors_memory_goes_back_to_the_system() -> None:
    # Mid-sized tensors (under glibc's mmap threshold, so they live in the heap), all freed
    # but every 400th: the ones kept pin the heap, so without a trim the freed pages stay.
    tensors = [torch.ones(16_000) for _ in range(4000)]  # 64 KB each, written: resident
    kept = tensors[399::400]
    del tensors
    before = resident_mb()
    assert give_back_free_memory()
    assert resident_mb() < before - 100, "the freed heap pages stayed resident"
    assert len(kept) == 10
