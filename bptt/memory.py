"""Memory-efficient backpropagation through time: keep the recurrent state at a few steps,
recompute the activations between them during backward (docs/memory.md).

``memory`` (of :class:`bptt.Trainer` and :func:`loss_and_backward`) is read by
:func:`parse_memory`:

* ``None``: every activation of a window is kept (the plain forward/backward);
* ``"sqrt"``: the state of every level is kept every ~sqrt(n) steps of an n-step window;
* a budget in bytes (an int, or a string ``"512M"``, ``"2G"``, ``"300K"``, ``"1.5G"``): the
  schedule with the least recomputation whose counted peak fits the budget.
"""

import math
import re

import numpy as np

from bptt_kernels import GATES

__all__ = ["parse_memory", "state_bytes", "step_bytes", "smallest_budget", "check_budget"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_EXPECTED = "None, 'sqrt', a positive int of bytes or a size like '512M', '2G', '300K', '1.5G'"


def parse_memory(value):
    """``memory`` -> None | "sqrt" | int bytes (K, M, G, T are powers of 1024).

    ValueError in one line naming ``memory``, what it expects and what it got otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() == "sqrt":
            return "sqrt"
        match = _BUDGET.match(value)
        if match:
            size = float(match.group(1)) * _UNITS[match.group(2).upper()]
            if size >= 1 and math.isfinite(size):
                return int(size)
    elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 1:
        return int(value)
    raise ValueError(f"memory must be {_EXPECTED}; got {type(value).__name__} {value!r}")


def state_bytes(model, batch_size):
    """Bytes of one boundary state of ``model``'s stack: h [L,B,H] (LSTM: and c) of B rows."""
    parts = 2 if model.cell == "lstm" else 1
    return parts * model.num_layers * batch_size * model.hidden_size * model.dtype.itemsize


def step_bytes(model, batch_size):
    """Bytes one step of B rows holds while it is backpropagated with its activations kept: the
    caches of every level and dropout mask (measured on a forward of one and of two steps, the
    model's dropout RNG restored), the outputs (a language model's logits, then their gradient
    in the same buffer) and the backward's per-step arrays (dL/dy of the level above, dL/dx,
    dL/dgates and dL/dh of a level: B (G + 3) H floats)."""
    be = model.backend
    rng_state = model.rng.bit_generator.state
    try:
        sizes = []
        for T in (1, 2):
            if hasattr(model, "vocab_size"):
                inputs = np.zeros((T, batch_size), np.int64)
            else:
                inputs = be.zeros((T, batch_size, model.input_size), model.dtype)
            out, _, cache = model.forward(inputs, train=True)
            sizes.append(_cache_nbytes(cache) + out.nbytes)
    finally:
        model.rng.bit_generator.state = rng_state
    scratch = batch_size * (GATES[model.cell] + 3) * model.hidden_size * model.dtype.itemsize
    return sizes[1] - sizes[0] + scratch


def _cache_nbytes(cache):
    """Bytes of the arrays of a model's cache (through its ``to_dict``, arrays left in place)."""
    def walk(item):
        if isinstance(item, dict):
            return sum(walk(v) for v in item.values())
        if isinstance(item, (list, tuple)):
            return sum(walk(v) for v in item)
        return int(getattr(item, "nbytes", 0))
    return walk(cache.to_dict(lambda a: a))


def smallest_budget(model, batch_size):
    """The smallest feasible budget: one boundary state and one step with its activations."""
    return state_bytes(model, batch_size) + step_bytes(model, batch_size)


def check_budget(memory, model, batch_size):
    """ValueError (one line) where the budget ``memory`` (bytes) is below the smallest feasible
    one for ``model`` on B = ``batch_size`` rows; "sqrt" and None pass."""
    if not isinstance(memory, int):
        return
    need = smallest_budget(model, batch_size)
    if memory < need:
        raise ValueError(f"memory={memory:,} bytes is below the smallest feasible budget {need:,} bytes for this "
                         f"model at batch size {batch_size} (one boundary state and one step's activations)")
