#!/usr/bin/env python
"""One training step of a recurrent layer: bptt (cpu backend) against torch.nn, float32.

A step is forward over T steps from a zero state plus backward over all T steps with the
gradients of every parameter AND of the input x (torch: ``x.requires_grad=True``), given a
fixed random ``dy``; parameter gradients are reset before each step on both sides.
Layers: ``bptt.LSTM/GRU/RNN`` against ``torch.nn.LSTM/GRU/RNN``, input size I = H unless
``--input-size`` is given. ``--blas openblas,mkl`` runs bptt once per BLAS provider
(``BPTT_BLAS``), each as a side of its own; by default bptt runs with the environment's.

Each side runs ALONE: a round starts one fresh process for a side, runs every shape in it
(warm-up: the first use of a cell in a process pays Numba's compile or cache load; then ~0.3 s
of timed calls), and ends it before the next side's process starts, so no other benchmark
process is alive while a side is timed. ``--repeats`` rounds; the order of the sides rotates
every round; the time is the median over all timed calls of all rounds. Every process uses
the same thread count (``--threads``, default 2: torch.set_num_threads and OMP/OpenBLAS/MKL/
Numba pools).

The header names the CPU, each side's BLAS (bptt: the provider its kernels use; torch: oneDNN
and MKL as built) and SGEMM 2048^3 GFLOP/s of every provider (numpy's OpenBLAS, MKL where
installed, torch.mm), measured by the side's first and last process.
GEMM flops of one step: ``_harness.step_flops``, 6*T*B*G*H*(I+H) (G = 4 lstm, 3 gru, 1 rnn;
the elementwise gate math not counted). GFLOP/s = that / time; "%sgemm" divides it by the
fastest SGEMM measured in the run.

Peak memory: one fresh process per (cell, side) runs a tiny warm-up step (so compilation is
not counted), then one step at T = ``--mem-seq`` (1000); it reports the peak RSS
(resource.getrusage) and the rise of the peak during that step.

Prints a table; writes JSON to perf/results/bench_cells-<time>.json (``--plot``: a PNG too).
"""

import argparse
import math
import os
import sys
import time

import _harness as hx

SIDES = ("torch", "ours")
FULL = dict(cells="lstm,gru,rnn_tanh", batch="1,8,32,128", hidden="64,128,256,512,1024")
QUICK = dict(cells="lstm,gru,rnn_tanh", batch="1,32", hidden="128,512")


# =============================================================================================
# worker side: builds one layer and times its training step
# =============================================================================================

class OursSide:
    """bptt.LSTM/GRU/RNN on the cpu backend."""

    def setup(self):
        np = hx.require("numpy", "bench_cells")
        bptt = hx.require("bptt", "bench_cells (ours)")
        self.np = np
        bptt.use_backend(os.environ.get("BPTT_BACKEND", "cpu"))
        self.ctor = {"lstm": hx.require_attr(bptt, "LSTM", "bench_cells (ours)"),
                     "gru": hx.require_attr(bptt, "GRU", "bench_cells (ours)"),
                     "rnn_tanh": hx.require_attr(bptt, "RNN", "bench_cells (ours)")}
        self.ctor["rnn_relu"] = self.ctor["rnn_tanh"]
        hx.pin_threads(int(os.environ["OMP_NUM_THREADS"]))
        import numba
        return {"backend": bptt.get_backend().NAME, "numba": numba.__version__,
                "numpy": np.__version__}

    def blas_info(self):
        return hx.ours_blas_info()

    def build(self, cell, T, B, I, H):
        np = self.np
        kwargs = {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}
        layer = self.ctor[cell](I, H, dtype=np.float32, seed=0, **kwargs)
        rng = np.random.default_rng(1)
        x = rng.standard_normal((T, B, I), dtype=np.float32)
        dy = rng.standard_normal((T, B, H), dtype=np.float32)

        def step():
            layer.zero_grad()
            y, state, cache = layer.forward(x)
            layer.backward(dy, cache)
        return step


class TorchSide:
    """torch.nn.LSTM/GRU/RNN, CPU, float32, autograd."""

    def setup(self):
        hx.require("numpy", "bench_cells")
        torch = hx.require("torch", "bench_cells (torch side)")
        self.torch = torch
        hx.pin_threads(int(os.environ["OMP_NUM_THREADS"]))
        return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                "mkldnn": bool(torch.backends.mkldnn.is_available())}

    def blas_info(self):
        return hx.torch_blas_info()

    def build(self, cell, T, B, I, H):
        torch, nn = self.torch, self.torch.nn
        torch.manual_seed(0)
        if cell == "lstm":
            layer = nn.LSTM(I, H)
        elif cell == "gru":
            layer = nn.GRU(I, H)
        else:
            layer = nn.RNN(I, H, nonlinearity=cell[4:])
        x = torch.randn(T, B, I, requires_grad=True)
        dy = torch.randn(T, B, H)
        params = list(layer.parameters())

        def step():
            for p in params:
                p.grad = None
            x.grad = None
            y, _ = layer(x)
            y.backward(dy)
        return step


