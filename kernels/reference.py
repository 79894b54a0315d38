"""bptt_kernels.reference: the plain NumPy backend, the readable oracle every backend is checked against.

min-char-rnn style: every step of the math is one line with a short comment, shapes are
written beside the arrays (``# T,B,H``), and the time loop is an ordinary Python loop.
Everything is computed in the dtype of the input (float64 gives gradients exact to float64
round-off; float32 is supported for parity checks). Slow; meant for tests and for reading.

Notation: T time steps, B batch, I input size, H hidden size, G gates (LSTM 4 in order
i, f, g, o; GRU 3 in order r, z, n; Elman RNN 1). Parameters in PyTorch's layout:
``w_ih [G*H, I]``, ``w_hh [G*H, H]``, ``b_ih [G*H]``, ``b_hh [G*H]``.

The functions and their contracts are those of the backend interface documented in
``bptt_kernels/__init__.py``; the docstrings below only add what is particular to this module.
"""

import numpy as np

from .host import (RecurrentCache, check_backward, check_forward, finish_backward,
                   states_entering)
from .host.rows import rows_matmul

NAME = "reference"
xp = np
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
TIME_BLOCKS = True       # gradient sums over time in the time blocks of host/blocks.py


# ----------------------------------------------------------------------------------------
# Array plumbing


def asarray(a, dtype):
    """Copy a host array-like into a fresh C-contiguous ``numpy.ndarray`` of ``dtype``."""
    return np.array(a, dtype=dtype, order="C", copy=True)


def to_host(a):
    """Return a fresh ``numpy.ndarray`` copy of ``a`` (as a GPU backend's download would be)."""
    return np.array(a, copy=True)


def zeros(shape, dtype):
    """Zero-filled ``numpy.ndarray`` of ``shape`` and ``dtype``."""
    return np.zeros(shape, dtype=dtype)


# ----------------------------------------------------------------------------------------
# Activations (computed in the dtype of their argument)


def sigmoid(a):
    """Logistic function 1 / (1 + exp(-a)), without overflow for large |a|."""
    e = np.exp(-np.abs(a))                          # in (0, 1], never overflows
    return np.where(a >= 0, 1 / (1 + e), e / (1 + e))


def _relu(a):
    return np.maximum(a, 0)


def _drelu_from_output(h):
    """relu'(a) written with the output h = relu(a): 1 where h > 0 else 0 (PyTorch's choice at 0)."""
    return (h > 0).astype(h.dtype)


def _dtanh_from_output(h):
    """tanh'(a) written with the output h = tanh(a): 1 - h^2."""
    return 1 - h * h


# ----------------------------------------------------------------------------------------
# Argument checks, the cache and the GEMMs after the backward loop are shared by every
# backend (bptt_kernels.host); the time loops below are this module's own.


def _input_projection(x, w_ih, b_ih):
    """x W_ih^T + b_ih for all steps at once; with w_ih None, x already is x W_ih^T."""
    return (x if w_ih is None else x @ w_ih.T) + b_ih   # T,B,G*H


def _live_steps(lengths, T, B):
    """[T,B,1] bool: True where step t is one of row b's own steps (t < lengths[b]), False at
    its padded steps; all True without lengths. A padded step leaves the row's state
    unchanged and writes zeros (y, activations); backward, it passes the state gradient on
    unchanged and gives no other gradient (dh, gate gradients, dx zero)."""
    if lengths is None:
        return np.ones((T, B, 1), dtype=bool)
    return (np.arange(T)[:, None] < lengths[None, :])[:, :, None]


# ----------------------------------------------------------------------------------------
# Elman RNN:  h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh),  act = tanh or relu
# Cache: x, h0, y (act'(a) is computed from the outputs y).


def _rnn_forward(cell, act, x, state, w_ih, w_hh, b_ih, b_hh, lengths):
    call = check_forward(cell, x, state, w_ih, w_hh, b_ih, b_hh, np, lengths=lengths)
    x, (h0,), w_hh, b_hh = call.x, call.state, call.w_hh, call.b_hh
    live_all = _live_steps(call.lengths, call.T, call.B)   # T,B,1
    xw = _input_projection(x, call.w_ih, call.b_ih)  # T,B,H   input projection, all steps at once
    y = np.empty((call.T, call.B, call.H), dtype=x.dtype)  # T,B,H
    h = h0                                          # B,H
    for t in range(call.T):
        live = live_all[t]                          # B,1   rows for which step t is real
        h_new = act(xw[t] + h @ w_hh.T + b_hh)      # B,H   new hidden state
        y[t] = np.where(live, h_new, 0)             # B,H   zero at padded steps
        h = np.where(live, h_new, h)                # B,H   padded steps keep the state
    cache = RecurrentCache(cell, x, h0.copy(), y=y, lengths=call.lengths)
    return y, (h.copy(),), cache


