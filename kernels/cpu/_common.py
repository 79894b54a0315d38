"""The large GEMMs around the time loops (Haste style): the input projection of all T steps
before the forward loop, and after the backward loop the parameter gradients and dx over all
(T - t_start) * B rows at once. Each takes (part, parts) to run in pieces on threads.
"""

import numpy as np

from . import _args
from ._blas import gemm_nn, gemm_nt, gemm_tn
from ._loop import part_range, phase_parts, run_parts
from ._math import jit


@jit
def add_column_sums(a, c0, c1, out):
    """out[c1 - c0] += sum over rows of a[M, c0:c1]. (The columns are cut from each row of a
    row-contiguous a, so the inner loop runs over a contiguous view and vectorises; a[:, c0:c1]
    handed in instead would be a strided 2-D view, and it ran 3.4x slower: [3200, 1024] of a
    [3200, 2048] float32 array, 2.8 -> 0.82 ms.)"""
    for m in range(a.shape[0]):
        row = a[m][c0:c1]
        for n in range(c1 - c0):
            out[n] += row[n]


# An input projection of fewer rows (T*B) than this is split by output columns instead: OpenBLAS
# packs the whole W_ih on every call, and a piece of few rows does not win that back. Measured,
# 2 threads, float32, I = H, ms (rows / columns): T*B = 100, H = 256 0.50 / 0.43, H = 512 1.99 /
# 1.55; T*B = 200, H = 256 0.71-0.80 / 0.65-0.72; from 400 rows within noise.
PROJECT_BY_COLUMNS_ROWS = 400


@jit(nogil=True)
def project_inputs(x, w_ih, out, part, parts):
    """out[T,B,G*H] = x[T,B,I] @ w_ih[G*H,I]^T in ``parts`` pieces: by rows of T*B, or for
    fewer than PROJECT_BY_COLUMNS_ROWS rows by columns of out (rows of w_ih)."""
    T, B, I = x.shape
    M, N = T * B, out.shape[2]
    x2, out2 = x.reshape(M, I), out.reshape(M, N)
    if M < PROJECT_BY_COLUMNS_ROWS:
        n0, n1 = part_range(N, part, parts)
        gemm_nt(x2, w_ih[n0:n1], out2[:, n0:n1], 0.0)
    else:
        m0, m1 = part_range(M, part, parts)
        gemm_nt(x2[m0:m1], w_ih, out2[m0:m1], 0.0)


@jit(nogil=True)
def copy_inputs(x, out, part, parts):
    """out[T,B,G*H] = x[T,B,G*H] (an input the caller projected), rows of T*B in ``parts`` pieces."""
    T, B, N = x.shape
    m0, m1 = part_range(T * B, part, parts)
    x2, out2 = x.reshape(T * B, N), out.reshape(T * B, N)
    for m in range(m0, m1):             # element loops (see ops._gather_kernel)
        src, dst = x2[m], out2[m]
        for n in range(N):
            dst[n] = src[n]


def input_projection(x, w_ih, out, parts):
    """out[T,B,G*H] = x W_ih^T for all steps (``project_inputs``), or x itself where w_ih is
    None (the caller projected the input: x is [T,B,G*H]); in up to ``parts`` pieces."""
    if w_ih is None:
        run_parts(copy_inputs, (x, out), parts)
    else:
        run_parts(project_inputs, (x, w_ih, out), phase_parts(parts, x.size * out.shape[2]))


def gate_gradients(name, shape, dtype, w_ih):
    """A backward's [T,B,G*H] gate gradients: per-thread scratch (``_args.scratch``), or a
    fresh array where the backward returns them as dL/d(x W_ih^T) (w_ih None)."""
    return _args.scratch(name, shape, dtype) if w_ih is not None else _args.empty(shape, dtype)


