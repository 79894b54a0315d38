"""Helpers shared by the test files (plain functions; ``import helpers`` works from every
folder under tests/, since pytest puts tests/ on the path for its conftest.py).

* :func:`rel_err`: the one error measure of the suite, max|actual - expected| / max|expected|;
  a non-finite actual value (a poisoned element a kernel did not write) fails;
* :data:`RTOL`: the tolerance per dtype against the float64 reference and torch;
* :func:`random_layer_problem`: fresh random host arrays for one recurrent layer call.
"""

import numpy as np

from bptt_kernels import GATES, STATE_PARTS

# max relative error against the float64 reference (and torch autograd), per dtype
RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}


def rel_err(actual, expected):
    """max|actual - expected| / max|expected| in float64 (max|actual - expected| where
    expected is all zero). Shapes must match; a NaN or inf in ``actual`` fails."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != expected {expected.shape}"
    assert np.all(np.isfinite(actual)), "non-finite values (an element a kernel did not write?)"
    if not expected.size:
        return 0.0
    scale = np.max(np.abs(expected))
    diff = np.max(np.abs(actual - expected))
    return float(diff / scale if scale > 0 else diff)


def assert_close(actual, expected, dtype, what, rtol=None):
    """rel_err(actual, expected) <= rtol (default RTOL[dtype]), with ``what`` in the message."""
    rtol = RTOL[np.dtype(dtype)] if rtol is None else rtol
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


def random_layer_problem(rng, cell, T, B, I, H, dtype):
    """Random host arrays of ``dtype`` for one layer call, never zero: a dict with
    x [T,B,I], state (tuple of [B,H]), w_ih [G*H,I], w_hh [G*H,H], b_ih, b_hh [G*H]
    (PyTorch's init range), dy [T,B,H], dfinal (like state) and grads0 (dw_ih, dw_hh, db_ih,
    db_hh: non-zero starting gradients, so that a backward's += is checked)."""
    G = GATES[cell]
    s = 1 / np.sqrt(H)
    n_state = len(STATE_PARTS[cell])
    p = {
        "x": rng.standard_normal((T, B, I)),
        "state": tuple(rng.standard_normal((B, H)) for _ in range(n_state)),
        "w_ih": rng.uniform(-s, s, (G * H, I)), "w_hh": rng.uniform(-s, s, (G * H, H)),
        "b_ih": rng.uniform(-s, s, G * H), "b_hh": rng.uniform(-s, s, G * H),
        "dy": rng.standard_normal((T, B, H)),
        "dfinal": tuple(rng.standard_normal((B, H)) for _ in range(n_state)),
        "grads0": tuple(rng.standard_normal(shape)
                        for shape in ((G * H, I), (G * H, H), (G * H,), (G * H,))),
    }
    cast = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    return {k: tuple(cast(a) for a in v) if isinstance(v, tuple) else cast(v) for k, v in p.items()}


def force_unit_split(monkeypatch, workers):
    """Make every cpu layer call run on ``workers`` threads with its time loops cut by hidden
    units (every weight counted as large). Returns the list that records, per phase run, whether
    its pieces ran together (the unit split's barrier needs them to)."""
    from bptt_kernels.cpu import _loop
    monkeypatch.setattr(_loop, "THREADS", workers)
    monkeypatch.setattr(_loop, "MIN_WORK_FOR_THREADS", 0)
    for threshold in ("UNIT_SPLIT_WEIGHT_FEW_ROWS", "UNIT_SPLIT_WEIGHT"):
        monkeypatch.setattr(_loop, threshold, 1)
    together = []
    run_parts = _loop.run_parts
    monkeypatch.setattr(_loop, "run_parts", lambda k, a, p, **kw: (
        together.append(kw.get("together", False)), run_parts(k, a, p, **kw))[1])
    return together
