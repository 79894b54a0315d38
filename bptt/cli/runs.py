"""The run directory (``--out``): ``checkpoint.npz`` (weights, optimizer and trainer state; the
vocabulary and the training command's configuration travel in its meta) and ``metrics.jsonl``
(one JSON object per line, appended by every train and eval run)."""

import json
import math
import os
import time

from bptt.cli.arguments import UsageError

CHECKPOINT_FILE = "checkpoint.npz"
METRICS_FILE = "metrics.jsonl"


def append_jsonl(run_dir, record):
    """Append ``record`` as one line of the run's ``metrics.jsonl``."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, METRICS_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def checkpoint_path(run_dir):
    """The checkpoint of ``run_dir`` (UsageError when there is none)."""
    path = os.path.join(run_dir, CHECKPOINT_FILE)
    if not os.path.isfile(path):
        if not os.path.isdir(run_dir):
            raise UsageError(f"{run_dir}: no such run directory")
        raise UsageError(f"{run_dir}: no checkpoint ({CHECKPOINT_FILE}) in this directory")
    return path


def read_meta(path):
    """The meta dict of the checkpoint ``path`` (no model is built, no backend chosen)."""
    from bptt.checkpoint import read
    meta = read(path)[0].get("meta") or {}
    if "config" not in meta:
        raise UsageError(f"{path}: not a checkpoint written by 'bptt train' (no config in its meta)")
    return meta


def jsonable(value):
    """``value`` as JSON takes it: NumPy scalars as Python numbers, non-finite floats as None,
    anything else unknown as its str."""
    import numpy as np
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


class StepLog:
    """A trainer callback appending to the run's JSONL log: every ``every``-th update's event as a
    "step" record, with "loss_mean", the mean of the finite losses of the updates since the
    previous record (together the records cover every update's loss), and after each validation
    a "validation" record {"step", "epoch", "val_loss", "val_perplexity", "val_bits_per_token",
    "lr"} (the lr of the updates before it; "val_accuracy" too for a task with class targets)."""

    def __init__(self, run_dir, every=50):
        self.run_dir, self.every = run_dir, max(1, int(every))
        self.losses = []

    def __call__(self, event):
        if math.isfinite(event["loss"]):
            self.losses.append(float(event["loss"]))
        now = time.time()
        if int(event["step"]) % self.every == 0:
            mean = sum(self.losses) / len(self.losses) if self.losses else None
            append_jsonl(self.run_dir, {"event": "step", "time": now, "loss_mean": mean,
                                        **{k: jsonable(v) for k, v in event.items() if not k.startswith("val_")}})
            self.losses = []
        if "val_loss" in event:
            append_jsonl(self.run_dir, {"event": "validation", "time": now,
                                        **{k: jsonable(v) for k, v in event.items()
                                           if k in ("step", "epoch", "lr") or k.startswith("val_")}})
