"""The user layer (bptt.RNN / LSTM / GRU): state carrying, gradient accumulation, t_start,
state_dict, initialisation, and a clear error for every kind of bad input."""

import math

import numpy as np
import pytest

import bptt
from bptt.layers import LayerCache

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")


def host(a):
    return np.asarray(bptt.get_backend().to_host(a))


# --------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("cell", CELLS)
def test_state_carries_across_calls(backend, cell, rng, make_layer, random_state, state_parts, tol):
    T, B, I, H, split = 7, 3, 4, 5, 3
    layer = make_layer(cell, I, H, num_layers=2, seed=1)
    x = rng.standard_normal((T, B, I))
    state = random_state(layer, B, rng)
    y_full, final_full, _ = layer.forward(x, state)
    y1, mid, _ = layer.forward(x[:split], state)
    y2, final_split, _ = layer.forward(x[split:], mid)
    np.testing.assert_allclose(np.concatenate([host(y1), host(y2)]), host(y_full), rtol=0, atol=1e-13)
    for a, b in zip(state_parts(final_split), state_parts(final_full)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("cell", CELLS)
def test_gradients_accumulate_and_zero_grad_resets(backend, cell, rng, make_layer):
    layer = make_layer(cell, 3, 4, num_layers=2, seed=2)
    x = rng.standard_normal((5, 2, 3))
    y, _, cache = layer.forward(x)
    dy = rng.standard_normal(y.shape)
    layer.backward(dy, cache)
    once = {n: host(g).copy() for n, g in layer.grads.items()}
    assert all(np.any(g != 0) for g in once.values())
    layer.backward(dy, cache)
    for n, g in layer.grads.items():
        np.testing.assert_allclose(host(g), 2 * once[n], rtol=1e-14, atol=0, err_msg=n)
    layer.zero_grad()
    assert all(np.all(host(g) == 0) for g in layer.grads.values())


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("t_start", [1, 4])
def test_t_start_equals_forward_from_detached_state(backend, cell, t_start, rng, make_layer,
                                                    random_state, state_parts, assert_close, tol):
    T, B, I, H = 6, 2, 3, 4
    layer = make_layer(cell, I, H, num_layers=2, seed=3)
    x = rng.standard_normal((T, B, I))
    state = random_state(layer, B, rng)
    dy = rng.standard_normal((T, B, H))
    dfinal = random_state(layer, B, rng)

    _, _, cache = layer.forward(x, state)
    dx, dstate, dh = layer.backward(dy, cache, dfinal, t_start=t_start, return_dh=True)
    grads = {n: host(g).copy() for n, g in layer.grads.items()}

    # the oracle: run to t_start, detach, then a fresh forward/backward over the rest
    layer.zero_grad()
    _, mid, _ = layer.forward(x[:t_start], state)
    _, _, cache2 = layer.forward(x[t_start:], mid)
    dx2, dstate2, dh2 = layer.backward(dy[t_start:], cache2, dfinal, return_dh=True)

    rtol = tol(np.float64)
    assert np.all(host(dx)[:t_start] == 0)
    assert_close(host(dx)[t_start:], host(dx2), rtol, "dx")
    for k, (a, b) in enumerate(zip(state_parts(dstate), state_parts(dstate2))):
        assert_close(a, b, rtol, f"dstate[{k}]")
    for k in range(layer.num_layers):
        assert np.all(host(dh[k])[:t_start] == 0)
        assert_close(host(dh[k])[t_start:], host(dh2[k]), rtol, f"dh[{k}]")
    for n, g in layer.grads.items():
        assert_close(grads[n], host(g), rtol, f"d{n}")


@pytest.mark.parametrize("cell", CELLS)
def test_projected_input_matches_plain_input(backend, cell, rng, make_layer, random_state,
                                             state_parts, assert_close, tol):
    """forward(x W_ih^T, projected=True) gives the plain forward's outputs; its backward returns
    g = dL/d(x W_ih^T) with g W_ih = dx, accumulates every gradient but weight_ih_l0's (whose
    increment is g^T x), and x of the wrong width names the expected one."""
    T, B, I, H, t_start = 5, 3, 4, 6, 2
    layer = make_layer(cell, I, H, num_layers=2, seed=4)
    x, dy = rng.standard_normal((T, B, I)), rng.standard_normal((T, B, H))
    state, dfinal = random_state(layer, B, rng), random_state(layer, B, rng)
    y, final, cache = layer.forward(x, state)
    dx, dstate = layer.backward(dy, cache, dfinal, t_start=t_start)
    plain = {n: host(g).copy() for n, g in layer.grads.items()}
    layer.zero_grad()
    w_ih = host(layer.params["weight_ih_l0"])
    y_p, final_p, cache_p = layer.forward(x @ w_ih.T, state, projected=True)
    g, dstate_p = layer.backward(dy, cache_p, dfinal, t_start=t_start)
    rtol = tol(np.float64)
    assert_close(host(y_p), host(y), rtol, "y")
    for k, (a, b) in enumerate(zip(state_parts(final_p) + state_parts(dstate_p),
                                   state_parts(final) + state_parts(dstate))):
        assert_close(a, b, rtol, f"state {k}")
    g = host(g)
    assert g.shape == (T, B, layer.params["weight_hh_l0"].shape[0]) and not g[:t_start].any()
    assert_close(g @ w_ih, host(dx), rtol, "g W_ih")
    assert not host(layer.grads["weight_ih_l0"]).any()
    assert_close(g.reshape(-1, g.shape[2]).T @ x.reshape(-1, I), plain["weight_ih_l0"], rtol, "g^T x")
    for n, grad in layer.grads.items():
        if n != "weight_ih_l0":
            assert_close(host(grad), plain[n], rtol, f"d{n}")
    with pytest.raises(ValueError, match=r"G\*H \(projected=True\)"):
        layer.forward(x, state, projected=True)


def test_dh_top_layer_is_dy_plus_recurrent_gradient(backend, rng, make_layer, state_parts):
    """dh[top][t] = dy[t] + dL/dh_t through step t+1; at the last step that is dy + dstate."""
    layer = make_layer("gru", 3, 4, num_layers=1, seed=4)
    x = rng.standard_normal((4, 2, 3))
    y, _, cache = layer.forward(x)
    dy = rng.standard_normal(y.shape)
    dfinal = rng.standard_normal((1, 2, 4))
    _, _, dh = layer.backward(dy, cache, dfinal, return_dh=True)
    np.testing.assert_allclose(host(dh[0])[-1], dy[-1] + dfinal[0], rtol=1e-15, atol=0)


def test_bias_false_equals_zero_biases(backend, rng, make_layer, assert_close):
    with_bias = make_layer("lstm", 3, 4, num_layers=2, bias=True, seed=5)
    without = make_layer("lstm", 3, 4, num_layers=2, bias=False, seed=6)
    assert not any(n.startswith("bias") for n in without.params)
    sd = {n: (v if n.startswith("weight") else np.zeros_like(v)) for n, v in with_bias.state_dict().items()}
    with_bias.load_state_dict(sd)
    without.load_state_dict({n: v for n, v in sd.items() if n.startswith("weight")})
    x = rng.standard_normal((5, 2, 3))
    y1, _, c1 = with_bias.forward(x)
    y2, _, c2 = without.forward(x)
    np.testing.assert_array_equal(host(y1), host(y2))
    dy = rng.standard_normal(y1.shape)
    for _ in range(2):                                  # twice: scratch bias grads must not leak
        dx1, _ = with_bias.backward(dy, c1)
        dx2, _ = without.backward(dy, c2)
    np.testing.assert_array_equal(host(dx1), host(dx2))
    for n, g in without.grads.items():
        assert_close(host(g), host(with_bias.grads[n]), 1e-14, n)


def test_float_inputs_are_converted_to_layer_dtype(backend, rng, make_layer):
    layer = make_layer("gru", 3, 4, dtype=np.float32)
    y, state, cache = layer.forward(rng.standard_normal((2, 2, 3)))          # float64 in
    assert host(y).dtype == np.float32 and host(state).dtype == np.float32
    dx, dstate = layer.backward(rng.standard_normal((2, 2, 4)).astype(np.float16), cache)
    assert host(dx).dtype == np.float32 and host(dstate).dtype == np.float32


def test_accepts_torch_tensors(backend, rng, make_layer):
    torch = pytest.importorskip("torch")
    layer = make_layer("lstm", 3, 4)
    x = rng.standard_normal((2, 2, 3))
    y_np, _, _ = layer.forward(x)
    tx = torch.tensor(x, requires_grad=True)
    y_t, _, _ = layer.forward(tx, (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))
    np.testing.assert_array_equal(host(y_t), host(y_np))


def test_output_is_read_only_on_numpy_backends(backend, rng, make_layer):
    layer = make_layer("rnn_tanh", 3, 4)
    y, _, _ = layer.forward(rng.standard_normal((2, 2, 3)))
    if backend.xp is np:
        with pytest.raises(ValueError, match="read-only"):
            y *= 2


def test_init_state_is_zero_of_right_shape(backend, make_layer, state_parts):
    for cell in CELLS:
        layer = make_layer(cell, 3, 4, num_layers=2)
        parts = state_parts(layer.init_state(5))
        assert len(parts) == (2 if cell == "lstm" else 1)
        for p in parts:
            assert p.shape == (2, 5, 4) and p.dtype == layer.dtype and np.all(p == 0)


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("cell", CELLS)
def test_parameter_names_and_shapes_are_torchs(backend, cell, make_layer):
    G = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}[cell]
    layer = make_layer(cell, 3, 5, num_layers=2)
    expected = {"weight_ih_l0": (G * 5, 3), "weight_hh_l0": (G * 5, 5), "bias_ih_l0": (G * 5,),
                "bias_hh_l0": (G * 5,), "weight_ih_l1": (G * 5, 5), "weight_hh_l1": (G * 5, 5),
                "bias_ih_l1": (G * 5,), "bias_hh_l1": (G * 5,)}
    assert {n: host(p).shape for n, p in layer.params.items()} == expected
    assert {n: host(g).shape for n, g in layer.grads.items()} == expected
    torch = pytest.importorskip("torch")
    ctor = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(cell)
    mod = ctor(3, 5, 2) if ctor else torch.nn.RNN(3, 5, 2, nonlinearity=cell[4:])
    assert {n: tuple(v.shape) for n, v in mod.state_dict().items()} == expected


