"""Cell math and recurrent kernels of the Numba-CUDA backend (Haste's design).

Every cell has one forward and one backward *point* function: the math of one (batch row b,
hidden unit j) at one step t, written once and used by both paths:

* general path, per step: ``hw = h_t @ W_hh^T`` (a GEMM) then the fused gate kernel
  ``gates_forward`` (one point per (b, j)); backward per step: ``gates_backward`` then the
  GEMM ``dh_rec += dgh[t] @ W_hh``;
* persistent path: ``persistent_forward`` / ``persistent_backward`` run all steps in one
  launch of a single thread block, W_hh staged once in shared memory, the per-step product
  computed from shared memory, the same point functions in between, ``syncthreads`` between
  the phases of a step.

Variable-length batches: the kernels' ``masked`` variants take ``steps`` [B] (int32, each
row's steps: the call's lengths) and run a *pad* point at a padded step t >= steps[b]: zeros
written to that step's cache (forward) or to dh and the gate gradients (backward), the state
left as it is. Backward needs nothing else: ``dh_rec`` and ``dc`` pass a padded step
unchanged (its gate gradients are zero, so the GEMM adds nothing), carrying dL/d(final state)
down to the row's last step, and past t_start for a row with no step left. The variants
without lengths are compiled separately (``masked`` is a constant of the kernel, ``steps``
None): they read no steps and compare nothing; their PTX for sm_90 was, instruction for
instruction, that of the kernels before lengths existed (compared when the masks were added).
A variant is compiled on its first launch only, so the masked ones cost nothing to a program
that never passes lengths.

Arrays (time-major, C-contiguous; G gates; ``hw``/``dh_rec``/``dc`` are flat per-step buffers):

    xw     [T,B,G*H]  x_t W_ih^T for all steps (no bias; the points add b_ih)
    hw     [B*G*H]    h_{t} W_hh^T of the current step (no bias), flat, starting at ``hw_off``
    b_ih, b_hh [G*H]
    hs     [T+1,B,H]  h_0 .. h_T (hs[0] = initial state; y = hs[1:])
    cs     [T+1,B,H]  LSTM only: c_0 .. c_T
    gates  [T,B,G*H]  activated gates: LSTM i, f, g, o; GRU r, z, n
    hn     [T,B,H]    GRU only: h_{t-1} W_hn^T + b_hn (the hidden part of n before r multiplies it)
    dy     [T,B,H]    dL/dy from above
    dh_rec [B*H]      in: dL/dh_t arriving through the recurrence from step t+1;
                      out (backward point): the elementwise part of dL/dh_{t-1} (GRU: dh*z, else 0),
                      to which the caller adds dgh[t] @ W_hh
    dc     [B*H]      LSTM only: in dL/dc_t from step t+1, out dL/dc_{t-1}
    dgx    [T,B,G*H]  dL/d(x W_ih^T + b_ih) per step (pre-activation gradients)
    dgh    [T,B,G*H]  GRU only: dL/d(h W_hh^T + b_hh) (differs from dgx in the n block: times r);
                      for LSTM and RNN it equals dgx and the kernels read dgx
    dh     [T,B,H]    total dL/dh_t (dy[t] + recurrent part), the diagnostic output
    steps  [B]        int32, each row's steps (lengths): the masked kernels only (else None)

Arrays a cell does not use are passed as tiny dummies (never aliases of used arrays: the
simulator copies every argument in and back, so an alias would be overwritten by a stale copy).
"""

import functools
import math

import numpy as np
from numba import cuda

from bptt_kernels import GATES, SEPARATE_HIDDEN_GRAD

from ._device import NUMBA_DTYPE, ONE, SIMULATOR, ZERO


@cuda.jit(device=True)
def sigmoid(a):
    return ONE / (ONE + math.exp(-a))


@cuda.jit(device=True)
def relu(a):
    return ZERO if a <= ZERO else a  # NaN stays NaN


@cuda.jit(device=True)
def dtanh_from_output(h):
    return ONE - h * h


