"""Keeping a backed training run's memory flat under glibc's malloc (Linux), and returning a streamed
prediction's free pages between chunks; nothing elsewhere.

glibc raises its mmap threshold each time a large mapped block is freed, so after a while the per-batch
activations (a few MB each) come from the heap, where small allocations that outlive their batch sit between
them: the heap fragments and keeps growing. Training with --backed fixes the threshold at 4 MB, so blocks that
large are mapped and returned when freed: the HDF5 reader's small allocations, interleaved with the batches'
activations, fragmented the heap badly (a tiny model on 40,000 cells peaked 0.55-0.73 GB above its start, 0.37 GB
with the threshold fixed, for ~10 % more time: the page faults of mapping every block afresh).

Prediction does not need that: `predict_samples` writes every batch's outputs into arrays allocated once, so
nothing small outlives a batch, and a 10^5-cell stream peaks as low without the fixed threshold (187-189 MB,
two runs) as with it (208-235 MB), 15-20 % faster (without that change: 390-780 MB, three runs). It asks for
the opposite, `reuse_freed_memory`: with glibc's dynamic thresholds the heap's top was given back to the system
after every batch (its free top passed the trim threshold) and faulted in again by the next, 200 page faults a
cell for a small model: its encoder ran about 30 % slower than encoder and head in a loop on their own
(1,031 µs a cell against ~800).

glibc has no call that restores its dynamic threshold, so the setting lasts for the rest of the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers in glibc's malloc.h
LARGE_BLOCK_BYTES = 4 << 20
REUSED_BLOCK_BYTES = 32 << 20  # the largest mmap threshold glibc's dynamic rule reaches on 64-bit systems
KEPT_TOP_BYTES = 128 << 20


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


def reuse_freed_memory() -> bool:
    """Keep blocks up to REUSED_BLOCK_BYTES on the heap and up to KEPT_TOP_BYTES of its free top, so a batch's
    activations reuse the previous batch's pages (see the module docstring); False where the C library is not
    glibc. `release_free_memory` still hands the free pages back when asked."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, REUSED_BLOCK_BYTES)
                and libc.mallopt(M_TRIM_THRESHOLD, KEPT_TOP_BYTES))


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (malloc_trim): called between chunks."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
