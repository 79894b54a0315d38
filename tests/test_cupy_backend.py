"""The CuPy backend without a GPU: its kernels' arithmetic and its orchestration.

Most checks run the backend's own Engine (path choice, GEMM placement, caches, t_start, dh,
weight-gradient GEMMs, argument plumbing) over NumPy, with the CUDA kernels compiled for the
host from the very same sources (bptt_kernels.cupy.host_emulation), against two independent
oracles: the float64 NumPy reference (bptt_kernels.reference) and central finite differences.
Kernels run in both item orders (a missing barrier shows up as an order dependence), outputs
are NaN-poisoned before the kernels write them, and the host launcher checks every launch's
arguments against the kernel's C signature.

Tolerances (normwise: max |a - b| / max |b| per array): float64 1e-12, float32 1e-5;
finite differences (float64, central, eps 1e-6): relative error 1e-6.

The real-GPU parity tests at the end skip with a reason where no GPU is usable; on a GPU
machine perf/gpu_check.py runs the same comparisons through the backend interface.
"""

import ctypes
import functools
import inspect
import itertools
import os
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest

import bptt_kernels
import bptt_kernels.cupy as cb
from bptt_kernels import CELLS, STATE_PARTS, reference as ref
from bptt_kernels.cupy import _compile, _cublas, _engine, _plan, config, host_emulation
from bptt_kernels.host import CELL_FIELDS, RecurrentCache, cache_from_arrays, cache_to_arrays
from helpers import random_layer_problem, rel_err

TOL = {np.float32: 1e-5, np.float64: 1e-12}
DTYPE_IDS = {np.float32: "f32", np.float64: "f64"}
PATHS = ("general", "persistent", "cooperative")
KERNEL_KIND = {"general": "_step_", "persistent": "_persistent_", "cooperative": "_cooperative_"}

needs_cxx = pytest.mark.skipif(host_emulation.find_compiler() is None,
                               reason="no host C++ compiler (g++/c++/clang++) to build the kernels")


@pytest.fixture(autouse=True)
def _fresh_config():
    config.reset()
    config.POISON_OUTPUTS = True
    yield
    config.reset()


@pytest.fixture(scope="module")
def engines():
    """{reverse: Engine} over NumPy with the host build of the CUDA kernels (H100 limits)."""
    if host_emulation.find_compiler() is None:
        pytest.skip("no host C++ compiler (g++/c++/clang++) to build the kernels")
    return {rev: host_emulation.host_engine(reverse=rev) for rev in (False, True)}


def run_reference(cell, p, dy, dfinal, t_start, grads0):
    f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    y, final, cache = getattr(ref, f"{cell}_forward")(
        f64(p["x"]), tuple(map(f64, p["state"])), f64(p["w_ih"]), f64(p["w_hh"]),
        f64(p["b_ih"]), f64(p["b_hh"]))
    grads = [f64(g).copy() for g in grads0]
    dx, dstate, dh = getattr(ref, f"{cell}_backward")(
        f64(dy), tuple(map(f64, dfinal)), cache, f64(p["w_ih"]), f64(p["w_hh"]), *grads,
        t_start=t_start)
    return dict(y=y, final=final, dx=dx, dstate=dstate, dh=dh, grads=grads)


def run_engine(eng, cell, p, dy, dfinal, t_start, grads0, fwd_path=None, bwd_path=None):
    if fwd_path:
        config.PATH = fwd_path
    y, final, cache = eng.recurrent_forward(cell, p["x"], p["state"], p["w_ih"], p["w_hh"],
                                            p["b_ih"], p["b_hh"])
    if bwd_path:
        config.PATH = bwd_path
    grads = [g.copy() for g in grads0]
    dx, dstate, dh = eng.recurrent_backward(cell, dy, dfinal, cache, p["w_ih"], p["w_hh"],
                                            *grads, t_start=t_start)
    return dict(y=y, final=final, dx=dx, dstate=dstate, dh=dh, grads=grads)


def compare(got, want, tol, what=""):
    for key in ("y", "dx", "dh"):
        assert rel_err(got[key], want[key]) <= tol, f"{what} {key}: {rel_err(got[key], want[key]):.2e}"
    for key in ("final", "dstate", "grads"):
        assert len(got[key]) == len(want[key])
        for k, (a, b) in enumerate(zip(got[key], want[key])):
            assert rel_err(a, b) <= tol, f"{what} {key}[{k}]: {rel_err(a, b):.2e}"


def random_problem(rng, cell, T, B, I, H, dtype):
    """helpers.random_layer_problem as run_engine takes it: (layer arrays, dy, dfinal, grads0)."""
    q = random_layer_problem(rng, cell, T, B, I, H, dtype)
    p = {k: q[k] for k in ("x", "state", "w_ih", "w_hh", "b_ih", "b_hh")}
    return p, q["dy"], q["dfinal"], list(q["grads0"])


# ------------------------------------------------------------------------------------------
# recurrent kernels against the reference


@needs_cxx
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_matches_reference(engines, cell, path, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{cell} {path} {DTYPE_IDS[dtype]}".encode()))
    T, B, I, H = 6, 3, 5, 7
    kind = KERNEL_KIND[path]
    for t_start in (0, 3):
        p, dy, dfinal, grads0 = random_problem(rng, cell, T, B, I, H, dtype)
        want = run_reference(cell, p, dy, dfinal, t_start, grads0)
        for reverse, eng in engines.items():
            eng.launch.calls.clear()
            got = run_engine(eng, cell, p, dy, dfinal, t_start, grads0, path, path)
            compare(got, want, TOL[dtype], f"{cell} {path} t_start={t_start} reverse={reverse}")
            assert np.all(got["dh"][:t_start] == 0) and np.all(got["dx"][:t_start] == 0)
            names = [c[0] for c in eng.launch.calls]
            assert names and all(kind in n and n.startswith(cell + "_") for n in names), names


@needs_cxx
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", CELLS)
def test_input_projected_by_the_caller(engines, cell, path, dtype, check_projected_input):
    """w_ih=None: x is x W_ih^T already, and the backward returns dL/d(x W_ih^T) for dx."""
    rng = np.random.default_rng(zlib.crc32(f"projected {cell} {path} {DTYPE_IDS[dtype]}".encode()))
    eng = engines[False]
    config.PATH = path

    def forward(*args):
        return eng.recurrent_forward(cell, *args)

    def backward(*args):
        return eng.recurrent_backward(cell, *args)
    check_projected_input(forward, backward, lambda a: a, np.asarray, cell, dtype,
                          (6, 3, 5, 7, 3), rng, TOL[dtype])


@needs_cxx
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 3, 1), (2, 1, 1, 33), (12, 4, 10, 24)],
                         ids=lambda s: "T%d-B%d-I%d-H%d" % s)
