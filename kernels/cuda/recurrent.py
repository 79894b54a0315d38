"""Recurrent forward/backward drivers of the Numba-CUDA backend (the time loop lives on the GPU).

Both paths share the cell math of :mod:`.cells` and the GEMMs of :mod:`.gemm`:

forward   xw = x @ W_ih^T                      one GEMM over all T*B rows (hoisted out of the loop;
                                               w_ih None: x is xw, projected by the caller)
          persistent: one launch for all steps (W_hh in shared memory)
          general:    per step  hw = h_t @ W_hh^T (GEMM), gates_forward (fused cell kernel)
backward  persistent: one launch for steps T-1 .. t_start
          general:    per step  gates_backward, then dh_rec += dg_rec[t] @ W_hh (GEMM)
          then, over the N = (T-t_start)*B rows of steps t_start..T-1, as big GEMMs:
          dx = dgx @ W_ih,  dW_ih += dgx^T x,  dW_hh += dgh^T h_prev,  db_ih += sum dgx,  db_hh += sum dgh
          (w_ih None: no dx or dW_ih; dgx itself is returned in place of dx)
"""

import functools
from typing import NamedTuple

import numpy as np
from numba import cuda

from bptt_kernels import check_input_weight_pair

from . import _device, cells, config
from .gemm import col_sum_add, matmul

# ----------------------------------------------------------------------------------------
# Caches: what forward saves for backward (device arrays)


class LSTMCache(NamedTuple):
    """Activations saved by ``lstm_forward`` for ``lstm_backward``.

    x      [T,B,I]    the input
    hs     [T+1,B,H]  h_0 .. h_T (hs[0] is the initial state; the returned y is the view hs[1:])
    cs     [T+1,B,H]  c_0 .. c_T (backward recomputes tanh(c_t))
    gates  [T,B,4H]   activated gates i, f, g, o of every step
    """
    x: object
    hs: object
    cs: object
    gates: object


class GRUCache(NamedTuple):
    """Activations saved by ``gru_forward`` for ``gru_backward``.

    x      [T,B,I]    the input
    hs     [T+1,B,H]  h_0 .. h_T (y is the view hs[1:])
    gates  [T,B,3H]   activated gates r, z, n of every step
    hn     [T,B,H]    h_{t-1} W_hn^T + b_hn (the hidden part of n before r multiplies it)
    """
    x: object
    hs: object
    gates: object
    hn: object


class RNNCache(NamedTuple):
    """Activations saved by an Elman RNN forward for its backward.

    x      [T,B,I]    the input
    hs     [T+1,B,H]  h_0 .. h_T (y is the view hs[1:]; act'(a) is computed from h)
    """
    x: object
    hs: object


_CACHE = {"lstm": LSTMCache, "gru": GRUCache, "rnn_tanh": RNNCache, "rnn_relu": RNNCache}

# ----------------------------------------------------------------------------------------
# Path choice and the persistent path's size limits

_NO_OPT_IN_SMEM = 48 * 1024  # bytes of dynamic shared memory a block gets without opting in


