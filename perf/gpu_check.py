"""GPU benchmarks: the GPU backends' training-step times against torch.nn (cuDNN), every
recurrent path forced side by side, then a short end-to-end training run; a compact table
printed last and a JSON file written.

The GPU correctness checks are tests: ``python -m pytest -m gpu tests/gpu`` (run them first).

Run on a machine with an NVIDIA GPU (torch with CUDA, cupy and numba-cuda installed), from
the repository root; no package index needed (the repo is put on the import path if bptt is
not installed):

    python perf/gpu_check.py [--json PATH] [--quick] [--backends cuda,cupy]
                             [--skip-bench] [--skip-e2e]

1. Timing: one training step (forward + backward of one layer, I = H) of LSTM and GRU, T=100,
   float32, B in {1, 8, 64, 256} x H in {128, 512, 1024}: each backend against torch.nn
   (cuDNN), CUDA events, median of repeats after warm-up; ratio = ours / torch (< 1: faster),
   GFLOP/s (``_harness.step_flops``) beside a cuBLAS GEMM measured in the same run. Then every
   path forced side by side around the paths' limits (the cupy general path also with its
   CUDA graphs forced on at any size and off), and the cooperative path with more units per
   block.
2. ``python -m bptt train --backend cupy --max-steps 50`` (and cuda): exit status and wall time.
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

import numpy as np

import _harness as hx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
# Inputs and settings


def make_problem(rng, cell, T, B, I, H, dtype):
    """Random host arrays for one timed layer: weights (PyTorch init range), x, state, dy,
    dfinal, and non-zero initial gradient buffers (backward accumulates into them)."""
    G = hx.GATES[cell]
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


def backend_paths(backend):
    """The recurrent paths ``backend.config.PATH`` can force (all but "auto")."""
    return tuple(p for p in getattr(backend.config, "PATHS", ("persistent", "general")) if p != "auto")


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
                flops = hx.step_flops(cell, T, B, H, H)
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


def format_table(rows, e2e, skipped, gemm_rate=None, path_rows=(), unit_rows=()):
    """The compact report printed last (a string)."""
    lines = []
    for name, why in skipped.items():
        lines.append(f"skipped {name}: {why}")
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
    ap.add_argument("--quick", action="store_true", help="fewer sizes (about a minute)")
    ap.add_argument("--backends", default="cuda,cupy", help="comma-separated GPU backends to check")
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
    try:
        import torch
        torch_ok = torch.cuda.is_available()
        torch_why = None if torch_ok else "torch.cuda.is_available() is False"
        # full float32 in cuDNN/cuBLAS (no TF32): a fair timing
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
        json.dump({"info": info, "skipped": skipped, "gemm_tflops": gemm_rate,
                   "timings": rows, "path_comparison": path_rows, "units_sweep": unit_rows,
                   "end_to_end": e2e},
                  f, indent=1, default=str)
    print(f"wrote {args.json} ({info['total_s']} s in all)\n")
    print(format_table(rows, e2e, skipped, gemm_rate, path_rows, unit_rows))
    return 0 if backends and all(e["rc"] == 0 for e in e2e) else 1


if __name__ == "__main__":
    sys.exit(main())