@pytest.mark.parametrize("cell", CELLS)
def test_edge_and_medium_shapes(engines, cell, shape):
    """Single step / unit / row, and a medium float32 problem, on every path."""
    T, B, I, H = shape
    dtype = np.float32 if T > 2 else np.float64
    rng = np.random.default_rng(zlib.crc32(f"{cell}{shape}".encode()))
    p, dy, dfinal, grads0 = random_problem(rng, cell, T, B, I, H, dtype)
    t_start = T // 2
    want = run_reference(cell, p, dy, dfinal, t_start, grads0)
    for path in PATHS:
        got = run_engine(engines[True], cell, p, dy, dfinal, t_start, grads0, path, path)
        compare(got, want, TOL[dtype], f"{cell} {shape} {path}")


@needs_cxx
@pytest.mark.parametrize("splits", [1, 2, 8])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("path", ["persistent", "cooperative"])
def test_one_launch_paths_blocks_and_splits(path, cell, splits):
    """persistent: B=5 on a 2-SM device, 3 rows per block, 2 blocks, the last one partial.
    cooperative: H=8 on a 3-SM device, 3 units per block, 3 blocks, the last with 2 units.
    Each dot product split in 1, 2 or 8 parts (some parts of H=6 units are empty); the device's
    shared memory is exactly what `splits` parts need."""
    dtype = np.float64
    if path == "persistent":
        T, B, I, H, n_sm, per_block, grid, work = 4, 5, 3, 6, 2, 3, 2, 3 * 6
        layout = _plan.persistent_smem_layout(cell, H, per_block, dtype, splits)
    else:
        T, B, I, H, n_sm, per_block, grid, work = 4, 3, 3, 8, 3, 3, 3, 3 * 3
        layout = _plan.cooperative_smem_layout(cell, H, B, per_block, dtype, splits)
    eng = host_emulation.host_engine(reverse=True, limits=(max(layout), n_sm))
    config.PATH = path
    assert eng.plan(cell, B, H, dtype) == (path, per_block, splits)
    rng = np.random.default_rng(11)
    p, dy, dfinal, grads0 = random_problem(rng, cell, T, B, I, H, dtype)
    want = run_reference(cell, p, dy, dfinal, 1, grads0)
    got = run_engine(eng, cell, p, dy, dfinal, 1, grads0)
    compare(got, want, TOL[dtype], f"{cell} {path} splits={splits}")
    calls = [c for c in eng.launch.calls if path in c[0]]
    assert [c[1] for c in calls] == [grid, grid]
    assert [c[2] for c in calls] == [-(-splits * work // 32) * 32] * 2  # threads
    assert [c[3] for c in calls] == list(layout)


class ColumnMajorBlas:
    """cuBLAS's gemm on host memory addressed by raw pointers, column-major as cuBLAS reads it,
    beta = 0 not reading C (as BLAS): a stand-in for _cublas.CublasLibrary."""

    def __init__(self):
        self.pointer_modes = []

    def setPointerMode(self, handle, mode):  # noqa: N802 -- cuBLAS's name
        self.pointer_modes.append(mode)

    @staticmethod
    def _matrix(dtype, address, rows, cols, ld):
        size = np.dtype(dtype).itemsize
        buf = (ctypes.c_char * (((cols - 1) * ld + rows) * size)).from_address(address)
        return np.ndarray((rows, cols), dtype, buf, strides=(size, ld * size))

    def _gemm(self, dtype, handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
        mat = functools.partial(self._matrix, dtype)
        a = mat(A, k, m, lda).T if transa else mat(A, m, k, lda)
        b = mat(B, n, k, ldb).T if transb else mat(B, k, n, ldb)
        c = mat(C, m, n, ldc)
        alpha, beta = mat(alpha, 1, 1, 1)[0, 0], mat(beta, 1, 1, 1)[0, 0]
        c[...] = alpha * (a @ b) + (beta * c if beta != 0 else 0)

    def sgemm(self, *args):
        self._gemm(np.float32, *args)

    def dgemm(self, *args):
        self._gemm(np.float64, *args)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS.get)
def test_step_gemm_calls_cublas_with_the_right_shapes(dtype):
    """StepGemm's column-major reading of row-major arrays, against numpy (NaN-filled out:
    beta = 0 must not read it), on a row view inside a bigger array as the general path does."""
    rng = np.random.default_rng(13)
    blas = ColumnMajorBlas()
    gemm = _cublas.StepGemm(blas, lambda: 7, lambda a: a.ctypes.data)
    M, K, N = 3, 5, 4
    y = rng.standard_normal((2, M, K)).astype(dtype)     # a = y[1]: a view at an offset
    for transpose_w, w in ((True, rng.standard_normal((N, K))), (False, rng.standard_normal((K, N)))):
        w = w.astype(dtype)
        out = np.full((M, N), np.nan, dtype)
        gemm(y[1], w, out, transpose_w)
        want = y[1] @ (w.T if transpose_w else w)
        assert rel_err(out, want) <= TOL[dtype], transpose_w
    assert blas.pointer_modes == [_cublas.POINTER_MODE_HOST] * 2


class CublasCLibrary:
    """libcublas as ctypes calls it (ctypes-typed arguments, a status returned), computing with
    ColumnMajorBlas and recording the streams set; ``status`` is what the GEMMs return."""

    def __init__(self):
        self.blas = ColumnMajorBlas()
        self.streams = []
        self.status = 0

    def cublasSetStream_v2(self, handle, stream):  # noqa: N802 -- cuBLAS's names
        self.streams.append(stream.value)
        return 0

    def cublasSetPointerMode_v2(self, handle, mode):  # noqa: N802
        self.blas.setPointerMode(handle.value, mode.value)
        return 0

    def cublasSgemm_v2(self, *args):  # noqa: N802
        self.blas.sgemm(*(a.value for a in args))
        return self.status

    def cublasDgemm_v2(self, *args):  # noqa: N802
        self.blas.dgemm(*(a.value for a in args))
        return self.status


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS.get)
def test_cublas_library_sets_the_stream_and_checks_status(dtype):
    """The ctypes cuBLAS calls StepGemm makes (CuPy's wrappers refuse stream capture): the
    current stream set before every GEMM, the arguments typed as the C functions take them,
    a failed status raised with the function's name."""
    rng = np.random.default_rng(17)
    lib = CublasCLibrary()
    streams = iter([0x1000, 0x2000])
    gemm = _cublas.StepGemm(_cublas.CublasLibrary(lambda: next(streams), lib), lambda: 7,
                            lambda a: a.ctypes.data)
    a, w = (rng.standard_normal(s).astype(dtype) for s in ((3, 5), (4, 5)))
    out = np.full((3, 4), np.nan, dtype)
    gemm(a, w, out, True)
    assert rel_err(out, a @ w.T) <= TOL[dtype]
    lib.status = 13                                    # CUBLAS_STATUS_EXECUTION_FAILED
    name = "cublasSgemm_v2" if dtype == np.float32 else "cublasDgemm_v2"
    with pytest.raises(RuntimeError, match=f"{name} failed with cublasStatus_t 13"):
        gemm(a, w.T.copy(), out, False)
    assert lib.streams == [0x1000, 0x2000]
    assert lib.blas.pointer_modes == [_cublas.POINTER_MODE_HOST] * 2


@needs_cxx
@pytest.mark.parametrize("cell", CELLS)
def test_general_path_through_step_gemm(cell):
    """The general path with its per-step GEMMs through StepGemm (on the stand-in cuBLAS)."""
    eng = host_emulation.host_engine(reverse=True)
    eng.step_gemm = _cublas.StepGemm(ColumnMajorBlas(), lambda: 0, lambda a: a.ctypes.data)
    rng = np.random.default_rng(14)
    p, dy, dfinal, grads0 = random_problem(rng, cell, 5, 3, 4, 6, np.float64)
    want = run_reference(cell, p, dy, dfinal, 1, grads0)
    got = run_engine(eng, cell, p, dy, dfinal, 1, grads0, "general", "general")
    compare(got, want, TOL[np.float64], f"{cell} general through StepGemm")


@needs_cxx
def test_random_configurations(engines):
    """Random cell, shape, t_start, path, item order and device size (so rows or units per
    block and splits per dot vary), float64 against the reference."""
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.settings(max_examples=40, deadline=None, derandomize=True)
    @hyp.given(cell=st.sampled_from(CELLS), T=st.integers(1, 5), B=st.integers(1, 7),
               I=st.integers(1, 6), H=st.integers(1, 12), n_sm=st.integers(1, 4),
               path=st.sampled_from(PATHS), reverse=st.booleans(), data=st.data())
    def check(cell, T, B, I, H, n_sm, path, reverse, data):
        t_start = data.draw(st.integers(0, T - 1))
        rows = -(-B // n_sm)
        splits = data.draw(st.sampled_from([1, 2, 4, 8]))
        eng = engines[reverse]
        if path == "cooperative":  # units per block (>= H / n_sm); shared memory for `splits`
            config.COOPERATIVE_UNITS = data.draw(st.sampled_from([None, 1, 2, 5, 12]))
            units = _plan.cooperative_units(H, n_sm, config.COOPERATIVE_UNITS)
            smem = max(_plan.cooperative_smem_layout(cell, H, B, units, np.float64, splits))
        else:
            smem = _plan.persistent_smem_bytes(cell, H, rows, np.float64, splits)
        eng._limits = (smem, n_sm)
        rng = np.random.default_rng(T * 1000 + B * 100 + H)
        p, dy, dfinal, grads0 = random_problem(rng, cell, T, B, I, H, np.float64)
        want = run_reference(cell, p, dy, dfinal, t_start, grads0)
        got = run_engine(eng, cell, p, dy, dfinal, t_start, grads0, path, path)
        compare(got, want, TOL[np.float64], f"{cell} T{T} B{B} I{I} H{H} {path} rows{rows}")

    try:
        check()
    finally:
        for eng in engines.values():
            eng._limits = host_emulation.H100_LIMITS


@needs_cxx
@pytest.mark.parametrize("cell", CELLS)
def test_paths_share_the_cache(engines, cell):
    """Forward on one path, backward on another: same results as the reference."""
    rng = np.random.default_rng(5)
    p, dy, dfinal, grads0 = random_problem(rng, cell, 5, 2, 4, 5, np.float64)
    want = run_reference(cell, p, dy, dfinal, 0, grads0)
    for fwd, bwd in itertools.permutations(PATHS, 2):
        got = run_engine(engines[False], cell, p, dy, dfinal, 0, grads0, fwd, bwd)
        compare(got, want, TOL[np.float64], f"{cell} {fwd}->{bwd}")




@needs_cxx
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", CELLS)
def test_caches_cross_backends(engines, cell, path):
    """The one cache layout: a cache made by the reference backend (its host arrays moved by
    this backend's asarray, field by field as a checkpoint stores them; the LSTM's tanh_c
    included, which this backend does not read) drives this backend's backward, and this
    backend's cache drives the reference's; both end to end as the reference alone."""
    rng = np.random.default_rng(zlib.crc32(f"cross {cell} {path}".encode()))
    eng = engines[True]
    config.PATH = path
    p, dy, dfinal, grads0 = random_problem(rng, cell, 5, 3, 4, 6, np.float64)
    want = run_reference(cell, p, dy, dfinal, 1, grads0)
    weights = (p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])

    _, _, ref_cache = getattr(ref, f"{cell}_forward")(p["x"], p["state"], *weights)
    cache = cache_from_arrays(*cache_to_arrays(ref_cache, np.array),
                              lambda a: eng.asarray(a, a.dtype))
    grads = [g.copy() for g in grads0]
    dx, dstate, dh = eng.recurrent_backward(cell, dy, dfinal, cache, p["w_ih"], p["w_hh"],
                                            *grads, t_start=1)
    compare(dict(want, dx=dx, dstate=dstate, dh=dh, grads=grads), want, TOL[np.float64],
            f"{cell} {path}: reference cache")

    y, final, cache = eng.recurrent_forward(cell, p["x"], p["state"], *weights)
    assert isinstance(cache, RecurrentCache) and cache.cell == cell and cache.extra is None
    assert {f for f in cache._fields[1:] if getattr(cache, f) is not None} == set(CELL_FIELDS[cell])
    assert cache.y is y and len(STATE_PARTS[cell]) == len(final)
    cache = cache_from_arrays(*cache_to_arrays(cache, eng.to_host), np.asarray)
    grads = [g.copy() for g in grads0]
    dx, dstate, dh = getattr(ref, f"{cell}_backward")(dy, dfinal, cache, p["w_ih"], p["w_hh"],
                                                      *grads, t_start=1)
    compare(dict(y=y, final=final, dx=dx, dstate=dstate, dh=dh, grads=grads), want,
            TOL[np.float64], f"{cell} {path}: this backend's cache, reference backward")


def check_graph_replays(eng, cell, dtype, dev=np.asarray, host=np.asarray):
    """The general path recorded once per key (the second time it comes) and replayed: fresh
    problems of one shape in a row, two layers' calls interleaved (forward A, forward B,
    backward B, backward A), a new t_start and a new T, each against the float64 reference;
    returns the count of replays."""
    rng = np.random.default_rng(zlib.crc32(f"graphs {cell} {DTYPE_IDS[dtype]}".encode()))
    T, B, I, H = 6, 3, 4, 5
    config.PATH = "general"
    replays = eng.graphs.replays

    def to_dev(p, dy, dfinal, grads0):
        p = {k: (tuple(map(dev, v)) if k == "state" else dev(v)) for k, v in p.items()}
        return p, dev(dy), tuple(map(dev, dfinal)), [dev(g.copy()) for g in grads0]

    def check(got, problem, t_start, what):
        p, dy, dfinal, grads0 = problem
        want = run_reference(cell, p, dy, dfinal, t_start, grads0)
        got = {k: (tuple(map(host, v)) if isinstance(v, (tuple, list)) else host(v))
               for k, v in got.items()}
        compare(got, want, TOL[dtype], f"{cell} {what}")

    for t_start, T_run in ((0, T), (0, T), (2, T), (2, T), (0, T + 1)):
        problem = random_problem(rng, cell, T_run, B, I, H, dtype)
        p, dy, dfinal, grads0 = to_dev(*problem)
        got = run_engine(eng, cell, p, dy, dfinal, t_start, grads0)
        check(got, problem, t_start, f"T={T_run} t_start={t_start}")
    pa, pb = (random_problem(rng, cell, T, B, I, H, dtype) for _ in range(2))
    (a, dya, dfa, ga), (b, dyb, dfb, gb) = to_dev(*pa), to_dev(*pb)
    ya, fa, ca = eng.recurrent_forward(cell, a["x"], a["state"], a["w_ih"], a["w_hh"],
                                       a["b_ih"], a["b_hh"])
    yb, fb, cb_ = eng.recurrent_forward(cell, b["x"], b["state"], b["w_ih"], b["w_hh"],
                                        b["b_ih"], b["b_hh"])
    for name, (y, final, cache, d, dy, dfinal, grads, problem) in (
            ("B", (yb, fb, cb_, b, dyb, dfb, gb, pb)), ("A", (ya, fa, ca, a, dya, dfa, ga, pa))):
        dx, dstate, dh = eng.recurrent_backward(cell, dy, dfinal, cache, d["w_ih"], d["w_hh"],
                                                *grads, t_start=1)
        check(dict(y=y, final=final, dx=dx, dstate=dstate, dh=dh, grads=grads), problem, 1,
              f"interleaved layer {name}")
    return eng.graphs.replays - replays


@needs_cxx
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("cell", CELLS)
def test_general_path_graphs_replay(cell, dtype):
    """Every general-path call replayed from a graph (HostReplay re-runs the recorded loop on
    the graph's own arrays, as a CUDA graph replays its baked-in addresses); with graphs off
    the same calls launch step by step."""
    eng = host_emulation.host_engine()
    # forward T = 6: 6 calls, 5 replayed; T = 7 once; backward (T, t_start) = (6, 0), (6, 2),
    # (6, 1): 2 calls each, 1 replayed; (7, 0) once
    assert check_graph_replays(eng, cell, dtype) == 8
    assert len(eng.graphs._entries) == 4
    config.GRAPHS = False
    assert check_graph_replays(eng, cell, dtype) == 0


@needs_cxx
def test_graph_limits_memory_and_capture_failure():
    """GRAPH_MAX_STATE and GRAPH_MEMORY keep big loops off graphs (a loop over a quarter of
    GRAPH_MEMORY is never recorded), the least recently used graph goes first, and a capture
    that fails turns graphs off with a warning, the call still right."""
    eng = host_emulation.host_engine()
    rng = np.random.default_rng(21)
    config.PATH = "general"

    def run(T, B, H, t_start=0):
        p, dy, dfinal, grads0 = random_problem(rng, "lstm", T, B, 3, H, np.float64)
        want = run_reference("lstm", p, dy, dfinal, t_start, grads0)
        compare(run_engine(eng, "lstm", p, dy, dfinal, t_start, grads0), want, 1e-12)

    config.GRAPH_MAX_STATE = 2 * 4 - 1
    run(5, 2, 4)
    run(5, 2, 4)
    assert eng.graphs.replays == 0 and not eng.graphs._entries
    config.reset()
    config.PATH = "general"
    run(5, 2, 4)                               # first sight: step by step
    assert eng.graphs.replays == 0 and not eng.graphs._entries
    run(5, 2, 4)                               # second: recorded and replayed
    sizes = {k[0]: size for k, (_, _, size) in eng.graphs._entries.items()}
    assert eng.graphs.replays == 2 and sizes["backward"] >= sizes["forward"] > 0
    config.GRAPH_MEMORY = 4 * sizes["backward"]      # room for 4 such loops: a 5th evicts
    for t_start in (1, 2, 3):
        run(5, 2, 4, t_start=t_start)
        run(5, 2, 4, t_start=t_start)
    # the forward is used at every call: the backward of t_start 0 went, least recently used
    assert {(k[0], k[5]) for k in eng.graphs._entries} == {
        ("forward", 0), ("backward", 1), ("backward", 2), ("backward", 3)}
    assert eng.graphs._held() <= config.GRAPH_MEMORY and eng.graphs.replays == 11
    config.GRAPH_MEMORY = 4 * sizes["backward"] - 1  # a backward loop over a quarter: not recorded
    eng.graphs.clear()
    run(5, 2, 4)
    run(5, 2, 4)
    assert [k[0] for k in eng.graphs._entries] == ["forward"] and eng.graphs.replays == 12
    config.GRAPH_MEMORY = 1 << 30

    def broken(record):
        raise RuntimeError("operation not permitted when stream is capturing")

    eng.graphs._capture = broken
    run(4, 3, 2)
    with pytest.warns(RuntimeWarning, match="graph capture failed.*not permitted"):
        run(4, 3, 2)
    assert eng.graphs.failed and eng.graphs.replays == 12
    run(4, 3, 2)                               # off from now on
    assert eng.graphs.replays == 12


@needs_cxx
@pytest.mark.parametrize("cell", CELLS)
def test_relu_and_saturation_edges(engines, cell):
    """Large pre-activations (saturated gates, relu on both sides of 0) still match."""
    rng = np.random.default_rng(9)
    p, dy, dfinal, grads0 = random_problem(rng, cell, 4, 3, 4, 5, np.float64)
    p["x"] *= 30
    want = run_reference(cell, p, dy, dfinal, 0, grads0)
    for path in PATHS:
        got = run_engine(engines[True], cell, p, dy, dfinal, 0, grads0, path, path)
        compare(got, want, TOL[np.float64], f"{cell} {path}")


@needs_cxx
@pytest.mark.parametrize("cell", CELLS)
def test_finite_differences(engines, cell):
    """Central differences in float64 on L = <y, R> + <final state, S>: every parameter, x,
    and the initial state, independently of the reference."""
    rng = np.random.default_rng(21)
    eng = engines[False]
    T, B, I, H = 3, 2, 3, 4
    p, R, S, _ = random_problem(rng, cell, T, B, I, H, np.float64)   # dy, dfinal: R, S
    for path in PATHS:
        config.PATH = path

        def loss():
            y, final, _ = eng.recurrent_forward(cell, p["x"], p["state"], p["w_ih"], p["w_hh"],
                                                p["b_ih"], p["b_hh"])
            return float(np.sum(y * R) + sum(np.sum(f * s) for f, s in zip(final, S)))

        y, final, cache = eng.recurrent_forward(cell, p["x"], p["state"], p["w_ih"], p["w_hh"],
                                                p["b_ih"], p["b_hh"])
        grads = [np.zeros_like(p[n]) for n in ("w_ih", "w_hh", "b_ih", "b_hh")]
        dx, dstate, _ = eng.recurrent_backward(cell, R, tuple(S), cache, p["w_ih"], p["w_hh"],
                                               *grads, t_start=0)
        analytic = dict(zip(("w_ih", "w_hh", "b_ih", "b_hh"), grads), x=dx)
        targets = [(n, p[n]) for n in ("x", "w_ih", "w_hh", "b_ih", "b_hh")]
        targets += [(f"state{k}", s) for k, s in enumerate(p["state"])]
        analytic.update({f"state{k}": d for k, d in enumerate(dstate)})
        eps = 1e-6
        for name, arr in targets:
            for idx in rng.choice(arr.size, size=min(arr.size, 6), replace=False):
                flat = arr.reshape(-1)
                old = flat[idx]
                flat[idx] = old + eps
                lp = loss()
                flat[idx] = old - eps
                lm = loss()
                flat[idx] = old
                num = (lp - lm) / (2 * eps)
                ana = analytic[name].reshape(-1)[idx]
                err = abs(num - ana) / max(abs(num), abs(ana), 1e-3)
                assert err <= 1e-6, f"{cell} {path} d{name}[{idx}]: fd {num} vs {ana} ({err:.1e})"


# ------------------------------------------------------------------------------------------
# path selection, validation, plumbing


def test_path_choice_follows_size_and_config():
    eng = _engine.Engine(np, None, lambda: host_emulation.H100_LIMITS, np.array)
    # the cooperative plan's arithmetic, under wider size rules than the defaults
    config.COOPERATIVE_MAX_STATE, config.COOPERATIVE_MIN_BATCH = 8192, 1
    assert eng.plan("lstm", 32, 64, np.float32) == ("persistent", 1, 8)
    assert eng.plan("lstm", 32, 119, np.float32) == ("persistent", 1, 2)   # smem-bound
    # W_hh too big for one block: the cooperative kernel spreads it over the SMs
    assert eng.plan("lstm", 32, 120, np.float32) == ("cooperative", 1, 32)
    assert eng.plan("lstm", 32, 100, np.float64) == ("cooperative", 1, 32)   # 8-byte words
    assert eng.plan("lstm", 1, 1024, np.float32) == ("cooperative", 8, 32)
    assert eng.plan("lstm", 8, 1024, np.float32) == ("cooperative", 8, 16)
    assert eng.plan("lstm", 64, 128, np.float32) == ("cooperative", 1, 16)   # threads
    assert eng.plan("lstm", 16, 1024, np.float32) == ("general", 0, 0)       # B*H over 8192
    assert eng.plan("lstm", 33, 512, np.float32) == ("general", 0, 0)
    assert eng.plan("lstm", 1, 4096, np.float32) == ("general", 0, 0)        # W_hh 256 MiB
    config.COOPERATIVE_MAX_STATE = 1 << 20
    assert eng.plan("lstm", 16, 1024, np.float32) == ("cooperative", 8, 8)   # smem-bound
    assert eng.plan("lstm", 32, 1024, np.float32) == ("general", 0, 0)       # does not fit
    config.COOPERATIVE_MAX_STATE = 8192
    assert eng.plan("rnn_tanh", 32, 200, np.float32) == ("persistent", 1, 4)  # threads
    assert eng.plan("rnn_tanh", 32, 239, np.float32) == ("persistent", 1, 1)  # smem
    assert eng.plan("gru", 65, 64, np.float32) == ("cooperative", 1, 8)    # batch over 64
    assert eng.plan("gru", 65, 128, np.float32) == ("general", 0, 0)       # and B*H over 8192
    config.PERSISTENT_MAX_BATCH = 1000
    assert eng.plan("gru", 300, 16, np.float32) == ("persistent", 3, 8)  # 300 rows / 132 SMs
    config.PATH = "general"
    assert eng.plan("lstm", 1, 8, np.float32) == ("general", 0, 0)
    config.PATH = "persistent"
    assert eng.plan("lstm", 200, 8, np.float32) == ("persistent", 2, 8)
    with pytest.raises(ValueError, match=r"persistent lstm kernel needs \d+ bytes.*largest H"):
        eng.plan("lstm", 4, 512, np.float32)
    config.PATH = "cooperative"
    assert eng.plan("gru", 100, 8, np.float32) == ("cooperative", 1, 8)      # forced: any B
    with pytest.raises(ValueError, match=r"cooperative lstm kernel needs 32 threads and \d+ bytes"
                                         r".*32 units in each of 128 blocks.*132 SMs"):
        eng.plan("lstm", 1, 4096, np.float32)
    config.PATH = "fastest"
    with pytest.raises(ValueError, match="config.PATH must be one of"):
        eng.plan("lstm", 4, 8, np.float32)
    config.reset()
    assert eng.choose_path("lstm", 4, 8, np.float32) == "persistent"
    assert eng.choose_path("lstm", 4, 512, np.float32) == "cooperative"   # B * H = 2048
    assert eng.choose_path("lstm", 16, 128, np.float32) == "cooperative"
    assert eng.choose_path("lstm", 8, 512, np.float32) == "general"       # B * H over 2048
    assert eng.choose_path("lstm", 1, 512, np.float32) == "general"       # B under 2
    assert eng.choose_path("gru", 65, 64, np.float32) == "general"
    assert eng.choose_path("lstm", 64, 512, np.float32) == "general"
    config.COOPERATIVE_MAX_STATE = 2047
    assert eng.choose_path("lstm", 4, 512, np.float32) == "general"
    config.COOPERATIVE_MIN_BATCH = 1
    config.COOPERATIVE_UNITS = 16                                         # fewer, bigger blocks
    assert eng.plan("lstm", 1, 512, np.float32) == ("cooperative", 16, 32)
    config.COOPERATIVE_UNITS = 2                                          # never over 1 per SM
    assert eng.plan("lstm", 1, 512, np.float32) == ("cooperative", 4, 32)
    config.reset()
    assert (config.PATH, config.PERSISTENT_MAX_BATCH, config.COOPERATIVE_MAX_STATE,
            config.COOPERATIVE_MIN_BATCH, config.COOPERATIVE_UNITS,
            config.POISON_OUTPUTS) == ("auto", 64, 2048, 2, None, False)
    assert (config.GRAPHS, config.GRAPH_MAX_STATE, config.GRAPH_MEMORY) == (True, 131072, 2 << 30)


def test_persistent_limits_table():
    """The documented H100 limits (one batch row per block, 227 KiB opt-in shared memory)."""
    smem = host_emulation.H100_LIMITS[0]
    got = {(c, np.dtype(d).name): _plan.persistent_max_hidden(c, d, smem)
           for c in ("lstm", "gru", "rnn_tanh") for d in (np.float32, np.float64)}
    assert got == {("lstm", "float32"): 119, ("gru", "float32"): 138, ("rnn_tanh", "float32"): 239,
                   ("lstm", "float64"): 84, ("gru", "float64"): 97, ("rnn_tanh", "float64"): 168}
    for (c, d), H in got.items():
        assert _plan.persistent_smem_bytes(c, H, 1, d) <= smem < \
            _plan.persistent_smem_bytes(c, H + 1, 1, d)


@needs_cxx
def test_auto_path_launches(engines):
    eng = engines[False]
    rng = np.random.default_rng(3)
    for H, B, expect in ((8, 2, "persistent"), (130, 64, "step")):
        p, dy, dfinal, grads0 = random_problem(rng, "lstm", 2, B, 3, H, np.float32)
        eng.launch.calls.clear()
        run_engine(eng, "lstm", p, dy, dfinal, 0, grads0)
        names = [c[0] for c in eng.launch.calls]
        assert names and all(expect in n for n in names), names
        if expect == "persistent":  # shared memory bytes, 8 splits
            assert [c[3] for c in eng.launch.calls] == [
                (4 * 8 * 8 + 8 + 8 * 4 * 8) * 4, (4 * 8 * 8 + 4 * 8 + 8 * 8 + 2 * 8) * 4]
        else:
            assert len(names) == 4  # one gate kernel per step, forward and backward
    # past the persistent kernel's batch limit on a 4-SM device: the cooperative kernel
    smem = max(_plan.cooperative_smem_layout("gru", 40, 2, 10, np.float32, 2))
    small = host_emulation.host_engine(limits=(smem, 4))
    config.PERSISTENT_MAX_BATCH = 1
    p, dy, dfinal, grads0 = random_problem(rng, "gru", 3, 2, 3, 40, np.float32)
    want = run_reference("gru", p, dy, dfinal, 0, grads0)
    got = run_engine(small, "gru", p, dy, dfinal, 0, grads0)
    compare(got, want, TOL[np.float32], "gru auto cooperative")
    assert [c[:3] for c in small.launch.calls if "cooperative" in c[0]] == [
        ("gru_forward_cooperative_f32", 4, 64), ("gru_backward_cooperative_f32", 4, 64)]


@needs_cxx
def test_bad_inputs_raise_clear_errors(engines):
    """Every bad argument of a recurrent call raises the shared checks' message
    (bptt_kernels.host.checks), naming the argument, the expected and the actual value."""
    eng = engines[False]
    rng = np.random.default_rng(4)
    p, dy, dfinal, grads0 = random_problem(rng, "lstm", 3, 2, 4, 5, np.float32)
    fwd = lambda **kw: eng.recurrent_forward("lstm", **{**p, **kw})  # noqa: E731

    def raises(exc, text):
        return pytest.raises(exc, match="^" + re.escape(text) + "$")

    with raises(ValueError, "w_hh must have shape [G*H, H] with G=4 for lstm, got [19, 5]"):
        fwd(w_hh=p["w_hh"][:-1])
    with raises(ValueError, "w_hh must have shape [G*H, H] with G=4 for lstm, got [0, 0]"):
        fwd(w_hh=np.zeros((0, 0), np.float32))
    with raises(ValueError, "w_ih must have shape [20, 4], got [20, 3]"):
        fwd(w_ih=p["w_ih"][:, :3])
    with raises(TypeError, "w_ih must have dtype float32, got float64"):
        fwd(w_ih=p["w_ih"].astype(np.float64))
    with raises(TypeError, "x must have dtype float32 or float64, got int64"):
        fwd(x=np.ones((3, 2, 4), dtype=np.int64))
    with raises(TypeError, "x must be a numpy.ndarray (use the backend's asarray), got list"):
        fwd(x=p["x"].tolist())
    with raises(ValueError, "state must be a tuple (h, c) of [B, H] arrays for lstm, got 1 arrays"):
        fwd(state=p["state"][:1])
    with raises(TypeError, "state must be a tuple (h, c) of [B, H] arrays for lstm, got ndarray"):
        fwd(state=p["state"][0])
    with raises(ValueError, "state[1] (c) must have shape [2, 5], got [1, 5]"):
        fwd(state=(p["state"][0], p["state"][1][:1]))
    with raises(ValueError, "x must have shape [*, *, *], got [2, 4]"):
        fwd(x=p["x"][0])
    with raises(ValueError, "cell must be one of ('lstm', 'gru', 'rnn_tanh', 'rnn_relu'), "
                            "got 'lstmx'"):
        eng.recurrent_forward("lstmx", **p)
    _, _, cache = fwd()
    bwd = lambda cell="lstm", **kw: eng.recurrent_backward(  # noqa: E731
        cell, **{**dict(dy=dy, dfinal_state=dfinal, cache=cache, w_ih=p["w_ih"], w_hh=p["w_hh"],
                        dw_ih=grads0[0], dw_hh=grads0[1], db_ih=grads0[2], db_hh=grads0[3]), **kw})
    with raises(ValueError, "t_start must be in [0, 2], got 3"):
        bwd(t_start=3)
    with raises(TypeError, "t_start must be an int, got float"):
        bwd(t_start=1.0)
    with raises(ValueError, "cache comes from lstm_forward, not gru_forward"):
        bwd(cell="gru")
    with raises(TypeError, "cache must be the RecurrentCache returned by lstm_forward, got tuple"):
        bwd(cache=tuple(cache))
    with raises(ValueError, "dy must have shape [3, 2, 5], got [2, 2, 5]"):
        bwd(dy=dy[:2])
    with raises(ValueError, "dw_hh must be a writable C-contiguous array (it is updated in place)"):
        bwd(dw_hh=np.asfortranarray(grads0[1]))
    with raises(TypeError, "dfinal_state must be a tuple (h, c) of [B, H] arrays for lstm, "
                           "got ndarray"):
        bwd(dfinal_state=dfinal[0])
    with raises(ValueError, "w_ih and dw_ih must both be None (input projected by the caller) "
                            "or both arrays"):
        bwd(dw_ih=None)


@needs_cxx
def test_host_launcher_checks_arguments(engines):
    launch = engines[False].launch
    a = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match=r"scale_f32 takes 3 arguments"):
        launch("scale_f32", 1, 32, (np.int64(4), a))
    with pytest.raises(TypeError, match=r"argument 0 \(long long\): expected int64, got int"):
        launch("scale_f32", 1, 32, (4, a, np.float32(2)))
    with pytest.raises(TypeError, match=r"argument 1 \(float\*\): expected an array of float32"):
        launch("scale_f32", 1, 32, (np.int64(4), a.astype(np.float64), np.float32(2)))
    with pytest.raises(KeyError, match="no kernel named"):
        launch("scale_f16", 1, 32, ())


def test_interface_matches_reference():
    """Same public names and signatures as the reference backend (the interface contract)."""
    names = ["asarray", "to_host", "zeros", "softmax_cross_entropy", "linear_forward",
             "linear_backward", "embedding_forward", "embedding_backward", "sgd_step",
             "adam_step", "sum_of_squares", "scale_"]
    names += [f"{c}_{d}" for c in CELLS for d in ("forward", "backward")]
    for n in names:
        assert callable(getattr(cb, n)), n
        assert inspect.signature(getattr(cb, n)) == inspect.signature(getattr(ref, n)), n
    assert cb.NAME == "cupy" and cb.xp.__name__ == "cupy"
    assert tuple(np.dtype(d) for d in cb.DTYPES) == (np.dtype(np.float32), np.dtype(np.float64))
    assert bptt_kernels.CELLS == CELLS


def test_import_compiles_and_allocates_nothing():
    """Importing the backend (and touching its plumbing tables) needs no GPU and no compiler."""
    code = (
        "import cupy\n"
        "def boom(*a, **k): raise AssertionError('GPU touched at import')\n"
        "cupy.RawModule = cupy.RawKernel = boom\n"
        "cupy.zeros = cupy.empty = cupy.asarray = boom\n"
        "import bptt_kernels.cupy as m\n"
        "from bptt_kernels.cupy import _compile\n"
        "assert m._gpu_engine is None\n"
        "assert len(_compile.KERNELS) == 62\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_load_source_inlines_the_header_once():
    text = _compile.load_source("ops.cu")
    assert not _compile._INCLUDE.search(text)  # no local #include line is left
    assert text.count("#define BPTT_COMMON_CU") == 1
    assert text.count("BPTT_OPS_KERNELS(f32, float)") == 1


@needs_cxx
@pytest.mark.parametrize("cell", CELLS)
def test_bptt_layers_run_on_the_emulated_backend(monkeypatch, cell):
    """bptt's own layer (2 layers, t_start > 0, return_dh) over the host-emulated CuPy backend
    matches the same layer over the reference backend, on both paths."""
    import bptt
    from bptt import backend as dispatch

    cls, kw = {"lstm": (bptt.LSTM, {}), "gru": (bptt.GRU, {}),
               "rnn_tanh": (bptt.RNN, {"nonlinearity": "tanh"}),
               "rnn_relu": (bptt.RNN, {"nonlinearity": "relu"})}[cell]
    make = lambda: cls(4, 6, num_layers=2, dtype=np.float64, seed=3, **kw)  # noqa: E731
    with bptt.use_backend("reference"):
        want_layer = make()
    host = host_emulation.host_backend(reverse=True)
    monkeypatch.setattr(dispatch, "_current", host)
    layer = make()
    assert layer.backend is host
    layer.load_state_dict(want_layer.state_dict())
    rng = np.random.default_rng(2)
    x, dy = rng.standard_normal((5, 3, 4)), rng.standard_normal((5, 3, 6))
    y_ref, s_ref, c_ref = want_layer.forward(x)
    dx_ref, ds_ref, dh_ref = want_layer.backward(dy, c_ref, t_start=2, return_dh=True)
    for path in PATHS:
        config.PATH = path
        layer.zero_grad()
        y, s, c = layer.forward(x)
        dx, ds, dh = layer.backward(dy, c, t_start=2, return_dh=True)
        assert rel_err(y, y_ref) <= 1e-12 and rel_err(dx, dx_ref) <= 1e-12
        for a, b in zip(s if cell == "lstm" else (s,), s_ref if cell == "lstm" else (s_ref,)):
            assert rel_err(a, b) <= 1e-12
        for a, b in zip(ds if cell == "lstm" else (ds,), ds_ref if cell == "lstm" else (ds_ref,)):
            assert rel_err(a, b) <= 1e-12
        for a, b in zip(dh, dh_ref):
            assert rel_err(a, b) <= 1e-12
        for name, g in layer.grads.items():
            assert rel_err(g, want_layer.grads[name]) <= 1e-12, (path, name)


@needs_cxx
@pytest.mark.parametrize("fold", [False, True], ids=["plain", "folded_embedding"])
@pytest.mark.parametrize("cell, optimizer, k1, k2", [
    ("lstm", "adam", 5, 7), ("gru", "sgd", 4, 4), ("rnn_tanh", "sgd", 3, 6)])
def test_trainer_runs_on_the_emulated_backend(monkeypatch, cell, optimizer, k1, k2, fold):
    """A language model trained with TBPTT(k1, k2), clipping and an optimizer over the
    host-emulated CuPy backend (embedding, softmax cross-entropy, norms, optimizer kernels and
    the recurrent paths together) follows the reference backend's loss and gradient norms;
    also with the embedding folded into layer 0's input projection (projected input)."""
    import bptt
    import bptt.models
    from bptt import backend as dispatch
    # chunks of T*B = 12-28 rows against V = 20: the model folds only when told to
    monkeypatch.setattr(bptt.models, "EMBEDDING_FOLD_ROWS_PER_WORD", 0.5 if fold else 4)
    folds, decide = [], bptt.models.LanguageModel._folds_embedding
    monkeypatch.setattr(bptt.models.LanguageModel, "_folds_embedding",
                        lambda self, *a: folds.append(decide(self, *a)) or folds[-1])

    def history(backend):
        monkeypatch.setattr(dispatch, "_current", backend)
        model = bptt.LanguageModel(20, 8, 12, num_layers=2, cell=cell, dtype=np.float64, seed=1)
        opt = (bptt.Adam(lr=1e-2, weight_decay=1e-3) if optimizer == "adam"
               else bptt.SGD(0.5, momentum=0.9, nesterov=True))
        trainer = bptt.Trainer(model, opt, k1=k1, k2=k2, clip_norm=1.0)
        data = np.random.default_rng(0).integers(0, 20, 400)
        return trainer.fit(data, batch_size=4, epochs=1, max_steps=6)

    want = history(ref)
    got = history(host_emulation.host_backend(reverse=True))
    for key in ("loss", "grad_norm"):
        assert len(got[key]) == len(want[key]) == 6
        assert rel_err(got[key], want[key]) <= 1e-12, key
    assert folds and all(f == fold for f in folds)


# ------------------------------------------------------------------------------------------
# non-recurrent kernels


@needs_cxx
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS.get)
def test_softmax_cross_entropy(engines, dtype):
    rng = np.random.default_rng(7)
    for N, V in ((5, 11), (3, 300)):
        logits = (rng.standard_normal((N, V)) * 5).astype(dtype)
        logits[0, 3] = 80  # large logit: needs the max subtracted
        targets = rng.integers(0, V, N)
        targets[1] = -1    # ignored row
        want_d = np.empty((N, V))
        want = ref.softmax_cross_entropy(logits.astype(np.float64), targets, want_d, 0.25)
        for eng in engines.values():
            d = np.full((N, V), np.nan, dtype=dtype)
            got = eng.softmax_cross_entropy(logits, targets, d, 0.25)
            assert abs(got - want) <= TOL[dtype] * abs(want)
            assert rel_err(d, want_d) <= TOL[dtype]
            assert np.all(d[1] == 0)
            aliased = logits.copy()  # dlogits written over logits
            got2 = eng.softmax_cross_entropy(aliased, targets, aliased, 0.25)
            assert got2 == got and np.array_equal(aliased, d)
    with pytest.raises(ValueError, match="targets must be < V=11"):
        engines[False].softmax_cross_entropy(np.zeros((2, 11), dtype), np.array([0, 11]),
                                             np.zeros((2, 11), dtype), 1.0)