class CellWorker:
    """Request handler: {"op": "blas"} | {"op": "steps", shape..., "seconds", "max_calls"} |
    {"op": "mem", shape...}."""

    def __init__(self, side):
        self.impl = OursSide() if side == "ours" else TorchSide()

    def setup(self):
        return self.impl.setup()

    def handle(self, r):
        op = r["op"]
        if op == "blas":
            return self.impl.blas_info()
        if op == "steps":
            # one warm-up call (the first of a cell pays compilation), then enough calls for
            # ~r["seconds"] of timing, at least one
            step = self.impl.build(r["cell"], r["T"], r["B"], r["I"], r["H"])
            warm = hx.time_calls(step, 1)
            calls = max(1, min(r["max_calls"], int(round(r["seconds"] / max(warm[0], 1e-6)))))
            return {"warmup": warm, "times": hx.time_calls(step, calls)}
        if op == "mem":
            # compile / first-touch on a tiny T, then measure the peak of one full step
            self.impl.build(r["cell"], 2, r["B"], r["I"], r["H"])()
            step = self.impl.build(r["cell"], r["T"], r["B"], r["I"], r["H"])
            before = hx.peak_rss_mb()
            step()
            after = hx.peak_rss_mb()
            return {"peak_mb": after, "step_mb": after - before}
        raise ValueError(f"unknown op {op!r}")


# =============================================================================================
# parent side: runs each side alone, round after round, prints and saves
# =============================================================================================

class Side:
    """One timed side: "torch", or bptt with a BLAS setting (None: the environment's)."""

    def __init__(self, kind, blas=None):
        self.kind, self.blas = kind, blas
        self.name = kind if blas is None else f"{kind}[{blas}]"

    def worker(self, script, threads):
        return hx.Worker(script, self.kind, threads,
                         env_extra={"BPTT_BLAS": self.blas} if self.blas else None)


def run_round(script, side, shapes, threads, seconds, blas_too, deadline):
    """One fresh process of ``side`` runs every shape (all of them alone on the machine);
    returns ({shape key: {"times", "others"}}, BLAS info or None, error or None). Shapes
    left when ``deadline`` (time.time()) passes are not run."""
    w = side.worker(script, threads)
    if not w.alive:
        return {}, None, w.error
    out, info = {}, None
    try:
        if blas_too:
            info = w.call({"op": "blas"})
        for shape in shapes:
            if deadline is not None and time.time() > deadline:
                break
            monitor = hx.LoadMonitor(pids=[w.pid])
            reply = w.call({"op": "steps", **shape, "seconds": seconds, "max_calls": 20})
            load = monitor.stop()
            out[key(shape)] = {"times": reply["times"], "warmup": reply["warmup"],
                               "others": load and load["other_processes_cores"]}
    except hx.WorkerError as e:
        return out, info, str(e)
    finally:
        w.close()
    return out, info, None


def key(shape):
    return (shape["cell"], shape["B"], shape["H"])


