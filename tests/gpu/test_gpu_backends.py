"""The GPU backends (``cuda``: Numba-CUDA, ``cupy``) against the float64-exact NumPy reference
and torch.nn, on a real GPU: every cell, both dtypes, every recurrent path each backend can
force, t_start 0 and > 0, variable-length batches (lengths, against torch's packed sequences),
and every non-recurrent kernel (checks in gpu_checks.py).

On a machine with an NVIDIA GPU (torch with CUDA for the torch.nn comparisons), from the
repository root:

    python -m pytest -m gpu tests/gpu

Without a usable GPU every test here is skipped with the reason (a backend that cannot run,
or the CUDA simulator: tests/cudasim runs these checks there, at tiny sizes).
"""

import numpy as np
import pytest

from gpu_checks import (CELLS, OPS, backend_paths, check_caches_cross,
                        check_graph_replays_with_lengths, check_lengths_all_T, check_op,
                        check_recurrent)

pytestmark = pytest.mark.gpu

BACKENDS = ("cuda", "cupy")
PATHS = ("persistent", "cooperative", "general")
DTYPES = (np.float64, np.float32)
SMALL, LARGE, WIDE = (9, 3, 7, 33), (6, 5, 40, 160), (5, 4, 24, 600)


def _usable(name):
    """(backend module, None) or (None, why it cannot run these tests)."""
    import importlib
    import os
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return None, ("the CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1): tests/cudasim runs these "
                      "checks there")
    from bptt import backend as dispatcher
    try:
        reason = dispatcher._unavailable_reason(name)
        if reason is not None:
            return None, reason
        return importlib.import_module(f"bptt_kernels.{name}"), None
    except Exception as e:  # noqa: BLE001 -- the skip reason
        return None, f"{type(e).__name__}: {e}"


@pytest.fixture(scope="module", params=BACKENDS)
def gpu(request):
    """A GPU backend module that runs here, else the test is skipped with the reason."""
    module, why = _usable(request.param)
    if module is None:
        pytest.skip(f"no usable GPU for the {request.param} backend: {why}")
    return module


@pytest.fixture(scope="module")
def ref():
    import bptt_kernels.reference as reference
    return reference


@pytest.fixture(scope="module")
def torch_device():
    """"cuda" where torch can use the GPU, else None (the torch.nn comparisons are left out)."""
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else None
    except ImportError:
        return None


def _forceable(backend, path):
    if path not in backend_paths(backend):
        pytest.skip(f"the {backend.NAME} backend has no {path!r} path")


@pytest.mark.parametrize("t_start", [0, 3])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cell", CELLS)
def test_every_path(gpu, ref, torch_device, cell, dtype, path, t_start, rng):
    _forceable(gpu, path)
    check_recurrent(gpu, ref, cell, SMALL, dtype, t_start, rng, path=path,
                    torch_device=torch_device if t_start == 0 else None)


@pytest.mark.parametrize("t_start", [0, 3])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cell", CELLS)
def test_every_path_with_lengths(gpu, ref, torch_device, cell, dtype, path, t_start, rng):
    """Unsorted lengths with both ends (the row of length 1 wholly before t_start 3), all 1,
    all T and the projected input; caches with lengths across backends."""
    _forceable(gpu, path)
    T, B = SMALL[:2]
    lengths = np.array([4, T, 1])
    check_recurrent(gpu, ref, cell, SMALL, dtype, t_start, rng, path=path, lengths=lengths,
                    torch_device=torch_device if t_start == 0 else None)
    check_recurrent(gpu, ref, cell, SMALL, dtype, t_start, rng, path=path, lengths=np.ones(B, int))
    check_recurrent(gpu, ref, cell, SMALL, dtype, t_start, rng, path=path, lengths=lengths,
                    projected=True)
    if gpu.NAME == "cupy":      # the same kernels with steps = T: bit-identical to no lengths
        check_lengths_all_T(gpu, cell, SMALL, dtype, t_start, rng, path=path)
    else:                       # the cuda backend's masked kernels are compiled on their own
        check_recurrent(gpu, ref, cell, SMALL, dtype, t_start, rng, path=path,
                        lengths=np.full(B, T))
    if dtype == np.float64:
        check_caches_cross(gpu, ref, cell, SMALL, lengths, t_start, rng, path=path)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cell", CELLS)
def test_larger_layer_with_lengths(gpu, ref, torch_device, cell, dtype, rng):
    """LARGE on the path auto picks and on the cooperative path over several units per block."""
    T, B = LARGE[:2]
    lengths = np.array([3, 6, 1, 5, 2][:B])
    check_recurrent(gpu, ref, cell, LARGE, dtype, 0, rng, lengths=lengths,
                    torch_device=torch_device)
    if "cooperative" in backend_paths(gpu):
        check_recurrent(gpu, ref, cell, WIDE, dtype, 1, rng, path="cooperative",
                        lengths=np.array([5, 1, 3, 2]), COOPERATIVE_UNITS=8)


@pytest.mark.parametrize("cell", CELLS)
def test_cupy_graphs_replay_with_lengths(gpu, ref, cell, rng):
    """CUDA graphs (stream capture) of the general path, lengths changing between replays."""
    if gpu.NAME != "cupy":
        pytest.skip("the general path's CUDA graphs are the cupy backend's")
    engine = gpu._get()
    check_graph_replays_with_lengths(gpu, ref, engine.graphs, cell, rng)
    assert engine.graphs.failed is None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cell", CELLS)
def test_larger_layer_on_the_path_auto_picks(gpu, ref, torch_device, cell, dtype, rng):
    check_recurrent(gpu, ref, cell, LARGE, dtype, 2, rng, torch_device=torch_device)


@pytest.mark.parametrize("units", [None, 8], ids=["fewest-units", "8-units"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cell", CELLS)
def test_cooperative_path_with_several_units_per_block(gpu, ref, cell, dtype, units, rng):
    """H = 600: 120 blocks of the fewest units, then 75 blocks of 8 units."""
    _forceable(gpu, "cooperative")
    settings = {} if units is None else {"COOPERATIVE_UNITS": units}
    check_recurrent(gpu, ref, cell, WIDE, dtype, 1, rng, path="cooperative", **settings)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cell", CELLS)
def test_cuda_tiled_gemm(gpu, ref, cell, dtype, rng):
    """The cuda backend's own Numba GEMM (config.GEMM = "numba") as well as cuBLAS."""
    if gpu.NAME != "cuda":
        pytest.skip("config.GEMM is the cuda backend's")
    check_recurrent(gpu, ref, cell, LARGE, dtype, 1, rng, path="general", GEMM="numba")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", OPS)
def test_ops(gpu, ref, op, dtype, rng):
    check_op(gpu, ref, op, rng, dtype)


def test_a_wrong_kernel_is_caught(gpu, ref, rng, monkeypatch):
    """The checks can fail: a forward whose output is off by 1e-6 somewhere is reported."""
    real = gpu.rnn_tanh_forward

    def off_by_a_bit(*args):
        y, final, cache = real(*args)
        y[0, 0, 0] += 1e-6
        return y, final, cache

    monkeypatch.setattr(gpu, "rnn_tanh_forward", off_by_a_bit)
    with pytest.raises(AssertionError, match="vs reference: y"):
        check_recurrent(gpu, ref, "rnn_tanh", SMALL, np.float64, 0, rng)