def shared_memory_limit():
    """Bytes of shared memory one block of the persistent kernels may use here."""
    if config.PERSISTENT_SMEM_BYTES is not None:
        return int(config.PERSISTENT_SMEM_BYTES)
    if _device.SIMULATOR:
        return _NO_OPT_IN_SMEM
    try:
        return int(cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
    except Exception:  # an old driver without the attribute: the portable limit
        return _NO_OPT_IN_SMEM


def persistent_limits(cell, B, H, dtype):
    """Whether the persistent path can run ``cell`` at batch B, hidden H and ``dtype`` here.

    Returns a dict: ``fits`` (bool), ``shared_bytes`` (what forward/backward need: the larger),
    ``shared_limit`` (bytes available to one block) and ``max_H`` (the largest hidden size that
    fits at this B). The need is ``(G*H*H + B*G*H + B*H) * itemsize`` bytes (forward: W_hh^T,
    one step's h W_hh^T and h); backward needs less (W_hh and dh).
    """
    itemsize = np.dtype(dtype).itemsize
    limit = shared_memory_limit()
    need = _persistent_bytes(cell, B, H, itemsize)
    return {"fits": need <= limit, "shared_bytes": need, "shared_limit": limit,
            "max_H": _persistent_max_hidden(cell, B, itemsize, limit)}


def _persistent_bytes(cell, B, H, itemsize):
    return max(cells.persistent_shared_elems(cell, B, H)) * itemsize


@functools.lru_cache(maxsize=None)
def _persistent_max_hidden(cell, B, itemsize, limit):
    h = 0
    while _persistent_bytes(cell, B, h + 1, itemsize) <= limit:
        h += 1
    return h


def choose_path(cell, B, H, dtype):
    """"persistent" or "general" for these sizes, per ``config.PATH`` (see :mod:`.config`)."""
    path = config.PATH
    if path not in ("auto", "persistent", "general"):
        raise ValueError(f"config.PATH must be 'auto', 'persistent' or 'general', got {path!r}")
    if path == "general":
        return path
    lim = persistent_limits(cell, B, H, dtype)
    if path == "persistent":
        if not lim["fits"]:
            raise ValueError(
                f"config.PATH='persistent' but {cell} with B={B}, H={H}, {np.dtype(dtype)} needs "
                f"{lim['shared_bytes']} bytes of shared memory, over the {lim['shared_limit']} a "
                f"block has here (largest H at this B: {lim['max_H']})")
        return path
    return "persistent" if lim["fits"] and B * H <= config.PERSISTENT_MAX_PAIRS else "general"


_opted_in = {}


def _launch_persistent(kernel, args, work_items, shared_elems, dtype):
    """Launch a persistent kernel as one block with ``shared_elems`` elements of dynamic shared
    memory, opting the kernel in to more than 48 KiB where a real GPU needs it."""
    args = _device.kernel_args(*args)
    threads = min(config.PERSISTENT_THREADS, max(32, (work_items + 31) // 32 * 32))
    nbytes = shared_elems * np.dtype(dtype).itemsize
    if not _device.SIMULATOR:
        from numba.cuda.cudadrv.driver import binding, driver
        compiled = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
        cufunc = compiled._codelibrary.get_cufunc()
        threads = min(threads, cufunc.attrs.maxthreads // 32 * 32)  # register-limited
        if nbytes > _NO_OPT_IN_SMEM and _opted_in.get(id(compiled), 0) < nbytes:
            attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            driver.cuKernelSetAttribute(attr, nbytes, cufunc.handle, cufunc.device.id)
            _opted_in[id(compiled)] = nbytes  # compiled kernels live as long as the module
    kernel[1, threads, _device.stream(), nbytes](*args)


# ----------------------------------------------------------------------------------------
# Argument checks


def _check_state(name, state, n, B, H, dtype):
    if not isinstance(state, (tuple, list)) or len(state) != n:
        what = "(h0, c0)" if n == 2 else "(h0,)"
        raise TypeError(f"{name} must be a tuple {what} of [B, H] arrays, got {type(state).__name__}"
                        + (f" of length {len(state)}" if isinstance(state, (tuple, list)) else ""))
    for k, s in enumerate(state):
        _device.check_array(f"{name}[{k}]", s, ndim=2, dtype=dtype, shape=(B, H))


def _check_weights(cell, I, H, dtype, w_ih, w_hh, b_ih, b_hh, prefix=""):
    GH = cells.GATES[cell] * H
    if w_ih is not None:                     # None: the caller projected the input
        _device.check_array(prefix + "w_ih", w_ih, ndim=2, dtype=dtype, shape=(GH, I))
    _device.check_array(prefix + "w_hh", w_hh, ndim=2, dtype=dtype, shape=(GH, H))
    _device.check_array(prefix + "b_ih", b_ih, ndim=1, dtype=dtype, shape=(GH,))
    _device.check_array(prefix + "b_hh", b_hh, ndim=1, dtype=dtype, shape=(GH,))


def _dummy(ndim, dtype):
    """A tiny stand-in for an array a cell's kernels never touch."""
    return _device.empty((1,) * ndim, dtype)


# ----------------------------------------------------------------------------------------
# Forward


def forward(cell, x, state, w_ih, w_hh, b_ih, b_hh):
    """One layer of ``cell`` over all T steps; see the backend interface for the contract.

    x [T,B,I], state (h0 [B,H],) or (h0, c0) for lstm, w_ih [G*H,I], w_hh [G*H,H], b_ih/b_hh [G*H].
    w_ih None: x is x W_ih^T [T,B,G*H] already. Returns y [T,B,H] (the view ``cache.hs[1:]``:
    do not modify it in place while the cache is needed), the final state (fresh arrays) and
    the cell's cache NamedTuple.
    """
    _device.check_array("x", x, ndim=3)
    T, B, I = x.shape
    dtype = x.dtype
    if T < 1:
        raise ValueError(f"x must have at least one time step, got shape {list(x.shape)}")
    _device.check_array("w_hh", w_hh, ndim=2, dtype=dtype)
    H = w_hh.shape[1]
    GH = cells.GATES[cell] * H
    if w_ih is None:
        _device.check_array("x (projected: w_ih is None)", x, ndim=3, shape=(T, B, GH))
    _check_weights(cell, I, H, dtype, w_ih, w_hh, b_ih, b_hh)
    is_lstm = cell == "lstm"
    _check_state("state", state, 2 if is_lstm else 1, B, H, dtype)

    hs = _device.empty((T + 1, B, H), dtype)                      # T+1,B,H
    hs[0] = state[0]
    cs = _device.empty((T + 1, B, H), dtype) if is_lstm else _dummy(3, dtype)
    if is_lstm:
        cs[0] = state[1]
    gates = _device.empty((T, B, GH), dtype) if cell in ("lstm", "gru") else _dummy(3, dtype)
    hn = _device.empty((T, B, H), dtype) if cell == "gru" else _dummy(3, dtype)

    xw = x                                                        # T,B,G*H (read only)
    if w_ih is not None:
        xw = _device.empty((T, B, GH), dtype)
        matmul(x.reshape(T * B, I), w_ih, xw.reshape(T * B, GH), trans_b=True)
    if choose_path(cell, B, H, dtype) == "persistent":
        kernel = cells.persistent_kernels(cell, dtype)[0]
        _launch_persistent(kernel, (xw, b_ih, b_hh, w_hh, hs, cs, gates, hn), B * GH,
                           cells.persistent_shared_elems(cell, B, H)[0], dtype)
    else:
        gates_forward = cells.gate_kernels(cell)[0]
        hw = _device.empty((B, GH), dtype)                        # B,G*H  one step's h W_hh^T
        step_args = _device.kernel_args(xw, hw.reshape(-1), b_ih, b_hh, hs, cs, gates, hn)
        launch = _device.configure_1d(gates_forward, B * H)
        for t in range(T):
            matmul(hs[t], w_hh, hw, trans_b=True)
            launch(t, *step_args)

    final = (hs[T].copy(), cs[T].copy()) if is_lstm else (hs[T].copy(),)
    if is_lstm:
        cache = LSTMCache(x, hs, cs, gates)
    elif cell == "gru":
        cache = GRUCache(x, hs, gates, hn)
    else:
        cache = RNNCache(x, hs)
    return hs[1:], final, cache


# ----------------------------------------------------------------------------------------
# Backward


def backward(cell, dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0):
    """Backward of :func:`forward`; see the backend interface for the contract.

    dy [T,B,H], dfinal_state like the state (None: zeros), dw_*/db_* accumulated (+=).
    Returns dx [T,B,I], the gradient of the state entering step ``t_start``, dh [T,B,H];
    with w_ih and dw_ih None, dL/d(x W_ih^T) [T,B,G*H] in place of dx.
    """
    if not isinstance(cache, _CACHE[cell]):
        raise TypeError(f"cache must be the {_CACHE[cell].__name__} returned by "
                        f"{cell}_forward of this backend, got {type(cache).__name__}")
    x, hs = cache.x, cache.hs
    T, B, I = x.shape
    H = hs.shape[2]
    dtype = x.dtype
    G = cells.GATES[cell]
    GH = G * H
    is_lstm = cell == "lstm"
    _device.check_array("dy", dy, ndim=3, dtype=dtype, shape=(T, B, H))
    if dfinal_state is None:
        dfinal_state = tuple(_device.zeros((B, H), dtype) for _ in range(2 if is_lstm else 1))
    _check_state("dfinal_state", dfinal_state, 2 if is_lstm else 1, B, H, dtype)
    check_input_weight_pair(w_ih, dw_ih)
    if w_ih is not None:
        _device.check_array("w_ih", w_ih, ndim=2, dtype=dtype, shape=(GH, I))
    _device.check_array("w_hh", w_hh, ndim=2, dtype=dtype, shape=(GH, H))
    _check_weights(cell, I, H, dtype, dw_ih, dw_hh, db_ih, db_hh, prefix="d")
    if isinstance(t_start, bool) or not isinstance(t_start, (int, np.integer)):
        raise TypeError(f"t_start must be an int, got {type(t_start).__name__}")
    t_start = int(t_start)
    if not 0 <= t_start < T:
        raise ValueError(f"t_start must be in [0, {T - 1}] for T={T} steps, got {t_start}")

    cs = cache.cs if is_lstm else _dummy(3, dtype)
    gates = cache.gates if cell in ("lstm", "gru") else _dummy(3, dtype)
    hn = cache.hn if cell == "gru" else _dummy(3, dtype)
    dh = _device.empty((T, B, H), dtype)                          # T,B,H
    dh[:t_start] = 0
    dgx = _device.empty((T, B, GH), dtype)                        # T,B,G*H (rows >= t_start written)
    separate = cells.SEPARATE_DGH[cell]
    dgh_arg = _device.empty((T, B, GH), dtype) if separate else _dummy(3, dtype)
    dg_rec = dgh_arg if separate else dgx                         # what multiplies W_hh
    dc = dfinal_state[1].reshape(-1).copy() if is_lstm else _dummy(1, dtype)   # B*H

    if choose_path(cell, B, H, dtype) == "persistent":
        kernel = cells.persistent_kernels(cell, dtype)[1]
        dh_prev = _device.empty((B, H), dtype)                    # B,H
        _launch_persistent(kernel, (dy, dfinal_state[0], dc, w_hh, hs, cs, gates, hn, dgx,
                                    dgh_arg, dh, t_start, dh_prev), B * H,
                           cells.persistent_shared_elems(cell, B, H)[1], dtype)
    else:
        gates_backward = cells.gate_kernels(cell)[1]
        dh_rec = dfinal_state[0].copy()                           # B,H  dL/dh_t via recurrence
        step_args = _device.kernel_args(dy, dh_rec.reshape(-1), dc, hs, cs, gates, hn, dgx,
                                        dgh_arg, dh)
        launch = _device.configure_1d(gates_backward, B * H)
        for t in range(T - 1, t_start - 1, -1):
            launch(t, *step_args)
            matmul(dg_rec[t], w_hh, dh_rec, accumulate=True)
        dh_prev = dh_rec

    N = (T - t_start) * B                                         # rows of steps t_start..T-1
    dgx2 = dgx[t_start:].reshape(N, GH)
    dgh2 = dg_rec[t_start:].reshape(N, GH)
    matmul(dgh2, hs[t_start:T].reshape(N, H), dw_hh, trans_a=True, accumulate=True)
    col_sum_add(dgx2, db_ih)
    col_sum_add(dgh2, db_hh)
    if w_ih is None:                                              # dL/d(x W_ih^T) itself
        dgx[:t_start] = 0
        dx = dgx
    else:
        dx = _device.empty((T, B, I), dtype)                      # T,B,I
        dx[:t_start] = 0
        matmul(dgx2, w_ih, dx[t_start:].reshape(N, I))            # dx = dgx @ W_ih
        matmul(dgx2, x[t_start:].reshape(N, I), dw_ih, trans_a=True, accumulate=True)
    dstate = (dh_prev, dc.reshape(B, H)) if is_lstm else (dh_prev,)
    return dx, dstate, dh
