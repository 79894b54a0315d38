"""Caches as plain dicts: a layer's or model's cache -> to_dict (host arrays, backend caches by
field name) -> cache_from_dict on a layer or model with the same weights, on the same or the
other backend, gives the same backward; wrong cells and sizes are refused; the documented
``check_finite`` argument of the layers' forward and backward."""

import importlib

import numpy as np
import pytest

import bptt

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")


def _importable(name):
    try:
        importlib.import_module(f"bptt_kernels.{name}")
    except Exception as e:
        return pytest.param(name, marks=pytest.mark.skip(reason=f"bptt_kernels.{name}: {e}"), id=name)
    return pytest.param(name, id=name)


OTHER_BACKENDS = [_importable(n) for n in ("reference", "cpu")]


def host(a):
    return np.array(bptt.get_backend().to_host(a))


def leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from leaves(v)
    else:
        yield tree


def host_copy(a):
    return np.array(bptt.get_backend().to_host(a), copy=True)


@pytest.mark.parametrize("other", OTHER_BACKENDS)
@pytest.mark.parametrize("cell", CELLS)
def test_layer_cache_dict_gives_the_same_backward(backend, other, cell, rng, make_layer, random_state):
    T, B, I, H = 6, 3, 4, 5
    layer = make_layer(cell, I, H, num_layers=2, seed=1)
    x, dy = rng.standard_normal((T, B, I)), rng.standard_normal((T, B, H))
    y, _, cache = layer.forward(x, random_state(layer, B, rng))
    d = cache.to_dict(host_copy)
    assert all(type(v) is np.ndarray or v is None or isinstance(v, (bool, int, str)) for v in leaves(d))
    assert [c["cell"] for c in d["layers"]] == [cell, cell]
    dx, dstate = layer.backward(dy, cache, t_start=2)
    expected = [host(dx)] + [host(g) for g in layer.grads.values()]
    with bptt.use_backend(other):
        again = make_layer(cell, I, H, num_layers=2, seed=9)
        again.load_state_dict(layer.state_dict())
        rebuilt = again.cache_from_dict(d)
        assert rebuilt.owner == again.layer_id and (rebuilt.T, rebuilt.B) == (T, B)
        dx2, _ = again.backward(dy, rebuilt, t_start=2)
        got = [host(dx2)] + [host(g) for g in again.grads.values()]
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def test_layer_cache_from_dict_refuses_other_cells_and_sizes(backend, rng, make_layer):
    lstm = make_layer("lstm", 3, 4, num_layers=2)
    _, _, cache = lstm.forward(rng.standard_normal((5, 2, 3)))
    d = cache.to_dict(host_copy)
    with pytest.raises(ValueError, match="'lstm' cell; this layer is 'gru'"):
        make_layer("gru", 3, 4, num_layers=2).cache_from_dict(d)
    with pytest.raises(ValueError, match="2 stacked layers; this LSTM has 1"):
        make_layer("lstm", 3, 4, num_layers=1).cache_from_dict(d)
    with pytest.raises(ValueError, match=r"y of shape \(5, 2, 4\); this layer needs \(5, 2, 6\)"):
        make_layer("lstm", 3, 6, num_layers=2).cache_from_dict(d)


@pytest.mark.parametrize("make", ["lm", "seq"])
def test_model_cache_dict_gives_the_same_backward(backend, make, rng):
    if make == "lm":
        model = bptt.LanguageModel(7, 4, 5, num_layers=2, dropout=0.2, dtype=np.float64, seed=1)
        inputs, out_shape = rng.integers(0, 7, (6, 3)), (6, 3, 7)
    else:
        model = bptt.SequenceModel(2, 5, 3, num_layers=2, cell="gru", dtype=np.float64, seed=1)
        inputs, out_shape = rng.standard_normal((6, 3, 2)), (6, 3, 3)
    _, _, cache = model.forward(inputs)
    dout = backend.asarray(rng.standard_normal(out_shape), np.float64)
    rebuilt = model.cache_from_dict(cache.to_dict(host_copy))
    model.zero_grad()
    d1 = model.backward(dout, cache, t_start=1)
    g1 = {k: host(g) for k, g in model.grads.items()}
    model.zero_grad()
    d2 = model.backward(dout, rebuilt, t_start=1)
    for a, b in zip(d2 if isinstance(d2, tuple) else (d2,), d1 if isinstance(d1, tuple) else (d1,)):
        np.testing.assert_array_equal(host(a), host(b))
    for k, g in model.grads.items():
        np.testing.assert_array_equal(host(g), g1[k], err_msg=k)


def test_check_finite_is_an_argument_of_forward_and_backward(backend, make_layer):
    layer = make_layer("gru", 2, 3)
    x = np.ones((4, 1, 2))
    x[2, 0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        layer.forward(x)
    y, _, cache = layer.forward(x, check_finite=False)         # the caller vouches for x
    assert np.isnan(host(y)).any()
    dy = np.full((4, 1, 3), np.inf)
    with pytest.raises(ValueError, match="inf"):
        layer.backward(dy, cache)
    layer.backward(dy, cache, check_finite=False)
