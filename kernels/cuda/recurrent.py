"""Recurrent forward/backward drivers of the Numba-CUDA backend (the time loop lives on the GPU).

Both paths share the cell math of :mod:`.cells` and the GEMMs of :mod:`.gemm`:

forward   xw = x @ W_ih^T                      one GEMM over all T*B rows (hoisted out of the loop;
                                               w_ih None: x is xw, projected by the caller)
          persistent: one launch for all steps (W_hh in shared memory)
          general:    per step  hw = h_t @ W_hh^T (GEMM), gates_forward (fused cell kernel)
backward  persistent: one launch for steps T-1 .. t_start
          general:    per step  gates_backward, then dh_rec += dg_rec[t] @ W_hh (GEMM)
          then dx, dW_ih, dW_hh and the biases as big GEMMs over the rows of steps
          t_start..T-1: :func:`bptt_kernels.host.finish_backward` over ``xp`` (cuBLAS through
          CuPy on a GPU, NumPy under the simulator; ``config.GEMM`` does not apply to them)

Variable-length batches (``lengths``): the kernels' masked variants (:mod:`.cells`) take each
row's steps as an int32 device array and handle its padded steps themselves; the final state
is gathered from each row's last step.

The arguments are checked by :mod:`bptt_kernels.host.checks`, and the cache is the shared
:class:`~bptt_kernels.host.RecurrentCache`. The kernels read h_0..h_T (and c_0..c_T) as one
[T+1,B,H] array: forward allocates it, returns ``y`` and ``h0`` as views of it and keeps it in
``cache.extra["hs"]`` (``["cs"]``); backward takes it from there, or builds it from h0 and y
(c0 and c) for a cache made by another backend or read from a checkpoint.
"""

import functools

import numpy as np
from numba import cuda

from bptt_kernels.host import (SEPARATE_HIDDEN_GRAD, RecurrentCache, check_backward,
                               check_forward, finish_backward)

from . import _device, cells, config
from .gemm import matmul

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


def _dummy(ndim, dtype):
    """A tiny stand-in for an array a cell's kernels never touch."""
    return _device.empty((1,) * ndim, dtype)


def _steps(lengths):
    """The kernels' ``steps``: ``lengths`` (checked, host int64) as an int32 device array, or
    None without lengths (the unmasked kernels never read it)."""
    return None if lengths is None else _device.asarray(lengths, np.int32)


# ----------------------------------------------------------------------------------------
# Forward


def forward(cell, x, state, w_ih, w_hh, b_ih, b_hh, lengths=None):
    """One layer of ``cell`` over all T steps; see the backend interface for the contract.

    x [T,B,I], state (h0 [B,H],) or (h0, c0) for lstm (None: zeros), w_ih [G*H,I], w_hh [G*H,H],
    b_ih/b_hh [G*H]. w_ih None: x is x W_ih^T [T,B,G*H] already. Returns y [T,B,H] (the view
    ``cache.extra["hs"][1:]``: do not modify it in place while the cache is needed), the final
    state (fresh arrays: each row's state after its own last step) and the cache.
    """
    call = check_forward(cell, x, state, w_ih, w_hh, b_ih, b_hh, _device.xp, _device.DTYPES,
                         lengths)
    x, w_ih, w_hh, b_ih, b_hh = call.x, call.w_ih, call.w_hh, call.b_ih, call.b_hh
    T, B, I, H, GH = call.T, call.B, call.I, call.H, call.G * call.H
    dtype = x.dtype
    is_lstm = cell == "lstm"
    masked, steps = call.lengths is not None, _steps(call.lengths)

    hs = _device.empty((T + 1, B, H), dtype)                      # T+1,B,H
    hs[0] = call.state[0]
    cs = _device.empty((T + 1, B, H), dtype) if is_lstm else _dummy(3, dtype)
    if is_lstm:
        cs[0] = call.state[1]
    gates = _device.empty((T, B, GH), dtype) if cell in ("lstm", "gru") else _dummy(3, dtype)
    hn = _device.empty((T, B, H), dtype) if cell == "gru" else _dummy(3, dtype)

    xw = x                                                        # T,B,G*H (read only)
    if w_ih is not None:
        xw = _device.empty((T, B, GH), dtype)
        matmul(x.reshape(T * B, I), w_ih, xw.reshape(T * B, GH), trans_b=True)
    if choose_path(cell, B, H, dtype) == "persistent":
        kernel = cells.persistent_kernels(cell, dtype, masked)[0]
        _launch_persistent(kernel, (steps, xw, b_ih, b_hh, w_hh, hs, cs, gates, hn), B * GH,
                           cells.persistent_shared_elems(cell, B, H)[0], dtype)
    else:
        gates_forward = cells.gate_kernels(cell, masked)[0]
        hw = _device.empty((B, GH), dtype)                        # B,G*H  one step's h W_hh^T
        step_args = _device.kernel_args(steps, xw, hw.reshape(-1), b_ih, b_hh, hs, cs, gates,
                                        hn)
        launch = _device.configure_1d(gates_forward, B * H)
        for t in range(T):
            matmul(hs[t], w_hh, hw, trans_b=True)
            launch(t, *step_args)

    y = hs[1:]                                                    # T,B,H
    # the final state: hs[T], or each row's h after its last step, hs[steps[b], b] (cs alike)
    final = tuple(a[steps, _device.xp.arange(B)] if masked else a[T].copy()
                  for a in ((hs, cs) if is_lstm else (hs,)))
    cache = RecurrentCache(
        cell, x, hs[0], cs[0] if is_lstm else None, y=y,
        gates=gates if cell in ("lstm", "gru") else None, c=cs[1:] if is_lstm else None,
        hn=hn if cell == "gru" else None,
        extra={"hs": hs, "cs": cs} if is_lstm else {"hs": hs}, lengths=call.lengths)
    return y, final, cache


