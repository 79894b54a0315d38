#!/usr/bin/env python
"""Variable-length batches: one training step of a recurrent layer with ``lengths``, float32.

A step is forward over a batch x [T, B, I] of sequences padded to T, then backward with the
gradients of every parameter and of x, given a fixed random dy; gradients are reset before
each step. The lengths are uniform in ``--min-length``..T with one row set to T, so that T is
max(lengths) and every variant below sees the same x:

  ours           bptt layer, ``forward(x, lengths=lengths)`` (each row runs its own steps)
  ours_full      bptt layer without lengths (every row all T = max(lengths) steps)
  ours_bidi      bptt layer with ``bidirectional=True``, with lengths
  torch_packed   torch.nn: pack_padded_sequence(x, lengths, enforce_sorted=False) -> module ->
                 pad_packed_sequence (the packing and unpacking are part of the step)
  torch_padded   torch.nn over the padded x, no lengths (all T steps)

Targets (printed with the measured ratio): ours within 10% of ours_full; torch_packed >= 2x
ours; torch_padded >= ours; ours_bidi <= 2.1x ours.

Every variant runs in its own long-lived process with the same thread count (``--threads``,
default 2: torch.set_num_threads and the OMP/OpenBLAS/Numba pools) and the same malloc
settings (``--malloc``: by default those that ``bptt.Trainer`` applies when training starts,
bptt_kernels/cpu/_memory.py, in every variant's process, torch's too), after a warm-up (the
first step also pays Numba's compile or cache load); then ``--rounds`` rounds, each timing
every variant alone in turn (the order rotates per round), ~0.3 s of calls each; the time
is the median over all timed calls. Prints the CPU model (lscpu), a table per cell, and
writes JSON to perf/results/bench_lengths-<time>.json.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import time

import _harness as hx

VARIANTS = ("ours", "ours_full", "ours_bidi", "torch_packed", "torch_padded")
# (name, numerator variant, denominator variant, target text, check of the ratio)
RATIOS = [
    ("lengths cost: ours / ours_full", "ours", "ours_full", "<= 1.10", lambda r: r <= 1.10),
    ("torch_packed / ours", "torch_packed", "ours", ">= 2", lambda r: r >= 2.0),
    ("torch_padded / ours", "torch_padded", "ours", ">= 1", lambda r: r >= 1.0),
    ("bidirectional: ours_bidi / ours", "ours_bidi", "ours", "<= 2.1", lambda r: r <= 2.1),
]


def batch_lengths(np, T, B, min_length, seed):
    """Host int64 lengths [B], uniform in min_length..T, row 0 set to T (T = max(lengths))."""
    lengths = np.random.default_rng(seed).integers(min_length, T + 1, B)
    lengths[0] = T
    return lengths


# =============================================================================================
# worker side: builds one variant's layer and times its training step
# =============================================================================================

def keep_freed_memory():
    """Apply to this process the malloc settings that ``bptt.Trainer`` applies when training
    starts (``keep_freed_memory`` of kernels/cpu/_memory.py, loaded alone, so that a torch
    process imports no Numba); True if they took effect."""
    spec = importlib.util.spec_from_file_location(
        "bptt_memory_settings", os.path.join(hx.REPO_DIR, "kernels", "cpu", "_memory.py"))
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    return memory.keep_freed_memory()


class Variant:
    """One variant's layer and step for a shape {"cell", "T", "B", "I", "H", "min_length"}."""

    def __init__(self, name):
        self.name = name

    def setup(self):
        self.np = hx.require("numpy", "bench_lengths")
        malloc = {"trainer_malloc": os.environ.get("BENCH_MALLOC") == "trainer" and keep_freed_memory()}
        if self.name.startswith("torch"):
            self.torch = hx.require("torch", "bench_lengths (torch side)")
            hx.pin_threads(int(os.environ["OMP_NUM_THREADS"]))
            return {"torch": self.torch.__version__, "torch_threads": self.torch.get_num_threads(),
                    **malloc}
        bptt = hx.require("bptt", "bench_lengths (ours)")
        self.bptt = bptt
        bptt.use_backend(os.environ.get("BPTT_BACKEND", "cpu"))
        hx.pin_threads(int(os.environ["OMP_NUM_THREADS"]))
        return {"backend": bptt.get_backend().NAME, "numpy": self.np.__version__, **malloc}

    def build(self, cell, T, B, I, H, min_length):
        np = self.np
        lengths = batch_lengths(np, T, B, min_length, seed=2)
        D = 2 if self.name == "ours_bidi" else 1
        rng = np.random.default_rng(1)
        x = rng.standard_normal((T, B, I), dtype=np.float32)
        dy = rng.standard_normal((T, B, D * H), dtype=np.float32)
        if self.name.startswith("torch"):
            return self._torch_step(cell, x, dy, None if self.name == "torch_padded" else lengths)
        ctor = {"lstm": self.bptt.LSTM, "gru": self.bptt.GRU}[cell]
        layer = ctor(I, H, dtype=np.float32, seed=0, bidirectional=D == 2)
        kw = {} if self.name == "ours_full" else {"lengths": lengths}

        def step():
            layer.zero_grad()
            _, _, cache = layer.forward(x, **kw)
            layer.backward(dy, cache)
        return step

    def _torch_step(self, cell, x, dy, lengths):
        torch = self.torch
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
        torch.manual_seed(0)
        T, B, I = x.shape
        layer = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](I, dy.shape[2])
        tx = torch.from_numpy(x).requires_grad_(True)
        tdy = torch.from_numpy(dy)
        tlengths = None if lengths is None else torch.from_numpy(lengths)
        params = list(layer.parameters())

        def step():
            for p in params:
                p.grad = None
            tx.grad = None
            if tlengths is None:
                y, _ = layer(tx)
            else:
                out, _ = layer(pack_padded_sequence(tx, tlengths, enforce_sorted=False))
                y, _ = pad_packed_sequence(out, total_length=T)
            y.backward(tdy)
        return step


