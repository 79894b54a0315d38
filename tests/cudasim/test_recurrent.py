"""Recurrent kernels of bptt_kernels.cuda on the CUDA simulator, against the NumPy reference.

Both paths (persistent single-block and general GEMM + gate kernel), float64 (relative error
<= 1e-10) and float32 (<= 1e-5), t_start = 0 and > 0, gradients accumulated into non-zero
buffers, scratch memory NaN-poisoned (conftest.py). A directional finite-difference check in
float64 is the independent oracle. Shapes are odd and small: they exercise partial GEMM tiles,
grid-stride loops over more points than threads, and several blocks in the gate kernels.
"""

import re

import numpy as np
import pytest

from bptt_kernels import CELLS
from bptt_kernels.host import CELL_FIELDS, RecurrentCache, cache_from_arrays, cache_to_arrays
from helpers import RTOL, assert_close, random_layer_problem

SHAPE_A = dict(T=4, B=2, I=3, H=5)    # LSTM: B*G*H = 40 > 32 threads of the persistent block
SHAPE_B = dict(T=3, B=3, I=2, H=12)   # B*H = 36 > 32: the gate kernels run 2 blocks

CASES = (
    [("f64", SHAPE_A, 0), ("f64", SHAPE_A, 2), ("f64", SHAPE_B, 1), ("f32", SHAPE_A, 1)]
)


def run(backend, cell, p, t_start):
    """Forward + backward on ``backend``; returns host copies of everything compared."""
    dev = lambda a: backend.asarray(a, a.dtype)   # noqa: E731
    w = [dev(p[k]) for k in ("w_ih", "w_hh", "b_ih", "b_hh")]
    y, final, cache = getattr(backend, f"{cell}_forward")(
        dev(p["x"]), tuple(map(dev, p["state"])), *w)
    out = {"y": backend.to_host(y), "final": [backend.to_host(a) for a in final]}
    grads = [dev(g) for g in p["grads0"]]           # accumulated into: must be +=
    dx, dstate, dh = getattr(backend, f"{cell}_backward")(
        dev(p["dy"]), tuple(map(dev, p["dfinal"])), cache, w[0], w[1], *grads, t_start=t_start)
    out.update(dx=backend.to_host(dx), dstate=[backend.to_host(a) for a in dstate],
               dh=backend.to_host(dh), grads=[backend.to_host(g) for g in grads])
    return out


def compare(got, want, dtype, what):
    """Every output of :func:`run` within RTOL[dtype] of the reference's (a NaN fails: poison)."""
    for key in ("y", "dx", "dh"):
        assert_close(got[key], want[key], dtype, f"{what} {key}")
    for key in ("final", "dstate", "grads"):
        assert len(got[key]) == len(want[key])
        for k, (a, b) in enumerate(zip(got[key], want[key])):
            assert_close(a, b, dtype, f"{what} {key}[{k}]")