def measure_memory(script, sides, cells, B, H, I, T, threads):
    """Peak RSS of one step at T (one fresh process per cell and side)."""
    rows = []
    for cell in cells:
        row = {"cell": cell, "B": B, "H": H, "I": I, "T": T}
        for side in sides:
            w = side.worker(script, threads)
            if not w.alive:
                row[side.name] = None
                continue
            try:
                row[side.name] = w.call({"op": "mem", "cell": cell, "T": T, "B": B, "I": I,
                                         "H": H})
            except hx.WorkerError as e:
                print(f"  memory {side.name} {cell}: {e}", file=sys.stderr)
                row[side.name] = None
            finally:
                w.close()
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=hx.parse_str_list, help=f"default {FULL['cells']}")
    p.add_argument("--batch", type=hx.parse_int_list, help=f"B values, default {FULL['batch']}")
    p.add_argument("--hidden", type=hx.parse_int_list, help=f"H values, default {FULL['hidden']}")
    p.add_argument("--input-size", type=int, default=None, help="I (default: I = H)")
    p.add_argument("--seq", type=int, default=100, help="T (default 100)")
    p.add_argument("--repeats", type=int, default=None,
                   help="rounds, each side once per round (default 5; 2 with --quick)")
    p.add_argument("--threads", type=int, default=hx.DEFAULT_THREADS)
    p.add_argument("--blas", type=hx.parse_str_list, default=None,
                   help="bptt once per BPTT_BLAS setting given (auto, openblas, mkl), each a "
                        "side of its own (default: the environment's setting)")
    p.add_argument("--quick", action="store_true",
                   help=f"small sweep: B {QUICK['batch']}, H {QUICK['hidden']}, 2 rounds")
    p.add_argument("--mem-seq", type=int, default=1000, help="T of the peak-RSS check (default 1000)")
    p.add_argument("--mem-batch", type=int, default=32)
    p.add_argument("--mem-hidden", type=int, default=256)
    p.add_argument("--no-mem", action="store_true", help="skip the peak-RSS check")
    p.add_argument("--only", choices=SIDES, help="run one side only")
    p.add_argument("--budget", type=float, default=12.0,
                   help="minutes for the timing sweep (default 12): shapes run cheapest first, "
                        "and those the first round does not reach within budget / rounds are "
                        "skipped and listed")
    p.add_argument("--plot", action="store_true", help="also write a PNG of the ratios")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        w = CellWorker(a.worker)
        hx.serve(w.setup, w.handle)
        return 0

    preset = QUICK if a.quick else FULL
    cells = a.cells or hx.parse_str_list(preset["cells"])
    batches = a.batch or hx.parse_int_list(preset["batch"])
    hiddens = a.hidden or hx.parse_int_list(preset["hidden"])
    repeats = a.repeats or (2 if a.quick else 5)
    bad = [c for c in cells if c not in hx.GATES]
    if bad:
        p.error(f"--cells: unknown {bad}; choose from {', '.join(hx.GATES)}")
    bad = [b for b in a.blas or () if b not in ("auto", "openblas", "mkl")]
    if bad:
        p.error(f"--blas: unknown {bad}; choose from auto, openblas, mkl")
    sides = [] if a.only == "ours" else [Side("torch")]
    if a.only != "torch":
        sides += [Side("ours", b) for b in a.blas] if a.blas else [Side("ours")]
    script = os.path.abspath(__file__)
    T = a.seq
    shapes = sorted(({"cell": c, "T": T, "B": b, "I": a.input_size or h, "H": h}
                     for c in cells for b in batches for h in hiddens),
                    key=lambda s: hx.step_flops(s["cell"], T, s["B"], s["I"], s["H"]))

    monitor = hx.LoadMonitor()
    t_start = time.time()
    share = 60 * a.budget / repeats / len(sides)  # seconds of one side's process per round
    runs = {side.name: [] for side in sides}     # per side: one {shape key: ...} per round
    blas = {side.name: [] for side in sides}     # per side: BLAS info of its first, last round
    dead, reached = {}, None
    for k in range(repeats):
        order = sides[k % len(sides):] + sides[:k % len(sides)]
        for side in order:
            if side.name in dead:
                continue
            # the first round runs shapes cheapest first within its share of the budget;
            # later rounds run the shapes every side reached then
            todo = shapes if reached is None else [s for s in shapes if key(s) in reached]
            out, info, error = run_round(script, side, todo, a.threads, 0.3,
                                         k in (0, repeats - 1),
                                         time.time() + share if reached is None else None)
            if error:
                dead[side.name] = error.strip()
                print(f"NOTE: {side.name} cannot run: {dead[side.name]}", file=sys.stderr)
                continue
            runs[side.name].append(out)
            if info:
                blas[side.name].append(info)
            print(f"[{time.time() - t_start:6.0f}s] round {k + 1} {side.name}: {len(out)} shapes",
                  file=sys.stderr, flush=True)
        if reached is None:
            firsts = [set(runs[s.name][0]) for s in sides if runs[s.name]]
            reached = set.intersection(*firsts) if firsts else set()
    live = [s for s in sides if runs[s.name] and s.name not in dead]
    if not live:
        print("nothing to run: no side could start", file=sys.stderr)
        return 1
    skipped = [key(s) for s in shapes if key(s) not in reached]
    ours = [s.name for s in live if s.kind == "ours"]

    results = []
    for shape in shapes:
        if key(shape) not in reached:
            continue
        flops = hx.step_flops(shape["cell"], T, shape["B"], shape["I"], shape["H"])
        row = {**shape, "flops": flops, "times": {}, "others": {}}
        for side in live:
            got = [r[key(shape)] for r in runs[side.name] if key(shape) in r]
            row["times"][side.name] = [t for g in got for t in g["times"]]
            row["others"][side.name] = hx.median([g["others"] for g in got])
            t = hx.median(row["times"][side.name])
            row[f"{side.name}_s"] = t
            row[f"{side.name}_gflops"] = flops / t / 1e9
        torch_s = row.get("torch_s")
        row["ratios"] = {o: torch_s / row[f"{o}_s"] for o in ours} if torch_s else {}
        row["ratios_best"] = ({o: min(row["times"]["torch"]) / min(row["times"][o]) for o in ours}
                              if torch_s else {})
        row["ratio"] = row["ratios"].get(ours[0]) if ours else None   # plot.py's ratio
        results.append(row)
    results.sort(key=lambda r: (cells.index(r["cell"]), r["B"], r["H"]))

    mem = []
    if not a.no_mem:
        I = a.input_size or a.mem_hidden
        mem = measure_memory(script, live, cells, a.mem_batch, a.mem_hidden, I, a.mem_seq,
                             a.threads)
    load = monitor.stop()

    peak = max(g for infos in blas.values() for info in infos for g in info["sgemm_gflops"].values())
    print(f"\nOne training step (forward + backward, dx and all parameter grads), float32, "
          f"T={T}, I={'H' if not a.input_size else a.input_size}, {a.threads} threads; each side "
          f"alone in its own process, {repeats} alternating rounds, median of all timed calls.\n"
          f"ratio = torch time / our time (>1: bptt is faster); best = the same ratio of the "
          f"fastest runs (steadier when other processes load the machine). GFLOP/s counts GEMM "
          f"flops 6*T*B*G*H*(I+H); %sgemm divides by {peak:.0f}, the fastest SGEMM below.\n"
          f"{hx.blas_note({s: v for s, v in blas.items() if v})}\n"
          f"{hx.load_note(load)}; 'others' = the same, cores, while that side ran the row "
          f"(the largest of the sides).\n")
    headers = ["cell", "B", "H"] + [f"{s.name} ms" for s in live]
    headers += sum([[f"ratio {o}", f"best {o}"] for o in ours if "torch_s" in results[0]], [])
    headers += [f"GF/s {s.name}" for s in live] + [f"%sgemm {s.name}" for s in live]
    headers += ["runs", "others"]
    rows = []
    for r in results:
        cells_ = [r["cell"], r["B"], r["H"]]
        cells_ += [hx.fmt(r[f"{s.name}_s"] * 1e3, ".4g") for s in live]
        if r["ratios"]:
            cells_ += sum([[hx.fmt(r["ratios"][o], ".2f"), hx.fmt(r["ratios_best"][o], ".2f")]
                           for o in ours], [])
        cells_ += [hx.fmt(r[f"{s.name}_gflops"], ".1f") for s in live]
        cells_ += [hx.fmt(100 * r[f"{s.name}_gflops"] / peak, ".0f") for s in live]
        cells_ += [min(len(v) for v in r["times"].values()),
                   hx.fmt(max((v for v in r["others"].values() if v is not None), default=None), ".1f")]
        rows.append(cells_)
    print(hx.table(headers, rows))
    summary = {}
    for o in ours:
        for cell in cells:
            ratios = [r["ratios"][o] for r in results if r["cell"] == cell and r["ratios"]]
            if ratios:
                summary.setdefault(o, {})[cell] = math.exp(sum(map(math.log, ratios)) / len(ratios))
    if skipped:
        print(f"\nskipped (not reached within --budget {a.budget} min): "
              + ", ".join(f"{c} B={b} H={h}" for c, b, h in skipped))
    for o, by_cell in summary.items():
        print(f"\ngeometric mean of ratio, {o}: "
              + ", ".join(f"{c} {v:.2f}" for c, v in by_cell.items()))
    for name, why in dead.items():
        print(f"{name}: not run ({why.splitlines()[-1] if why else 'unknown'})")
    if mem:
        print(f"\nPeak RSS of one training step at T={a.mem_seq}, B={a.mem_batch}, "
              f"H={a.mem_hidden} (fresh process each; MiB; 'step' = rise of the peak during the step)\n")
        mrows = [[m["cell"]] + sum([[hx.fmt(m.get(s.name) and m[s.name]["peak_mb"], ".0f"),
                                     hx.fmt(m.get(s.name) and m[s.name]["step_mb"], ".0f")]
                                    for s in live], [])
                 for m in mem]
        print(hx.table(["cell"] + sum([[f"{s.name} peak", f"{s.name} step"] for s in live], []),
                       mrows))
    path = hx.save_json("bench_cells", {
        "machine": hx.machine_info(a.threads), "blas": blas, "sides": [s.name for s in live],
        "T": T, "repeats": repeats, "results": results, "summary_geomean_ratio": summary,
        "memory": mem, "load": load, "skipped": skipped, "not_run": dead,
        "flops_formula": "6*T*B*G*H*(I+H)"})
    print(f"\nJSON: {os.path.relpath(path, hx.REPO_DIR)}")
    if a.plot:
        import plot
        png = plot.plot_cells(path)
        if png:
            print(f"PNG: {os.path.relpath(png, hx.REPO_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
