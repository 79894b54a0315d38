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

from typing import NamedTuple

import numpy as np

NAME = "reference"
xp = np
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


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
# Shared backward bookkeeping


def _backward_buffer(dy, t_start):
    """Check ``t_start`` and allocate dh [T,B,H] (rows before t_start stay zero)."""
    T = dy.shape[0]
    if not 0 <= t_start < T:
        raise ValueError(f"t_start must be in [0, {T - 1}] for T={T} steps, got {t_start}")
    return np.zeros_like(dy)                        # T,B,H


def _input_projection(x, w_ih, b_ih):
    """x W_ih^T + b_ih for all steps at once; with w_ih None, x already is x W_ih^T."""
    return (x if w_ih is None else x @ w_ih.T) + b_ih   # T,B,G*H


def _finish_backward(x, h_prev, dgates_x, dgates_h, t_start, w_ih, dw_ih, dw_hh, db_ih, db_hh):
    """Accumulate (+=) parameter gradients from per-step gate gradients over steps t_start..T-1
    and return dx [T,B,I] (rows before t_start zero); with w_ih None, dL/d(x W_ih^T) [T,B,G*H]
    in its place, and dw_ih is not touched.

    x [T,B,I] inputs, h_prev [T,B,H] state entering each step, dgates_x [T,B,G*H] gradient of
    the input-side pre-activations (x W_ih^T + b_ih), dgates_h [T,B,G*H] gradient of the
    hidden-side pre-activations (h W_hh^T + b_hh). Equal for LSTM and RNN, not for GRU's n gate.
    """
    gh = dgates_x.shape[-1]
    h2 = h_prev[t_start:].reshape(-1, h_prev.shape[-1])  # N,H  with N = (T-t_start)*B
    gx2 = dgates_x[t_start:].reshape(-1, gh)             # N,G*H
    gh2 = dgates_h[t_start:].reshape(-1, gh)             # N,G*H
    dw_hh += gh2.T @ h2                                  # G*H,H
    db_ih += gx2.sum(axis=0)                             # G*H
    db_hh += gh2.sum(axis=0)                             # G*H
    if w_ih is None:
        dx = np.zeros_like(dgates_x)                     # T,B,G*H
        dx[t_start:] = dgates_x[t_start:]                # dL/d(x W_ih^T) itself
        return dx
    dw_ih += gx2.T @ x[t_start:].reshape(-1, x.shape[-1])  # G*H,I
    dx = np.zeros_like(x)                                # T,B,I
    dx[t_start:] = dgates_x[t_start:] @ w_ih
    return dx


def _states_entering(h0, y):
    """h_prev[t] = state entering step t: h0 then h_1..h_{T-1}.  # T,B,H"""
    return np.concatenate([h0[None], y[:-1]], axis=0)


# ----------------------------------------------------------------------------------------
# Elman RNN:  h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh),  act = tanh or relu


class RNNCache(NamedTuple):
    """Activations saved by an Elman RNN forward for its backward.

    x   [T,B,I]  the input
    h0  [B,H]    the initial hidden state
    y   [T,B,H]  h_1 .. h_T (the outputs; act'(a) is computed from them)
    """
    x: np.ndarray
    h0: np.ndarray
    y: np.ndarray


def _rnn_forward(act, x, state, w_ih, w_hh, b_ih, b_hh):
    (h0,) = state
    T = x.shape[0]
    xw = _input_projection(x, w_ih, b_ih)           # T,B,H   input projection, all steps at once
    y = np.empty(x.shape[:2] + (w_hh.shape[1],), dtype=x.dtype)  # T,B,H
    h = h0                                          # B,H
    for t in range(T):
        h = act(xw[t] + h @ w_hh.T + b_hh)          # B,H   new hidden state
        y[t] = h
    return y, (y[-1].copy(),), RNNCache(x, h0, y)


