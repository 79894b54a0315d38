"""LSTM layer, all T steps per call (PyTorch's cell and gate order i, f, g, o)::

    i = sigmoid(W_ii x + b_ii + W_hi h + b_hi)      f = sigmoid(... f rows ...)
    g = tanh(... g rows ...)                        o = sigmoid(... o rows ...)
    c' = f * c + i * g                              h' = o * tanh(c')

Forward: one GEMM projects the inputs of all T steps; each step adds h @ W_hh^T (GEMM) and
runs the fused gate loop. Backward: each step runs the fused gate-gradient loop and one GEMM
(dgates @ W_hh) for the gradient flowing into h_{t-1}; parameter gradients and dx follow as
large GEMMs over all steps (``_phases.finish_backward``). The time loops run split by batch
rows over threads, or by hidden units for few rows or a large W_hh (``_loop.split_by_units``);
with one row and a small W_hh on one thread, the large GEMMs beside them in pieces of steps
(``_phases.forward_phases``, ``backward_phases``).
"""

import numpy as np

from bptt_kernels.host import RecurrentCache, check_backward, check_forward

from . import _buffers
from ._barrier import barrier, publish, wait_for
from ._panels import active_buffers, active_product, step_weight
from ._phases import (backward_phases, final_rows, forward_phases, gate_gradients, input_side,
                      row_steps, zero_units)
from ._loop import THREAD_STEPS, layer_threads, split_ranges
from ._math import jit, one_like, sigmoid_, tanh_

G = 4


@jit(inline="always")
def _gate_views(a, H, j0, j1):
    """The units j0:j1 of the i, f, g, o blocks of a [4H] row."""
    return a[j0:j1], a[H + j0:H + j1], a[2 * H + j0:2 * H + j1], a[3 * H + j0:3 * H + j1]


@jit(inline="always")
def _cell_forward(g, bias, c_prev, c, tanh_c, h, H, j0, j1):
    """One batch row of one step, units j0:j1. g: [4H] pre-activations in, activated gates
    out; bias: [4H] (b_ih + b_hh); c_prev: [H]; c, tanh_c, h: [H] out.
    Every array is first cut to the units' 1-D views and each loop runs over range(n): the
    index is then known to be >= 0 (no wraparound code), and with one loop per output LLVM
    can rule out overlap between a loop's few arrays at run time; one fused loop over
    eleven views stayed scalar (24 ns per unit; split: 2.9 ns)."""
    n = j1 - j0
    gi, gf, gg, go = _gate_views(g, H, j0, j1)
    bi, bf, bg, bo = _gate_views(bias, H, j0, j1)
    cp, c, tanh_c, h = c_prev[j0:j1], c[j0:j1], tanh_c[j0:j1], h[j0:j1]
    for j in range(n):
        gi[j] = sigmoid_(gi[j] + bi[j])                   # input gate
    for j in range(n):
        gf[j] = sigmoid_(gf[j] + bf[j])                   # forget gate
    for j in range(n):
        gg[j] = tanh_(gg[j] + bg[j])                      # candidate
    for j in range(n):
        go[j] = sigmoid_(go[j] + bo[j])                   # output gate
    for j in range(n):
        c[j] = gf[j] * cp[j] + gi[j] * gg[j]              # new cell state
    for j in range(n):
        tanh_c[j] = tanh_(c[j])
    for j in range(n):
        h[j] = go[j] * tanh_c[j]                          # new hidden state


@jit(nogil=True)
def _forward_steps(h0, c0, w_hh, bias, steps, gates, c, tanh_c, y, progress, flags, part,
                   parts):
    # The time loop for this part's batch rows b0:b1 and units j0:j1 (_loop.run_time_loop).
    # h0, c0: [B,H]  w_hh: [4H,H]  bias: [4H] (b_ih + b_hh)
    # steps: int64 [B] row b's steps (lengths): at t >= steps[b] its gates, c, tanh_c, y are
    #   written as zeros (the step product skips it, _panels.active_product, or computes it
    #   unused; the final state is read from step steps[b]-1 after the loop)
    # gates: [T,B,4H] in x W_ih^T, out activated gates  c, tanh_c, y: [T,B,H] out
    # progress: step counter and abort word beside a GEMM phase (_phases.forward_phases,
    #   backward_phases), else empty  flags: barrier words when split by units, else empty
    T, B = gates.shape[:2]
    H = h0.shape[1]
    b0, b1, j0, j1 = split_ranges(B, H, flags, part, parts)
    sw = step_weight(w_hh, False, G, H, b0, b1, j0, j1, flags.size != 0)
    rows_buf = active_buffers(sw, steps, T)                # products of the rows running
    for t in range(T):
        if progress.size and wait_for(progress, t + 1):               # x W_ih^T of step t
            return                                                # the call was aborted
        h_prev = h0 if t == 0 else y[t - 1]
        c_prev = c0 if t == 0 else c[t - 1]
        active_product(h_prev, sw, gates[t], 1.0, t, steps, rows_buf)  # += h W_hh^T
        for b in range(b0, b1):
            if t < steps[b]:
                _cell_forward(gates[t, b], bias, c_prev[b], c[t, b], tanh_c[t, b], y[t, b], H,
                              j0, j1)
            else:                                                     # a padded step
                zero_units(gates[t, b], G, H, j0, j1)
                for a in (c[t, b], tanh_c[t, b], y[t, b]):
                    zero_units(a, 1, H, j0, j1)
        if flags.size and barrier(flags, part, parts, t + 1):         # all of h_t written
            return                                                # the call was aborted


