"""One-shot GPU check: every GPU correctness check, then the GPU benchmarks, then a short
end-to-end training run; a compact table printed last and a JSON file written.

Run on a machine with an NVIDIA GPU (torch with CUDA, cupy and numba-cuda installed), from
the repository root; no package index needed (the repo is put on the import path if bptt is
not installed):

    python perf/gpu_check.py [--json PATH] [--quick] [--backends cuda,cupy]
                             [--oracle cpu|reference] [--skip-correctness] [--skip-bench]
                             [--skip-e2e]

1. Correctness, for each GPU backend that imports (``cuda``: Numba-CUDA, ``cupy``), fresh
   random inputs, outputs NaN-poisoned (each backend's ``config.POISON_OUTPUTS``), gradient
   buffers pre-filled (backward must accumulate):
   * every cell (lstm, gru, rnn_tanh, rnn_relu), float64 and float32, every recurrent path
     (persistent, cooperative, general), t_start 0 and > 0, against the ``cpu`` backend
     (``--oracle reference``: the float64 NumPy reference, which needs no kernel compile; it is
     the fallback where cpu does not import): y, final state, dx, dstate, dh, all grads;
   * the same weights through ``torch.nn`` (cuDNN) with autograd (t_start = 0);
   * cuda backend: the Numba tiled GEMM as well as cuBLAS (``config.GEMM``);
   * softmax cross-entropy, embedding gather/scatter, SGD, Adam, sum of squares, scale.
   Tolerances: max relative error (max|a-b| / max|b|) <= 1e-10 float64, 1e-5 float32.
2. Timing: one training step (forward + backward of one layer, I = H) of LSTM and GRU, T=100,
   float32, B in {1, 8, 64, 256} x H in {128, 512, 1024}: each backend against torch.nn
   (cuDNN), CUDA events, median of repeats after warm-up; ratio = ours / torch (< 1: faster),
   GFLOP/s beside a cuBLAS GEMM measured in the same run. Then every path forced side by side
   around the paths' limits (the cupy general path also with its CUDA graphs forced on at any
   size and off), and the cooperative path with more units per block.
3. ``python -m bptt train --backend cupy --max-steps 50`` (and cuda): exit status and wall time.

Pieces (``check_recurrent``, ``check_ops``, ``torch_reference``, ``format_table``) run under
the CUDA simulator too (tests/cudasim/test_gpu_check.py) with the cuda backend and tiny sizes.
"""

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}


# ----------------------------------------------------------------------------------------
# Imports


def ensure_importable():
    """Make ``bptt`` and ``bptt_kernels`` importable from this checkout when not installed
    (``kernels/`` is installed as ``bptt_kernels``: a symlink in a temp dir stands in).
    Returns the PYTHONPATH entries added (for subprocesses)."""
    added = []
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
        added.append(REPO)
    try:
        importlib.import_module("bptt_kernels")
    except ImportError:
        shim = tempfile.mkdtemp(prefix="bptt_shim_")
        os.symlink(os.path.join(REPO, "kernels"), os.path.join(shim, "bptt_kernels"))
        sys.path.insert(0, shim)
        added.append(shim)
    return added


def load_backend(name):
    """(module, None) or (None, why it is unusable)."""
    try:
        from bptt import backend as dispatcher
        probe = getattr(dispatcher, "_unavailable_reason", lambda _name: None)  # the dispatcher's probe
        reason = probe(name)
        if reason is not None:
            return None, reason
        return importlib.import_module(f"bptt_kernels.{name}"), None
    except Exception as e:  # noqa: BLE001 -- reported, not raised
        return None, f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------
# Problems and comparisons


