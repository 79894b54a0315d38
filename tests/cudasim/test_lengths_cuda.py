"""The Numba-CUDA backend with variable-length batches (``lengths``), under the CUDA simulator
(tiny sizes), through the checks the GPU runs too (tests/gpu/gpu_checks.py), outputs
NaN-poisoned: every cell on both paths against the float64 reference and torch.nn through
pack_padded_sequence (where torch is installed): lengths mixed and unsorted, all 1 and all T,
t_start 0 and inside (a row wholly before it gets dfinal_state back), float32 too, the
projected input; y, dx, dh and the cache exactly zero at padded steps; lengths all T bit-
identical to none; caches with lengths crossing backends; bptt's layers with the backend
current. The kernels' masked variants compile to PTX in tests/test_ptx_cuda.py."""

import numpy as np
import pytest

import bptt
from gpu.gpu_checks import (check_caches_cross, check_layers_with_lengths, check_lengths_all_T,
                            check_recurrent)

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
PATHS = ("general", "persistent")
SHAPE = (5, 4, 3, 4)                      # T, B, I, H


def _torch_device():
    """"cpu" where torch is installed (the torch.nn comparisons), else None."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    return "cpu"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", CELLS)
def test_matches_reference_and_torch(cuda, ref, rng, cell, path):
    """float64: lengths [3, 5, 1, 2] at t_start 0 (and torch) and 2, all 1 at t_start 1
    (all T: test_lengths_all_T_bit_identical); float32 once."""
    mixed = np.array([3, 5, 1, 2])
    for lengths, t_start in ((mixed, 0), (mixed, 2), (np.ones(4, int), 1)):
        check_recurrent(cuda, ref, cell, SHAPE, np.float64, t_start, rng, path=path,
                        lengths=lengths, torch_device=_torch_device() if t_start == 0 else None)
    check_recurrent(cuda, ref, cell, SHAPE, np.float32, 1, rng, path=path, lengths=mixed)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", CELLS)
def test_projected_input_with_lengths(cuda, ref, rng, cell, path):
    check_recurrent(cuda, ref, cell, SHAPE, np.float64, 1, rng, path=path,
                    lengths=np.array([2, 5, 1, 4]), projected=True)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", CELLS)
def test_lengths_all_T_bit_identical(cuda, rng, cell, path):
    check_lengths_all_T(cuda, cell, (4, 3, 3, 4), np.float32, 1, rng, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_caches_with_lengths_cross_backends(cuda, ref, rng, cell, path):
    check_caches_cross(cuda, ref, cell, (4, 3, 3, 4), np.array([4, 1, 2]), 1, rng, path)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_layer_with_lengths_matches_reference(cuda, rng, cell, make_layer):
    """bptt's layer (2 layers) with the cuda backend current: forward(x, lengths=...) and
    backward (t_start 1, return_dh) as on the reference backend."""
    with bptt.use_backend("reference"):
        want_layer = make_layer(cell, 3, 4, 2, True, np.float64, seed=7)
    with bptt.use_backend("cuda") as backend:
        layer = make_layer(cell, 3, 4, 2, True, np.float64, seed=7)
        assert layer.backend is backend
        layer.load_state_dict(want_layer.state_dict())
        x, dy = rng.standard_normal((5, 3, 3)), rng.standard_normal((5, 3, 4))
        check_layers_with_lengths(layer, want_layer, x, dy, np.array([2, 5, 1]), 1, cell)