@jit(inline="always")
def _cell_backward(dy, dh_next, dc_next, gates, c_prev, tanh_c, dgates, dh, H, j0, j1):
    """One batch row of one step, units j0:j1. dy, dh_next: [H] (dh_next: what flows back
    from step t+1); dc_next: [H] in dL/dc_t, out dL/dc_{t-1} (direct path); gates: [4H];
    c_prev, tanh_c: [H]; dgates: [4H] out dL/d(pre-activations); dh: [H] out total dL/dh_t.
    Views and loops as in _cell_forward, so that each loop vectorises."""
    one = one_like(gates[0])
    n = j1 - j0
    gi, gf, gg, go = _gate_views(gates, H, j0, j1)
    di, df, dg, do = _gate_views(dgates, H, j0, j1)
    dy, dn, dc, cp, tc, dh = (dy[j0:j1], dh_next[j0:j1], dc_next[j0:j1], c_prev[j0:j1],
                              tanh_c[j0:j1], dh[j0:j1])
    for j in range(n):
        dh[j] = dy[j] + dn[j]                             # total dL/dh_t
    for j in range(n):
        dc[j] += dh[j] * go[j] * (one - tc[j] * tc[j])    # dL/dc_t
    for j in range(n):
        di[j] = dc[j] * gg[j] * gi[j] * (one - gi[j])
    for j in range(n):
        df[j] = dc[j] * cp[j] * gf[j] * (one - gf[j])
    for j in range(n):
        dg[j] = dc[j] * gi[j] * (one - gg[j] * gg[j])
    for j in range(n):
        do[j] = dh[j] * tc[j] * go[j] * (one - go[j])
    for j in range(n):
        dc[j] *= gf[j]                                    # dL/dc_{t-1}: c_t = f c_{t-1} + ...


@jit(nogil=True)
def _backward_steps(dy, c0, gates, c, tanh_c, w_hh, t_start, steps, dh_final, dh_next, dc_next,
                    dgates, dh, progress, flags, part, parts):
    # The time loop backwards for this part's batch rows b0:b1 and units j0:j1.
    # dy: [T,B,H]  c0: [B,H]  gates: [T,B,4H]  c, tanh_c: [T,B,H]  w_hh: [4H,H]
    # t_start: first step to backpropagate through
    # steps: int64 [B] row b's steps (lengths): at t >= steps[b] its dgates and dh are written
    #   as zeros and dc_next passes unchanged; the step product skips its dh_next or
    #   overwrites it with zeros, so its last step steps[b]-1 takes dL/dh there from dh_final
    #   [B,H] (dL/dh_T) instead (the caller puts dh_final back for rows with no step in the
    #   window)
    # dh_next, dc_next: [B,H] in: dL/d(final state), out: dL/d(state entering t_start)
    # dgates: [T,B,4H] out (rows t >= t_start)  dh: [T,B,H] out (rows t >= t_start)
    # progress: step counter and abort word beside a GEMM phase (_phases.forward_phases,
    #   backward_phases), else empty  flags: barrier words when split by units, else empty
    T, B = gates.shape[:2]
    H = c0.shape[1]
    b0, b1, j0, j1 = split_ranges(B, H, flags, part, parts)
    sw = step_weight(w_hh, True, 1, H, b0, b1, j0, j1, flags.size != 0)
    rows_buf = active_buffers(sw, steps, T)                # products of the rows running
    for t in range(T - 1, t_start - 1, -1):
        c_prev = c0 if t == 0 else c[t - 1]
        for b in range(b0, b1):
            if t < steps[b]:
                _cell_backward(dy[t, b], dh_final[b] if t == steps[b] - 1 else dh_next[b],
                               dc_next[b], gates[t, b], c_prev[b], tanh_c[t, b], dgates[t, b],
                               dh[t, b], H, j0, j1)
            else:                                                     # a padded step
                zero_units(dgates[t, b], G, H, j0, j1)
                zero_units(dh[t, b], 1, H, j0, j1)
        if flags.size and barrier(flags, part, parts, T - t):         # all of dgates_t written
            return                                                # the call was aborted
        if progress.size:
            publish(progress, T - t)                                  # steps T-1 .. t done
        active_product(dgates[t], sw, dh_next, 0.0, t, steps, rows_buf)  # dL/dh_{t-1} = dgates W_hh