@pytest.mark.parametrize("path", ["general", "persistent"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dt,shape,t_start", CASES,
                         ids=[f"{c[0]}-T{c[1]['T']}B{c[1]['B']}H{c[1]['H']}-t{c[2]}" for c in CASES])
def test_matches_reference(cuda, ref, rng, cell, path, dt, shape, t_start):
    dtype = np.float64 if dt == "f64" else np.float32
    cuda.config.PATH = path
    assert cuda.choose_path(cell, shape["B"], shape["H"], dtype) == path
    p = random_layer_problem(rng, cell, dtype=dtype, **shape)
    got = run(cuda, cell, p, t_start)
    want = run(ref, cell, p, t_start)
    compare(got, want, dtype, f"{cell} {path}")
    assert not got["dx"][:t_start].any() and not got["dh"][:t_start].any(), \
        "rows before t_start must be zero"


@pytest.mark.parametrize("path", ["general", "persistent"])
@pytest.mark.parametrize("cell", CELLS)
def test_input_projected_by_the_caller(cuda, rng, cell, path, check_projected_input):
    """w_ih=None: x is x W_ih^T already, and the backward returns dL/d(x W_ih^T) for dx."""
    cuda.config.PATH = path
    T, B, I, H = SHAPE_A["T"], SHAPE_A["B"], SHAPE_A["I"], SHAPE_A["H"]
    check_projected_input(getattr(cuda, f"{cell}_forward"), getattr(cuda, f"{cell}_backward"),
                          lambda a: cuda.asarray(a, a.dtype), cuda.to_host, cell, np.float64,
                          (T, B, I, H, 2), rng, RTOL[np.dtype(np.float64)])


@pytest.mark.parametrize("path", ["general", "persistent"])
@pytest.mark.parametrize("cell", CELLS)
def test_finite_differences_float64(cuda, rng, cell, path):
    """<grad, v> against (L(p + eps v) - L(p - eps v)) / (2 eps) for a random direction v over
    every weight, bias, input and initial-state element; L = sum(y*R) + sum(final*S)."""
    T, B, I, H = 3, 2, 3, 4
    cuda.config.PATH = path
    p = random_layer_problem(rng, cell, T, B, I, H, np.float64)
    names = ["x", "w_ih", "w_hh", "b_ih", "b_hh"]
    flat = {k: p[k] for k in names}
    flat.update({f"s{k}": s for k, s in enumerate(p["state"])})
    direction = {k: rng.standard_normal(a.shape) for k, a in flat.items()}
    R = p["dy"]
    S = p["dfinal"]
    fwd = getattr(cuda, f"{cell}_forward")

    def loss(q):
        state = tuple(q[f"s{k}"] for k in range(len(S)))
        y, final, _ = fwd(q["x"], state, q["w_ih"], q["w_hh"], q["b_ih"], q["b_hh"])
        return float(np.sum(y * R) + sum(np.sum(f * s) for f, s in zip(final, S)))

    y, final, cache = fwd(p["x"], p["state"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])
    grads = [np.zeros_like(p[k]) for k in ("w_ih", "w_hh", "b_ih", "b_hh")]
    dx, dstate, _ = getattr(cuda, f"{cell}_backward")(R, S, cache, p["w_ih"], p["w_hh"], *grads)
    analytic = {"x": dx, "w_ih": grads[0], "w_hh": grads[1], "b_ih": grads[2], "b_hh": grads[3]}
    analytic.update({f"s{k}": d for k, d in enumerate(dstate)})
    directional = sum(float(np.sum(analytic[k] * direction[k])) for k in flat)
    eps = 1e-6
    plus = loss({k: a + eps * direction[k] for k, a in flat.items()})
    minus = loss({k: a - eps * direction[k] for k, a in flat.items()})
    numeric = (plus - minus) / (2 * eps)
    err = abs(numeric - directional) / abs(directional)
    assert err <= 1e-6, f"{cell}: directional derivative {directional} vs finite difference {numeric}"


def test_auto_path_and_limits(cuda):
    lim = cuda.persistent_limits("lstm", 2, 5, np.float32)
    assert lim["fits"] and lim["shared_limit"] == 48 * 1024
    need = lambda h: (4 * h * h + 2 * 4 * h + 2 * h) * 4   # noqa: E731  forward's shared elements
    assert need(lim["max_H"]) <= lim["shared_limit"] < need(lim["max_H"] + 1)
    assert cuda.choose_path("lstm", 2, 5, np.float32) == "persistent"
    assert cuda.choose_path("lstm", 2, 512, np.float32) == "general"
    cuda.config.PERSISTENT_MAX_PAIRS = 9
    assert cuda.choose_path("lstm", 2, 5, np.float32) == "general"
    cuda.config.reset()
    cuda.config.PATH = "persistent"
    with pytest.raises(ValueError, match="shared memory"):
        cuda.choose_path("gru", 4, 512, np.float32)
    cuda.config.PATH = "fast"
    with pytest.raises(ValueError, match="config.PATH"):
        cuda.choose_path("gru", 4, 8, np.float32)


def test_bad_arguments_name_the_argument(cuda, rng):
    """The shared checks' messages (bptt_kernels.host.checks), each in full."""
    T, B, I, H = 2, 2, 3, 4
    x = rng.standard_normal((T, B, I))
    w_ih, w_hh = rng.standard_normal((3 * H, I)), rng.standard_normal((3 * H, H))
    b = rng.standard_normal(3 * H)
    h0 = rng.standard_normal((B, H))

    def raises(exc, text):
        return pytest.raises(exc, match="^" + re.escape(text) + "$")

    with raises(ValueError, "w_ih must have shape [12, 3], got [12, 2]"):
        cuda.gru_forward(x, (h0,), w_ih[:, :2].copy(), w_hh, b, b)
    with raises(TypeError, "b_hh must have dtype float64, got float32"):
        cuda.gru_forward(x, (h0,), w_ih, w_hh, b, b.astype(np.float32))
    with raises(TypeError, "state must be a tuple (h,) of [B, H] arrays for gru, got ndarray"):
        cuda.gru_forward(x, h0, w_ih, w_hh, b, b)
    with raises(TypeError, "x must be a numpy.ndarray (use the backend's asarray), got list"):
        cuda.gru_forward(x.tolist(), (h0,), w_ih, w_hh, b, b)
    y, final, cache = cuda.gru_forward(x, (h0,), w_ih, w_hh, b, b)
    grads = [np.zeros_like(a) for a in (w_ih, w_hh, b, b)]
    with raises(ValueError, f"t_start must be in [0, {T - 1}], got {T}"):
        cuda.gru_backward(y, final, cache, w_ih, w_hh, *grads, t_start=T)
    with raises(ValueError, "dy must have shape [2, 2, 4], got [1, 2, 4]"):
        cuda.gru_backward(y[:1].copy(), final, cache, w_ih, w_hh, *grads)
    with raises(ValueError, "cache comes from gru_forward, not lstm_forward"):
        cuda.lstm_backward(y, (h0, h0), cache, w_ih, w_hh, *grads)
    with raises(TypeError, "cache must be the RecurrentCache returned by gru_forward, got tuple"):
        cuda.gru_backward(y, final, tuple(cache), w_ih, w_hh, *grads)




@pytest.mark.parametrize("path", ["general", "persistent"])
@pytest.mark.parametrize("cell", CELLS)
def test_caches_cross_backends(cuda, ref, rng, cell, path):
    """The one cache layout: the reference's cache (moved field by field by this backend's
    asarray, as a checkpoint stores it: no extra, and the LSTM's tanh_c, which this backend does
    not read) drives this backend's backward, and this backend's cache, its documented fields
    views of extra["hs"], drives the reference's; both end to end as the reference alone."""
    cuda.config.PATH = path
    T, B, I, H = 3, 2, 3, 4
    p = random_layer_problem(rng, cell, T, B, I, H, np.float64)
    want = run(ref, cell, p, 1)
    weights = tuple(p[k] for k in ("w_ih", "w_hh", "b_ih", "b_hh"))

    def backward(backend, cache):
        grads = [g.copy() for g in p["grads0"]]
        dx, dstate, dh = getattr(backend, f"{cell}_backward")(
            p["dy"], p["dfinal"], cache, p["w_ih"], p["w_hh"], *grads, t_start=1)
        return dict(dx=dx, dstate=list(dstate), dh=dh, grads=grads)

    _, _, ref_cache = getattr(ref, f"{cell}_forward")(p["x"], p["state"], *weights)
    cache = cache_from_arrays(*cache_to_arrays(ref_cache, np.array),
                              lambda a: cuda.asarray(a, a.dtype))
    assert cache.extra is None
    compare(dict(want, **backward(cuda, cache)), want, np.float64, f"{cell} {path} reference cache")

    y, final, cache = getattr(cuda, f"{cell}_forward")(p["x"], p["state"], *weights)
    assert isinstance(cache, RecurrentCache) and cache.cell == cell and cache.tanh_c is None
    assert {f for f in cache._fields[1:-1] if getattr(cache, f) is not None} == set(CELL_FIELDS[cell])
    hs = cache.extra["hs"]
    assert cache.y is y and np.shares_memory(y, hs) and np.array_equal(hs[1:], y)
    assert np.shares_memory(cache.h0, hs) and np.array_equal(cache.h0, p["state"][0])
    if cell == "lstm":
        assert np.array_equal(cache.extra["cs"][1:], cache.c)
    cache = cache_from_arrays(*cache_to_arrays(cache, cuda.to_host), np.asarray)
    got = dict(y=y, final=list(final), **backward(ref, cache))
    compare(got, want, np.float64, f"{cell} {path} this backend's cache, reference backward")
