"""Bidirectional recurrent layers and ``lengths`` through the models' recurrent stack.

The oracle is PyTorch autograd (skipped without torch): nn.LSTM/GRU/RNN with
``bidirectional`` and ``num_layers`` as ours, fed padded (lengths None) or through
pack_padded_sequence(enforce_sorted=False) -> pad_packed_sequence, for y, the final states and
every gradient (dx, the initial state's, every parameter's including the ``_reverse`` ones).
Besides: state_dict round trips with torch both ways, the errors of bad calls, the cache
dicts, and finite differences in float64 on the reference backend.
"""

import numpy as np
import pytest

from bptt.recurrent_stack import RecurrentModelBase
from bptt_kernels import CELLS
from helpers import assert_close
from test_gradcheck import FD_RTOL, numeric_grad
from test_lengths import LAYER_CONFIGS, _torch, make_lengths, torch    # torch: None when not installed


TORCH_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}


def torch_module(cell, I, H, L, bias, dtype, bidirectional):
    t = _torch()
    kw = dict(num_layers=L, bias=bias, bidirectional=bidirectional,
              dtype=getattr(t, TORCH_DTYPES[np.dtype(dtype)]))
    if cell == "lstm":
        return t.nn.LSTM(I, H, **kw)
    if cell == "gru":
        return t.nn.GRU(I, H, **kw)
    return t.nn.RNN(I, H, nonlinearity=cell[4:], **kw)