def test_state_dict_round_trip(backend, rng, make_layer):
    a = make_layer("lstm", 3, 4, num_layers=2, seed=7)
    b = make_layer("lstm", 3, 4, num_layers=2, seed=8)
    sd = a.state_dict()
    assert all(type(v) is np.ndarray for v in sd.values())
    b.load_state_dict(sd)
    x = rng.standard_normal((3, 2, 3))
    np.testing.assert_array_equal(host(a.forward(x)[0]), host(b.forward(x)[0]))
    # the state_dict is a copy: changing it changes neither layer
    before = host(a.params["weight_hh_l0"]).copy()
    sd["weight_hh_l0"] += 1
    np.testing.assert_array_equal(host(a.params["weight_hh_l0"]), before)
    np.testing.assert_array_equal(host(b.params["weight_hh_l0"]), before)


def test_load_state_dict_errors_leave_the_layer_unchanged(backend, make_layer):
    layer = make_layer("gru", 3, 4, num_layers=2)
    good = layer.state_dict()
    cases = [
        ({k: v for k, v in good.items() if k != "bias_hh_l1"}, ValueError, r"missing \['bias_hh_l1'\]"),
        ({**good, "weight_ih_l2": good["weight_hh_l1"]}, ValueError, r"unexpected \['weight_ih_l2'\]"),
        ({**good, "weight_hh_l0": np.zeros((12, 3))}, ValueError, r"weight_hh_l0.*\(12, 4\).*\(12, 3\)"),
        ({**good, "bias_ih_l0": np.zeros((12, 1))}, ValueError, r"bias_ih_l0.*1-D"),
        ({**good, "weight_ih_l1": np.ones((12, 4), dtype=np.int64)}, TypeError, r"weight_ih_l1.*integer"),
        ({**good, "weight_ih_l1": np.full((12, 4), np.nan)}, ValueError, r"weight_ih_l1.*48 non-finite"),
        ([1, 2], TypeError, "mapping"),
    ]
    before = {n: host(p).copy() for n, p in layer.params.items()}
    for sd, err, pattern in cases:
        if isinstance(sd, dict):   # put a changed value first, so a non-atomic load would show
            sd = {"weight_ih_l0": good["weight_ih_l0"] + 1, **{k: v for k, v in sd.items() if k != "weight_ih_l0"}}
        with pytest.raises(err, match=pattern):
            layer.load_state_dict(sd)
        for n, p in layer.params.items():
            np.testing.assert_array_equal(host(p), before[n], err_msg=f"{n} changed by a failed load")


