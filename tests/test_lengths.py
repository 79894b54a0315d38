"""Variable-length batches: ``lengths`` [B] in the recurrent kernels and layers.

Row b of a batch runs only its steps t < lengths[b]; its padded steps keep the state, write
y = 0 and give no gradient, and the state gradient passes through them. This is PyTorch's
pack_padded_sequence(x, lengths, enforce_sorted=False) -> nn.LSTM/GRU/RNN ->
pad_packed_sequence, which is the oracle here (skipped without torch), besides:

* the layers (reference and cpu backends) against torch for y, final states and every
  gradient, every cell, 1-3 layers, lengths all T, all 1, unsorted and mixed, with and
  without bias, a carried initial state or none, the projected input;
* the reference kernel against a torch unroll of cells with the masks written out, t_start
  inside (the gradient cut at the state entering t_start) and the per-step dh;
* finite differences in float64 through the length masks (kernel level);
* the cpu kernels against the reference on every cpu path (by batch rows, by hidden units,
  one row with the GEMM phases beside the loop) with NaN-poisoned buffers, and a call with
  every length T bit-identical to one without lengths;
* the cache carrying the lengths (field, dicts of host arrays, layer caches).

The GPU backends' masks: tests/test_lengths_cupy.py (cupy's host emulation) and
tests/cudasim/test_lengths_cuda.py (Numba-CUDA under the simulator).
"""

import numpy as np
import pytest

import bptt_kernels.cpu as cpu
import bptt_kernels.reference as ref
from bptt_kernels import CELLS, GATES
from bptt_kernels.cpu import _buffers, _loop, _phases
from bptt_kernels.host import RecurrentCache, blocks, cache_from_arrays, cache_to_arrays
from helpers import RTOL, assert_close, force_unit_split, random_layer_problem

WEIGHTS = ("w_ih", "w_hh", "b_ih", "b_hh")


def make_lengths(kind, T, B, rng):
    """int lengths [B] in 1..T: "T" all T, "1" all 1, "mixed" unsorted with both ends."""
    if kind == "T":
        return np.full(B, T, np.int64)
    if kind == "1":
        return np.ones(B, np.int32)
    lengths = rng.integers(1, T + 1, B)
    lengths[0], lengths[-1] = 1, T                   # the extremes, not in sorted order
    if B > 2:
        lengths[1] = T
    return rng.permutation(lengths)


# ----------------------------------------------------------------------------------------
# The layers against torch's packed sequences

try:
    import torch
except ImportError:         # an optional test dependency: its tests skip without it
    torch = None


def _torch():
    if torch is None:
        pytest.skip("torch is not installed")
    return torch


def torch_module(cell, I, H, L, bias, dtype):
    t = _torch()
    kw = dict(num_layers=L, bias=bias, dtype={np.dtype(np.float32): t.float32,
                                              np.dtype(np.float64): t.float64}[np.dtype(dtype)])
    if cell == "lstm":
        return t.nn.LSTM(I, H, **kw)
    if cell == "gru":
        return t.nn.GRU(I, H, **kw)
    return t.nn.RNN(I, H, nonlinearity=cell[4:], **kw)


