"""bptt_kernels.host: the host-side logic every backend shares, written once over an array
module ``xp`` (numpy or cupy).

* :mod:`.cells`     the cell and gate tables (CELLS, GATES, STATE_PARTS, SEPARATE_HIDDEN_GRAD);
* :mod:`.cache`     :class:`RecurrentCache`, the one cache layout of every backend, and its
                    conversion to and from a dict of host arrays (checkpoints);
* :mod:`.checks`    the recurrent calls' argument checks, returning normalised arguments;
* :mod:`.gradients` the GEMMs after a backward time loop (dW_ih, dW_hh, biases, dx);
* :mod:`.blocks`    the time blocks in which gradient sums over time run (``t_origin``);
* :mod:`.rows`      row-wise products whose rows round alike in calls of any size.

A backend keeps only what is its own: allocation, path choice and the time loop.
"""

import importlib

# name -> submodule; imported on first use (PEP 562), so that ``bptt_kernels.host.cells``
# (plain Python) loads without NumPy: the command line reads the cell names before parsing
_WHERE = {
    "CELLS": "cells", "GATES": "cells", "STATE_PARTS": "cells", "SEPARATE_HIDDEN_GRAD": "cells",
    "RecurrentCache": "cache", "CELL_FIELDS": "cache", "field_shapes": "cache",
    "cache_to_arrays": "cache", "cache_from_arrays": "cache",
    "ForwardCall": "checks", "BackwardCall": "checks", "check_forward": "checks",
    "check_backward": "checks", "check_input_weight_pair": "checks",
    "as_lengths": "checks",
    "finish_backward": "gradients", "states_entering": "gradients",
}
__all__ = list(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
