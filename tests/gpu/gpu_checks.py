"""Correctness checks of the GPU backends (``cuda``: Numba-CUDA, ``cupy``) through the backend
interface, shared by tests/gpu/ (on a GPU, real sizes) and tests/cudasim/ (the cuda backend on
the CUDA simulator, tiny sizes). Each check raises AssertionError naming what differs.

* ``check_recurrent``: one layer's forward + backward (outputs NaN-poisoned through the
  backend's ``config.POISON_OUTPUTS``, gradient buffers pre-filled so that backward must
  accumulate) against an oracle backend on the same inputs: y, final state, dx, dstate, dh,
  all gradients and the cached activations; where ``torch_device`` is given, also a second
  call (t_start = 0, gradients from zero) against ``torch.nn`` with autograd in float64 (cuDNN
  on a GPU). With ``lengths`` (variable-length batches) every row runs its own steps, torch
  through ``pack_padded_sequence``, and y, dx, dh and the cache must be exactly zero at the
  padded steps; ``projected``: the input given as x W_ih^T (w_ih None);
* ``check_op``: one non-recurrent kernel against the oracle.

Error measure and tolerances: ``helpers.rel_err`` and ``helpers.RTOL`` (float64 1e-10,
float32 1e-5).
"""

import contextlib

import numpy as np

from helpers import RTOL, assert_close, random_layer_problem

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
WEIGHTS = ("w_ih", "w_hh", "b_ih", "b_hh")
CACHED = ("gates", "c", "hn")   # the cached activations every backend keeps (those of the cell)
OPS = ("softmax_cross_entropy", "embedding", "sgd", "adam", "sum_of_squares+scale_")


@contextlib.contextmanager
def backend_config(backend, **settings):
    """Set ``backend.config`` attributes for the block, then ``config.reset()``."""
    cfg = backend.config
    for k, v in settings.items():
        setattr(cfg, k, v)
    try:
        yield
    finally:
        cfg.reset()


def backend_paths(backend):
    """The recurrent paths ``backend.config.PATH`` can force (all but "auto")."""
    return tuple(p for p in getattr(backend.config, "PATHS", ("persistent", "general")) if p != "auto")


def run_layer(backend, cell, p, t_start, zero_grads=False, lengths=None, projected=False):
    """Forward + backward of one layer on ``backend`` (``p``: helpers.random_layer_problem);
    host copies of y, final, dx, dstate, dh, the gradients (from p's grads0, or zero) and
    ``cache``: the cached activations (:data:`CACHED`) and lengths the cache holds.
    ``lengths``: int [B] or None; ``projected``: x W_ih^T given with w_ih None (dx is then
    dL/d(x W_ih^T), and there is no dW_ih)."""
    dev = lambda a: backend.asarray(a, a.dtype)  # noqa: E731
    host = backend.to_host
    w = [dev(p[k]) for k in WEIGHTS]
    x = (p["x"] @ p["w_ih"].T).astype(p["x"].dtype) if projected else p["x"]
    w_ih = None if projected else w[0]
    masks = {} if lengths is None else {"lengths": lengths}    # the plain call: no keyword
    y, final, cache = getattr(backend, f"{cell}_forward")(
        dev(x), tuple(map(dev, p["state"])), w_ih, *w[1:], **masks)
    out = {"y": host(y), "final": [host(a) for a in final]}
    grads = [backend.zeros(g.shape, g.dtype) if zero_grads else dev(g) for g in p["grads0"]]
    if projected:
        grads[0] = None
    dx, dstate, dh = getattr(backend, f"{cell}_backward")(
        dev(p["dy"]), tuple(map(dev, p["dfinal"])), cache, w_ih, w[1], *grads, t_start=t_start)
    out.update(dx=host(dx), dstate=[host(a) for a in dstate], dh=host(dh),
               grads=[host(g) for g in grads if g is not None],
               cache={f: host(getattr(cache, f)) for f in CACHED if getattr(cache, f) is not None})
    if cache.lengths is not None:
        out["cache"]["lengths"] = np.array(cache.lengths)
    return out