def torch_packed(module, cell, x, state, lengths, dy, dstate):
    """torch through pack_padded_sequence(enforce_sorted=False): (y, final states, x.grad,
    initial state grads (None where state is None), {parameter name: grad})."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    T = x.shape[0]
    tx = torch.tensor(x, requires_grad=True)
    tstate = None if state is None else tuple(torch.tensor(s, requires_grad=True) for s in state)
    packed = pack_padded_sequence(tx, torch.tensor(np.asarray(lengths, np.int64)),
                                  enforce_sorted=False)
    arg = None if tstate is None else (tstate if cell == "lstm" else tstate[0])
    out, final = module(packed, arg)
    ty, _ = pad_packed_sequence(out, total_length=T)
    final = final if isinstance(final, tuple) else (final,)
    loss = (ty * torch.tensor(dy)).sum()
    loss = loss + sum((f * torch.tensor(d)).sum() for f, d in zip(final, dstate))
    loss.backward()
    return (ty.detach().numpy(), [f.detach().numpy() for f in final], tx.grad.numpy(),
            None if tstate is None else [s.grad.numpy() for s in tstate],
            {n: p.grad.numpy() for n, p in module.named_parameters()})


# (T, B, I, H, num_layers, bias, lengths, initial state)
LAYER_CONFIGS = [
    (6, 5, 3, 4, 1, True, "mixed", True),
    (7, 4, 2, 5, 2, False, "mixed", True),
    (5, 6, 4, 3, 3, True, "mixed", False),
    (5, 3, 4, 4, 2, True, "T", True),
    (5, 3, 3, 4, 2, False, "1", True),
    (1, 2, 3, 4, 1, True, "T", False),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("config", LAYER_CONFIGS, ids=lambda c: "T{}B{}I{}H{}L{}{}-{}{}".format(
    *c[:5], "" if c[5] else "-nobias", c[6], "-state" if c[7] else ""))
@pytest.mark.parametrize("cell", CELLS)
def test_layer_matches_torch_packed(backend, cell, config, dtype, rng, make_layer):
    _torch()
    T, B, I, H, L, bias, kind, with_state = config
    torch.manual_seed(int(rng.integers(2**31)))
    module = torch_module(cell, I, H, L, bias, dtype)
    layer = make_layer(cell, I, H, L, bias, dtype)
    layer.load_state_dict(module.state_dict())
    n_states = 2 if cell == "lstm" else 1
    lengths = make_lengths(kind, T, B, rng)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state = (tuple(rng.standard_normal((L, B, H)).astype(dtype) for _ in range(n_states))
             if with_state else None)
    dy = rng.standard_normal((T, B, H)).astype(dtype)
    dstate = tuple(rng.standard_normal((L, B, H)).astype(dtype) for _ in range(n_states))
    want_y, want_final, want_dx, want_dinit, want_grads = torch_packed(
        module, cell, x, state, lengths, dy, dstate)

    unpack = (lambda s: s) if cell == "lstm" else (lambda s: s[0])
    y, final, cache = layer.forward(x, None if state is None else unpack(state), lengths=lengths)
    dx, dinit, dh = layer.backward(dy, cache, unpack(dstate), return_dh=True)
    host = layer.backend.to_host
    what = f"{layer.backend.NAME} {cell} lengths={list(lengths)}"
    assert_close(y, want_y, dtype, f"{what} y")
    padded = np.arange(T)[:, None] >= np.asarray(lengths)[None, :]    # T,B
    assert np.all(np.asarray(y)[padded] == 0) and np.all(np.asarray(dx)[padded] == 0)
    for k in range(L):
        assert np.all(host(dh[k])[padded] == 0), f"{what} dh[{k}] at padded steps"
    final = final if isinstance(final, tuple) else (final,)
    dinit = dinit if isinstance(dinit, tuple) else (dinit,)
    for k in range(n_states):
        assert_close(host(final[k]), want_final[k], dtype, f"{what} final state[{k}]")
        if state is not None:
            assert_close(host(dinit[k]), want_dinit[k], dtype, f"{what} d(initial state)[{k}]")
    assert_close(dx, want_dx, dtype, f"{what} dx")
    assert set(want_grads) == set(layer.grads)
    for name, g in layer.grads.items():
        assert_close(host(g), want_grads[name], dtype, f"{what} d{name}")


@pytest.mark.parametrize("cell", CELLS)
def test_layer_projected_input_with_lengths(backend, cell, rng, make_layer):
    """forward(projected=True, lengths=...) gives the ordinary call's y and final state, and
    its backward's dL/d(x W_ih^T), times W_ih, the ordinary dx."""
    T, B, I, H, L = 6, 4, 3, 5, 2
    layer = make_layer(cell, I, H, L, True, np.float64, seed=int(rng.integers(2**31)))
    lengths = make_lengths("mixed", T, B, rng)
    x = rng.standard_normal((T, B, I))
    dy = rng.standard_normal((T, B, H))
    y, final, cache = layer.forward(x, lengths=lengths)
    dx, _ = layer.backward(dy, cache)
    w_ih = layer.backend.to_host(layer.params["weight_ih_l0"])
    y_p, final_p, cache_p = layer.forward(x @ w_ih.T, projected=True, lengths=lengths)
    g, _ = layer.backward(dy, cache_p)
    assert_close(y_p, y, np.float64, "y")
    for a, b in zip(final_p if isinstance(final_p, tuple) else (final_p,),
                    final if isinstance(final, tuple) else (final,)):
        assert_close(a, b, np.float64, "final state")
    assert_close(np.asarray(g) @ w_ih, dx, np.float64, "dL/d(x W_ih^T) W_ih")