def _rnn_backward(cell, dact_from_output, dy, dfinal_state, cache, w_ih, w_hh,
                  dw_ih, dw_hh, db_ih, db_hh, t_start, t_origin):
    call = check_backward(cell, dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh,
                          t_start, np, t_origin)
    cache = call.cache                              # checked, C-contiguous
    y, t_start = cache.y, call.t_start
    live_all = _live_steps(cache.lengths, call.T, call.B)  # T,B,1
    dh = np.zeros_like(y)                           # T,B,H   rows before t_start stay zero
    da = np.zeros_like(y)                           # T,B,H   dL/d(pre-activation)
    (dh_next,) = call.dfinal_state                  # B,H     gradient arriving from step t+1
    for t in reversed(range(t_start, call.T)):
        live = live_all[t]                          # B,1   rows for which step t is real
        dh[t] = np.where(live, call.dy[t] + dh_next, 0)     # B,H  total dL/dh_t (padded: 0)
        da[t] = np.where(live, dh[t] * dact_from_output(y[t]), 0)  # B,H  through the activation
        dh_next = np.where(live, da[t] @ call.w_hh, dh_next)  # B,H  to h_{t-1} (padded: as is)
    dx = finish_backward(cache.x, cache.h0, y, da, da, t_start, call.w_ih, dw_ih, dw_hh,
                         db_ih, db_hh, np, call.t_origin)
    return dx, (dh_next,), dh


def rnn_tanh_forward(x, state, w_ih, w_hh, b_ih, b_hh, lengths=None):
    """Elman RNN with tanh over T steps. x [T,B,I], state (h0 [B,H],), G=1; lengths [B]
    or None (row b runs steps 0 .. lengths[b]-1; see _live_steps).

    Returns y [T,B,H], (h_T,), RecurrentCache.
    """
    return _rnn_forward("rnn_tanh", np.tanh, x, state, w_ih, w_hh, b_ih, b_hh, lengths)


def rnn_tanh_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0,
                      t_origin=0):
    """Backward of :func:`rnn_tanh_forward`. Returns dx [T,B,I], (dh0 [B,H],), dh [T,B,H]."""
    return _rnn_backward("rnn_tanh", _dtanh_from_output, dy, dfinal_state, cache, w_ih, w_hh,
                         dw_ih, dw_hh, db_ih, db_hh, t_start, t_origin)


def rnn_relu_forward(x, state, w_ih, w_hh, b_ih, b_hh, lengths=None):
    """Elman RNN with relu over T steps. x [T,B,I], state (h0 [B,H],), G=1; lengths [B]
    or None (row b runs steps 0 .. lengths[b]-1; see _live_steps).

    Returns y [T,B,H], (h_T,), RecurrentCache.
    """
    return _rnn_forward("rnn_relu", _relu, x, state, w_ih, w_hh, b_ih, b_hh, lengths)


def rnn_relu_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0,
                      t_origin=0):
    """Backward of :func:`rnn_relu_forward`. Returns dx [T,B,I], (dh0 [B,H],), dh [T,B,H]."""
    return _rnn_backward("rnn_relu", _drelu_from_output, dy, dfinal_state, cache, w_ih, w_hh,
                         dw_ih, dw_hh, db_ih, db_hh, t_start, t_origin)


# ----------------------------------------------------------------------------------------
# LSTM, gates (i, f, g, o):
#   [i f g o] = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh   (then sigmoid, sigmoid, tanh, sigmoid)
#   c_t = f * c_{t-1} + i * g ;  h_t = o * tanh(c_t)
# Cache: x, h0, c0, y, gates [T,B,4H] (activated i, f, g, o), c [T,B,H], tanh_c [T,B,H].