def rel_err(actual, expected):
    """max|a - e| / max|e| in float64 (NaN if anything is NaN: poisoned memory fails)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return math.inf
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    diff = float(np.max(np.abs(a - e))) if e.size else 0.0
    return diff / scale if scale > 0 else diff


def make_problem(rng, cell, T, B, I, H, dtype):
    """Random host arrays for one layer: weights (PyTorch init range), x, state, dy, dfinal,
    and non-zero initial gradient buffers (backward accumulates into them)."""
    G = GATES[cell]
    s = 1 / math.sqrt(H)
    n_state = 2 if cell == "lstm" else 1
    p = {
        "w_ih": rng.uniform(-s, s, (G * H, I)), "w_hh": rng.uniform(-s, s, (G * H, H)),
        "b_ih": rng.uniform(-s, s, G * H), "b_hh": rng.uniform(-s, s, G * H),
        "x": rng.standard_normal((T, B, I)), "dy": rng.standard_normal((T, B, H)),
        "state": tuple(rng.standard_normal((B, H)) for _ in range(n_state)),
        "dfinal": tuple(rng.standard_normal((B, H)) for _ in range(n_state)),
    }
    p["grads0"] = tuple(rng.standard_normal(p[k].shape) for k in ("w_ih", "w_hh", "b_ih", "b_hh"))
    out = {}
    for k, v in p.items():
        out[k] = tuple(a.astype(dtype) for a in v) if isinstance(v, tuple) else v.astype(dtype)
    return out


def run_backend(backend, cell, p, t_start, zero_grads=False):
    """Forward + backward of one layer on ``backend``; host copies of everything compared."""
    dev = lambda a: backend.asarray(a, a.dtype)  # noqa: E731
    w = [dev(p[k]) for k in ("w_ih", "w_hh", "b_ih", "b_hh")]
    y, final, cache = getattr(backend, f"{cell}_forward")(dev(p["x"]), tuple(map(dev, p["state"])), *w)
    out = {"y": backend.to_host(y), "final": [backend.to_host(a) for a in final]}
    grads = [backend.zeros(g.shape, g.dtype) if zero_grads else dev(g) for g in p["grads0"]]
    dx, dstate, dh = getattr(backend, f"{cell}_backward")(
        dev(p["dy"]), tuple(map(dev, p["dfinal"])), cache, w[0], w[1], *grads, t_start=t_start)
    out.update(dx=backend.to_host(dx), dstate=[backend.to_host(a) for a in dstate],
               dh=backend.to_host(dh), grads=[backend.to_host(g) for g in grads])
    return out


def compare(got, want, keys=("y", "final", "dx", "dstate", "dh", "grads")):
    """Largest relative error over the given outputs (lists compared element by element)."""
    errs = []
    for k in keys:
        if k in want:
            pairs = zip(got[k], want[k]) if isinstance(want[k], list) else [(got[k], want[k])]
            errs += [rel_err(a, b) for a, b in pairs]
    return math.nan if any(math.isnan(e) for e in errs) else max(errs)


def torch_reference(cell, p, device="cuda"):
    """torch.nn (cuDNN on a GPU) with autograd, the same weights, t_start = 0: a dict like
    :func:`run_backend` (without dh), gradients from zero. Always computed in float64: cuDNN's
    own float32 error (1.1e-5 relative seen on an H100) would count against a float32 check."""
    import torch
    T, B, I = p["x"].shape
    H = p["w_hh"].shape[1]
    dtype = torch.float64
    if cell == "lstm":
        mod = torch.nn.LSTM(I, H)
    elif cell == "gru":
        mod = torch.nn.GRU(I, H)
    else:
        mod = torch.nn.RNN(I, H, nonlinearity=cell[4:])
    mod = mod.to(device=device, dtype=dtype)
    t = lambda a, grad=False: torch.tensor(a, device=device, dtype=dtype, requires_grad=grad)  # noqa: E731
    with torch.no_grad():
        for k in ("w_ih", "w_hh", "b_ih", "b_hh"):
            name = {"w_ih": "weight_ih_l0", "w_hh": "weight_hh_l0", "b_ih": "bias_ih_l0", "b_hh": "bias_hh_l0"}[k]
            getattr(mod, name).copy_(t(p[k]))
    x = t(p["x"], True)
    state = [t(s[None], True) for s in p["state"]]
    y, final = mod(x, tuple(state) if cell == "lstm" else state[0])
    final = list(final) if cell == "lstm" else [final]
    loss = (y * t(p["dy"])).sum() + sum((f * t(d[None])).sum() for f, d in zip(final, p["dfinal"]))
    loss.backward()
    host = lambda a: a.detach().cpu().numpy()  # noqa: E731
    return {"y": host(y), "final": [host(f[0]) for f in final], "dx": host(x.grad),
            "dstate": [host(s.grad[0]) for s in state],
            "grads": [host(getattr(mod, n).grad) for n in
                      ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")]}


@contextlib.contextmanager
def backend_config(backend, **settings):
    """Set ``backend.config`` attributes for the block, then ``config.reset()``."""
    cfg = backend.config
    for k, v in settings.items():
        setattr(cfg, k, v)
    try:
        yield
    finally:
        cfg.reset()


def check_recurrent(backend, oracle, cell, shape, dtype, t_start, rng, path="auto",
                    torch_device=None, **settings):
    """One parity check of ``backend`` against the backend ``oracle`` (and torch where
    ``torch_device`` is given and t_start == 0). Returns a result dict."""
    T, B, I, H = shape
    p = make_problem(rng, cell, T, B, I, H, dtype)
    res = {"backend": backend.NAME, "check": f"{cell} {path}", "shape": f"T{T} B{B} I{I} H{H}",
           "dtype": np.dtype(dtype).name, "t_start": t_start,
           "settings": ",".join(f"{k}={v}" for k, v in settings.items())}
    rtol = RTOL[np.dtype(dtype)]
    try:
        with backend_config(backend, PATH=path, POISON_OUTPUTS=True, **settings):
            got = run_backend(backend, cell, p, t_start)
            got0 = run_backend(backend, cell, p, 0, zero_grads=True) if torch_device else None
        want = run_backend(oracle, cell, p, t_start)
        res["vs_" + oracle.NAME] = compare(got, want)
        if torch_device:
            res["vs_torch"] = compare(got0, torch_reference(cell, p, torch_device))
        res["ok"] = all(res[k] <= rtol for k in res if k.startswith("vs_"))
    except Exception as e:  # noqa: BLE001 -- a failed check is a result
        res["ok"] = False
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc(limit=6)
    return res


def check_ops(backend, oracle, rng, dtype, small=False):
    """Every non-recurrent kernel of ``backend`` against ``oracle``; a list of result dicts.
    ``small``: tiny sizes (the simulator)."""
    rtol = RTOL[np.dtype(dtype)]
    dev = lambda a: backend.asarray(a, a.dtype)  # noqa: E731
    host = backend.to_host
    results = []

    def record(name, err):
        results.append({"backend": backend.NAME, "check": f"op {name}", "shape": "",
                        "dtype": np.dtype(dtype).name, "t_start": "", "settings": "",
                        "vs_" + oracle.NAME: err, "ok": err <= rtol})

    def guarded(name, fn):
        try:
            with backend_config(backend, POISON_OUTPUTS=True):
                record(name, fn())
        except Exception as e:  # noqa: BLE001
            results.append({"backend": backend.NAME, "check": f"op {name}", "dtype": np.dtype(dtype).name,
                            "ok": False, "error": f"{type(e).__name__}: {e}"})

    def softmax():
        N, V = (5, 37) if small else (37, 301)
        logits = (3 * rng.standard_normal((N, V))).astype(dtype)
        targets = rng.integers(0, V, N)
        targets[::5] = -1
        want_d = np.empty_like(logits)
        want = oracle.softmax_cross_entropy(oracle.asarray(logits, dtype), targets, want_d, 0.5)
        d = backend.zeros((N, V), dtype)
        got = backend.softmax_cross_entropy(dev(logits), backend.asarray(targets, np.int64), d, 0.5)
        return max(abs(got - want) / abs(want), rel_err(host(d), want_d))

    def embedding():
        V, E, ids_shape = (7, 5, (3, 4)) if small else (50, 17, (9, 7))
        weight = rng.standard_normal((V, E)).astype(dtype)
        ids = rng.integers(0, V, ids_shape)
        dout = rng.standard_normal(ids_shape + (E,)).astype(dtype)
        dw0 = rng.standard_normal((V, E)).astype(dtype)
        e1 = rel_err(host(backend.embedding_forward(dev(weight), backend.asarray(ids, np.int64))),
                     oracle.embedding_forward(weight, ids))
        got = dev(dw0)
        backend.embedding_backward(got, backend.asarray(ids, np.int64), dev(dout))
        want = dw0.copy()
        oracle.embedding_backward(want, ids, dout)
        return max(e1, rel_err(host(got), want))

    def sgd():
        shape = (4, 9) if small else (33, 65)
        param, grad, buf = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
        got = [dev(param), dev(buf)]
        want = [param.copy(), buf.copy()]
        for first in (True, False):
            backend.sgd_step(got[0], dev(grad), got[1], 0.1, 0.9, 0.01, True, first)
            oracle.sgd_step(want[0], grad, want[1], 0.1, 0.9, 0.01, True, first)
        return max(rel_err(host(a), b) for a, b in zip(got, want))

    def adam():
        n = 40 if small else 1000
        param, grad, m = (rng.standard_normal(n).astype(dtype) for _ in range(3))
        v = rng.random(n).astype(dtype)
        got = [dev(param), dev(m), dev(v)]
        want = [param.copy(), m.copy(), v.copy()]
        for step in (1, 2, 3):
            backend.adam_step(got[0], dev(grad), got[1], got[2], 1e-2, 0.9, 0.999, 1e-8, 0.01, step)
            oracle.adam_step(want[0], grad, want[1], want[2], 1e-2, 0.9, 0.999, 1e-8, 0.01, step)
        return max(rel_err(host(a), b) for a, b in zip(got, want))

    def norms():
        shapes = [(3, 7), (41,), (2, 2, 2)] if small else [(300, 7), (1001,), (3, 4, 5)]
        arrays = [rng.standard_normal(s).astype(dtype) for s in shapes]
        want = oracle.sum_of_squares(arrays)
        e1 = abs(backend.sum_of_squares([dev(a) for a in arrays]) - want) / want
        got = [dev(a) for a in arrays]
        backend.scale_(got, 0.37)
        oracle.scale_(arrays, 0.37)
        return max([e1] + [rel_err(host(a), b) for a, b in zip(got, arrays)])

    for name, fn in (("softmax_cross_entropy", softmax), ("embedding", embedding), ("sgd", sgd),
                     ("adam", adam), ("sum_of_squares+scale_", norms)):
        guarded(name, fn)
    return results


def backend_paths(backend):
    """The recurrent paths ``backend.config.PATH`` can force (all but "auto")."""
    return tuple(p for p in getattr(backend.config, "PATHS", ("persistent", "general")) if p != "auto")


def correctness(backends, oracle, rng, torch_device, quick=False):
    """The full list of correctness checks (see the module docstring)."""
    small, large, wide = (9, 3, 7, 33), (6, 5, 40, 160), (5, 4, 24, 600)
    results = []
    for backend in backends:
        paths = backend_paths(backend)
        for cell in CELLS:
            for dtype in (np.float64, np.float32):
                for path in paths:
                    for t_start in (0, 3):
                        results.append(check_recurrent(
                            backend, oracle, cell, small, dtype, t_start, rng, path=path,
                            torch_device=torch_device if t_start == 0 else None))
                results.append(check_recurrent(backend, oracle, cell, large, dtype, 2, rng,
                                               torch_device=None if quick else torch_device))
                if "cooperative" in paths:  # several units per block: 120 blocks, then 75
                    results.append(check_recurrent(backend, oracle, cell, wide, dtype, 1, rng,
                                                   path="cooperative"))
                    results.append(check_recurrent(backend, oracle, cell, wide, dtype, 1, rng,
                                                   path="cooperative", COOPERATIVE_UNITS=8))
                if backend.NAME == "cuda" and not quick:
                    results.append(check_recurrent(backend, oracle, cell, large, dtype, 1, rng,
                                                   path="general", GEMM="numba"))
        for dtype in (np.float64, np.float32):
            results += check_ops(backend, oracle, rng, dtype)
    return results


# ----------------------------------------------------------------------------------------
# Timing


def median_ms(step, sync_events, warmup=2, repeats=7):
    """Median milliseconds of ``step()`` between GPU events (``sync_events()`` -> (start, end,
    elapsed_ms(start, end)) on the stream the step runs on)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start, end, elapsed = sync_events()
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(elapsed(start, end))
    return float(np.median(times))