def _rnn_backward(dact_from_output, dy, dfinal_state, cache, w_ih, w_hh,
                  dw_ih, dw_hh, db_ih, db_hh, t_start):
    x, h0, y = cache
    T = y.shape[0]
    dh = _backward_buffer(dy, t_start)
    da = np.zeros_like(y)                           # T,B,H   dL/d(pre-activation)
    (dh_next,) = dfinal_state                       # B,H     gradient arriving from step t+1
    for t in reversed(range(t_start, T)):
        dh[t] = dy[t] + dh_next                     # B,H   total dL/dh_t
        da[t] = dh[t] * dact_from_output(y[t])      # B,H   back through the activation
        dh_next = da[t] @ w_hh                      # B,H   to h_{t-1}
    dx = _finish_backward(x, _states_entering(h0, y), da, da, t_start,
                          w_ih, dw_ih, dw_hh, db_ih, db_hh)
    return dx, (dh_next,), dh


def rnn_tanh_forward(x, state, w_ih, w_hh, b_ih, b_hh):
    """Elman RNN with tanh over T steps. x [T,B,I], state (h0 [B,H],), G=1.

    Returns y [T,B,H], (h_T,), RNNCache.
    """
    return _rnn_forward(np.tanh, x, state, w_ih, w_hh, b_ih, b_hh)


def rnn_tanh_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0):
    """Backward of :func:`rnn_tanh_forward`. Returns dx [T,B,I], (dh0 [B,H],), dh [T,B,H]."""
    return _rnn_backward(_dtanh_from_output, dy, dfinal_state, cache, w_ih, w_hh,
                         dw_ih, dw_hh, db_ih, db_hh, t_start)


def rnn_relu_forward(x, state, w_ih, w_hh, b_ih, b_hh):
    """Elman RNN with relu over T steps. x [T,B,I], state (h0 [B,H],), G=1.

    Returns y [T,B,H], (h_T,), RNNCache.
    """
    return _rnn_forward(_relu, x, state, w_ih, w_hh, b_ih, b_hh)


def rnn_relu_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0):
    """Backward of :func:`rnn_relu_forward`. Returns dx [T,B,I], (dh0 [B,H],), dh [T,B,H]."""
    return _rnn_backward(_drelu_from_output, dy, dfinal_state, cache, w_ih, w_hh,
                         dw_ih, dw_hh, db_ih, db_hh, t_start)


# ----------------------------------------------------------------------------------------
# LSTM, gates (i, f, g, o):
#   [i f g o] = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh   (then sigmoid, sigmoid, tanh, sigmoid)
#   c_t = f * c_{t-1} + i * g ;  h_t = o * tanh(c_t)


class LSTMCache(NamedTuple):
    """Activations saved by :func:`lstm_forward` for :func:`lstm_backward`.

    x       [T,B,I]    the input
    h0, c0  [B,H]      the initial hidden and cell state
    gates   [T,B,4*H]  activated gates i, f, g, o of every step (sigmoid, sigmoid, tanh, sigmoid)
    c       [T,B,H]    cell states c_1 .. c_T
    tanh_c  [T,B,H]    tanh(c_t)
    y       [T,B,H]    hidden states h_1 .. h_T
    """
    x: np.ndarray
    h0: np.ndarray
    c0: np.ndarray
    gates: np.ndarray
    c: np.ndarray
    tanh_c: np.ndarray
    y: np.ndarray


