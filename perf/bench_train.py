#!/usr/bin/env python
"""End-to-end char-level language-model training: bptt.Trainer against a plain PyTorch loop.

Model on both sides: embedding (E, default 128) -> 2-layer LSTM (H 256) -> linear decoder
over the vocabulary -> softmax cross-entropy; Adam (lr 2e-3), global-norm clipping 0.25,
batch 32 contiguous streams (PyTorch's ``batchify``), truncated BPTT k1 = k2 = 50 with the
hidden state carried (detached) between chunks, no dropout, float32. The PyTorch loop is the
one of PyTorch's ``word_language_model`` example. bptt also runs with k2 = 2*k1 (activations of
the previous chunk kept, twice the backward work; PyTorch has no equivalent), shown beside.

Text: the bptt default corpus (``bptt.data.load_corpus``, char level), or where that module is
missing the Python help topics of the standard library (the same text).

Every run is a fresh process with the same thread count, alone on the machine (no other
benchmark process alive meanwhile); runs of the variants alternate (the order rotates every
round). A run trains ``--warmup`` updates (not timed: Numba compile or cache load, allocator
warm-up), then ``--steps`` timed updates; a step's time is the wall time between consecutive
updates (data slicing, forward, backward, clipping and optimizer included). tokens/s =
batch * k1 / median step time. Reported: the median over rounds. ``--blas openblas,mkl`` runs
each bptt variant once per BLAS provider (``BPTT_BLAS``); by default with the environment's.

The header names the CPU, each variant's BLAS (bptt: the provider its kernels used; torch:
oneDNN and MKL as built) and SGEMM 2048^3 GFLOP/s of every provider (numpy's OpenBLAS, MKL
where installed, torch.mm), measured by the variant's first and last run after its updates.

Prints a table; writes JSON to perf/results/bench_train-<time>.json.
"""

import argparse
import os
import sys
import time

import _harness as hx

VARIANTS = ("torch", "ours", "ours_k2")


def load_tokens(max_chars):
    """(int64 token ids [n], vocabulary size) of the char-level training text."""
    import numpy as np
    try:
        from bptt.data import load_corpus
    except ImportError:
        from pydoc_data.topics import topics
        text = "\n\n".join(topics[k].strip("\n") for k in sorted(topics)) + "\n"
        text = text[:max_chars] if max_chars else text
        symbols = sorted(set(text))
        index = {s: i for i, s in enumerate(symbols)}
        return np.array([index[c] for c in text], dtype=np.int64), len(symbols), "stdlib help topics (fallback)"
    corpus = load_corpus(level="char", max_chars=max_chars)
    return np.asarray(corpus.train, dtype=np.int64), len(corpus.vocab), corpus.source


# =============================================================================================
# worker side
# =============================================================================================

