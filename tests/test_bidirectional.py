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
from test_lengths import make_lengths

try:
    import torch
except ImportError:         # an optional test dependency: its tests skip without it
    torch = None


def _torch():
    if torch is None:
        pytest.skip("torch is not installed")
    return torch


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
# lengths through the models' recurrent stack

class Stack(RecurrentModelBase):
    """The recurrent stack alone, as the models build it (parameters under rnn.*)."""

    def __init__(self, cell, input_size, hidden_size, num_layers, dtype, seed=0, **kw):
        self._init_stack(cell, input_size, hidden_size, num_layers, 0.0, dtype, seed, **kw)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_stack_with_lengths_matches_torch_packed(backend, cell, num_layers, dtype, rng):
    """_stack_forward(..., lengths=...) and _stack_backward against torch's module with
    num_layers levels over a packed batch (dropout 0): y, final state, dx, d(initial state)
    and every rnn.* gradient."""
    _torch()
    T, B, I, H, L = 6, 5, 3, 4, num_layers
    torch.manual_seed(int(rng.integers(2**31)))
    module = torch_module(cell, I, H, L, True, dtype, False)
    stack = Stack(cell, I, H, L, dtype)
    stack.load_state_dict({"rnn." + name: p for name, p in module.state_dict().items()})
    n_states = 2 if cell == "lstm" else 1
    lengths = make_lengths("mixed", T, B, rng)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state = tuple(rng.standard_normal((L, B, H)).astype(dtype) for _ in range(n_states))
    dy = rng.standard_normal((T, B, H)).astype(dtype)
    dstate = tuple(rng.standard_normal((L, B, H)).astype(dtype) for _ in range(n_states))
    want_y, want_final, want_dx, want_dinit, want_grads = torch_run(module, cell, x, state, lengths, dy, dstate)

    unpack = (lambda s: s) if cell == "lstm" else (lambda s: s[0])
    xp, host = stack.backend.xp, stack.backend.to_host
    y, final, cache = stack._stack_forward(xp.asarray(x), unpack(state), train=True, lengths=lengths)
    dx, dinit, _ = stack._stack_backward(xp.asarray(dy), cache, unpack(tuple(map(xp.asarray, dstate))), 0)
    what = f"{stack.backend.NAME} stack {cell} L={L} lengths={list(lengths)}"
    assert_close(host(y), want_y, dtype, f"{what} y")
    assert_close(host(dx), want_dx, dtype, f"{what} dx")
    for k in range(n_states):
        assert_close(host(as_parts(final)[k]), want_final[k], dtype, f"{what} final state[{k}]")
        assert_close(host(as_parts(dinit)[k]), want_dinit[k], dtype, f"{what} d(initial state)[{k}]")
    assert set(stack.grads) == {"rnn." + name for name in want_grads}
    for name, g in want_grads.items():
        assert_close(host(stack.grads["rnn." + name]), g, dtype, f"{what} d{name}")
