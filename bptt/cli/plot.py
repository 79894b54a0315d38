"""``bptt plot DIR``: the training curve of a run, from its ``metrics.jsonl``, drawn into
``DIR/training.png`` with matplotlib (the ``plot`` extra: ``pip install 'bptt[plot]'``).

Upper panel: the training loss against the update step (the "step" records' ``loss_mean``, the
mean loss of the updates since the record before, so every update counts; ``loss`` in logs
without it) and the validation loss (the "validation" records), the best one marked; epoch
starts as dotted lines. Lower panel: the learning rate of the updates (log scale where it
spans more than a factor 20). A step logged twice (a run resumed from a checkpoint older than
its last log lines) is drawn as logged last.
"""

import json
import math
import os

from bptt.cli.arguments import UsageError
from bptt.cli.runs import METRICS_FILE

PLOT_FILE = "training.png"


def read_curves(run_dir):
    """The curves of the run in ``run_dir``: {"train": [(step, loss, lr, epoch)], "valid": [(step,
    loss)]}, each sorted by step. UsageError (one line) without a directory, a metrics file or
    any logged update."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir}: no such run directory")
    if not os.path.isfile(path):
        raise UsageError(f"{run_dir}: no {METRICS_FILE} in this directory (written by 'bptt train')")
    steps, valids = {}, {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:           # a line cut short when a run was killed
                continue
            if not isinstance(record, dict) or not _is_int(record.get("step")):
                continue
            if record.get("event") == "step":
                loss = record.get("loss_mean", record.get("loss"))
                steps[record["step"]] = (record["step"], _float(loss), _float(record.get("lr")),
                                         record.get("epoch"))
            elif record.get("event") == "validation":
                valids[record["step"]] = (record["step"], _float(record.get("val_loss")))
    if not steps and not valids:
        raise UsageError(f"{path}: no training updates logged (a run that has not made one yet?)")
    return {"train": [steps[k] for k in sorted(steps)], "valid": [valids[k] for k in sorted(valids)]}


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _float(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def plot_run(run_dir, output=None):
    """Draw the run's curves (:func:`read_curves`) into ``output`` (default ``run_dir``/training.png);
    returns its path. UsageError when matplotlib is missing."""
    curves = read_curves(run_dir)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plotting needs matplotlib, which is not installed: pip install 'bptt[plot]'") from None
    output = output or os.path.join(run_dir, PLOT_FILE)
    train, valid = curves["train"], curves["valid"]
    fig, (ax, ax_lr) = plt.subplots(2, 1, sharex=True, figsize=(9, 6.5), height_ratios=(3, 1),
                                    constrained_layout=True)
    if train:
        x, y = [t[0] for t in train], [t[1] for t in train]
        ax.plot(x, y, lw=0.8, color="tab:blue", alpha=0.35,
                label="training loss (mean over the updates since the previous point)")
        k = max(1, len(train) // 40)
        if k > 1:
            ax.plot(x, _running_mean(y, k), lw=1.6, color="tab:blue", label=f"training loss, running mean of {k} points")
    if valid:
        ax.plot([v[0] for v in valid], [v[1] for v in valid], "o-", ms=4, lw=1.5, color="tab:orange",
                label="validation loss")
        finite = [v for v in valid if math.isfinite(v[1])]
        if finite:
            best = min(finite, key=lambda v: v[1])
            ax.plot([best[0]], [best[1]], "*", ms=14, color="tab:red", label=f"best {best[1]:.4f} (update {best[0]})")
    for step, epoch in _epoch_starts(train):
        for a in (ax, ax_lr):
            a.axvline(step, color="0.6", ls=":", lw=0.8)
        ax.text(step, 0.01, f" epoch {epoch + 1}", transform=ax.get_xaxis_transform(), va="bottom", fontsize=8,
                color="0.4")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"{os.path.basename(os.path.normpath(run_dir)) or run_dir}: training curve")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    lrs = [(t[0], t[2]) for t in train if math.isfinite(t[2])]
    if lrs:
        ax_lr.step([s for s, _ in lrs], [lr for _, lr in lrs], where="post", color="tab:green")
        low, high = min(lr for _, lr in lrs), max(lr for _, lr in lrs)
        if low > 0 and high / low > 20:     # decays over decades: log scale
            ax_lr.set_yscale("log")
        else:
            ax_lr.set_ylim(0, high * 1.1 if high > 0 else 1)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("update")
    ax_lr.grid(alpha=0.3)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def _running_mean(values, k):
    """The mean of each value and the (up to) k - 1 finite ones before it."""
    out = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - k + 1):i + 1] if math.isfinite(v)]
        out.append(sum(window) / len(window) if window else math.nan)
    return out


def _epoch_starts(train):
    """(step, epoch) of the first logged update of every epoch after the first."""
    starts, previous = [], None
    for step, _, _, epoch in train:
        if _is_int(epoch) and previous is not None and epoch != previous:
            starts.append((step, epoch))
        previous = epoch if _is_int(epoch) else previous
    return starts
