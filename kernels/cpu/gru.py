"""GRU layer, all T steps per call (PyTorch's cell and gate order r, z, n)::

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)      z = sigmoid(... z rows ...)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))   h' = (1 - z) * n + z * h

Forward: one GEMM projects the inputs of all T steps; each step computes h @ W_hh^T (GEMM)
into a [B,3H] scratch and runs the fused gate loop. Backward: the gate-gradient loop per step
and one GEMM for the gradient flowing into h_{t-1}; parameter gradients and dx follow as large
GEMMs over all steps; the time loops run split by batch rows over threads
(``_loop.py``). The input side and the hidden side differ only in the n block
(dL/d(W_hn h + b_hn) = r * dL/d(n pre-activation)), so backward keeps both.
"""

from typing import NamedTuple

import numpy as np

from . import _args
from ._blas import gemm_step
from ._common import finish_backward, project_inputs
from ._loop import layer_threads, part_range, run_parts
from ._math import jit, one_like, sigmoid_, tanh_

G = 3


class GRUCache(NamedTuple):
    """What ``gru_backward`` needs from ``gru_forward`` (T steps, batch B, sizes I, H)."""
    x: np.ndarray       # [T,B,I]  layer input (the caller's array, not copied)
    h0: np.ndarray      # [B,H]    initial hidden state (copy)
    gates: np.ndarray   # [T,B,3H] activated gates per step: r, z, n blocks of H
    hn: np.ndarray      # [T,B,H]  W_hn h_{t-1} + b_hn (the term r multiplies)
    y: np.ndarray       # [T,B,H]  hidden state after each step, h_1 .. h_T (the returned y)


@jit(inline="always")
def _cell_forward(g, hw, b_ih, b_hh, h_prev, hn, h, H):
    """One batch row of one step. g: [3H] input projection in, activated gates out;
    hw: [3H] h_{t-1} W_hh^T; b_ih, b_hh: [3H]; h_prev: [H]; hn, h: [H] out.
    Gate blocks are taken as 1-D views so every access is a plain [j] (LLVM vectorises it)."""
    one = one_like(g[0])
    gr, gz, gn = g[:H], g[H:2 * H], g[2 * H:]
    hr, hz, hh = hw[:H], hw[H:2 * H], hw[2 * H:]
    bir, biz, bin_ = b_ih[:H], b_ih[H:2 * H], b_ih[2 * H:]
    bhr, bhz, bhn = b_hh[:H], b_hh[H:2 * H], b_hh[2 * H:]
    for j in range(H):
        r = sigmoid_(gr[j] + bir[j] + hr[j] + bhr[j])
        z = sigmoid_(gz[j] + biz[j] + hz[j] + bhz[j])
        hnj = hh[j] + bhn[j]
        n = tanh_(gn[j] + bin_[j] + r * hnj)
        gr[j], gz[j], gn[j] = r, z, n
        hn[j] = hnj
        h[j] = (one - z) * n + z * h_prev[j]              # new hidden state


@jit(nogil=True)
def _forward_steps(h0, w_hh, w_hh_t, b_ih, b_hh, gates, hn, y, hw, part, parts):
    # The time loop for this part's batch rows b0:b1 (rows are independent of each other).
    # h0: [B,H]  w_hh: [3H,H]  w_hh_t: [H,3H] = w_hh^T  b_ih, b_hh: [3H]
    # gates: [T,B,3H] in x W_ih^T, out activated gates  hn, y: [T,B,H] out  hw: [B,3H] scratch
    T = gates.shape[0]
    H = h0.shape[1]
    b0, b1 = part_range(gates.shape[1], part, parts)              # batch rows
    for t in range(T):
        h_prev = h0 if t == 0 else y[t - 1]
        gemm_step(h_prev[b0:b1], w_hh, w_hh_t, hw[b0:b1], 0.0)            # h W_hh^T
        for b in range(b0, b1):
            _cell_forward(gates[t, b], hw[b], b_ih, b_hh, h_prev[b], hn[t, b], y[t, b], H)