@cuda.jit(device=True)
def drelu_from_output(h):
    return ONE if h > ZERO else ZERO


# ----------------------------------------------------------------------------------------
# LSTM, gates (i, f, g, o):  c_t = f*c_{t-1} + i*g,  h_t = o*tanh(c_t)


@cuda.jit(device=True)
def lstm_forward_point(t, b, j, xw, hw, hw_off, b_ih, b_hh, hs, cs, gates, hn):
    H = hs.shape[2]
    r = hw_off + b * 4 * H + j                                   # flat index of gate i in hw
    i = sigmoid(xw[t, b, j] + b_ih[j] + hw[r] + b_hh[j])         # input gate
    f = sigmoid(xw[t, b, H + j] + b_ih[H + j] + hw[r + H] + b_hh[H + j])                  # forget
    g = math.tanh(xw[t, b, 2 * H + j] + b_ih[2 * H + j] + hw[r + 2 * H] + b_hh[2 * H + j])  # cell
    o = sigmoid(xw[t, b, 3 * H + j] + b_ih[3 * H + j] + hw[r + 3 * H] + b_hh[3 * H + j])  # output
    c = f * cs[t, b, j] + i * g                                  # new cell state
    h = o * math.tanh(c)                                         # new hidden state
    gates[t, b, j] = i
    gates[t, b, H + j] = f
    gates[t, b, 2 * H + j] = g
    gates[t, b, 3 * H + j] = o
    cs[t + 1, b, j] = c
    hs[t + 1, b, j] = h
    return h


@cuda.jit(device=True)
def lstm_backward_point(t, b, j, dy, dh_rec, rec_off, dc, hs, cs, gates, hn, dgx, dgh, dh):
    H = hs.shape[2]
    p = b * H + j
    dh_t = dy[t, b, j] + dh_rec[rec_off + p]                     # total dL/dh_t
    dh[t, b, j] = dh_t
    i = gates[t, b, j]
    f = gates[t, b, H + j]
    g = gates[t, b, 2 * H + j]
    o = gates[t, b, 3 * H + j]
    tc = math.tanh(cs[t + 1, b, j])
    dc_t = dc[p] + dh_t * o * (ONE - tc * tc)                    # total dL/dc_t
    dgx[t, b, j] = dc_t * g * i * (ONE - i)                      # through sigmoid(i)
    dgx[t, b, H + j] = dc_t * cs[t, b, j] * f * (ONE - f)        # through sigmoid(f)
    dgx[t, b, 2 * H + j] = dc_t * i * (ONE - g * g)              # through tanh(g)
    dgx[t, b, 3 * H + j] = dh_t * tc * o * (ONE - o)             # through sigmoid(o)
    dc[p] = dc_t * f                                             # to c_{t-1}
    dh_rec[rec_off + p] = ZERO                                   # h_{t-1} only via W_hh


# ----------------------------------------------------------------------------------------
# GRU, gates (r, z, n), PyTorch's variant:  n = tanh(x W_in^T + b_in + r*(h W_hn^T + b_hn)),
# h_t = (1-z)*n + z*h_{t-1}


@cuda.jit(device=True)
def gru_forward_point(t, b, j, xw, hw, hw_off, b_ih, b_hh, hs, cs, gates, hn):
    H = hs.shape[2]
    r_ = hw_off + b * 3 * H + j
    r = sigmoid(xw[t, b, j] + b_ih[j] + hw[r_] + b_hh[j])                       # reset gate
    z = sigmoid(xw[t, b, H + j] + b_ih[H + j] + hw[r_ + H] + b_hh[H + j])       # update gate
    hn_t = hw[r_ + 2 * H] + b_hh[2 * H + j]                                     # W_hn h + b_hn
    n = math.tanh(xw[t, b, 2 * H + j] + b_ih[2 * H + j] + r * hn_t)             # candidate
    h = (ONE - z) * n + z * hs[t, b, j]                                         # new hidden state
    gates[t, b, j] = r
    gates[t, b, H + j] = z
    gates[t, b, 2 * H + j] = n
    hn[t, b, j] = hn_t
    hs[t + 1, b, j] = h
    return h


