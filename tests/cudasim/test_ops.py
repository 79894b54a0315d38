"""Non-recurrent kernels of bptt_kernels.cuda (and its GEMM) on the CUDA simulator, against
``bptt_kernels.reference`` (NumPy for the GEMM), float64 <= 1e-10 and float32 <= 1e-5
relative, with NaN-poisoned scratch memory (conftest.py)."""

import numpy as np
import pytest

from helpers import RTOL, assert_close

DTYPES = [np.float64, np.float32]


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemm_kernel(cuda, rng, trans_a, trans_b, accumulate):
    from bptt_kernels.cuda import gemm
    M, K, N = 5, 7, 6                                  # partial 4x4 tiles in every dimension
    a = rng.standard_normal((K, M) if trans_a else (M, K))
    b = rng.standard_normal((N, K) if trans_b else (K, N))
    c0 = rng.standard_normal((M, N))
    c = c0.copy() if accumulate else np.full((M, N), np.nan)   # a plain write never reads c
    gemm.matmul(a, b, c, trans_a, trans_b, accumulate)
    want = (a.T if trans_a else a) @ (b.T if trans_b else b) + (c0 if accumulate else 0)
    assert_close(c, want, np.float64, "gemm")


def test_gemm_cublas_branch_calls(cuda, rng, monkeypatch):
    """The cuBLAS branch (real GPUs only) passes the transposes and the accumulation through
    as CuPy documents them: checked with NumPy stand-ins for cupy.matmul and cupy.cublas.gemm."""
    import sys
    import types

    from bptt_kernels.cuda import _device, config, gemm

    def fake_gemm(transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
        op = {"N": lambda m: m, "T": lambda m: m.T}
        out[...] = alpha * (op[transa](a) @ op[transb](b)) + beta * out
        return out

    fake = types.ModuleType("cupy")
    fake.matmul = np.matmul
    fake.cublas = types.ModuleType("cupy.cublas")
    fake.cublas.gemm = fake_gemm
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupy.cublas", fake.cublas)
    monkeypatch.setattr(_device, "cupy", fake)
    monkeypatch.setattr(_device, "SIMULATOR", False)
    config.GEMM = "cublas"
    for trans_a in (False, True):
        for trans_b in (False, True):
            for accumulate in (False, True):
                a = rng.standard_normal((3, 2) if trans_a else (2, 3))
                b = rng.standard_normal((4, 3) if trans_b else (3, 4))
                c0 = rng.standard_normal((2, 4))
                c = c0.copy()
                gemm.matmul(a, b, c, trans_a, trans_b, accumulate)
                want = (a.T if trans_a else a) @ (b.T if trans_b else b) + (c0 if accumulate else 0)
                assert_close(c, want, np.float64, f"cublas branch {trans_a} {trans_b} {accumulate}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alias", [False, True])
def test_softmax_cross_entropy(cuda, ref, rng, dtype, alias):
    N, V = 5, 37                                       # V > 32 threads: strided rows
    logits = (3 * rng.standard_normal((N, V))).astype(dtype)
    targets = rng.integers(0, V, N)
    targets[2] = -1                                    # ignored row
    want_d = np.empty_like(logits)
    want = ref.softmax_cross_entropy(logits.copy(), targets, want_d, 0.25)
    work = logits.copy()
    dlogits = work if alias else np.full_like(logits, np.nan)
    got = cuda.softmax_cross_entropy(work, targets, dlogits, 0.25)
    assert abs(got - want) <= RTOL[np.dtype(dtype)] * abs(want)
    assert_close(dlogits, want_d, dtype, "dlogits")
    assert not dlogits[2].any()
    with pytest.raises(ValueError, match="targets"):
        cuda.softmax_cross_entropy(logits, np.full(N, V), np.empty_like(logits), 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding(cuda, ref, rng, dtype):
    V, E = 7, 5
    weight = rng.standard_normal((V, E)).astype(dtype)
    ids = rng.integers(0, V, (4, 3))
    ids[0, :2] = ids[1, 0] = 3                         # repeated ids must accumulate
    assert_close(cuda.embedding_forward(weight, ids), ref.embedding_forward(weight, ids), dtype,
                 "gather")
    dout = rng.standard_normal((4, 3, E)).astype(dtype)
    dw0 = rng.standard_normal((V, E)).astype(dtype)
    got, want = dw0.copy(), dw0.copy()
    cuda.embedding_backward(got, ids, dout)
    ref.embedding_backward(want, ids, dout)
    assert_close(got, want, dtype, "scatter-add")
    with pytest.raises(ValueError, match="ids"):
        cuda.embedding_forward(weight, np.array([0, V]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum,weight_decay,nesterov", [
    (0.0, 0.0, False), (0.9, 0.01, False), (0.9, 0.0, True)])
def test_sgd_step(cuda, ref, rng, dtype, momentum, weight_decay, nesterov):
    shape = (6, 7)
    param, grad, buf = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    got, want = [param.copy(), buf.copy()], [param.copy(), buf.copy()]
    for first in (True, False):
        cuda.sgd_step(got[0], grad, got[1], 0.1, momentum, weight_decay, nesterov, first)
        ref.sgd_step(want[0], grad, want[1], 0.1, momentum, weight_decay, nesterov, first)
    assert_close(got[0], want[0], dtype, "param")
    if momentum:
        assert_close(got[1], want[1], dtype, "momentum buffer")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam_step(cuda, ref, rng, dtype, weight_decay):
    shape = (40,)                                      # > 32 threads: grid-stride
    param, grad = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    m, v = rng.standard_normal(shape).astype(dtype), rng.random(shape).astype(dtype)
    got = [param.copy(), m.copy(), v.copy()]
    want = [param.copy(), m.copy(), v.copy()]
    for step in (1, 2, 3):
        cuda.adam_step(got[0], grad, got[1], got[2], 1e-2, 0.9, 0.999, 1e-8, weight_decay, step)
        ref.adam_step(want[0], grad, want[1], want[2], 1e-2, 0.9, 0.999, 1e-8, weight_decay, step)
    for a, b, name in zip(got, want, ("param", "m", "v")):
        assert_close(a, b, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_of_squares_and_scale(cuda, ref, rng, dtype):
    arrays = [rng.standard_normal(s).astype(dtype) for s in [(3, 4), (70,), (2, 2, 2)]]
    want = ref.sum_of_squares(arrays)
    assert abs(cuda.sum_of_squares(arrays) - want) <= 1e-12 * want
    assert cuda.sum_of_squares([]) == 0.0
    got = [a.copy() for a in arrays]
    cuda.scale_(got, 0.37)
    ref.scale_(arrays, 0.37)
    for a, b in zip(got, arrays):
        assert_close(a, b, dtype, "scale_")


def test_tunables_do_not_change_results(cuda, ref, rng):
    """Block sizes are tunables: a non-power-of-two THREADS (the reductions round it down) and
    another GEMM tile give the same answers; config.reset() restores the defaults."""
    from bptt_kernels.cuda import config, gemm
    defaults = (config.THREADS, config.GEMM_TILE)
    config.THREADS, config.GEMM_TILE = 48, 3
    logits = rng.standard_normal((3, 70))
    targets = np.array([5, -1, 69])
    want_d = np.empty_like(logits)
    want = ref.softmax_cross_entropy(logits, targets, want_d, 1.0)
    got_d = np.full_like(logits, np.nan)
    assert abs(cuda.softmax_cross_entropy(logits, targets, got_d, 1.0) - want) <= 1e-12 * abs(want)
    assert_close(got_d, want_d, np.float64, "dlogits, THREADS=48")
    a, b = rng.standard_normal((4, 5)), rng.standard_normal((5, 7))
    c = np.full((4, 7), np.nan)
    gemm.matmul(a, b, c)
    assert_close(c, a @ b, np.float64, "gemm, tile 3")
    config.reset()
    assert (config.THREADS, config.GEMM_TILE, config.PATH) == defaults + ("auto",)


def test_plumbing_and_dispatch(cuda):
    import bptt
    assert cuda.NAME == "cuda" and cuda.xp is np
    a = cuda.asarray([[1, 2], [3, 4]], np.float32)
    assert a.dtype == np.float32 and a.flags.c_contiguous
    h = cuda.to_host(a)
    h[0, 0] = 9
    assert a[0, 0] == 1                                # to_host returns a copy
    assert not cuda.zeros((2, 3), np.float64).any()
    with bptt.use_backend("cuda") as backend:
        assert backend is cuda and bptt.get_backend() is cuda


def test_backend_interface_matches_reference(cuda, ref):
    """The cuda module has every public function of the reference, with the same signature."""
    import inspect
    names = [n for n, f in vars(ref).items() if inspect.isfunction(f) and not n.startswith("_")
             and f.__module__ == ref.__name__ and n != "sigmoid"]
    assert "linear_forward" in names and "lstm_backward" in names
    for n in names:
        assert inspect.signature(getattr(cuda, n)) == inspect.signature(getattr(ref, n)), n


# NumPy as 2.5 has it: no np.row_stack, nor in ``from numpy import *``
NUMPY_WITHOUT_ROW_STACK = (
    "import numpy as np\n"
    "if hasattr(np, 'row_stack'):\n"
    "    del np.row_stack\n"
    "    np.__all__ = [n for n in np.__all__ if n != 'row_stack']\n")


def test_import_leaves_numpy_alone(cuda):
    """Importing the backend under the simulator (which compiles nothing) adds no
    np.row_stack to a NumPy without it, and the backend still runs (in a fresh process)."""
    import os
    import subprocess
    import sys
    code = NUMPY_WITHOUT_ROW_STACK + (
        "import bptt_kernels.cuda as cb\n"
        "assert cb.SIMULATOR\n"
        "assert not hasattr(np, 'row_stack'), 'the import added np.row_stack'\n"
        "out = [np.ones(3)]\n"
        "cb.scale_(out, 2.0)\n"
        "assert (out[0] == 2).all() and not hasattr(np, 'row_stack')\n"
        "print('ok')\n")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
