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

varlen (sequences of variable length, classified at each one's own last step)
    Each sequence has its own length, drawn uniformly from ``VARLEN_MIN_LENGTH`` (5) .. T, and is
    padded to T steps with random symbols (noise: only the lengths say where a sequence ends).
    Every step is a one-hot symbol from an alphabet of 8 (I = 8). The label, one of 4, is two
    bits: whether the first symbol is in the upper half of the alphabet (4..7), and whether the
    second is. A forward reader must carry them across the sequence's whole own length, to its
    last step, where a ``readout="last_step"`` model answers (a bidirectional model's reverse
    direction ends on them). Returns (inputs float32 [n, T, 8], labels int64 [n], lengths int64 [n]), the data
    ``Trainer.fit`` takes for variable lengths (full BPTT). Chance accuracy is 1/4.

Every generator takes a ``seed`` and returns the same arrays for the same arguments.

:data:`TASK_TABLE` says how each task is trained by ``bptt train --task NAME``: its data, the
model that fits it (input and output sizes, readout), its validation scores and its training
defaults. The command line reads the table before it parses its arguments, so this module
imports NumPy only inside the functions that need it.
"""

import numbers
from typing import Callable, NamedTuple

COPY_ALPHABET = 8
COPY_BLANK = 8
COPY_DELIMITER = 9
COPY_INPUT_SIZE = 10
ADDING_INPUT_SIZE = 2
ADDING_BASELINE_MSE = 1.0 / 6.0  # E[(U1 + U2 - 1)^2] for U1, U2 ~ U[0, 1)
VARLEN_ALPHABET = 8
VARLEN_CLASSES = 4
VARLEN_MIN_LENGTH = 5


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def copy_task(n, lag, n_symbols=4, seed=None):
    """The copy-memory task: ``(inputs float32 [n, T, 10], targets int64 [n, T])``, T = 2*S + lag + 1.

    n: sequences; lag: blank steps between the last symbol and the delimiter (>= 0);
    n_symbols (S): symbols to remember; seed: for ``numpy.random.default_rng``.
    """
    import numpy as np
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
    import numpy as np
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
    import numpy as np
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


def varlen_task(n, max_length, seed=None):
    """Variable-length classification: ``(inputs float32 [n, T, 8], labels int64 [n], lengths
    int64 [n])``, T = ``max_length`` (>= 5); lengths uniform in 5..T, the steps past a sequence's
    length random symbols; label = 2 [first symbol >= 4] + [second symbol >= 4], in 0..3.
    """
    import numpy as np
    n = _positive_int("n", n)
    steps = _positive_int("max_length", max_length, minimum=VARLEN_MIN_LENGTH)
    rng = np.random.default_rng(seed)
    symbols = rng.integers(0, VARLEN_ALPHABET, size=(n, steps))          # padding included: noise
    inputs = np.eye(VARLEN_ALPHABET, dtype=np.float32)[symbols]          # n, T, 8
    upper = symbols[:, :2] >= VARLEN_ALPHABET // 2                        # n, 2: the label's bits
    labels = 2 * upper[:, 0] + upper[:, 1]
    lengths = rng.integers(VARLEN_MIN_LENGTH, steps + 1, size=n)
    return inputs, labels.astype(np.int64), lengths.astype(np.int64)


def accuracy(outputs, labels):
    """Fraction of rows where ``argmax(outputs)`` equals the label: outputs [n, O], labels int [n]."""
    import numpy as np
    outputs, labels = np.asarray(outputs), np.asarray(labels)
    if outputs.ndim != 2 or outputs.shape[:1] != labels.shape:
        raise ValueError(f"outputs must be [n, O] matching labels [n]; got outputs {outputs.shape}, "
                         f"labels {labels.shape}")
    return float(np.mean(outputs.argmax(axis=-1) == labels))


def mse(predictions, targets):
    """Mean squared error (float) between ``predictions`` and ``targets`` of the same shape."""
    import numpy as np
    predictions = np.asarray(predictions, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {predictions.shape} and targets {targets.shape} differ in shape")
    return float(np.mean((predictions - targets) ** 2))


def make_task(name, n, lag, n_symbols=4, seed=None):
    """The data of task ``name``: ``(inputs, targets)`` of ``copy`` with this ``lag`` or ``adding``
    of length ``lag``; ``(inputs, labels, lengths)`` of ``varlen`` with sequences up to ``lag`` steps."""
    return task(name).generate(n, lag, n_symbols, seed)


def predict(model, inputs, batch_size=256, lengths=None):
    """Run a SequenceModel on batch-major ``inputs`` [n, T, I] (inference mode, fresh state per
    sequence; ``lengths`` [n]: each sequence's own steps); returns host float outputs [n, T, O]
    (every-step readout) or [n, O] (last-step)."""
    import numpy as np
    inputs = np.asarray(inputs)
    backend = model.backend if hasattr(model, "backend") else None
    outs = []
    for start in range(0, len(inputs), batch_size):
        x = np.ascontiguousarray(inputs[start:start + batch_size].transpose(1, 0, 2))   # T, B, I
        rows = {} if lengths is None else {"lengths": np.asarray(lengths)[start:start + batch_size]}
        out, _, _ = model.forward(x, None, train=False, **rows)
        out = backend.to_host(out) if backend is not None else np.asarray(out)
        outs.append(out.transpose(1, 0, 2) if out.ndim == 3 else out)
    return np.concatenate(outs, axis=0)


# ---------------------------------------------------------------------------------------------
# How `bptt train --task NAME` trains each task


class Task(NamedTuple):
    """A task as a training run sees it.

    generate(n, lag, n_symbols, seed) -> (inputs, targets), or (inputs, targets, lengths) where
    ``variable_lengths`` (trained with full BPTT only); input_size, output_size, readout: the
    SequenceModel that fits it; scores(outputs, targets) -> dict of validation scores of the
    model's outputs (:func:`predict`); uses_symbols: whether ``n_symbols`` applies; defaults: the
    training settings of ``bptt train --task NAME`` (flags of that command).
    """

    name: str
    generate: Callable
    input_size: int
    output_size: int
    readout: str
    scores: Callable
    uses_symbols: bool
    defaults: dict
    variable_lengths: bool = False

    def build_model(self, hidden_size, **kwargs):
        """A fresh ``SequenceModel`` for this task (``kwargs``: num_layers, cell, dtype, seed...)."""
        from bptt.models import SequenceModel
        return SequenceModel(self.input_size, hidden_size, self.output_size, readout=self.readout, **kwargs)


def _copy_scores(outputs, targets):
    return {"recall_accuracy": recall_accuracy(outputs, targets), "chance_accuracy": 1.0 / COPY_ALPHABET}


def _varlen_scores(outputs, labels):
    return {"accuracy": accuracy(outputs, labels), "chance_accuracy": 1.0 / VARLEN_CLASSES}


def _adding_scores(outputs, targets):
    return {"val_mse": mse(outputs, targets), "baseline_mse": ADDING_BASELINE_MSE}


# Training defaults of every task: full BPTT unless k1/k2 are given. The copy task's
# T = 2*4 + 20 + 1 = 29 steps fit TBPTT chunks of k1 = 10 (the last chunk, 9 steps, holds every
# recall position), and the LSTM starts with forget gates near 1 (sigmoid(2) = 0.88) so that
# gradients survive the 25-step dependency early in training (with 0, PyTorch's init, full BPTT
# needs many more updates; with 3 the random memory alone lets TBPTT(10, 10) decode some
# symbols, which blurs the comparison). n_valid: held-out sequences for validation.
TASK_DEFAULTS = dict(cell="lstm", hidden_size=64, num_layers=1, dropout=0.0, forget_bias=2.0, k1=None,
                     k2=None, batch_size=32, optimizer="adam", lr=1e-2, clip=1.0, epochs=1, max_steps=1000,
                     lag=20, n_symbols=4, n_train=32_000, n_valid=1000)
# The adding problem over 100 steps: 3000 updates bring the MSE from the 0.167 baseline to ~1e-3.
ADDING_DEFAULTS = dict(lag=100, epochs=3, max_steps=3000)
# varlen: sequences of 5..50 steps (1000 updates: accuracy 1.0 for an LSTM, see the README).
VARLEN_DEFAULTS = dict(lag=50)
VALID_SEED_OFFSET = 1_000_003   # validation sequences are generated with seed + this
EVAL_BATCH = 250                # sequences per batch when evaluating

TASK_TABLE = {
    "copy": Task("copy", lambda n, lag, n_symbols, seed: copy_task(n, lag, n_symbols=n_symbols, seed=seed),
                 COPY_INPUT_SIZE, COPY_ALPHABET, "every_step", _copy_scores, True, dict(TASK_DEFAULTS)),
    "adding": Task("adding", lambda n, lag, n_symbols, seed: adding_task(n, lag, seed=seed),
                   ADDING_INPUT_SIZE, 1, "last_step", _adding_scores, False, {**TASK_DEFAULTS, **ADDING_DEFAULTS}),
    "varlen": Task("varlen", lambda n, lag, n_symbols, seed: varlen_task(n, lag, seed=seed),
                   VARLEN_ALPHABET, VARLEN_CLASSES, "last_step", _varlen_scores, False,
                   {**TASK_DEFAULTS, **VARLEN_DEFAULTS}, variable_lengths=True),
}
TASKS = tuple(TASK_TABLE)


def task(name):
    """The :class:`Task` called ``name`` (ValueError for an unknown one)."""
    try:
        return TASK_TABLE[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
