"""Loss functions on the backend's device arrays: each returns ``(loss, dout)`` in one call.

``loss`` is a Python float; ``dout`` is dL/d(outputs), same shape as the outputs, ready for
``model.backward``. Reductions follow PyTorch's defaults (``reduction="mean"``), so a loss and
its gradient equal ``torch.nn.CrossEntropyLoss()`` / ``torch.nn.MSELoss()`` on the same arrays.

Both take a ``count``: the number of terms the mean divides by. By default it is the number of
terms in *this* call; the trainer passes the count of a whole window when the window's outputs
come in several pieces (a chunk split at document boundaries), so the pieces' losses and
gradients add up to those of the whole window.
"""

import numpy as np


def count_targets(targets):
    """Number of counted cross-entropy targets (ids >= 0) in a host int array."""
    return int(np.count_nonzero(np.asarray(targets) >= 0))


def cross_entropy(backend, logits, targets, count=None, overwrite=False):
    """Fused softmax cross-entropy, mean over counted targets (a target < 0 is ignored).

    logits  [..., V] device array (float32/float64)
    targets [...]    host int ids; -1 (any negative) = no loss at that position
    count   the mean's divisor (default: targets >= 0 here); 0 terms gives (0.0, zeros)
    overwrite  True: dlogits is written into ``logits`` itself (saves a [N,V] buffer)
    Returns (loss: float, dlogits [..., V]).
    """
    V = logits.shape[-1]
    host_targets = np.asarray(targets)
    if host_targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} (logits {tuple(logits.shape)}), "
                         f"got {host_targets.shape}")
    if host_targets.size and host_targets.max() >= V:
        raise ValueError(f"targets must be < vocabulary size {V}; got max id {int(host_targets.max())}")
    if count is None:
        count = count_targets(host_targets)
    dlogits = logits if overwrite else backend.xp.empty_like(logits)
    if count == 0:
        dlogits[...] = 0
        return 0.0, dlogits
    total = backend.softmax_cross_entropy(logits.reshape(-1, V),
                                          backend.asarray(host_targets.reshape(-1), np.int64),
                                          dlogits.reshape(-1, V), 1.0 / count)
    return total / count, dlogits


def mse(backend, outputs, targets, count=None):
    """Mean squared error, mean over all elements (``torch.nn.MSELoss()``).

    outputs [...] device array; targets same shape (host array); count: the mean's divisor
    (default outputs.size). Returns (loss: float, doutputs = 2 (outputs - targets) / count).
    """
    if tuple(np.shape(targets)) != tuple(outputs.shape):
        raise ValueError(f"targets must have the outputs' shape {tuple(outputs.shape)}, got {tuple(np.shape(targets))}")
    if count is None:
        count = outputs.size
    diff = outputs - backend.asarray(targets, outputs.dtype)
    loss = backend.sum_of_squares([diff]) / count
    diff *= 2.0 / count
    return loss, diff
