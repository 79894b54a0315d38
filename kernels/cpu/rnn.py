"""Elman RNN layer, all T steps per call (PyTorch's ``nn.RNN``)::

    h' = act(W_ih x + b_ih + W_hh h + b_hh),   act = tanh or relu

Forward: one GEMM writes the input projections of all T steps straight into y; each step adds
h @ W_hh^T (GEMM) and applies bias and activation in place. Backward: per step the activation
derivative (from the saved output) and one GEMM for the gradient flowing into h_{t-1};
parameter gradients and dx follow as large GEMMs over all steps. The time loops run split by
batch rows over threads, or by hidden units for few rows or a large W_hh
(``_loop.split_by_units``), or with one row and a small W_hh on one thread beside the large
GEMMs (``_common.forward_phases``, ``backward_phases``).
"""

from typing import NamedTuple

import numpy as np

from . import _args
from ._barrier import barrier, publish, wait_for
from ._blas import step_product, step_weight
from ._common import backward_phases, forward_phases, gate_gradients, input_side
from ._loop import layer_threads, split_ranges
from ._math import jit, one_like, tanh_

G = 1


class RNNCache(NamedTuple):
    """What ``rnn_*_backward`` needs from the forward (T steps, batch B, sizes I, H)."""
    x: np.ndarray       # [T,B,I]  layer input, or x W_ih^T [T,B,H] (the caller's array, not copied)
    h0: np.ndarray      # [B,H]    initial hidden state (copy)
    y: np.ndarray       # [T,B,H]  hidden state after each step, h_1 .. h_T (the returned y)
    relu: bool          # activation: relu if True, else tanh


@jit(nogil=True)
def _forward_steps(h0, w_hh, bias, relu, y, progress, flags, part, parts):
    # The time loop for this part's batch rows b0:b1 and units j0:j1 (_loop.run_time_loop).
    # h0: [B,H]  w_hh: [H,H]  bias: [H] (b_ih + b_hh)  relu: bool
    # y: [T,B,H] in x W_ih^T, out h_1 .. h_T
    # progress: step counter and abort word beside a GEMM phase (_common.forward_phases),
    #   else empty  flags: barrier words when split by units, else empty
    T, B, H = y.shape
    zero = 0 * bias[0]
    b0, b1, j0, j1 = split_ranges(B, H, flags, part, parts)
    sw = step_weight(w_hh, False, G, H, b0, b1, j0, j1, flags.size != 0, T)
    bias_units = bias[j0:j1]
    for t in range(T):
        if progress.size and wait_for(progress, t + 1):               # x W_ih^T of step t
            return                                                # the call was aborted
        h_prev = h0 if t == 0 else y[t - 1]
        step_product(h_prev, sw, y[t], 1.0)                           # += h W_hh^T
        for b in range(b0, b1):
            h = y[t, b, j0:j1]
            if relu:
                for j in range(j1 - j0):
                    h[j] = max(h[j] + bias_units[j], zero)
            else:
                for j in range(j1 - j0):
                    h[j] = tanh_(h[j] + bias_units[j])
        if flags.size and barrier(flags, part, parts, t + 1):         # all of h_t written
            return                                                # the call was aborted


@jit(nogil=True)
def _backward_steps(dy, y, relu, w_hh, t_start, dh_next, da, dh, progress, flags, part,
                    parts):
    # The time loop backwards for this part's batch rows b0:b1 and units j0:j1.
    # dy, y: [T,B,H]  relu: bool  w_hh: [H,H]  t_start: first step
    # dh_next: [B,H] in: dL/dh_T, out: dL/d(h entering t_start)
    # da: [T,B,H] out dL/d(pre-activation)  dh: [T,B,H] out (rows t >= t_start)
    # progress: step counter and abort word beside a GEMM phase (_common.forward_phases,
    #   backward_phases), else empty  flags: barrier words when split by units, else empty
    T, B, H = y.shape
    one = one_like(y[0, 0, 0])
    zero = 0 * one
    b0, b1, j0, j1 = split_ranges(B, H, flags, part, parts)
    sw = step_weight(w_hh, True, 1, H, b0, b1, j0, j1, flags.size != 0, T - t_start)
    for t in range(T - 1, t_start - 1, -1):
        for b in range(b0, b1):
            dyb, dnb, hb = dy[t, b, j0:j1], dh_next[b, j0:j1], y[t, b, j0:j1]
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
        step_product(da[t], sw, dh_next, 0.0)                         # dL/dh_{t-1} = da W_hh