def cupy_events():
    import cupy
    return cupy.cuda.Event(), cupy.cuda.Event(), cupy.cuda.get_elapsed_time


def torch_events():
    import torch
    return (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True),
            lambda s, e: s.elapsed_time(e))


def step_flops(cell, T, B, I, H):
    """Multiply-add FLOPs of one training step (forward GEMMs once, backward twice)."""
    G = GATES[cell]
    return 3 * 2 * T * B * (I + H) * G * H


def time_backend(backend, cell, T, B, H, dtype=np.float32):
    """(median ms of forward + backward, path auto picked) on ``backend``."""
    rng = np.random.default_rng(B * 7919 + H)
    p = make_problem(rng, cell, T, B, H, H, dtype)
    dev = lambda a: backend.asarray(a, a.dtype)  # noqa: E731
    w = [dev(p[k]) for k in ("w_ih", "w_hh", "b_ih", "b_hh")]
    grads = [backend.zeros(a.shape, dtype) for a in w]
    x, dy = dev(p["x"]), dev(p["dy"])
    state = tuple(map(dev, p["state"]))
    dfinal = tuple(map(dev, p["dfinal"]))
    fwd, bwd = getattr(backend, f"{cell}_forward"), getattr(backend, f"{cell}_backward")

    def step():
        y, final, cache = fwd(x, state, *w)
        bwd(dy, dfinal, cache, w[0], w[1], *grads)

    path = ""
    if hasattr(backend, "choose_path"):
        path = backend.choose_path(cell, B, H, dtype)
    return median_ms(step, cupy_events), path