def lstm_forward(x, state, w_ih, w_hh, b_ih, b_hh, lengths=None):
    """x [T,B,I], state (h0 [B,H], c0 [B,H]), w_ih [4H,I], w_hh [4H,H], b_ih, b_hh [4H]
    -> y [T,B,H], (h_T, c_T), RecurrentCache (gates [T,B,4H], c, tanh_c [T,B,H]).
    w_ih None: x is x W_ih^T [T,B,4H]. lengths [B] or None: row b runs steps
    0 .. lengths[b]-1 (the contract in bptt_kernels.__init__)."""
    call = check_forward("lstm", x, state, w_ih, w_hh, b_ih, b_hh, np, lengths=lengths)
    T, B, H, dtype = call.T, call.B, call.H, call.x.dtype
    gates = _buffers.empty((T, B, G * H), dtype)                       # T,B,4H
    c, tanh_c, y = (_buffers.empty((T, B, H), dtype) for _ in range(3))  # T,B,H each
    h0, c0 = (s.copy() for s in call.state)                            # B,H each
    with layer_threads(THREAD_STEPS * B * G * H * (call.I + H)) as parts:
        forward_phases(_forward_steps, (h0, c0, call.w_hh, call.b_ih + call.b_hh,
                                        row_steps(call.lengths, T, B), gates, c, tanh_c, y),
                       call.x, call.w_ih, gates, parts, B, call.w_hh.size,
                       call.lengths)                    # x W_ih^T, then the loop
    cache = RecurrentCache("lstm", call.x, h0, c0, y, gates, c, tanh_c, lengths=call.lengths)
    return y, (final_rows(y, call.lengths), final_rows(c, call.lengths)), cache


def lstm_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0,
                  t_origin=0):
    """dy [T,B,H], dfinal_state (dh_T, dc_T), cache from lstm_forward; accumulates dw_ih,
    dw_hh, db_ih, db_hh -> dx [T,B,I], (dh, dc) entering step t_start, dh [T,B,H].
    w_ih and dw_ih None: dL/d(x W_ih^T) [T,B,4H] in place of dx."""
    call = check_backward("lstm", dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih,
                          db_hh, t_start, np, t_origin)
    cache = call.cache                              # checked, C-contiguous
    T, B, H, t_start, dtype = call.T, call.B, call.H, call.t_start, cache.y.dtype
    tanh_c = np.tanh(cache.c) if cache.tanh_c is None else cache.tanh_c   # T,B,H
    dh_next, dc_next = (s.copy() for s in call.dfinal_state)            # B,H each
    dh_final = dh_next if cache.lengths is None else dh_next.copy()     # B,H  dL/dh_T
    dgates = gate_gradients("lstm.dgates", cache.gates.shape, dtype, call.w_ih)  # T,B,4H
    inputs, dx = input_side(cache.x, call.w_ih, dw_ih, dgates, t_start)
    dh = _buffers.empty((T, B, H), dtype)                               # T,B,H
    with layer_threads(THREAD_STEPS * B * G * H * (2 * call.I + 2 * H)) as parts:
        backward_phases(_backward_steps, (call.dy, cache.c0, cache.gates, cache.c, tanh_c,
                                          call.w_hh, t_start, row_steps(cache.lengths, T, B),
                                          dh_final, dh_next, dc_next, dgates, dh),
                        inputs=inputs, h0=cache.h0, y=cache.y, dg_x=dgates, dg_h=dgates,
                        dw_hh=dw_hh, db_ih=db_ih, db_hh=db_hh, dh=dh, t_start=t_start,
                        t_origin=call.t_origin, parts=parts, lengths=cache.lengths)
    if cache.lengths is not None:                   # rows with no step in the window: dL/dh
        idle = cache.lengths <= t_start             # passes unchanged (the step products
        dh_next[idle] = dh_final[idle]              # wrote zeros there)
    return dx, (dh_next, dc_next), dh