@cuda.jit(device=True)
def gru_backward_point(t, b, j, dy, dh_rec, rec_off, dc, hs, cs, gates, hn, dgx, dgh, dh):
    H = hs.shape[2]
    p = b * H + j
    dh_t = dy[t, b, j] + dh_rec[rec_off + p]                     # total dL/dh_t
    dh[t, b, j] = dh_t
    r = gates[t, b, j]
    z = gates[t, b, H + j]
    n = gates[t, b, 2 * H + j]
    dan = dh_t * (ONE - z) * (ONE - n * n)                       # dL/d(n pre-activation)
    dar = dan * hn[t, b, j] * r * (ONE - r)                      # n_pre = xn + r*hn; sigmoid
    daz = dh_t * (hs[t, b, j] - n) * z * (ONE - z)               # h = n + z*(h_prev - n); sigmoid
    dgx[t, b, j] = dar
    dgx[t, b, H + j] = daz
    dgx[t, b, 2 * H + j] = dan
    dgh[t, b, j] = dar
    dgh[t, b, H + j] = daz
    dgh[t, b, 2 * H + j] = dan * r                               # hn enters n times r
    dh_rec[rec_off + p] = dh_t * z                               # direct path to h_{t-1}


# ----------------------------------------------------------------------------------------
# Elman RNN:  h_t = act(x W_ih^T + b_ih + h W_hh^T + b_hh),  act = tanh or relu


def _rnn_points(act, dact_from_output):
    @cuda.jit(device=True)
    def rnn_forward_point(t, b, j, xw, hw, hw_off, b_ih, b_hh, hs, cs, gates, hn):
        H = hs.shape[2]
        h = act(xw[t, b, j] + b_ih[j] + hw[hw_off + b * H + j] + b_hh[j])
        hs[t + 1, b, j] = h
        return h

    @cuda.jit(device=True)
    def rnn_backward_point(t, b, j, dy, dh_rec, rec_off, dc, hs, cs, gates, hn, dgx, dgh, dh):
        H = hs.shape[2]
        p = b * H + j
        dh_t = dy[t, b, j] + dh_rec[rec_off + p]                 # total dL/dh_t
        dh[t, b, j] = dh_t
        dgx[t, b, j] = dh_t * dact_from_output(hs[t + 1, b, j])  # through the nonlinearity
        dh_rec[rec_off + p] = ZERO                               # h_{t-1} only via W_hh

    return rnn_forward_point, rnn_backward_point


_rnn_tanh_points = _rnn_points(math.tanh, dtanh_from_output)
_rnn_relu_points = _rnn_points(relu, drelu_from_output)

POINTS = {
    "lstm": (lstm_forward_point, lstm_backward_point),
    "gru": (gru_forward_point, gru_backward_point),
    "rnn_tanh": _rnn_tanh_points,
    "rnn_relu": _rnn_relu_points,
}


# ----------------------------------------------------------------------------------------
# Padded steps (lengths): the cache's zeros forward, zero dh and gate gradients backward


def _pad_points(cell):
    G = GATES[cell]
    has_c, has_hn = cell == "lstm", cell == "gru"
    has_gates, separate_dgh = cell in ("lstm", "gru"), cell in SEPARATE_HIDDEN_GRAD

    @cuda.jit(device=True)
    def pad_forward_point(t, b, j, hs, cs, gates, hn):
        H = hs.shape[2]
        hs[t + 1, b, j] = ZERO                                   # y at a padded step
        if has_c:
            cs[t + 1, b, j] = ZERO
        if has_gates:
            for q in range(G):
                gates[t, b, q * H + j] = ZERO
        if has_hn:
            hn[t, b, j] = ZERO

    @cuda.jit(device=True)
    def pad_backward_point(t, b, j, dgx, dgh, dh):
        H = dh.shape[2]
        dh[t, b, j] = ZERO
        for q in range(G):
            dgx[t, b, q * H + j] = ZERO
            if separate_dgh:
                dgh[t, b, q * H + j] = ZERO

    return pad_forward_point, pad_backward_point


