"""Shared fixtures: a seeded random generator per test, the backends to run on, tolerances,
and small helpers (given as fixtures, since a second conftest.py elsewhere under tests/ can
shadow ``import conftest``).

Backends: every test that takes the ``backend`` fixture runs once per backend in
``LAYER_BACKENDS`` that imports here (the NumPy ``reference`` always, the Numba ``cpu``
where ``bptt_kernels.cpu`` imports), with that backend active for the test. A backend that
does not import is skipped with the import error as the reason.

Random inputs are fresh per test but reproducible: the seed is derived from the test id and
``BPTT_TEST_SEED`` (default 0); set ``BPTT_TEST_SEED`` to draw other inputs.

The error measure and the tolerances are those of ``helpers.py`` (``rel_err``, ``RTOL``);
the ``assert_close`` and ``tol`` fixtures hand them on.
"""

import importlib
import os
import zlib

import numpy as np
import pytest

import bptt
from bptt import backend as dispatcher
from helpers import RTOL, assert_close as _assert_within

LAYER_BACKENDS = ("reference", "cpu")


def backend_import_error(name):
    """None if ``bptt_kernels.<name>`` imports, else a one-line reason."""
    try:
        importlib.import_module(f"bptt_kernels.{name}")
    except Exception as e:  # ImportError, or an error inside a module being written
        return f"bptt_kernels.{name} does not import: {type(e).__name__}: {e}"
    return None


def backend_params(names=LAYER_BACKENDS):
    """pytest params for the given backend names, skipped with a reason where they do not import."""
    params = []
    for name in names:
        reason = backend_import_error(name)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=backend_params())
def backend(request):
    """The backend module named by the parameter, made current for the duration of the test."""
    with bptt.use_backend(request.param) as module:
        yield module