def lstm_forward(x, state, w_ih, w_hh, b_ih, b_hh, lengths=None):
    """LSTM over T steps. x [T,B,I], state (h0 [B,H], c0 [B,H]), w_ih [4H,I], w_hh [4H,H];
    lengths [B] or None (row b runs steps 0 .. lengths[b]-1; see _live_steps).

    Returns y [T,B,H], (h_T, c_T) (each row's state after its own last step), RecurrentCache.
    """
    call = check_forward("lstm", x, state, w_ih, w_hh, b_ih, b_hh, np, lengths=lengths)
    x, (h0, c0), w_hh, b_hh = call.x, call.state, call.w_hh, call.b_hh
    T, B, H = call.T, call.B, call.H
    xw = _input_projection(x, call.w_ih, call.b_ih)  # T,B,4H  input projection, all steps at once
    gates = np.empty((T, B, 4 * H), dtype=x.dtype)  # T,B,4H
    c_all = np.empty((T, B, H), dtype=x.dtype)      # T,B,H
    tanh_c = np.empty((T, B, H), dtype=x.dtype)     # T,B,H
    y = np.empty((T, B, H), dtype=x.dtype)          # T,B,H
    live_all = _live_steps(call.lengths, T, B)      # T,B,1
    h, c = h0, c0
    for t in range(T):
        live = live_all[t]                          # B,1   rows for which step t is real
        a = xw[t] + h @ w_hh.T + b_hh               # B,4H  gate pre-activations
        i = sigmoid(a[:, 0 * H:1 * H])              # B,H   input gate
        f = sigmoid(a[:, 1 * H:2 * H])              # B,H   forget gate
        g = np.tanh(a[:, 2 * H:3 * H])              # B,H   candidate cell
        o = sigmoid(a[:, 3 * H:4 * H])              # B,H   output gate
        c_new = f * c + i * g                       # B,H   new cell state
        tc = np.tanh(c_new)                         # B,H
        h_new = o * tc                              # B,H   new hidden state
        gates[t] = np.where(live, np.concatenate([i, f, g, o], axis=1), 0)   # zero where padded
        c_all[t], tanh_c[t], y[t] = (np.where(live, v, 0) for v in (c_new, tc, h_new))
        h, c = np.where(live, h_new, h), np.where(live, c_new, c)   # padded: state unchanged
    cache = RecurrentCache("lstm", x, h0.copy(), c0.copy(), y, gates, c_all, tanh_c,
                           lengths=call.lengths)
    return y, (h.copy(), c.copy()), cache


def lstm_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0,
                  t_origin=0):
    """Backward of :func:`lstm_forward`. dfinal_state (dh_T, dc_T).

    Returns dx [T,B,I], (dh, dc) entering step t_start, dh [T,B,H].
    """
    call = check_backward("lstm", dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih,
                          db_hh, t_start, np, t_origin)
    cache = call.cache                              # checked, C-contiguous
    gates, c_all, y, t_start = cache.gates, cache.c, cache.y, call.t_start
    H = call.H
    tanh_c = np.tanh(c_all) if cache.tanh_c is None else cache.tanh_c   # T,B,H
    live_all = _live_steps(cache.lengths, call.T, call.B)  # T,B,1
    dh = np.zeros_like(y)                           # T,B,H   rows before t_start stay zero
    dgates = np.zeros_like(gates)                   # T,B,4H  dL/d(gate pre-activations)
    dh_next, dc_next = call.dfinal_state            # B,H     gradients arriving from step t+1
    for t in reversed(range(t_start, call.T)):
        live = live_all[t]                          # B,1   rows for which step t is real
        i, f, g, o = (gates[t, :, k * H:(k + 1) * H] for k in range(4))
        c_prev = c_all[t - 1] if t > 0 else cache.c0    # B,H
        dh[t] = np.where(live, call.dy[t] + dh_next, 0)  # B,H  total dL/dh_t (padded: 0)
        do = dh[t] * tanh_c[t]                      # B,H   h = o * tanh(c)
        dc = dc_next + dh[t] * o * (1 - tanh_c[t] * tanh_c[t])  # B,H  total dL/dc_t
        di = dc * g                                 # B,H   c = f*c_prev + i*g
        dg = dc * i                                 # B,H
        df = dc * c_prev                            # B,H
        dc_next = np.where(live, dc * f, dc_next)   # B,H   to c_{t-1} (padded: as is)
        dgates[t] = np.where(live, np.concatenate([
            di * i * (1 - i),                       # through sigmoid
            df * f * (1 - f),                       # through sigmoid
            dg * (1 - g * g),                       # through tanh
            do * o * (1 - o),                       # through sigmoid
        ], axis=1), 0)                              # B,4H  (padded: 0)
        dh_next = np.where(live, dgates[t] @ call.w_hh, dh_next)  # B,H  to h_{t-1} (padded: as is)
    dx = finish_backward(cache.x, cache.h0, y, dgates, dgates, t_start, call.w_ih, dw_ih,
                         dw_hh, db_ih, db_hh, np, call.t_origin)
    return dx, (dh_next, dc_next), dh


