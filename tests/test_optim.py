"""Optimizers, clipping and schedules against torch.optim / torch.nn.utils (float64)."""

import json

import numpy as np
import pytest

import bptt
from bptt.optim import (ConstantLR, ExponentialDecay, StepDecay, clip_grad_norm_, optimizer_from_state_dict,
                        schedule_from_state_dict)

torch = pytest.importorskip("torch")

SHAPES = {"w": (4, 3), "b": (5,), "e": (2, 3, 2)}


def _run_pair(backend, make_ours, make_torch, steps=25, seed=0):
    """Feed the same random gradients to both optimizers for ``steps`` steps; return both params."""
    rng = np.random.default_rng(seed)
    init = {n: rng.standard_normal(s) for n, s in SHAPES.items()}
    params = {n: backend.asarray(a, np.float64) for n, a in init.items()}
    grads = {n: backend.zeros(a.shape, np.float64) for n, a in init.items()}
    tparams = {n: torch.tensor(a, requires_grad=True) for n, a in init.items()}
    ours, theirs = make_ours(), make_torch(list(tparams.values()))
    for _ in range(steps):
        for n, s in SHAPES.items():
            g = rng.standard_normal(s)
            grads[n][...] = backend.asarray(g, np.float64)
            tparams[n].grad = torch.tensor(g)
        ours.step(params, grads, backend)
        theirs.step()
    return ({n: backend.to_host(p) for n, p in params.items()},
            {n: p.detach().numpy() for n, p in tparams.items()}, ours)


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                dict(momentum=0.5, weight_decay=0.01), dict(weight_decay=0.1)])
def test_sgd_matches_torch(backend, kw):
    ours, ref, _ = _run_pair(backend, lambda: bptt.SGD(0.05, **kw), lambda ps: torch.optim.SGD(ps, lr=0.05, **kw))
    for n in SHAPES:
        np.testing.assert_allclose(ours[n], ref[n], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kw", [dict(), dict(betas=(0.8, 0.95), eps=1e-6), dict(weight_decay=0.05)])
def test_adam_matches_torch(backend, kw):
    ours, ref, opt = _run_pair(backend, lambda: bptt.Adam(0.01, **kw), lambda ps: torch.optim.Adam(ps, lr=0.01, **kw))
    assert opt.steps == 25
    for n in SHAPES:
        np.testing.assert_allclose(ours[n], ref[n], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("make", [lambda: bptt.SGD(0.1, momentum=0.9), lambda: bptt.Adam(0.01)])
def test_optimizer_state_dict_round_trip_continues_identically(backend, make):
    rng = np.random.default_rng(1)
    params = {n: backend.asarray(rng.standard_normal(s), np.float64) for n, s in SHAPES.items()}
    grads = [{n: backend.asarray(rng.standard_normal(s), np.float64) for n, s in SHAPES.items()} for _ in range(6)]
    a = make()
    for g in grads[:3]:
        a.step(params, g, backend)
    sd = a.state_dict(backend)
    json.dumps({k: v for k, v in sd.items() if k != "buffers"})           # the header part is JSON-able
    b = optimizer_from_state_dict(sd, backend)
    pa = {n: p.copy() for n, p in params.items()}
    pb = {n: p.copy() for n, p in params.items()}
    for g in grads[3:]:
        a.step(pa, g, backend)
        b.step(pb, g, backend)
    for n in SHAPES:
        np.testing.assert_array_equal(backend.to_host(pa[n]), backend.to_host(pb[n]))


@pytest.mark.parametrize("max_norm", [0.3, 1e3])
def test_clip_matches_torch_clip_grad_norm(backend, max_norm):
    rng = np.random.default_rng(2)
    host = [rng.standard_normal(s) for s in SHAPES.values()]
    grads = [backend.asarray(g, np.float64) for g in host]
    tps = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in host]
    for p, g in zip(tps, host):
        p.grad = torch.tensor(g)
    total = clip_grad_norm_(grads, max_norm, backend)
    ref_total = torch.nn.utils.clip_grad_norm_(tps, max_norm)
    assert total == pytest.approx(float(ref_total), rel=1e-14)
    for g, p in zip(grads, tps):
        np.testing.assert_allclose(backend.to_host(g), p.grad.numpy(), rtol=1e-14, atol=0)
    if max_norm < total:
        assert np.sqrt(sum((backend.to_host(g) ** 2).sum() for g in grads)) == pytest.approx(max_norm, rel=1e-5)


def test_optimizer_argument_errors():
    with pytest.raises(ValueError, match="lr"):
        bptt.SGD(-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        bptt.SGD(0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        bptt.Adam(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="momentum"):
        bptt.SGD(0.1, momentum=float("nan"))


def test_schedules():
    zaremba = StepDecay(factor=0.5, every=1, start=4)
    assert [zaremba(1.0, e) for e in range(8)] == [1, 1, 1, 1, 0.5, 0.25, 0.125, 0.0625]
    every2 = StepDecay(factor=0.1, every=2, start=0)
    assert [every2(1.0, e) for e in range(4)] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    assert [ExponentialDecay(0.9)(2.0, e) for e in range(3)] == pytest.approx([2.0, 1.8, 1.62])
    assert ConstantLR()(0.3, 7) == 0.3
    for s in (zaremba, ExponentialDecay(0.9), ConstantLR()):
        sd = json.loads(json.dumps(s.state_dict()))
        s2 = schedule_from_state_dict(sd)
        assert type(s2) is type(s) and [s2(1.0, e) for e in range(6)] == [s(1.0, e) for e in range(6)]
    with pytest.raises(ValueError, match="factor"):
        StepDecay(factor=0.0)
    with pytest.raises(ValueError, match="every"):
        StepDecay(every=0)
    with pytest.raises(ValueError, match="gamma"):
        ExponentialDecay(1.5)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_from_state_dict({"type": "Cosine", "config": {}})
