"""Time blocks of the parameter-gradient sums: where a backward adds up its steps.

A parameter gradient is a sum over steps (dW_ih = sum_t dg_t^T x_t, ...). A backward sums
its steps in blocks of ``BLOCK_STEPS`` steps at fixed positions of the stream: a call whose
step 0 is the stream's step ``t_origin`` cuts its steps t_start .. T-1 at every step t with
(t_origin + t) % BLOCK_STEPS == 0, sums each block on its own (one GEMM over its rows) and
adds the blocks' sums to the gradient from the last block down. So a sequence backpropagated
in one call, or in several calls that meet at block boundaries (``bptt.memory``'s pieces),
adds the same numbers in the same order: the gradients are equal bit for bit on the
backends whose GEMMs give each row the same value whatever the number of rows (reference,
cpu, whose ``TIME_BLOCKS`` is True). The GPU backends (``TIME_BLOCKS`` False) take
``t_origin`` and sum the whole window in one block (their GEMMs choose kernels by shape anyway).
"""

import numpy as np

# steps per block: 16 x B rows per GEMM (B = 32: 512) keeps the blocked GEMMs at the speed of
# one over the whole window (docs/performance.md, "Gradient sums in time blocks")
BLOCK_STEPS = 16


def time_blocks(t_start, T, t_origin=0, blocked=True):
    """int64 [n+1] the block boundaries of steps t_start .. T-1 of a call whose step 0 is the
    stream's step ``t_origin``, from the top down: T, ..., t_start (block k is steps
    bounds[k+1] .. bounds[k]-1); ``blocked`` False: one block. (BLOCK_STEPS is read at each
    call: tests set smaller blocks.)"""
    if not blocked:
        return np.array([T, t_start], np.int64)
    steps, bounds = BLOCK_STEPS, [T]
    while bounds[-1] > t_start:
        t1 = bounds[-1]
        bounds.append(max(t_start, t1 - 1 - (t_origin + t1 - 1) % steps))
    return np.array(bounds, np.int64)