def assert_outputs_close(got, want, dtype, what):
    """Every output in ``want`` (lists element by element, dicts field by field) within
    RTOL[dtype] of ``got``."""
    for key, expected in want.items():
        if isinstance(expected, dict):
            assert set(got[key]) == set(expected), (
                f"{what}: {key} holds {sorted(got[key])}, not {sorted(expected)}")
            for field, b in expected.items():
                assert_close(got[key][field], b, dtype, f"{what}: {key}.{field}")
        elif isinstance(expected, list):
            for k, (a, b) in enumerate(zip(got[key], expected, strict=True)):
                assert_close(a, b, dtype, f"{what}: {key}[{k}]")
        else:
            assert_close(got[key], expected, dtype, f"{what}: {key}")


def assert_padded_steps_zero(got, lengths, what):
    """y, dx, dh and the cached activations of :func:`run_layer` exactly zero at every padded
    step (t >= lengths[b])."""
    T = got["y"].shape[0]
    padded = np.arange(T)[:, None] >= np.asarray(lengths)[None, :]          # T,B
    arrays = {k: got[k] for k in ("y", "dx", "dh")}
    arrays.update((f"cache.{f}", a) for f, a in got["cache"].items() if f in CACHED)
    for name, a in arrays.items():
        assert np.all(a[padded] == 0), f"{what}: {name} not zero at padded steps"


def torch_layer(cell, p, device, lengths=None):
    """torch.nn with autograd on ``device``, the same weights, t_start = 0: a dict like
    :func:`run_layer` (without dh and cache), gradients from zero; with ``lengths`` through
    pack_padded_sequence(enforce_sorted=False) and pad_packed_sequence. Always computed in
    float64: cuDNN's own float32 error (1.1e-5 relative seen on an H100) would count against a
    float32 check."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    T, B, I = p["x"].shape
    H = p["w_hh"].shape[1]
    if cell == "lstm":
        mod = torch.nn.LSTM(I, H)
    elif cell == "gru":
        mod = torch.nn.GRU(I, H)
    else:
        mod = torch.nn.RNN(I, H, nonlinearity=cell[4:])
    mod = mod.to(device=device, dtype=torch.float64)
    t = lambda a, grad=False: torch.tensor(a, device=device, dtype=torch.float64, requires_grad=grad)  # noqa: E731
    names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    with torch.no_grad():
        for k, name in zip(WEIGHTS, names):
            getattr(mod, name).copy_(t(p[k]))
    x = t(p["x"], True)
    state = [t(s[None], True) for s in p["state"]]
    inputs = x if lengths is None else pack_padded_sequence(
        x, torch.tensor(np.asarray(lengths, np.int64)), enforce_sorted=False)
    y, final = mod(inputs, tuple(state) if cell == "lstm" else state[0])
    if lengths is not None:
        y, _ = pad_packed_sequence(y, total_length=T)
    final = list(final) if cell == "lstm" else [final]
    loss = (y * t(p["dy"])).sum() + sum((f * t(d[None])).sum() for f, d in zip(final, p["dfinal"]))
    loss.backward()
    host = lambda a: a.detach().cpu().numpy()  # noqa: E731
    return {"y": host(y), "final": [host(f[0]) for f in final], "dx": host(x.grad),
            "dstate": [host(s.grad[0]) for s in state],
            "grads": [host(getattr(mod, n).grad) for n in names]}


def check_recurrent(backend, oracle, cell, shape, dtype, t_start, rng, path="auto",
                    torch_device=None, lengths=None, projected=False, **settings):
    """``backend``'s ``cell`` layer (T, B, I, H = ``shape``) with ``config.PATH = path`` and
    other ``settings`` against the backend ``oracle`` at ``t_start``, and where ``torch_device``
    is given (and the input is not ``projected``) a call at t_start = 0 with gradients from zero
    against torch.nn on that device. ``lengths``: int [B] or None (see :func:`run_layer`)."""
    T, B, I, H = shape
    p = random_layer_problem(rng, cell, T, B, I, H, dtype)
    what = (f"{backend.NAME} {cell} path={path} T{T} B{B} I{I} H{H} {np.dtype(dtype).name} "
            f"t_start={t_start}" + ("" if lengths is None else f" lengths={list(lengths)}")
            + (" projected" if projected else "")
            + "".join(f" {k}={v}" for k, v in settings.items()))
    torch_device = None if projected else torch_device
    with backend_config(backend, PATH=path, POISON_OUTPUTS=True, **settings):
        got = run_layer(backend, cell, p, t_start, lengths=lengths, projected=projected)
        got0 = (run_layer(backend, cell, p, 0, zero_grads=True, lengths=lengths)
                if torch_device else None)
    want = run_layer(oracle, cell, p, t_start, lengths=lengths, projected=projected)
    assert_outputs_close(got, want, dtype, f"{what} vs {oracle.NAME}")
    if lengths is not None:
        assert_padded_steps_zero(got, lengths, what)
    if torch_device:
        assert_outputs_close(got0, torch_layer(cell, p, torch_device, lengths), dtype,
                             f"{what} vs torch")


def assert_identical(got, want, what):
    """Every array of ``want`` (nested in dicts and lists) bit-identical to ``got``'s."""
    if isinstance(want, dict):
        assert set(got) == set(want), what
        for key in want:
            assert_identical(got[key], want[key], f"{what} {key}")
    elif isinstance(want, list):
        assert len(got) == len(want), what
        for k, (a, b) in enumerate(zip(got, want)):
            assert_identical(a, b, f"{what}[{k}]")
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