@pytest.fixture(autouse=True)
def _restore_backend():
    """Tests may switch backends for good; put the previous one back afterwards."""
    saved = dispatcher._current
    yield
    dispatcher._current = saved


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test id (and BPTT_TEST_SEED), printed on failure."""
    base = int(os.environ.get("BPTT_TEST_SEED", "0"))
    seed = zlib.crc32(request.node.nodeid.encode()) ^ base
    print(f"rng seed {seed} (BPTT_TEST_SEED={base})")
    return np.random.default_rng(seed)


def _assert_close(actual, expected, rtol, what):
    """helpers.assert_close with the tolerance given (rel_err <= rtol)."""
    _assert_within(actual, expected, dtype=None, what=what, rtol=rtol)


@pytest.fixture
def assert_close():
    """assert_close(actual, expected, rtol, what): helpers.rel_err(actual, expected) <= rtol,
    else fail naming ``what``."""
    return _assert_close


@pytest.fixture
def tol():
    """Relative tolerance per numpy dtype (helpers.RTOL: float64 1e-10, float32 1e-5)."""
    return lambda dtype: RTOL[np.dtype(dtype)]


def _make_layer(cell, input_size, hidden_size, num_layers=1, bias=True, dtype=np.float64, seed=0,
                bidirectional=False):
    """Build a bptt layer for a backend-interface cell name ('lstm', 'gru', 'rnn_tanh', 'rnn_relu')."""
    kw = dict(num_layers=num_layers, bias=bias, dtype=dtype, seed=seed, bidirectional=bidirectional)
    if cell == "lstm":
        return bptt.LSTM(input_size, hidden_size, **kw)
    if cell == "gru":
        return bptt.GRU(input_size, hidden_size, **kw)
    return bptt.RNN(input_size, hidden_size, nonlinearity=cell[4:], **kw)


def _random_state(layer, batch, rng):
    """A random (never zero) state for ``layer``: h [L,B,H], or (h, c) for LSTM."""
    shape = (layer.num_layers, batch, layer.hidden_size)
    parts = tuple(rng.standard_normal(shape).astype(layer.dtype) for _ in range(2 if layer.cell == "lstm" else 1))
    return parts if layer.cell == "lstm" else parts[0]


def _state_parts(state):
    """A state (h or (h, c)) as a tuple of host arrays."""
    parts = state if isinstance(state, tuple) else (state,)
    return tuple(np.asarray(p) for p in parts)


@pytest.fixture
def make_layer():
    """make_layer(cell, input_size, hidden_size, num_layers=1, bias=True, dtype=float64, seed=0,
    bidirectional=False)."""
    return _make_layer


@pytest.fixture
def random_state():
    """random_state(layer, batch, rng): random h [L,B,H] or (h, c)."""
    return _random_state


@pytest.fixture
def state_parts():
    """state_parts(state): h or (h, c) -> tuple of host arrays."""
    return _state_parts


def _check_projected_input(forward, backward, asarray, to_host, cell, dtype, shape, rng, rtol):
    """A recurrent forward given x W_ih^T with w_ih=None, and its backward with w_ih=dw_ih=None,
    must give what the ordinary calls give: y, the final state, dh, d(state) and the dW_hh,
    db_ih, db_hh increments; and in place of dx a g [T,B,G*H] with rows t < t_start zero,
    g W_ih = dx and g^T x = the ordinary call's dW_ih increment (checked in float64).

    forward(x, state, w_ih, w_hh, b_ih, b_hh) and backward(dy, dfinal, cache, w_ih, w_hh,
    dw_ih, dw_hh, db_ih, db_hh, t_start) are one backend's calls for ``cell``; asarray(a) and
    to_host(a) move host arrays in and out; shape is (T, B, I, H, t_start)."""
    T, B, I, H, t_start = shape
    GH = {"lstm": 4, "gru": 3}.get(cell, 1) * H

    def rand(*s):
        return rng.standard_normal(s).astype(dtype)

    x, w_ih, w_hh = rand(T, B, I), rand(GH, I) * 0.5, rand(GH, H) * 0.5
    b_ih, b_hh, dy = rand(GH), rand(GH), rand(T, B, H)
    n_states = 2 if cell == "lstm" else 1
    state = tuple(asarray(rand(B, H)) for _ in range(n_states))
    dfinal = tuple(asarray(rand(B, H)) for _ in range(n_states))
    grads0 = [rand(GH, I), rand(GH, H), rand(GH), rand(GH)]          # accumulated into
    dev = {name: asarray(a) for name, a in dict(w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, dy=dy).items()}

    y, final, cache = forward(asarray(x), state, dev["w_ih"], dev["w_hh"], dev["b_ih"], dev["b_hh"])
    grads = [asarray(g.copy()) for g in grads0]
    dx, dstate, dh = backward(dev["dy"], dfinal, cache, dev["w_ih"], dev["w_hh"], *grads, t_start)

    xw = (x.astype(np.float64) @ w_ih.T.astype(np.float64)).astype(dtype)   # T,B,G*H
    y_p, final_p, cache_p = forward(asarray(xw), state, None, dev["w_hh"], dev["b_ih"], dev["b_hh"])
    grads_p = [asarray(g.copy()) for g in grads0[1:]]
    g, dstate_p, dh_p = backward(dev["dy"], dfinal, cache_p, None, dev["w_hh"], None, *grads_p, t_start)

    for what, a, b in [("y", y_p, y), ("dh", dh_p, dh)] + [
            (f"final[{k}]", a, b) for k, (a, b) in enumerate(zip(final_p, final))] + [
            (f"dstate[{k}]", a, b) for k, (a, b) in enumerate(zip(dstate_p, dstate))] + [
            (name, a, b) for name, a, b in zip(("dw_hh", "db_ih", "db_hh"), grads_p, grads[1:])]:
        _assert_close(to_host(a), to_host(b), rtol, f"projected input: {what}")
    g = to_host(g).astype(np.float64)
    assert g.shape == (T, B, GH), f"dL/d(x W_ih^T) has shape {g.shape}, not {(T, B, GH)}"
    assert np.all(g[:t_start] == 0), "dL/d(x W_ih^T) rows before t_start must be zero"
    _assert_close(g @ w_ih.astype(np.float64), to_host(dx), rtol, "projected input: g W_ih against dx")
    dw_ih_step = to_host(grads[0]).astype(np.float64) - grads0[0]
    _assert_close(g.reshape(-1, GH).T @ x.reshape(-1, I).astype(np.float64), dw_ih_step,
                  rtol * 10, "projected input: g^T x against the dW_ih increment")


@pytest.fixture
def check_projected_input():
    """check_projected_input(forward, backward, asarray, to_host, cell, dtype, shape, rng, rtol)
    (see _check_projected_input)."""
    return _check_projected_input