def _forward(relu, x, state, w_ih, w_hh, b_ih, b_hh):
    x, (h0,), w_ih, w_hh, b_ih, b_hh = _args.forward_args(G, 1, x, state, w_ih, w_hh, b_ih, b_hh)
    T, B, I = x.shape
    H = w_hh.shape[1]
    y = _args.empty((T, B, H), x.dtype)
    h0 = h0.copy()
    with layer_threads(T * B * H * (I + H)) as parts:
        forward_phases(_forward_steps, (h0, w_hh, b_ih + b_hh, relu, y),
                       x, w_ih, y, parts, B, w_hh.size)                # x W_ih^T, then the loop
    return y, (y[-1].copy(),), RNNCache(x, h0, y, relu)


def _backward(relu, dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start):
    dy, (dh_next,), w_ih, w_hh, t_start = _args.backward_args(
        G, 1, RNNCache, dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start)
    if cache.relu != relu:
        raise ValueError(f"cache comes from rnn_{'relu' if cache.relu else 'tanh'}_forward, "
                         f"not rnn_{'relu' if relu else 'tanh'}_forward")
    x = cache.x
    B, H = dh_next.shape
    dh_next = dh_next.copy()
    da = gate_gradients("rnn.da", dy.shape, x.dtype, w_ih)
    input_args, dx = input_side(x, w_ih, dw_ih, da, t_start)
    dh = _args.empty(dy.shape, x.dtype)
    T, _, I = x.shape
    with layer_threads((T - t_start) * B * H * (2 * I + 2 * H)) as parts:
        backward_phases(_backward_steps, (dy, cache.y, relu, w_hh, t_start, dh_next, da, dh),
                        input_args, cache.h0, cache.y, da, da, dw_hh, db_ih, db_hh, dh,
                        t_start, parts)
    return dx, (dh_next,), dh


def rnn_tanh_forward(x, state, w_ih, w_hh, b_ih, b_hh):
    """x [T,B,I], state (h0 [B,H],), w_ih [H,I], w_hh [H,H], b_ih, b_hh [H]
    -> y [T,B,H], (h_T,), RNNCache. h' = tanh(W_ih x + b_ih + W_hh h + b_hh).
    w_ih None: x is x W_ih^T [T,B,H]."""
    return _forward(False, x, state, w_ih, w_hh, b_ih, b_hh)


def rnn_tanh_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0):
    """dy [T,B,H], dfinal_state (dh_T,), cache from rnn_tanh_forward; accumulates parameter
    gradients -> dx [T,B,I], (dh entering step t_start,), dh [T,B,H]. w_ih and dw_ih None:
    dL/d(x W_ih^T) [T,B,H] in place of dx."""
    return _backward(False, dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start)


def rnn_relu_forward(x, state, w_ih, w_hh, b_ih, b_hh):
    """x [T,B,I], state (h0 [B,H],), w_ih [H,I], w_hh [H,H], b_ih, b_hh [H]
    -> y [T,B,H], (h_T,), RNNCache. h' = relu(W_ih x + b_ih + W_hh h + b_hh).
    w_ih None: x is x W_ih^T [T,B,H]."""
    return _forward(True, x, state, w_ih, w_hh, b_ih, b_hh)


def rnn_relu_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0):
    """dy [T,B,H], dfinal_state (dh_T,), cache from rnn_relu_forward; accumulates parameter
    gradients -> dx [T,B,I], (dh entering step t_start,), dh [T,B,H]. w_ih and dw_ih None:
    dL/d(x W_ih^T) [T,B,H] in place of dx."""
    return _backward(True, dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start)
