"""Synthetic tasks: layouts, determinism, the adding baseline, the recall metric."""

import numpy as np
import pytest

from bptt.tasks import (ADDING_BASELINE_MSE, COPY_BLANK, COPY_DELIMITER, adding_task, copy_task,
                        make_task, mse, recall_accuracy)


def test_copy_layout():
    s, lag = 4, 7
    x, y = copy_task(32, lag, n_symbols=s, seed=1)
    steps = 2 * s + lag + 1
    assert x.shape == (32, steps, 10) and x.dtype == np.float32
    assert y.shape == (32, steps) and y.dtype == np.int64
    assert (x.sum(-1) == 1).all()                          # one-hot everywhere
    channel = x.argmax(-1)
    symbols = channel[:, :s]
    assert (symbols < 8).all()
    assert (channel[:, s:s + lag] == COPY_BLANK).all()
    assert (channel[:, s + lag] == COPY_DELIMITER).all()
    assert (channel[:, s + lag + 1:] == COPY_BLANK).all()
    assert (y[:, : s + lag + 1] == -1).all()
    np.testing.assert_array_equal(y[:, s + lag + 1:], symbols)


def test_tasks_are_deterministic_per_seed():
    for name in ("copy", "adding"):
        a, b = make_task(name, 16, 12, seed=3), make_task(name, 16, 12, seed=3)
        c = make_task(name, 16, 12, seed=4)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert not np.array_equal(a[0], c[0])


def test_adding_layout():
    x, y = adding_task(64, 20, seed=0)
    assert x.shape == (64, 20, 2) and y.shape == (64, 1) and x.dtype == y.dtype == np.float32
    markers = x[..., 1]
    assert (markers.sum(1) == 2).all()
    assert (markers[:, :10].sum(1) == 1).all() and (markers[:, 10:].sum(1) == 1).all()
    np.testing.assert_allclose(y[:, 0], (x[..., 0] * markers).sum(1), rtol=1e-6)


def test_adding_baseline_of_always_answering_one():
    _, y = adding_task(200_000, 10, seed=5)
    baseline = mse(np.ones_like(y), y)
    # standard error of the mean of (S-1)^2 is ~sqrt(Var/N) ~ 4e-4 here
    assert abs(baseline - ADDING_BASELINE_MSE) < 3e-3
    assert abs(ADDING_BASELINE_MSE - 0.1667) < 1e-4


def test_recall_accuracy_counts_only_scored_positions():
    _, y = copy_task(10, 3, n_symbols=4, seed=2)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=y.shape + (8,))
    perfect = logits.copy()
    scored = y >= 0
    perfect[scored, y[scored]] = 100.0
    assert recall_accuracy(perfect, y) == 1.0
    # break exactly 5 of the 40 scored predictions
    wrong = perfect.copy()
    rows, cols = np.nonzero(scored)
    for r, c in zip(rows[:5], cols[:5]):
        wrong[r, c, y[r, c]] = -100.0
    assert recall_accuracy(wrong, y) == pytest.approx(35 / 40)
    # unscored positions never matter
    junk = perfect.copy()
    junk[~scored] = rng.normal(size=(int((~scored).sum()), 8))
    assert recall_accuracy(junk, y) == 1.0


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="lag"):
        copy_task(4, -1)
    with pytest.raises(ValueError, match="length"):
        adding_task(4, 1)
    with pytest.raises(ValueError, match="unknown task"):
        make_task("reverse", 4, 4)
    with pytest.raises(ValueError, match="outputs"):
        recall_accuracy(np.zeros((2, 3)), np.zeros((2, 3), dtype=int))


def test_task_table_builds_models_that_fit_the_data():
    """Each task's model takes its inputs and gives outputs its scores read."""
    from bptt.tasks import TASK_DEFAULTS, TASK_TABLE, TASKS, predict, task
    assert TASKS == ("copy", "adding", "varlen")
    assert task("adding").defaults == dict(TASK_DEFAULTS, lag=100, epochs=3, max_steps=3000)
    for name in TASKS:
        spec = task(name)
        assert spec is TASK_TABLE[name] and spec.name == name
        inputs, targets, *lengths = spec.generate(6, 5, 3, 0)        # lengths: [6] for varlen
        assert bool(lengths) == spec.variable_lengths
        model = spec.build_model(7, num_layers=2, seed=1)
        assert (model.input_size, model.output_size, model.readout) == \
            (spec.input_size, spec.output_size, spec.readout) == (inputs.shape[2], model.output_size, spec.readout)
        scores = spec.scores(predict(model, inputs, lengths=lengths[0] if lengths else None), targets)
        assert all(np.isfinite(v) for v in scores.values())
    assert task("copy").uses_symbols and not task("adding").uses_symbols
    with pytest.raises(ValueError, match="unknown task 'reverse'; known tasks: copy, adding, varlen"):
        task("reverse")


def test_importing_the_table_loads_no_numpy():
    import subprocess
    import sys
    code = "import sys, bptt.tasks; print('numpy' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr
