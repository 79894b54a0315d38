"""bptt: exact, fast backpropagation through time (full and truncated) for Elman RNN, LSTM and GRU.

Public API (imported lazily, so ``import bptt`` is cheap and never touches a GPU)::

    bptt.RNN, bptt.LSTM, bptt.GRU            recurrent layers (torch.nn names, shapes, gate orders)
    bptt.LanguageModel, bptt.SequenceModel   models
    bptt.SGD, bptt.Adam                      optimizers (torch.optim's update rules)
    bptt.Trainer                             full BPTT and TBPTT(k1, k2) training
    bptt.CheckpointCallback                  periodic checkpoints of a run directory (bptt.checkpointing)
    bptt.use_backend, bptt.get_backend       the backend switch (also BPTT_BACKEND)
"""

from bptt.backend import BackendUnavailableError, available_backends, get_backend, use_backend

__version__ = "0.1.0"

# public name -> module that defines it; imported on first attribute access
_LAZY = {
    "RNN": "bptt.layers", "LSTM": "bptt.layers", "GRU": "bptt.layers",
    "LanguageModel": "bptt.models", "SequenceModel": "bptt.models",
    "SGD": "bptt.optim", "Adam": "bptt.optim",
    "ConstantLR": "bptt.optim", "StepDecay": "bptt.optim", "ExponentialDecay": "bptt.optim",
    "PlateauDecay": "bptt.optim",
    "Trainer": "bptt.trainer", "Preempted": "bptt.interrupts",
    "CheckpointCallback": "bptt.checkpointing",
}

__all__ = ["use_backend", "get_backend", "available_backends", "BackendUnavailableError",
           *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bptt' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
