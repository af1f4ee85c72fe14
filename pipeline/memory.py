"""Process memory: keep freed tensor memory in the C heap, so the train step does not fault it in again.

PyTorch's CPU tensors come from malloc. glibc serves any block over its mmap threshold (at most 32
MiB) with a fresh mmap, unmaps it on free, and trims the heap top back to the OS. The train step
frees and re-allocates the same large blocks every step (the tied [V, D] gradient, logits [T, V]
and their gradients, the dense embedding gradient), so each step faulted ~1 GB in again page by
page, zero-filled by the kernel: ~225,000 minor faults per full-size step (measured, bf16 and fp32
alike).

`tune_allocator` tells glibc, through mallopt, to serve every block from its heap (no per-block
mmap) and to never give the heap back, so a freed block is reused by a later allocation of the same
size. PyTorch allocates with posix_memalign, which in glibc (2.36 measured) asks for a little more
than the block and so cannot reuse a freed block of exactly its size at once: the heap grows over
the first few steps until the freed blocks merge into ones that fit, then stays put (full-size bf16
step: ~100 faults per step from the fifth step on; peak RSS 3.4 -> 3.6 GB, fp32 3.3 -> 4.2 GB). The
cost is that the heap never shrinks: the process keeps its peak, which a training process holds
every step anyway. Nothing to install; a no-op (False) where the C library is not glibc.
`PIPELINE_ALLOCATOR=system` leaves glibc's defaults (for measuring the difference).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4

TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: the heap top is given back only past 2 GiB free
TOP_PAD = 64 << 20  # heap grows in 64 MiB steps: fewer brk calls while the first steps find their peak


@functools.cache
def _libc():
    """glibc's handle, or None when the C library is another one (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError, TypeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


@functools.cache
def tune_allocator() -> bool:
    """Serve every malloc from the heap and never trim it (process-wide, once). True when glibc accepted all
    settings; False where they do not apply (not glibc, or PIPELINE_ALLOCATOR=system)."""
    if os.environ.get("PIPELINE_ALLOCATOR", "") == "system":
        return False
    libc = _libc()
    if libc is None:
        return False
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)



def give_back() -> bool:
    """Return the heap's free pages to the OS (glibc malloc_trim). The trainer calls it after the
    once-in-a-while work (validation, checkpoints, the best weights), whose one-off blocks would
    otherwise stay in the kept heap and add up epoch after epoch; the step's own blocks are faulted
    in again once, not every step. False where it does not apply (not glibc, or not tuned)."""
    libc = _libc()
    if libc is None or not tune_allocator():
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim(0)
    return True
