"""glibc's malloc told to keep the large blocks torch frees on the CPU, so the next batch reuses them.

torch's CPU allocator takes every tensor from malloc and frees it when the tensor dies. glibc serves
a block over its mmap threshold (128 KB at first, at most 32 MB as it adapts) with a fresh mmap and
unmaps it when freed, and it gives the top of its heap back to the system past the trim threshold.
A test batch of 512 digits has 51 MB of activations per layer: each forward pass mapped them anew
and the kernel zeroed every page again. That was 4 of the evaluate stage's 6.4 s on MNIST-sized
data, in system time, and 10 s of system time in two epochs of training (the validation passes).
With both thresholds at 256 MB, the blocks stay in the heap and are reused: evaluate takes 4.0 s.

PyTorch's CPU tuning guide swaps the allocator (jemalloc or tcmalloc through LD_PRELOAD) for the
same reason; that has to be set before Python starts, in every stage's command line and on every
machine. mallopt does it from inside, for this process and the processes it forks (prepare-data's
decoders); the ranks a command starts run the command's entry again. Where the user set glibc's
own variables, theirs stay. Only speed and memory change, never a result: a block's address is not
an input of any kernel (torch aligns every tensor itself). The cost: up to 256 MB of freed memory
a process keeps rather than returning it to the system.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 256 << 20
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to KEEP_BYTES; whether it was done (not on other libcs,
    nor where the user tuned malloc through its environment variables)."""
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    # glibc only: musl's and macOS's allocators are left as they are
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    mallopt = libc.mallopt
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
