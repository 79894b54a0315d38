"""Where the CPU kernels' output and scratch buffers come from.

``empty`` makes every output (the tests replace it with a NaN-filled allocator, so an element
a kernel forgets to write fails the checks); ``scratch`` hands out per-thread buffers that
live only inside one kernel call and are reused by the next call of the same name, shape and
dtype (a fresh multi-megabyte array costs the zeroing of every page on first touch).
"""

import threading

import numpy as np


def empty(shape, dtype):
    """Every output and scratch buffer of the CPU kernels comes from here (the tests replace it
    with a NaN-filled allocator, so an element a kernel forgets to write fails the checks)."""
    return np.empty(shape, dtype)


_scratch = threading.local()


def scratch(name, shape, dtype):
    """A [shape] buffer of dtype that lives only inside one kernel call (a backward pass's
    gate gradients), kept per thread and handed out again to the next call with the same
    name, shape and dtype. Its contents are whatever the last call left: the kernels write
    every element they read."""
    cache = getattr(_scratch, "buffers", None)
    if cache is None:
        cache = _scratch.buffers = {}
    buf = cache.get(name)
    if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
        cache[name] = buf = empty(shape, dtype)
    return buf
