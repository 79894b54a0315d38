#!/usr/bin/env python
"""Where the time of one bptt training step goes, and how long a fresh process takes to start.

Part 1, breakdown. In one worker process (same thread settings as the benchmarks), every piece
of one training step is timed on its own with the step's exact shapes, each the best of
repeated calls after a warm-up (the minimum: least disturbed by other processes):

* the backend's kernels: embedding gather/scatter (or, where the model folds the embedding
  into layer 0's input projection, making and gathering the table E W_ih^T and its backward),
  ``<cell>_forward``/``<cell>_backward`` per layer, ``softmax_cross_entropy``, ``sum_of_squares`` + ``scale_`` (clipping), ``adam_step``;
* the GEMMs inside the recurrent kernels, replayed alone with the same shapes and the same
  BLAS call path (the cpu backend's CBLAS helpers from an @njit loop when importable, else
  NumPy): the input projection, the T per-step recurrent GEMMs, and after the backward loop
  dW_ih, dW_hh and dx; "gate math + rest" of a kernel = kernel time - its GEMMs;
* the decoder (Linear) GEMMs, as the model runs them (NumPy);
* the real step: ``bptt.Trainer`` updates, median; "other" = that - the sum of the pieces
  (Python glue in the model and trainer, copies, allocation).

Default step: the char-LM of bench_train.py (embedding 128, 2-layer LSTM 256, batch 32,
k1 = k2 = 50, vocabulary of the default corpus, Adam, clipping). ``--layer CELL``: one layer's
step instead (forward + backward at --seq/--batch/--hidden, like bench_cells.py).

Part 2, cold start (``--no-cold`` skips): wall time of ``bptt --help`` and of
``python -c "import bptt"``; and a fresh process that builds the char-LM and runs its first
update, with NUMBA_CACHE_DIR pointed at an empty temporary directory (cold: everything
compiles) and then at the same directory again (warm: cached machine code is loaded).

Part 3 (``--blas-threads``): one layer's step (``--layer``, default lstm; T = ``--seq``) at a
few (B, H), with the OpenBLAS that the kernels call switched between 1 and ``--threads``
threads inside one process, interleaved: does the second BLAS thread pay for itself?

Part 4 (``--step-gemm``): GFLOP/s of the per-step recurrent GEMM for B in
1, 8, 32, 128 and H in 256, 512, 1024: CBLAS sgemm on W_hh as stored (gemm_nt), on a
pre-transposed copy (gemm_nn), as B matrix-vector products, and by torch.mm; backward
dg @ W_hh by sgemm (gemm_nn) and by torch.mm.

Prints tables; writes JSON to perf/results/profile_update-<time>.json.
"""

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import _harness as hx
from bench_train import load_tokens, ours_run

INPUT_SIDE = ("fwd input GEMM", "bwd dW_ih GEMM", "bwd dx GEMM")   # gone with a projected input


# =============================================================================================
# worker: timing of the pieces
# =============================================================================================

def bench(fn, budget=0.3, max_calls=30):
    """Best (minimum) seconds of ``fn()`` over ~``budget`` seconds of calls (at least 5) after
    one warm-up call. The minimum, not the median: the breakdown subtracts times, and the least
    disturbed call is the best estimate of a piece's own cost on a shared machine."""
    first = hx.time_calls(fn, 1)[0]
    calls = max(5, min(max_calls, int(budget / max(first, 1e-6))))
    return min(hx.time_calls(fn, calls))