@pytest.mark.parametrize("cell", CELLS)
def test_init_is_uniform_in_torch_range_and_seeded(backend, cell, make_layer):
    H = 16
    layer = make_layer(cell, 10, H, num_layers=2, dtype=np.float32, seed=11)
    bound = 1 / math.sqrt(H)
    values = np.concatenate([host(p).ravel() for p in layer.params.values()])
    assert np.all(np.abs(values) <= bound)
    assert values.min() < -0.95 * bound and values.max() > 0.95 * bound   # fills the range
    assert abs(values.mean()) < 0.1 * bound                            # centred
    assert len(np.unique(values)) > 0.99 * values.size                 # no repeated blocks
    same = make_layer(cell, 10, H, num_layers=2, dtype=np.float32, seed=11)
    other = make_layer(cell, 10, H, num_layers=2, dtype=np.float32, seed=12)
    for n in layer.params:
        np.testing.assert_array_equal(host(same.params[n]), host(layer.params[n]))
        assert not np.array_equal(host(other.params[n]), host(layer.params[n]))
    assert all(np.all(host(g) == 0) for g in layer.grads.values())


# --------------------------------------------------------------------------- bad input


def test_constructor_errors(backend):
    with pytest.raises(ValueError, match="nonlinearity.*'sigmoid'"):
        bptt.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="hidden_size must be >= 1; got 0"):
        bptt.LSTM(3, 0)
    with pytest.raises(TypeError, match="input_size must be an int; got float"):
        bptt.GRU(3.5, 4)
    with pytest.raises(TypeError, match="num_layers must be an int"):
        bptt.GRU(3, 4, num_layers=True)
    with pytest.raises(TypeError, match="dtype int32 is not supported.*float32"):
        bptt.LSTM(3, 4, dtype=np.int32)
    with pytest.raises(TypeError, match="bias must be True or False"):
        bptt.LSTM(3, 4, bias="yes")