def test_layer_bad_lengths(backend, make_layer):
    layer = make_layer("gru", 3, 4)
    x = np.ones((5, 2, 3))
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 5\], got 0 at row 1"):
        layer.forward(x, lengths=[3, 0])
    with pytest.raises(ValueError, match=r"lengths must have shape \[2\]"):
        layer.forward(x, lengths=[3])
    with pytest.raises(TypeError, match="lengths must be an array of integers"):
        layer.forward(x, lengths=[3.0, 1.0])
    with pytest.raises(ValueError, match=r"state must have shape \[L, B, H\] = \(1, 2, 4\); got array of shape \(1, 3, 4\)"):
        layer.forward(x, state=np.full((1, 3, 4), 0.5), lengths=[3, 2])      # lengths of B = 2, state of 3


def test_layer_cache_dict_keeps_lengths(backend, rng, make_layer):
    """LayerCache.to_dict holds each level's lengths (int64); the cache rebuilt from it gives
    the same backward."""
    T, B = 5, 3
    layer = make_layer("lstm", 2, 4, 2, True, np.float64, seed=3)
    lengths = np.array([2, 5, 1], np.int16)
    _, _, cache = layer.forward(rng.standard_normal((T, B, 2)), lengths=lengths)
    d = cache.to_dict(layer.backend.to_host)
    for level in d["layers"]:
        assert level["arrays"]["lengths"].dtype == np.int64
        np.testing.assert_array_equal(level["arrays"]["lengths"], lengths)
    dy = rng.standard_normal((T, B, 4))
    dx, dinit = layer.backward(dy, cache)
    grads = {k: layer.backend.to_host(g).copy() for k, g in layer.grads.items()}
    layer.zero_grad()
    dx2, dinit2 = layer.backward(dy, layer.cache_from_dict(d))
    np.testing.assert_array_equal(dx2, dx)
    for a, b in zip(dinit2, dinit):
        np.testing.assert_array_equal(a, b)
    for k, g in layer.grads.items():
        np.testing.assert_array_equal(layer.backend.to_host(g), grads[k])


# ----------------------------------------------------------------------------------------
# Kernel level: the reference against torch cells with the masks written out