# ----------------------------------------------------------------------------------------
# Backward


def _states(cache, is_lstm):
    """(hs, cs): h_0..h_T and (LSTM) c_0..c_T as [T+1,B,H] arrays, from the cache's extra
    where forward left them, else joined from h0 and y (c0 and c)."""
    xp = _device.xp
    extra = cache.extra or {}
    hs = extra.get("hs")
    if hs is None:
        hs = xp.concatenate([cache.h0[None], cache.y], axis=0)
    if not is_lstm:
        return hs, None
    cs = extra.get("cs")
    if cs is None:
        cs = xp.concatenate([cache.c0[None], cache.c], axis=0)
    return hs, cs


def backward(cell, dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh, t_start=0,
             t_origin=0):
    """Backward of :func:`forward`; see the backend interface for the contract.

    dy [T,B,H], dfinal_state like the state (None: zeros), dw_*/db_* accumulated (+=).
    Returns dx [T,B,I], the gradient of the state entering step ``t_start``, dh [T,B,H];
    with w_ih and dw_ih None, dL/d(x W_ih^T) [T,B,G*H] in place of dx.
    """
    xp = _device.xp
    call = check_backward(cell, dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih, db_hh,
                          t_start, xp, t_origin)          # t_origin checked; one block here
    dy, w_hh, t_start, cache = call.dy, call.w_hh, call.t_start, call.cache
    T, B, H, GH = call.T, call.B, call.H, call.G * call.H
    dtype = dy.dtype
    is_lstm = cell == "lstm"
    masked, steps = cache.lengths is not None, _steps(cache.lengths)
    hs, cs = _states(cache, is_lstm)         # the cache's fields are checked and contiguous
    cs = cs if is_lstm else _dummy(3, dtype)
    gates = cache.gates if cell in ("lstm", "gru") else _dummy(3, dtype)
    hn = cache.hn if cell == "gru" else _dummy(3, dtype)
    dh = _device.empty((T, B, H), dtype)                          # T,B,H
    dh[:t_start] = 0
    dgx = _device.empty((T, B, GH), dtype)                        # T,B,G*H (rows >= t_start written)
    separate = cell in SEPARATE_HIDDEN_GRAD
    dgh_arg = _device.empty((T, B, GH), dtype) if separate else _dummy(3, dtype)
    dg_rec = dgh_arg if separate else dgx                         # what multiplies W_hh
    dfinal = call.dfinal_state
    dc = dfinal[1].reshape(-1).copy() if is_lstm else _dummy(1, dtype)   # B*H

    if choose_path(cell, B, H, dtype) == "persistent":
        kernel = cells.persistent_kernels(cell, dtype, masked)[1]
        dh_prev = _device.empty((B, H), dtype)                    # B,H
        _launch_persistent(kernel, (steps, dy, dfinal[0], dc, w_hh, hs, cs, gates, hn, dgx,
                                    dgh_arg, dh, t_start, dh_prev), B * H,
                           cells.persistent_shared_elems(cell, B, H)[1], dtype)
    else:
        gates_backward = cells.gate_kernels(cell, masked)[1]
        dh_rec = dfinal[0].copy()                                 # B,H  dL/dh_t via recurrence
        step_args = _device.kernel_args(steps, dy, dh_rec.reshape(-1), dc, hs, cs, gates, hn,
                                        dgx, dgh_arg, dh)
        launch = _device.configure_1d(gates_backward, B * H)
        for t in range(T - 1, t_start - 1, -1):
            launch(t, *step_args)
            matmul(dg_rec[t], w_hh, dh_rec, accumulate=True)
        dh_prev = dh_rec

    dx = finish_backward(cache.x, hs[0], hs[1:], dgx, dg_rec, t_start, call.w_ih, call.dw_ih,
                         call.dw_hh, call.db_ih, call.db_hh, xp, blocked=False)
    dstate = (dh_prev, dc.reshape(B, H)) if is_lstm else (dh_prev,)
    return dx, dstate, dh
