"""The run directory (``--out``): the checkpoints (:mod:`bptt.checkpointing`:
``checkpoint-<step>.npz``, the last ``--keep``; ``checkpoint.npz``, the newest; ``best.npz``, the
lowest validation loss; weights, optimizer and trainer state, with the vocabulary, the training
command's configuration and the run's target update and epoch in the meta) and ``metrics.jsonl``
(one JSON object per line, appended by every train and eval run). A directory holds one run:
``bptt train`` refuses one that holds a run unless it continues it (``--resume``) or replaces it
(``--overwrite``)."""

import json
import math
import os
import re
import shlex
import time

from bptt.cli.arguments import UsageError

CHECKPOINT_FILE = "checkpoint.npz"
METRICS_FILE = "metrics.jsonl"


def append_jsonl(run_dir, record):
    """Append ``record`` as one line of the run's ``metrics.jsonl``."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, METRICS_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


# the files of a run (--overwrite removes them); a directory with one of the first three holds a run
_RUN_FILES = re.compile(r"checkpoint\.npz|checkpoint-\d+\.npz|metrics\.jsonl|best\.npz|grad_norms\.(json|png)"
                        r"|\.(checkpoint(-\d+)?|best)\.npz\..+\.tmp")
_HOLDS_A_RUN = re.compile(r"checkpoint\.npz|checkpoint-\d+\.npz|metrics\.jsonl")


def resume_command(run_dir):
    """The command that continues the run in ``run_dir``."""
    return f"bptt train --out {shlex.quote(os.fspath(run_dir))} --resume"


def new_run_dir(run_dir, overwrite=False):
    """Make ``run_dir`` ready for a new run: UsageError (one line) if it holds a run, unless
    ``overwrite``, which removes that run's files (other files stay)."""
    try:
        names = sorted(os.listdir(run_dir))
    except FileNotFoundError:
        names = []
    held = [n for n in names if _HOLDS_A_RUN.fullmatch(n)]
    if held and not overwrite:
        raise UsageError(f"{run_dir} already holds a run; continue it with '{resume_command(run_dir)}' "
                         "or replace it with --overwrite")
    for name in names:
        if _RUN_FILES.fullmatch(name):
            os.unlink(os.path.join(run_dir, name))
    os.makedirs(run_dir, exist_ok=True)


def newest_checkpoint(run_dir):
    """(path, meta, skipped) of the newest checkpoint of ``run_dir`` that loads, ``skipped`` the
    [(path, error)] of newer ones that do not (UsageError when there is no such directory,
    CheckpointError when no checkpoint loads)."""
    if not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir}: no such run directory")
    from bptt.checkpointing import newest_checkpoint
    path, parts, skipped = newest_checkpoint(run_dir)
    meta = parts.get("meta") or {}
    if "config" not in meta:
        raise UsageError(f"{path}: not a checkpoint written by 'bptt train' (no config in its meta)")
    return path, meta, skipped


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
    """A trainer callback appending to the run's JSONL log: every ``every``-th update's event and
    the first of every epoch (so epoch starts and lr changes are exact) as a "step" record, with "loss_mean", the mean of the finite losses of the updates since the
    previous record (together the records cover every update's loss), and after each validation
    a "validation" record {"step", "epoch", "val_loss", "val_perplexity", "val_bits_per_token",
    "lr"} (the lr of the updates before it; "val_accuracy" too for a task with class targets)."""

    def __init__(self, run_dir, every=50):
        self.run_dir, self.every = run_dir, max(1, int(every))
        self.losses = []
        self.epoch = None

    def __call__(self, event):
        if math.isfinite(event["loss"]):
            self.losses.append(float(event["loss"]))
        now = time.time()
        new_epoch, self.epoch = event["epoch"] != self.epoch, event["epoch"]
        if int(event["step"]) % self.every == 0 or new_epoch:
            mean = sum(self.losses) / len(self.losses) if self.losses else None
            append_jsonl(self.run_dir, {"event": "step", "time": now, "loss_mean": mean,
                                        **{k: jsonable(v) for k, v in event.items() if not k.startswith("val_")}})
            self.losses = []
        if "val_loss" in event:
            append_jsonl(self.run_dir, {"event": "validation", "time": now,
                                        **{k: jsonable(v) for k, v in event.items()
                                           if k in ("step", "epoch", "lr") or k.startswith("val_")}})
