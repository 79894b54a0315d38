"""Gradients against central finite differences in float64, for every cell, 1 and 2 layers,
bias on and off, on every backend: each parameter, the input x and the initial state.

Loss L = sum(y * R1) + sum(final_state * R2) with random R1, R2, so that dy and d(final state)
are random (a loss of sum(y) alone would leave the final-state path untested).
Tolerance (docs/design.md, section 5): max|analytic - numeric| / max|numeric| <= 1e-6 per array, eps 1e-6.
"""

import numpy as np
import pytest

FD_EPS = 1e-6       # central-difference step
FD_RTOL = 1e-6      # max relative error per array
CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
T, B, I, H = 4, 2, 3, 4


def numeric_grad(f, a, eps=FD_EPS):
    """Central differences of the scalar f() with respect to every element of ``a`` (in place)."""
    g = np.zeros_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return g


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_gradients_match_finite_differences(backend, cell, num_layers, bias, rng, make_layer,
                                            random_state, state_parts, assert_close):
    layer = make_layer(cell, I, H, num_layers, bias, np.float64, seed=int(rng.integers(2**31)))
    x = rng.standard_normal((T, B, I))
    state = random_state(layer, B, rng)
    parts = state_parts(state)                      # host arrays, perturbed in place below
    R1 = rng.standard_normal((T, B, H))
    R2 = tuple(rng.standard_normal(p.shape) for p in parts)

    def loss():
        y, final, _ = layer.forward(x, state)
        return float(np.sum(np.asarray(y) * R1)
                     + sum(np.sum(f * r) for f, r in zip(state_parts(final), R2)))

    # analytic: dL/dy = R1, dL/d(final state) = R2
    y, final, cache = layer.forward(x, state)
    dstate_in = R2 if cell == "lstm" else R2[0]
    layer.zero_grad()
    dx, dstate = layer.backward(R1, cache, dstate_in)
    grads = {name: np.array(layer.backend.to_host(g)) for name, g in layer.grads.items()}

    expected_names = {f"weight_{k}_l{l}" for k in ("ih", "hh") for l in range(num_layers)}
    if bias:
        expected_names |= {f"bias_{k}_l{l}" for k in ("ih", "hh") for l in range(num_layers)}
    assert set(grads) == expected_names

    for name, p in layer.params.items():
        assert_close(grads[name], numeric_grad(loss, p), FD_RTOL, f"d{name}")
    assert_close(dx, numeric_grad(loss, x), FD_RTOL, "dx")
    for k, (d, p) in enumerate(zip(state_parts(dstate), parts)):
        assert_close(d, numeric_grad(loss, p), FD_RTOL, f"d(initial state)[{k}]")
