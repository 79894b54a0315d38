"""Checkpoints: one ``.npz`` file of arrays and a JSON header (the file format, its versions and
atomic writes: :mod:`bptt.checkpoint_file`).

What a trainer checkpoint holds (``Trainer.state_dict()``), enough for
``Trainer.from_checkpoint(path).fit(...)`` to end with exactly the weights of a run that was
never interrupted, on whichever backend it resumes:

* model type, config and weights (PyTorch's names), its dropout RNG state;
* optimizer type, config, lr, step count and buffers;
* schedule, base lr, trainer settings (k1, k2, clip_norm, ...), update and epoch counters, history;
* the position inside the current epoch: group and step, the carried hidden state, the TBPTT
  ring buffer of chunk caches (k2 > k1; stored field by field, so any backend reads them), the
  dropout RNG state at that point, and a fingerprint of the data and batch size it refers to
  (``fit`` refuses other data);
* ``meta``: any JSON-able dict of the caller's (vocabulary, command-line configuration).

A missing, truncated, corrupted, foreign or too old file raises :class:`CheckpointError`
naming the file.
"""

from bptt import checkpoint_file
from bptt.checkpoint_file import FORMAT, READABLE_VERSIONS, VERSION, CheckpointError, read, write
from bptt.models import model_from_dict, model_to_dict
from bptt.trainer import Trainer

__all__ = ["CheckpointError", "FORMAT", "VERSION", "READABLE_VERSIONS", "read", "write",
           "save_model", "load_model", "save_trainer", "load_trainer"]


def save_model(model, path, meta=None):
    """Write a model-only checkpoint (weights, config, dropout RNG) and ``meta``."""
    checkpoint_file.save(path, model_to_dict(model), None, meta)


def load_model(path, expect=None):
    """(model, meta) from a trainer or model checkpoint, on the current backend. ``expect``: a model
    class (``bptt.LanguageModel``, ``bptt.SequenceModel``) or a tuple of them; a checkpoint of
    another type raises CheckpointError before the model is built."""
    parts = checkpoint_file.load(path)
    if expect is not None:
        wanted = expect if isinstance(expect, tuple) else (expect,)
        names = [c.__name__ for c in wanted]
        if parts["model"]["type"] not in names:
            raise CheckpointError(f"{path}: holds a {parts['model']['type']}, not a {' or a '.join(names)}")
    return checkpoint_file.rebuild(path, "model", model_from_dict, parts["model"]), parts["meta"]


def save_trainer(trainer, path, meta=None):
    """Write ``trainer`` (see the module docstring) and ``meta`` to ``path`` atomically."""
    trainer.save_checkpoint(path, meta)


def load_trainer(path):
    """The trainer saved by :func:`save_trainer`, on the current backend."""
    return Trainer.from_checkpoint(path)