class GemmReplay:
    """The recurrent kernels' GEMMs with their exact shapes, timed alone, the way the cpu
    backend runs them, with its CBLAS helpers (``bptt_kernels.cpu._blas``) from @njit code:

    * where the backend runs a layer's phases on its own threads (it has ``_loop``), the replay
      does the same: OpenBLAS single-threaded, each phase cut into ``threads`` pieces on a
      thread pool (input projection and dx by rows, the time loop by batch rows, weight
      gradients by gate rows), a layer below the backend's ``MIN_WORK_FOR_THREADS`` in one piece;
    * otherwise one CBLAS call per GEMM, OpenBLAS using its own threads;
    * NumPy's matmul where the helpers cannot be imported.
    Per-step products use ``_panels.step_weight``/``step_product`` (the backend's choice of
    weight layout, panels included) for pieces of batch rows, if present."""

    def __init__(self, np, threads):
        self.np, self.parts = np, threads
        try:
            from numba import njit
            from bptt_kernels.cpu._blas import gemm_nn, gemm_nt, gemm_tn
        except Exception as e:  # the backend may not be there yet, or may change
            self.path = f"numpy (cpu backend BLAS helpers not importable: {type(e).__name__})"
            self.phases = self._numpy_phases(np)
            return
        try:
            from bptt_kernels.cpu._panels import step_product, step_weight
        except ImportError:
            @njit
            def step_weight(w, transposed, blocks, H, b0, b1, j0, j1, by_units):
                return w, transposed, b0, b1

            @njit
            def step_product(a, sw, c, beta):
                w, transposed, b0, b1 = sw
                if transposed:
                    gemm_nn(a[b0:b1], w, c[b0:b1], beta)
                else:
                    gemm_nt(a[b0:b1], w, c[b0:b1], beta)
        try:
            from bptt_kernels.cpu import _loop
            self.min_work = getattr(_loop, "MIN_WORK_FOR_THREADS", 0)
            self.split = threads > 1
        except ImportError:
            self.min_work, self.split = 0, False
        self.set_blas = hx.openblas_thread_setter() if self.split else None
        if self.split and self.set_blas is None:
            self.split = False
        self.path = (f"cpu backend CBLAS helpers, {threads} pieces on a thread pool, OpenBLAS on 1 "
                     f"thread (as the backend's _loop)" if self.split else
                     "cpu backend CBLAS helpers, one call per GEMM, OpenBLAS's own threads")

        @njit(nogil=True)
        def piece(n, part, parts):
            base, extra = divmod(n, parts)
            start = part * base + min(part, extra)
            return start, start + base + (1 if part < extra else 0)

        @njit(nogil=True)
        def input_gemm(x, w, out, part, parts):          # out[rows] = x[rows] @ w^T
            m0, m1 = piece(x.shape[0], part, parts)
            gemm_nt(x[m0:m1], w, out[m0:m1], 0.0)

        @njit(nogil=True)
        def steps_forward(h, w, out, part, parts):       # out[t, rows] = h[t, rows] @ w^T
            b0, b1 = piece(h.shape[1], part, parts)
            sw = step_weight(w, False, 1, w.shape[0], b0, b1, 0, w.shape[0], False)
            for t in range(h.shape[0]):
                step_product(h[t], sw, out[t], 0.0)

        @njit(nogil=True)
        def steps_backward(dg, w, dh, part, parts):      # dh[t, rows] = dg[t, rows] @ w
            b0, b1 = piece(dg.shape[1], part, parts)
            sw = step_weight(w, True, 1, w.shape[1], b0, b1, 0, w.shape[1], False)
            for t in range(dg.shape[0]):
                step_product(dg[t], sw, dh[t], 0.0)

        @njit(nogil=True)
        def weight_grad(dg, a, dw, part, parts):         # dw[gate rows] = dg[:, gate rows]^T @ a
            r0, r1 = piece(dw.shape[0], part, parts)
            gemm_tn(dg[:, r0:r1], a, dw[r0:r1], 0.0)

        @njit(nogil=True)
        def input_grad(dg, w, dx, part, parts):          # dx[rows] = dg[rows] @ w
            m0, m1 = piece(dg.shape[0], part, parts)
            gemm_nn(dg[m0:m1], w, dx[m0:m1], 0.0)
        self.kernels = (input_gemm, steps_forward, steps_backward, weight_grad, input_grad)
        self.phases = self._split_phases

    def _run(self, kernel, args, parts):
        if parts <= 1:
            kernel(*args, 0, 1)
            return
        import concurrent.futures
        if getattr(self, "_pool", None) is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.parts - 1)

        def on_one_blas_thread(part):
            self.set_blas(1)
            kernel(*args, part, parts)
        futures = [self._pool.submit(on_one_blas_thread, p) for p in range(1, parts)]
        kernel(*args, 0, parts)
        for f in futures:
            f.result()

    def _split_phases(self, parts):
        input_gemm, steps_forward, steps_backward, weight_grad, input_grad = self.kernels
        run = self._run

        def wrap(kernel, make_args):
            def call(*a):
                if self.set_blas is not None:
                    self.set_blas(1)
                try:
                    run(kernel, make_args(*a), parts)
                finally:
                    if self.set_blas is not None:
                        self.set_blas(self.parts)
            return call
        return (wrap(input_gemm, lambda x, w, out: (x, w, out)),
                wrap(steps_forward, lambda h, w, out: (h, w, out)),
                wrap(steps_backward, lambda dg, w, dh: (dg, w, dh)),
                wrap(weight_grad, lambda dg, a, dw: (dg, a, dw)),
                wrap(input_grad, lambda dg, w, dx: (dg, w, dx)))

    @staticmethod
    def _numpy_phases(np):
        def steps(mm):
            def run(h, w, out):
                for t in range(h.shape[0]):
                    mm(h[t], w, out[t])
            return run
        return lambda parts: (lambda x, w, out: np.matmul(x, w.T, out=out),
                              steps(lambda a, w, c: np.matmul(a, w.T, out=c)),
                              steps(lambda a, w, c: np.matmul(a, w, out=c)),
                              lambda dg, a, dw: np.matmul(dg.T, a, out=dw),
                              lambda dg, w, dx: np.matmul(dg, w, out=dx))

    def layer(self, T, B, I, H, G, dtype):
        """{piece: seconds} of one layer's GEMMs (forward: input, recurrent; backward:
        recurrent, dW_ih, dW_hh, dx) and {piece: flops}."""
        np, rng = self.np, self.np.random.default_rng(0)
        r = lambda *shape: rng.standard_normal(shape).astype(dtype)
        x, h, dg = r(T * B, I), r(T, B, H), r(T, B, G * H)
        w_ih, w_hh = r(G * H, I), r(G * H, H)
        gates, dh = np.empty((T * B, G * H), dtype), np.empty((T, B, H), dtype)
        dw_ih, dw_hh, dx = np.empty((G * H, I), dtype), np.empty((G * H, H), dtype), np.empty((T * B, I), dtype)
        dg2, h2 = dg.reshape(T * B, G * H), h.reshape(T * B, H)
        work = T * B * G * H * (I + H)  # multiply-adds of the forward GEMMs
        parts = self.parts if work >= getattr(self, "min_work", 0) else 1
        input_gemm, steps_forward, steps_backward, weight_grad, input_grad = self.phases(parts)
        secs = {
            "fwd input GEMM (x W_ih^T, all T)": bench(lambda: input_gemm(x, w_ih, gates)),
            "fwd recurrent GEMMs (h W_hh^T, T x)": bench(lambda: steps_forward(h, w_hh, dg)),
            "bwd recurrent GEMMs (dg W_hh, T x)": bench(lambda: steps_backward(dg, w_hh, dh)),
            "bwd dW_ih GEMM (dg^T x)": bench(lambda: weight_grad(dg2, x, dw_ih)),
            "bwd dW_hh GEMM (dg^T h)": bench(lambda: weight_grad(dg2, h2, dw_hh)),
            "bwd dx GEMM (dg W_ih)": bench(lambda: input_grad(dg2, w_ih, dx)),
        }
        n = 2.0 * T * B * G * H
        flops = dict(zip(secs, (n * I, n * H, n * H, n * I, n * H, n * I)))
        return secs, flops


