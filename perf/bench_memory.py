#!/usr/bin/env python
"""Memory-efficient BPTT: the peak memory and the time of one full-BPTT update against the
sequence length T, for ``bptt.Trainer(..., memory=None | "sqrt" | budget)``.

    python perf/bench_memory.py                       # T = 100 .. 10,000, both models, all settings
    python perf/bench_memory.py --quick               # a smoke run: T = 100, 300, 1 round
    python perf/bench_memory.py --T 1000 --models seq --rounds 5
    python perf/bench_memory.py --long                # one sequence of 100,000 steps, B = 1

Models (float32, cpu backend, ``--threads`` 2): a 2-layer LSTM, H = 256, B = 32 streams, as

  seq   a SequenceModel with every-step regression (I = O = 32, MSE; B sequences of T steps)
  lm    a LanguageModel over a vocabulary of 64 (embedding 32; B streams of T + 1 tokens)

trained with full BPTT and SGD: one update = forward and backward over one window of T steps.
Settings: ``none`` (every activation kept), ``sqrt`` and three budgets (``--budgets``, default
64M, 32M, 20M). Every (model, T, setting) runs in a FRESH process, which

1. builds the model and the trainer and makes one warm-up update on 16 steps (Numba compiles
   or loads its kernels, the optimizer and gradient buffers are made);
2. makes one update on T steps under ``tracemalloc`` (it sees NumPy's buffers): the
   *update peak* is the largest amount of memory allocated during that update and not yet
   freed (the activations and recomputed segments, the gate-gradient scratch, the batch the
   trainer copies, temporaries); *activations* = the update peak less that copy of the batch
   (seq: x and targets, 2 x 4 KiB per step; lm: nothing subtracted, its ids are copied a
   piece at a time);
3. times ``--updates`` more updates (median), not traced;
4. reports the process's peak RSS (``resource.getrusage`` ru_maxrss: the interpreter, NumPy,
   Numba and the kernels' machine code are ~150-250 MiB of it).

At ``--target-T`` (1000) the settings alternate over ``--rounds`` rounds (the order rotated per
round; each round a fresh process per setting) and the times are the medians over all of them;
other T values get one round. A budget the library finds infeasible for (model, T) is skipped
with its one-line reason. ``none`` runs only where its update peak, extrapolated linearly from
the largest T measured so far, stays under ``--max-none-mb`` (default 4096); otherwise the row
shows that estimate ("est.") and no time.

Printed: the CPU model (lscpu), the load other processes put on the machine, a table per model
(T, setting, update peak MiB, activations MiB, % of none's activations, peak RSS MiB,
ms/update, time ratio to none's), and the targets: at T = 1000, ``sqrt``'s activations <= 5% of
``none``'s and its time <= 1.25x (alternating rounds); every budget honoured: activations <=
budget + the fixed overhead of docs/memory.md that an update allocates (one set of parameter
gradients and the carried state: :func:`fixed_overhead`). Writes perf/results/bench_memory-<time>.json and, with matplotlib (the ``plot``
extra), a PNG of the memory/time trade-off beside it.

``--long``: one sequence of 100,000 steps (B = 1, seq model, H = 256, 2 layers), full BPTT with
``memory="sqrt"`` in a fresh process: peak RSS, update peak and time of one update. ``none`` is
not run there: its update peak is measured at T = 1000, 3000, 10,000 (B = 1) and extrapolated
linearly to 100,000 steps (the peak RSS likewise).
"""

import argparse
import json
import os
import sys
import time

import _harness as hx
from bench_lengths import cpu_model

MODELS = {"seq": "SequenceModel, every-step regression, I = O = 32",
          "lm": "LanguageModel, vocabulary 64, embedding 32"}
HIDDEN, LAYERS, BATCH, INPUT, VOCAB, EMBEDDING = 256, 2, 32, 32, 64, 32
WARMUP_T = 16
DEFAULT_T = [100, 300, 1000, 3000, 10000]
DEFAULT_BUDGETS = ["64M", "32M", "20M"]     # a budget holds one time block (16 steps) at least
LONG_T, LONG_PROBES = 100_000, [1000, 3000, 10000]
SQRT_PEAK_TARGET, SQRT_TIME_TARGET = 0.05, 1.25
MIB = 2 ** 20