def torch_run(module, cell, x, state, lengths, dy, dstate):
    """torch autograd through ``module``, padded (lengths None) or packed with
    enforce_sorted=False: (y, final states, x.grad, initial state grads (None where state is
    None), {parameter name: grad}). state and dstate are tuples of host arrays."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    T = x.shape[0]
    tx = torch.tensor(x, requires_grad=True)
    tstate = None if state is None else tuple(torch.tensor(s, requires_grad=True) for s in state)
    arg = None if tstate is None else (tstate if cell == "lstm" else tstate[0])
    if lengths is None:
        ty, final = module(tx, arg)
    else:
        packed = pack_padded_sequence(tx, torch.tensor(np.asarray(lengths, np.int64)), enforce_sorted=False)
        out, final = module(packed, arg)
        ty, _ = pad_packed_sequence(out, total_length=T)
    final = final if isinstance(final, tuple) else (final,)
    loss = (ty * torch.tensor(dy)).sum()
    loss = loss + sum((f * torch.tensor(d)).sum() for f, d in zip(final, dstate))
    loss.backward()
    return (ty.detach().numpy(), [f.detach().numpy() for f in final], tx.grad.numpy(),
            None if tstate is None else [s.grad.numpy() for s in tstate],
            {n: p.grad.numpy() for n, p in module.named_parameters()})


def as_parts(state):
    """h or (h, c) -> a tuple."""
    return state if isinstance(state, tuple) else (state,)


# ----------------------------------------------------------------------------------------
# bidirectional layers against torch

def random_parts(cell, shape, dtype, rng):
    """A tuple of random arrays ``shape``: (h, c) for LSTM, (h,) otherwise."""
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(2 if cell == "lstm" else 1))


def check_against_torch(model, module, cell, x, state, lengths, dtype, rng, prefix=""):
    """Run ``model`` (a layer, or a stack whose parameters are ``prefix`` + torch's names) and
    torch's ``module`` on the same x, state (tuple or None) and lengths with random dy, dstate;
    compare y, final states, dx, d(initial state) and every parameter gradient."""
    T, B = x.shape[:2]
    H = module.hidden_size
    D = 2 if module.bidirectional else 1
    dy = rng.standard_normal((T, B, D * H)).astype(dtype)
    dstate = random_parts(cell, (D * module.num_layers, B, H), dtype, rng)
    want_y, want_final, want_dx, want_dinit, want_grads = torch_run(module, cell, x, state, lengths, dy, dstate)

    unpack = (lambda s: s) if cell == "lstm" else (lambda s: s[0])
    be = model.backend
    if prefix:                  # the models' stack
        y, final, cache = model._stack_forward(be.asarray(x, dtype), None if state is None else unpack(state),
                                               train=True, lengths=lengths)
        dx, dinit, _ = model._stack_backward(be.asarray(dy, dtype), cache,
                                             unpack(tuple(be.asarray(s, dtype) for s in dstate)), 0)
    else:
        y, final, cache = model.forward(x, None if state is None else unpack(state), lengths=lengths)
        dx, dinit = model.backward(dy, cache, unpack(dstate))
    host = be.to_host
    what = f"{be.NAME} {cell} D={D} L={module.num_layers} lengths={None if lengths is None else list(lengths)}"
    assert_close(host(y), want_y, dtype, f"{what} y")
    assert_close(host(dx), want_dx, dtype, f"{what} dx")
    for k in range(len(want_final)):
        assert_close(host(as_parts(final)[k]), want_final[k], dtype, f"{what} final state[{k}]")
        if state is not None:
            assert_close(host(as_parts(dinit)[k]), want_dinit[k], dtype, f"{what} d(initial state)[{k}]")
    assert set(model.grads) == {prefix + name for name in want_grads}
    for name, g in want_grads.items():
        assert_close(host(model.grads[prefix + name]), g, dtype, f"{what} d{name}")


# test_lengths' (T, B, I, H, num_layers, bias, lengths, initial state), and padded batches
BIDI_CONFIGS = LAYER_CONFIGS + [
    (6, 3, 3, 4, 2, True, None, True),
    (4, 2, 3, 4, 3, False, None, False),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("config", BIDI_CONFIGS, ids=lambda c: "T{}B{}I{}H{}L{}{}-{}{}".format(
    *c[:5], "" if c[5] else "-nobias", c[6] or "none", "-state" if c[7] else ""))
@pytest.mark.parametrize("cell", CELLS)
def test_bidirectional_layer_matches_torch(backend, cell, config, dtype, rng, make_layer):
    _torch()
    T, B, I, H, L, bias, kind, with_state = config
    torch.manual_seed(int(rng.integers(2**31)))
    module = torch_module(cell, I, H, L, bias, dtype, True)
    layer = make_layer(cell, I, H, L, bias, dtype, bidirectional=True)
    layer.load_state_dict(module.state_dict())
    lengths = None if kind is None else make_lengths(kind, T, B, rng)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state = random_parts(cell, (2 * L, B, H), dtype, rng) if with_state else None
    check_against_torch(layer, module, cell, x, state, lengths, dtype, rng)


def reverse_rows(a, lengths):
    """a [T, B, ...] with row b's steps 0..lengths[b]-1 in reverse order (a plain loop)."""
    out = np.array(a, copy=True)
    for b, n in enumerate(lengths):
        out[:n, b] = a[:n, b][::-1]
    return out


@pytest.mark.parametrize("cell", CELLS)
def test_bidirectional_is_two_one_direction_layers(backend, cell, rng, make_layer):
    """One bidirectional level equals a one-direction layer over x and another (the _reverse
    weights) over each row's steps reversed (written out by a loop): y halves, final states,
    dx as the sum, and dh ([T, B, 2H]: both halves in forward time), with lengths."""
    T, B, I, H = 6, 4, 3, 5
    seed = int(rng.integers(2**31))
    bidi = make_layer(cell, I, H, 1, True, np.float64, seed=seed, bidirectional=True)
    fwd, rev = (make_layer(cell, I, H, 1, True, np.float64, seed=seed) for _ in range(2))
    sd = bidi.state_dict()
    fwd.load_state_dict({n: a for n, a in sd.items() if not n.endswith("_reverse")})
    rev.load_state_dict({n[:-len("_reverse")]: a for n, a in sd.items() if n.endswith("_reverse")})
    lengths = make_lengths("mixed", T, B, rng)
    x = rng.standard_normal((T, B, I))
    state = random_parts(cell, (2, B, H), np.float64, rng)
    dy = rng.standard_normal((T, B, 2 * H))
    unpack = (lambda s: s) if cell == "lstm" else (lambda s: s[0])

    y, final, cache = bidi.forward(x, unpack(state), lengths=lengths)
    dx, dinit, dh = bidi.backward(dy, cache, return_dh=True)
    y_f, final_f, cache_f = fwd.forward(x, unpack(tuple(s[:1] for s in state)), lengths=lengths)
    y_r, final_r, cache_r = rev.forward(reverse_rows(x, lengths), unpack(tuple(s[1:] for s in state)),
                                        lengths=lengths)
    dx_f, dinit_f, dh_f = fwd.backward(dy[..., :H], cache_f, return_dh=True)
    dx_r, dinit_r, dh_r = rev.backward(reverse_rows(dy[..., H:], lengths), cache_r, return_dh=True)
    host = bidi.backend.to_host
    assert_close(host(y), np.concatenate([y_f, reverse_rows(y_r, lengths)], axis=2), np.float64, "y")
    assert_close(host(dx), np.asarray(dx_f) + reverse_rows(dx_r, lengths), np.float64, "dx")
    assert len(dh) == 1 and dh[0].shape == (T, B, 2 * H)
    assert_close(host(dh[0]), np.concatenate([host(dh_f[0]), reverse_rows(host(dh_r[0]), lengths)], axis=2),
                 np.float64, "dh")
    for got, f, r in ((final, final_f, final_r), (dinit, dinit_f, dinit_r)):
        for k in range(len(as_parts(got))):
            assert_close(host(as_parts(got)[k]), np.concatenate([host(as_parts(f)[k]), host(as_parts(r)[k])]),
                         np.float64, "state [forward; reverse]")


@pytest.mark.parametrize("bidirectional", [False, True], ids=["one", "bidi"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_state_dict_round_trips_with_torch(backend, cell, num_layers, bias, bidirectional, rng, make_layer):
    """torch -> ours: the same names in torch's order, the same values; ours -> torch: a
    strict load_state_dict that gives back our values."""
    _torch()
    torch.manual_seed(int(rng.integers(2**31)))
    module = torch_module(cell, 3, 4, num_layers, bias, np.float64, bidirectional)
    layer = make_layer(cell, 3, 4, num_layers, bias, np.float64, seed=int(rng.integers(2**31)),
                       bidirectional=bidirectional)
    assert list(layer.state_dict()) == list(module.state_dict())
    layer.load_state_dict(module.state_dict())
    for name, a in layer.state_dict().items():
        np.testing.assert_array_equal(a, module.state_dict()[name].numpy())
    other = make_layer(cell, 3, 4, num_layers, bias, np.float64, seed=int(rng.integers(2**31)),
                       bidirectional=bidirectional)
    module.load_state_dict({n: torch.from_numpy(a) for n, a in other.state_dict().items()}, strict=True)
    for name, a in other.state_dict().items():
        np.testing.assert_array_equal(module.state_dict()[name].numpy(), a)


def test_bidirectional_parameters_shapes_init_and_repr(backend, make_layer):
    """Layer k > 0 takes 2H inputs; every parameter is drawn in torch's range; the
    one-direction parameters are the draws of a one-direction layer of the same seed."""
    layer = make_layer("gru", 3, 4, 2, True, np.float32, seed=5, bidirectional=True)
    assert layer.num_directions == 2 and layer.params["weight_ih_l1_reverse"].shape == (12, 8)
    assert layer.params["weight_ih_l1"].shape == (12, 8)
    for name, p in layer.state_dict().items():
        assert np.all(np.abs(p) <= 0.5) and np.unique(p).size == p.size, name
    one = make_layer("gru", 3, 4, 2, True, np.float32, seed=5)
    np.testing.assert_array_equal(one.state_dict()["weight_ih_l0"], layer.state_dict()["weight_ih_l0"])
    assert "bidirectional=True" in repr(layer) and "bidirectional" not in repr(one)
    h = layer.init_state(3)
    assert h.shape == (4, 3, 4) and not np.asarray(h).any()


@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh"])
def test_bidirectional_bad_calls(backend, cell, rng, make_layer):
    T, B, I, H, L = 5, 2, 3, 4, 2
    layer = make_layer(cell, I, H, L, bidirectional=True)
    x = rng.standard_normal((T, B, I))
    unpack = (lambda s: s) if cell == "lstm" else (lambda s: s[0])
    name = r"state\[0\] \(h\)" if cell == "lstm" else "state"
    with pytest.raises(ValueError, match=name + r" must have shape \[2L, B, H\] = \(4, 2, 4\); got .*\(2, 2, 4\)"):
        layer.forward(x, unpack(random_parts(cell, (L, B, H), np.float64, rng)))
    with pytest.raises(ValueError, match="projected=True is not available with bidirectional=True"):
        layer.forward(rng.standard_normal((T, B, layer.params["weight_ih_l0"].shape[0])), projected=True)
    _, _, cache = layer.forward(x, lengths=[5, 2])
    with pytest.raises(ValueError, match=r"t_start must be 0 for a bidirectional layer; got 2 \(the reverse"):
        layer.backward(rng.standard_normal((T, B, 2 * H)), cache, t_start=2)
    with pytest.raises(ValueError, match=r"dy must have shape \[T, B, 2H\] \(like y\) = \(5, 2, 8\)"):
        layer.backward(rng.standard_normal((T, B, H)), cache)
    with pytest.raises(TypeError, match="bidirectional must be True or False"):
        make_layer(cell, I, H, L, bidirectional="yes")


@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "lengths"])
def test_bidirectional_cache_dict_round_trip(backend, with_lengths, rng, make_layer):
    """LayerCache.to_dict holds the reverse caches; cache_from_dict gives the same backward,
    bit for bit, and refuses a one-direction layer's dict (and the other way round)."""
    T, B, I, H = 5, 3, 2, 4
    layer = make_layer("lstm", I, H, 2, True, np.float64, seed=3, bidirectional=True)
    lengths = np.array([2, 5, 1]) if with_lengths else None
    _, _, cache = layer.forward(rng.standard_normal((T, B, I)), lengths=lengths)
    d = cache.to_dict(layer.backend.to_host)
    assert len(d["layers"]) == len(d["reverse"]) == 2
    dy = rng.standard_normal((T, B, 2 * H))
    dx, dinit = layer.backward(dy, cache)
    grads = {k: layer.backend.to_host(g).copy() for k, g in layer.grads.items()}
    layer.zero_grad()
    dx2, dinit2 = layer.backward(dy, layer.cache_from_dict(d))
    np.testing.assert_array_equal(dx2, dx)
    for a, b in zip(dinit2, dinit):
        np.testing.assert_array_equal(a, b)
    for k, g in layer.grads.items():
        np.testing.assert_array_equal(layer.backend.to_host(g), grads[k])
    one = make_layer("lstm", I, H, 2, True, np.float64)
    with pytest.raises(ValueError, match="the cache is of a bidirectional layer; this LSTM has bidirectional=False"):
        one.cache_from_dict(d)
    _, _, one_cache = one.forward(rng.standard_normal((T, B, I)))
    with pytest.raises(ValueError, match="the cache is of a one-direction layer; this LSTM has bidirectional=True"):
        layer.cache_from_dict(one_cache.to_dict(one.backend.to_host))


@pytest.mark.parametrize("cell", CELLS)
def test_bidirectional_finite_differences(cell, rng, make_layer):
    """float64, reference backend: every parameter, x and the initial state of a tiny
    two-layer bidirectional layer with mixed lengths against central differences."""
    import bptt
    with bptt.use_backend("reference"):
        T, B, I, H, L = 4, 3, 2, 3, 2
        layer = make_layer(cell, I, H, L, True, np.float64, seed=int(rng.integers(2**31)), bidirectional=True)
        lengths = np.array([3, 1, 4])
        x = rng.standard_normal((T, B, I))
        state = random_parts(cell, (2 * L, B, H), np.float64, rng)
        R1 = rng.standard_normal((T, B, 2 * H))
        R2 = random_parts(cell, (2 * L, B, H), np.float64, rng)
        unpack = (lambda s: s) if cell == "lstm" else (lambda s: s[0])

        def loss():
            y, final, _ = layer.forward(x, unpack(state), lengths=lengths)
            return float(np.sum(y * R1) + sum(np.sum(f * r) for f, r in zip(as_parts(final), R2)))

        _, _, cache = layer.forward(x, unpack(state), lengths=lengths)
        dx, dinit = layer.backward(R1, cache, unpack(R2))
        for name, p in layer.params.items():
            assert_close(layer.grads[name], numeric_grad(loss, p), None, f"d{name}", rtol=FD_RTOL)
        assert_close(dx, numeric_grad(loss, x), None, "dx", rtol=FD_RTOL)
        for k, s in enumerate(state):
            assert_close(as_parts(dinit)[k], numeric_grad(loss, s), None, f"d(initial state)[{k}]", rtol=FD_RTOL)


# ----------------------------------------------------------------------------------------
# the models' recurrent stack: lengths, bidirectional

class Stack(RecurrentModelBase):
    """The recurrent stack alone, as the models build it (parameters under rnn.*)."""

    def __init__(self, cell, input_size, hidden_size, num_layers, dtype, seed=0, **kw):
        self._init_stack(cell, input_size, hidden_size, num_layers, 0.0, dtype, seed, **kw)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", [None, "mixed"], ids=["padded", "lengths"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["one", "bidi"])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_stack_matches_torch(backend, cell, num_layers, bidirectional, kind, dtype, rng):
    """_stack_forward(..., lengths=...) and _stack_backward (dropout 0) against torch's module
    with num_layers levels (padded, or packed with enforce_sorted=False) loaded under the
    prefix rnn.: y, final state, dx, d(initial state) and every rnn.* gradient."""
    _torch()
    T, B, I, H, L = 6, 5, 3, 4, num_layers
    torch.manual_seed(int(rng.integers(2**31)))
    module = torch_module(cell, I, H, L, True, dtype, bidirectional)
    stack = Stack(cell, I, H, L, dtype, bidirectional=bidirectional)
    assert stack.num_directions == (2 if bidirectional else 1)
    assert list(stack.state_dict()) == ["rnn." + name for name in module.state_dict()]
    stack.load_state_dict({"rnn." + name: p for name, p in module.state_dict().items()})
    lengths = None if kind is None else make_lengths(kind, T, B, rng)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state = random_parts(cell, (stack.num_directions * L, B, H), dtype, rng)
    check_against_torch(stack, module, cell, x, state, lengths, dtype, rng, prefix="rnn.")


def test_bidirectional_stack_state_dropout_and_bad_calls(backend, rng):
    """init_state [2L, B, H]; dropout masks act on the [T, B, 2H] inputs of the upper levels
    (the backward multiplies by them: checked against a forward with the same masks given as
    the layers' inputs); the stack's cache dict round trip; a [L, B, H] state and t_start > 0
    refused."""
    T, B, I, H, L = 5, 3, 2, 4, 2
    stack = Stack("gru", I, H, L, np.float64, seed=4, bidirectional=True)
    stack.dropout = 0.5
    h0 = stack.init_state(B)
    assert h0.shape == (2 * L, B, H) and not np.asarray(h0).any()
    x = rng.standard_normal((T, B, I))
    state = rng.standard_normal((2 * L, B, H))
    lengths = np.array([5, 2, 4])
    y, final, cache = stack._stack_forward(x, state, train=True, lengths=lengths)
    mask = np.asarray(cache.masks[0])
    assert mask.shape == (T, B, 2 * H) and set(np.unique(mask)) == {0.0, 2.0}
    # the upper level's input was the lower level's y times the mask
    y0, _, _ = stack.layers[0].forward(x, state[:2], lengths=lengths)
    y1, _, _ = stack.layers[1].forward(np.asarray(y0) * mask, state[2:], lengths=lengths)
    assert_close(y, y1, np.float64, "y with dropout")
    dy = rng.standard_normal((T, B, 2 * H))
    dx, dinit, dh = stack._stack_backward(dy, cache, None, 0)
    assert [a.shape for a in dh] == [(T, B, 2 * H)] * L and dinit.shape == (2 * L, B, H)
    again = stack._stack_cache_from_dict(cache.to_dict(stack.backend.to_host))
    stack.zero_grad()
    dx2, dinit2, _ = stack._stack_backward(dy, again, None, 0)
    np.testing.assert_array_equal(dx2, dx)
    np.testing.assert_array_equal(dinit2, dinit)
    with pytest.raises(ValueError, match=r"state must have shape \[2L, B, H\] = \(4, 3, 4\); got .*\(2, 3, 4\)"):
        stack._stack_forward(x, state[:L], train=False)
    with pytest.raises(ValueError, match="t_start must be 0 for a bidirectional layer"):
        stack._stack_backward(dy, cache, None, 1)
    with pytest.raises(ValueError, match="projected=True is not available with bidirectional=True"):
        stack._stack_forward(rng.standard_normal((T, B, 3 * H)), None, train=False, projected=True)
    with pytest.raises(TypeError, match="bidirectional must be True or False"):
        Stack("gru", I, H, L, np.float64, bidirectional=1)
