"""allocator: glibc's malloc tuned for backed training and for prediction, a no-op elsewhere."""

import platform

import numpy as np
import pytest

import allocator


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_threshold_is_fixed_and_large_blocks_still_work():
    assert allocator.map_large_blocks()
    block = np.ones(3 * allocator.LARGE_BLOCK_BYTES // 8)  # mapped now, and freed back to the system
    assert block.sum() == len(block)
    del block
    allocator.release_free_memory()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_heap_memory_is_kept_for_reuse_and_still_released_on_request():
    assert allocator.reuse_freed_memory()
    blocks = [np.ones(allocator.REUSED_BLOCK_BYTES // 16) for _ in range(3)]  # on the heap, below the threshold
    assert all(block.sum() == len(block) for block in blocks)
    del blocks
    allocator.release_free_memory()


def test_without_glibc_nothing_is_tuned(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.map_large_blocks() is False
    assert allocator.reuse_freed_memory() is False
    allocator.release_free_memory()  # and no error