def lstm_forward(x, state, w_ih, w_hh, b_ih, b_hh):
    """LSTM over T steps. x [T,B,I], state (h0 [B,H], c0 [B,H]), w_ih [4H,I], w_hh [4H,H].

    Returns y [T,B,H], (h_T, c_T), LSTMCache.
    """
    h0, c0 = state
    T, B, _ = x.shape
    H = w_hh.shape[1]
    xw = _input_projection(x, w_ih, b_ih)           # T,B,4H  input projection, all steps at once
    gates = np.empty((T, B, 4 * H), dtype=x.dtype)  # T,B,4H
    c_all = np.empty((T, B, H), dtype=x.dtype)      # T,B,H
    tanh_c = np.empty((T, B, H), dtype=x.dtype)     # T,B,H
    y = np.empty((T, B, H), dtype=x.dtype)          # T,B,H
    h, c = h0, c0
    for t in range(T):
        a = xw[t] + h @ w_hh.T + b_hh               # B,4H  gate pre-activations
        i = sigmoid(a[:, 0 * H:1 * H])              # B,H   input gate
        f = sigmoid(a[:, 1 * H:2 * H])              # B,H   forget gate
        g = np.tanh(a[:, 2 * H:3 * H])              # B,H   candidate cell
        o = sigmoid(a[:, 3 * H:4 * H])              # B,H   output gate
        c = f * c + i * g                           # B,H   new cell state
        tc = np.tanh(c)                             # B,H
        h = o * tc                                  # B,H   new hidden state
        gates[t] = np.concatenate([i, f, g, o], axis=1)
        c_all[t], tanh_c[t], y[t] = c, tc, h
    return y, (h.copy(), c.copy()), LSTMCache(x, h0, c0, gates, c_all, tanh_c, y)


def lstm_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0):
    """Backward of :func:`lstm_forward`. dfinal_state (dh_T, dc_T).

    Returns dx [T,B,I], (dh, dc) entering step t_start, dh [T,B,H].
    """
    x, h0, c0, gates, c_all, tanh_c, y = cache
    T = y.shape[0]
    H = y.shape[2]
    dh = _backward_buffer(dy, t_start)
    dgates = np.zeros_like(gates)                   # T,B,4H  dL/d(gate pre-activations)
    dh_next, dc_next = dfinal_state                 # B,H     gradients arriving from step t+1
    for t in reversed(range(t_start, T)):
        i, f, g, o = (gates[t, :, k * H:(k + 1) * H] for k in range(4))
        c_prev = c_all[t - 1] if t > 0 else c0      # B,H
        dh[t] = dy[t] + dh_next                     # B,H   total dL/dh_t
        do = dh[t] * tanh_c[t]                      # B,H   h = o * tanh(c)
        dc = dc_next + dh[t] * o * (1 - tanh_c[t] * tanh_c[t])  # B,H  total dL/dc_t
        di = dc * g                                 # B,H   c = f*c_prev + i*g
        dg = dc * i                                 # B,H
        df = dc * c_prev                            # B,H
        dc_next = dc * f                            # B,H   to c_{t-1}
        dgates[t] = np.concatenate([
            di * i * (1 - i),                       # through sigmoid
            df * f * (1 - f),                       # through sigmoid
            dg * (1 - g * g),                       # through tanh
            do * o * (1 - o),                       # through sigmoid
        ], axis=1)                                  # B,4H
        dh_next = dgates[t] @ w_hh                  # B,H   to h_{t-1}
    dx = _finish_backward(x, _states_entering(h0, y), dgates, dgates, t_start,
                          w_ih, dw_ih, dw_hh, db_ih, db_hh)
    return dx, (dh_next, dc_next), dh


# ----------------------------------------------------------------------------------------
# GRU, gates (r, z, n), PyTorch's variant (reset gate applied after the hidden matmul):
#   r = sigmoid(x W_ir^T + b_ir + h W_hr^T + b_hr)
#   z = sigmoid(x W_iz^T + b_iz + h W_hz^T + b_hz)
#   n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn))
#   h_t = (1 - z) * n + z * h_{t-1}


class GRUCache(NamedTuple):
    """Activations saved by :func:`gru_forward` for :func:`gru_backward`.

    x      [T,B,I]    the input
    h0     [B,H]      the initial hidden state
    gates  [T,B,3*H]  activated gates r, z, n of every step
    hn     [T,B,H]    h_{t-1} W_hn^T + b_hn (the hidden part of n, before r multiplies it)
    y      [T,B,H]    hidden states h_1 .. h_T
    """
    x: np.ndarray
    h0: np.ndarray
    gates: np.ndarray
    hn: np.ndarray
    y: np.ndarray


