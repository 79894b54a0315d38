"""The backend contract, checked the same way on every backend (``test_conformance.py`` runs
it on reference, cpu and cupy's host emulation; ``cudasim/test_conformance_cuda.py`` on the
Numba-CUDA backend under the simulator).

* the same function names and signatures as the reference backend;
* the same cache type and fields (``bptt_kernels.host.RecurrentCache``);
* the same error (type and message) for the same bad argument;
* a backward over a cache made by another backend (the reference) equals one over its own.
"""

import inspect

import numpy as np
import pytest

import bptt_kernels.reference as ref
from bptt_kernels import CELLS, GATES
from bptt_kernels.host import CELL_FIELDS, RecurrentCache
from helpers import RTOL, assert_close, random_layer_problem



def check_signatures(be):
    """Every recurrent function exists with the reference's parameters and defaults."""
    for cell in CELLS:
        for kind in ("forward", "backward"):
            name = f"{cell}_{kind}"
            want = inspect.signature(getattr(ref, name)).parameters
            got = inspect.signature(getattr(be, name)).parameters
            assert [(p.name, p.default) for p in got.values()] == \
                   [(p.name, p.default) for p in want.values()], f"{be.NAME}.{name}"


def _device_problem(be, p):
    """The problem's arrays as the backend's arrays."""
    return {k: tuple(be.asarray(a, a.dtype) for a in v) if isinstance(v, tuple)
            else be.asarray(v, v.dtype) for k, v in p.items()}


