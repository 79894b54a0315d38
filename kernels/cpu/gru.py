"""GRU layer, all T steps per call (PyTorch's cell and gate order r, z, n)::

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)      z = sigmoid(... z rows ...)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))   h' = (1 - z) * n + z * h

Forward: one GEMM projects the inputs of all T steps; each step computes h @ W_hh^T (GEMM)
into a [B,3H] scratch and runs the fused gate loop. Backward: the gate-gradient loop per step
and one GEMM for the gradient flowing into h_{t-1}; parameter gradients and dx follow as large
GEMMs over all steps; the time loops run split by batch rows over threads, or by hidden
units for few rows or a large W_hh (``_loop.split_by_units``), or with one row and a small
W_hh on one thread beside the large GEMMs (``_phases.forward_phases``, ``backward_phases``).
The input side and the hidden side differ only in the n block (dL/d(W_hn h + b_hn) =
r * dL/d(n pre-activation)), so backward keeps both.
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

G = 3


@jit(inline="always")
def _gate_views(a, H, j0, j1):
    """The units j0:j1 of the r, z, n blocks of a [3H] row."""
    return a[j0:j1], a[H + j0:H + j1], a[2 * H + j0:2 * H + j1]


@jit(inline="always")
def _cell_forward(g, hw, b_ih, b_hh, h_prev, hn, h, H, j0, j1):
    """One batch row of one step, units j0:j1. g: [3H] input projection in, activated gates
    out; hw: [3H] h_{t-1} W_hh^T; b_ih, b_hh: [3H]; h_prev: [H]; hn, h: [H] out.
    Arrays are cut to the units' 1-D views and loops run over range(n), one per output, so
    that each vectorises (see lstm._cell_forward)."""
    one = one_like(g[0])
    n_units = j1 - j0
    gr, gz, gn = _gate_views(g, H, j0, j1)
    hr, hz, hh = _gate_views(hw, H, j0, j1)
    bir, biz, bin_ = _gate_views(b_ih, H, j0, j1)
    bhr, bhz, bhn = _gate_views(b_hh, H, j0, j1)
    hp, hn, h = h_prev[j0:j1], hn[j0:j1], h[j0:j1]
    for j in range(n_units):
        gr[j] = sigmoid_(gr[j] + bir[j] + hr[j] + bhr[j])         # reset gate
    for j in range(n_units):
        gz[j] = sigmoid_(gz[j] + biz[j] + hz[j] + bhz[j])         # update gate
    for j in range(n_units):
        hn[j] = hh[j] + bhn[j]                                    # W_hn h + b_hn
    for j in range(n_units):
        gn[j] = tanh_(gn[j] + bin_[j] + gr[j] * hn[j])            # candidate
    for j in range(n_units):
        h[j] = (one - gz[j]) * gn[j] + gz[j] * hp[j]              # new hidden state


@jit(nogil=True)
def _forward_steps(h0, w_hh, b_ih, b_hh, steps, gates, hn, y, hw, progress, flags, part,
                   parts):
    # The time loop for this part's batch rows b0:b1 and units j0:j1 (_loop.run_time_loop).
    # h0: [B,H]  w_hh: [3H,H]  b_ih, b_hh: [3H]
    # steps: int64 [B] row b's steps (lengths): at t >= steps[b] its gates, hn, y are written
    #   as zeros (the step product skips it, _panels.active_product, or computes it unused;
    #   the final state is read from step steps[b]-1 after the loop)
    # gates: [T,B,3H] in x W_ih^T, out activated gates  hn, y: [T,B,H] out  hw: [B,3H] scratch
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
        active_product(h_prev, sw, hw, 0.0, t, steps, rows_buf)  # h W_hh^T
        for b in range(b0, b1):
            if t < steps[b]:
                _cell_forward(gates[t, b], hw[b], b_ih, b_hh, h_prev[b], hn[t, b], y[t, b], H,
                              j0, j1)
            else:                                                     # a padded step
                zero_units(gates[t, b], G, H, j0, j1)
                zero_units(hn[t, b], 1, H, j0, j1)
                zero_units(y[t, b], 1, H, j0, j1)
        if flags.size and barrier(flags, part, parts, t + 1):         # all of h_t written
            return                                                # the call was aborted


@jit(inline="always")
def _cell_backward(dy, dh_next, gates, hn, h_prev, dg_x, dg_h, dh, H, j0, j1):
    """One batch row of one step, units j0:j1. dy: [H]; dh_next: [H] in what flows back from
    step t+1, out the direct part z * dh of dL/dh_{t-1}; gates: [3H]; hn, h_prev: [H];
    dg_x, dg_h: [3H] out dL/d(input-side, hidden-side pre-activations); dh: [H] out.
    Views and loops as in _cell_forward."""
    one = one_like(gates[0])
    n_units = j1 - j0
    gr, gz, gn = _gate_views(gates, H, j0, j1)
    dxr, dxz, dxn = _gate_views(dg_x, H, j0, j1)
    dhr, dhz, dhn = _gate_views(dg_h, H, j0, j1)
    dy, dn, hn, hp, dh = dy[j0:j1], dh_next[j0:j1], hn[j0:j1], h_prev[j0:j1], dh[j0:j1]
    for j in range(n_units):
        dh[j] = dy[j] + dn[j]                                     # total dL/dh_t
    for j in range(n_units):
        dxn[j] = dh[j] * (one - gz[j]) * (one - gn[j] * gn[j])    # through n's tanh
    for j in range(n_units):
        dxr[j] = dxn[j] * hn[j] * gr[j] * (one - gr[j])
    for j in range(n_units):
        dxz[j] = dh[j] * (hp[j] - gn[j]) * gz[j] * (one - gz[j])
    for j in range(n_units):
        dhr[j] = dxr[j]
    for j in range(n_units):
        dhz[j] = dxz[j]
    for j in range(n_units):
        dhn[j] = dxn[j] * gr[j]
    for j in range(n_units):
        dn[j] = dh[j] * gz[j]                                     # direct path through z h


@jit(nogil=True)
def _backward_steps(dy, h0, gates, hn, y, w_hh, t_start, steps, dh_next, dg_x, dg_h, dh,
                    progress, flags, part, parts):
    # The time loop backwards for this part's batch rows b0:b1 and units j0:j1.
    # dy: [T,B,H]  h0: [B,H]  gates: [T,B,3H]  hn, y: [T,B,H]  w_hh: [3H,H]
    # t_start: first step to backpropagate through
    # steps: int64 [B] row b's steps (lengths): at t >= steps[b] its dg_x, dg_h and dh are
    #   written as zeros and its dh_next passes unchanged (the step product skips the row
    #   or adds a zero row)
    # dh_next: [B,H] in: dL/dh_T, out: dL/d(h entering t_start)
    # dg_x, dg_h: [T,B,3H] out (rows t >= t_start)  dh: [T,B,H] out (rows t >= t_start)
    # progress: step counter and abort word beside a GEMM phase (_phases.forward_phases,
    #   backward_phases), else empty  flags: barrier words when split by units, else empty
    T, B = gates.shape[:2]
    H = h0.shape[1]
    b0, b1, j0, j1 = split_ranges(B, H, flags, part, parts)
    sw = step_weight(w_hh, True, 1, H, b0, b1, j0, j1, flags.size != 0)
    rows_buf = active_buffers(sw, steps, T)                # products of the rows running
    for t in range(T - 1, t_start - 1, -1):
        h_prev = h0 if t == 0 else y[t - 1]
        for b in range(b0, b1):
            if t < steps[b]:
                _cell_backward(dy[t, b], dh_next[b], gates[t, b], hn[t, b], h_prev[b],
                               dg_x[t, b], dg_h[t, b], dh[t, b], H, j0, j1)
            else:                                                     # a padded step
                zero_units(dg_x[t, b], G, H, j0, j1)
                zero_units(dg_h[t, b], G, H, j0, j1)
                zero_units(dh[t, b], 1, H, j0, j1)
        if flags.size and barrier(flags, part, parts, T - t):         # all of dg_h_t written
            return                                                # the call was aborted
        if progress.size:
            publish(progress, T - t)                                  # steps T-1 .. t done
        active_product(dg_h[t], sw, dh_next, 1.0, t, steps, rows_buf)  # += dg_h W_hh (z dh there)


def gru_forward(x, state, w_ih, w_hh, b_ih, b_hh, lengths=None):
    """x [T,B,I], state (h0 [B,H],), w_ih [3H,I], w_hh [3H,H], b_ih, b_hh [3H]
    -> y [T,B,H], (h_T,), RecurrentCache (gates [T,B,3H], hn [T,B,H]).
    w_ih None: x is x W_ih^T [T,B,3H]. lengths [B] or None: row b runs steps
    0 .. lengths[b]-1 (the contract in bptt_kernels.__init__)."""
    call = check_forward("gru", x, state, w_ih, w_hh, b_ih, b_hh, np, lengths=lengths)
    T, B, H, dtype = call.T, call.B, call.H, call.x.dtype
    gates = _buffers.empty((T, B, G * H), dtype)                        # T,B,3H
    hn, y = _buffers.empty((T, B, H), dtype), _buffers.empty((T, B, H), dtype)  # T,B,H each
    hw = _buffers.scratch("gru.hw", (B, G * H), dtype)                  # B,3H
    h0 = call.state[0].copy()                                           # B,H
    with layer_threads(THREAD_STEPS * B * G * H * (call.I + H)) as parts:
        forward_phases(_forward_steps, (h0, call.w_hh, call.b_ih, call.b_hh,
                                        row_steps(call.lengths, T, B), gates, hn, y, hw),
                       call.x, call.w_ih, gates, parts, B, call.w_hh.size,
                       call.lengths)                    # x W_ih^T, then the loop
    cache = RecurrentCache("gru", call.x, h0, y=y, gates=gates, hn=hn, lengths=call.lengths)
    return y, (final_rows(y, call.lengths),), cache


def gru_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0,
                 t_origin=0):
    """dy [T,B,H], dfinal_state (dh_T,), cache from gru_forward; accumulates dw_ih, dw_hh,
    db_ih, db_hh -> dx [T,B,I], (dh entering step t_start,), dh [T,B,H].
    w_ih and dw_ih None: dL/d(x W_ih^T) [T,B,3H] in place of dx."""
    call = check_backward("gru", dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih,
                          db_hh, t_start, np, t_origin)
    cache = call.cache                              # checked, C-contiguous
    T, B, H, t_start, dtype = call.T, call.B, call.H, call.t_start, cache.y.dtype
    dh_next = call.dfinal_state[0].copy()                               # B,H
    dg_x = gate_gradients("gru.dg_x", cache.gates.shape, dtype, call.w_ih)  # T,B,3H
    dg_h = _buffers.scratch("gru.dg_h", cache.gates.shape, dtype)       # T,B,3H
    inputs, dx = input_side(cache.x, call.w_ih, dw_ih, dg_x, t_start)
    dh = _buffers.empty((T, B, H), dtype)                               # T,B,H
    with layer_threads(THREAD_STEPS * B * G * H * (2 * call.I + 2 * H)) as parts:
        backward_phases(_backward_steps, (call.dy, cache.h0, cache.gates, cache.hn, cache.y,
                                          call.w_hh, t_start, row_steps(cache.lengths, T, B),
                                          dh_next, dg_x, dg_h, dh),
                        inputs=inputs, h0=cache.h0, y=cache.y, dg_x=dg_x, dg_h=dg_h,
                        dw_hh=dw_hh, db_ih=db_ih, db_hh=db_hh, dh=dh, t_start=t_start,
                        t_origin=call.t_origin, parts=parts, lengths=cache.lengths)
    return dx, (dh_next,), dh
