"""glibc malloc settings for the forwards and backwards of a CPU trainer, and giving freed memory back.

Why: glibc serves an allocation above its mmap threshold (which grows from 128 KiB to at most 32 MiB) with a
fresh ``mmap`` and unmaps it on ``free``. A forward/backward on a CPU allocates and frees many tensors larger than
that (the logits of a micro-batch, [tokens, vocab] in float32: 137 MB for 700 tokens of a 49k vocabulary; their
gradient; the token statistics' chunks; the gradient of a tied embedding), and the kernel zero-fills every page of
each one on its first write: one page fault per 4 KiB, so an element-wise pass over fresh memory took ~80 ms where
the same pass over memory the process holds took ~15 ms (2-core AMD EPYC). Served from the heap instead, the
memory of a freed tensor is reused by the next one. `benchmarks/host_memory.py` on the GRPO update of
`benchmarks/grpo_step.py`'s shape (AMD EPYC, float32): 2.0 M -> 0.70 M page faults per update, 0.94x the time.

Only within a compute call (`reusing_freed_memory`): the heap keeps what was freed until the call ends, which is
what a forward/backward wants and what a weight sync does not (it would keep every bucket it sent). At the end
glibc's thresholds return to where its defaults settle and ``malloc_trim`` gives the freed memory back, so memory
between calls, when a colocated rollout engine needs it, is as before.

Only glibc (Linux) has these knobs; elsewhere the functions do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

HEAP_THRESHOLDS = (1 << 30, 1 << 30)
"""(mmap, trim) thresholds within a compute call: allocations below 1 GiB come from the heap, and up to 1 GiB free
at its top is kept for reuse. A module attribute so that `benchmarks/host_memory.py` can compare settings."""

GLIBC_SETTLED_THRESHOLDS = (32 << 20, 64 << 20)
"""Where glibc's dynamic thresholds settle once a process has freed large blocks (its largest mmap threshold,
and twice it for trimming): what the process returns to after a compute call."""


@functools.cache  # three calls per worker call: load the library once
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl, macOS)
        return None


def set_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """``mallopt`` both thresholds for this whole process; whether glibc took them."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))


@contextlib.contextmanager
def reusing_freed_memory():
    """Within: `HEAP_THRESHOLDS`. After: `GLIBC_SETTLED_THRESHOLDS`, and the freed memory back to the OS."""
    set_thresholds(*HEAP_THRESHOLDS)
    try:
        yield
    finally:
        set_thresholds(*GLIBC_SETTLED_THRESHOLDS)
        release_free_memory()


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``). A forward/backward frees gigabytes of
    activations; without this the freed heap stays in the process's RSS between calls, while the rollout engine
    (and on one machine, other ranks and stages) need that memory."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