@needs_cxx
def test_embedding(engines):
    rng = np.random.default_rng(8)
    for eng in engines.values():
        w = rng.standard_normal((10, 6))
        ids = rng.integers(0, 10, (4, 5))
        ids[0, :3] = 2     # repeated ids accumulate
        out = eng.embedding_forward(w, ids)
        assert np.array_equal(out, ref.embedding_forward(w, ids))
        dout = rng.standard_normal((4, 5, 6))
        dw, dw_ref = rng.standard_normal((10, 6)), None
        dw_ref = dw.copy()
        eng.embedding_backward(dw, ids, dout)
        ref.embedding_backward(dw_ref, ids, dout)
        assert rel_err(dw, dw_ref) <= 1e-12
    with pytest.raises(ValueError, match=r"ids must be in \[0, 9\]"):
        eng.embedding_forward(w, np.array([1, 10]))


@needs_cxx
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS.get)
def test_optimizer_steps_match_reference(engines, dtype):
    rng = np.random.default_rng(12)
    eng = engines[False]
    for momentum, wd, nesterov in ((0.0, 0.0, False), (0.9, 1e-2, False), (0.9, 0.0, True)):
        p, buf = rng.standard_normal(50).astype(dtype), np.zeros(50, dtype)
        p_ref, buf_ref = p.astype(np.float64), buf.astype(np.float64)
        for step in range(3):
            g = rng.standard_normal(50).astype(dtype)
            eng.sgd_step(p, g, buf, 0.1, momentum, wd, nesterov, step == 0)
            ref.sgd_step(p_ref, g.astype(np.float64), buf_ref, 0.1, momentum, wd, nesterov, step == 0)
        assert rel_err(p, p_ref) <= TOL[dtype]
        if momentum:
            assert rel_err(buf, buf_ref) <= TOL[dtype]
    for wd in (0.0, 1e-2):
        p, m, v = rng.standard_normal(50).astype(dtype), np.zeros(50, dtype), np.zeros(50, dtype)
        p_ref, m_ref, v_ref = p.astype(np.float64), m.astype(np.float64), v.astype(np.float64)
        for step in range(1, 4):
            g = rng.standard_normal(50).astype(dtype)
            eng.adam_step(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, wd, step)
            ref.adam_step(p_ref, g.astype(np.float64), m_ref, v_ref, 1e-2, 0.9, 0.999, 1e-8, wd, step)
        for a, b in ((p, p_ref), (m, m_ref), (v, v_ref)):
            assert rel_err(a, b) <= TOL[dtype]


