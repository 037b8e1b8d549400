"""Keep freed memory in the process, so that timed calls do not page-fault at random.

XLA:CPU allocates each call's output and temporary buffers with malloc, and
glibc hands a large freed buffer back to the operating system: a buffer
allocated by one of XLA's worker threads lives in that thread's arena, whose
whole heap is unmapped once the main thread frees the last buffer in it (seen
with ``strace``: a 64 MiB heap mapped and unmapped on every call), and buffers
past the mmap threshold or the trim threshold return the same way. The next
call then touches fresh pages: 6,272 minor page faults for one float32
8x56x56x256 output, which took a forward pass at that shape from ~1.8 ms to
5-9 ms. Which call pays it depends on the order in which buffers are freed, so
interleaved timings of two layers swung by 3x from one run to the next.

:func:`keep_freed_memory` sets glibc's malloc to one arena, an mmap threshold
of 32 MiB (its maximum) and a trim threshold of 1 GiB, so that freed buffers
up to 32 MiB are reused rather than returned. Call it before JAX starts its
worker threads (before the first computation). Elsewhere (not glibc) it does
nothing and says so.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30))


def keep_freed_memory() -> str:
    """Set glibc's malloc to keep freed buffers up to 32 MiB; return what was done, for the report."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # no such symbol; no process handle (Windows)
        return "malloc as the platform set it (no glibc mallopt)"
    if not all(mallopt(option, value) for option, value in _SETTINGS):
        return "malloc as the platform set it (mallopt refused)"
    return "glibc malloc keeping freed memory (one arena, mmap threshold 32 MiB, trim threshold 1 GiB)"