def check_lengths_all_T(backend, cell, shape, dtype, t_start, rng, path="auto"):
    """Every length T gives bit for bit what no lengths gives (forward, backward, cache)."""
    T, B, I, H = shape
    p = random_layer_problem(rng, cell, T, B, I, H, dtype)
    with backend_config(backend, PATH=path):
        plain = run_layer(backend, cell, p, t_start)
        full = run_layer(backend, cell, p, t_start, lengths=np.full(B, T))
    assert "lengths" not in plain["cache"]
    np.testing.assert_array_equal(full["cache"].pop("lengths"), np.full(B, T))
    assert_identical(full, plain, f"{backend.NAME} {cell} path={path} lengths all T")


def check_caches_cross(backend, oracle, cell, shape, lengths, t_start, rng, path="auto"):
    """A cache made with ``lengths`` by ``oracle`` (moved field by field as a checkpoint stores
    it) drives ``backend``'s backward, and ``backend``'s cache ``oracle``'s; both as
    ``oracle`` alone (float64)."""
    from bptt_kernels.host import cache_from_arrays, cache_to_arrays
    T, B, I, H = shape
    p = random_layer_problem(rng, cell, T, B, I, H, np.float64)
    weights = tuple(p[k] for k in WEIGHTS)
    what = f"{backend.NAME} {cell} path={path} lengths={list(lengths)}"

    def backward(be, cache):
        dev = lambda a: be.asarray(a, a.dtype)  # noqa: E731
        grads = [dev(g) for g in p["grads0"]]
        dx, dstate, dh = getattr(be, f"{cell}_backward")(
            dev(p["dy"]), tuple(map(dev, p["dfinal"])), cache, dev(p["w_ih"]), dev(p["w_hh"]),
            *grads, t_start=t_start)
        return {"dx": be.to_host(dx), "dstate": [be.to_host(a) for a in dstate],
                "dh": be.to_host(dh), "grads": [be.to_host(g) for g in grads]}

    with backend_config(backend, PATH=path):
        _, _, ref_cache = getattr(oracle, f"{cell}_forward")(p["x"], p["state"], *weights,
                                                            lengths=lengths)
        want = backward(oracle, ref_cache)
        moved = cache_from_arrays(*cache_to_arrays(ref_cache, oracle.to_host),
                                  lambda a: backend.asarray(a, a.dtype))
        assert_outputs_close(backward(backend, moved), want, np.float64, f"{what} {oracle.NAME} cache")
        dev = lambda a: backend.asarray(a, a.dtype)  # noqa: E731
        _, _, own = getattr(backend, f"{cell}_forward")(
            dev(p["x"]), tuple(map(dev, p["state"])), *map(dev, weights), lengths=lengths)
    np.testing.assert_array_equal(own.lengths, lengths)
    own = cache_from_arrays(*cache_to_arrays(own, backend.to_host),
                            lambda a: oracle.asarray(a, a.dtype))
    assert_outputs_close(backward(oracle, own), want, np.float64, f"{what} own cache")


