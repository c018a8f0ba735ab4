"""Keeping a long streamed prediction's, or a backed training run's, memory flat under glibc's malloc (Linux);
nothing elsewhere.

glibc raises its mmap threshold each time a large mapped block is freed, so after the first chunk the per-batch
activations (a few MB each) come from the heap, which fragments and keeps growing: a single model predicting
50,000 cells in chunks of 10,000 peaked 1.2 GB above its start, 10,000 cells 0.3 GB (about 23 KB a cell for
data of 2 KB a cell). With the threshold fixed at 4 MB, blocks that large are mapped and returned when freed:
0.28 GB at 50,000 cells. It costs page faults: in the same measurement ~15-20 % of the throughput, which is why
only predictions over several chunks ask for it. Training with --backed asks for it too: the reader's small HDF5
allocations, interleaved with the batches' activations, fragmented the heap worse (a tiny model on 40,000 cells
peaked 0.55-0.73 GB above its start, 0.37 GB with the threshold fixed, for ~10 % more time).

glibc has no call that restores its dynamic threshold, so the setting lasts for the rest of the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
LARGE_BLOCK_BYTES = 4 << 20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    # musl and other C libraries have neither function: then nothing is tuned
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def map_large_blocks() -> bool:
    """Fix glibc's mmap threshold at LARGE_BLOCK_BYTES for the rest of the process (see the module docstring);
    False where the C library is not glibc."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES))


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (malloc_trim): called between chunks."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
