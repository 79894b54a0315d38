"""The orchestration of the CuPy backend, written once for any array module.

:class:`Engine` holds an array module ``xp`` and a kernel launcher. With ``cupy`` and
:class:`~bptt_kernels.cupy._compile.CupyLauncher` it is the GPU backend; with ``numpy`` and
:class:`~bptt_kernels.cupy.host_emulation.HostLauncher` (the same CUDA sources built as host
functions) it runs on a CPU, which is how its logic and the kernels' arithmetic are tested on
machines without a GPU.

Recurrent layers (see recurrent.cu for the kernels, :mod:`._plan` for the path choice):

* forward: ``xproj = x @ w_ih^T + b_ih`` for all T steps in one GEMM (``xp.matmul``: cuBLAS
  under CuPy; ``x + b_ih`` where the caller projected the input: w_ih None), then either the
  persistent kernel (one launch for all steps, W_hh in one block's shared memory), the
  cooperative kernel (one launch, W_hh spread over the shared memory of every SM, a grid
  barrier per step) or, per step, the GEMM ``h_{t-1} @ w_hh^T`` (``step_gemm``: cuBLAS called
  through ctypes on a GPU, :mod:`._cublas`, so that a CUDA graph can capture it) and one fused
  gate kernel;
* backward: per step the fused gate-gradient kernel and ``dgh[t] @ w_hh`` (``step_gemm``; or
  the persistent or cooperative kernel), then ``dw_ih``, ``dw_hh``, the biases and ``dx`` as
  GEMMs over all (T - t_start) * B rows (:func:`bptt_kernels.host.finish_backward`, on ``xp``).

Variable-length batches (``lengths``): every recurrent kernel takes each row's steps as an int32
[B] device array and masks its padded steps itself (recurrent.cu); a call without lengths
passes T for every row (:meth:`Engine._row_steps`).

The argument checks and the cache (:class:`~bptt_kernels.host.RecurrentCache`) are the ones
every backend shares (:mod:`bptt_kernels.host`); a cache made by another backend, or read from
a checkpoint, is accepted.
"""

import numpy as np

from bptt_kernels.host import (SEPARATE_HIDDEN_GRAD, RecurrentCache, check_backward,
                               check_forward, finish_backward)

from . import config
from ._compile import SUFFIX, kernel_name
from ._cublas import matmul_step_gemm
from ._graphs import LoopGraphs
from ._plan import MAX_PERSISTENT_THREADS, ceil_div, cooperative_smem_layout, persistent_smem_layout
from ._plan import plan as plan_path

DTYPES = tuple(SUFFIX)          # float32, float64
STEP_THREADS = 256              # threads per block of grid-stride (elementwise) kernels
ROW_THREADS = 256               # threads per block of per-row reductions (a power of two)
MAX_GRID = 65535                # grid-stride kernels never need more blocks
# the cached activations the recurrent kernels read, in their argument order
CACHED = ("h0", "c0", "y", "c", "gates", "hn")
MAX_KEPT_STEPS = 64             # arrays of T for every row kept (Engine._row_steps)