PADS = {cell: _pad_points(cell) for cell in POINTS}


# ----------------------------------------------------------------------------------------
# General path: fused gate kernels, one launch per step


@functools.lru_cache(maxsize=None)
def gate_kernels(cell, masked=False):
    """(gates_forward, gates_backward) kernels of ``cell`` (grid-stride over the B*H points);
    ``masked``: with the padded steps of ``steps`` (int32 [B]; else pass None)."""
    forward_point, backward_point = POINTS[cell]
    pad_forward_point, pad_backward_point = PADS[cell]

    @cuda.jit
    def gates_forward(t, steps, xw, hw, b_ih, b_hh, hs, cs, gates, hn):
        # one step t: xw [T,B,G*H], hw [B*G*H], hs [T+1,B,H], cs [T+1,B,H], gates [T,B,G*H], hn [T,B,H]
        B = hs.shape[1]
        H = hs.shape[2]
        for p in range(cuda.grid(1), B * H, cuda.gridsize(1)):
            b = p // H
            if masked and t >= steps[b]:
                pad_forward_point(t, b, p - b * H, hs, cs, gates, hn)
            else:
                forward_point(t, b, p - b * H, xw, hw, 0, b_ih, b_hh, hs, cs, gates, hn)

    @cuda.jit
    def gates_backward(t, steps, dy, dh_rec, dc, hs, cs, gates, hn, dgx, dgh, dh):
        # one step t: dy [T,B,H], dh_rec [B*H], dc [B*H], dgx/dgh [T,B,G*H], dh [T,B,H]
        B = hs.shape[1]
        H = hs.shape[2]
        for p in range(cuda.grid(1), B * H, cuda.gridsize(1)):
            b = p // H
            if masked and t >= steps[b]:                        # dh_rec, dc: unchanged
                pad_backward_point(t, b, p - b * H, dgx, dgh, dh)
            else:
                backward_point(t, b, p - b * H, dy, dh_rec, 0, dc, hs, cs, gates, hn, dgx,
                               dgh, dh)

    return gates_forward, gates_backward


# ----------------------------------------------------------------------------------------
# Persistent path: all T steps in one single-block launch, W_hh in shared memory


def persistent_shared_elems(cell, B, H):
    """Shared-memory elements (forward, backward) the persistent kernels need for B, H."""
    GH = GATES[cell] * H
    return GH * H + B * GH + B * H, GH * H + B * H


# The persistent kernels run as ONE block: capping registers at 64 per thread lets that block
# have 1024 threads (64K registers per SM). ptxas (sm_90) then reports at most ~200 bytes of
# spills (LSTM/GRU forward, float64 backward), against 82-96 registers uncapped, which would
# limit the block to 640 threads. (The simulator's jit takes no register option.)
PERSISTENT_JIT_OPTIONS = {} if SIMULATOR else {"max_registers": 64}