@pytest.mark.parametrize("cell", CELLS)
def test_forward_input_errors(backend, cell, make_layer, rng):
    layer = make_layer(cell, 3, 4, num_layers=2)
    x = rng.standard_normal((5, 2, 3))
    with pytest.raises(ValueError, match=r"x must be 3-D \[T, B, I\]; got 2-D .*\(5, 3\)"):
        layer.forward(x[:, 0])
    with pytest.raises(ValueError, match=r"x must have shape \[T, B, I\] with I = input_size = 3; got .*\(5, 2, 6\)"):
        layer.forward(rng.standard_normal((5, 2, 6)))
    with pytest.raises(ValueError, match="at least one time step"):
        layer.forward(x[:0])
    with pytest.raises(TypeError, match="x must be a float array.*integer.*int64"):
        layer.forward(np.ones((5, 2, 3), dtype=np.int64))
    with pytest.raises(TypeError, match="x must be a float array.*bool"):
        layer.forward(np.ones((5, 2, 3), dtype=bool))
    bad = x.copy()
    bad[3, 1, 2] = np.nan
    bad[4, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"x contains 2 non-finite values .* first is nan at index \(3, 1, 2\)"):
        layer.forward(bad)


@pytest.mark.parametrize("cell", CELLS)
def test_state_errors(backend, cell, make_layer, random_state, rng):
    layer = make_layer(cell, 3, 4, num_layers=2)
    x = rng.standard_normal((5, 2, 3))
    good = random_state(layer, 2, rng)
    if cell == "lstm":
        h, c = good
        with pytest.raises(TypeError, match=r"state of an LSTM must be a tuple \(h, c\)"):
            layer.forward(x, h)
        with pytest.raises(ValueError, match=r"state\[1\] \(c\) must have shape \[L, B, H\] = \(2, 2, 4\); got .*\(2, 3, 4\)"):
            layer.forward(x, (h, rng.standard_normal((2, 3, 4))))
        bad = c.copy()
        bad[1, 0, 3] = np.inf
        with pytest.raises(ValueError, match=r"state\[1\] \(c\) contains 1 non-finite value .* inf at index \(1, 0, 3\)"):
            layer.forward(x, (h, bad))
        with pytest.raises(TypeError, match=r"state\[0\] \(h\) must be a float array.*integer"):
            layer.forward(x, (h.astype(np.int32), c))
    else:
        with pytest.raises(TypeError, match="must be one \\[L, B, H\\] array h"):
            layer.forward(x, (good, good))
        with pytest.raises(ValueError, match=r"state must have shape \[L, B, H\] = \(2, 2, 4\); got .*\(1, 2, 4\)"):
            layer.forward(x, good[:1])
        with pytest.raises(ValueError, match=r"state must be 3-D \[L, B, H\] = \(2, 2, 4\); got 2-D"):
            layer.forward(x, good[0])
        bad = good.copy()
        bad[0, 1, 1] = np.nan
        with pytest.raises(ValueError, match=r"state contains 1 non-finite value .* nan at index \(0, 1, 1\)"):
            layer.forward(x, bad)
        with pytest.raises(TypeError, match="state must be a float array.*integer"):
            layer.forward(x, np.zeros((2, 2, 4), dtype=np.int64))


