"""Periodic checkpoints of a training run in a run directory, and resuming from the newest one
that is whole.

The run directory::

    checkpoint-<step>.npz   the last ``keep`` checkpoints (step: the trainer's update count,
                            8 digits), each written atomically (:mod:`bptt.checkpoint_file`)
    checkpoint.npz          always the newest of them (a hard link to it; a copy where the file
                            system has no hard links)
    best.npz                the checkpoint after the update with the lowest validation loss so
                            far (events with a "val_loss"); the run's best so far is kept in
                            every checkpoint's meta ("best_val_loss", "best_step")

:class:`CheckpointCallback` writes them during :meth:`bptt.Trainer.fit`; :func:`resume` (and the
command line's ``--resume``) reads the newest checkpoint that loads, warning about each newer
one that does not (a truncated or damaged file), and removes the temp files of writes a killed
process left behind. A process killed at any moment leaves every ``*.npz`` whole: each is
replaced by a rename, never written in place.
"""

import math
import os
import re
import time
import warnings

from bptt import checkpoint_file
from bptt.checkpoint_file import CheckpointError

__all__ = ["CheckpointCallback", "resume", "newest_checkpoint", "checkpoint_files", "clean_temp_files",
           "CHECKPOINT_FILE", "BEST_FILE"]

CHECKPOINT_FILE = "checkpoint.npz"
BEST_FILE = "best.npz"
_NUMBERED = re.compile(r"checkpoint-(\d+)\.npz")
_TEMP = re.compile(r"\.(checkpoint(-\d+)?|best)\.npz\..+\.tmp")


def numbered_name(step):
    return f"checkpoint-{int(step):08d}.npz"


def _numbered(run_dir):
    """[(step, path)] of the run's numbered checkpoints, newest first."""
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), os.path.join(run_dir, name))
             for name in names if (m := _NUMBERED.fullmatch(name))]
    return sorted(found, reverse=True)


def checkpoint_files(run_dir):
    """The run's checkpoints to resume from, newest first: ``checkpoint-<step>.npz`` by step, then
    ``checkpoint.npz`` where it is not one of them (a run directory of an older bptt)."""
    paths = [p for _, p in _numbered(run_dir)]
    latest = os.path.join(run_dir, CHECKPOINT_FILE)
    if os.path.isfile(latest) and not any(_same_file(latest, p) for p in paths):
        paths.append(latest)
    return paths


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def clean_temp_files(run_dir):
    """Remove the temp files (``.checkpoint-<step>.npz.<random>.tmp`` ...) of writes that a killed
    process left in ``run_dir``; returns their paths."""
    removed = []
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return removed
    for name in names:
        if _TEMP.fullmatch(name):
            path = os.path.join(run_dir, name)
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def newest_checkpoint(run_dir):
    """(path, parts, skipped) of the newest checkpoint in ``run_dir`` that loads as a trainer
    checkpoint: ``parts`` as :func:`bptt.checkpoint_file.load` returns them, ``skipped`` the
    [(path, CheckpointError)] of newer files that did not load. CheckpointError when none does."""
    skipped = []
    for path in checkpoint_files(run_dir):
        try:
            return path, checkpoint_file.load(path, trainer=True), skipped
        except CheckpointError as e:
            skipped.append((path, e))
    if skipped:
        raise CheckpointError(f"{run_dir}: no usable checkpoint: " + "; ".join(str(e) for _, e in skipped))
    raise CheckpointError(f"{run_dir}: no checkpoint ({CHECKPOINT_FILE}) in this directory")


def resume(run_dir, comm=None):
    """The trainer of the newest usable checkpoint in ``run_dir`` (a warning, naming the file, for
    each newer one that is damaged), on the current backend; temp files of interrupted writes
    are removed. Its ``meta`` holds the run's best validation loss for a new
    :class:`CheckpointCallback`. ``comm``: the ranks of a data-parallel run (each reads the file;
    rank 0 removes the temp files), as :meth:`bptt.Trainer.from_checkpoint`."""
    from bptt.trainer import Trainer
    if comm is None or comm.rank == 0:
        clean_temp_files(run_dir)
    path, _, skipped = newest_checkpoint(run_dir)
    for bad, error in skipped:
        warnings.warn(f"{error}; resuming from {path}", RuntimeWarning, stacklevel=2)
    return Trainer.from_checkpoint(path, comm=comm)