class LengthsWorker:
    """Request handler: {"op": "steps", shape..., "warmup", "calls"} -> {"warmup", "times"}."""

    def __init__(self, name):
        self.variant = Variant(name)
        self.key, self.step = None, None

    def setup(self):
        return self.variant.setup()

    def handle(self, r):
        if r["op"] != "steps":
            raise ValueError(f"unknown op {r['op']!r}")
        key = (r["cell"], r["T"], r["B"], r["I"], r["H"], r["min_length"])
        if key != self.key:
            self.key, self.step = None, None        # free the previous shape's arrays first
            self.step = self.variant.build(*key)
            self.key = key
        return {"warmup": hx.time_calls(self.step, r["warmup"]), "times": hx.time_calls(self.step, r["calls"])}


# =============================================================================================
# parent side: alternates the variants, prints and saves
# =============================================================================================

def cpu_model():
    """The "Model name" line of lscpu (or the platform's processor string)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return hx.machine_info(0).get("cpu", "unknown")


def bench_cell(workers, shape, rounds, warmup):
    """{variant: [seconds...]} for one shape: warm-up on every worker, then ``rounds`` rounds
    timing each variant alone, the order rotating per round."""
    names = [n for n in VARIANTS if n in workers]
    estimate = 0.0
    for name in names:          # the warm-up, then one call to size the rounds
        reply = workers[name].call({"op": "steps", **shape, "warmup": warmup, "calls": 1})
        estimate = max(estimate, reply["times"][0])
    calls = max(1, min(20, int(round(0.3 / max(estimate, 1e-6)))))
    times = {name: [] for name in names}
    for k in range(rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            times[name] += workers[name].call({"op": "steps", **shape, "warmup": 0, "calls": calls})["times"]
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=hx.parse_str_list, default=["lstm", "gru"], help="lstm,gru (default both)")
    p.add_argument("--seq", type=int, default=100, help="T = max(lengths) (default 100)")
    p.add_argument("--batch", type=int, default=32, help="B (default 32)")
    p.add_argument("--hidden", type=int, default=256, help="H (default 256)")
    p.add_argument("--input-size", type=int, default=256, help="I (default 256)")
    p.add_argument("--min-length", type=int, default=10, help="shortest length drawn (default 10)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    p.add_argument("--threads", type=int, default=hx.DEFAULT_THREADS)
    p.add_argument("--malloc", choices=("trainer", "default"), default="trainer",
                   help="malloc settings of every variant's process: trainer (those bptt.Trainer "
                        "applies, the default) or default (glibc's own)")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        w = LengthsWorker(a.worker)
        hx.serve(w.setup, w.handle)
        return 0

    bad = [c for c in a.cells if c not in ("lstm", "gru")]
    if bad:
        p.error(f"--cells: unknown {bad}; choose from lstm, gru")
    if not 1 <= a.min_length <= a.seq:
        p.error(f"--min-length must be in [1, --seq = {a.seq}]; got {a.min_length}")
    script = os.path.abspath(__file__)
    cpu = cpu_model()
    print(f"CPU: {cpu}; {a.threads} threads; T={a.seq} B={a.batch} I={a.input_size} H={a.hidden}, "
          f"float32, lengths uniform in {a.min_length}..{a.seq}", file=sys.stderr)

    monitor = hx.LoadMonitor()
    workers = {name: hx.Worker(script, name, a.threads, env_extra={"BENCH_MALLOC": a.malloc})
               for name in VARIANTS}
    for name, w in workers.items():
        if not w.alive:
            print(f"NOTE: {name} cannot run: {w.error.strip()}", file=sys.stderr)
    live = {name: w for name, w in workers.items() if w.alive}
    if not live:
        print("nothing to run: no variant could start", file=sys.stderr)
        return 1

    results = []
    for cell in a.cells:
        shape = {"cell": cell, "T": a.seq, "B": a.batch, "I": a.input_size, "H": a.hidden,
                 "min_length": a.min_length}
        times = bench_cell(live, shape, a.rounds, a.warmup)
        medians = {name: hx.median(t) for name, t in times.items()}
        results.append({**shape, "times": times, "median_s": medians})
        print(f"  {cell}: " + ", ".join(f"{n} {m * 1e3:.1f} ms" for n, m in medians.items()), file=sys.stderr)
    info = {name: w.ready for name, w in live.items()}
    for w in live.values():
        w.close()
    load = monitor.stop()

    lengths = batch_lengths(hx.require("numpy", "bench_lengths"), a.seq, a.batch, a.min_length, seed=2)
    print(f"\nCPU: {cpu}\nOne training step (forward + backward, dx and all parameter grads), float32, "
          f"T={a.seq} B={a.batch} I={a.input_size} H={a.hidden}, {a.threads} threads; lengths uniform in "
          f"{a.min_length}..{a.seq} (mean {lengths.mean():.1f}, {lengths.sum() / (a.seq * a.batch):.0%} of the "
          f"padded steps); median of {a.rounds} alternating rounds; malloc settings: {a.malloc}."
          f"\n{hx.load_note(load)}\n")
    for r in results:
        m = r["median_s"]
        print(hx.table([f"{r['cell']}: variant", "ms", "runs"],
                       [[n, hx.fmt(m[n] and m[n] * 1e3, ".4g"), len(r["times"][n])] for n in m]))
        rows = []
        for what, num, den, target, ok in RATIOS:
            ratio = m[num] / m[den] if m.get(num) and m.get(den) else None
            rows.append([what, hx.fmt(ratio, ".2f"), target,
                         "-" if ratio is None else ("yes" if ok(ratio) else "NO")])
        print()
        print(hx.table(["ratio", "measured", "target", "met"], rows))
        print()
    path = hx.save_json("bench_lengths", {
        "machine": {**hx.machine_info(a.threads), "lscpu_model": cpu}, "workers": info,
        "lengths": lengths.tolist(), "rounds": a.rounds, "malloc": a.malloc, "results": results,
        "load": load})
    print(f"JSON: {os.path.relpath(path, hx.REPO_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