def torch_masked_unroll(cell, p, lengths, t_start):
    """(y, final, dx, dstate entering t_start, dh (real steps), grads) of one layer by torch
    cells, step by step: h = where(t < lengths, cell(x_t, h), h); the state entering
    t_start detached (the gradient cut there)."""
    t = _torch()
    T, B, I = p["x"].shape
    H = p["w_hh"].shape[1]
    if cell == "lstm":
        module = t.nn.LSTMCell(I, H, dtype=t.float64)
    elif cell == "gru":
        module = t.nn.GRUCell(I, H, dtype=t.float64)
    else:
        module = t.nn.RNNCell(I, H, nonlinearity=cell[4:], dtype=t.float64)
    module.load_state_dict({"weight_ih": t.tensor(p["w_ih"]), "weight_hh": t.tensor(p["w_hh"]),
                            "bias_ih": t.tensor(p["b_ih"]), "bias_hh": t.tensor(p["b_hh"])})
    tx = t.tensor(p["x"], requires_grad=True)
    state = [t.tensor(s) for s in p["state"]]
    live = t.tensor(np.arange(T)[:, None] < np.asarray(lengths)[None, :])[:, :, None]   # T,B,1
    ys, hs, entering = [], [], None
    for step in range(T):
        if step == t_start:
            state = [s.detach().requires_grad_(True) for s in state]
            entering = state
        new = module(tx[step], tuple(state)) if cell == "lstm" else (module(tx[step], state[0]),)
        new[0].retain_grad()
        hs.append(new[0])
        ys.append(t.where(live[step], new[0], t.zeros_like(new[0])))
        state = [t.where(live[step], n, s) for n, s in zip(new, state)]
    loss = sum((y * t.tensor(d)).sum() for y, d in zip(ys[t_start:], p["dy"][t_start:]))
    loss = loss + sum((s * t.tensor(d)).sum() for s, d in zip(state, p["dfinal"]))
    loss.backward()
    dh = np.stack([h.grad.numpy() if h.grad is not None else np.zeros((B, H)) for h in hs])
    grads = [getattr(module, n).grad.numpy() for n in ("weight_ih", "weight_hh", "bias_ih",
                                                        "bias_hh")]
    return (np.stack([y.detach().numpy() for y in ys]), [s.detach().numpy() for s in state],
            tx.grad.numpy(), [s.grad.numpy() for s in entering], dh, grads)


def run_kernel(be, cell, p, lengths, t_start=0, projected=False):
    """One forward and backward on the numpy backend ``be`` -> dict of results (grads with
    p's starting gradients added, as the kernels accumulate)."""
    w_ih = None if projected else p["w_ih"]
    x = (p["x"] @ p["w_ih"].T).astype(p["x"].dtype) if projected else p["x"]
    y, final, cache = getattr(be, f"{cell}_forward")(x, p["state"], w_ih, p["w_hh"], p["b_ih"],
                                                     p["b_hh"], lengths=lengths)
    grads = [None if projected and k == 0 else g.copy() for k, g in enumerate(p["grads0"])]
    dx, dstate, dh = getattr(be, f"{cell}_backward")(p["dy"], p["dfinal"], cache, w_ih,
                                                     p["w_hh"], *grads, t_start=t_start)
    return {"y": y, "final": list(final), "dx": dx, "dstate": list(dstate), "dh": dh,
            "grads": grads, "cache": cache}


@pytest.mark.parametrize("t_start", [0, 2, 4])
@pytest.mark.parametrize("cell", CELLS)
def test_reference_kernel_matches_torch_masked_cells(cell, t_start):
    """Rows of lengths 1 and 2 lie wholly before t_start=4: their dstate is dfinal_state."""
    _torch()
    T, B, I, H = 6, 5, 3, 4
    rng = np.random.default_rng([CELLS.index(cell), t_start, 1])
    p = random_layer_problem(rng, cell, T, B, I, H, np.float64)
    lengths = np.array([3, 6, 1, 5, 2])
    got = run_kernel(ref, cell, p, lengths, t_start)
    y, final, dx, dstate, dh, grads = torch_masked_unroll(cell, p, lengths, t_start)
    padded = np.arange(T)[:, None] >= lengths[None, :]
    tol = RTOL[np.dtype(np.float64)]
    assert_close(got["y"], y, np.float64, "y", tol)
    for k in range(len(final)):
        assert_close(got["final"][k], final[k], np.float64, f"final[{k}]", tol)
        assert_close(got["dstate"][k], dstate[k], np.float64, f"dstate[{k}]", tol)
    assert_close(got["dx"], dx, np.float64, "dx", tol)
    assert_close(np.where(padded[:, :, None], 0, got["dh"]), np.where(padded[:, :, None], 0, dh),
                 np.float64, "dh at real steps", tol)
    assert np.all(got["dh"][padded] == 0) and np.all(got["dx"][padded] == 0)
    assert np.all(got["dh"][:t_start] == 0) and np.all(got["dx"][:t_start] == 0)
    for k, name in enumerate(WEIGHTS):
        assert_close(got["grads"][k] - p["grads0"][k], grads[k], np.float64, f"d{name}", tol)
    idle = lengths <= t_start
    for k in range(len(final)):
        np.testing.assert_array_equal(got["dstate"][k][idle], p["dfinal"][k][idle])


