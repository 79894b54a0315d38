"""The cpu backend skips the steps that rows of a variable-length batch do not run, and runs
the two directions of a bidirectional layer side by side:

* the large GEMMs over the rows run only (``_phases.valid_rows``: ``project_rows``,
  ``gather_rows``, ``finish_rows``) where few enough steps are padded, and over all T*B rows
  otherwise;
* each step's product over the rows running it only (``_panels.active_product``), on the
  per-step GEMM paths (panels, and MKL's packed form where the tests run with BPTT_BLAS=mkl);
* ``run_beside``: a bidirectional layer's directions on two threads, each layer call in one
  piece, against the same layer with its directions one after the other; an exception in
  either direction reaches the caller and leaves the threads usable.

Every result is checked against the float64 reference backend (tests/test_lengths.py's
check), with NaN-poisoned buffers, so a skipped row that should have been written shows.
"""

import threading

import numpy as np
import pytest

import bptt
import bptt_kernels.cpu as cpu
from bptt_kernels import CELLS
from bptt_kernels.cpu import _loop, _phases
from helpers import assert_close
from test_lengths import check_cpu_against_reference, poisoned_buffers  # noqa: F401 (fixture)

DTYPES = [np.float64, np.float32]


def record_phases(monkeypatch):
    """The names of the kernels that _phases hands to run_parts, in order."""
    names = []
    run_parts = _phases.run_parts
    monkeypatch.setattr(_phases, "run_parts", lambda kernel, args, parts, **kw: (
        names.append(kernel.__name__), run_parts(kernel, args, parts, **kw))[1])
    return names


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_rows_run_only(cell, threads, dtype, poisoned_buffers, monkeypatch):
    """Several rows per piece: panels with the products over the
    running rows, and the large GEMMs over the gathered rows; t_start inside (the window's
    rows only) and past some rows' ends."""
    monkeypatch.setattr(_loop, "THREADS", threads)
    monkeypatch.setattr(_loop, "MIN_WORK_FOR_THREADS", 0)
    monkeypatch.setattr(_loop, "MIN_PHASE_WORK_FOR_THREADS", 0)
    T, B = 16, 7
    lengths = np.array([T, 3, 9, 1, T - 1, 6, 12])
    names = record_phases(monkeypatch)
    check_cpu_against_reference(cell, dtype, T, B, 5, 9, lengths, (0, 5),
                                seed=[CELLS.index(cell), threads, 3])
    assert names.count("project_rows") == 2 and "project_inputs" not in names
    assert names.count("gather_rows") == 2 and names.count("finish_rows") == 2
    assert "finish_backward" not in names


@pytest.mark.parametrize("cell", CELLS)
def test_projected_input_with_rows_run_only(cell, poisoned_buffers, monkeypatch):
    """x W_ih^T given (w_ih None): the backward returns dL/d(x W_ih^T) with zeros at the
    padded steps, and the gathered GEMMs have no input side."""
    monkeypatch.setattr(_loop, "THREADS", 2)
    monkeypatch.setattr(_loop, "MIN_WORK_FOR_THREADS", 0)
    names = record_phases(monkeypatch)
    check_cpu_against_reference(cell, np.float64, 10, 4, 3, 6, np.array([10, 2, 7, 4]), (0, 3),
                                seed=[CELLS.index(cell), 4], projected=True)
    assert "gather_rows" in names


def test_few_padded_steps_use_all_rows(monkeypatch):
    """Where the rows run more than PACK_MAX_SHARE of the steps (or all of them), the GEMMs
    run over all T*B rows."""
    monkeypatch.setattr(_loop, "THREADS", 1)
    T, B = 20, 5
    names = record_phases(monkeypatch)
    check_cpu_against_reference("lstm", np.float64, T, B, 3, 4, np.array([T, T, T, T, T - 1]), (0,),
                                seed=5)
    assert "project_inputs" in names and "finish_backward" in names
    assert "project_rows" not in names and "gather_rows" not in names
    assert _phases.valid_rows(np.full(B, T), T, B) is None
    assert _phases.valid_rows(None, T, B) is None
    rows = _phases.valid_rows(np.array([2, 1, 3]), 3, 3, t_start=1)
    np.testing.assert_array_equal(rows, [1 * 3 + 0, 1 * 3 + 2, 2 * 3 + 2])


