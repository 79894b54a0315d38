"""The GPU correctness checks of tests/gpu/ (gpu_checks.py) with the cuda backend on the CUDA
simulator and tiny sizes, so the checks are known to work before a GPU is lent: parity against
the reference and against torch.nn (on the CPU here), a wrong kernel caught, the op checks."""

import numpy as np
import pytest

from gpu.gpu_checks import OPS, check_op, check_recurrent


@pytest.mark.parametrize("cell,path", [("lstm", "persistent"), ("gru", "general")])
def test_check_recurrent_against_reference_and_torch(cuda, ref, rng, cell, path):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    check_recurrent(cuda, ref, cell, (3, 2, 3, 4), np.float64, 0, rng, path=path, torch_device="cpu")
    check_recurrent(cuda, ref, cell, (3, 2, 3, 4), np.float32, 1, rng, path=path)


def test_check_recurrent_reports_a_wrong_kernel(cuda, ref, rng, monkeypatch):
    """The check can fail: a backend whose forward output is off is caught."""
    real = cuda.rnn_tanh_forward

    def off_by_a_bit(*args):
        y, final, cache = real(*args)
        y[0, 0, 0] += 1e-6
        return y, final, cache

    monkeypatch.setattr(cuda, "rnn_tanh_forward", off_by_a_bit)
    with pytest.raises(AssertionError, match="vs reference: y"):
        check_recurrent(cuda, ref, "rnn_tanh", (2, 2, 3, 4), np.float64, 0, rng)


@pytest.mark.parametrize("op", OPS)
def test_check_ops(cuda, ref, rng, op):
    check_op(cuda, ref, op, rng, np.float64, small=True)