# ----------------------------------------------------------------------------------------
# Kernel level: finite differences through the masks


@pytest.mark.parametrize("be", [ref, cpu], ids=["reference", "cpu"])
@pytest.mark.parametrize("cell", CELLS)
def test_finite_differences_through_masks(be, cell):
    """L = sum(y * dy) + sum(final * dfinal): central differences (eps 1e-6) of a few entries
    of x (at real and padded steps), the initial state and the weights against the
    backward's gradients, rel <= 1e-6."""
    T, B, I, H = 5, 3, 2, 3
    rng = np.random.default_rng([CELLS.index(cell), 7])
    p = random_layer_problem(rng, cell, T, B, I, H, np.float64)
    lengths = np.array([2, 5, 1])
    fwd = getattr(be, f"{cell}_forward")

    def loss(q):
        y, final, _ = fwd(q["x"], q["state"], q["w_ih"], q["w_hh"], q["b_ih"], q["b_hh"],
                          lengths=lengths)
        return float(np.sum(y * p["dy"]) + sum(np.sum(f * d) for f, d in zip(final, p["dfinal"])))

    zero = dict(p, grads0=tuple(np.zeros_like(g) for g in p["grads0"]))
    got = run_kernel(be, cell, zero, lengths)
    analytic = {"x": got["dx"], "state0": got["dstate"][0], "state1": got["dstate"][-1],
                **dict(zip(WEIGHTS, got["grads"]))}
    entries = [("x", (0, 0, 1)), ("x", (1, 0, 0)), ("x", (3, 0, 1)),   # row 0: real, real, padded
               ("x", (4, 1, 0)), ("x", (0, 2, 1)), ("x", (2, 2, 0)),   # row 2: real, padded
               ("state0", (0, 2)), ("state0", (1, 1)), ("state1", (2, 0)),
               ("w_hh", (0, 1)), ("w_hh", (GATES[cell] * H - 1, 2)), ("w_ih", (1, 0)),
               ("b_ih", (H - 1,)), ("b_hh", (0,))]
    eps = 1e-6
    for name, idx in entries:
        if name == "state1" and cell != "lstm":
            continue
        num = []
        for sign in (1, -1):
            q = {k: (tuple(s.copy() for s in v) if isinstance(v, tuple) else v.copy())
                 for k, v in p.items()}
            target = (q["state"][0 if name == "state0" else 1] if name.startswith("state")
                      else q[name])
            target[idx] += sign * eps
            num.append(loss(q))
        fd = (num[0] - num[1]) / (2 * eps)
        a = analytic[name][idx]
        assert abs(a - fd) <= 1e-6 * max(1.0, abs(fd)), f"{cell} d{name}{idx}: {a} vs {fd}"
    assert analytic["x"][3, 0, 1] == 0 and analytic["x"][2, 2, 0] == 0   # padded steps


# ----------------------------------------------------------------------------------------
# The cpu kernels against the reference, on every cpu path, poisoned buffers


@pytest.fixture
def poisoned_buffers(monkeypatch):
    monkeypatch.setattr(_buffers, "empty", lambda shape, dtype: np.full(shape, np.nan, dtype))
    monkeypatch.setattr(_buffers, "scratch",
                        lambda name, shape, dtype: np.full(shape, np.nan, dtype))


def f64(p):
    return {k: tuple(np.asarray(a, np.float64) for a in v) if isinstance(v, tuple)
            else np.asarray(v, np.float64) for k, v in p.items()}