# =============================================================================================
# one measurement, in its own process
# =============================================================================================

def parse_memory(setting):
    """:func:`bptt.memory.parse_memory` of a setting (bptt is imported when first needed)."""
    from bptt.memory import parse_memory
    return parse_memory(setting)


def build(np, bptt, spec):
    """(trainer, data(T)) for the spec's model, memory setting and batch: ``data(T)`` makes one
    epoch of one update over T steps."""
    memory = None if spec["memory"] == "none" else parse_memory(spec["memory"])
    B, rng = spec["batch"], np.random.default_rng(0)
    common = dict(num_layers=LAYERS, cell="lstm", dtype=np.float32, seed=0)
    if spec["model"] == "lm":
        model = bptt.LanguageModel(VOCAB, EMBEDDING, HIDDEN, **common)

        def data(T):
            return rng.integers(0, VOCAB, B * (T + 1))           # B streams of T + 1 tokens
    else:
        model = bptt.SequenceModel(INPUT, HIDDEN, INPUT, **common)

        def data(T):
            return (rng.standard_normal((B, T, INPUT), dtype=np.float32),
                    rng.standard_normal((B, T, INPUT), dtype=np.float32))
    return bptt.Trainer(model, bptt.SGD(1e-3), memory=memory), data


def measure(spec):
    """{"peak_mb", "rss_mb", "times_s", ...} of one update over spec["T"] steps (see the module
    docstring), or {"infeasible": the library's message}."""
    import tracemalloc
    import numpy as np
    import bptt
    bptt.use_backend("cpu")
    hx.pin_threads(spec["threads"])
    trainer, data = build(np, bptt, spec)

    def update(batch):
        trainer.fit(batch, spec["batch"], epochs=trainer.epoch + 1)    # one epoch = one update

    batch = data(spec["T"])
    try:
        update(data(WARMUP_T))
        rss_before = hx.peak_rss_mb()
        tracemalloc.start()
        update(batch)
    except ValueError as e:                  # an infeasible budget: one line from the library
        return {"infeasible": str(e)}
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    times = hx.time_calls(lambda: update(batch), spec["updates"])
    # the trainer's time-major copy of the batch (seq: x [T,B,I] and targets [T,B,O]) lives through
    # the update; with B = 1 the transpose is contiguous already and nothing is copied
    batch_bytes = 0 if spec["model"] != "seq" else \
        sum(a.nbytes for a in batch if not np.moveaxis(a, 0, 1).flags.c_contiguous)
    return {"peak_mb": peak / MIB, "activations_mb": (peak - batch_bytes) / MIB, "rss_mb": hx.peak_rss_mb(),
            "rss_before_mb": rss_before, "times_s": times, "steps": trainer.step,
            "overhead_bytes": fixed_overhead(trainer.model, spec["batch"])}


def run_fresh(spec, threads):
    """:func:`measure` in a fresh process (one JSON line back)."""
    argv = [sys.executable, os.path.abspath(__file__), "--measure", json.dumps({**spec, "threads": threads})]
    wall, result, proc = hx.run_once(argv, hx.child_env(threads), timeout=3600)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"{spec}: the measuring process failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return {**spec, **result, "process_wall_s": wall}


# =============================================================================================
# the sweep
# =============================================================================================

def none_estimate(rows, T):
    """{"peak_mb", "activations_mb"} of ``none`` at T extrapolated linearly (through the origin)
    from the largest T measured for it, or None where none was measured."""
    measured = [r for r in rows if r["memory"] == "none" and not r.get("estimated") and "peak_mb" in r]
    if not measured:
        return None
    last = max(measured, key=lambda r: r["T"])
    return {key: last[key] * T / last["T"] for key in ("peak_mb", "activations_mb")}