class Profiler:
    def setup(self):
        self.np = hx.require("numpy", "profile")
        bptt = hx.require("bptt", "profile")
        bptt.use_backend(os.environ.get("BPTT_BACKEND", "cpu"))
        self.be = bptt.get_backend()
        self.models = hx.require("bptt.models", "profile")
        hx.pin_threads(int(os.environ["OMP_NUM_THREADS"]))
        self.gemm = GemmReplay(self.np, int(os.environ["OMP_NUM_THREADS"]))
        return {"backend": self.be.NAME, "gemm_path": self.gemm.path}

    def layer_rows(self, cell, T, B, I, H, x, dtype, projected=False):
        """Rows (name, seconds, flops, level) of one layer's forward or backward; returns
        (forward rows, backward rows, y). ``projected``: x is x W_ih^T [T,B,G*H] already (the
        kernels get w_ih = None: no input GEMM, dW_ih or dx)."""
        np, be, G = self.np, self.be, hx.GATES[cell]
        rng = np.random.default_rng(2)
        u = lambda *shape: be.asarray(rng.uniform(-H ** -0.5, H ** -0.5, shape), dtype)
        w_ih, w_hh, b_ih, b_hh = u(G * H, I), u(G * H, H), u(G * H), u(G * H)
        grads = [be.zeros(a.shape, dtype) for a in (w_ih, w_hh, b_ih, b_hh)]
        if projected:
            w_ih, grads[0] = None, None
        n_state = 2 if cell == "lstm" else 1
        state = tuple(be.zeros((B, H), dtype) for _ in range(n_state))
        fwd, bwd = getattr(be, f"{cell}_forward"), getattr(be, f"{cell}_backward")
        y, final, cache = fwd(x, state, w_ih, w_hh, b_ih, b_hh)
        dy = be.asarray(rng.standard_normal((T, B, H)), dtype)
        t_fwd = bench(lambda: fwd(x, state, w_ih, w_hh, b_ih, b_hh))
        t_bwd = bench(lambda: bwd(dy, state, cache, w_ih, w_hh, *grads))
        secs, flops = self.gemm.layer(T, B, I, H, G, dtype)
        if projected:
            secs = {k: v for k, v in secs.items() if k.split(" (")[0] not in INPUT_SIDE}
        f_keys = [k for k in secs if k.startswith("fwd")]
        b_keys = [k for k in secs if k.startswith("bwd")]
        f_rows = [(f"{cell} forward kernel", t_fwd, sum(flops[k] for k in f_keys), 1)]
        f_rows += [(k, secs[k], flops[k], 2) for k in f_keys]
        f_rows.append(("gate math + rest (kernel - GEMMs)", t_fwd - sum(secs[k] for k in f_keys), None, 2))
        b_rows = [(f"{cell} backward kernel", t_bwd, sum(flops[k] for k in b_keys), 1)]
        b_rows += [(k, secs[k], flops[k], 2) for k in b_keys]
        b_rows.append(("gate math + rest (kernel - GEMMs)", t_bwd - sum(secs[k] for k in b_keys), None, 2))
        return f_rows, b_rows, y

    def layer_step(self, r):
        np, be, dtype = self.np, self.be, self.np.float32
        T, B, H, cell = r["seq"], r["batch"], r["hidden"], r["cell"]
        I = r["input_size"] or H
        x = be.asarray(np.random.default_rng(1).standard_normal((T, B, I)), dtype)
        f_rows, b_rows, _ = self.layer_rows(cell, T, B, I, H, x, dtype)
        return {"rows": f_rows + b_rows, "step_s": None,
                "title": f"one {cell} layer step: T={T}, B={B}, I={I}, H={H}, float32"}

    def lm_step(self, r):
        np, be, dtype = self.np, self.be, self.np.float32
        T, B, E, H, L = r["k1"], r["batch"], r["embed"], r["hidden"], r["layers"]
        ids_all, V, _ = load_tokens(r["max_chars"])
        rng = np.random.default_rng(0)
        u = lambda *shape: be.asarray(rng.uniform(-0.1, 0.1, shape), dtype)
        emb, w_dec, b_dec = u(V, E), u(V, H), be.zeros((V,), dtype)
        ids = be.asarray(ids_all[: T * B].reshape(T, B), np.int64)
        targets = be.asarray(ids_all[1: T * B + 1], np.int64)
        xp = be.xp
        rows_f, rows_b = [], []

        G = 4
        # the model folds the embedding into level 0's input projection for long chunks over a
        # small vocabulary (bptt.models.EMBEDDING_FOLD_ROWS_PER_WORD): a [V, G*H] table, gathered
        folded = T * B >= getattr(self.models, "EMBEDDING_FOLD_ROWS_PER_WORD", float("inf")) * V
        if folded:
            w_ih0 = u(G * H, E)

            def embed():
                return be.embedding_forward(xp.matmul(emb, w_ih0.T), ids)
            rows_f.append(("embedding folded: table E W_ih^T + gather", bench(embed),
                           2.0 * V * E * G * H, 1))
        else:
            def embed():
                return be.embedding_forward(emb, ids)
            rows_f.append(("embedding forward", bench(embed), None, 1))
        x = embed()
        layer_params = []
        for k in range(L):
            f, b, x = self.layer_rows("lstm", T, B, E if k == 0 else H, H, x, dtype,
                                      projected=folded and k == 0)
            rows_f += [(f"L{k} {n}" if lvl == 1 else n, s, fl, lvl) for n, s, fl, lvl in f]
            rows_b = [(f"L{k} {n}" if lvl == 1 else n, s, fl, lvl) for n, s, fl, lvl in b] + rows_b
            I = E if k == 0 else H
            layer_params += [(G * H, I), (G * H, H), (G * H,), (G * H,)]
        h2 = x.reshape(T * B, H)
        logits = be.linear_forward(h2, w_dec, b_dec)
        rows_f.append(("decoder forward GEMM + bias", bench(lambda: be.linear_forward(h2, w_dec, b_dec)),
                       2.0 * T * B * H * V, 1))
        dlogits = xp.empty_like(logits)
        rows_f.append(("softmax cross-entropy (loss + dlogits)",
                       bench(lambda: be.softmax_cross_entropy(logits, targets, dlogits, 1.0 / (T * B))), None, 1))
        dw_dec, db_dec = xp.zeros_like(w_dec), xp.zeros_like(b_dec)
        rows_b = [("decoder backward GEMMs + bias",
                   bench(lambda: be.linear_backward(dlogits, h2, w_dec, dw_dec, db_dec)),
                   4.0 * T * B * H * V, 1)] + rows_b
        if folded:
            dxw = be.asarray(rng.standard_normal((T, B, G * H)), dtype)
            dw_ih0, demb = xp.zeros_like(w_ih0), xp.zeros_like(emb)

            def embedding_backward():
                dtable = xp.zeros((V, G * H), dtype)
                be.embedding_backward(dtable, ids, dxw)
                dw_ih0[...] += xp.matmul(dtable.T, emb)
                demb[...] += xp.matmul(dtable, w_ih0)
            rows_b.append(("embedding backward (folded): scatter-add + 2 GEMMs",
                           bench(embedding_backward), 4.0 * V * E * G * H, 1))
        else:
            demb, dx = xp.zeros_like(emb), be.asarray(rng.standard_normal((T, B, E)), dtype)
            rows_b.append(("embedding backward (scatter-add)",
                           bench(lambda: be.embedding_backward(demb, ids, dx)), None, 1))

        shapes = [(V, E)] + layer_params + [(V, H), (V,)]
        params = [u(*s) for s in shapes]
        grads = [u(*s) * 1e-3 for s in shapes]
        ms = [be.zeros(s, dtype) for s in shapes]
        vs = [be.zeros(s, dtype) for s in shapes]

        def clip():
            norm = be.sum_of_squares(grads) ** 0.5
            be.scale_(grads, min(1.0, 0.25 / (norm + 1e-6)))

        def adam():
            for p, g, m, v in zip(params, grads, ms, vs):
                be.adam_step(p, g, m, v, 2e-3, 0.9, 0.999, 1e-8, 0.0, 10)
        rows_o = [("clip: sum_of_squares + scale_", bench(clip), None, 1),
                  ("adam_step over all parameters", bench(adam), None, 1)]
        rows = rows_f + rows_b + rows_o

        step_s = None
        try:
            # in a fresh process: this one's replay pools and arrays would slow the trainer down
            # (113 ms per update measured here against 75 ms in a process of its own)
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                stamps, _ = pool.apply(ours_run, ({**r, "k2": r["k1"], "lr": 2e-3, "clip": 0.25,
                                                   "warmup": 3, "steps": 10},))
            step_s = min([b - a for a, b in zip(stamps, stamps[1:])][3:])
        except Exception as e:  # the trainer may not be there yet
            print(f"trainer step not measured: {type(e).__name__}: {e}", file=sys.stderr)
        n_params = sum(int(np.prod(s)) for s in shapes)
        return {"rows": rows, "step_s": step_s,
                "title": f"one char-LM training update: embedding {E}, {L}-layer LSTM {H}, "
                         f"vocabulary {V}, B={B}, k1=k2={T}, Adam ({n_params} parameters), float32"}

    def blas_threads(self, r):
        """One layer's training step with NumPy's OpenBLAS at 1 and at ``threads`` threads,
        switched inside this process, interleaved over ``rounds``."""
        setter = hx.openblas_thread_setter()
        if setter is None:
            return {"error": "no thread switch found in numpy.libs' OpenBLAS"}
        from bench_cells import OursSide
        side, rows, counts = OursSide(), [], (1, r["threads"])
        side.setup()
        for B, H in r["shapes"]:
            step = side.build(r["cell"], r["seq"], B, H, H)
            times = {n: [] for n in counts}
            for k in range(r["rounds"] + 1):
                for n in (counts if k % 2 else counts[::-1]):
                    setter(n)
                    t = hx.time_calls(step, 1)[0]
                    if k:  # round 0 is the warm-up
                        times[n].append(t)
            setter(r["threads"])
            rows.append({"B": B, "H": H, **{f"t{n}": times[n] for n in counts}})
        return {"rows": rows, "blas": getattr(self.be, "BLAS_LIBRARY", "?")}

    def step_gemm(self, r):
        """GFLOP/s of the per-step recurrent GEMM of a layer, several ways (each timed call runs
        ``n`` of them, ~0.5 GFLOP, at most T):
        forward h[B,H] @ W_hh^T by CBLAS sgemm on W_hh [G*H,H] (gemm_nt), on a transposed copy
        [H,G*H] (gemm_nn), as B matrix-vector products (NumPy, one per batch row), through the
        backend's per-step panels (step_weight/step_product as one piece of a T-step call:
        packing excluded, it happens once per layer call) and torch.mm; backward
        dg[B,G*H] @ W_hh (gemm_nn), through panels, and torch.mm."""
        np, G = self.np, hx.GATES[r["cell"]]
        from numba import njit
        from bptt_kernels.cpu._blas import gemm_nn, gemm_nt
        try:
            from bptt_kernels.cpu._panels import step_product, step_weight
        except ImportError:
            step_weight = None

        @njit
        def steps_nt(h, w, out, n):
            for _ in range(n):
                gemm_nt(h, w, out, 1.0)

        @njit
        def steps_nn(h, w, out, n):
            for _ in range(n):
                gemm_nn(h, w, out, 1.0)

        @njit
        def steps_panels(h, sw, out, n):
            for _ in range(n):
                step_product(h, sw, out, 1.0)
        try:
            import torch
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        except ImportError:
            torch = None
        rng, rows = np.random.default_rng(0), []
        for B, H in r["shapes"]:
            w = rng.standard_normal((G * H, H), dtype=np.float32)
            wt = np.ascontiguousarray(w.T)
            h = rng.standard_normal((B, H), dtype=np.float32)
            dg = rng.standard_normal((B, G * H), dtype=np.float32)
            out, dh, vec = np.zeros((B, G * H), np.float32), np.zeros((B, H), np.float32), np.zeros(G * H, np.float32)
            T = max(1, min(r["seq"], round(5e8 / (2.0 * B * G * H * H))))

            def gemv_rows():
                for _ in range(T):
                    for b in range(B):
                        np.dot(w, h[b], out=vec)
            ways = {"fwd sgemm NT": lambda: steps_nt(h, w, out, T),
                    "fwd sgemm NN W^T": lambda: steps_nn(h, wt, out, T),
                    "fwd B x gemv": gemv_rows,
                    "bwd sgemm NN": lambda: steps_nn(dg, w, dh, T)}
            if step_weight is not None:
                sw_f = step_weight(w, False, 1, G * H, 0, B, 0, G * H, False)
                sw_b = step_weight(w, True, 1, H, 0, B, 0, H, False)
                ways["fwd panels"] = lambda: steps_panels(h, sw_f, out, T)
                ways["bwd panels"] = lambda: steps_panels(dg, sw_b, dh, T)
            if torch is not None:
                tw, th, tdg = torch.from_numpy(w), torch.from_numpy(h), torch.from_numpy(dg)
                ways["fwd torch"] = lambda: [torch.mm(th, tw.t()) for _ in range(T)]
                ways["bwd torch"] = lambda: [torch.mm(tdg, tw) for _ in range(T)]
            flops = 2.0 * T * B * G * H * H
            rows.append({"B": B, "H": H, **{k: flops / bench(f) / 1e9 for k, f in ways.items()}})
        return {"rows": rows}

    def handle(self, r):
        if r.get("op") == "step_gemm":
            return self.step_gemm(r)
        if r.get("op") == "blas_threads":
            return self.blas_threads(r)
        return self.layer_step(r) if r.get("cell") else self.lm_step(r)


