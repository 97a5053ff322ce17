"""glibc allocator settings for a process that frees and reallocates block-sized tensors.

A block's quantization allocates and frees the same few shapes (activation batches, Grams,
GPTQ work matrices) over and over. Freed memory that glibc keeps and hands back is fast; memory
returned to the OS at every free comes back page by page through page faults and kernel zeroing.
Measured on one Gemma 3 270M block (32 x 512 calibration tokens, 2 cores): 4.2 s with buffers
below 32 MB kept on the heap against 6.4-7.1 s with every tensor of 1 MiB or more in its own
mapping, and 6.1-6.7 s with PyTorch's transparent huge pages (THP_MEM_ALLOC_ENABLE).

Memory pulls the other way: buffers kept on the heap fragment it, and the heap's free holes
count as resident memory. Measured (2026-12-04, one run each): on the synthetic 24 x hidden-2048
model of bench/memory_streaming.py (205 MB of float32 weights per block) 8 MB is the middle: peak
RSS 1603 MB against 1844 / 1905 MB with 32 MB (16 MB: 1840; 4 MB: 1538), for +6% of that run's
time (262 s against 247 / 248 s; 4 MB: 280 s). On Gemma 3 270M (22 MB per block) the holes are
small in absolute terms (peak 2079 MB at 32 MB against 1978 MB at 8 MB) while the time is not
(quantization 42.9 s against 45.7 s). So the threshold follows the model: 32 MB while a block's
float32 weights are at most SMALL_BLOCK_BYTES, 8 MB above.
"""
from __future__ import annotations

import ctypes

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# buffers below it are reused from the heap, larger ones get their own mapping (see above).
# Fixed rather than glibc's adaptive default, so it cannot ratchet up over a run.
_MMAP_THRESHOLD = 8 << 20
# a model whose blocks are this small (float32 weights of one block's linears) keeps every
# buffer up to _SMALL_BLOCK_MMAP_THRESHOLD on the heap: its fragmentation stays within tens of MB
SMALL_BLOCK_BYTES = 64 << 20
_SMALL_BLOCK_MMAP_THRESHOLD = 32 << 20
# free heap memory is kept for reuse up to this much; `release_free_memory` returns the rest
# between blocks, so resident memory follows the current block, not the largest one so far
_TRIM_THRESHOLD = 512 << 20
# malloc arenas: glibc gives threads their own (up to 8 per core), and memory freed in one is
# never reused by another. A Dask worker's task thread, its event loop and Prefect's threads
# each kept hundreds of MB of freed buffers in arenas of their own; two bound that
ARENA_MAX = 2


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


def mmap_threshold(block_bytes: int | None = None) -> int:
    """The mmap threshold for a model whose blocks hold `block_bytes` of float32 linear weights
    (None: not known yet, the large-model setting)."""
    if block_bytes is not None and block_bytes <= SMALL_BLOCK_BYTES:
        return _SMALL_BLOCK_MMAP_THRESHOLD
    return _MMAP_THRESHOLD


def tune_allocator(block_bytes: int | None = None) -> None:
    """Keep freed tensor buffers for reuse within a block (idempotent; cheap); `block_bytes`
    (a block's float32 linear weights) sets how large a reused buffer may be (`mmap_threshold`)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold(block_bytes))
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
        # binds arenas created from now on; a process that must be bound from its start (a Dask
        # worker) gets MALLOC_ARENA_MAX in its environment (`allocator_environment`)
        libc.mallopt(_M_ARENA_MAX, ARENA_MAX)


def release_free_memory() -> None:
    """Return the heap's free pages to the OS: called after each block, so a run's resident
    memory stays bounded by one block's working set."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def allocator_environment() -> dict[str, str]:
    """Environment for a process started to run tasks (a Dask worker): its arena bound applies
    from its first thread on, before any code of ours runs."""
    return {"MALLOC_ARENA_MAX": str(ARENA_MAX)}
