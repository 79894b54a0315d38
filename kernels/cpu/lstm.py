"""LSTM layer, all T steps per call (PyTorch's cell and gate order i, f, g, o)::

    i = sigmoid(W_ii x + b_ii + W_hi h + b_hi)      f = sigmoid(... f rows ...)
    g = tanh(... g rows ...)                        o = sigmoid(... o rows ...)
    c' = f * c + i * g                              h' = o * tanh(c')

Forward: one GEMM projects the inputs of all T steps; each step adds h @ W_hh^T (GEMM) and
runs the fused gate loop. Backward: each step runs the fused gate-gradient loop and one GEMM
(dgates @ W_hh) for the gradient flowing into h_{t-1}; parameter gradients and dx follow as
large GEMMs over all steps (``_common.finish_backward``). The time loops run split by batch
rows over threads (``_loop.py``).
"""

from typing import NamedTuple

import numpy as np

from . import _args
from ._blas import gemm_step
from ._common import finish_backward, project_inputs
from ._loop import layer_threads, part_range, run_parts
from ._math import jit, one_like, sigmoid_, tanh_

G = 4


class LSTMCache(NamedTuple):
    """What ``lstm_backward`` needs from ``lstm_forward`` (T steps, batch B, sizes I, H)."""
    x: np.ndarray       # [T,B,I]  layer input (the caller's array, not copied)
    h0: np.ndarray      # [B,H]    initial hidden state (copy)
    c0: np.ndarray      # [B,H]    initial cell state (copy)
    gates: np.ndarray   # [T,B,4H] activated gates per step: i, f, g, o blocks of H
    c: np.ndarray       # [T,B,H]  cell state after each step, c_1 .. c_T
    tanh_c: np.ndarray  # [T,B,H]  tanh(c_t)
    y: np.ndarray       # [T,B,H]  hidden state after each step, h_1 .. h_T (the returned y)


@jit(inline="always")
def _cell_forward(g, bias, c_prev, c, tanh_c, h, H):
    """One batch row of one step. g: [4H] pre-activations in, activated gates out;
    bias: [4H] (b_ih + b_hh); c_prev: [H]; c, tanh_c, h: [H] out.
    Gate blocks are taken as 1-D views so every access is a plain [j] (LLVM vectorises it)."""
    gi, gf, gg, go = g[:H], g[H:2 * H], g[2 * H:3 * H], g[3 * H:]
    bi, bf, bg, bo = bias[:H], bias[H:2 * H], bias[2 * H:3 * H], bias[3 * H:]
    for j in range(H):
        i = sigmoid_(gi[j] + bi[j])
        f = sigmoid_(gf[j] + bf[j])
        n = tanh_(gg[j] + bg[j])
        o = sigmoid_(go[j] + bo[j])
        cj = f * c_prev[j] + i * n                        # new cell state
        tc = tanh_(cj)
        gi[j], gf[j], gg[j], go[j] = i, f, n, o
        c[j] = cj
        tanh_c[j] = tc
        h[j] = o * tc                                     # new hidden state


@jit(nogil=True)
def _forward_steps(h0, c0, w_hh, w_hh_t, bias, gates, c, tanh_c, y, part, parts):
    # The time loop for this part's batch rows b0:b1 (rows are independent of each other).
    # h0, c0: [B,H]  w_hh: [4H,H]  w_hh_t: [H,4H] = w_hh^T  bias: [4H] (b_ih + b_hh)
    # gates: [T,B,4H] in x W_ih^T, out activated gates  c, tanh_c, y: [T,B,H] out
    T = gates.shape[0]
    H = h0.shape[1]
    b0, b1 = part_range(gates.shape[1], part, parts)              # batch rows
    for t in range(T):
        h_prev = h0[b0:b1] if t == 0 else y[t - 1, b0:b1]
        c_prev = c0 if t == 0 else c[t - 1]
        gemm_step(h_prev, w_hh, w_hh_t, gates[t, b0:b1], 1.0)             # += h W_hh^T
        for b in range(b0, b1):
            _cell_forward(gates[t, b], bias, c_prev[b], c[t, b], tanh_c[t, b], y[t, b], H)