def check_graph_replays_with_lengths(backend, oracle, graphs, cell, rng):
    """The cupy backend's general path, one loop key (T, B, H, t_start) called again and again
    (``graphs``: its engine's LoopGraphs, cleared first): without lengths, with three
    different lengths, then without again, every call against ``oracle``. Calls with lengths
    share a graph of their own (recorded at their second call, the lengths copied in at every
    replay) and leave no steps in the graph of the calls without."""
    T, B, I, H = 6, 4, 3, 5
    graphs.clear()
    replays = [graphs.replays]
    with backend_config(backend, PATH="general", POISON_OUTPUTS=True):
        for lengths in (None, None, [2, 6, 1, 4], [6, 3, 3, 1], [1, 1, 6, 2], None):
            p = random_layer_problem(rng, cell, T, B, I, H, np.float64)
            lengths = None if lengths is None else np.array(lengths)
            assert_outputs_close(run_layer(backend, cell, p, 1, lengths=lengths),
                                 run_layer(oracle, cell, p, 1, lengths=lengths), np.float64,
                                 f"{backend.NAME} {cell} graphs, lengths={lengths}")
            replays.append(graphs.replays)
    # forward and backward of each kind: recorded at its second call, replayed from then on
    assert np.diff(replays).tolist() == [0, 2, 0, 2, 2, 2], replays
    assert len(graphs._entries) == 4


def check_layers_with_lengths(layer, want_layer, x, dy, lengths, t_start, what):
    """bptt layer ``layer`` (on the backend under test) and ``want_layer`` (the same weights,
    on the oracle backend): forward(x, lengths=...) and backward(dy, t_start, return_dh)
    agree in y, the final state, dx, d(initial state), every level's dh and every gradient."""
    def run(lay):
        host = lay.backend.to_host
        parts = (lambda s: list(s)) if lay.cell == "lstm" else (lambda s: [s])
        lay.zero_grad()
        y, state, cache = lay.forward(x, lengths=lengths)
        dx, dstate, dh = lay.backward(dy, cache, t_start=t_start, return_dh=True)
        return {"y": host(y), "dx": host(dx), "final": [host(a) for a in parts(state)],
                "dstate": [host(a) for a in parts(dstate)], "dh": [host(a) for a in dh],
                "grads": {k: host(g) for k, g in lay.grads.items()}}

    assert_outputs_close(run(layer), run(want_layer), want_layer.dtype, what)