@functools.lru_cache(maxsize=None)
def persistent_kernels(cell, dtype, masked=False):
    """(persistent_forward, persistent_backward) kernels of ``cell`` for element type ``dtype``;
    ``masked`` as in :func:`gate_kernels`.

    Launch with ONE block and dynamic shared memory of ``persistent_shared_elems`` elements.
    """
    forward_point, backward_point = POINTS[cell]
    pad_forward_point, pad_backward_point = PADS[cell]
    G = GATES[cell]
    separate_dgh = cell in SEPARATE_HIDDEN_GRAD   # a Python bool: a constant of the kernels
    nb_dtype = NUMBA_DTYPE[np.dtype(dtype)]

    @cuda.jit(**PERSISTENT_JIT_OPTIONS)
    def persistent_forward(steps, xw, b_ih, b_hh, w_hh, hs, cs, gates, hn):
        # xw [T,B,G*H], w_hh [G*H,H], hs [T+1,B,H] (hs[0] = h0 in), cs [T+1,B,H] (cs[0] = c0 in)
        # shared: w_t [H*G*H] = W_hh^T (w_t[k*GH + gj] = w_hh[gj, k]: consecutive threads read
        # consecutive gj) | hw [B*G*H] this step's h W_hh^T | h [B*H] this step's h
        smem = cuda.shared.array(0, nb_dtype)
        T = xw.shape[0]
        B = hs.shape[1]
        H = hs.shape[2]
        GH = G * H
        hw_off = H * GH
        h_off = hw_off + B * GH
        tid = cuda.threadIdx.x
        nth = cuda.blockDim.x
        for e in range(tid, GH * H, nth):
            gj = e // H
            k = e - gj * H
            smem[k * GH + gj] = w_hh[gj, k]
        for p in range(tid, B * H, nth):
            b = p // H
            smem[h_off + p] = hs[0, b, p - b * H]
        cuda.syncthreads()
        for t in range(T):
            for q in range(tid, B * GH, nth):                   # hw = h @ W_hh^T from shared
                b = q // GH
                gj = q - b * GH
                acc = ZERO
                for k in range(H):
                    acc += smem[h_off + b * H + k] * smem[k * GH + gj]
                smem[hw_off + q] = acc
            cuda.syncthreads()
            for p in range(tid, B * H, nth):                    # the cell, one point per (b, j)
                b = p // H
                if masked and t >= steps[b]:                    # the state in smem: kept
                    pad_forward_point(t, b, p - b * H, hs, cs, gates, hn)
                else:
                    smem[h_off + p] = forward_point(t, b, p - b * H, xw, smem, hw_off,
                                                    b_ih, b_hh, hs, cs, gates, hn)
            cuda.syncthreads()

    @cuda.jit(**PERSISTENT_JIT_OPTIONS)
    def persistent_backward(steps, dy, dh_final, dc, w_hh, hs, cs, gates, hn, dgx, dgh, dh,
                            t_start, dh_start):
        # dy [T,B,H], dh_final [B,H] in, dc [B*H] in/out (LSTM), w_hh [G*H,H], dh_start [B,H] out
        # shared: w [G*H*H] = W_hh as is (consecutive threads read consecutive k) | dh_rec [B*H]
        smem = cuda.shared.array(0, nb_dtype)
        T = dy.shape[0]
        B = hs.shape[1]
        H = hs.shape[2]
        GH = G * H
        rec_off = GH * H
        tid = cuda.threadIdx.x
        nth = cuda.blockDim.x
        dg_rec = dgh if separate_dgh else dgx                   # what flows into W_hh
        for e in range(tid, GH * H, nth):
            gj = e // H
            smem[e] = w_hh[gj, e - gj * H]
        for p in range(tid, B * H, nth):
            b = p // H
            smem[rec_off + p] = dh_final[b, p - b * H]
        cuda.syncthreads()
        for t in range(T - 1, t_start - 1, -1):
            for p in range(tid, B * H, nth):                    # the cell backward per (b, j)
                b = p // H
                if masked and t >= steps[b]:                    # dh_rec, dc: unchanged
                    pad_backward_point(t, b, p - b * H, dgx, dgh, dh)
                else:
                    backward_point(t, b, p - b * H, dy, smem, rec_off, dc, hs, cs, gates, hn,
                                   dgx, dgh, dh)
            cuda.syncthreads()
            for p in range(tid, B * H, nth):                    # dh_rec += dg_rec[t] @ W_hh
                b = p // H
                k = p - b * H
                acc = ZERO
                for gj in range(GH):
                    acc += dg_rec[t, b, gj] * smem[gj * H + k]
                smem[rec_off + p] += acc
            cuda.syncthreads()
        for p in range(tid, B * H, nth):
            b = p // H
            dh_start[b, p - b * H] = smem[rec_off + p]

    return persistent_forward, persistent_backward
