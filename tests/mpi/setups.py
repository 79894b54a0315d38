"""The small training runs of the distributed tests, built alike on N ranks (the mpiexec scripts
of tests/mpi) and in one process (tests/test_distributed*.py).

A configuration is a JSON-able dict: "model" "lm" (a 2-level LSTM LanguageModel over 11 ids,
document starts in its token stream) or "seq" (a 2-level SequenceModel with per-step class
targets, a few ignored (-1), 29 sequences: the last batch smaller than B); "dtype"; "k1", "k2";
"dropout" (lm); "clip"; "optimizer" "adam" | "sgd"; "B"; "steps" (max_steps); "validation"
(every 5 updates on held-out data); "memory" (Trainer's, default None); "backend" (default cpu).
"""

import numpy as np

import bptt

VOCAB = 11


def build(cfg, comm=None, check_replicas=False, trainer=None):
    """(trainer, data, fit's keyword arguments) of ``cfg``; the data and weights are the same in
    every process. ``trainer``: use this one (resumed from a checkpoint) instead of a new one."""
    bptt.use_backend(cfg.get("backend", "cpu"))
    if "block_rows" in cfg:             # smaller time blocks than a small batch gets (several per window)
        from bptt_kernels.host import blocks
        blocks.BLOCK_ROWS = cfg["block_rows"]
    dtype = np.dtype(cfg["dtype"])
    rng = np.random.default_rng(cfg.get("data_seed", 1))
    fit = {"batch_size": cfg["B"], "epochs": 1000, "max_steps": cfg["steps"]}
    if cfg["model"] == "lm":
        model = bptt.LanguageModel(VOCAB, 6, 8, num_layers=2, dropout=cfg.get("dropout", 0.0), dtype=dtype, seed=3)
        data = rng.integers(0, VOCAB, 640)
        fit["reset_mask"] = rng.random(len(data)) < 0.02                 # documents start here
        validation = rng.integers(0, VOCAB, 200)
    else:
        model = bptt.SequenceModel(3, 7, 4, num_layers=2, dtype=dtype, seed=3)
        data = (rng.standard_normal((29, 40, 3)).astype(dtype), rng.integers(-1, 4, (29, 40)))
        validation = (rng.standard_normal((13, 12, 3)).astype(dtype), rng.integers(-1, 4, (13, 12)))
    if cfg.get("validation"):
        fit.update(validation=validation, eval_every=5)
    if trainer is None:
        optimizer = bptt.Adam(lr=0.02) if cfg.get("optimizer", "adam") == "adam" else bptt.SGD(lr=0.5)
        trainer = bptt.Trainer(model, optimizer, k1=cfg["k1"], k2=cfg["k2"], clip_norm=cfg.get("clip"),
                               comm=comm, check_replicas=check_replicas, memory=cfg.get("memory"))
    return trainer, data, fit


def result(trainer):
    """What a run is compared by: its weights, and the history's loss, gradient norm and tokens."""
    out = {f"w/{name}": value for name, value in trainer.model.state_dict().items()}
    for key in ("loss", "grad_norm", "tokens", "val_loss"):
        out[f"h/{key}"] = np.array(trainer.history.get(key, []), dtype=np.float64)
    return out