@jit(inline="always")
def _cell_backward(dy, dh_next, dc_next, gates, c_prev, tanh_c, dgates, dh, H):
    """One batch row of one step. dy, dh_next: [H] (dh_next: what flows back from step t+1);
    dc_next: [H] in dL/dc_t, out dL/dc_{t-1} (direct path); gates: [4H]; c_prev, tanh_c: [H];
    dgates: [4H] out dL/d(pre-activations); dh: [H] out total dL/dh_t."""
    one = one_like(gates[0])
    gi, gf, gg, go = gates[:H], gates[H:2 * H], gates[2 * H:3 * H], gates[3 * H:]
    di, df, dg, do = dgates[:H], dgates[H:2 * H], dgates[2 * H:3 * H], dgates[3 * H:]
    for j in range(H):
        i, f, n, o = gi[j], gf[j], gg[j], go[j]
        tc = tanh_c[j]
        dhj = dy[j] + dh_next[j]
        dcj = dc_next[j] + dhj * o * (one - tc * tc)
        di[j] = dcj * n * i * (one - i)
        df[j] = dcj * c_prev[j] * f * (one - f)
        dg[j] = dcj * i * (one - n * n)
        do[j] = dhj * tc * o * (one - o)
        dh[j] = dhj
        dc_next[j] = dcj * f


@jit(nogil=True)
def _backward_steps(dy, c0, gates, c, tanh_c, w_hh, w_hh_t, t_start, dh_next, dc_next,
                    dgates, dh, part, parts):
    # The time loop backwards for this part's batch rows b0:b1.
    # dy: [T,B,H]  c0: [B,H]  gates: [T,B,4H]  c, tanh_c: [T,B,H]  w_hh: [4H,H]
    # w_hh_t: [H,4H] = w_hh^T  t_start: first step to backpropagate through
    # dh_next, dc_next: [B,H] in: dL/d(final state), out: dL/d(state entering t_start)
    # dgates: [T,B,4H] out (rows t >= t_start)  dh: [T,B,H] out (rows t >= t_start)
    T = gates.shape[0]
    H = c0.shape[1]
    b0, b1 = part_range(dy.shape[1], part, parts)                  # batch rows
    for t in range(T - 1, t_start - 1, -1):
        c_prev = c0 if t == 0 else c[t - 1]
        for b in range(b0, b1):
            _cell_backward(dy[t, b], dh_next[b], dc_next[b], gates[t, b], c_prev[b],
                           tanh_c[t, b], dgates[t, b], dh[t, b], H)
        gemm_step(dgates[t, b0:b1], w_hh_t, w_hh, dh_next[b0:b1], 0.0)  # dL/dh_{t-1} = dgates W_hh


def lstm_forward(x, state, w_ih, w_hh, b_ih, b_hh):
    """x [T,B,I], state (h0 [B,H], c0 [B,H]), w_ih [4H,I], w_hh [4H,H], b_ih, b_hh [4H]
    -> y [T,B,H], (h_T, c_T), LSTMCache."""
    x, (h0, c0), w_ih, w_hh, b_ih, b_hh = _args.forward_args(G, 2, x, state, w_ih, w_hh, b_ih, b_hh)
    T, B, I = x.shape
    H = w_hh.shape[1]
    gates = _args.empty((T, B, G * H), x.dtype)
    c, tanh_c, y = (_args.empty((T, B, H), x.dtype) for _ in range(3))
    h0, c0 = h0.copy(), c0.copy()
    with layer_threads(T * B * G * H * (I + H)) as parts:
        run_parts(project_inputs, (x, w_ih, gates), parts)               # x W_ih^T, all steps
        run_parts(_forward_steps, (h0, c0, w_hh, np.ascontiguousarray(w_hh.T), b_ih + b_hh,
                                   gates, c, tanh_c, y), min(parts, B))
    return y, (y[-1].copy(), c[-1].copy()), LSTMCache(x, h0, c0, gates, c, tanh_c, y)


def lstm_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0):
    """dy [T,B,H], dfinal_state (dh_T, dc_T), cache from lstm_forward; accumulates dw_ih,
    dw_hh, db_ih, db_hh -> dx [T,B,I], (dh, dc) entering step t_start, dh [T,B,H]."""
    dy, (dh_next, dc_next), w_ih, w_hh, t_start = _args.backward_args(
        G, 2, LSTMCache, dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start)
    x = cache.x
    B, H = dh_next.shape
    dh_next, dc_next = dh_next.copy(), dc_next.copy()
    dgates = _args.empty(cache.gates.shape, x.dtype)
    dx = _args.empty(x.shape, x.dtype)
    dh = _args.empty(dy.shape, x.dtype)
    T, _, I = x.shape
    with layer_threads((T - t_start) * B * G * H * (2 * I + 2 * H)) as parts:
        run_parts(_backward_steps, (dy, cache.c0, cache.gates, cache.c, cache.tanh_c, w_hh,
                                    np.ascontiguousarray(w_hh.T), t_start, dh_next, dc_next,
                                    dgates, dh), min(parts, B))
        run_parts(finish_backward, (x, cache.h0, cache.y, dgates, dgates, w_ih, dw_ih, dw_hh,
                                    db_ih, db_hh, dx, dh, t_start), parts)
    return dx, (dh_next, dc_next), dh