def check_cpu_against_reference(cell, dtype, T, B, I, H, lengths, t_starts, seed,
                                projected=False):
    rng = np.random.default_rng(seed)
    p = random_layer_problem(rng, cell, T, B, I, H, dtype)
    tol = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}[np.dtype(dtype)]
    padded = np.arange(T)[:, None] >= np.asarray(lengths)[None, :]
    for t_start in t_starts:
        got = run_kernel(cpu, cell, p, lengths, t_start, projected)
        want = run_kernel(ref, cell, f64(p), lengths, t_start, projected)
        what = f"{cell} {np.dtype(dtype).name} lengths={list(lengths)} t_start={t_start}"
        assert got["y"].dtype == dtype and got["dx"].dtype == dtype
        for name in ("y", "dx", "dh"):
            assert_close(got[name], want[name], dtype, f"{what} {name}", tol)
            assert np.all(got[name][padded] == 0), f"{what}: {name} at padded steps"
        for k in range(len(got["final"])):
            assert_close(got["final"][k], want["final"][k], dtype, f"{what} final[{k}]", tol)
            assert_close(got["dstate"][k], want["dstate"][k], dtype, f"{what} dstate[{k}]", tol)
        for k, name in enumerate(WEIGHTS):
            if got["grads"][k] is not None:
                assert_close(got["grads"][k], want["grads"][k], dtype, f"{what} d{name}", tol)
        for field in ("gates", "c", "tanh_c", "hn"):       # the cache: zeros where padded
            a = getattr(got["cache"], field)
            if a is not None:
                assert_close(a, getattr(want["cache"], field), dtype, f"{what} cache.{field}", tol)
                assert np.all(a[padded] == 0)
        np.testing.assert_array_equal(got["cache"].lengths, lengths)
        assert got["cache"].lengths.dtype == np.int64