class CheckpointCallback:
    """A :meth:`bptt.Trainer.fit` callback that checkpoints ``trainer`` into ``run_dir`` (layout
    in the module docstring) every ``every_updates`` updates and/or every ``every_minutes``
    minutes (None or 0: not by that measure), keeping the last ``keep`` checkpoints, and writes
    ``best.npz`` after each update whose event has a "val_loss" lower than any before (in this
    run, and before it where the trainer was resumed from this directory). ``meta``: the
    JSON-able dict stored in each checkpoint (default: the trainer's ``meta``).

    After ``fit`` returns, or stops on Ctrl-C or SIGTERM (:class:`bptt.interrupts.Preempted`, a
    KeyboardInterrupt), call :meth:`save` for the final checkpoint. Temp files that a killed
    process left in ``run_dir`` are removed when the callback is made.

    A trainer on N ranks (``Trainer(..., comm=...)``): make the callback, pass it to ``fit`` and
    call :meth:`save` on every rank (each checkpoint is collective); rank 0 alone touches the
    files, and its clock decides when ``every_minutes`` is due.
    """

    def __init__(self, trainer, run_dir, every_updates=None, every_minutes=5.0, keep=2, meta=None):
        for name, value in (("every_updates", every_updates), ("keep", keep)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int{' or None' if name != 'keep' else ''}; got {value!r}")
        if every_minutes is not None and (isinstance(every_minutes, bool) or not isinstance(every_minutes, (int, float))
                                          or not 0 <= every_minutes < math.inf):
            raise ValueError(f"every_minutes must be None or a number >= 0; got {every_minutes!r}")
        self.trainer, self.run_dir = trainer, os.fspath(run_dir)
        self.comm = trainer.comm
        self.writes = self.comm.rank == 0           # rank 0 writes; every rank takes part
        self.every_updates = every_updates
        self.every_s = every_minutes * 60.0 if every_minutes else None
        self.keep = keep
        self.meta = dict(meta if meta is not None else trainer.meta or {})
        own = trainer.meta or {}
        self.best = own.get("best_val_loss", self.meta.get("best_val_loss"))
        self.best_step = own.get("best_step", self.meta.get("best_step"))
        self.best = math.inf if self.best is None else float(self.best)
        if self.writes:
            os.makedirs(self.run_dir, exist_ok=True)
            clean_temp_files(self.run_dir)
            self._recorded_best()
        self.best, self.best_step = self.comm.bcast((self.best, self.best_step))
        self.last_saved = None
        self._due = None if self.every_s is None else time.monotonic() + self.every_s

    def _recorded_best(self):
        """Take the best validation loss that ``best.npz`` records, where lower than the trainer's."""
        path = os.path.join(self.run_dir, BEST_FILE)
        if not os.path.isfile(path):
            return
        try:
            meta = checkpoint_file.read(path)[0].get("meta") or {}
        except CheckpointError as e:
            warnings.warn(f"{e}; it will be replaced at the next best validation loss", RuntimeWarning, stacklevel=3)
            return
        value = meta.get("best_val_loss")
        if value is not None and value < self.best:
            self.best, self.best_step = float(value), meta.get("best_step")

    @property
    def latest(self):
        return os.path.join(self.run_dir, CHECKPOINT_FILE)

    def _meta(self):
        meta = dict(self.meta)
        if math.isfinite(self.best):
            meta.update(best_val_loss=self.best, best_step=self.best_step)
        return meta

    def __call__(self, event):
        val = event.get("val_loss")
        if val is not None and math.isfinite(val) and val < self.best:
            self.best, self.best_step = float(val), int(event["step"])
            self.trainer.save_checkpoint(os.path.join(self.run_dir, BEST_FILE), meta=self._meta())
        step = self.trainer.step
        if step == self.last_saved:
            return
        due = self._due is not None and time.monotonic() >= self._due
        if self._due is not None and self.comm.size > 1:
            due = self.comm.bcast(due)                  # rank 0's clock for every rank
        if due or (self.every_updates is not None and step % self.every_updates == 0):
            self.save()

    def save(self):
        """Write the trainer's checkpoint now: ``checkpoint-<step>.npz``, then ``checkpoint.npz``
        pointing to it, then remove the checkpoints beyond the last ``keep`` (and those of later
        steps, left by a run that went back to an earlier checkpoint). Returns ``checkpoint.npz``'s
        path. A failed write (CheckpointWriteError, an OSError) leaves the earlier files whole."""
        step = self.trainer.step
        path = os.path.join(self.run_dir, numbered_name(step))
        self.trainer.save_checkpoint(path, meta=self._meta())
        if self.writes:
            _link_latest(path, self.latest)
            older = [p for s, p in _numbered(self.run_dir) if s < step]
            stale = [p for s, p in _numbered(self.run_dir) if s > step]
            for old in stale + older[self.keep - 1:]:
                try:
                    os.unlink(old)
                except FileNotFoundError:
                    pass
        self.last_saved = step
        if self.every_s is not None:
            self._due = time.monotonic() + self.every_s
        return self.latest


def _link_latest(path, latest):
    """Make ``latest`` the file ``path`` atomically: a hard link renamed over it, or, where the
    file system has no hard links, an atomic copy."""
    folder, name = os.path.split(latest)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.link.tmp")
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(path, tmp)
    except OSError:
        checkpoint_file.copy(path, latest)
        return
    try:
        os.replace(tmp, latest)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
