"""Synthetic long-range sequence tasks (batch-major data, as ``Trainer.fit`` takes for a SequenceModel).

copy (the "copy memory" task of Hochreiter & Schmidhuber 1997, Arjovsky et al. 2016)
    Remember ``n_symbols`` random symbols from an alphabet of 8, wait ``lag`` blank steps,
    see a delimiter, then output the symbols in order. Input channels (one-hot, I = 10):
    0..7 the symbols, 8 blank, 9 delimiter. Layout of one sequence, T = 2*S + lag + 1::

        t:        0 .. S-1     S .. S+lag-1   S+lag       S+lag+1 .. 2S+lag
        input:    symbols      blank          delimiter   blank
        target:   -1           -1             -1          the symbols, in order

    Symbol ``i`` must be carried ``S + lag + 1`` steps. Targets are int64 [N, T] with -1 where no
    output is scored (the trainer's cross-entropy ignores them). Chance recall accuracy is 1/8.

adding (Hochreiter & Schmidhuber 1997; in the form of Le et al. 2015 and Arjovsky et al. 2016)
    Two input channels: channel 0 a value drawn uniformly from [0, 1), channel 1 a marker that
    is 1 at exactly two steps (one in the first half of the sequence, one in the second) and 0
    elsewhere. The target is the sum of the two marked values, float [N, 1], scored by MSE at
    the last step (a ``readout="last_step"`` model). Always answering 1 scores an expected MSE
    of Var(U1 + U2) = 1/6 = 0.1667 (:data:`ADDING_BASELINE_MSE`); the figure 0.1767 often quoted
    from Le et al. 2015 is not what this distribution gives, so the exact value is used here.

Every generator takes a ``seed`` and returns the same arrays for the same arguments.
"""

import numpy as np

COPY_ALPHABET = 8
COPY_BLANK = 8
COPY_DELIMITER = 9
COPY_INPUT_SIZE = 10
ADDING_BASELINE_MSE = 1.0 / 6.0  # E[(U1 + U2 - 1)^2] for U1, U2 ~ U[0, 1)

TASKS = ("copy", "adding")


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def copy_task(n, lag, n_symbols=4, seed=None):
    """The copy-memory task: ``(inputs float32 [n, T, 10], targets int64 [n, T])``, T = 2*S + lag + 1.

    n: sequences; lag: blank steps between the last symbol and the delimiter (>= 0);
    n_symbols (S): symbols to remember; seed: for ``numpy.random.default_rng``.
    """
    n = _positive_int("n", n)
    lag = _positive_int("lag", lag, minimum=0)
    s = _positive_int("n_symbols", n_symbols)
    rng = np.random.default_rng(seed)
    steps = 2 * s + lag + 1
    symbols = rng.integers(0, COPY_ALPHABET, size=(n, s))
    channel = np.full((n, steps), COPY_BLANK, dtype=np.int64)
    channel[:, :s] = symbols
    channel[:, s + lag] = COPY_DELIMITER
    inputs = np.eye(COPY_INPUT_SIZE, dtype=np.float32)[channel]   # n, T, 10
    targets = np.full((n, steps), -1, dtype=np.int64)
    targets[:, s + lag + 1:] = symbols
    return inputs, targets


def recall_accuracy(outputs, targets):
    """Fraction of scored positions (target >= 0) where ``argmax(outputs)`` equals the target.

    outputs: [n, T, O] scores (logits or probabilities); targets: int [n, T], -1 = not scored.
    Returns a float in [0, 1] (chance is 1/8 for the copy task).
    """
    outputs = np.asarray(outputs)
    targets = np.asarray(targets)
    if outputs.ndim != 3 or outputs.shape[:2] != targets.shape:
        raise ValueError(f"outputs must be [n, T, O] matching targets [n, T]; got outputs "
                         f"{outputs.shape}, targets {targets.shape}")
    scored = targets >= 0
    if not scored.any():
        raise ValueError("targets have no scored position (all -1)")
    return float(np.mean(outputs.argmax(axis=-1)[scored] == targets[scored]))


def adding_task(n, length, seed=None):
    """The adding problem: ``(inputs float32 [n, length, 2], targets float32 [n, 1])``.

    Channel 0: values U[0, 1); channel 1: markers at one step of the first half and one of the
    second half (length >= 2); target: the sum of the two marked values.
    """
    n = _positive_int("n", n)
    length = _positive_int("length", length, minimum=2)
    rng = np.random.default_rng(seed)
    half = length // 2
    values = rng.random((n, length))
    first = rng.integers(0, half, size=n)
    second = rng.integers(half, length, size=n)
    rows = np.arange(n)
    markers = np.zeros((n, length))
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    inputs = np.stack([values, markers], axis=-1).astype(np.float32)   # n, T, 2
    targets = (values[rows, first] + values[rows, second]).astype(np.float32)[:, None]
    return inputs, targets


def mse(predictions, targets):
    """Mean squared error (float) between ``predictions`` and ``targets`` of the same shape."""
    predictions = np.asarray(predictions, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {predictions.shape} and targets {targets.shape} differ in shape")
    return float(np.mean((predictions - targets) ** 2))


def make_task(name, n, lag, n_symbols=4, seed=None):
    """``(inputs, targets)`` of task ``name``: ``copy`` with this ``lag``, or ``adding`` of length ``lag``."""
    if name == "copy":
        return copy_task(n, lag, n_symbols=n_symbols, seed=seed)
    if name == "adding":
        return adding_task(n, lag, seed=seed)
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")


def predict(model, inputs, batch_size=256):
    """Run a SequenceModel on batch-major ``inputs`` [n, T, I] (inference mode, fresh state per
    sequence); returns host float outputs [n, T, O] (every-step readout) or [n, O] (last-step)."""
    inputs = np.asarray(inputs)
    backend = model.backend if hasattr(model, "backend") else None
    outs = []
    for start in range(0, len(inputs), batch_size):
        x = np.ascontiguousarray(inputs[start:start + batch_size].transpose(1, 0, 2))   # T, B, I
        out, _, _ = model.forward(x, None, train=False)
        out = backend.to_host(out) if backend is not None else np.asarray(out)
        outs.append(out.transpose(1, 0, 2) if out.ndim == 3 else out)
    return np.concatenate(outs, axis=0)
