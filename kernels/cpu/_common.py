"""The part of every recurrent backward pass that comes after the time loop (Haste style):
parameter gradients and dx as a few large GEMMs over all (T - t_start) * B rows at once.
"""

import numpy as np

from ._blas import gemm_nn, gemm_tn
from ._math import jit


@jit
def add_column_sums(a, out):
    """out[N] += sum over rows of a[M, N]."""
    for m in range(a.shape[0]):
        row = a[m]
        for n in range(out.shape[0]):
            out[n] += row[n]


@jit
def finish_backward(x, h0, y, dg_x, dg_h, w_ih, dw_ih, dw_hh, db_ih, db_hh, dx, dh, t_start):
    """Accumulate parameter gradients and write dx from the per-step gate gradients.

    x: [T,B,I] layer input   h0: [B,H] initial hidden state   y: [T,B,H] h_1 .. h_T
    dg_x: [T,B,G*H] dL/d(input-side pre-activations: x W_ih^T + b_ih), rows t >= t_start
    dg_h: [T,B,G*H] dL/d(hidden-side pre-activations: h W_hh^T + b_hh), rows t >= t_start
          (the same array as dg_x for LSTM and Elman cells)
    w_ih: [G*H,I]   dw_ih: [G*H,I] +=   dw_hh: [G*H,H] +=   db_ih, db_hh: [G*H] +=
    dx: [T,B,I] out (rows t < t_start set to zero)   dh: [T,B,H] (rows t < t_start set to zero)
    """
    T, B, I = x.shape
    H = h0.shape[1]
    GH = dg_x.shape[2]
    first = t_start * B                                    # first row of the window
    x2 = x.reshape(T * B, I)[first:]                       # N,I with N = (T-t_start)*B
    gx2 = dg_x.reshape(T * B, GH)[first:]                  # N,G*H
    gh2 = dg_h.reshape(T * B, GH)                          # T*B,G*H
    gemm_tn(gx2, x2, dw_ih, 1.0)                           # dW_ih += dg_x^T x
    # dW_hh += dg_h^T h_prev: step t_start sees h0 or y[t_start-1], later steps see y[t-1]
    h_first = h0 if t_start == 0 else y[t_start - 1]
    gemm_tn(gh2[first:first + B], h_first, dw_hh, 1.0)
    gemm_tn(gh2[first + B:], y.reshape(T * B, H)[first:(T - 1) * B], dw_hh, 1.0)
    if dg_h is dg_x:                                       # LSTM, Elman: one sum for both
        db = np.zeros(GH, db_ih.dtype)
        add_column_sums(gx2, db)
        db_ih += db
        db_hh += db
    else:
        add_column_sums(gx2, db_ih)
        add_column_sums(gh2[first:], db_hh)
    gemm_nn(gx2, w_ih, dx.reshape(T * B, I)[first:], 0.0)  # dx = dg_x W_ih
    dx[:t_start] = 0
    dh[:t_start] = 0