@jit(inline="always")
def _cell_backward(dy, dh_next, gates, hn, h_prev, dg_x, dg_h, dh, H):
    """One batch row of one step. dy: [H]; dh_next: [H] in what flows back from step t+1,
    out the direct part z * dh of dL/dh_{t-1}; gates: [3H]; hn, h_prev: [H];
    dg_x, dg_h: [3H] out dL/d(input-side, hidden-side pre-activations); dh: [H] out."""
    one = one_like(gates[0])
    gr, gz, gn = gates[:H], gates[H:2 * H], gates[2 * H:]
    dxr, dxz, dxn = dg_x[:H], dg_x[H:2 * H], dg_x[2 * H:]
    dhr, dhz, dhn = dg_h[:H], dg_h[H:2 * H], dg_h[2 * H:]
    for j in range(H):
        r, z, n = gr[j], gz[j], gn[j]
        dhj = dy[j] + dh_next[j]
        dn = dhj * (one - z) * (one - n * n)              # through n's tanh
        dr = dn * hn[j] * r * (one - r)
        dz = dhj * (h_prev[j] - n) * z * (one - z)
        dxr[j], dxz[j], dxn[j] = dr, dz, dn
        dhr[j], dhz[j], dhn[j] = dr, dz, dn * r
        dh[j] = dhj
        dh_next[j] = dhj * z


@jit(nogil=True)
def _backward_steps(dy, h0, gates, hn, y, w_hh, w_hh_t, t_start, dh_next, dg_x, dg_h, dh, part, parts):
    # The time loop backwards for this part's batch rows b0:b1.
    # dy: [T,B,H]  h0: [B,H]  gates: [T,B,3H]  hn, y: [T,B,H]  w_hh: [3H,H]  w_hh_t: [H,3H]
    # t_start: first step to backpropagate through
    # dh_next: [B,H] in: dL/dh_T, out: dL/d(h entering t_start)
    # dg_x, dg_h: [T,B,3H] out (rows t >= t_start)  dh: [T,B,H] out (rows t >= t_start)
    T = gates.shape[0]
    H = h0.shape[1]
    b0, b1 = part_range(dy.shape[1], part, parts)                  # batch rows
    for t in range(T - 1, t_start - 1, -1):
        h_prev = h0 if t == 0 else y[t - 1]
        for b in range(b0, b1):
            _cell_backward(dy[t, b], dh_next[b], gates[t, b], hn[t, b], h_prev[b],
                           dg_x[t, b], dg_h[t, b], dh[t, b], H)
        gemm_step(dg_h[t, b0:b1], w_hh_t, w_hh, dh_next[b0:b1], 1.0)  # += dg_h W_hh (z dh there)


def gru_forward(x, state, w_ih, w_hh, b_ih, b_hh):
    """x [T,B,I], state (h0 [B,H],), w_ih [3H,I], w_hh [3H,H], b_ih, b_hh [3H]
    -> y [T,B,H], (h_T,), GRUCache."""
    x, (h0,), w_ih, w_hh, b_ih, b_hh = _args.forward_args(G, 1, x, state, w_ih, w_hh, b_ih, b_hh)
    T, B, I = x.shape
    H = w_hh.shape[1]
    gates = _args.empty((T, B, G * H), x.dtype)
    hn, y = _args.empty((T, B, H), x.dtype), _args.empty((T, B, H), x.dtype)
    hw = _args.empty((B, G * H), x.dtype)
    h0 = h0.copy()
    with layer_threads(T * B * G * H * (I + H)) as parts:
        run_parts(project_inputs, (x, w_ih, gates), parts)               # x W_ih^T, all steps
        run_parts(_forward_steps, (h0, w_hh, np.ascontiguousarray(w_hh.T), b_ih, b_hh,
                                   gates, hn, y, hw), min(parts, B))
    return y, (y[-1].copy(),), GRUCache(x, h0, gates, hn, y)


def gru_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0):
    """dy [T,B,H], dfinal_state (dh_T,), cache from gru_forward; accumulates dw_ih, dw_hh,
    db_ih, db_hh -> dx [T,B,I], (dh entering step t_start,), dh [T,B,H]."""
    dy, (dh_next,), w_ih, w_hh, t_start = _args.backward_args(
        G, 1, GRUCache, dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start)
    x = cache.x
    B, H = dh_next.shape
    dh_next = dh_next.copy()
    dg_x = _args.empty(cache.gates.shape, x.dtype)
    dg_h = _args.empty(cache.gates.shape, x.dtype)
    dx = _args.empty(x.shape, x.dtype)
    dh = _args.empty(dy.shape, x.dtype)
    T, _, I = x.shape
    with layer_threads((T - t_start) * B * G * H * (2 * I + 2 * H)) as parts:
        run_parts(_backward_steps, (dy, cache.h0, cache.gates, cache.hn, cache.y, w_hh,
                                    np.ascontiguousarray(w_hh.T), t_start, dh_next, dg_x, dg_h,
                                    dh), min(parts, B))
        run_parts(finish_backward, (x, cache.h0, cache.y, dg_x, dg_h, w_ih, dw_ih, dw_hh,
                                    db_ih, db_hh, dx, dh, t_start), parts)
    return dx, (dh_next,), dh