def path_variants(backend):
    """(label, config settings): every path forced, and where the backend records the general
    path's loops as CUDA graphs, that path with graphs at any size ("graphs") and with none
    ("nographs")."""
    variants = [(p, {"PATH": p}) for p in backend_paths(backend)]
    if hasattr(backend.config, "GRAPHS"):
        variants += [("graphs", {"PATH": "general", "GRAPH_MAX_STATE": 1 << 40}),
                     ("nographs", {"PATH": "general", "GRAPHS": False})]
    return variants


def path_comparison(backends, torch_ok, quick=False):
    """Every path forced, per backend (and torch), at sizes around the limits of the
    one-launch paths and of the general path's graphs, to check the size rules
    ``config.PATH = "auto"`` applies."""
    rows = []
    T = 100
    sizes = [(1, 64), (8, 96), (8, 512), (64, 128)] if quick else [
        (1, 32), (1, 96), (8, 64), (8, 96), (64, 64), (1, 256), (8, 256), (32, 256), (64, 256),
        (1, 1024), (16, 512), (32, 512), (64, 128), (128, 128), (256, 128), (128, 512),
        (256, 512), (256, 1024), (512, 512)]
    for cell in ("lstm", "gru"):
        for B, H in sizes:
            row = {"cell": cell, "T": T, "B": B, "H": H}
            if torch_ok:
                with contextlib.suppress(Exception):
                    row["torch_ms"] = time_torch(cell, T, B, H)
            for backend in backends:
                for path, settings in path_variants(backend):
                    try:
                        with backend_config(backend, **settings):
                            row[f"{backend.NAME}_{path}_ms"] = time_backend(backend, cell, T, B, H)[0]
                    except Exception as e:  # noqa: BLE001 -- e.g. does not fit on this device
                        row[f"{backend.NAME}_{path}_error"] = f"{type(e).__name__}: {e}"[:200]
                with contextlib.suppress(Exception):
                    row[f"{backend.NAME}_auto"] = backend.choose_path(cell, B, H, np.float32)
            rows.append(row)
            print("  " + json.dumps(row), flush=True)
    return rows