DTYPES = [np.float64, np.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_matches_reference_one_piece(cell, dtype, poisoned_buffers, monkeypatch):
    """One thread, the loop over all rows; lengths mixed, all 1, all T; t_start 0 and inside."""
    monkeypatch.setattr(_loop, "THREADS", 1)
    T, B, I, H = 7, 5, 4, 6
    rng = np.random.default_rng(CELLS.index(cell))
    for kind in ("mixed", "1", "T"):
        check_cpu_against_reference(cell, dtype, T, B, I, H, make_lengths(kind, T, B, rng),
                                    (0, 3), seed=[CELLS.index(cell), 1])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_matches_reference_split_by_rows(cell, dtype, poisoned_buffers, monkeypatch):
    """Two and three pieces by batch rows (uneven), the GEMM phases in pieces too."""
    calls = []
    run_piece = _loop._on_one_blas_thread
    monkeypatch.setattr(_loop, "_on_one_blas_thread", lambda *a: (calls.append(a[0].__name__),
                                                                  run_piece(*a)))
    monkeypatch.setattr(_loop, "MIN_WORK_FOR_THREADS", 0)
    monkeypatch.setattr(_loop, "MIN_PHASE_WORK_FOR_THREADS", 0)
    for workers in (2, 3):
        monkeypatch.setattr(_loop, "THREADS", workers)
        calls.clear()
        check_cpu_against_reference(cell, dtype, 6, 5, 4, 7, np.array([3, 6, 1, 4, 6]), (0, 2),
                                    seed=[CELLS.index(cell), workers])
        assert calls.count("_forward_steps") == 2 * (workers - 1)   # both t_start runs


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("workers, B", [(2, 1), (3, 2), (2, 5)])
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_matches_reference_split_by_units(cell, workers, B, dtype, poisoned_buffers,
                                              monkeypatch):
    """The time loops cut by hidden units (H=37, uneven) meeting at a barrier every step."""
    together = force_unit_split(monkeypatch, workers)
    T = 9
    lengths = np.array([5]) if B == 1 else np.array([9, 2, 7, 1, 4][:B])
    check_cpu_against_reference(cell, dtype, T, B, 6, 37, lengths, (0, 3, 6),
                                seed=[CELLS.index(cell), workers, B])
    assert together.count(True) == 6                        # forward and backward, 3 runs


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("length, t_start, projected", [(9, 0, False), (5, 0, False),
                                                        (5, 4, False), (4, 6, False),
                                                        (13, 2, True), (6, 2, True)])
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_matches_reference_gemm_phases_beside_loop(cell, length, t_start, projected, dtype,
                                                       poisoned_buffers, monkeypatch):
    """One row on two threads: the time loop on one, the input projection and the weight
    gradients beside it on the other in pieces (2, 4, 8 projected steps; time blocks of 3
    finished steps),
    the row's length inside, at, and before the backward's window (t_start=6 > length 4:
    dstate is dfinal_state)."""
    monkeypatch.setattr(_loop, "THREADS", 2)
    monkeypatch.setattr(_loop, "MIN_WORK_FOR_THREADS", 0)
    monkeypatch.setattr(_phases, "PROJECT_FIRST_STEPS", 2)
    monkeypatch.setattr(blocks, "BLOCK_STEPS", 3)
    monkeypatch.setattr(blocks, "BLOCK_ROWS", 0)
    overlapped = []
    run_overlapped = _loop.run_overlapped
    monkeypatch.setattr(_phases, "run_overlapped", lambda *a, **kw: (
        overlapped.append(a[1][0].__name__), run_overlapped(*a, **kw))[1])
    check_cpu_against_reference(cell, dtype, 13, 1, 5, 11, np.array([length]), (t_start,),
                                seed=[CELLS.index(cell), length, t_start], projected=projected)
    assert "finish_backward_steps" in overlapped
    assert projected or "project_first_then_loop" in overlapped


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_lengths_all_T_bit_identical(cell, dtype, threads, monkeypatch):
    """Every length T gives what no lengths gives, bit for bit (forward and backward)."""
    monkeypatch.setattr(_loop, "THREADS", threads)
    monkeypatch.setattr(_loop, "MIN_WORK_FOR_THREADS", 0)
    T, B, I, H = 6, 3, 4, 5
    p = random_layer_problem(np.random.default_rng([CELLS.index(cell), threads]), cell, T, B, I,
                             H, dtype)
    for t_start in (0, 2):
        a = run_kernel(cpu, cell, p, None, t_start)
        b = run_kernel(cpu, cell, p, np.full(B, T, np.int32), t_start)
        for name in ("y", "dx", "dh"):
            np.testing.assert_array_equal(b[name], a[name])
        for k in range(len(a["final"])):
            np.testing.assert_array_equal(b["final"][k], a["final"][k])
            np.testing.assert_array_equal(b["dstate"][k], a["dstate"][k])
        for k in range(4):
            np.testing.assert_array_equal(b["grads"][k], a["grads"][k])
        assert a["cache"].lengths is None


# ----------------------------------------------------------------------------------------
# The cache


def test_cache_arrays_carry_lengths():
    p = random_layer_problem(np.random.default_rng(5), "gru", 4, 3, 2, 5, np.float64)
    lengths = np.array([4, 1, 2], np.uint8)
    _, _, cache = ref.gru_forward(p["x"], p["state"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"],
                                  lengths=lengths)
    assert cache.lengths.dtype == np.int64 and list(cache.lengths) == [4, 1, 2]
    cell, arrays = cache_to_arrays(cache, ref.to_host)
    assert arrays["lengths"].dtype == np.int64 and arrays["lengths"] is not cache.lengths
    back = cache_from_arrays(cell, arrays, lambda a: ref.asarray(a, a.dtype))
    assert isinstance(back, RecurrentCache) and back.lengths.dtype == np.int64
    np.testing.assert_array_equal(back.lengths, lengths)
    _, _, plain = ref.gru_forward(p["x"], p["state"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])
    assert plain.lengths is None and "lengths" not in cache_to_arrays(plain, ref.to_host)[1]
    # a cache whose lengths came back as another integer type is used as int64
    odd = cache._replace(lengths=[4, 1, 2])
    g = [np.zeros_like(a) for a in p["grads0"]]
    want = ref.gru_backward(p["dy"], None, cache, p["w_ih"], p["w_hh"], *g)
    got = ref.gru_backward(p["dy"], None, odd, p["w_ih"], p["w_hh"], *g)
    np.testing.assert_array_equal(got[0], want[0])