# ----------------------------------------------------------------------------------------
# GRU, gates (r, z, n), PyTorch's variant (reset gate applied after the hidden matmul):
#   r = sigmoid(x W_ir^T + b_ir + h W_hr^T + b_hr)
#   z = sigmoid(x W_iz^T + b_iz + h W_hz^T + b_hz)
#   n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn))
#   h_t = (1 - z) * n + z * h_{t-1}
# Cache: x, h0, y, gates [T,B,3H] (activated r, z, n), hn [T,B,H] (h_{t-1} W_hn^T + b_hn).


def gru_forward(x, state, w_ih, w_hh, b_ih, b_hh, lengths=None):
    """GRU over T steps. x [T,B,I], state (h0 [B,H],), w_ih [3H,I], w_hh [3H,H]; lengths [B]
    or None (row b runs steps 0 .. lengths[b]-1; see _live_steps).

    Returns y [T,B,H], (h_T,) (each row's state after its own last step), RecurrentCache.
    """
    call = check_forward("gru", x, state, w_ih, w_hh, b_ih, b_hh, np, lengths=lengths)
    x, (h0,), w_hh, b_hh = call.x, call.state, call.w_hh, call.b_hh
    T, B, H = call.T, call.B, call.H
    xw = _input_projection(x, call.w_ih, call.b_ih)  # T,B,3H  input projection, all steps at once
    gates = np.empty((T, B, 3 * H), dtype=x.dtype)  # T,B,3H
    hn_all = np.empty((T, B, H), dtype=x.dtype)     # T,B,H
    y = np.empty((T, B, H), dtype=x.dtype)          # T,B,H
    live_all = _live_steps(call.lengths, T, B)      # T,B,1
    h = h0
    for t in range(T):
        live = live_all[t]                          # B,1   rows for which step t is real
        hw = h @ w_hh.T + b_hh                      # B,3H  hidden projection
        r = sigmoid(xw[t, :, 0:H] + hw[:, 0:H])             # B,H  reset gate
        z = sigmoid(xw[t, :, H:2 * H] + hw[:, H:2 * H])     # B,H  update gate
        hn = hw[:, 2 * H:3 * H]                             # B,H  W_hn h + b_hn
        n = np.tanh(xw[t, :, 2 * H:3 * H] + r * hn)         # B,H  candidate state
        h_new = (1 - z) * n + z * h                 # B,H   new hidden state
        gates[t] = np.where(live, np.concatenate([r, z, n], axis=1), 0)   # zero where padded
        hn_all[t], y[t] = np.where(live, hn, 0), np.where(live, h_new, 0)
        h = np.where(live, h_new, h)                # B,H   padded steps keep the state
    cache = RecurrentCache("gru", x, h0.copy(), y=y, gates=gates, hn=hn_all, lengths=call.lengths)
    return y, (h.copy(),), cache


def gru_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0,
                 t_origin=0):
    """Backward of :func:`gru_forward`. dfinal_state (dh_T,).

    Returns dx [T,B,I], (dh entering step t_start,), dh [T,B,H].
    """
    call = check_backward("gru", dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih,
                          db_hh, t_start, np, t_origin)
    cache = call.cache                              # checked, C-contiguous
    gates, hn_all, y, t_start = cache.gates, cache.hn, cache.y, call.t_start
    H = call.H
    dh = np.zeros_like(y)                           # T,B,H   rows before t_start stay zero
    dgates_x = np.zeros_like(gates)                 # T,B,3H  dL/d(x W_ih^T + b_ih)
    dgates_h = np.zeros_like(gates)                 # T,B,3H  dL/d(h W_hh^T + b_hh)
    h_prev_all = states_entering(cache.h0, y, 0, call.T, np)   # T,B,H
    live_all = _live_steps(cache.lengths, call.T, call.B)  # T,B,1
    (dh_next,) = call.dfinal_state                  # B,H     gradient arriving from step t+1
    for t in reversed(range(t_start, call.T)):
        live = live_all[t]                          # B,1   rows for which step t is real
        r, z, n = (gates[t, :, k * H:(k + 1) * H] for k in range(3))
        h_prev = h_prev_all[t]                      # B,H
        dh[t] = np.where(live, call.dy[t] + dh_next, 0)  # B,H  total dL/dh_t (padded: 0)
        dn = dh[t] * (1 - z)                        # B,H   h = (1-z)*n + z*h_prev
        dz = dh[t] * (h_prev - n)                   # B,H
        dan = dn * (1 - n * n)                      # B,H   through tanh: dL/d(n pre-activation)
        dr = dan * hn_all[t]                        # B,H   n_pre = xn + r*hn
        dar = dr * r * (1 - r)                      # B,H   through sigmoid
        daz = dz * z * (1 - z)                      # B,H   through sigmoid
        dgates_x[t] = np.where(live, np.concatenate([dar, daz, dan], axis=1), 0)      # B,3H
        dgates_h[t] = np.where(live, np.concatenate([dar, daz, dan * r], axis=1), 0)  # hn times r
        dh_next = np.where(live, dh[t] * z + dgates_h[t] @ call.w_hh,   # B,H  to h_{t-1}:
                           dh_next)                 # direct path + matmul (padded: as is)
    dx = finish_backward(cache.x, cache.h0, y, dgates_x, dgates_h, t_start, call.w_ih, dw_ih,
                         dw_hh, db_ih, db_hh, np, call.t_origin)
    return dx, (dh_next,), dh