@needs_cxx
def test_optimizer_steps_match_torch(engines):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    eng = engines[False]
    p0 = rng.standard_normal(40)
    grads = [rng.standard_normal(40) for _ in range(4)]
    cases = [("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)),
             ("adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=1e-2))]
    for kind, kw in cases:
        tp = torch.tensor(p0.copy(), requires_grad=True)
        opt = (torch.optim.SGD if kind == "sgd" else torch.optim.Adam)([tp], **kw)
        p, s1, s2 = p0.copy(), np.zeros(40), np.zeros(40)
        for step, g in enumerate(grads, start=1):
            tp.grad = torch.tensor(g)
            opt.step()
            if kind == "sgd":
                eng.sgd_step(p, g, s1, kw["lr"], kw["momentum"], kw["weight_decay"],
                             kw["nesterov"], step == 1)
            else:
                eng.adam_step(p, g, s1, s2, kw["lr"], *kw["betas"], kw["eps"],
                              kw["weight_decay"], step)
        assert rel_err(p, tp.detach().numpy()) <= 1e-12, kind


@needs_cxx
def test_sum_of_squares_and_scale(engines):
    rng = np.random.default_rng(14)
    for eng in engines.values():
        arrays = [rng.standard_normal(s).astype(d)
                  for s, d in (((3, 700), np.float32), ((5,), np.float64), ((0,), np.float32))]
        want = ref.sum_of_squares(arrays)
        assert abs(eng.sum_of_squares(arrays) - want) <= 1e-12 * want
        before = [a.copy() for a in arrays]
        eng.scale_(arrays, 0.5)
        for a, b in zip(arrays, before):
            assert np.array_equal(a, (b * b.dtype.type(0.5)))


# ------------------------------------------------------------------------------------------
# on a GPU: the real backend against the reference (skipped where no GPU is usable)


def _gpu_reason():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "the CUDA simulator is on in this process"
    from bptt.backend import _probe_cupy
    return _probe_cupy()


_GPU_REASON = _gpu_reason()
needs_gpu = pytest.mark.skipif(_GPU_REASON is not None,
                               reason=f"no usable GPU for CuPy ({_GPU_REASON}); perf/gpu_check.py "
                                      "runs these checks on a GPU machine")


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_general_path_graphs_replay(cell, dtype):
    """The same replays on the GPU: CUDA graphs recorded by stream capture."""
    import cupy

    eng = cb._get()
    eng.graphs.clear()
    assert check_graph_replays(eng, cell, dtype, cupy.asarray, cupy.asnumpy) == 8
    assert eng.graphs.failed is None


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_recurrent_matches_reference(cell, path, dtype):
    import cupy

    rng = np.random.default_rng(1)
    p, dy, dfinal, grads0 = random_problem(rng, cell, 7, 4, 6, 33, dtype)
    want = run_reference(cell, p, dy, dfinal, 2, grads0)
    dev = {k: (tuple(map(cupy.asarray, v)) if k == "state" else cupy.asarray(v)) for k, v in p.items()}
    got = run_engine(cb._get(), cell, dev, cupy.asarray(dy), tuple(map(cupy.asarray, dfinal)), 2,
                     [cupy.asarray(g) for g in grads0], path, path)
    got = {k: (tuple(map(cupy.asnumpy, v)) if isinstance(v, (tuple, list)) else cupy.asnumpy(v))
           for k, v in got.items()}
    compare(got, want, TOL[dtype], f"GPU {cell} {path}")