class Engine:
    """The backend's functions over array module ``xp``.

    launch(name, grid, block, args, shared_mem=0)  runs kernel ``name`` (see _compile.KERNELS)
    device_limits() -> (opt-in shared memory bytes per block, number of SMs)
    to_host(a) -> numpy.ndarray
    step_gemm(a, w, out, transpose_w)  the general path's per-step out = a @ op(w)
        (:mod:`._cublas`; default ``xp.matmul``)
    capture(record) -> graph  records record()'s launches for replay by graph.launch()
        (:mod:`._graphs`; None: the general path launches every step from Python)
    """

    def __init__(self, xp, launch, device_limits, to_host, step_gemm=None, capture=None):
        self.xp = xp
        self.launch = launch
        self.step_gemm = step_gemm or matmul_step_gemm(xp)
        self.graphs = None if capture is None else LoopGraphs(capture)
        self._device_limits = device_limits
        self._limits = None
        self._to_host = to_host
        self._placeholders = {}
        self._all_steps = {}    # (T, B, device) -> int32 [B] of T (Engine._row_steps)

    # ---------------------------------------------------------------------------------------
    # plumbing

    def limits(self):
        if self._limits is None:
            self._limits = tuple(int(v) for v in self._device_limits())
        return self._limits

    def asarray(self, a, dtype):
        """Copy a host or device array-like into a C-contiguous device array of ``dtype``."""
        dtype = np.dtype(dtype)
        if isinstance(a, self.xp.ndarray):
            return self.xp.array(a, dtype=dtype, order="C", copy=True)
        return self.xp.asarray(np.ascontiguousarray(np.asarray(a, dtype=dtype)))

    def to_host(self, a):
        return self._to_host(a)

    def zeros(self, shape, dtype):
        return self.xp.zeros(shape, dtype=np.dtype(dtype))

    def _empty(self, shape, dtype):
        """An output/cache array; NaN-filled where config.POISON_OUTPUTS is on."""
        if config.POISON_OUTPUTS:
            return self.xp.full(shape, np.nan, dtype=dtype)
        return self.xp.empty(shape, dtype=dtype)

    def _placeholder(self, dtype):
        """A 1-element array passed for a pointer the kernel of this cell never reads."""
        p = self._placeholders.get(dtype)
        if p is None:
            p = self._placeholders[dtype] = self.xp.zeros(1, dtype=dtype)
        return p

    def _row_steps(self, lengths, T, B, like):
        """The recurrent kernels' ``steps``: an int32 [B] device array of each row's steps,
        ``lengths`` (checked, host int64) uploaded, or T for every row, made once per (T, B,
        device of ``like``): a call without lengths uploads and fills nothing."""
        if lengths is not None:
            return self.xp.asarray(lengths.astype(np.int32))
        key = (T, B, str(getattr(like, "device", "")))
        steps = self._all_steps.get(key)
        if steps is None:
            if len(self._all_steps) >= MAX_KEPT_STEPS:
                self._all_steps.clear()
            steps = self._all_steps[key] = self.xp.full(B, T, dtype=np.int32)
        return steps

    def _final_rows(self, a, steps, lengths):
        """[B,H] a fresh array of each row's value after its own last step, from a [T,B,H]
        (``y`` or ``c``): a[T-1] without lengths."""
        if lengths is None:
            return a[-1].copy()
        return a[steps - 1, self.xp.arange(a.shape[1])]

    def _array(self, name, a, shape=None, dtype=None, ndim=None, contiguous=False):
        """The non-recurrent ops' check: ``a`` is a device array of this backend with the
        given shape/dtype (the recurrent calls use bptt_kernels.host.checks)."""
        xp = self.xp
        if not isinstance(a, xp.ndarray):
            raise TypeError(f"{name} must be a {xp.__name__}.ndarray (use the backend's asarray), "
                            f"got {type(a).__name__}")
        if dtype is not None and a.dtype != dtype:
            raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype.name}")
        if ndim is not None and a.ndim != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
        if contiguous and not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (it is updated in place)")
        return a if a.flags.c_contiguous else xp.ascontiguousarray(a)

    def _float_dtype(self, name, a):
        if a.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32 or float64, got {a.dtype.name}")
        return a.dtype

    # ---------------------------------------------------------------------------------------
    # recurrent layers

    def choose_path(self, cell, B, H, dtype):
        """"persistent", "cooperative" or "general": the path a call of these sizes takes."""
        return self.plan(cell, B, H, dtype)[0]

    def plan(self, cell, B, H, dtype):
        """(path, rows or units per block, splits per dot) on this device (:func:`._plan.plan`)."""
        return plan_path(cell, B, H, dtype, self.limits())

    def _one_launch(self, direction, path, cell, B, H, per_block, splits, dtype, args):
        """Launch the persistent or cooperative kernel of ``direction`` ("forward" or
        "backward") with at least splits threads per dot product. Persistent: one block per
        ``per_block`` batch rows. Cooperative: one block per ``per_block`` hidden units (no
        more blocks than SMs: all resident), a fresh zero barrier counter appended to args."""
        k = ("forward", "backward").index(direction)
        if path == "persistent":
            blocks, work = ceil_div(B, per_block), splits * per_block * H
            smem = persistent_smem_layout(cell, H, per_block, dtype, splits)[k]
        else:
            blocks, work = ceil_div(H, per_block), splits * B * per_block
            smem = cooperative_smem_layout(cell, H, B, per_block, dtype, splits)[k]
            args += (self.xp.zeros(1, dtype=np.uint32),)
        threads = min(MAX_PERSISTENT_THREADS, ceil_div(work, 32) * 32)
        self.launch(kernel_name(f"{cell}_{direction}_{path}", dtype), blocks, threads, args, smem)

    def _step_grid(self, n):
        return max(1, min(MAX_GRID, ceil_div(n, STEP_THREADS)))

    def _run_steps(self, key, loop, arrays, inputs, outputs, masked):
        """Run the general path's time loop ``loop(arrays)`` (None entries dropped: the cell
        has no such array), as a CUDA graph where config says so (:mod:`._graphs`); ``key``
        names the loop (direction, cell, T, B, H, t_start, dtype), the arrays' device added.
        ``masked``: the call has lengths, so its ``arrays["steps"]`` is an input of every
        replay; a graph of a call without them keeps the steps it was recorded with (T for
        every row: the key says which kind of call it is)."""
        arrays = {name: a for name, a in arrays.items() if a is not None}
        h0 = arrays["h0"]
        key += (str(getattr(h0, "device", "")), masked)  # a graph replays on the GPU it was made on
        inputs += ("steps",) if masked else ()
        if (self.graphs is not None and config.GRAPHS
                and h0.size <= config.GRAPH_MAX_STATE                            # B * H
                and self.graphs.run(key, loop, arrays, [n for n in inputs if n in arrays],
                                    [n for n in outputs if n in arrays])):
            return
        loop(arrays)


    def recurrent_forward(self, cell, x, state, w_ih, w_hh, b_ih, b_hh, lengths=None):
        """One layer of ``cell`` over all T steps; see bptt_kernels.__init__ for the contract."""
        xp = self.xp
        call = check_forward(cell, x, state, w_ih, w_hh, b_ih, b_hh, xp, DTYPES, lengths)
        x, w_ih, w_hh, b_ih, b_hh = call.x, call.w_ih, call.w_hh, call.b_ih, call.b_hh
        T, B, I, H, G = call.T, call.B, call.I, call.H, call.G
        dtype = x.dtype
        h0 = call.state[0]
        c0 = call.state[1] if cell == "lstm" else None
        none = self._placeholder(dtype)
        steps = self._row_steps(call.lengths, T, B, h0)                      # B

        if w_ih is None:
            xproj = x + b_ih                                                   # T,B,GH
        else:
            xproj = xp.matmul(x.reshape(T * B, I), w_ih.T).reshape(T, B, G * H)  # T,B,GH
            xproj += b_ih
        y = self._empty((T, B, H), dtype)
        gates = self._empty((T, B, G * H), dtype) if cell in ("lstm", "gru") else None
        c = self._empty((T, B, H), dtype) if cell == "lstm" else None
        hn = self._empty((T, B, H), dtype) if cell == "gru" else None
        outs = tuple(none if a is None else a for a in (y, c, gates, hn))
        i32 = np.int32

        path, per_block, splits = self.plan(cell, B, H, dtype)  # rows or units
        if path in ("persistent", "cooperative"):
            self._one_launch("forward", path, cell, B, H, per_block, splits, dtype,
                             (i32(T), i32(B), i32(H), i32(per_block), i32(splits), steps, xproj,
                              w_hh, b_hh, h0, none if c0 is None else c0) + outs)
        else:
            name = kernel_name(f"{cell}_forward_step", dtype)
            grid = self._step_grid(B * H)

            def loop(a):  # per step: hp = h_{t-1} W_hh^T (step_gemm), then the gate kernel
                written = tuple(a.get(k, none) for k in ("y", "c", "gates", "hn"))
                for t in range(T):
                    self.step_gemm(a["h0"] if t == 0 else a["y"][t - 1], a["w_hh"], a["hp"], True)
                    self.launch(name, grid, STEP_THREADS,
                                (i32(t), i32(B), i32(H), a["steps"], a["xproj"], a["hp"],
                                 a["b_hh"], a["h0"], a.get("c0", none)) + written)

            arrays = dict(steps=steps, xproj=xproj, w_hh=w_hh, b_hh=b_hh, h0=h0, c0=c0,
                          hp=xp.empty((B, G * H), dtype=dtype),                      # B,GH
                          y=y, c=c, gates=gates, hn=hn)
            self._run_steps(("forward", cell, T, B, H, 0, dtype), loop, arrays,
                            inputs=("xproj", "w_hh", "b_hh", "h0", "c0"),
                            outputs=("y", "c", "gates", "hn"), masked=call.lengths is not None)
        final = tuple(self._final_rows(a, steps, call.lengths)
                      for a in ((y, c) if cell == "lstm" else (y,)))
        return y, final, RecurrentCache(cell, x, h0, c0, y=y, gates=gates, c=c, hn=hn,
                                        lengths=call.lengths)

    def recurrent_backward(self, cell, dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh,
                           db_ih, db_hh, t_start=0, t_origin=0):
        """Backward of :meth:`recurrent_forward`; accumulates (+=) into dw_*, db_*."""
        xp = self.xp
        call = check_backward(cell, dy, dfinal_state, cache, w_ih, w_hh, dw_ih, dw_hh, db_ih,
                              db_hh, t_start, xp, t_origin)      # t_origin checked; one block here
        dy, w_hh, t_start, cache = call.dy, call.w_hh, call.t_start, call.cache
        T, B, H, G = call.T, call.B, call.H, call.G
        dtype = dy.dtype
        saved = {k: getattr(cache, k) for k in CACHED}   # checked, C-contiguous; None: not this cell's
        none = self._placeholder(dtype)
        cached = tuple(none if saved[k] is None else saved[k] for k in CACHED)
        separate = cell in SEPARATE_HIDDEN_GRAD
        dh = self._empty((T, B, H), dtype)                              # T,B,H
        dh[:t_start] = 0
        dgx = self._empty((T, B, G * H), dtype)                         # T,B,GH
        dgh = self._empty((T, B, G * H), dtype) if separate else None   # GRU only
        grads = (dh, dgx, none if dgh is None else dgh)
        dh_final = call.dfinal_state[0]
        dc_final = call.dfinal_state[1] if cell == "lstm" else xp.zeros((B, H), dtype=dtype)
        steps = self._row_steps(cache.lengths, T, B, dy)                      # B
        i32 = np.int32

        path, per_block, splits = self.plan(cell, B, H, dtype)  # rows or units
        if path in ("persistent", "cooperative"):
            dh0 = self._empty((B, H), dtype)
            dc0 = self._empty((B, H), dtype)
            self._one_launch("backward", path, cell, B, H, per_block, splits, dtype,
                             (i32(T), i32(t_start), i32(B), i32(H), i32(per_block), i32(splits),
                              steps, dy, w_hh) + cached + (dh_final, dc_final) + grads + (dh0, dc0))
        else:
            name = kernel_name(f"{cell}_backward_step", dtype)
            grid = self._step_grid(B * H)
            g = "dgh" if separate else "dgx"     # the rows that multiply W_hh

            def loop(a):  # per step: the gate-gradient kernel, then dh_rec = dg_h[t] W_hh
                for t in range(T - 1, t_start - 1, -1):
                    self.launch(name, grid, STEP_THREADS,
                                (i32(t), i32(B), i32(H), a["steps"], a["dy"], a["dh_rec"],
                                 a["dh_final"])
                                + tuple(a.get(k, none) for k in CACHED)
                                + (a["dh"], a["dgx"], a.get("dgh", none), a["dc"], a["dh_dir"]))
                    self.step_gemm(a[g][t], a["w_hh"], a["dh_rec"], False)

            arrays = dict(saved)
            arrays.update(steps=steps, dy=dy, w_hh=w_hh, dh=dh, dgx=dgx,
                          dgh=dgh,                                # None but for the GRU: see run()
                          dh_final=dh_final,                      # B,H  read at each row's last step
                          dh_rec=self._empty((B, H), dtype),      # B,H  dL/dh_t through W_hh
                          dc=dc_final.copy(),                     # B,H  running dL/dc (LSTM)
                          dh_dir=xp.zeros((B, H), dtype=dtype))   # B,H  GRU z*dh path
            self._run_steps(("backward", cell, T, B, H, t_start, dtype), loop, arrays,
                            inputs=CACHED + ("dy", "w_hh", "dh_final", "dc", "dh_dir"),
                            outputs=("dh", "dgx", "dgh", "dh_rec", "dc", "dh_dir"),
                            masked=cache.lengths is not None)
            dh0, dc0 = arrays["dh_rec"] + arrays["dh_dir"], arrays["dc"]
        if cache.lengths is not None:   # rows with no step in the window: dL/dh passes through
            dh0 = xp.where((steps <= t_start)[:, None], dh_final, dh0)         # B,H

        # parameter gradients and dx over the rows t_start .. T-1 as big GEMMs
        dx = finish_backward(cache.x, saved["h0"], saved["y"], dgx, dgx if dgh is None else dgh,
                             t_start, call.w_ih, call.dw_ih, call.dw_hh, call.db_ih, call.db_hh, xp,
                             blocked=False)               # TIME_BLOCKS False
        dstate = (dh0, dc0) if cell == "lstm" else (dh0,)
        return dx, dstate, dh

    # ---------------------------------------------------------------------------------------
    # non-recurrent pieces

    def softmax_cross_entropy(self, logits, targets, dlogits, scale):
        xp = self.xp
        logits = self._array("logits", logits, ndim=2, contiguous=True)
        dtype = self._float_dtype("logits", logits)
        N, V = logits.shape
        targets = self._indices("targets", targets, (N,))
        dlogits = self._array("dlogits", dlogits, (N, V), dtype, contiguous=True)
        if N == 0:
            return 0.0
        if V < 1:
            raise ValueError(f"logits must have at least one column, got shape {(N, V)}")
        if int(targets.max()) >= V:
            raise ValueError(f"targets must be < V={V} (or < 0 to ignore a row), "
                             f"got max {int(targets.max())}")
        threads = ROW_THREADS if V >= ROW_THREADS else max(32, 1 << (V - 1).bit_length())
        row_loss = xp.empty(N, dtype=np.float64)
        self.launch(kernel_name("softmax_xent", dtype), N, threads,
                    (np.int32(N), np.int32(V), logits, targets, dlogits, dtype.type(scale),
                     row_loss), (2 * threads + 1) * dtype.itemsize)
        return float(row_loss.sum())

    def _indices(self, name, a, shape=None):
        """Integer indices as a C-contiguous int64 device array (host array-likes uploaded)."""
        xp = self.xp
        if not isinstance(a, xp.ndarray):
            a = xp.asarray(np.asarray(a))
        if a.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an integer array, got {a.dtype.name}")
        a = xp.ascontiguousarray(a, dtype=np.int64)
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
        return a

    def _ids(self, ids, V):
        ids = self._indices("ids", ids)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(f"ids must be in [0, {V - 1}], got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return ids

    def embedding_forward(self, weight, ids):
        weight = self._array("weight", weight, ndim=2)
        dtype = self._float_dtype("weight", weight)
        V, E = weight.shape
        ids = self._ids(ids, V)
        out = self._empty(ids.shape + (E,), dtype)
        n = ids.size
        if n and E:
            self.launch(kernel_name("embedding_forward", dtype), self._step_grid(n * E),
                        STEP_THREADS, (np.int64(n), np.int32(E), weight, ids, out))
        return out

    def embedding_backward(self, dweight, ids, dout):
        dweight = self._array("dweight", dweight, ndim=2, contiguous=True)
        dtype = self._float_dtype("dweight", dweight)
        V, E = dweight.shape
        ids = self._ids(ids, V)
        dout = self._array("dout", dout, ids.shape + (E,), dtype)
        n = ids.size
        if n and E:
            self.launch(kernel_name("embedding_backward", dtype), self._step_grid(n * E),
                        STEP_THREADS, (np.int64(n), np.int32(E), ids, dout, dweight))

    def _param_triplet(self, names, arrays):
        p = self._array(names[0], arrays[0], contiguous=True)
        dtype = self._float_dtype(names[0], p)
        rest = [self._array(nm, a, p.shape, dtype, contiguous=True)
                for nm, a in zip(names[1:], arrays[1:])]
        return p, dtype, rest

    def sgd_step(self, param, grad, buf, lr, momentum, weight_decay, nesterov, first):
        param, dtype, (grad, buf) = self._param_triplet(("param", "grad", "buf"),
                                                        (param, grad, buf))
        r = dtype.type
        if param.size:
            self.launch(kernel_name("sgd_step", dtype), self._step_grid(param.size),
                        STEP_THREADS,
                        (np.int64(param.size), param, grad, buf, r(lr), r(momentum),
                         r(weight_decay), np.int32(bool(nesterov)), np.int32(bool(first))))

    def adam_step(self, param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
        param, dtype, (grad, m, v) = self._param_triplet(("param", "grad", "m", "v"),
                                                         (param, grad, m, v))
        if int(step) < 1:
            raise ValueError(f"step counts from 1, got {step}")
        step = int(step)
        step_size = lr / (1 - beta1 ** step)             # float64, as torch computes them
        bc2_sqrt = (1 - beta2 ** step) ** 0.5
        r = dtype.type
        if param.size:
            self.launch(kernel_name("adam_step", dtype), self._step_grid(param.size),
                        STEP_THREADS,
                        (np.int64(param.size), param, grad, m, v, r(step_size), r(1 - beta1),
                         r(beta2), r(1 - beta2), r(eps), r(weight_decay), r(bc2_sqrt)))

    def sum_of_squares(self, arrays):
        out = self.xp.zeros(1, dtype=np.float64)
        for k, a in enumerate(arrays):
            a = self._array(f"arrays[{k}]", a)
            dtype = self._float_dtype(f"arrays[{k}]", a)
            if a.size:
                self.launch(kernel_name("sum_squares", dtype),
                            max(1, min(1024, ceil_div(a.size, ROW_THREADS))), ROW_THREADS,
                            (np.int64(a.size), a, out), ROW_THREADS * 8)
        return float(out[0])

    def scale_(self, arrays, factor):
        for k, a in enumerate(arrays):
            a = self._array(f"arrays[{k}]", a, contiguous=True)
            dtype = self._float_dtype(f"arrays[{k}]", a)
            if a.size:
                self.launch(kernel_name("scale", dtype), self._step_grid(a.size), STEP_THREADS,
                            (np.int64(a.size), a, dtype.type(factor)))