def run_layer(be, cell, p, t_start=0, cache=None):
    """Forward (or a given cache) and backward on backend ``be`` -> host arrays
    (y, final state, dx, dstate, dh, grads, cache)."""
    d = _device_problem(be, p)
    fwd, bwd = getattr(be, f"{cell}_forward"), getattr(be, f"{cell}_backward")
    y, final, own_cache = fwd(d["x"], d["state"], d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"])
    cache = own_cache if cache is None else cache
    grads = [be.asarray(g, g.dtype) for g in p["grads0"]]
    dx, dstate, dh = bwd(d["dy"], d["dfinal"], cache, d["w_ih"], d["w_hh"], *grads,
                         t_start=t_start)
    host = be.to_host
    return (host(y), [host(s) for s in final], host(dx), [host(s) for s in dstate], host(dh),
            [host(g) for g in grads], own_cache)


def check_cache_layout(be, rng, dtype=np.float64):
    """Forward returns a RecurrentCache of its cell whose fields hold the documented arrays."""
    T, B, I, H = 3, 2, 4, 5
    for cell in CELLS:
        p = random_layer_problem(rng, cell, T, B, I, H, dtype)
        cache = run_layer(be, cell, p)[-1]
        assert type(cache) is RecurrentCache, f"{be.NAME} {cell}: {type(cache).__name__}"
        assert cache.cell == cell
        G = GATES[cell]
        shapes = {"x": (T, B, I), "h0": (B, H), "c0": (B, H), "y": (T, B, H),
                  "gates": (T, B, G * H), "c": (T, B, H), "hn": (T, B, H), "tanh_c": (T, B, H)}
        for field in ("x", "h0", "c0", "y", "gates", "c", "hn", "tanh_c"):
            value = getattr(cache, field)
            if field in CELL_FIELDS[cell] or (field == "tanh_c" and cell == "lstm"
                                               and value is not None):
                assert tuple(value.shape) == shapes[field], f"{be.NAME} {cell}.{field}"
                assert value.dtype == dtype
            else:
                assert value is None, f"{be.NAME} {cell}: {field} should be None"
        np.testing.assert_array_equal(be.to_host(cache.h0), p["state"][0])
        np.testing.assert_array_equal(be.to_host(cache.x), p["x"])


def bad_calls(be, rng):
    """(description, call) pairs: each call must raise. Arrays are the backend's own."""
    T, B, I, H = 3, 2, 4, 5
    p = _device_problem(be, random_layer_problem(rng, "lstm", T, B, I, H, np.float32))
    x, st, w_ih, w_hh, b_ih, b_hh = (p[k] for k in ("x", "state", "w_ih", "w_hh", "b_ih", "b_hh"))
    y, _, cache = be.lstm_forward(x, st, w_ih, w_hh, b_ih, b_hh)
    g = [be.zeros(tuple(a.shape), np.float32) for a in (w_ih, w_hh, b_ih, b_hh)]
    dy = be.asarray(np.ones((T, B, H)), np.float32)
    f64 = lambda a: be.asarray(be.to_host(a), np.float64)  # noqa: E731
    i64 = be.asarray(np.ones((T, B, I)), np.int64)
    fwd, bwd = be.lstm_forward, be.lstm_backward
    return [
        ("w_hh rows", lambda: fwd(x, st, w_ih, w_hh[:-1], b_ih, b_hh)),
        ("w_ih columns", lambda: fwd(x, st, w_ih[:, :-1], w_hh, b_ih, b_hh)),
        ("b_hh dtype", lambda: fwd(x, st, w_ih, w_hh, b_ih, f64(b_hh))),
        ("x dtype int", lambda: fwd(i64, st, w_ih, w_hh, b_ih, b_hh)),
        ("x a list", lambda: fwd(be.to_host(x).tolist(), st, w_ih, w_hh, b_ih, b_hh)),
        ("x 2-D", lambda: fwd(x[0], st, w_ih, w_hh, b_ih, b_hh)),
        ("state length", lambda: fwd(x, st[:1], w_ih, w_hh, b_ih, b_hh)),
        ("state type", lambda: fwd(x, st[0], w_ih, w_hh, b_ih, b_hh)),
        ("state[1] shape", lambda: fwd(x, (st[0], st[1][:1]), w_ih, w_hh, b_ih, b_hh)),
        ("projected x width", lambda: fwd(x, st, None, w_hh, b_ih, b_hh)),
        ("unknown cell", lambda: be.gru_forward(x, st, w_ih, w_hh, b_ih, b_hh)),
        ("t_start range", lambda: bwd(dy, None, cache, w_ih, w_hh, *g, t_start=T)),
        ("t_start type", lambda: bwd(dy, None, cache, w_ih, w_hh, *g, t_start=1.5)),
        ("t_start bool", lambda: bwd(dy, None, cache, w_ih, w_hh, *g, t_start=True)),
        ("dy shape", lambda: bwd(dy[:2], None, cache, w_ih, w_hh, *g)),
        ("dfinal_state length", lambda: bwd(dy, st[:1], cache, w_ih, w_hh, *g)),
        ("cache of another cell", lambda: be.gru_backward(dy, None, cache, w_ih, w_hh, *g)),
        ("cache type", lambda: bwd(dy, None, tuple(cache), w_ih, w_hh, *g)),
        ("dw_hh shape", lambda: bwd(dy, None, cache, w_ih, w_hh, g[0], g[1].T, g[2], g[3])),
        ("dw_ih without w_ih", lambda: bwd(dy, None, cache, None, w_hh, *g)),
        ("cache.gates shape", lambda: bwd(dy, None, cache._replace(gates=cache.gates[:, :, :-1]),
                                          w_ih, w_hh, *g)),
        ("cache.c dtype", lambda: bwd(dy, None, cache._replace(c=f64(cache.c)), w_ih, w_hh, *g)),
        ("cache.c0 missing", lambda: bwd(dy, None, cache._replace(c0=None), w_ih, w_hh, *g)),
        ("cache.h0 a list", lambda: bwd(dy, None, cache._replace(h0=be.to_host(cache.h0).tolist()),
                                        w_ih, w_hh, *g)),
        ("lengths dtype float", lambda: fwd(x, st, w_ih, w_hh, b_ih, b_hh,
                                            lengths=np.array([1.0, 2.0]))),
        ("lengths dtype bool", lambda: fwd(x, st, w_ih, w_hh, b_ih, b_hh,
                                           lengths=np.array([True, True]))),
        ("lengths shape", lambda: fwd(x, st, w_ih, w_hh, b_ih, b_hh, lengths=np.array([1, 2, 3]))),
        ("lengths 2-D", lambda: fwd(x, st, w_ih, w_hh, b_ih, b_hh, lengths=np.ones((B, 1), int))),
        ("lengths zero", lambda: fwd(x, st, w_ih, w_hh, b_ih, b_hh, lengths=np.array([T, 0]))),
        ("lengths above T", lambda: fwd(x, st, w_ih, w_hh, b_ih, b_hh,
                                        lengths=np.array([T + 1, 1], np.int32))),
        ("cache.lengths range", lambda: bwd(dy, None, cache._replace(lengths=np.array([1, T + 1])),
                                            w_ih, w_hh, *g)),
    ]


def raised(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 -- what is raised is the subject of the check
        return type(e), str(e)
    pytest.fail("no error raised")


def check_errors(be, seed):
    """Each bad call raises, on ``be``, the reference's exception type and message."""
    want = {d: raised(c) for d, c in bad_calls(ref, np.random.default_rng(seed))}
    got = {d: raised(c) for d, c in bad_calls(be, np.random.default_rng(seed))}
    for d in want:
        # the array type's name is the backend's own ("must be a cupy.ndarray")
        w = (want[d][0], want[d][1].replace("numpy.ndarray", f"{be.xp.__name__}.ndarray"))
        assert got[d] == w, f"{be.NAME}: {d}: {got[d]} != {w}"


def check_foreign_cache(be, rng, dtype=np.float64):
    """A backward over the reference's cache (moved onto the backend field by field) equals
    the backend's backward over its own cache, for every cell and a t_start inside."""
    for cell in CELLS:
        p = random_layer_problem(rng, cell, 4, 3, 2, 5, dtype)
        fields = ref_cache_fields(cell, p)
        foreign = RecurrentCache(cell, **{k: None if v is None else be.asarray(v, v.dtype)
                                          for k, v in fields.items()})
        for t_start in (0, 2):
            own = run_layer(be, cell, p, t_start)
            other = run_layer(be, cell, p, t_start, cache=foreign)
            for a, b, what in zip(own[2:6], other[2:6], ("dx", "dstate", "dh", "grads")):
                for k, (ai, bi) in enumerate(zip(*(([a], [b]) if what in ("dx", "dh")
                                                   else (a, b)))):
                    assert_close(bi, ai, dtype, f"{be.NAME} {cell} t_start={t_start} {what}[{k}]",
                                 rtol=RTOL[np.dtype(dtype)])


def ref_cache_fields(cell, p):
    """The reference forward's cache as {field: host array or None} (no ``extra``)."""
    _, _, cache = getattr(ref, f"{cell}_forward")(p["x"], p["state"], p["w_ih"], p["w_hh"],
                                                 p["b_ih"], p["b_hh"])
    return {f: getattr(cache, f) for f in RecurrentCache._fields if f not in ("cell", "extra")}
