"""Elman RNN layer, all T steps per call (PyTorch's ``nn.RNN``)::

    h' = act(W_ih x + b_ih + W_hh h + b_hh),   act = tanh or relu

Forward: one GEMM writes the input projections of all T steps straight into y; each step adds
h @ W_hh^T (GEMM) and applies bias and activation in place. Backward: per step the activation
derivative (from the saved output) and one GEMM for the gradient flowing into h_{t-1};
parameter gradients and dx follow as large GEMMs over all steps. The time loops run split by
batch rows over threads, or by hidden units for few rows or a large W_hh
(``_loop.split_by_units``), or with one row and a small W_hh on one thread beside the large
GEMMs (``_phases.forward_phases``, ``backward_phases``).
"""

import numpy as np

from bptt_kernels.host import RecurrentCache, check_backward, check_forward

from . import _buffers
from ._barrier import barrier, publish, wait_for
from ._panels import active_buffers, active_product, step_weight
from ._phases import (backward_phases, final_rows, forward_phases, gate_gradients, input_side,
                      row_steps, zero_units)
from ._loop import THREAD_STEPS, layer_threads, split_ranges
from ._math import jit, one_like, tanh_

G = 1


@jit(nogil=True)
def _forward_steps(h0, w_hh, bias, relu, steps, y, progress, flags, part, parts):
    # The time loop for this part's batch rows b0:b1 and units j0:j1 (_loop.run_time_loop).
    # h0: [B,H]  w_hh: [H,H]  bias: [H] (b_ih + b_hh)  relu: bool
    # steps: int64 [B] row b's steps (lengths): at t >= steps[b] its y is written as zeros
    #   (the step product skips it, _panels.active_product, or computes it unused; the final
    #   state is read from step steps[b]-1 after the loop)
    # y: [T,B,H] in x W_ih^T, out h_1 .. h_T
    # progress: step counter and abort word beside a GEMM phase (_phases.forward_phases),
    #   else empty  flags: barrier words when split by units, else empty
    T, B, H = y.shape
    zero = 0 * bias[0]
    b0, b1, j0, j1 = split_ranges(B, H, flags, part, parts)
    sw = step_weight(w_hh, False, G, H, b0, b1, j0, j1, flags.size != 0)
    rows_buf = active_buffers(sw, steps, T)                # products of the rows running
    bias_units = bias[j0:j1]
    for t in range(T):
        if progress.size and wait_for(progress, t + 1):               # x W_ih^T of step t
            return                                                # the call was aborted
        h_prev = h0 if t == 0 else y[t - 1]
        active_product(h_prev, sw, y[t], 1.0, t, steps, rows_buf)  # += h W_hh^T
        for b in range(b0, b1):
            h = y[t, b, j0:j1]
            if t >= steps[b]:                                         # a padded step
                zero_units(y[t, b], 1, H, j0, j1)
            elif relu:
                for j in range(j1 - j0):
                    h[j] = max(h[j] + bias_units[j], zero)
            else:
                for j in range(j1 - j0):
                    h[j] = tanh_(h[j] + bias_units[j])
        if flags.size and barrier(flags, part, parts, t + 1):         # all of h_t written
            return                                                # the call was aborted


@jit(nogil=True)
def _backward_steps(dy, y, relu, w_hh, t_start, steps, dh_final, dh_next, da, dh, progress,
                    flags, part, parts):
    # The time loop backwards for this part's batch rows b0:b1 and units j0:j1.
    # dy, y: [T,B,H]  relu: bool  w_hh: [H,H]  t_start: first step
    # steps: int64 [B] row b's steps (lengths): at t >= steps[b] its da and dh are written as
    #   zeros; the step product skips its dh_next or overwrites it with zeros, so its last
    #   step steps[b]-1 takes dL/dh there from dh_final [B,H] (dL/dh_T) instead (the caller
    #   puts dh_final back for rows with no step in the window)
    # dh_next: [B,H] in: dL/dh_T, out: dL/d(h entering t_start)
    # da: [T,B,H] out dL/d(pre-activation)  dh: [T,B,H] out (rows t >= t_start)
    # progress: step counter and abort word beside a GEMM phase (_phases.forward_phases,
    #   backward_phases), else empty  flags: barrier words when split by units, else empty
    T, B, H = y.shape
    one = one_like(y[0, 0, 0])
    zero = 0 * one
    b0, b1, j0, j1 = split_ranges(B, H, flags, part, parts)
    sw = step_weight(w_hh, True, 1, H, b0, b1, j0, j1, flags.size != 0)
    rows_buf = active_buffers(sw, steps, T)                # products of the rows running
    for t in range(T - 1, t_start - 1, -1):
        for b in range(b0, b1):
            if t >= steps[b]:                                         # a padded step
                zero_units(da[t, b], 1, H, j0, j1)
                zero_units(dh[t, b], 1, H, j0, j1)
                continue
            dnb = dh_final[b, j0:j1] if t == steps[b] - 1 else dh_next[b, j0:j1]
            dyb, hb = dy[t, b, j0:j1], y[t, b, j0:j1]
            dab, dhb = da[t, b, j0:j1], dh[t, b, j0:j1]
            for j in range(j1 - j0):
                dhb[j] = dyb[j] + dnb[j]                                  # total dL/dh_t
            if relu:
                for j in range(j1 - j0):
                    dab[j] = dhb[j] if hb[j] > zero else zero
            else:
                for j in range(j1 - j0):
                    dab[j] = dhb[j] * (one - hb[j] * hb[j])
        if flags.size and barrier(flags, part, parts, T - t):         # all of da_t written
            return                                                # the call was aborted
        if progress.size:
            publish(progress, T - t)                                  # steps T-1 .. t done
        active_product(da[t], sw, dh_next, 0.0, t, steps, rows_buf)  # dL/dh_{t-1} = da W_hh


