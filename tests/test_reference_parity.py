"""The Numba ``cpu`` backend against the NumPy ``reference`` oracle, kernel by kernel.

A seeded sweep of random shapes for every cell and both dtypes, with t_start > 0 in most
cases, comparing outputs, final states, dx, d(state entering t_start), the per-step dh and the
accumulated parameter gradients (buffers pre-filled with random values, so ``+=`` is checked).
float32 kernels are compared with the reference run in float64 on the same (float32-rounded)
inputs: max relative error <= 1e-5; float64 <= 1e-10. Also the non-recurrent kernels.
"""

import numpy as np
import pytest

from bptt_kernels import GATES
from bptt_kernels import reference as ref
from helpers import RTOL, assert_close as check

try:
    from bptt_kernels import cpu
    CPU_IMPORT_ERROR = None
except Exception as e:  # the module is missing or does not import
    cpu = None
    CPU_IMPORT_ERROR = f"bptt_kernels.cpu does not import: {type(e).__name__}: {e}"

pytestmark = pytest.mark.skipif(cpu is None, reason=str(CPU_IMPORT_ERROR))

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
DTYPES = {"f64": np.float64, "f32": np.float32}


def sweep(n, seed=20240611):
    """n random (T, B, I, H, t_start) shapes, always including T=1 and B=1 and t_start > 0."""
    r = np.random.default_rng(seed)
    shapes = [(1, 1, 3, 2, 0), (7, 3, 5, 6, 3)]
    while len(shapes) < n:
        T = int(r.integers(1, 13))
        shapes.append((T, int(r.integers(1, 6)), int(r.integers(1, 10)), int(r.integers(1, 10)),
                       int(r.integers(0, T))))
    return shapes


