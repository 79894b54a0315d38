"""Time blocks of the parameter-gradient sums: where a backward adds up its steps.

A parameter gradient is a sum over steps (dW_ih = sum_t dg_t^T x_t, ...). A backward of B
batch rows sums its steps in blocks of ``block_steps(B)`` steps at fixed positions of the
stream: a call whose step 0 is the stream's step ``t_origin`` cuts its steps t_start .. T-1
at every step t with (t_origin + t) % block_steps(B) == 0, sums each block on its own (one GEMM over its rows) and
adds the blocks' sums to the gradient from the last block down. So a sequence backpropagated
in one call, or in several calls that meet at block boundaries (``bptt.memory``'s pieces),
adds the same numbers in the same order: the gradients are equal bit for bit on the
backends whose GEMMs give each row the same value whatever the number of rows (reference,
cpu, whose ``TIME_BLOCKS`` is True). The GPU backends (``TIME_BLOCKS`` False) take
``t_origin`` and sum the whole window in one block (their GEMMs choose kernels by shape anyway).
"""

import numpy as np

# A block has at least BLOCK_STEPS steps and BLOCK_ROWS rows (steps x B): the blocked GEMMs then
# keep the speed of one over the whole window (smaller blocks of a small batch cost a layer
# backward 8% at B = 8, H = 512: docs/performance.md, "Gradient sums in time blocks"). Read at
# each call: tests set smaller blocks.
BLOCK_STEPS = 16
BLOCK_ROWS = 512


def block_steps(B):
    """Steps per time block of a batch of B rows: BLOCK_STEPS, doubled until the block holds
    BLOCK_ROWS rows (B = 32: 16, B = 8: 64, B = 1: 512)."""
    steps = BLOCK_STEPS
    while steps * B < BLOCK_ROWS:
        steps *= 2
    return steps


def time_blocks(t_start, T, t_origin, B, blocked=True):
    """int64 [n+1] the block boundaries of steps t_start .. T-1 of a call over B batch rows
    whose step 0 is the stream's step ``t_origin``, from the top down: T, ..., t_start (block k
    is steps bounds[k+1] .. bounds[k]-1); ``blocked`` False: one block."""
    if not blocked:
        return np.array([T, t_start], np.int64)
    steps, bounds = block_steps(B), [T]
    while bounds[-1] > t_start:
        t1 = bounds[-1]
        bounds.append(max(t_start, t1 - 1 - (t_origin + t1 - 1) % steps))
    return np.array(bounds, np.int64)