def _forward(cell, x, state, w_ih, w_hh, b_ih, b_hh, lengths):
    call = check_forward(cell, x, state, w_ih, w_hh, b_ih, b_hh, np, lengths=lengths)
    T, B, H = call.T, call.B, call.H
    y = _buffers.empty((T, B, H), call.x.dtype)                         # T,B,H
    h0 = call.state[0].copy()                                           # B,H
    with layer_threads(THREAD_STEPS * B * H * (call.I + H)) as parts:
        forward_phases(_forward_steps, (h0, call.w_hh, call.b_ih + call.b_hh, cell == "rnn_relu",
                                        row_steps(call.lengths, T, B), y),
                       call.x, call.w_ih, y, parts, B, call.w_hh.size,
                       call.lengths)                    # x W_ih^T, then the loop
    return y, (final_rows(y, call.lengths),), RecurrentCache(cell, call.x, h0, y=y,
                                                             lengths=call.lengths)


def _backward(cell, dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start,
              t_origin):
    call = check_backward(cell, dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih,
                          db_hh, t_start, np, t_origin)
    cache = call.cache                              # checked, C-contiguous
    T, B, H, t_start, dtype = call.T, call.B, call.H, call.t_start, cache.y.dtype
    dh_next = call.dfinal_state[0].copy()                               # B,H
    dh_final = dh_next if cache.lengths is None else dh_next.copy()     # B,H  dL/dh_T
    da = gate_gradients("rnn.da", (T, B, H), dtype, call.w_ih)          # T,B,H
    inputs, dx = input_side(cache.x, call.w_ih, dw_ih, da, t_start)
    dh = _buffers.empty((T, B, H), dtype)                               # T,B,H
    with layer_threads(THREAD_STEPS * B * H * (2 * call.I + 2 * H)) as parts:
        backward_phases(_backward_steps, (call.dy, cache.y, cell == "rnn_relu", call.w_hh,
                                          t_start, row_steps(cache.lengths, T, B), dh_final,
                                          dh_next, da, dh),
                        inputs=inputs, h0=cache.h0, y=cache.y, dg_x=da, dg_h=da, dw_hh=dw_hh,
                        db_ih=db_ih, db_hh=db_hh, dh=dh, t_start=t_start,
                        t_origin=call.t_origin, parts=parts, lengths=cache.lengths)
    if cache.lengths is not None:                   # rows with no step in the window: dL/dh
        idle = cache.lengths <= t_start             # passes unchanged (the step products
        dh_next[idle] = dh_final[idle]              # wrote zeros there)
    return dx, (dh_next,), dh


def rnn_tanh_forward(x, state, w_ih, w_hh, b_ih, b_hh, lengths=None):
    """x [T,B,I], state (h0 [B,H],), w_ih [H,I], w_hh [H,H], b_ih, b_hh [H]
    -> y [T,B,H], (h_T,), RecurrentCache. h' = tanh(W_ih x + b_ih + W_hh h + b_hh).
    w_ih None: x is x W_ih^T [T,B,H]. lengths [B] or None: row b runs steps
    0 .. lengths[b]-1 (the contract in bptt_kernels.__init__)."""
    return _forward("rnn_tanh", x, state, w_ih, w_hh, b_ih, b_hh, lengths)


def rnn_tanh_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0,
                      t_origin=0):
    """dy [T,B,H], dfinal_state (dh_T,), cache from rnn_tanh_forward; accumulates parameter
    gradients -> dx [T,B,I], (dh entering step t_start,), dh [T,B,H]. w_ih and dw_ih None:
    dL/d(x W_ih^T) [T,B,H] in place of dx."""
    return _backward("rnn_tanh", dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh,
                     t_start, t_origin)


def rnn_relu_forward(x, state, w_ih, w_hh, b_ih, b_hh, lengths=None):
    """x [T,B,I], state (h0 [B,H],), w_ih [H,I], w_hh [H,H], b_ih, b_hh [H]
    -> y [T,B,H], (h_T,), RecurrentCache. h' = relu(W_ih x + b_ih + W_hh h + b_hh).
    w_ih None: x is x W_ih^T [T,B,H]. lengths [B] or None: row b runs steps
    0 .. lengths[b]-1 (the contract in bptt_kernels.__init__)."""
    return _forward("rnn_relu", x, state, w_ih, w_hh, b_ih, b_hh, lengths)


def rnn_relu_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0,
                      t_origin=0):
    """dy [T,B,H], dfinal_state (dh_T,), cache from rnn_relu_forward; accumulates parameter
    gradients -> dx [T,B,I], (dh entering step t_start,), dh [T,B,H]. w_ih and dw_ih None:
    dL/d(x W_ih^T) [T,B,H] in place of dx."""
    return _backward("rnn_relu", dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh,
                     t_start, t_origin)