def input_side(x, w_ih, dw_ih, dg_x, t_start):
    """What ``finish_backward`` gets as (x, w_ih, dw_ih, dx), and what a backward returns as dx.

    Usually x, w_ih, dw_ih and a fresh dx [T,B,I], which is returned. Where w_ih is None (the
    caller projected the input): size-0 stand-ins of the same array types, so that
    finish_backward's dW_ih and dx GEMMs do nothing (and compile no variant of their own),
    and dg_x [T,B,G*H] itself is returned as dL/d(x W_ih^T), its rows t < t_start zeroed
    here (the time loop writes the others).
    """
    if w_ih is not None:
        dx = _args.empty(x.shape, x.dtype)
        return (x, w_ih, dw_ih, dx), dx
    T, B, GH = dg_x.shape
    dg_x[:t_start] = 0
    no_input, no_weight = np.empty((T, B, 0), dg_x.dtype), np.empty((GH, 0), dg_x.dtype)
    return (no_input, no_weight, no_weight, no_input), dg_x


def run_finish_backward(input_args, h0, y, dg_x, dg_h, dw_hh, db_ih, db_hh, dh, t_start, parts):
    """``finish_backward`` over the rows t >= t_start in up to ``parts`` pieces (``phase_parts``
    of its GEMMs' multiply-adds); input_args: (x, w_ih, dw_ih, dx) from ``input_side``."""
    T, B, I = input_args[0].shape
    work = (T - t_start) * B * dg_x.shape[2] * (2 * I + h0.shape[1])
    run_parts(finish_backward, input_args + (h0, y, dg_x, dg_h, dw_hh, db_ih, db_hh, dh, t_start),
              phase_parts(parts, work))


@jit(nogil=True)
def finish_backward(x, w_ih, dw_ih, dx, h0, y, dg_x, dg_h, dw_hh, db_ih, db_hh, dh, t_start,
                    part, parts):
    """Accumulate parameter gradients and write dx from the per-step gate gradients.

    x: [T,B,I] layer input   w_ih: [G*H,I]   dw_ih: [G*H,I] +=
    dx: [T,B,I] out (rows t < t_start set to zero)   (I = 0: no input side, ``input_side``)
    h0: [B,H] initial hidden state   y: [T,B,H] h_1 .. h_T
    dg_x: [T,B,G*H] dL/d(input-side pre-activations: x W_ih^T + b_ih), rows t >= t_start
    dg_h: [T,B,G*H] dL/d(hidden-side pre-activations: h W_hh^T + b_hh), rows t >= t_start
          (the same array as dg_x for LSTM and Elman cells)
    dw_hh: [G*H,H] +=   db_ih, db_hh: [G*H] +=   dh: [T,B,H] (rows t < t_start set to zero)
    part, parts: this call does rows r0:r1 of the weight and bias gradients and rows m0:m1
    of dx's window (``part_range``); the pieces are independent.
    """
    T, B, I = x.shape
    H = h0.shape[1]
    GH = dg_x.shape[2]
    first = t_start * B                                    # first row of the window
    N = (T - t_start) * B
    x2 = x.reshape(T * B, I)[first:]                       # N,I
    gx2 = dg_x.reshape(T * B, GH)[first:]                  # N,G*H
    gh2 = dg_h.reshape(T * B, GH)[first:]                  # N,G*H
    r0, r1 = part_range(GH, part, parts)                   # gate rows of this piece
    gemm_tn(gx2[:, r0:r1], x2, dw_ih[r0:r1], 1.0)          # dW_ih += dg_x^T x
    # dW_hh += dg_h^T h_prev: step t_start sees h0 or y[t_start-1], later steps see y[t-1]
    h_first = h0 if t_start == 0 else y[t_start - 1]
    gemm_tn(gh2[:B, r0:r1], h_first, dw_hh[r0:r1], 1.0)
    gemm_tn(gh2[B:, r0:r1], y.reshape(T * B, H)[first:(T - 1) * B], dw_hh[r0:r1], 1.0)
    if dg_h is dg_x:                                       # LSTM, Elman: one sum for both
        db = np.zeros(r1 - r0, db_ih.dtype)
        add_column_sums(gx2, r0, r1, db)
        db_ih[r0:r1] += db
        db_hh[r0:r1] += db
    else:
        add_column_sums(gx2, r0, r1, db_ih[r0:r1])
        add_column_sums(gh2, r0, r1, db_hh[r0:r1])
    m0, m1 = part_range(N, part, parts)                    # dx rows of this piece
    gemm_nn(gx2[m0:m1], w_ih, dx.reshape(T * B, I)[first + m0:first + m1], 0.0)  # dx = dg_x W_ih
    if part == 0:
        dx[:t_start] = 0
        dh[:t_start] = 0