# ----------------------------------------------------------------------------------------
# Non-recurrent pieces used by the trainer


def softmax_cross_entropy(logits, targets, dlogits, scale):
    """Summed cross-entropy of logits [N,V] against targets [N] (target < 0: row ignored).

    Writes dlogits [N,V] = scale * (softmax(logits) - onehot(targets)) (zero rows where ignored);
    ``dlogits`` may be ``logits`` itself. Returns the loss sum as a Python float.
    """
    targets = np.asarray(targets)
    counted = targets >= 0                          # N     rows that have a target
    safe_t = np.where(counted, targets, 0)          # N     any valid index for ignored rows
    shifted = logits - logits.max(axis=1, keepdims=True)    # N,V  max subtracted: exp <= 1
    e = np.exp(shifted)                             # N,V
    sum_e = e.sum(axis=1, keepdims=True)            # N,1
    rows = np.arange(logits.shape[0])
    logp_target = shifted[rows, safe_t] - np.log(sum_e[:, 0])   # N  log softmax at the target
    loss = -np.sum(logp_target[counted], dtype=np.float64)
    grad = e / sum_e                                # N,V   softmax
    grad[rows[counted], targets[counted]] -= 1      # minus the one-hot target
    grad[~counted] = 0                              # ignored rows give no gradient
    dlogits[...] = scale * grad                     # written last: dlogits may alias logits
    return float(loss)


def linear_forward(x, w, b):
    """x [N,I], w [O,I], b [O] -> x w^T + b [N,O]. (Array operators only, so the GPU
    backends reuse it on their own arrays.) Each row rounds alike for any N (host/rows.py)."""
    return rows_matmul(x, w.T) + b                  # N,O


def linear_backward(dout, x, w, dw, db):
    """dout [N,O], x [N,I], w [O,I]; dw [O,I] += dout^T x, db [O] += column sums -> dx [N,I]."""
    dw += dout.T @ x                                # O,I
    db += dout.sum(axis=0)                          # O
    return rows_matmul(dout, w)                     # N,I



def embedding_forward(weight, ids):
    """Gather rows: weight [V,E], ids int [...] -> out [...,E]."""
    return weight[ids]


def embedding_backward(dweight, ids, dout):
    """dweight [V,E] += scatter-add of dout [...,E] at ids [...] (repeated ids accumulate)."""
    np.add.at(dweight, np.asarray(ids).reshape(-1), dout.reshape(-1, dweight.shape[1]))


def sgd_step(param, grad, buf, lr, momentum, weight_decay, nesterov, first):
    """One torch.optim.SGD step in place (dampening 0): param, buf updated; grad unchanged."""
    d_p = grad
    if weight_decay != 0:
        d_p = d_p + weight_decay * param            # L2 penalty folded into the gradient
    if momentum != 0:
        if first:
            buf[...] = d_p                          # torch: buf = clone(d_p) on the first step
        else:
            buf *= momentum
            buf += d_p                              # buf = momentum * buf + d_p
        d_p = d_p + momentum * buf if nesterov else buf
    param -= lr * d_p


def adam_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """One torch.optim.Adam step in place (L2 weight decay, bias correction, ``step`` from 1)."""
    if weight_decay != 0:
        grad = grad + weight_decay * param          # L2 penalty folded into the gradient
    m += (1 - beta1) * (grad - m)                   # m = lerp(m, grad, 1 - beta1)
    v *= beta2
    v += (1 - beta2) * grad * grad                  # v = beta2 * v + (1 - beta2) * grad^2
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    step_size = lr / bias_correction1
    denom = np.sqrt(v) / bias_correction2_sqrt + eps
    param -= step_size * (m / denom)


def sum_of_squares(arrays):
    """Sum of a**2 over every element of every array, accumulated in float64 (a Python float)."""
    return float(sum(np.sum(np.square(a, dtype=np.float64)) for a in arrays))


def scale_(arrays, factor):
    """In place a *= factor for every array."""
    for a in arrays:
        a *= factor
