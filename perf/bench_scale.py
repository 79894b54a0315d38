#!/usr/bin/env python
"""Data-parallel scaling on one machine: the char-LM training of bench_train.py (embedding 128,
2-layer LSTM 256, batch 32 streams, TBPTT k1 = k2 = 50, Adam, clip 0.25, float32, cpu backend)
in 1 process with 2 threads against 2 MPI ranks with 1 thread each (``mpiexec -n 2``, each
rank 16 of the 32 streams, one gradient allreduce per update: bptt.data_parallel); 1 process
with 1 thread is the baseline of both.

Every run is a fresh process (or pair of ranks), the two variants alternating; a run trains
``--warmup`` untimed updates, then ``--steps`` timed ones. A step's time is the wall time
between consecutive updates on rank 0; tokens/s = batch * k1 / median step time (tokens of all
ranks). comm ms: the median of the trainer's ``comm_s`` (packing the gradients, the allreduce
and the wait for the slower rank in it, unpacking), and its share of the median update;
allreduce alone: after training, the median of 30 bare allreduces of a buffer of the gradients'
size (the transport's own cost). Thread settings: every pool (OpenBLAS, Numba, the cpu
backend's BPTT_NUM_THREADS) at 2 for the single process, at 1 per rank.

Prints a table; writes JSON to perf/results/bench_scale-<time>.json.
"""

import argparse
import json
import os
import shutil
import sys
import time

import _harness as hx
from bench_train import add_run_arguments

VARIANTS = {"1 process x 2 threads": (1, 2), "2 ranks x 1 thread": (2, 1), "1 process x 1 thread": (1, 1)}


# =============================================================================================
# one run (a process, or each rank of one)
# =============================================================================================

def run(r):
    """Train on this process (a rank of mpiexec where r["ranks"] > 1); rank 0 prints the JSON."""
    import numpy as np

    import bptt
    from bench_train import load_tokens
    from bptt.distributed import mpi
    bptt.use_backend("cpu")
    comm = mpi() if r["ranks"] > 1 else None
    ids, V, _ = load_tokens(r["max_chars"])
    model = bptt.LanguageModel(V, r["embed"], r["hidden"], num_layers=r["layers"], dtype=np.float32, seed=0)
    trainer = bptt.Trainer(model, bptt.Adam(lr=r["lr"]), k1=r["k1"], clip_norm=r["clip"], comm=comm)
    stamps, comm_s, update_s, losses = [time.perf_counter()], [], [], []

    def record(event):
        stamps.append(time.perf_counter())
        comm_s.append(event["comm_s"])
        update_s.append(event["update_s"])
        losses.append(event["loss"])
    trainer.fit(ids, r["batch"], epochs=10 ** 6, max_steps=r["warmup"] + r["steps"], callbacks=(record,))
    bare = []
    if comm is not None:                                    # the allreduce alone, same buffer size
        buf = np.ones(sum(p.size for p in model.params.values()) + 4, np.float32)
        for _ in range(30):
            began = time.perf_counter()
            comm.allreduce_sum(buf, model.backend)
            bare.append(time.perf_counter() - began)
    if comm is None or comm.rank == 0:
        w = r["warmup"]
        print(json.dumps({"step_s": [b - a for a, b in zip(stamps, stamps[1:])][w:], "comm_s": comm_s[w:],
                          "update_s": update_s[w:], "allreduce_s": bare, "loss_first": losses[0],
                          "loss_last": losses[-1], "gradient_bytes": 4 * model.num_parameters()}))


