#!/usr/bin/env python
"""One training step of a recurrent layer: bptt (cpu backend) against torch.nn, float32.

A step is forward over T steps from a zero state plus backward over all T steps with the
gradients of every parameter AND of the input x (torch: ``x.requires_grad=True``), given a
fixed random ``dy``; parameter gradients are reset before each step on both sides.
Layers: ``bptt.LSTM/GRU/RNN`` against ``torch.nn.LSTM/GRU/RNN``, input size I = H unless
``--input-size`` is given.

Each side runs in its own long-lived process with the same thread count (``--threads``,
default 2: torch.set_num_threads and OMP/OpenBLAS/Numba pools). For every shape: warm-up
(the first use of a cell in a process also pays Numba's compile or cache load), then
``--repeats`` rounds alternating between the sides (the side that starts alternates too);
the time is the median over all timed calls.

GEMM flops of one step: ``_harness.step_flops``, 6*T*B*G*H*(I+H) (G = 4 lstm, 3 gru, 1 rnn;
the elementwise gate math not counted). GFLOP/s = that / time; "%sgemm" divides it by numpy's float32 2048^3 matmul (best of 5),
measured in the same run by the same worker processes.

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
    """Request handler: {"op": "sgemm"} | {"op": "steps", shape..., "warmup", "calls"} |
    {"op": "mem", shape...}."""

    def __init__(self, side):
        self.impl = OursSide() if side == "ours" else TorchSide()
        self.key, self.step = None, None
        self.compiled = set()  # cells already run once in this process

    def setup(self):
        return self.impl.setup()

    def _step_for(self, r):
        key = (r["cell"], r["T"], r["B"], r["I"], r["H"])
        if key != self.key:
            self.key, self.step = None, None  # free the previous shape's arrays first
            self.step = self.impl.build(*key)
            self.key = key
        return self.step

    def handle(self, r):
        op = r["op"]
        if op == "sgemm":
            return {"gflops": hx.sgemm_gflops()}
        if op == "steps":
            step = self._step_for(r)
            warmup = r["warmup"] + (r["cell"] not in self.compiled)
            warm = hx.time_calls(step, warmup)
            self.compiled.add(r["cell"])
            return {"warmup": warm, "times": hx.time_calls(step, r["calls"])}
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
# parent side: schedules shapes, alternates sides, prints and saves
# =============================================================================================

def plan_rounds(seconds, repeats):
    """(calls per round, rounds) for a step taking ``seconds``: ~0.3 s of calls per round,
    fewer rounds (at least 3, or 2 with --quick) for slow shapes."""
    calls = max(1, min(20, int(round(0.3 / max(seconds, 1e-6)))))
    rounds = repeats if seconds < 1.0 else max(min(repeats, 3), (repeats + 1) // 2)
    return calls, rounds


def bench_shape(workers, shape, repeats, first):
    """Time one shape on every live worker, alternating (``first``: index of the side that
    starts); returns {side: [seconds...] or None if it failed}."""
    order = [s for s in SIDES if s in workers and workers[s].alive]
    live = order[first % len(order):] + order[:first % len(order)]
    times, estimate = {s: [] for s in live}, 0.0
    for side in live:
        try:
            reply = workers[side].call({"op": "steps", **shape, "warmup": 1, "calls": 0})
            estimate = max(estimate, reply["warmup"][-1])
        except hx.WorkerError as e:
            print(f"  {side} failed at {shape}: {e}", file=sys.stderr)
            times[side] = None
    live = [s for s in live if times[s] is not None]
    calls, rounds = plan_rounds(estimate, repeats)
    for k in range(rounds):
        for side in list(live if k % 2 == 0 else live[::-1]):
            try:
                times[side] += workers[side].call({"op": "steps", **shape, "warmup": 0,
                                                   "calls": calls})["times"]
            except hx.WorkerError as e:
                print(f"  {side} failed at {shape}: {e}", file=sys.stderr)
                times[side] = None
                live.remove(side)
    return times


def measure_memory(script, sides, cells, B, H, I, T, threads):
    """Peak RSS of one step at T (one fresh process per cell and side)."""
    rows = []
    for cell in cells:
        row = {"cell": cell, "B": B, "H": H, "I": I, "T": T}
        for side in sides:
            w = hx.Worker(script, side, threads)
            if not w.alive:
                row[side] = None
                continue
            try:
                row[side] = w.call({"op": "mem", "cell": cell, "T": T, "B": B, "I": I, "H": H})
            except hx.WorkerError as e:
                print(f"  memory {side} {cell}: {e}", file=sys.stderr)
                row[side] = None
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
                   help="alternating rounds per shape (default 5; 2 with --quick)")
    p.add_argument("--threads", type=int, default=hx.DEFAULT_THREADS)
    p.add_argument("--quick", action="store_true",
                   help=f"small sweep: B {QUICK['batch']}, H {QUICK['hidden']}, 2 rounds")
    p.add_argument("--mem-seq", type=int, default=1000, help="T of the peak-RSS check (default 1000)")
    p.add_argument("--mem-batch", type=int, default=32)
    p.add_argument("--mem-hidden", type=int, default=256)
    p.add_argument("--no-mem", action="store_true", help="skip the peak-RSS check")
    p.add_argument("--only", choices=SIDES, help="run one side only")
    p.add_argument("--budget", type=float, default=12.0,
                   help="minutes for the timing sweep (default 12): shapes run cheapest first, and "
                        "a shape whose estimated time would pass the budget is skipped and listed")
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
    sides = (a.only,) if a.only else SIDES
    script = os.path.abspath(__file__)
    T = a.seq

    monitor = hx.LoadMonitor()
    workers = {side: hx.Worker(script, side, a.threads) for side in sides}
    for side, w in workers.items():
        if not w.alive:
            print(f"NOTE: the {side} side cannot run, showing the other side only:\n  "
                  f"{w.error.strip()}", file=sys.stderr)
    live = [s for s in sides if workers[s].alive]
    if not live:
        print("nothing to run: no side could start", file=sys.stderr)
        return 1

    sgemm = [workers[live[0]].call({"op": "sgemm"})["gflops"]]
    t_start = time.time()
    results, skipped = [], []
    rate = {}  # cell -> slowest side's achieved GFLOP/s on its last shape (for the budget)
    shapes = sorted(((c, b, h) for c in cells for b in batches for h in hiddens),
                    key=lambda s: hx.step_flops(s[0], T, s[1], a.input_size or s[2], s[2]))
    for n, (cell, B, H) in enumerate(shapes):
        I = a.input_size or H
        flops = hx.step_flops(cell, T, B, I, H)
        one = flops / (rate[cell] * 1e9) if cell in rate else 0.0
        calls, rounds = plan_rounds(one, repeats)
        estimate = len(live) * one * (1 + calls * rounds)  # warm-up + timed calls, every side
        if time.time() - t_start + estimate > 60 * a.budget:
            skipped.append((cell, B, H))
            print(f"  skip {cell} B={B} H={H}: ~{estimate:.0f} s would pass --budget "
                  f"{a.budget} min", file=sys.stderr)
            continue
        shape = {"cell": cell, "T": T, "B": B, "I": I, "H": H}
        shape_monitor = hx.LoadMonitor(pids=[workers[s].pid for s in live])
        times = bench_shape(workers, shape, repeats, first=n % 2)
        shape_load = shape_monitor.stop()
        row = {**shape, "flops": flops, "times": times,
               "others": shape_load and shape_load["other_processes_cores"]}
        for side in SIDES:
            t = hx.median(times.get(side) or [])
            row[f"{side}_s"] = t
            row[f"{side}_gflops"] = flops / t / 1e9 if t else None
        row["ratio"] = (row["torch_s"] / row["ours_s"]) if row["torch_s"] and row["ours_s"] else None
        best = {side: min(times.get(side) or [0.0]) for side in SIDES}
        row["ratio_best"] = best["torch"] / best["ours"] if best["torch"] and best["ours"] else None
        rates = [row[f"{s}_gflops"] for s in SIDES if row[f"{s}_gflops"]]
        if rates:
            rate[cell] = min(rates)
        results.append(row)
        print(f"[{time.time() - t_start:6.0f}s] {cell:8s} B={B:<4d} H={H:<5d} torch "
              f"{hx.fmt(row['torch_s'] and row['torch_s'] * 1e3)} ms  ours "
              f"{hx.fmt(row['ours_s'] and row['ours_s'] * 1e3)} ms  ratio {hx.fmt(row['ratio'])}",
              file=sys.stderr, flush=True)
    results.sort(key=lambda r: (cells.index(r["cell"]), r["B"], r["H"]))
    for side in live:
        if workers[side].alive:
            sgemm.append(workers[side].call({"op": "sgemm"})["gflops"])
            break
    info = {s: w.ready for s, w in workers.items() if w.alive}
    for w in workers.values():
        w.close()

    mem = []
    if not a.no_mem:
        I = a.input_size or a.mem_hidden
        mem = measure_memory(script, live, cells, a.mem_batch, a.mem_hidden, I, a.mem_seq, a.threads)
    load = monitor.stop()

    peak = max(sgemm)
    print(f"\nOne training step (forward + backward, dx and all parameter grads), float32, "
          f"T={T}, I={'H' if not a.input_size else a.input_size}, {a.threads} threads; "
          f"median of alternating runs.\nratio = torch time / our time (>1: bptt is faster); best = the same "
          f"ratio of the fastest runs (steadier when other processes load the machine). "
          f"GFLOP/s counts GEMM flops 6*T*B*G*H*(I+H).\nnumpy SGEMM 2048^3 float32: "
          f"{' / '.join(f'{g:.0f}' for g in sgemm)} GFLOP/s (start / end); %sgemm uses {peak:.0f}.\n"
          f"{hx.load_note(load)}; 'others' = the same, cores, while that row ran.\n")
    rows = [[r["cell"], r["B"], r["H"], hx.fmt(r["torch_s"] and r["torch_s"] * 1e3, ".4g"),
             hx.fmt(r["ours_s"] and r["ours_s"] * 1e3, ".4g"), hx.fmt(r["ratio"], ".2f"),
             hx.fmt(r["ratio_best"], ".2f"),
             hx.fmt(r["torch_gflops"], ".1f"), hx.fmt(r["ours_gflops"], ".1f"),
             hx.fmt(r["torch_gflops"] and 100 * r["torch_gflops"] / peak, ".0f"),
             hx.fmt(r["ours_gflops"] and 100 * r["ours_gflops"] / peak, ".0f"),
             len(r["times"].get("ours") or r["times"].get("torch") or []),
             hx.fmt(r["others"], ".1f")]
            for r in results]
    print(hx.table(["cell", "B", "H", "torch ms", "ours ms", "ratio", "best", "GF/s torch", "GF/s ours",
                    "%sgemm torch", "%sgemm ours", "runs", "others"], rows))
    summary = {}
    for cell in cells:
        ratios = [r["ratio"] for r in results if r["cell"] == cell and r["ratio"]]
        if ratios:
            summary[cell] = math.exp(sum(map(math.log, ratios)) / len(ratios))
    if skipped:
        print(f"\nskipped (over --budget {a.budget} min): "
              + ", ".join(f"{c} B={b} H={h}" for c, b, h in skipped))
    if summary:
        print("\ngeometric mean of ratio: " + ", ".join(f"{c} {v:.2f}" for c, v in summary.items()))
    if mem:
        print(f"\nPeak RSS of one training step at T={a.mem_seq}, B={a.mem_batch}, "
              f"H={a.mem_hidden} (fresh process each; MiB; 'step' = rise of the peak during the step)\n")
        mrows = [[m["cell"]] + sum([[hx.fmt(m.get(s) and m[s]["peak_mb"], ".0f"),
                                     hx.fmt(m.get(s) and m[s]["step_mb"], ".0f")] for s in SIDES], [])
                 for m in mem]
        print(hx.table(["cell", "torch peak", "torch step", "ours peak", "ours step"], mrows))
    path = hx.save_json("bench_cells", {
        "machine": hx.machine_info(a.threads), "workers": info, "sgemm_gflops": sgemm,
        "T": T, "repeats": repeats, "results": results, "summary_geomean_ratio": summary,
        "memory": mem, "load": load, "skipped": skipped, "flops_formula": "6*T*B*G*H*(I+H)"})
    print(f"\nJSON: {os.path.relpath(path, hx.REPO_DIR)}")
    if a.plot:
        import plot
        png = plot.plot_cells(path)
        if png:
            print(f"PNG: {os.path.relpath(png, hx.REPO_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