def sweep(model, Ts, settings, a):
    """Rows of one model: every T and setting (``none`` first), alternating rounds at the target T."""
    rows = []
    for T in Ts:
        todo = list(settings)
        estimate = none_estimate(rows, T)
        if "none" in todo and estimate is not None and estimate["peak_mb"] > a.max_none_mb:
            todo.remove("none")
            rows.append({"model": model, "T": T, "memory": "none", "estimated": True, **estimate})
        rounds = a.rounds if T == a.target_T else 1
        runs = {s: [] for s in todo}
        for k in range(rounds):
            order = todo[k % len(todo):] + todo[:k % len(todo)] if k else todo
            for setting in order:
                if runs[setting] and "infeasible" in runs[setting][0]:
                    continue
                spec = {"model": model, "T": T, "memory": setting, "batch": BATCH,
                        "updates": a.updates if T < 3000 else max(1, a.updates // 2)}
                runs[setting].append(run_fresh(spec, a.threads))
                print(f"  {model} T={T} {setting}: " + describe(runs[setting][-1]), file=sys.stderr)
        for setting in todo:
            first = runs[setting][0]
            if "infeasible" in first:
                rows.append({"model": model, "T": T, "memory": setting, "infeasible": first["infeasible"]})
                continue
            times = [t for r in runs[setting] for t in r["times_s"]]
            rows.append({"model": model, "T": T, "memory": setting, "peak_mb": first["peak_mb"],
                         "activations_mb": first["activations_mb"], "rss_mb": max(r["rss_mb"] for r in runs[setting]),
                         "median_s": hx.median(times), "times_s": times, "rounds": len(runs[setting]),
                         "overhead_bytes": first["overhead_bytes"]})
    return rows


def describe(run):
    if "infeasible" in run:
        return f"infeasible: {run['infeasible']}"
    return (f"update peak {run['peak_mb']:.1f} MiB, peak RSS {run['rss_mb']:.0f} MiB, "
            f"{hx.median(run['times_s']) * 1e3:.0f} ms/update")


def budget_bytes(setting):
    value = None if setting == "none" else parse_memory(setting)
    return value if isinstance(value, int) else None


def fixed_overhead(model, batch_size):
    """Bytes an update may allocate beside what a budget counts, of what docs/memory.md lists as
    the fixed overhead (the batch is left out of the activations already; the parameters and
    the optimizer's state exist before the update): one set of parameter gradients and the
    carried state."""
    from bptt.memory import state_bytes
    return sum(int(p.nbytes) for p in model.params.values()) + state_bytes(model, batch_size)


TABLE = ["T", "memory", "update peak MiB", "activations MiB", "% of none", "peak RSS MiB", "ms/update", "x none"]


def table_rows(rows):
    """Formatted rows of TABLE (one model's rows), with the share of the activations and the
    time ratio against ``none`` of the same T."""
    out = []
    for r in rows:
        if "infeasible" in r:
            out.append([r["T"], r["memory"], "infeasible", "", "", "", "", ""])
            continue
        base = next((b for b in rows if b["T"] == r["T"] and b["memory"] == "none"), None)
        est = " est." if r.get("estimated") or (base and base.get("estimated")) else ""
        share = 100 * r["activations_mb"] / base["activations_mb"] if base else None
        ratio = r["median_s"] / base["median_s"] if base and base.get("median_s") and r.get("median_s") else None
        out.append([r["T"], r["memory"], hx.fmt(r["peak_mb"], ".1f") + (" est." if r.get("estimated") else ""),
                    hx.fmt(r["activations_mb"], ".1f"), hx.fmt(share, ".1f") + (est if share else ""),
                    hx.fmt(r.get("rss_mb"), ".0f"), hx.fmt(r.get("median_s") and r["median_s"] * 1e3, ".0f"),
                    hx.fmt(ratio, ".2f")])
    return out


def targets(rows, target_T):
    """[(what, measured, target, met)] of the request's targets on these rows."""
    checks = []
    by = {(r["model"], r["T"], r["memory"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        none, sqrt = by.get((model, target_T, "none")), by.get((model, target_T, "sqrt"))
        if none and sqrt and "median_s" in none and "median_s" in sqrt:
            share = sqrt["activations_mb"] / none["activations_mb"]
            checks.append((f"{model} T={target_T}: sqrt activations / none's", f"{100 * share:.1f}%",
                           f"<= {100 * SQRT_PEAK_TARGET:.0f}%", share <= SQRT_PEAK_TARGET))
            ratio = sqrt["median_s"] / none["median_s"]
            checks.append((f"{model} T={target_T}: sqrt time / none's ({sqrt['rounds']} alternating rounds)",
                           f"{ratio:.2f}x", f"<= {SQRT_TIME_TARGET}x", ratio <= SQRT_TIME_TARGET))
    for r in rows:
        budget = budget_bytes(r["memory"])
        if budget is None or "infeasible" in r:
            continue
        overhead = r["overhead_bytes"]
        limit = (budget + overhead) / MIB
        checks.append((f"{r['model']} T={r['T']}: budget {r['memory']} (+ overhead {overhead / MIB:.1f} MiB)",
                       f"{r['activations_mb']:.1f} MiB", f"<= {limit:.1f} MiB", r["activations_mb"] <= limit))
    return checks


def plot(rows, path):
    """memory (left) and time (right) against T per setting, one row of panels per model."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for (ax_mem, ax_time), model in zip(axes, models):
        for setting in dict.fromkeys(r["memory"] for r in rows):
            mine = [r for r in rows if r["model"] == model and r["memory"] == setting and "infeasible" not in r]
            measured = [r for r in mine if not r.get("estimated")]
            line, = ax_mem.plot([r["T"] for r in measured], [r["activations_mb"] for r in measured], "o-",
                                label=setting)
            estimated = [r for r in mine if r.get("estimated")]
            if estimated:
                ax_mem.plot([r["T"] for r in estimated], [r["activations_mb"] for r in estimated], "x--",
                            color=line.get_color())
            ax_time.plot([r["T"] for r in measured], [r["median_s"] * 1e3 for r in measured], "o-", label=setting)
        ax_mem.set(xscale="log", yscale="log", xlabel="T (steps of the window)", ylabel="activations (MiB)",
                   title=f"{model}: memory of one update (x: extrapolated)")
        ax_time.set(xscale="log", yscale="log", xlabel="T (steps of the window)", ylabel="ms / update",
                    title=f"{model}: time of one update")
        for ax in (ax_mem, ax_time):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(title="memory=")
    fig.suptitle(f"Full BPTT, 2-layer LSTM H={HIDDEN}, B={BATCH}, float32, cpu backend")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def long_run(a):
    """The 100,000-step sequence with memory="sqrt", and ``none``'s need extrapolated."""
    base = {"model": "seq", "batch": 1, "updates": 1}
    probes = []
    for T in LONG_PROBES:
        probes.append(run_fresh({**base, "T": T, "memory": "none"}, a.threads))
        print(f"  long: none at T={T}: " + describe(probes[-1]), file=sys.stderr)
    sqrt = run_fresh({**base, "T": a.long_T, "memory": "sqrt"}, a.threads)
    print(f"  long: sqrt at T={a.long_T}: " + describe(sqrt), file=sys.stderr)
    # least squares line through the probes: peak = a + b T, RSS likewise
    import numpy as np
    Ts = np.array([p["T"] for p in probes], float)
    fit = {key: np.polyfit(Ts, [p[key] for p in probes], 1).tolist() for key in ("peak_mb", "activations_mb", "rss_mb")}
    none = {key: fit[key][0] * a.long_T + fit[key][1] for key in fit}
    return {"probes": probes, "sqrt": sqrt, "none_fit": fit, "none_extrapolated": none}


def print_long(result, T):
    sqrt, none = result["sqrt"], result["none_extrapolated"]
    probes = ", ".join(f"T={p['T']}: {p['peak_mb']:.0f} MiB" for p in result["probes"])
    print(f"\nOne sequence of {T:,} steps, B=1, 2-layer LSTM H={HIDDEN}, full BPTT (seq model):")
    print(hx.table(["memory", "update peak MiB", "activations MiB", "peak RSS MiB", "s/update"], [
        ["sqrt", f"{sqrt['peak_mb']:.1f}", f"{sqrt['activations_mb']:.1f}", f"{sqrt['rss_mb']:.0f}",
         f"{hx.median(sqrt['times_s']):.1f}"],
        ["none (extrapolated)", f"{none['peak_mb']:.0f}", f"{none['activations_mb']:.0f}", f"{none['rss_mb']:.0f}",
         "-"]]))
    print(f"none: update peak measured at {probes} (B=1), extrapolated linearly to {T:,} steps "
          f"({none['peak_mb'] / 1024:.2f} GiB; peak RSS {none['rss_mb'] / 1024:.2f} GiB)\n"
          f"target: sqrt's peak RSS < 1 GiB: {'met' if sqrt['rss_mb'] < 1024 else 'NOT met'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=hx.parse_int_list, default=DEFAULT_T, help="window lengths (default 100,...,10000)")
    p.add_argument("--models", type=hx.parse_str_list, default=list(MODELS), help="seq,lm (default both)")
    p.add_argument("--budgets", type=hx.parse_str_list, default=DEFAULT_BUDGETS, help="default 64M,32M,20M")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds at --target-T (default 3)")
    p.add_argument("--target-T", type=int, default=1000, help="T of the sqrt targets (default 1000)")
    p.add_argument("--updates", type=int, default=3, help="timed updates per process (half from T = 3000)")
    p.add_argument("--max-none-mb", type=float, default=4096, help="run none only below this estimated peak")
    p.add_argument("--threads", type=int, default=hx.DEFAULT_THREADS)
    p.add_argument("--quick", action="store_true", help="smoke run: T = 100, 300, one round, one update")
    p.add_argument("--long", action="store_true", help="instead: the 100,000-step sequence (B = 1)")
    p.add_argument("--long-T", type=int, default=LONG_T, help=argparse.SUPPRESS)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.measure:
        print(json.dumps(measure(json.loads(a.measure))))
        return 0
    bad = [m for m in a.models if m not in MODELS]
    if bad:
        p.error(f"--models: unknown {bad}; choose from {', '.join(MODELS)}")
    if a.quick:
        a.T, a.rounds, a.updates, a.target_T = [100, 300], 1, 1, 300
    cpu = cpu_model()
    print(f"CPU: {cpu}; {a.threads} threads; 2-layer LSTM H={HIDDEN}, B={BATCH}, float32, cpu backend, full BPTT",
          file=sys.stderr)
    monitor = hx.LoadMonitor()
    began = time.perf_counter()
    payload = {"machine": {**hx.machine_info(a.threads), "lscpu_model": cpu}}
    if a.long:
        result = long_run(a)
        payload.update(long=result, load=monitor.stop())
        print(f"\nCPU: {cpu}; {a.threads} threads\n{hx.load_note(payload['load'])}")
        print_long(result, a.long_T)
        print(f"JSON: {os.path.relpath(hx.save_json('bench_memory_long', payload), hx.REPO_DIR)}")
        return 0

    settings = ["none", "sqrt", *a.budgets]
    rows = [r for model in a.models for r in sweep(model, a.T, settings, a)]
    load = monitor.stop()
    print(f"\nCPU: {cpu}\nOne full-BPTT update over T steps (SGD), 2-layer LSTM H={HIDDEN}, B={BATCH}, float32, "
          f"cpu backend, {a.threads} threads; a fresh process per (model, T, setting); {a.rounds} alternating "
          f"rounds at T={a.target_T}, 1 elsewhere; {time.perf_counter() - began:.0f} s in all.\n{hx.load_note(load)}")
    for model in a.models:
        print(f"\n{model}: {MODELS[model]}")
        print(hx.table(TABLE, table_rows([r for r in rows if r["model"] == model])))
        for r in rows:
            if r["model"] == model and "infeasible" in r:
                print(f"  T={r['T']} {r['memory']}: infeasible: {r['infeasible']}")
    checks = targets(rows, a.target_T)
    if checks:
        print()
        print(hx.table(["target", "measured", "target", "met"],
                       [[w, m, t, "met" if ok else "NOT met"] for w, m, t, ok in checks]))
    payload.update(rows=rows, load=load, targets=[dict(zip(("what", "measured", "target", "met"), c)) for c in checks],
                   settings=settings, target_T=a.target_T, rounds=a.rounds)
    path = hx.save_json("bench_memory", payload)
    print(f"\nJSON: {os.path.relpath(path, hx.REPO_DIR)}")
    if not a.no_plot:
        png = plot(rows, path[:-len(".json")] + ".png")
        print(f"PNG: {os.path.relpath(png, hx.REPO_DIR)}" if png
              else "PNG: not drawn (no matplotlib: pip install 'bptt[plot]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
