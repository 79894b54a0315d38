#!/usr/bin/env python
"""The cost model of synchronous data-parallel training on N nodes (docs/distributed.md), with
the compute time of an update measured here.

Per update every node sends and receives the gradients once in a ring allreduce:
``t_allreduce(N) = 2 (N - 1) / N * bytes / bandwidth`` (bandwidth term only; add 2 (N - 1)
latencies of a few microseconds), bytes = 4 x parameters (float32). An update's compute time
``t_c`` (forward, backward, clipping, optimizer: one node's work on the whole batch) is
measured on this machine with bptt.Trainer (1 process, ``--threads`` threads, cpu backend,
``--updates`` timed updates after one untimed).

* strong scaling (the batch B fixed, B/N streams per node): compute t_c / N against
  t_allreduce(N); the allreduce is half the update from N* = 1 + t_c * bandwidth / (2 bytes);
  N cannot pass B (a stream per node), where the allreduce's share is at its largest.
* weak scaling (B streams per node, N B in all): compute t_c against t_allreduce(N) < 2 bytes /
  bandwidth; the allreduce reaches half the update only where 2 bytes / bandwidth > t_c, from
  N* = 1 / (1 - t_c * bandwidth / (2 bytes)).

Models: the char-LM of bench_train.py (embedding 128, 2-layer LSTM 256, the default corpus's
vocabulary, batch 32, k1 = 50) and Zaremba et al.'s large PTB model (2-layer LSTM 1500,
embedding 1500, vocabulary 10,000, batch 20, k1 = 35). Prints a table; writes JSON to
perf/results/distributed_cost-<time>.json.
"""

import argparse
import json
import math
import os
import sys
import time

import _harness as hx

MODELS = {   # name: (vocabulary (None: the char corpus's), embedding, hidden, layers, batch, k1)
    "char-LM, 2-layer LSTM 256": (None, 128, 256, 2, 32, 50),
    "Zaremba large, 2-layer LSTM 1500, V 10k": (10_000, 1500, 1500, 2, 20, 35),
}


def measure(vocab, embed, hidden, layers, batch, k1, updates):
    """(parameters, median seconds of an update) of bptt.Trainer on this model, cpu backend."""
    import numpy as np

    import bptt
    from bench_train import load_tokens
    bptt.use_backend("cpu")
    ids, V, _ = load_tokens(None)
    if vocab is not None:       # a word-level vocabulary: ids spread over it
        ids, V = np.random.default_rng(0).integers(0, vocab, batch * (k1 * (updates + 2) + 1)), vocab
    model = bptt.LanguageModel(V, embed, hidden, num_layers=layers, dtype=np.float32, seed=0)
    trainer = bptt.Trainer(model, bptt.Adam(lr=1e-3), k1=k1, clip_norm=0.25)
    stamps = []
    trainer.fit(ids, batch, epochs=10 ** 6, max_steps=updates + 1,
                callbacks=(lambda event: stamps.append(time.perf_counter()),))
    return model.num_parameters(), hx.median([b - a for a, b in zip(stamps, stamps[1:])])


def crossings(t_c, gradient_bytes, bandwidth):
    """(N* of strong scaling, N* of weak scaling or None): where the allreduce is half the update."""
    ratio = t_c * bandwidth / (2 * gradient_bytes)
    strong = 1 + ratio
    weak = 1 / (1 - ratio) if ratio < 1 else None
    return strong, weak


def allreduce_s(n, gradient_bytes, bandwidth):
    return 2 * (n - 1) / n * gradient_bytes / bandwidth


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gbit", type=float, default=100.0, help="network bandwidth per node, Gb/s (default 100)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--updates", type=int, default=3, help="timed updates per model (default 3)")
    p.add_argument("--measure", help=argparse.SUPPRESS)       # inside the child: one model
    a = p.parse_args(argv)
    if a.measure:
        params, update_s = measure(*MODELS[a.measure], a.updates)
        print(json.dumps({"parameters": params, "update_s": update_s}))
        return 0
    bandwidth = a.gbit * 1e9 / 8                              # bytes/s
    rows, results = [], {}
    for name in MODELS:
        _, out, proc = hx.run_once([sys.executable, os.path.abspath(__file__), "--measure", name,
                                    "--updates", str(a.updates)], hx.child_env(a.threads))
        if out is None:
            sys.exit(f"{name}: the measurement failed:\n{proc.stderr[-2000:]}")
        params, t_c = out["parameters"], out["update_s"]
        gradient_bytes = 4 * params
        strong, weak = crossings(t_c, gradient_bytes, bandwidth)
        n_strong = math.ceil(strong)
        batch = MODELS[name][4]
        at_b = allreduce_s(batch, gradient_bytes, bandwidth)
        share_at_b = at_b / (t_c / batch + at_b)
        results[name] = {"parameters": params, "gradient_bytes": gradient_bytes, "update_s": t_c,
                         "allreduce_s_limit": 2 * gradient_bytes / bandwidth, "strong_n": strong, "weak_n": weak,
                         "allreduce_s_at_strong_n": allreduce_s(n_strong, gradient_bytes, bandwidth),
                         "batch": batch, "allreduce_share_at_n_equal_batch": share_at_b}
        rows.append([name, f"{params / 1e6:.2f} M", f"{gradient_bytes / 1e6:.1f}", f"{t_c * 1e3:.0f}",
                     f"{allreduce_s(2, gradient_bytes, bandwidth) * 1e3:.2f}",
                     f"{2 * gradient_bytes / bandwidth * 1e3:.2f}", f"{strong:.1f}",
                     f"{100 * share_at_b:.0f}% (N = {batch})", "never" if weak is None else f"{weak:.2f}"])
    print(f"Ring allreduce at {a.gbit:g} Gb/s per node; an update's compute measured here (cpu backend, "
          f"1 process x {a.threads} threads, median of {a.updates}).\n")
    print(hx.table(["model", "parameters", "gradient MB", "update ms", "allreduce N=2 ms", "allreduce N->inf ms",
                    "N* strong (B fixed)", "strong share at N = B", "N* weak (B per node)"], rows))
    path = hx.save_json("distributed_cost", {"machine": hx.machine_info(a.threads), "args": vars(a),
                                             "models": {k: list(v) for k, v in MODELS.items()}, "results": results})
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