# ----------------------------------------------------------------------------------------
# The two directions side by side


@pytest.fixture
def cpu_backend():
    before = bptt.get_backend().NAME
    bptt.use_backend("cpu")
    yield
    bptt.use_backend(before)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_directions_beside_equal_one_after_the_other(cell, cpu_backend, rng, monkeypatch):
    """Two stacked bidirectional levels with lengths: the directions ran on two threads,
    each kernel call in one piece, and y, the final state, dx, the initial state's gradient
    and every parameter gradient equal those of the directions run one after the other."""
    monkeypatch.setattr(_loop, "THREADS", 2)
    monkeypatch.setattr(_loop, "MIN_WORK_FOR_THREADS", 0)
    T, B, I, H = 9, 5, 4, 6
    kwargs = {"nonlinearity": "tanh"} if cell == "rnn_tanh" else {}
    ctor = {"lstm": bptt.LSTM, "gru": bptt.GRU, "rnn_tanh": bptt.RNN}[cell]
    layer = ctor(I, H, num_layers=2, dtype=np.float64, seed=int(rng.integers(2**31)),
                 bidirectional=True, **kwargs)
    x = rng.standard_normal((T, B, I))
    dy = rng.standard_normal((T, B, 2 * H))
    lengths = np.array([9, 2, 5, 1, 8])

    threads, pieces = [], []
    forward_kernel, layer_threads = layer._forward_kernel, _loop.layer_threads

    def recording_kernel(*args, **kw):
        threads.append(threading.get_ident())
        return forward_kernel(*args, **kw)

    class recording_threads(layer_threads):
        def __enter__(self):
            pieces.append(self.parts)
            return super().__enter__()

    monkeypatch.setattr(layer, "_forward_kernel", recording_kernel)
    monkeypatch.setattr(_loop, "layer_threads", recording_threads)
    for module in (cpu.lstm, cpu.gru, cpu.rnn):
        monkeypatch.setattr(module, "layer_threads", recording_threads)

    def step():
        layer.zero_grad()
        y, final, cache = layer.forward(x, lengths=lengths)
        dx, dstate = layer.backward(dy, cache)
        states = [*final, *dstate] if cell == "lstm" else [final, dstate]
        return [y, dx, *states] + [g.copy() for g in layer.grads.values()]

    beside = step()
    assert len(set(threads)) == 2 and threading.get_ident() in threads
    assert pieces and set(pieces) == {1}                  # every kernel call in one piece
    threads.clear()
    pieces.clear()
    monkeypatch.delattr(cpu, "run_beside")
    apart = step()
    assert set(threads) == {threading.get_ident()} and 2 in pieces
    for k, (a, b) in enumerate(zip(beside, apart)):
        assert_close(a, b, np.float64, f"result {k}", 1e-12)


def test_run_beside_raises_either_error_and_recovers(monkeypatch):
    monkeypatch.setattr(_loop, "THREADS", 2)

    def fails():
        raise ValueError("the reverse direction failed")

    with pytest.raises(ValueError, match="the reverse direction failed"):
        _loop.run_beside(lambda: 1, fails, work=_loop.MIN_WORK_FOR_THREADS)
    with pytest.raises(ValueError, match="the reverse direction failed"):
        _loop.run_beside(fails, lambda: 2, work=_loop.MIN_WORK_FOR_THREADS)
    here = threading.get_ident()
    assert _loop.run_beside(threading.get_ident, threading.get_ident,
                            work=_loop.MIN_WORK_FOR_THREADS)[0] == here
    ids = _loop.run_beside(threading.get_ident, threading.get_ident, work=_loop.MIN_WORK_FOR_THREADS)
    assert ids[0] == here and ids[1] != here              # the team still works
    # small work, or a call from inside one of them: one after the other, here
    assert _loop.run_beside(threading.get_ident, threading.get_ident, work=0) == (here, here)
    nested = _loop.run_beside(lambda: _loop.run_beside(threading.get_ident, threading.get_ident,
                                                       work=_loop.MIN_WORK_FOR_THREADS),
                              lambda: None, work=_loop.MIN_WORK_FOR_THREADS)[0]
    assert nested == (here, here)