# =============================================================================================
# worker: first update of a fresh process (cold start)
# =============================================================================================

def first_update(r):
    """In a fresh process: import, build the char-LM, run two updates; seconds of each phase."""
    t0 = time.perf_counter()
    import numpy as np  # noqa: F401
    import bptt
    bptt.use_backend(os.environ.get("BPTT_BACKEND", "cpu"))
    bptt.get_backend()
    t_import = time.perf_counter() - t0
    stamps, _ = ours_run({**r, "k2": r["k1"], "lr": 2e-3, "clip": 0.25, "warmup": 2, "steps": 0})
    return {"import_s": t_import, "first_update_s": stamps[1] - stamps[0],
            "second_update_s": stamps[2] - stamps[1], "to_first_update_s": time.perf_counter() - t0
            - (stamps[2] - stamps[1])}


class FirstUpdateWorker:
    def setup(self):
        return {}

    def handle(self, r):
        return first_update(r)


def cold_start(script, threads, lm, repeats):
    """Rows of the cold-start table."""
    rows = []
    bptt_exe = os.path.join(os.path.dirname(sys.executable), "bptt")
    help_cmd = [bptt_exe, "--help"] if os.path.exists(bptt_exe) else [sys.executable, "-m", "bptt", "--help"]
    for label, argv in ((f"`{' '.join(os.path.basename(a) for a in help_cmd)}`", help_cmd),
                        ("`python -c 'import bptt'`", [sys.executable, "-c", "import bptt"]),
                        ("`python -c pass` (interpreter alone)", [sys.executable, "-c", "pass"])):
        walls, ok = [], True
        for _ in range(repeats):
            wall, _, proc = hx.run_once(argv, hx.child_env(threads))
            ok &= proc.returncode == 0
            walls.append(wall)
        rows.append({"what": label, "wall_s": hx.median(walls), "ok": ok,
                     "error": None if ok else (proc.stderr.strip().splitlines() or ["?"])[-1]})
    cache = tempfile.mkdtemp(prefix="bptt-numba-cache-")
    try:
        for label in ("cold kernel cache (empty NUMBA_CACHE_DIR)", "warm kernel cache (same dir)",
                      "warm kernel cache (again)"):
            w = hx.Worker(script, "first", threads, env_extra={"NUMBA_CACHE_DIR": cache})
            t0 = time.perf_counter()
            try:
                if not w.alive:
                    raise hx.WorkerError(w.error)
                res = w.call(lm)
                res["process_to_first_update_s"] = time.perf_counter() - t0
                rows.append({"what": f"first char-LM update, {label}", **res, "ok": True})
            except hx.WorkerError as e:
                rows.append({"what": f"first char-LM update, {label}", "ok": False,
                             "error": str(e).strip().splitlines()[-1]})
            finally:
                w.close()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return rows