# =============================================================================================
# parent side
# =============================================================================================

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--quick", action="store_true", help="2 rounds of 1 + 8 updates")
    p.add_argument("--run", help=argparse.SUPPRESS)          # one run's request (JSON)
    a = p.parse_args(argv)
    if a.run:
        run(json.loads(a.run))
        return 0
    if a.quick:
        a.rounds, a.warmup, a.steps = 2, 1, 8
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = mpiexec if os.access(mpiexec, os.X_OK) else shutil.which("mpiexec")
    if mpiexec is None:
        p.error("no mpiexec: pip install 'bptt[mpi]'")

    script = os.path.abspath(__file__)
    base = {"batch": a.batch, "k1": a.k1, "embed": a.embed, "hidden": a.hidden, "layers": a.layers, "lr": a.lr,
            "clip": a.clip, "warmup": a.warmup, "steps": a.steps, "max_chars": a.max_chars}
    runs = {name: [] for name in VARIANTS}
    t_start = time.time()
    monitor = hx.LoadMonitor()
    for k in range(a.rounds):
        names = list(VARIANTS)
        for name in names[k % len(names):] + names[:k % len(names)]:
            ranks, threads = VARIANTS[name]
            command = [sys.executable, script, "--run", json.dumps({**base, "ranks": ranks})]
            if ranks > 1:
                command = [mpiexec, "-n", str(ranks), *command]
            _, result, proc = hx.run_once(command, hx.child_env(threads))
            if result is None:
                sys.exit(f"{name}: the run failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
            runs[name].append(result)
            print(f"[{time.time() - t_start:5.0f}s] round {k + 1} {name:22s} "
                  f"{a.batch * a.k1 / hx.median(result['step_s']):8.0f} tokens/s", file=sys.stderr, flush=True)
    load = monitor.stop()

    tokens = a.batch * a.k1
    summary = {}
    for name, results in runs.items():
        step = hx.median([hx.median(r["step_s"]) for r in results])
        comm = hx.median([hx.median(r["comm_s"]) for r in results])
        bare = [hx.median(r["allreduce_s"]) for r in results if r["allreduce_s"]]
        summary[name] = {"step_s": step, "tokens_per_s": tokens / step, "comm_s": comm,
                         "comm_share": comm / hx.median([hx.median(r["update_s"]) for r in results]),
                         "allreduce_s": hx.median(bare) if bare else None,
                         "per_round_tokens_per_s": [tokens / hx.median(r["step_s"]) for r in results],
                         "loss_first": results[0]["loss_first"], "loss_last": results[0]["loss_last"]}
    single = summary["1 process x 1 thread"]["tokens_per_s"]
    gradient_bytes = runs["2 ranks x 1 thread"][0]["gradient_bytes"]
    print(f"\nChar-level LM training: embedding {a.embed}, {a.layers}-layer LSTM {a.hidden}, batch {a.batch} "
          f"(all ranks), TBPTT k1=k2={a.k1}, Adam, clip {a.clip}, float32, cpu backend; gradients "
          f"{gradient_bytes / 1e6:.2f} MB per update.\nMedian over {a.rounds} alternating fresh runs of the "
          f"median of {a.steps} updates (after {a.warmup} untimed). speedup = tokens/s / that of 1 "
          f"process x 1 thread.\n{hx.load_note(load)}\n")
    rows = [[name, hx.fmt(s["tokens_per_s"], ".0f"),
             " ".join(hx.fmt(x, ".0f") for x in s["per_round_tokens_per_s"]), hx.fmt(s["step_s"] * 1e3, ".1f"),
             hx.fmt(s["comm_s"] * 1e3, ".2f"), hx.fmt(100 * s["comm_share"], ".1f"),
             hx.fmt(s["allreduce_s"] and s["allreduce_s"] * 1e3, ".2f"), hx.fmt(s["tokens_per_s"] / single, ".2f"),
             hx.fmt(s["loss_last"], ".3f")]
            for name, s in summary.items()]
    print(hx.table(["variant", "tokens/s", "per round", "step ms", "comm ms", "comm %", "allreduce alone ms",
                    "speedup", "last loss"], rows))
    path = hx.save_json("bench_scale", {"machine": hx.machine_info(2), "args": vars(a), "summary": summary,
                                        "runs": runs, "load": load})
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
