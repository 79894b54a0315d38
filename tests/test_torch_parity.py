"""PyTorch autograd as an independent oracle (skipped where torch is not installed).

torch.nn.RNN / LSTM / GRU weights are loaded into our layers through torch's own state_dict
(parameter names and gate orders must agree). With random x, initial state, dy and
d(final state), outputs, final states, dx, d(initial state) and every parameter gradient
must agree: float64 max relative error <= 1e-10, float32 <= 1e-5 (docs/design.md, section 5).
The per-step gradient diagnostic dh is checked against a step-by-step torch unroll with
cells (torch.nn.LSTMCell etc.), where every h_t is a tensor whose .grad is dL/dh_t.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}

# (T, B, I, H, num_layers, bias): T=1, B=1, I != H, I == H, two layers, bias off
CONFIGS = [
    (1, 1, 3, 4, 1, True),
    (5, 3, 2, 4, 2, True),
    (4, 2, 5, 3, 2, False),
    (6, 1, 4, 4, 1, False),
    (3, 4, 4, 5, 3, True),
]


def torch_module(cell, I, H, num_layers, bias, dtype):
    kw = dict(num_layers=num_layers, bias=bias, dtype=TORCH_DTYPE[np.dtype(dtype)])
    if cell == "lstm":
        return torch.nn.LSTM(I, H, **kw)
    if cell == "gru":
        return torch.nn.GRU(I, H, **kw)
    return torch.nn.RNN(I, H, nonlinearity=cell[4:], **kw)


def as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "T{}B{}I{}H{}L{}{}".format(*c[:5], "" if c[5] else "nobias"))
@pytest.mark.parametrize("cell", CELLS)
def test_matches_torch_autograd(backend, cell, config, dtype, rng, make_layer, state_parts,
                                assert_close, tol):
    T, B, I, H, L, bias = config
    torch.manual_seed(int(rng.integers(2**31)))
    ref = torch_module(cell, I, H, L, bias, dtype)
    layer = make_layer(cell, I, H, L, bias, dtype)
    layer.load_state_dict(ref.state_dict())        # torch tensors, torch names

    n_states = 2 if cell == "lstm" else 1
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state = tuple(rng.standard_normal((L, B, H)).astype(dtype) for _ in range(n_states))
    dy = rng.standard_normal((T, B, H)).astype(dtype)
    dstate = tuple(rng.standard_normal((L, B, H)).astype(dtype) for _ in range(n_states))

    # torch
    tx = torch.tensor(x, requires_grad=True)
    tstate = tuple(torch.tensor(s, requires_grad=True) for s in state)
    ty, tfinal = ref(tx, tstate if cell == "lstm" else tstate[0])
    tfinal = as_tuple(tfinal)
    loss = (ty * torch.tensor(dy)).sum() + sum((f * torch.tensor(d)).sum() for f, d in zip(tfinal, dstate))
    loss.backward()

    # ours
    unpack = (lambda s: s) if cell == "lstm" else (lambda s: s[0])
    y, final, cache = layer.forward(x, unpack(state))
    dx, dinit = layer.backward(dy, cache, unpack(dstate))

    rtol = tol(dtype)
    assert np.asarray(y).dtype == dtype and np.asarray(dx).dtype == dtype
    assert_close(y, ty.detach().numpy(), rtol, "y")
    for k, (f, tf) in enumerate(zip(state_parts(final), tfinal)):
        assert_close(f, tf.detach().numpy(), rtol, f"final state[{k}]")
    assert_close(dx, tx.grad.numpy(), rtol, "dx")
    for k, (d, ts) in enumerate(zip(state_parts(dinit), tstate)):
        assert_close(d, ts.grad.numpy(), rtol, f"d(initial state)[{k}]")
    torch_grads = {name: p.grad.numpy() for name, p in ref.named_parameters()}
    assert set(torch_grads) == set(layer.grads)
    for name, g in layer.grads.items():
        assert_close(layer.backend.to_host(g), torch_grads[name], rtol, f"d{name}")


def torch_cells(layer):
    """One torch cell per stacked layer, carrying our layer's parameters (float64)."""
    cells = []
    for k in range(layer.num_layers):
        in_k = layer.input_size if k == 0 else layer.hidden_size
        kw = dict(bias=layer.bias, dtype=torch.float64)
        if layer.cell == "lstm":
            cell = torch.nn.LSTMCell(in_k, layer.hidden_size, **kw)
        elif layer.cell == "gru":
            cell = torch.nn.GRUCell(in_k, layer.hidden_size, **kw)
        else:
            cell = torch.nn.RNNCell(in_k, layer.hidden_size, nonlinearity=layer.cell[4:], **kw)
        cell.load_state_dict({name.rsplit("_l", 1)[0]: torch.tensor(layer.backend.to_host(p))
                              for name, p in layer.params.items() if name.endswith(f"_l{k}")})
        cells.append(cell)
    return cells


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_dh_matches_torch_step_by_step(backend, cell, num_layers, rng, make_layer, assert_close, tol):
    T, B, I, H = 5, 2, 3, 4
    layer = make_layer(cell, I, H, num_layers, True, np.float64, seed=int(rng.integers(2**31)))
    cells = torch_cells(layer)
    n_states = 2 if cell == "lstm" else 1
    x = rng.standard_normal((T, B, I))
    state = tuple(rng.standard_normal((num_layers, B, H)) for _ in range(n_states))
    dy = rng.standard_normal((T, B, H))
    dstate = tuple(rng.standard_normal((num_layers, B, H)) for _ in range(n_states))

    # torch, unrolled: hs[t][k] is h of layer k after step t, a leaf of the graph we can ask .grad of
    s = [[torch.tensor(p[k]) for p in state] for k in range(num_layers)]
    hs = []
    for t in range(T):
        inp = torch.tensor(x[t])
        row = []
        for k, c in enumerate(cells):
            out = c(inp, tuple(s[k])) if cell == "lstm" else (c(inp, s[k][0]),)
            out[0].retain_grad()
            s[k] = list(out)
            row.append(out[0])
            inp = out[0]
        hs.append(row)
    loss = sum((hs[t][-1] * torch.tensor(dy[t])).sum() for t in range(T))
    loss = loss + sum((s[k][j] * torch.tensor(dstate[j][k])).sum()
                      for k in range(num_layers) for j in range(n_states))
    loss.backward()

    unpack = (lambda v: v) if cell == "lstm" else (lambda v: v[0])
    _, _, cache = layer.forward(x, unpack(state))
    _, _, dh = layer.backward(dy, cache, unpack(dstate), return_dh=True)
    assert len(dh) == num_layers
    for k in range(num_layers):
        expected = np.stack([hs[t][k].grad.numpy() for t in range(T)])
        assert_close(layer.backend.to_host(dh[k]), expected, tol(np.float64), f"dh[layer {k}]")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_softmax_cross_entropy_matches_torch(backend, dtype, rng, assert_close, tol):
    N, V = 9, 7
    logits = (rng.standard_normal((N, V)) * 5).astype(dtype)
    targets = rng.integers(0, V, N).astype(np.int64)
    targets[[2, 5]] = -1                                   # ignored rows
    dlogits = np.full_like(logits, np.nan)                 # poisoned: every element must be written
    scale = 0.37
    loss = backend.softmax_cross_entropy(backend.asarray(logits, dtype), backend.asarray(targets, np.int64),
                                         dlogits, scale)
    t = torch.tensor(logits, requires_grad=True)
    tloss = torch.nn.functional.cross_entropy(t, torch.tensor(targets), ignore_index=-1, reduction="sum")
    (tloss * scale).backward()
    assert isinstance(loss, float)
    assert abs(loss - tloss.item()) <= tol(dtype) * abs(tloss.item())
    assert_close(dlogits, t.grad.numpy(), tol(dtype), "dlogits")
    assert np.all(dlogits[[2, 5]] == 0)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_sgd_step_matches_torch(backend, dtype, nesterov, rng, assert_close, tol):
    p = rng.standard_normal((4, 3)).astype(dtype)
    tp = torch.tensor(p.copy(), requires_grad=True)
    opt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    buf = np.full_like(p, np.nan)                          # poisoned: the first step must overwrite it
    for step in range(4):
        g = rng.standard_normal(p.shape).astype(dtype)
        tp.grad = torch.tensor(g.copy())
        opt.step()
        backend.sgd_step(p, g, buf, 0.1, 0.9, 0.01, nesterov, step == 0)
    assert_close(p, tp.detach().numpy(), tol(dtype), "param")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_adam_step_matches_torch(backend, dtype, rng, assert_close, tol):
    p = rng.standard_normal((4, 3)).astype(dtype)
    tp = torch.tensor(p.copy(), requires_grad=True)
    opt = torch.optim.Adam([tp], lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, foreach=False)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for step in range(1, 6):
        g = rng.standard_normal(p.shape).astype(dtype)
        tp.grad = torch.tensor(g.copy())
        opt.step()
        backend.adam_step(p, g, m, v, 0.01, 0.8, 0.99, 1e-6, 0.05, step)
    assert_close(p, tp.detach().numpy(), tol(dtype), "param")