def units_sweep(backends, quick=False):
    """The cooperative path forced with 1, 2, 4, 8 times the fewest units per block (fewer,
    busier blocks; less L2 traffic), to set config.COOPERATIVE_UNITS / COOPERATIVE_MAX_STATE."""
    rows = []
    T = 100
    sizes = [("lstm", 64, 128)] if quick else [
        ("lstm", 1, 512), ("lstm", 8, 512), ("lstm", 8, 128), ("lstm", 32, 256), ("lstm", 64, 128),
        ("lstm", 64, 256), ("lstm", 128, 128), ("gru", 64, 256), ("gru", 8, 1024)]
    for backend in backends:
        if not hasattr(backend.config, "COOPERATIVE_UNITS"):
            continue
        n_sm = backend._get().limits()[1]
        for cell, B, H in sizes:
            fewest = -(-H // n_sm)
            row = {"backend": backend.NAME, "cell": cell, "T": T, "B": B, "H": H}
            for mult in (1, 2, 4, 8):
                try:
                    with backend_config(backend, PATH="cooperative", COOPERATIVE_UNITS=fewest * mult):
                        row[f"units{fewest * mult}_ms"] = time_backend(backend, cell, T, B, H)[0]
                except Exception as e:  # noqa: BLE001 -- does not fit
                    row[f"units{fewest * mult}_error"] = f"{type(e).__name__}: {e}"[:120]
            rows.append(row)
            print("  " + json.dumps(row), flush=True)
    return rows


def time_torch(cell, T, B, H):
    import torch
    mod = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(H, H).cuda()
    x = torch.randn(T, B, H, device="cuda", requires_grad=True)
    dy = torch.randn(T, B, H, device="cuda")

    def step():
        y, _ = mod(x)
        y.backward(dy)

    return median_ms(step, torch_events)


def gemm_tflops(n=4096):
    """cuBLAS float32 GEMM rate (TFLOP/s) via cupy, the machine's reference for GFLOP/s."""
    import cupy
    a = cupy.random.standard_normal((n, n), dtype=cupy.float32)
    b = cupy.random.standard_normal((n, n), dtype=cupy.float32)
    ms = median_ms(lambda: a @ b, cupy_events, warmup=2, repeats=5)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def benchmarks(backends, torch_ok, quick=False):
    rows = []
    Bs, Hs = ((1, 64), (128, 512)) if quick else ((1, 8, 64, 256), (128, 512, 1024))
    T = 100
    for cell in ("lstm", "gru"):
        for B in Bs:
            for H in Hs:
                row = {"cell": cell, "T": T, "B": B, "H": H}
                flops = step_flops(cell, T, B, H, H)
                if torch_ok:
                    try:
                        row["torch_ms"] = time_torch(cell, T, B, H)
                    except Exception as e:  # noqa: BLE001
                        row["torch_error"] = f"{type(e).__name__}: {e}"
                for backend in backends:
                    try:
                        ms, path = time_backend(backend, cell, T, B, H)
                        row[f"{backend.NAME}_ms"] = ms
                        row[f"{backend.NAME}_path"] = path
                        row[f"{backend.NAME}_gflops"] = flops / (ms * 1e-3) / 1e9
                        if row.get("torch_ms"):
                            row[f"{backend.NAME}_ratio"] = ms / row["torch_ms"]
                    except Exception as e:  # noqa: BLE001
                        row[f"{backend.NAME}_error"] = f"{type(e).__name__}: {e}"
                rows.append(row)
                print("  " + json.dumps(row), flush=True)
    return rows


# ----------------------------------------------------------------------------------------
# End to end


def end_to_end(backend_name, pythonpath, max_steps=50, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath + [os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "bptt", "train", "--backend", backend_name,
               "--max-steps", str(max_steps), "--out", out, "--json"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-600:]
        except subprocess.TimeoutExpired:
            rc, tail = "timeout", ""
        last = tail.strip().splitlines()[-1] if tail.strip() else ""
        return {"backend": backend_name, "cmd": " ".join(cmd[1:]), "rc": rc,
                "wall_s": round(time.perf_counter() - t0, 1), "last_line": last[-300:],
                "tail": tail if rc != 0 else ""}


# ----------------------------------------------------------------------------------------
# Report


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def format_table(checks, rows, e2e, skipped, gemm_rate=None, path_rows=(), unit_rows=()):
    """The compact report printed last (a string)."""
    lines = []
    failed = [c for c in checks if not c.get("ok")]
    lines.append(f"correctness: {len(checks) - len(failed)}/{len(checks)} checks passed "
                 f"(float64 <= 1e-10, float32 <= 1e-5 relative)")
    by_backend = {}
    for c in checks:
        errs = [v for k, v in c.items() if k.startswith("vs_")]
        b = by_backend.setdefault((c["backend"], c.get("dtype", "")), [0, 0, 0.0])
        b[0] += 1
        b[1] += bool(c.get("ok"))
        b[2] = max([b[2]] + errs)
    for (name, dt), (n, ok, worst) in sorted(by_backend.items()):
        lines.append(f"  {name:5s} {dt:8s} {ok}/{n} passed, worst relative error {worst:.2e}")
    for c in failed[:12]:
        errs = " ".join(f"{k}={v:.2e}" for k, v in c.items() if k.startswith("vs_"))
        lines.append(f"  FAIL {c['backend']} {c['check']} {c.get('shape', '')} {c.get('dtype', '')} "
                     f"t_start={c.get('t_start', '')} {c.get('settings', '')} {errs} {c.get('error', '')}")
    for name, why in skipped.items():
        lines.append(f"  skipped backend {name}: {why}")
    if rows:
        names = sorted({k[:-3] for r in rows for k in r if k.endswith("_ms") and k != "torch_ms"})
        head = f"{'cell':5s} {'B':>4s} {'H':>5s} {'torch ms':>9s}"
        for n in names:
            head += f" {n + ' ms':>9s} {'ratio':>6s} {'GF/s':>6s} {'path':>4s}"
        lines.append("")
        lines.append("one training step (fwd+bwd), T=100, float32, I=H; ratio = ours/torch (<1 faster)"
                     + (f"; cuBLAS 4096^3 GEMM {gemm_rate:.1f} TFLOP/s" if gemm_rate else ""))
        lines.append(head)
        for r in rows:
            line = f"{r['cell']:5s} {r['B']:4d} {r['H']:5d} {_fmt(r.get('torch_ms'), '9.3f')}"
            for n in names:
                line += (f" {_fmt(r.get(n + '_ms'), '9.3f')} {_fmt(r.get(n + '_ratio'), '6.2f')}"
                         f" {_fmt(r.get(n + '_gflops'), '6.0f')} {r.get(n + '_path', '-')[:4]:>4s}")
            lines.append(line)
    if path_rows:
        names = sorted({k.rsplit("_", 2)[0] for r in path_rows for k in r if k.endswith("_general_ms")})
        paths = [p for p in ("persistent", "cooperative", "general", "graphs", "nographs")
                 if any(k.endswith(f"_{p}_ms") or k.endswith(f"_{p}_error") for r in path_rows for k in r)]
        lines.append("")
        lines.append("every path forced (ms per step, T=100, float32, I=H; - : does not fit; auto's pick)")
        head = f"{'cell':5s} {'B':>4s} {'H':>5s} {'torch':>8s}"
        for n in names:
            head += "".join(f" {n + ' ' + p[:4]:>10s}" for p in paths) + f" {'auto':>5s}"
        lines.append(head)
        for r in path_rows:
            line = f"{r['cell']:5s} {r['B']:4d} {r['H']:5d} {_fmt(r.get('torch_ms'), '8.3f')}"
            for n in names:
                line += "".join(f" {_fmt(r.get(f'{n}_{p}_ms'), '10.3f')}" for p in paths)
                line += f" {str(r.get(n + '_auto', '-'))[:5]:>5s}"
            lines.append(line)
    if unit_rows:
        lines.append("")
        lines.append("cooperative path, units per block forced (ms per step, T=100, float32, I=H)")
        for r in unit_rows:
            cells = " ".join(f"U={k[5:-3]}: {_fmt(v, '.3f')}" for k, v in r.items() if k.endswith("_ms"))
            lines.append(f"{r['backend']:5s} {r['cell']:5s} B={r['B']:<4d} H={r['H']:<5d} {cells}")
    for e in e2e:
        lines.append(f"e2e {e['backend']}: rc={e['rc']} {e['wall_s']}s  {e['last_line'][:110]}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT") or os.path.join(REPO, "perf", "results"),
                                                   "gpu_check.json"), help="where to write the JSON results")
    ap.add_argument("--quick", action="store_true", help="fewer checks and sizes (about a minute)")
    ap.add_argument("--backends", default="cuda,cupy", help="comma-separated GPU backends to check")
    ap.add_argument("--oracle", choices=("cpu", "reference"), default="cpu",
                    help="what the GPU backends are checked against")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args(argv)
    t_start_all = time.perf_counter()
    pythonpath = ensure_importable()

    skipped = {}
    backends = []
    for name in args.backends.split(","):
        mod, why = load_backend(name)
        if mod is None:
            skipped[name] = why
            print(f"skipping backend {name}: {why}", flush=True)
        else:
            backends.append(mod)
    oracle, why = load_backend(args.oracle)
    if oracle is not None and args.oracle == "cpu":
        try:  # the cpu kernels compile on first use (np.dot inside @njit needs scipy)
            run_backend(oracle, "gru", make_problem(np.random.default_rng(0), "gru", 2, 2, 3, 4, np.float64), 0)
        except Exception as e:  # noqa: BLE001
            oracle, why = None, f"{type(e).__name__}: {e}"
    if oracle is None:
        print(f"cpu backend unusable ({why}); the oracle is the reference backend", flush=True)
        oracle = importlib.import_module("bptt_kernels.reference")
    try:
        import torch
        torch_ok = torch.cuda.is_available()
        torch_why = None if torch_ok else "torch.cuda.is_available() is False"
        # full float32 in cuDNN/cuBLAS (no TF32): the parity tolerance and a fair timing
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    except Exception as e:  # noqa: BLE001
        torch_ok, torch_why = False, f"{type(e).__name__}: {e}"
    if not torch_ok:
        skipped["torch"] = torch_why
        print(f"skipping torch: {torch_why}", flush=True)

    info = {"python": platform.python_version(), "machine": platform.node()}
    with contextlib.suppress(Exception):
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(0)
        info["device"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        info["cupy"] = cupy.__version__
    with contextlib.suppress(Exception):
        import numba_cuda
        info["numba_cuda"] = numba_cuda.__version__
    with contextlib.suppress(Exception):
        info["torch"] = torch.__version__

    rng = np.random.default_rng()  # fresh inputs every run
    t0 = time.perf_counter()
    checks = [] if args.skip_correctness else correctness(
        backends, oracle, rng, "cuda" if torch_ok else None, quick=args.quick)
    info["correctness_s"] = round(time.perf_counter() - t0, 1)
    print(f"correctness: {sum(c['ok'] for c in checks)}/{len(checks)} ok in {info['correctness_s']} s",
          flush=True)

    rows, path_rows, unit_rows, gemm_rate = [], [], [], None
    if backends and not args.skip_bench:
        t0 = time.perf_counter()
        with contextlib.suppress(Exception):
            gemm_rate = gemm_tflops()
        rows = benchmarks(backends, torch_ok, quick=args.quick)
        path_rows = path_comparison(backends, torch_ok, quick=args.quick)
        unit_rows = units_sweep(backends, quick=args.quick)
        info["bench_s"] = round(time.perf_counter() - t0, 1)
    for b in backends:
        with contextlib.suppress(Exception):
            info[f"{b.NAME}_config"] = {k: getattr(b.config, k) for k in b.config._DEFAULTS}
        graphs = getattr(getattr(b, "_gpu_engine", None), "graphs", None)
        if graphs is not None:
            info[f"{b.NAME}_graphs"] = {"replays": graphs.replays, "failed": graphs.failed}
            print(f"{b.NAME} CUDA graphs: {graphs.replays} replays, failed: {graphs.failed}",
                  flush=True)

    e2e = []
    if not args.skip_e2e:
        for b in backends:
            e2e.append(end_to_end(b.NAME, pythonpath))
    info["total_s"] = round(time.perf_counter() - t_start_all, 1)

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"info": info, "skipped": skipped, "gemm_tflops": gemm_rate, "checks": checks,
                   "timings": rows, "path_comparison": path_rows, "units_sweep": unit_rows,
                   "end_to_end": e2e},
                  f, indent=1, default=str)
    print(f"wrote {args.json} ({info['total_s']} s in all)\n")
    print(format_table(checks, rows, e2e, skipped, gemm_rate, path_rows, unit_rows))
    checks_ok = all(c["ok"] for c in checks) and (checks or args.skip_correctness)
    return 0 if checks_ok and all(e["rc"] == 0 for e in e2e) else 1


if __name__ == "__main__":
    sys.exit(main())
