"""The user layer (bptt.LSTM/GRU/RNN) running on the cuda backend under the simulator gives
what it gives on the reference backend: two layers, t_start > 0, dh diagnostics, float64."""

import numpy as np
import pytest

import bptt
from helpers import assert_close


def _layer(cell, dtype):
    if cell == "lstm":
        return bptt.LSTM(3, 5, num_layers=2, dtype=dtype, seed=7)
    if cell == "gru":
        return bptt.GRU(3, 5, num_layers=2, dtype=dtype, seed=7)
    return bptt.RNN(3, 5, num_layers=2, nonlinearity=cell[4:], dtype=dtype, seed=7)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_layer_on_cuda_matches_reference(cuda, rng, cell):
    x = rng.standard_normal((4, 2, 3))
    dy = rng.standard_normal((4, 2, 5))
    results = {}
    for name in ("reference", "cuda"):
        with bptt.use_backend(name) as backend:
            layer = _layer(cell, np.float64)
            assert layer.backend is backend
            y, state, cache = layer.forward(x)
            dx, dstate, dh = layer.backward(dy, cache, t_start=1, return_dh=True)
            host = backend.to_host
            results[name] = {"y": host(y), "dx": host(dx),
                             **{f"dh{k}": host(d) for k, d in enumerate(dh)},
                             **{k: host(g) for k, g in layer.grads.items()}}
    want, got = results["reference"], results["cuda"]
    assert want.keys() == got.keys()
    for key in want:
        assert_close(got[key], want[key], np.float64, f"{cell} {key}")