@pytest.mark.parametrize("cell", CELLS)
def test_backward_input_errors(backend, cell, make_layer, rng):
    layer = make_layer(cell, 3, 4, num_layers=1)
    other = make_layer(cell, 3, 4, num_layers=1)
    x = rng.standard_normal((5, 2, 3))
    y, _, cache = layer.forward(x)
    _, _, other_cache = other.forward(x)
    dy = rng.standard_normal((5, 2, 4))
    with pytest.raises(ValueError, match="cache was made by another layer"):
        layer.backward(dy, other_cache)
    with pytest.raises(TypeError, match="cache must be the LayerCache.*got tuple"):
        layer.backward(dy, (1, 2))
    with pytest.raises(ValueError, match=r"dy must have shape \[T, B, H\] \(like y\) = \(5, 2, 4\); got .*\(4, 2, 4\)"):
        layer.backward(dy[:4], cache)
    with pytest.raises(ValueError, match=r"dy must be 3-D"):
        layer.backward(dy[0], cache)
    with pytest.raises(TypeError, match="dy must be a float array.*integer"):
        layer.backward(np.ones((5, 2, 4), dtype=np.int16), cache)
    bad = dy.copy()
    bad[2, 1, 0] = -np.inf
    with pytest.raises(ValueError, match=r"dy contains 1 non-finite value .* -inf at index \(2, 1, 0\)"):
        layer.backward(bad, cache)
    with pytest.raises(ValueError, match=r"t_start must be in \[0, 4\]; got 5"):
        layer.backward(dy, cache, t_start=5)
    with pytest.raises(ValueError, match=r"t_start must be in \[0, 4\]; got -1"):
        layer.backward(dy, cache, t_start=-1)
    with pytest.raises(TypeError, match="t_start must be an int; got float"):
        layer.backward(dy, cache, t_start=1.0)
    wrong_dstate = rng.standard_normal((1, 3, 4))
    with pytest.raises((ValueError, TypeError), match="dstate"):
        layer.backward(dy, cache, (wrong_dstate, wrong_dstate) if cell == "lstm" else wrong_dstate)
    # none of the failed calls touched the gradients
    assert all(np.all(host(g) == 0) for g in layer.grads.values())
    layer.backward(dy, cache, t_start=np.int64(2))       # numpy ints are fine


def test_cache_repr_names_owner_and_shape(backend, make_layer, rng):
    layer = make_layer("gru", 3, 4, num_layers=2)
    _, _, cache = layer.forward(rng.standard_normal((5, 2, 3)))
    assert isinstance(cache, LayerCache)
    assert (cache.owner, cache.T, cache.B, len(cache.layers)) == (layer.layer_id, 5, 2, 2)
    assert repr(layer).startswith("GRU(3, 4, num_layers=2")
