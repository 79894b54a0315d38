"""Vanishing/exploding-gradient diagnostics: per-step norms of dL/dh_t and per-parameter gradient
norms, recorded by ``Trainer(..., record_grad_norms=True)`` in ``history["grad_diagnostics"]``.

One record per update window::

    {"step": 12, "epoch": 0, "window": [w0, t1],        # the steps backpropagated through
     "dh_norms": [[...], ...],                          # per recurrent level (bottom first), one
                                                        # ||dL/dh_t||_2 (over B and H) per step,
                                                        # oldest step first
     "param_grad_norms": {"rnn.weight_hh_l0": 0.03, ...}}   # before clipping

``dh_norms[k][0]`` against ``dh_norms[k][-1]`` shows how much of the newest steps' loss gradient
reaches the start of the window: the vanishing/exploding-gradient picture of Bengio et al. 1994
and Pascanu et al. 2013.
"""

import json
import math
import os

import numpy as np


def _records(history_or_records):
    if isinstance(history_or_records, dict):
        return history_or_records.get("grad_diagnostics", [])
    return list(history_or_records)


def save_grad_norms(history_or_records, path):
    """Write the records (a trainer history or a list of records) to ``path`` as JSON."""
    records = _records(history_or_records)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"grad_diagnostics": records}, f)
    return os.fspath(path)


def load_grad_norms(path):
    """The list of records written by :func:`save_grad_norms`."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)["grad_diagnostics"]


def plot_grad_norms(history_or_records, path=None, level=-1, max_windows=8):
    """Plot ||dL/dh_t|| against steps before the window's end (log scale) for up to
    ``max_windows`` windows spread over training, and every parameter's gradient norm per update.

    Needs matplotlib (``pip install bptt[plot]``). Saves to ``path`` when given; returns the figure.
    """
    records = _records(history_or_records)
    if not records:
        raise ValueError("no gradient diagnostics recorded: train with Trainer(..., record_grad_norms=True)")
    try:
        import matplotlib
        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot_grad_norms needs matplotlib: pip install matplotlib "
                          "(or bptt[plot]); save_grad_norms writes the same data as JSON") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    picks = sorted(set(np.linspace(0, len(records) - 1, min(max_windows, len(records))).astype(int)))
    for i in picks:
        norms = np.asarray(records[i]["dh_norms"][level], dtype=np.float64)
        back = np.arange(len(norms))[::-1]             # steps before the window's last step
        ax1.semilogy(back, np.where(norms > 0, norms, np.nan), label=f"step {records[i]['step']}")
    ax1.set_xlabel("steps before the end of the window")
    ax1.set_ylabel("||dL/dh_t||")
    ax1.invert_xaxis()
    ax1.set_title("gradient reaching each step (level %s)" % (level if level >= 0 else "top"))
    ax1.legend(fontsize=7)
    steps = [r["step"] for r in records]
    for name in records[0]["param_grad_norms"]:
        ax2.semilogy(steps, [r["param_grad_norms"][name] for r in records], label=name)
    ax2.set_xlabel("update step")
    ax2.set_ylabel("gradient norm (before clipping)")
    ax2.legend(fontsize=6)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def write_grad_norms(model, train_data, path, cfg):
    """Record the gradient diagnostics of the first windows of ``train_data`` without changing the
    model (a learning rate of 0; the dropout RNG is restored) and write them to ``path`` (JSON),
    plus a PNG beside it when matplotlib is installed.

    cfg: dict with "k1", "k2", "batch_size" (the training settings). Runs enough windows for one
    full k2-step window. Returns the list of records.
    """
    from bptt.optim import SGD
    from bptt.trainer import Trainer
    k1, k2 = cfg.get("k1"), cfg.get("k2")
    trainer = Trainer(model, SGD(0.0), k1=k1, k2=k2, record_grad_norms=True)
    windows = 1 if trainer.k1 is None else math.ceil(trainer.k2 / trainer.k1) + 1
    rng_state = model.rng.bit_generator.state
    try:
        trainer.fit(train_data, cfg["batch_size"], epochs=1, max_steps=windows)
    finally:
        model.rng.bit_generator.state = rng_state
        model.zero_grad()
    records = trainer.history["grad_diagnostics"]
    save_grad_norms(records, path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return records
    import matplotlib.pyplot as plt
    fig = plot_grad_norms(records, os.path.splitext(os.fspath(path))[0] + ".png")
    plt.close(fig)
    return records