def gru_forward(x, state, w_ih, w_hh, b_ih, b_hh):
    """GRU over T steps. x [T,B,I], state (h0 [B,H],), w_ih [3H,I], w_hh [3H,H].

    Returns y [T,B,H], (h_T,), GRUCache.
    """
    (h0,) = state
    T, B, _ = x.shape
    H = w_hh.shape[1]
    xw = _input_projection(x, w_ih, b_ih)           # T,B,3H  input projection, all steps at once
    gates = np.empty((T, B, 3 * H), dtype=x.dtype)  # T,B,3H
    hn_all = np.empty((T, B, H), dtype=x.dtype)     # T,B,H
    y = np.empty((T, B, H), dtype=x.dtype)          # T,B,H
    h = h0
    for t in range(T):
        hw = h @ w_hh.T + b_hh                      # B,3H  hidden projection
        r = sigmoid(xw[t, :, 0:H] + hw[:, 0:H])             # B,H  reset gate
        z = sigmoid(xw[t, :, H:2 * H] + hw[:, H:2 * H])     # B,H  update gate
        hn = hw[:, 2 * H:3 * H]                             # B,H  W_hn h + b_hn
        n = np.tanh(xw[t, :, 2 * H:3 * H] + r * hn)         # B,H  candidate state
        h = (1 - z) * n + z * h                     # B,H   new hidden state
        gates[t] = np.concatenate([r, z, n], axis=1)
        hn_all[t], y[t] = hn, h
    return y, (h.copy(),), GRUCache(x, h0, gates, hn_all, y)


def gru_backward(dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0):
    """Backward of :func:`gru_forward`. dfinal_state (dh_T,).

    Returns dx [T,B,I], (dh entering step t_start,), dh [T,B,H].
    """
    x, h0, gates, hn_all, y = cache
    T = y.shape[0]
    H = y.shape[2]
    dh = _backward_buffer(dy, t_start)
    dgates_x = np.zeros_like(gates)                 # T,B,3H  dL/d(x W_ih^T + b_ih)
    dgates_h = np.zeros_like(gates)                 # T,B,3H  dL/d(h W_hh^T + b_hh)
    h_prev_all = _states_entering(h0, y)            # T,B,H
    (dh_next,) = dfinal_state                       # B,H     gradient arriving from step t+1
    for t in reversed(range(t_start, T)):
        r, z, n = (gates[t, :, k * H:(k + 1) * H] for k in range(3))
        h_prev = h_prev_all[t]                      # B,H
        dh[t] = dy[t] + dh_next                     # B,H   total dL/dh_t
        dn = dh[t] * (1 - z)                        # B,H   h = (1-z)*n + z*h_prev
        dz = dh[t] * (h_prev - n)                   # B,H
        dan = dn * (1 - n * n)                      # B,H   through tanh: dL/d(n pre-activation)
        dr = dan * hn_all[t]                        # B,H   n_pre = xn + r*hn
        dar = dr * r * (1 - r)                      # B,H   through sigmoid
        daz = dz * z * (1 - z)                      # B,H   through sigmoid
        dgates_x[t] = np.concatenate([dar, daz, dan], axis=1)       # B,3H
        dgates_h[t] = np.concatenate([dar, daz, dan * r], axis=1)   # B,3H  hn enters times r
        dh_next = dh[t] * z + dgates_h[t] @ w_hh    # B,H   to h_{t-1}: direct path + matmul
    dx = _finish_backward(x, h_prev_all, dgates_x, dgates_h, t_start,
                          w_ih, dw_ih, dw_hh, db_ih, db_hh)
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
    backends reuse it on their own arrays.)"""
    return x @ w.T + b                              # N,O


def linear_backward(dout, x, w, dw, db):
    """dout [N,O], x [N,I], w [O,I]; dw [O,I] += dout^T x, db [O] += column sums -> dx [N,I]."""
    dw += dout.T @ x                                # O,I
    db += dout.sum(axis=0)                          # O
    return dout @ w                                 # N,I


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
