"""The CPU backend (Numba @njit kernels) against the float64 NumPy reference, kernel by kernel.

Every output and scratch buffer the CPU kernels allocate is poisoned with NaN (through
``_buffers.empty`` and ``_buffers.scratch``), so an element a kernel forgets to write fails. Inputs are fresh random numbers per case.
Error measure: max |a - b| / max |b| over the array (float64 reference computed from the same
inputs cast to float64).
"""

import math

import numpy as np
import pytest

from bptt_kernels import CELLS, GATES
import bptt_kernels.cpu as cpu
import bptt_kernels.reference as ref
from bptt_kernels.cpu import _buffers
import helpers
from helpers import force_unit_split, random_layer_problem, rel_err

TOL = {np.float64: 1e-12, np.float32: 1e-5}
DTYPES = (np.float64, np.float32)


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    monkeypatch.setattr(_buffers, "empty", lambda shape, dtype: np.full(shape, np.nan, dtype))
    monkeypatch.setattr(_buffers, "scratch", lambda name, shape, dtype: np.full(shape, np.nan, dtype))


def assert_close(a, b, dtype, what):
    helpers.assert_close(a, b, dtype, what, rtol=TOL[dtype])


WEIGHTS = ("w_ih", "w_hh", "b_ih", "b_hh")


def random_problem(rng, cell, dtype, T, B, I, H):
    """helpers.random_layer_problem's arrays as (x, state, w, dy, dfinal, grads0): w and the
    starting gradients grads0 (nonzero, so that += is checked) as dicts by weight name."""
    p = random_layer_problem(rng, cell, T, B, I, H, dtype)
    return (p["x"], p["state"], {n: p[n] for n in WEIGHTS}, p["dy"], p["dfinal"],
            dict(zip(WEIGHTS, p["grads0"])))


def random_layer(rng, cell, dtype, T, B, I, H):
    """random_problem's (x, state, w)."""
    return random_problem(rng, cell, dtype, T, B, I, H)[:3]


def f64(tree):
    if isinstance(tree, (tuple, list)):
        return type(tree)(f64(a) for a in tree)
    if isinstance(tree, dict):
        return {k: f64(v) for k, v in tree.items()}
    return None if tree is None else np.asarray(tree, np.float64)