def torch_run(r):
    """The PyTorch word_language_model loop; returns per-update times and losses."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    ids, V, _ = load_tokens(r["max_chars"])
    B, k1, E, H = r["batch"], r["k1"], r["embed"], r["hidden"]
    torch.manual_seed(0)

    class CharLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Embedding(V, E)
            self.rnn = nn.LSTM(E, H, num_layers=r["layers"])
            self.decoder = nn.Linear(H, V)

        def forward(self, inp, hidden):
            out, hidden = self.rnn(self.encoder(inp), hidden)
            return self.decoder(out), hidden

    model = CharLSTM()
    opt = torch.optim.Adam(model.parameters(), lr=r["lr"])
    n = len(ids) // B
    data = torch.from_numpy(ids[: n * B].reshape(B, n).T.copy())  # batchify: [n, B]
    hidden = tuple(torch.zeros(r["layers"], B, H) for _ in range(2))
    stamps, losses, i = [time.perf_counter()], [], 0
    for _ in range(r["warmup"] + r["steps"]):
        if i + k1 + 1 > n:
            i = 0
        inp, target = data[i:i + k1], data[i + 1:i + 1 + k1]
        i += k1
        hidden = tuple(h.detach() for h in hidden)
        opt.zero_grad()
        logits, hidden = model(inp, hidden)
        loss = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), r["clip"])
        opt.step()
        losses.append(loss.item())
        stamps.append(time.perf_counter())
    return stamps, losses


def ours_run(r):
    """bptt.Trainer.fit on the same stream; per-update times from its callback."""
    import numpy as np
    import bptt
    bptt.use_backend(os.environ.get("BPTT_BACKEND", "cpu"))
    ids, V, _ = load_tokens(r["max_chars"])
    model = bptt.LanguageModel(V, r["embed"], r["hidden"], num_layers=r["layers"], cell="lstm",
                               dtype=np.float32, seed=0)
    opt = bptt.Adam(lr=r["lr"])
    trainer = bptt.Trainer(model, opt, k1=r["k1"], k2=r["k2"], clip_norm=r["clip"])
    stamps, losses = [time.perf_counter()], []

    def record(event):
        losses.append(float(event["loss"]))
        stamps.append(time.perf_counter())
    trainer.fit(ids, batch_size=r["batch"], epochs=10 ** 6, max_steps=r["warmup"] + r["steps"],
                callbacks=(record,))
    return stamps, losses


class TrainWorker:
    def __init__(self, side):
        self.side = side

    def setup(self):
        hx.require("numpy", "bench_train")
        if self.side == "torch":
            torch = hx.require("torch", "bench_train (torch side)")
            hx.pin_threads(int(os.environ["OMP_NUM_THREADS"]))
            return {"torch": torch.__version__}
        bptt = hx.require("bptt", "bench_train (ours)")
        for name in ("LanguageModel", "Adam", "Trainer"):
            hx.require_attr(bptt, name, "bench_train (ours)")
        hx.require("numba", "bench_train (ours)")
        hx.pin_threads(int(os.environ["OMP_NUM_THREADS"]))
        return {"backend": bptt.get_backend().NAME}

    def handle(self, r):
        stamps, losses = (torch_run if self.side == "torch" else ours_run)(r)
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        reply = {"first_step_s": steps[0], "step_s": steps[r["warmup"]:],
                 "loss_first": losses[0], "loss_last": losses[-1], "updates": len(losses),
                 "peak_rss_mb": hx.peak_rss_mb()}
        if r.get("blas"):               # after the timed updates: the BLAS and its SGEMM rates
            reply["blas"] = hx.torch_blas_info() if self.side == "torch" else hx.ours_blas_info()
        return reply


# =============================================================================================
# parent side
# =============================================================================================

def add_run_arguments(p):
    """The char-LM's settings and the timing protocol's flags (shared with bench_scale.py)."""
    p.add_argument("--k1", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip", type=float, default=0.25)
    p.add_argument("--warmup", type=int, default=3, help="untimed updates per run (default 3)")
    p.add_argument("--steps", type=int, default=20, help="timed updates per run (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--max-chars", type=int, default=None, help="cap the corpus (default: all)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--variants", type=hx.parse_str_list, default=list(VARIANTS),
                   help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--threads", type=int, default=hx.DEFAULT_THREADS)
    p.add_argument("--blas", type=hx.parse_str_list, default=None,
                   help="run each bptt variant once per BPTT_BLAS setting given (auto, openblas, "
                        "mkl; default: the environment's setting)")
    p.add_argument("--quick", action="store_true", help="2 rounds of 1 + 8 updates")
    p.add_argument("--worker", choices=("torch", "ours"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        w = TrainWorker(a.worker)
        hx.serve(w.setup, w.handle)
        return 0
    if a.quick:
        a.rounds, a.warmup, a.steps = 2, 1, 8
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
    bad = [b for b in a.blas or () if b not in ("auto", "openblas", "mkl")]
    if bad:
        p.error(f"--blas: unknown {bad}; choose from auto, openblas, mkl")

    script = os.path.abspath(__file__)
    base = {"batch": a.batch, "k1": a.k1, "embed": a.embed, "hidden": a.hidden, "layers": a.layers,
            "lr": a.lr, "clip": a.clip, "warmup": a.warmup, "steps": a.steps, "max_chars": a.max_chars}
    requests = {"torch": {**base, "k2": a.k1}, "ours": {**base, "k2": a.k1},
                "ours_k2": {**base, "k2": 2 * a.k1}}
    # (name, variant, BPTT_BLAS or None) of every run kind
    kinds = [(v if v == "torch" or not a.blas else f"{v}[{b}]", v, None if v == "torch" else b)
             for v in a.variants for b in ([None] if v == "torch" or not a.blas else a.blas)]
    runs = {name: [] for name, _, _ in kinds}
    blas = {name: [] for name, _, _ in kinds}
    dead = {}
    t_start = time.time()
    monitor = hx.LoadMonitor()
    for k in range(a.rounds):
        order = kinds[k % len(kinds):] + kinds[:k % len(kinds)]
        for name, variant, setting in order:
            if name in dead:
                continue
            w = hx.Worker(script, variant.split("_")[0], a.threads,
                          env_extra={"BPTT_BLAS": setting} if setting else None)
            try:
                if not w.alive:
                    raise hx.WorkerError(w.error)
                run_monitor = hx.LoadMonitor(pids=[w.pid])
                run = w.call({**requests[variant], "blas": k in (0, a.rounds - 1)})
                run_load = run_monitor.stop()
                run["others"] = run_load and run_load["other_processes_cores"]
                if "blas" in run:
                    blas[name].append(run.pop("blas"))
                runs[name].append(run)
            except hx.WorkerError as e:
                dead[name] = str(e).strip()
                print(f"NOTE: {name} cannot run: {dead[name]}", file=sys.stderr)
            finally:
                w.close()
            if runs[name] and name not in dead:
                print(f"[{time.time() - t_start:5.0f}s] round {k + 1} {name:16s} "
                      f"{a.batch * a.k1 / hx.median(runs[name][-1]['step_s']):8.0f} tokens/s",
                      file=sys.stderr, flush=True)

    load = monitor.stop()
    tokens = a.batch * a.k1
    summary = {}
    for name, _, _ in kinds:
        if not runs[name]:
            continue
        step = hx.median([hx.median(r["step_s"]) for r in runs[name]])
        summary[name] = {
            "step_s": step, "tokens_per_s": tokens / step,
            "first_step_s": hx.median([r["first_step_s"] for r in runs[name]]),
            "loss_first": runs[name][0]["loss_first"], "loss_last": runs[name][0]["loss_last"],
            "peak_rss_mb": hx.median([r["peak_rss_mb"] for r in runs[name]]),
            "others": hx.median([r["others"] for r in runs[name]]),
            "per_round_tokens_per_s": [tokens / hx.median(r["step_s"]) for r in runs[name]]}
    ref = summary.get("torch", {}).get("tokens_per_s")
    print(f"\nChar-level LM training: embedding {a.embed}, {a.layers}-layer LSTM {a.hidden}, batch "
          f"{a.batch}, TBPTT k1={a.k1}, Adam, clip {a.clip}, float32, {a.threads} threads.\n"
          f"Median over {a.rounds} alternating fresh processes, each alone, of the median of "
          f"{a.steps} updates (after {a.warmup} untimed). ratio = our tokens/s / torch tokens/s "
          f"(>1: bptt faster).\n{hx.blas_note({n: v for n, v in blas.items() if v})}\n"
          f"{hx.load_note(load)}; 'others' = the same, cores, median over that row's runs.\n")
    label = {"torch": "torch (k2=k1)", "ours": f"bptt k2=k1={a.k1}", "ours_k2": f"bptt k2={2 * a.k1}"}
    rows = [[label[variant] + (f" [{setting}]" if setting else ""),
             hx.fmt(s["tokens_per_s"], ".0f"),
             " ".join(hx.fmt(x, ".0f") for x in s["per_round_tokens_per_s"]),
             hx.fmt(s["step_s"] * 1e3, ".1f"), hx.fmt(ref and s["tokens_per_s"] / ref, ".2f"),
             hx.fmt(s["first_step_s"], ".2f"), hx.fmt(s["loss_first"], ".3f"),
             hx.fmt(s["loss_last"], ".3f"), hx.fmt(s["peak_rss_mb"], ".0f"), hx.fmt(s["others"], ".1f")]
            for name, variant, setting in kinds if name in summary for s in (summary[name],)]
    print(hx.table(["run", "tokens/s", "per round", "ms/update", "ratio", "1st update s",
                    "loss 1st", "loss last", "peak RSS MiB", "others"], rows))
    for name, why in dead.items():
        print(f"{name}: not run ({why.strip().splitlines()[-1] if why.strip() else 'unknown'})")
    _, V, source = load_tokens(a.max_chars)
    print(f"\ntext: {source}, vocabulary {V}; '1st update s' = time of the first update of a fresh "
          f"process, model and data already built (includes Numba's compile or cache load for bptt).")
    path = hx.save_json("bench_train", {"machine": hx.machine_info(a.threads), "config": base,
                                        "vocab": V, "text": source, "summary": summary,
                                        "runs": runs, "blas": blas, "not_run": dead,
                                        "load": load})
    print(f"JSON: {os.path.relpath(path, hx.REPO_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
