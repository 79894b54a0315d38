"""bptt_kernels.host: the host-side logic every backend shares, written once over an array
module ``xp`` (numpy or cupy).

* :mod:`.cells`     the cell and gate tables (CELLS, GATES, STATE_PARTS, SEPARATE_HIDDEN_GRAD);
* :mod:`.cache`     :class:`RecurrentCache`, the one cache layout of every backend, and its
                    conversion to and from a dict of host arrays (checkpoints);
* :mod:`.checks`    the recurrent calls' argument checks, returning normalised arguments;
* :mod:`.gradients` the GEMMs after a backward time loop (dW_ih, dW_hh, biases, dx).

A backend keeps only what is its own: allocation, path choice and the time loop.
"""

from .cache import RecurrentCache, cache_from_arrays, cache_to_arrays
from .cells import CELLS, GATES, SEPARATE_HIDDEN_GRAD, STATE_PARTS
from .checks import BackwardCall, ForwardCall, check_backward, check_forward, check_input_weight_pair
from .gradients import finish_backward, states_entering

__all__ = [
    "CELLS", "GATES", "STATE_PARTS", "SEPARATE_HIDDEN_GRAD",
    "RecurrentCache", "cache_to_arrays", "cache_from_arrays",
    "ForwardCall", "BackwardCall", "check_forward", "check_backward", "check_input_weight_pair",
    "finish_backward", "states_entering",
]