def run_cell(backend, cell, x, state, w, dy, dfinal, grads0, t_start):
    fwd = getattr(backend, f"{cell}_forward")
    bwd = getattr(backend, f"{cell}_backward")
    y, final, cache = fwd(x, state, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
    grads = {n: None if g is None else g.copy() for n, g in grads0.items()}
    dx, dstate, dh = bwd(dy, dfinal, cache, w["w_ih"], w["w_hh"], grads["w_ih"], grads["w_hh"],
                         grads["b_ih"], grads["b_hh"], t_start=t_start)
    return {"y": y, "final": final, "dx": dx, "dstate": dstate, "dh": dh, "grads": grads}


# T=1 and B=1 included; no single-element arrays: one float32 element with cancellation can
# be off by more than 1e-5 relative however exact the kernel (any float32 code is)
SHAPES = [(1, 1, 3, 4), (5, 3, 4, 6), (7, 2, 9, 37), (12, 5, 3, 20), (3, 1, 2, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%dB%dI%dH%d" % s)
def test_cell_matches_reference(cell, dtype, shape):
    T, B, I, H = shape
    rng = np.random.default_rng([CELLS.index(cell), T, B, I, H])  # reproducible per case
    x, state, w, dy, dfinal, grads0 = random_problem(rng, cell, dtype, T, B, I, H)
    for t_start in sorted({0, T // 2, T - 1}):
        got = run_cell(cpu, cell, x, state, w, dy, dfinal, grads0, t_start)
        want = run_cell(ref, cell, *f64((x, state, w, dy, dfinal, grads0)), t_start)
        assert got["y"].dtype == dtype and got["dx"].dtype == dtype
        for name in ("y", "dx", "dh"):
            assert_close(got[name], want[name], dtype, f"{cell} {name} t_start={t_start}")
        assert np.all(got["dx"][:t_start] == 0) and np.all(got["dh"][:t_start] == 0)
        for k in range(len(state)):
            assert_close(got["final"][k], want["final"][k], dtype, f"{cell} final[{k}]")
            assert_close(got["dstate"][k], want["dstate"][k], dtype, f"{cell} dstate[{k}] t_start={t_start}")
        for name in grads0:
            assert_close(got["grads"][name], want["grads"][name], dtype, f"{cell} d{name} t_start={t_start}")


@pytest.mark.parametrize("cell", CELLS)
def test_cell_inputs_unchanged_and_cache_independent_of_state(cell):
    """The kernels must not write into their inputs; the cache must not alias the state passed in."""
    rng = np.random.default_rng(7)
    x, state, w = random_layer(rng, cell, np.float64, 4, 3, 5, 6)
    copies = (x.copy(), tuple(s.copy() for s in state), {k: a.copy() for k, a in w.items()})
    fwd = getattr(cpu, f"{cell}_forward")
    y1, _, cache = fwd(x, state, **w)
    for s in state:
        s[...] = 123.0                     # the caller reuses its state arrays
    for a, b in zip((x, w), (copies[0], copies[2])):
        if isinstance(a, dict):
            assert all(np.array_equal(a[k], b[k]) for k in a)
        else:
            assert np.array_equal(a, b)
    dy = rng.standard_normal(y1.shape)
    grads = {n: np.zeros_like(a) for n, a in w.items()}
    bwd = getattr(cpu, f"{cell}_backward")
    dx, _, _ = bwd(dy, None, cache, w["w_ih"], w["w_hh"], grads["w_ih"], grads["w_hh"],
                   grads["b_ih"], grads["b_hh"])
    want = run_cell(ref, cell, copies[0], copies[1], copies[2], dy,
                    tuple(np.zeros_like(s) for s in copies[1]), {n: np.zeros_like(a) for n, a in w.items()}, 0)
    assert_close(dx, want["dx"], np.float64, "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_cell_matches_torch(cell, dtype):
    torch = pytest.importorskip("torch")
    T, B, I, H = 6, 3, 5, 8
    rng = np.random.default_rng(11)
    x, state, w = random_layer(rng, cell, dtype, T, B, I, H)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    mod = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN}[cell](I, H).to(tdt)
    with torch.no_grad():
        for name, key in (("weight_ih_l0", "w_ih"), ("weight_hh_l0", "w_hh"),
                          ("bias_ih_l0", "b_ih"), ("bias_hh_l0", "b_hh")):
            getattr(mod, name).copy_(torch.from_numpy(w[key]))
    xt = torch.tensor(x, requires_grad=True)
    st = [torch.tensor(s[None], requires_grad=True) for s in state]
    yt, ft = mod(xt, tuple(st) if cell == "lstm" else st[0])
    dy = rng.standard_normal((T, B, H)).astype(dtype)
    (yt * torch.from_numpy(dy)).sum().backward()
    grads = {n: np.zeros_like(a) for n, a in w.items()}
    got = run_cell(cpu, cell, x, state, w, dy, None, grads, 0)
    assert_close(got["y"], yt.detach().numpy(), dtype, "y")
    assert_close(got["dx"], xt.grad.numpy(), dtype, "dx")
    for k in range(len(state)):
        assert_close(got["dstate"][k], st[k].grad.numpy()[0], dtype, f"dstate[{k}]")
    assert_close(got["grads"]["w_hh"], mod.weight_hh_l0.grad.numpy(), dtype, "dw_hh")
    assert_close(got["grads"]["w_ih"], mod.weight_ih_l0.grad.numpy(), dtype, "dw_ih")
    assert_close(got["grads"]["b_ih"], mod.bias_ih_l0.grad.numpy(), dtype, "db_ih")


def test_float32_activations_error_bound():
    """The float32 tanh/sigmoid approximations stay within the error stated in _math.py."""
    from numba import njit
    from bptt_kernels.cpu._math import sigmoid_, tanh_

    @njit
    def apply(x, t, s):
        for k in range(x.shape[0]):
            t[k] = tanh_(x[k])
            s[k] = sigmoid_(x[k])

    x = np.concatenate([np.linspace(-20, 20, 400_001), [-np.inf, np.inf, 0.0, 1e-30, -1e-30]])
    x32 = x.astype(np.float32)
    t, s = np.empty_like(x32), np.empty_like(x32)
    apply(x32, t, s)
    exact = x32.astype(np.float64)
    assert np.abs(t - np.tanh(exact)).max() <= 5e-7
    assert np.abs(s - 0.5 * (1 + np.tanh(exact / 2))).max() <= 3e-7
    small = np.abs(exact) < 1e-3
    assert np.all(np.abs(t[small] - np.tanh(exact[small])) <= 2e-7 * np.abs(exact[small]) + 1e-38)


def test_float32_exp_error_bound():
    """The float32 exp (softmax) stays within the relative error stated in _math.py."""
    from numba import njit
    from bptt_kernels.cpu._math import exp_

    @njit
    def apply(x, out):
        for k in range(x.shape[0]):
            out[k] = exp_(x[k])

    x = np.linspace(-87, 88, 400_001).astype(np.float32)
    out = np.empty_like(x)
    apply(x, out)
    exact = np.exp(x.astype(np.float64))
    assert (np.abs(out - exact) / exact).max() <= 2e-7


def test_softmax_cross_entropy_non_finite_logits_give_nan_loss():
    for dtype in DTYPES:
        logits = np.random.default_rng(4).standard_normal((3, 9)).astype(dtype)
        for bad in (np.nan, np.inf):
            poisoned = logits.copy()
            poisoned[1, 4] = bad
            loss = cpu.softmax_cross_entropy(poisoned, np.array([0, 1, 2]), np.empty_like(logits), 1.0)
            assert np.isnan(loss), (dtype, bad)


def test_bad_arguments_raise_clear_errors():
    rng = np.random.default_rng(3)
    x, state, w = random_layer(rng, "lstm", np.float32, 3, 2, 4, 5)
    with pytest.raises(ValueError, match="w_hh"):
        cpu.lstm_forward(x, state, w["w_ih"], w["w_hh"][:-1], w["b_ih"], w["b_hh"])
    with pytest.raises(ValueError, match="w_ih"):
        cpu.lstm_forward(x, state, w["w_ih"][:, :-1], w["w_hh"], w["b_ih"], w["b_hh"])
    with pytest.raises(TypeError, match="b_hh"):
        cpu.lstm_forward(x, state, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"].astype(np.float64))
    with pytest.raises(ValueError, match="state"):
        cpu.lstm_forward(x, state[:1], **w)
    with pytest.raises(ValueError, match=r"state\[1\]"):
        cpu.lstm_forward(x, (state[0], state[1][:1]), **w)
    with pytest.raises(TypeError, match="x"):
        cpu.gru_forward(x.astype(np.int32), None, *[np.zeros((15, 4))] * 2, np.zeros(15), np.zeros(15))
    y, _, cache = cpu.lstm_forward(x, state, **w)
    g = {n: np.zeros_like(a) for n, a in w.items()}
    args = (cache, w["w_ih"], w["w_hh"], g["w_ih"], g["w_hh"], g["b_ih"], g["b_hh"])
    with pytest.raises(ValueError, match="t_start"):
        cpu.lstm_backward(np.ones_like(y), None, *args, t_start=3)
    with pytest.raises(ValueError, match="dy"):
        cpu.lstm_backward(np.ones_like(y)[:2], None, *args)
    with pytest.raises(ValueError, match="cache comes from lstm_forward, not gru_forward"):
        cpu.gru_backward(np.ones_like(y), None, *args)
    with pytest.raises(ValueError, match="dw_hh"):
        cpu.lstm_backward(np.ones_like(y), None, cache, w["w_ih"], w["w_hh"], g["w_ih"],
                          g["w_hh"].T, g["b_ih"], g["b_hh"])
    _, _, rcache = cpu.rnn_tanh_forward(x, None, *[a[:5] for a in w.values()][:1],
                                        w["w_hh"][:5], w["b_ih"][:5], w["b_hh"][:5])
    gr = [np.zeros((5, 4), np.float32), np.zeros((5, 5), np.float32), np.zeros(5, np.float32),
          np.zeros(5, np.float32)]
    with pytest.raises(ValueError, match="rnn_tanh"):
        cpu.rnn_relu_backward(np.ones_like(y), None, rcache, w["w_ih"][:5], w["w_hh"][:5], *gr)


# ----------------------------------------------------------------------------- ops

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("in_place", [False, True])
def test_softmax_cross_entropy(dtype, in_place):
    rng = np.random.default_rng(5)
    N, V = 33, 71
    logits = (rng.standard_normal((N, V)) * 5 + 40).astype(dtype)  # large: max subtraction needed
    targets = rng.integers(0, V, N)
    targets[[3, 17]] = -1
    want_d = np.empty((N, V))
    want = ref.softmax_cross_entropy(logits.astype(np.float64), targets, want_d, 0.25)
    dlogits = logits if in_place else np.full((N, V), np.nan, dtype)
    got = cpu.softmax_cross_entropy(logits, targets, dlogits, 0.25)
    assert isinstance(got, float)
    assert abs(got - want) <= TOL[dtype] * abs(want)
    assert_close(dlogits, want_d, dtype, "dlogits")
    assert np.all(dlogits[[3, 17]] == 0)
    with pytest.raises(ValueError, match="targets"):
        cpu.softmax_cross_entropy(logits, np.full(N, V), np.empty_like(logits), 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_embedding(dtype):
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((11, 7)).astype(dtype)
    ids = rng.integers(0, 11, (5, 4))
    ids[0, :3] = 2                                         # repeated ids accumulate
    out = cpu.embedding_forward(weight, ids)
    assert out.shape == (5, 4, 7) and np.array_equal(out, weight[ids])
    dout = rng.standard_normal((5, 4, 7)).astype(dtype)
    dweight = rng.standard_normal((11, 7)).astype(dtype)
    want = dweight.astype(np.float64)
    ref.embedding_backward(want, ids, dout.astype(np.float64))
    cpu.embedding_backward(dweight, ids, dout)
    assert_close(dweight, want, dtype, "dweight")
    with pytest.raises(ValueError, match="ids"):
        cpu.embedding_forward(weight, np.array([0, 11]))


SGD_CASES = [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 1e-2, True), (0.5, 1e-3, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("momentum,weight_decay,nesterov", SGD_CASES)
def test_sgd_step(dtype, momentum, weight_decay, nesterov):
    rng = np.random.default_rng(8)
    p = rng.standard_normal((6, 5)).astype(dtype)
    buf = np.zeros_like(p)
    p_ref, buf_ref = p.astype(np.float64), buf.astype(np.float64)
    for step in range(3):
        g = rng.standard_normal(p.shape).astype(dtype)
        g_copy = g.copy()
        cpu.sgd_step(p, g, buf, 0.1, momentum, weight_decay, nesterov, step == 0)
        ref.sgd_step(p_ref, g.astype(np.float64), buf_ref, 0.1, momentum, weight_decay, nesterov, step == 0)
        assert np.array_equal(g, g_copy)
        assert_close(p, p_ref, dtype, "param")
        if momentum:
            assert_close(buf, buf_ref, dtype, "buf")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_adam_step(dtype, weight_decay):
    rng = np.random.default_rng(9)
    p = rng.standard_normal(40).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    p_ref, m_ref, v_ref = (a.astype(np.float64) for a in (p, m, v))
    for step in range(1, 4):
        g = rng.standard_normal(p.shape).astype(dtype)
        cpu.adam_step(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, weight_decay, step)
        ref.adam_step(p_ref, g.astype(np.float64), m_ref, v_ref, 1e-2, 0.9, 0.999, 1e-8, weight_decay, step)
        for a, b, name in ((p, p_ref, "param"), (m, m_ref, "m"), (v, v_ref, "v")):
            assert_close(a, b, dtype, name)


def test_optimizers_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    p0 = rng.standard_normal((4, 3))
    grads = [rng.standard_normal((4, 3)) for _ in range(4)]
    for name in ("sgd", "adam"):
        tp = torch.nn.Parameter(torch.tensor(p0))
        if name == "sgd":
            opt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
        else:
            opt = torch.optim.Adam([tp], lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)
        p, s1, s2 = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
        for step, g in enumerate(grads, start=1):
            tp.grad = torch.tensor(g)
            opt.step()
            if name == "sgd":
                cpu.sgd_step(p, g, s1, 0.1, 0.9, 1e-2, True, step == 1)
            else:
                cpu.adam_step(p, g, s1, s2, 1e-2, 0.8, 0.99, 1e-6, 1e-2, step)
        assert rel_err(p, tp.detach().numpy()) <= 1e-14, name


def test_norm_helpers():
    rng = np.random.default_rng(12)
    # a long array too: the vectorised sum's main loop and its remainder (100_003 = 16k + 3)
    arrays = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5),
              rng.standard_normal(100_003).astype(np.float32)]
    want = ref.sum_of_squares([a.astype(np.float64) for a in arrays])
    assert abs(cpu.sum_of_squares(arrays) - want) <= 1e-12 * want
    for bad in (np.nan, np.inf, -np.inf):          # a non-finite element anywhere shows
        spoiled = arrays[2].copy()
        spoiled[rng.integers(spoiled.size)] = bad
        assert not math.isfinite(cpu.sum_of_squares([arrays[0], spoiled]))
    copies = [a.copy() for a in arrays]
    cpu.scale_(arrays, 0.5)
    for a, c in zip(arrays, copies):
        assert a.dtype == c.dtype and np.array_equal(a, c * a.dtype.type(0.5))


def test_array_plumbing():
    assert cpu.NAME == "cpu" and cpu.xp is np
    assert set(cpu.DTYPES) == {np.dtype(np.float32), np.dtype(np.float64)}
    a = cpu.asarray([[1, 2], [3, 4]], np.float32)
    assert a.dtype == np.float32 and a.flags.c_contiguous
    host = np.ones((2, 2), np.float32)
    assert cpu.asarray(host, np.float32) is not host               # copies, like an upload
    h = cpu.to_host(a)
    assert isinstance(h, np.ndarray) and np.array_equal(h, a) and h is not a
    z = cpu.zeros((2, 3), np.float64)
    assert z.shape == (2, 3) and not z.any()


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_layer_split_over_threads(cell, workers, monkeypatch):
    """A layer call cut into 1 or 3 pieces per phase (B=5: uneven batch ranges, t_start=1)
    gives the reference's result."""
    from bptt_kernels.cpu import _loop
    monkeypatch.setattr(_loop, "THREADS", workers)
    monkeypatch.setattr(_loop, "MIN_WORK_FOR_THREADS", 0)   # split even this small layer
    monkeypatch.setattr(_loop, "MIN_PHASE_WORK_FOR_THREADS", 0)   # ... and each GEMM phase
    calls = []
    run_piece = _loop._on_one_blas_thread
    monkeypatch.setattr(_loop, "_on_one_blas_thread", lambda *a: (calls.append(1), run_piece(*a)))
    T, B, I, H = 6, 5, 4, 7
    rng = np.random.default_rng(13)
    x, state, w, dy, dfinal, grads0 = random_problem(rng, cell, np.float64, T, B, I, H)
    got = run_cell(cpu, cell, x, state, w, dy, dfinal, grads0, 1)
    want = run_cell(ref, cell, x, state, w, dy, dfinal, grads0, 1)
    assert len(calls) == 4 * (workers - 1)             # 4 phases, all but one piece on the pool
    for name in ("y", "dx", "dh"):
        assert_close(got[name], want[name], np.float64, name)
    for k in range(len(state)):
        assert_close(got["dstate"][k], want["dstate"][k], np.float64, f"dstate[{k}]")
    for name in grads0:
        assert_close(got["grads"][name], want["grads"][name], np.float64, f"d{name}")


def test_small_gemm_phases_stay_in_one_piece(monkeypatch):
    """A split call runs a GEMM phase (input projection; weight gradients and dx) of under
    MIN_PHASE_WORK_FOR_THREADS multiply-adds as one piece: only the time loops go to the pool."""
    from bptt_kernels.cpu import _loop
    monkeypatch.setattr(_loop, "THREADS", 2)
    monkeypatch.setattr(_loop, "MIN_WORK_FOR_THREADS", 0)
    calls = []
    run_piece = _loop._on_one_blas_thread
    monkeypatch.setattr(_loop, "_on_one_blas_thread", lambda *a: (calls.append(a[0].__name__), run_piece(*a)))
    rng = np.random.default_rng(3)
    x, state, w, dy, dfinal, grads0 = random_problem(rng, "gru", np.float64, 6, 5, 4, 7)
    got = run_cell(cpu, "gru", x, state, w, dy, dfinal, grads0, 2)
    assert calls == ["_forward_steps", "_backward_steps"]
    want = run_cell(ref, "gru", x, state, w, dy, dfinal, grads0, 2)
    for name in ("y", "dx", "dh"):
        assert_close(got[name], want[name], np.float64, name)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("workers, B", [(2, 1), (3, 1), (3, 2), (2, 5), (2, 9)])
@pytest.mark.parametrize("cell", CELLS)
def test_time_loop_split_by_units(cell, workers, B, dtype, monkeypatch):
    """Fewer batch rows than threads, or a few rows per thread, and a weight counted as large:
    the time loops are cut by hidden units (H=37: uneven ranges, some not a multiple of 4) and
    meet at a barrier every step; t_start=2. Same result as the reference, and the unit split
    did run (its pieces together)."""
    together = force_unit_split(monkeypatch, workers)
    T, I, H = 9, 6, 37
    rng = np.random.default_rng(workers * 10 + B)
    x, state, w, dy, dfinal, grads0 = random_problem(rng, cell, dtype, T, B, I, H)
    got = run_cell(cpu, cell, x, state, w, dy, dfinal, grads0, 2)
    want = run_cell(ref, cell, x, state, w, dy, dfinal, grads0, 2)
    assert together.count(True) == 2                        # forward and backward time loops
    for name in ("y", "dx", "dh"):
        assert_close(got[name], want[name], dtype, name)
    for k in range(len(state)):
        assert_close(got["dstate"][k], want["dstate"][k], dtype, f"dstate[{k}]")
    for name in grads0:
        assert_close(got["grads"][name], want["grads"][name], dtype, f"d{name}")


@pytest.fixture
def small_overlap_pieces(monkeypatch):
    """Two threads for any layer call, and the one-row GEMM phases beside the time loop in
    pieces of 2, 4, 8 projected steps and of time blocks of 3 finished steps."""
    from bptt_kernels.cpu import _phases, _loop
    from bptt_kernels.host import blocks
    monkeypatch.setattr(_loop, "THREADS", 2)
    monkeypatch.setattr(_loop, "MIN_WORK_FOR_THREADS", 0)
    monkeypatch.setattr(_phases, "PROJECT_FIRST_STEPS", 2)
    monkeypatch.setattr(blocks, "BLOCK_STEPS", 3)
    monkeypatch.setattr(blocks, "BLOCK_ROWS", 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("T, t_start, projected", [(13, 0, False), (13, 4, False), (13, 12, False),
                                                   (3, 1, False), (13, 2, True)])
@pytest.mark.parametrize("cell", CELLS)
def test_gemm_phases_beside_time_loop(cell, T, t_start, projected, dtype, small_overlap_pieces,
                                      monkeypatch):
    """One batch row on two threads with a weight counted as small: the time loop runs on one
    thread and the GEMM phases beside it on the other (pieces of 2, 4, 8 projected steps and
    time blocks of 3 finished steps, so T=13 cuts them unevenly; T=3 projects all steps before the loop; the
    dx of the DX_HERE_SHARE of the steps the loop reaches last is computed after it, from a
    piece's middle where t_start=4). The results match the reference, also where the caller projected the input
    (w_ih None), and both phases did run overlapped."""
    from bptt_kernels.cpu import _phases, _loop
    overlapped = []
    run_overlapped = _loop.run_overlapped
    monkeypatch.setattr(_phases, "run_overlapped", lambda *a, **kw: (
        overlapped.append(a[1][0].__name__), run_overlapped(*a, **kw))[1])   # the consumer
    I, H = 5, 11
    rng = np.random.default_rng([CELLS.index(cell), T, t_start])
    x, state, w, dy, dfinal, grads0 = random_problem(rng, cell, dtype, T, 1, I, H)
    if projected:
        x = (x @ w["w_ih"].T).astype(dtype)
        w["w_ih"] = grads0["w_ih"] = None
    got = run_cell(cpu, cell, x, state, w, dy, dfinal, grads0, t_start)
    want = run_cell(ref, cell, *f64((x, state, w, dy, dfinal, grads0)), t_start)
    steps_before_loop = T <= _phases.PROJECT_FIRST_STEPS or projected
    assert overlapped == (([] if steps_before_loop else ["project_first_then_loop"])
                          + ["finish_backward_steps"])
    for name in ("y", "dx", "dh"):
        assert_close(got[name], want[name], dtype, name)
    assert np.all(got["dx"][:t_start] == 0) and np.all(got["dh"][:t_start] == 0)
    for k in range(len(state)):
        assert_close(got["dstate"][k], want["dstate"][k], dtype, f"dstate[{k}]")
    for name in grads0:
        if grads0[name] is not None:
            assert_close(got["grads"][name], want["grads"][name], dtype, f"d{name}")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gemm_phases_beside_time_loop_with_workers_busy(cell, small_overlap_pieces):
    """While another Python thread's call holds the workers, a one-row call that would run its
    GEMM phases beside the time loop runs them one after another here (the projection before
    the loop, the loop before the weight gradients) and gives the reference's result."""
    from bptt_kernels.cpu import _loop
    rng = np.random.default_rng(21)
    x, state, w, dy, dfinal, grads0 = random_problem(rng, cell, np.float32, 11, 1, 4, 9)
    assert _loop._team_lock.acquire(blocking=False)
    try:
        got = run_cell(cpu, cell, x, state, w, dy, dfinal, grads0, 3)
    finally:
        _loop._team_lock.release()
    want = run_cell(ref, cell, *f64((x, state, w, dy, dfinal, grads0)), 3)
    for name in ("y", "dx", "dh"):
        assert_close(got[name], want[name], np.float32, name)
    for name in grads0:
        assert_close(got["grads"][name], want["grads"][name], np.float32, f"d{name}")


@pytest.mark.parametrize("consumer_here", [False, True])
def test_overlapped_piece_that_stops_releases_the_other(consumer_here, monkeypatch):
    """If the producer of an overlapped pair stops before publishing (an exception, Ctrl-C),
    the error reaches the caller and the consumer's wait returns (aborted) instead of spinning
    for good, on whichever thread each runs; with the workers busy, the pair runs producer
    first, one after the other."""
    import threading
    from numba import njit
    from bptt_kernels.cpu import _loop
    from bptt_kernels.cpu._barrier import publish, wait_for
    wait_without_gil = njit(nogil=True)(lambda progress: wait_for(progress, 1))  # as kernels do
    aborted = threading.Event()

    def producer(progress):
        raise KeyboardInterrupt

    def consumer(progress):
        if wait_without_gil(progress):
            aborted.set()

    progress = _loop.new_progress()
    with pytest.raises(KeyboardInterrupt):
        _loop.run_overlapped((producer, (progress,)), (consumer, (progress,)), progress,
                             consumer_here=consumer_here)
    assert aborted.wait(10), "the consumer still waits"
    order = []
    progress = _loop.new_progress()
    assert _loop._team_lock.acquire(blocking=False)
    try:
        _loop.run_overlapped((lambda p: (order.append("p"), publish(p, 1)), (progress,)),
                             (lambda p: (order.append("c"), wait_without_gil(p)), (progress,)),
                             progress, consumer_here=consumer_here)
    finally:
        _loop._team_lock.release()
    assert order == ["p", "c"] and progress[0] == 1 and progress[_loop.PAD] == 0


def test_split_by_units_rule():
    """The time-loop split follows the measured rule in _loop.py: units for few rows (or fewer
    than threads) or up to 64 per thread, each with a large enough W_hh; batch rows otherwise
    and on one thread."""
    from bptt_kernels.cpu._loop import split_by_units
    assert split_by_units(1, 2, 1 << 17) and split_by_units(2, 3, 1 << 17)
    assert not split_by_units(1, 2, (1 << 17) - 1) and not split_by_units(2, 3, (1 << 17) - 1)
    assert not split_by_units(1, 1, 1 << 24)
    assert split_by_units(7, 2, 1 << 17) and not split_by_units(7, 2, (1 << 17) - 1)
    assert split_by_units(9, 16, 1 << 17) and not split_by_units(9, 16, (1 << 17) - 1)
    assert split_by_units(8, 2, 1 << 21) and not split_by_units(8, 2, (1 << 21) - 1)
    assert split_by_units(128, 2, 1 << 21) and not split_by_units(129, 2, 1 << 24)


def test_unit_split_piece_that_stops_releases_the_others(monkeypatch):
    """If the calling thread's piece stops (an exception, Ctrl-C) while a pool piece waits at a
    barrier for it, the error reaches the caller, the waiting piece returns (barrier says it
    was aborted) instead of spinning for good, and the next unit-split call runs normally."""
    import threading
    from bptt_kernels.cpu import _loop
    from bptt_kernels.cpu._barrier import barrier
    monkeypatch.setattr(_loop, "THREADS", 2)
    monkeypatch.setattr(_loop, "MIN_WORK_FOR_THREADS", 0)
    monkeypatch.setattr(_loop, "MIN_PHASE_WORK_FOR_THREADS", 0)
    aborted = threading.Event()

    def piece(flags, part, parts):
        if part == 0:
            raise KeyboardInterrupt                       # before reaching its first barrier
        if barrier(flags, part, parts, 1):
            aborted.set()

    with pytest.raises(KeyboardInterrupt):
        _loop.run_time_loop(piece, (), 2, 1, 1 << 20)     # B=1 < 2 pieces, large W: units
    assert aborted.wait(10), "the pool piece still waits at its barrier"
    rng = np.random.default_rng(8)
    x, state, w, dy, dfinal, grads0 = random_problem(rng, "gru", np.float64, 4, 1, 3, 6)
    got = run_cell(cpu, "gru", x, state, w, dy, dfinal, grads0, 0)
    want = run_cell(ref, "gru", x, state, w, dy, dfinal, grads0, 0)
    assert_close(got["dx"], want["dx"], np.float64, "dx")


def test_unit_split_busy_falls_back_to_batch_split(monkeypatch):
    """While another Python thread's call holds the workers, a call splits by batch rows and
    runs its pieces one after another (a barrier needs all its pieces running at once), and
    still gives the right result."""
    from bptt_kernels.cpu import _loop
    monkeypatch.setattr(_loop, "THREADS", 2)
    monkeypatch.setattr(_loop, "MIN_WORK_FOR_THREADS", 0)
    monkeypatch.setattr(_loop, "MIN_PHASE_WORK_FOR_THREADS", 0)
    monkeypatch.setattr(_loop, "UNIT_SPLIT_WEIGHT_FEW_ROWS", 1)  # B=1 would split by units
    rng = np.random.default_rng(5)
    x, state, w, dy, dfinal, grads0 = random_problem(rng, "lstm", np.float64, 5, 1, 3, 10)
    assert _loop._team_lock.acquire(blocking=False)
    try:
        got = run_cell(cpu, "lstm", x, state, w, dy, dfinal, grads0, 0)
    finally:
        _loop._team_lock.release()
    want = run_cell(ref, "lstm", x, state, w, dy, dfinal, grads0, 0)
    for name in ("y", "dx", "dh"):
        assert_close(got[name], want[name], np.float64, name)


# step_product cases: (by_units, B, b0, b1, K, blocks, H, j0, j1, transposed, path); the path
# does not depend on how many steps the call runs (the rounding of a step's product must not)
STEP_CASES = [
    (True, 1, 0, 1, 29, 3, 13, 3, 10, False, "gemv"),  # one row, units 3:10 of 3 blocks
    (True, 1, 0, 1, 29, 3, 13, 4, 4, False, "gemv"),   # no units at all
    (True, 1, 0, 1, 520, 4, 70, 2, 69, False, "gemv"),  # 67 of 70 units, K = 520
    (False, 3, 1, 2, 29, 1, 39, 0, 39, False, "gemv"),  # one batch row of three: sgemv
    (False, 3, 1, 2, 29, 1, 39, 0, 39, True, "gemv"),   # ... on w^T
    (True, 1, 0, 1, 29, 1, 13, 2, 13, True, "panels"),  # one row, units of w^T's columns
    (True, 2, 0, 2, 29, 3, 13, 5, 12, False, "panels"),   # 7 columns: one partial panel each
    (True, 2, 0, 2, 29, 3, 13, 5, 12, True, "panels"),    # ... of w^T
    (True, 9, 0, 9, 300, 3, 400, 37, 337, False, "panels"),  # 4 x 64 + 44 per gate block
    (False, 10, 3, 7, 250, 1, 1100, 0, 1100, True, "panels"),  # rows 3:7, 17 x 64 + 12
    (False, 70, 0, 70, 1000, 1, 150, 0, 150, False, "panels"),  # K-blocks of 216 rows
    (True, 8, 0, 8, 2100, 4, 30, 3, 29, True, "panels"),  # 26 columns, K-blocks of 1952
    (False, 600, 0, 600, 40, 1, 37, 0, 37, False, "16-wide"),  # K-blocks of 104 rows
    (False, 4000, 0, 4000, 20, 1, 30, 0, 30, False, "one panel"),  # K-blocks < 16 rows
]


@pytest.mark.parametrize("rows", [(3, 33), (50, 9)], ids=["T*B=99: by columns", "T*B=450: by rows"])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_project_inputs_pieces(rows, parts):
    """The input projection x W_ih^T, split by output columns for few rows, by rows otherwise:
    every piece writes its share and only its share (out starts NaN)."""
    from bptt_kernels.cpu._phases import PROJECT_BY_COLUMNS_ROWS, project_inputs
    T, B = rows
    assert (T * B < PROJECT_BY_COLUMNS_ROWS) == (T * B == 99)
    rng = np.random.default_rng(T * B + parts)
    x, w = rng.standard_normal((T, B, 7)), rng.standard_normal((13, 7))
    out = np.full((T, B, 13), np.nan)
    for part in range(parts):
        project_inputs(x, w, out, part, parts)
    np.testing.assert_allclose(out, x @ w.T, rtol=1e-12, atol=1e-12)


@pytest.fixture
def openblas_provider():
    """The OpenBLAS provider for the test (its panels; under BPTT_BLAS=mkl the time loops pack
    for MKL instead: tests/test_blas_provider.py)."""
    from bptt_kernels.cpu import _blas, config
    config.BLAS = "openblas"
    _blas.use_provider()
    yield
    config.reset()


@pytest.mark.usefixtures("openblas_provider")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"{c[-1]}-B{c[1]}-K{c[4]}")
def test_step_product_matches_numpy(dtype, beta, case):
    """step_product (c = a @ w^T + beta c for one time-loop piece) on each of step_weight's
    paths (panels; w in place for one row or short calls: sgemv, sgemm NT or NN)
    writes exactly the piece's batch rows and columns (units j0:j1 of each gate block, or all),
    partial panels included; with beta = 0 the NaN-poisoned output is never read."""
    from bptt_kernels.cpu._panels import PANEL_MAX_WIDTH, SMALL_GEMM_MNK, step_product, step_weight
    by_units, B, b0, b1, K, blocks, H, j0, j1, transposed, path = case
    rng = np.random.default_rng(B * 1000 + K + j0)
    a = rng.standard_normal((B, K)).astype(dtype)
    w = rng.standard_normal((blocks * H, K)).astype(dtype)
    sw = step_weight(np.ascontiguousarray(w.T) if transposed else w, transposed, blocks, H,
                     b0, b1, j0, j1, by_units)
    want_width = {"gemv": 0, "panels": PANEL_MAX_WIDTH, "16-wide": 16,
                  "one panel": blocks * H}[path]
    assert sw.width == want_width
    if path in ("panels", "16-wide"):                   # K-blocks within OpenBLAS's small size
        assert 16 <= sw.kblock <= K and (b1 - b0) * sw.width * sw.kblock <= SMALL_GEMM_MNK
    c0 = rng.standard_normal((B, blocks * H)).astype(dtype)
    c = np.full_like(c0, np.nan) if beta == 0.0 else c0.copy()
    step_product(a, sw, c, beta)
    full = a.astype(np.float64) @ w.T.astype(np.float64) + (beta * c0 if beta else 0.0)
    mine = np.zeros((B, blocks * H), bool)
    for g in range(blocks):
        mine[b0:b1, g * H + j0:g * H + j1] = True
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert np.max(np.abs(c[mine] - full[mine]), initial=0) <= tol * np.max(np.abs(full))
    assert (np.isnan(c[~mine]).all() if beta == 0.0 else np.array_equal(c[~mine], c0[~mine]))


@pytest.mark.usefixtures("openblas_provider")
@pytest.mark.parametrize("split", ["units", "rows"])
@pytest.mark.parametrize("cell", CELLS)
def test_layers_with_weight_panels(cell, split, monkeypatch):
    """A layer of realistic size whose pieces multiply by packed weight panels in both time
    loops (8 rows; split by units, or by batch rows of 4) gives the reference's result."""
    from bptt_kernels.cpu import _loop
    from bptt_kernels.cpu._panels import step_weight
    monkeypatch.setattr(_loop, "THREADS", 2)
    monkeypatch.setattr(_loop, "UNIT_SPLIT_WEIGHT", 1 if split == "units" else 1 << 40)
    G = GATES[cell]
    T, B, I, H = 9, 8, 16, 1024 if G == 1 else 512
    assert _loop.split_by_units(B, 2, G * H * H) == (split == "units")
    rng = np.random.default_rng(G)
    x, state, w = random_layer(rng, cell, np.float32, T, B, I, H)
    w_hh = w["w_hh"]
    cols = (0, H // 2) if split == "units" else (0, H)
    rows = (0, B) if split == "units" else (0, B // 2)
    by_units = split == "units"
    assert step_weight(w_hh, False, G, H, *rows, *cols, by_units).width
    assert step_weight(w_hh, True, 1, H, *rows, *cols, by_units).width
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    dfinal = tuple(rng.standard_normal((B, H)).astype(np.float32) for _ in state)
    grads0 = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in w.items()}
    got = run_cell(cpu, cell, x, state, w, dy, dfinal, grads0, 0)
    want = run_cell(ref, cell, f64(x), f64(state), f64(w), f64(dy), f64(dfinal), f64(grads0), 0)
    for name in ("y", "dx", "dh"):
        assert_close(got[name], want[name], np.float32, name)
    for name in grads0:
        assert_close(got["grads"][name], want["grads"][name], np.float32, f"d{name}")


@pytest.mark.parametrize("cell", CELLS)
def test_reused_scratch_gives_fresh_results(cell, monkeypatch):
    """Backward passes reuse their gate-gradient scratch (same thread, name, shape): a second
    call over other data, and a call with t_start > 0 after one with t_start = 0 (rows below
    t_start hold the old call's values), both match the reference."""
    monkeypatch.undo()                                      # the real empty and scratch
    rng = np.random.default_rng(21)
    T, B, I, H = 6, 3, 4, 9
    seen = []
    for t_start in (0, 3):
        x, state, w, dy, dfinal, grads0 = random_problem(rng, cell, np.float64, T, B, I, H)
        got = run_cell(cpu, cell, x, state, w, dy, dfinal, grads0, t_start)
        want = run_cell(ref, cell, x, state, w, dy, dfinal, grads0, t_start)
        for name in ("dx", "dh"):
            assert_close(got[name][t_start:], want[name][t_start:], np.float64, name)
        for name in grads0:
            assert_close(got["grads"][name], want["grads"][name], np.float64, f"d{name}")
        seen.append({k: id(v) for k, v in _buffers._scratch.buffers.items()})
    assert seen[0] == seen[1]                               # the same buffers, reused


def test_part_ranges_cover_rows():
    from bptt_kernels.cpu._loop import part_range
    for n in range(0, 12):
        for parts in range(1, 6):
            ranges = [part_range(n, k, parts) for k in range(parts)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
