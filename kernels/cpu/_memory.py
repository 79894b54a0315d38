"""Keep freed large arrays' memory in the process heap (glibc), so the next call's arrays
reuse pages that are already mapped.

Every layer call returns fresh arrays (outputs, caches) of several MB. glibc's malloc maps
such a block with mmap and unmaps it when freed (a threshold that it raises only up to the
largest block freed so far, and it trims the heap's free top back to the OS), so the next
call's arrays are new pages that the kernel zeroes on first touch: in char-LM training
(2-layer LSTM 256, B=32, k1=50, 2 threads) the first writer of each update's gate buffers ran
at half speed and an update took 84-93 ms, against 75 ms with the settings below.

At import the CPU backend therefore sets M_MMAP_THRESHOLD to 32 MiB (glibc's maximum: larger
blocks are still mapped and unmapped) and M_TRIM_THRESHOLD to 256 MiB (free heap kept before
trimming), for the whole process, like the OpenBLAS thread setting in ``_loop.py``. The cost:
up to 256 MiB of freed memory stays with the process. ``BPTT_KEEP_FREED_MEMORY=0`` leaves
malloc alone; where libc is not glibc (no ``mallopt``) nothing is changed.
"""

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameter numbers
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20


def keep_freed_memory():
    """Apply the settings above unless BPTT_KEEP_FREED_MEMORY=0; True if they were applied."""
    if os.environ.get("BPTT_KEEP_FREED_MEMORY", "").strip() == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


KEEPS_FREED_MEMORY = keep_freed_memory()