# =============================================================================================
# parent
# =============================================================================================

def print_breakdown(res):
    rows, step = res["rows"], res["step_s"]
    top = sum(s for _, s, _, lvl in rows if lvl == 1)
    total = step or top
    print(f"\nBreakdown of {res['title']}.\nEach piece timed alone (best of >= 5 calls); indented rows are "
          f"parts of the kernel above them; % of {'the measured trainer update' if step else 'the sum of pieces'}.\n")
    out = []
    for name, s, flops, lvl in rows:
        out.append([("  " if lvl == 2 else "") + name, hx.fmt(s * 1e3, ".2f"),
                    hx.fmt(100 * s / total, ".1f"), hx.fmt(flops and s > 0 and flops / s / 1e9, ".1f")])
    out.append(["sum of pieces", hx.fmt(top * 1e3, ".2f"), hx.fmt(100 * top / total, ".1f"), ""])
    if step:
        out.append(["trainer update (measured, bptt.Trainer)", hx.fmt(step * 1e3, ".2f"), "100.0", ""])
        out.append(["other: model/trainer glue (measured - sum)", hx.fmt((step - top) * 1e3, ".2f"),
                    hx.fmt(100 * (step - top) / step, ".1f"), ""])
    print(hx.table(["piece", "ms", "%", "GFLOP/s"], out))
    is_gate = lambda n, lvl: lvl == 2 and n.startswith("gate")
    groups = {"GEMMs inside recurrent kernels": lambda n, lvl: lvl == 2 and not is_gate(n, lvl),
              "gate math + rest of recurrent kernels": is_gate,
              "decoder GEMMs": lambda n, lvl: n.startswith("decoder"),
              "loss, embedding, clipping, Adam": lambda n, lvl: lvl == 1 and not (
                  n.startswith("decoder") or "kernel" in n)}
    shares = {g: sum(s for n, s, _, lvl in rows if f(n, lvl)) / total for g, f in groups.items()}
    if step:
        shares["other"] = (step - top) / step
    print("\nBy kind: " + "; ".join(f"{g} {100 * v:.0f}%" for g, v in shares.items() if v))

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", choices=sorted(hx.GATES), help="profile one layer's step instead of the char-LM")
    p.add_argument("--seq", type=int, default=100, help="T for --layer (default 100)")
    p.add_argument("--hidden", type=int, default=None, help="H (default 256; 512 with --layer)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input-size", type=int, default=None, help="I for --layer (default H)")
    p.add_argument("--k1", type=int, default=50, help="char-LM chunk length (default 50)")
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-chars", type=int, default=None)
    p.add_argument("--threads", type=int, default=hx.DEFAULT_THREADS)
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-start measurements")
    p.add_argument("--blas-threads", action="store_true",
                   help="also time a layer step with OpenBLAS at 1 vs --threads threads (in-process A/B)")
    p.add_argument("--step-gemm", action="store_true",
                   help="also compare ways to do the per-step recurrent GEMM (GFLOP/s)")
    p.add_argument("--cold-repeats", type=int, default=3, help="runs of each CLI timing (default 3)")
    p.add_argument("--worker", choices=("ours", "first"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker == "ours":
        w = Profiler()
        hx.serve(w.setup, w.handle)
        return 0
    if a.worker == "first":
        w = FirstUpdateWorker()
        hx.serve(w.setup, w.handle)
        return 0

    script = os.path.abspath(__file__)
    lm = {"k1": a.k1, "batch": a.batch, "embed": a.embed, "hidden": a.hidden or 256,
          "layers": a.layers, "max_chars": a.max_chars}
    out = {"machine": hx.machine_info(a.threads)}
    monitor = hx.LoadMonitor()
    if not a.no_breakdown:
        w = hx.Worker(script, "ours", a.threads)
        if not w.alive:
            print(f"breakdown not run: {w.error.strip()}", file=sys.stderr)
        else:
            req = ({"cell": a.layer, "seq": a.seq, "batch": a.batch, "hidden": a.hidden or 512,
                    "input_size": a.input_size} if a.layer else lm)
            try:
                res = w.call(req)
                out["breakdown"] = {**res, "gemm_path": w.ready["gemm_path"]}
                print_breakdown(res)
                print(f"GEMM replay: {w.ready['gemm_path']}")
            except hx.WorkerError as e:
                print(f"breakdown failed: {e}", file=sys.stderr)
            w.close()
    if a.blas_threads and a.threads > 1:
        w = hx.Worker(script, "ours", a.threads)
        req = {"op": "blas_threads", "cell": a.layer or "lstm", "seq": a.seq, "threads": a.threads,
               "rounds": 5, "shapes": [(1, 256), (32, 256), (32, 512), (128, 512)]}
        try:
            if not w.alive:
                raise hx.WorkerError(w.error)
            res = w.call(req)
            out["blas_threads"] = res
            n = a.threads
            print(f"\nBLAS threads: one {req['cell']} layer step (forward + backward), T={a.seq}, I=H, "
                  f"with the OpenBLAS of the kernels ({res['blas']}) switched between 1 and {n} "
                  f"threads inside one process, 5 interleaved rounds; median (best) ms.\n")
            table = [[r["B"], r["H"],
                      f"{hx.median(r['t1']) * 1e3:.1f} ({min(r['t1']) * 1e3:.1f})",
                      f"{hx.median(r[f't{n}']) * 1e3:.1f} ({min(r[f't{n}']) * 1e3:.1f})",
                      f"{hx.median(r['t1']) / hx.median(r[f't{n}']):.2f}"] for r in res["rows"]]
            print(hx.table(["B", "H", "1 thread", f"{n} threads", f"speed-up of {n}"], table))
        except hx.WorkerError as e:
            print(f"BLAS threads A/B not run: {e}", file=sys.stderr)
        finally:
            w.close()
    if a.step_gemm:
        w = hx.Worker(script, "ours", a.threads)
        cell = a.layer or "lstm"
        req = {"op": "step_gemm", "cell": cell, "seq": a.seq,
               "shapes": [(b, h) for h in (256, 512, 1024) for b in (1, 8, 32, 128)]}
        try:
            if not w.alive:
                raise hx.WorkerError(w.error)
            res = w.call(req)
            out["step_gemm"] = res
            keys = [k for k in res["rows"][0] if k not in ("B", "H")]
            print(f"\nPer-step recurrent GEMM of a {cell} layer (W_hh {hx.GATES[cell]}H x H), {a.threads} "
                  f"threads, GFLOP/s (best of >= 5). fwd: h[B,H] @ W_hh^T; sgemm NT = CBLAS sgemm on "
                  f"W_hh as stored (gemm_nt), sgemm NN W^T = on a transposed copy (gemm_nn), B x gemv "
                  f"= one NumPy matrix-vector product per row, panels = the backend's per-step "
                  f"panels (_panels.step_weight, packing excluded), torch = torch.mm. bwd: "
                  f"dg[B,{hx.GATES[cell]}H] @ W_hh (gemm_nn). With threads, the kernels' time loops "
                  f"give each thread B/threads rows or H/threads units.\n")
            print(hx.table(["B", "H"] + keys,
                           [[r["B"], r["H"]] + [hx.fmt(r[k], ".1f") for k in keys] for r in res["rows"]]))
        except hx.WorkerError as e:
            print(f"per-step GEMM comparison not run: {e}", file=sys.stderr)
        finally:
            w.close()
    if not a.no_cold:
        rows = cold_start(script, a.threads, lm, a.cold_repeats)
        out["cold_start"] = rows
        print(f"\nCold start (fresh processes, {a.threads} threads; CLI rows: median of {a.cold_repeats}).\n")
        table = []
        for r in rows:
            if not r["ok"]:
                table.append([r["what"], "failed", "", "", ""])
            elif "wall_s" in r:
                table.append([r["what"], hx.fmt(r["wall_s"], ".2f"), "", "", ""])
            else:
                table.append([r["what"], hx.fmt(r["process_to_first_update_s"], ".2f"),
                              hx.fmt(r["import_s"], ".2f"), hx.fmt(r["first_update_s"], ".2f"),
                              hx.fmt(r["second_update_s"], ".3f")])
        print(hx.table(["what", "wall s", "import s", "1st update s", "2nd update s"], table))
        print("wall s of an update row: from process start to the end of its first update "
              "(includes corpus loading and model building).")
        for r in rows:
            if not r["ok"]:
                print(f"failed: {r['what']}: {r.get('error')}")
    out["load"] = monitor.stop()
    print(f"\n{hx.load_note(out['load'])}.")
    path = hx.save_json("profile_update", out)
    print(f"\nJSON: {os.path.relpath(path, hx.REPO_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