@pytest.mark.parametrize("shape", sweep(10), ids=lambda s: "T{}B{}I{}H{}t{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_kernels_match_reference(cell, dtype, shape, rng):
    T, B, I, H, t_start = shape
    G = GATES[cell]
    n_states = 2 if cell == "lstm" else 1

    def rand(*s):
        return rng.standard_normal(s).astype(dtype)   # rounded to dtype; the oracle sees the same values

    x = rand(T, B, I)
    state = tuple(rand(B, H) for _ in range(n_states))
    w_ih, w_hh, b_ih, b_hh = rand(G * H, I) * 0.5, rand(G * H, H) * 0.5, rand(G * H), rand(G * H)
    dy = rand(T, B, H)
    dfinal = tuple(rand(B, H) for _ in range(n_states))
    grads0 = [rand(G * H, I), rand(G * H, H), rand(G * H), rand(G * H)]   # accumulated into
    inputs = [x, *state, w_ih, w_hh, b_ih, b_hh, dy, *dfinal]
    before = [a.copy() for a in inputs]

    f64 = [a.astype(np.float64) for a in (x, w_ih, w_hh, b_ih, b_hh, dy)]
    y_r, fin_r, cache_r = getattr(ref, f"{cell}_forward")(
        f64[0], tuple(s.astype(np.float64) for s in state), *f64[1:5])
    grads_r = [g.astype(np.float64) for g in grads0]
    dx_r, dst_r, dh_r = getattr(ref, f"{cell}_backward")(
        f64[5], tuple(d.astype(np.float64) for d in dfinal), cache_r, f64[1], f64[2],
        *grads_r, t_start=t_start)

    y, fin, cache = getattr(cpu, f"{cell}_forward")(x, state, w_ih, w_hh, b_ih, b_hh)
    grads = [g.copy() for g in grads0]
    dx, dst, dh = getattr(cpu, f"{cell}_backward")(dy, dfinal, cache, w_ih, w_hh, *grads,
                                                   t_start=t_start)

    for a, b in zip(inputs, before):
        np.testing.assert_array_equal(a, b, err_msg="a kernel modified one of its inputs")
    assert y.dtype == dtype and dx.dtype == dtype and dh.dtype == dtype
    check(y, y_r, dtype, "y")
    for k, (a, b) in enumerate(zip(fin, fin_r)):
        check(a, b, dtype, f"final_state[{k}]")
    assert np.all(dx[:t_start] == 0), "dx rows before t_start must be zero"
    assert np.all(dh[:t_start] == 0), "dh rows before t_start must be zero"
    check(dx, dx_r, dtype, "dx")
    check(dh, dh_r, dtype, "dh")
    for k, (a, b) in enumerate(zip(dst, dst_r)):
        check(a, b, dtype, f"dstate[{k}]")
    for name, a, b in zip(("dw_ih", "dw_hh", "db_ih", "db_hh"), grads, grads_r):
        check(a, b, dtype, name)


@pytest.mark.parametrize("shape", [(6, 3, 5, 4, 2), (9, 1, 3, 40, 0), (5, 4, 7, 3, 4)],
                         ids=lambda s: "T{}B{}I{}H{}t{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("module", [ref, cpu], ids=["reference", "cpu"])
def test_input_projected_by_the_caller(module, cell, dtype, shape, rng, check_projected_input):
    """w_ih=None: x is x W_ih^T already, and the backward returns dL/d(x W_ih^T) for dx."""
    check_projected_input(getattr(module, f"{cell}_forward"), getattr(module, f"{cell}_backward"),
                          lambda a: a, np.asarray, cell, dtype, shape, rng, RTOL[np.dtype(dtype)])


def test_input_projected_by_the_caller_bad_arguments(rng):
    x, w_ih, w_hh, b = (rng.standard_normal(s) for s in [(3, 2, 5), (8, 5), (8, 2), (8,)])
    state = (np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="projected"):          # x must be [T, B, 4H] then
        cpu.lstm_forward(x, state, None, w_hh, b, b)
    y, final, cache = cpu.lstm_forward(x, state, w_ih, w_hh, b, b)
    grads = [np.zeros_like(w_hh), np.zeros_like(b), np.zeros_like(b)]
    with pytest.raises(ValueError, match="both be None"):
        cpu.lstm_backward(np.ones_like(y), final, cache, None, w_hh, np.zeros_like(w_ih), *grads)
    with pytest.raises(ValueError, match="both be None"):
        cpu.lstm_backward(np.ones_like(y), final, cache, w_ih, w_hh, None, *grads)


@pytest.mark.parametrize("shape", [(1, 3, 2), (7, 5, 9), (1600, 256, 104)], ids=lambda s: "N{}I{}O{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_linear_matches_reference(dtype, shape, rng):
    """The output map x w^T + b and its backward (the largest shape runs in pieces on threads)."""
    N, I, O = shape
    x, w, b, dout = (rng.standard_normal(s).astype(dtype) for s in [(N, I), (O, I), (O,), (N, O)])
    dw0, db0 = rng.standard_normal((O, I)).astype(dtype), rng.standard_normal(O).astype(dtype)
    f64 = [a.astype(np.float64) for a in (x, w, b, dout, dw0, db0)]
    check(cpu.linear_forward(x, w, b), ref.linear_forward(*f64[:3]), dtype, "linear_forward")
    dw, db = dw0.copy(), db0.copy()
    dw_r, db_r = f64[4].copy(), f64[5].copy()
    dx = cpu.linear_backward(dout, x, w, dw, db)
    check(dx, ref.linear_backward(f64[3], f64[0], f64[1], dw_r, db_r), dtype, "linear dx")
    check(dw, dw_r, dtype, "linear dw")
    check(db, db_r, dtype, "linear db")
    with pytest.raises(ValueError, match="w must have shape"):
        cpu.linear_forward(x, w[:, :-1] if I > 1 else np.ones((O, 2), dtype), b)


def test_backend_interface_matches_reference():
    """cpu has every public function of the reference, with the same signature."""
    import inspect
    names = [n for n, f in vars(ref).items() if inspect.isfunction(f) and not n.startswith("_")
             and f.__module__ == ref.__name__ and n != "sigmoid"]
    assert "linear_forward" in names and "lstm_backward" in names
    for n in names:
        assert inspect.signature(getattr(cpu, n)) == inspect.signature(getattr(ref, n)), n


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("alias", [False, True], ids=["separate", "in_place"])
def test_softmax_cross_entropy_matches_reference(dtype, alias, rng):
    N, V = 13, 11
    logits = (rng.standard_normal((N, V)) * 4).astype(dtype)
    targets = rng.integers(0, V, N)
    targets[[0, 7]] = -1
    expected_d = np.empty_like(logits, dtype=np.float64)
    expected = ref.softmax_cross_entropy(logits.astype(np.float64), targets, expected_d, 0.25)
    work = logits.copy()
    dlogits = work if alias else np.full_like(logits, np.nan)   # poisoned when separate
    loss = cpu.softmax_cross_entropy(work, targets, dlogits, 0.25)
    assert isinstance(loss, float)
    assert abs(loss - expected) <= RTOL[np.dtype(dtype)] * abs(expected)
    check(dlogits, expected_d, dtype, "dlogits")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_embedding_matches_reference(dtype, rng):
    V, E = 6, 5
    weight = rng.standard_normal((V, E)).astype(dtype)
    ids = rng.integers(0, V, (4, 7))                   # 28 ids from 6 rows: repeats for sure
    np.testing.assert_array_equal(cpu.embedding_forward(weight, ids), ref.embedding_forward(weight, ids))
    dout = rng.standard_normal((4, 7, E)).astype(dtype)
    start = rng.standard_normal((V, E)).astype(dtype)
    d_ref, d_cpu = start.astype(np.float64), start.copy()
    ref.embedding_backward(d_ref, ids, dout.astype(np.float64))
    cpu.embedding_backward(d_cpu, ids, dout)
    check(d_cpu, d_ref, dtype, "dweight")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("momentum,weight_decay,nesterov", [(0.0, 0.0, False), (0.9, 0.0, False),
                                                            (0.9, 0.1, False), (0.5, 0.1, True)])
def test_sgd_step_matches_reference(dtype, momentum, weight_decay, nesterov, rng):
    p = rng.standard_normal((5, 4)).astype(dtype)
    buf = np.full_like(p, np.nan)                      # poisoned: the first step must overwrite it
    p_r, buf_r = p.astype(np.float64), buf.astype(np.float64)
    for step in range(3):
        g = rng.standard_normal(p.shape).astype(dtype)
        ref.sgd_step(p_r, g.astype(np.float64), buf_r, 0.05, momentum, weight_decay, nesterov, step == 0)
        cpu.sgd_step(p, g, buf, 0.05, momentum, weight_decay, nesterov, step == 0)
    check(p, p_r, dtype, "param")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_step_matches_reference(dtype, weight_decay, rng):
    p = rng.standard_normal((5, 4)).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    p_r, m_r, v_r = p.astype(np.float64), m.astype(np.float64), v.astype(np.float64)
    for step in range(1, 5):
        g = rng.standard_normal(p.shape).astype(dtype)
        ref.adam_step(p_r, g.astype(np.float64), m_r, v_r, 1e-2, 0.9, 0.999, 1e-8, weight_decay, step)
        cpu.adam_step(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, weight_decay, step)
    check(p, p_r, dtype, "param")
    check(m, m_r, dtype, "m")
    check(v, v_r, dtype, "v")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_norm_helpers_match_reference(dtype, rng):
    arrays = [rng.standard_normal(s).astype(dtype) for s in [(3, 4), (7,), (2, 2, 2)]]
    expected = ref.sum_of_squares([a.astype(np.float64) for a in arrays])
    total = cpu.sum_of_squares(arrays)
    assert isinstance(total, float)
    assert abs(total - expected) <= 1e-12 * expected
    scaled = [a.copy() for a in arrays]
    cpu.scale_(scaled, 0.3)
    for a, s in zip(arrays, scaled):
        check(s, a.astype(np.float64) * 0.3, dtype, "scale_")