def check_op(backend, oracle, name, rng, dtype, small=False):
    """The non-recurrent kernel(s) ``name`` (one of OPS) of ``backend`` against ``oracle``;
    ``small``: tiny sizes (the simulator)."""
    dev = lambda a: backend.asarray(a, a.dtype)  # noqa: E731
    host = backend.to_host
    rtol = RTOL[np.dtype(dtype)]
    what = f"{backend.NAME} {name} {np.dtype(dtype).name}"
    with backend_config(backend, POISON_OUTPUTS=True):
        if name == "softmax_cross_entropy":
            N, V = (5, 37) if small else (37, 301)
            logits = (3 * rng.standard_normal((N, V))).astype(dtype)
            targets = rng.integers(0, V, N)
            targets[::5] = -1
            want_d = np.empty_like(logits)
            want = oracle.softmax_cross_entropy(oracle.asarray(logits, dtype), targets, want_d, 0.5)
            d = backend.zeros((N, V), dtype)
            got = backend.softmax_cross_entropy(dev(logits), backend.asarray(targets, np.int64), d, 0.5)
            assert abs(got - want) <= rtol * abs(want), f"{what}: loss {got} against {want}"
            assert_close(host(d), want_d, dtype, f"{what}: dlogits")
        elif name == "embedding":
            V, E, ids_shape = (7, 5, (3, 4)) if small else (50, 17, (9, 7))
            weight = rng.standard_normal((V, E)).astype(dtype)
            ids = rng.integers(0, V, ids_shape)
            dout = rng.standard_normal(ids_shape + (E,)).astype(dtype)
            dw0 = rng.standard_normal((V, E)).astype(dtype)
            assert_close(host(backend.embedding_forward(dev(weight), backend.asarray(ids, np.int64))),
                         oracle.embedding_forward(weight, ids), dtype, f"{what}: forward")
            got = dev(dw0)
            backend.embedding_backward(got, backend.asarray(ids, np.int64), dev(dout))
            want = dw0.copy()
            oracle.embedding_backward(want, ids, dout)
            assert_close(host(got), want, dtype, f"{what}: backward")
        elif name == "sgd":
            shape = (4, 9) if small else (33, 65)
            param, grad, buf = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
            got = [dev(param), dev(buf)]
            want = [param.copy(), buf.copy()]
            for first in (True, False):
                backend.sgd_step(got[0], dev(grad), got[1], 0.1, 0.9, 0.01, True, first)
                oracle.sgd_step(want[0], grad, want[1], 0.1, 0.9, 0.01, True, first)
            for part, a, b in zip(("param", "momentum"), got, want):
                assert_close(host(a), b, dtype, f"{what}: {part}")
        elif name == "adam":
            n = 40 if small else 1000
            param, grad, m = (rng.standard_normal(n).astype(dtype) for _ in range(3))
            v = rng.random(n).astype(dtype)
            got = [dev(param), dev(m), dev(v)]
            want = [param.copy(), m.copy(), v.copy()]
            for step in (1, 2, 3):
                backend.adam_step(got[0], dev(grad), got[1], got[2], 1e-2, 0.9, 0.999, 1e-8, 0.01, step)
                oracle.adam_step(want[0], grad, want[1], want[2], 1e-2, 0.9, 0.999, 1e-8, 0.01, step)
            for part, a, b in zip(("param", "m", "v"), got, want):
                assert_close(host(a), b, dtype, f"{what}: {part}")
        elif name == "sum_of_squares+scale_":
            shapes = [(3, 7), (41,), (2, 2, 2)] if small else [(300, 7), (1001,), (3, 4, 5)]
            arrays = [rng.standard_normal(s).astype(dtype) for s in shapes]
            want = oracle.sum_of_squares(arrays)
            got = backend.sum_of_squares([dev(a) for a in arrays])
            assert abs(got - want) <= rtol * want, f"{what}: sum of squares {got} against {want}"
            got = [dev(a) for a in arrays]
            backend.scale_(got, 0.37)
            oracle.scale_(arrays, 0.37)
            for k, (a, b) in enumerate(zip(got, arrays)):
                assert_close(host(a), b, dtype, f"{what}: scale_ [{k}]")
        else:
            raise ValueError(f"unknown op check {name!r}; one of {OPS}")
