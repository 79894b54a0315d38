"""A trainer saved inside a TBPTT window (k2 > k1: the ring buffer of chunk caches is not empty)
on one backend resumes on another and ends with the weights of an uninterrupted run (float64,
max relative error <= 1e-10), in both directions."""

import importlib

import numpy as np
import pytest

import bptt
from helpers import rel_err

RTOL = 1e-10
PAIRS = [("cpu", "reference"), ("reference", "cpu")]


@pytest.fixture(autouse=True)
def _needs_both_backends():
    for name in ("reference", "cpu"):
        try:
            importlib.import_module(f"bptt_kernels.{name}")
        except Exception as e:
            pytest.skip(f"bptt_kernels.{name} does not import: {type(e).__name__}: {e}")


def assert_weights_close(actual, expected):
    sa, sb = actual.model.state_dict(), expected.model.state_dict()
    assert set(sa) == set(sb)
    errs = {name: rel_err(sa[name], sb[name]) for name in sb}
    print(f"largest relative error after the cross-backend resume: {max(errs.values()):.2e}")
    for name, err in errs.items():
        assert err <= RTOL, f"{name}: relative error {err:.3e} > {RTOL:g}"


LM_CASES = {
    # 2-level LSTM with dropout between levels and around the stack (masks in the caches)
    "lstm-dropout": dict(V=9, E=4, H=5, L=2, cell="lstm", dropout=0.3, k1=3, k2=7, B=2, n=2 * 20 + 1,
                         resets=True),
    # no dropout and a small vocabulary: the embedding is folded into level 0's input
    # projection, so the ring holds projected caches (x is x W_ih^T)
    "gru-folded": dict(V=3, E=4, H=5, L=1, cell="gru", dropout=0.0, k1=6, k2=10, B=2, n=2 * 40 + 1,
                       resets=False),
}


def lm_trainer(c):
    model = bptt.LanguageModel(c["V"], c["E"], c["H"], num_layers=c["L"], cell=c["cell"], dropout=c["dropout"],
                               dtype=np.float64, seed=5)
    return bptt.Trainer(model, bptt.Adam(0.02), k1=c["k1"], k2=c["k2"], clip_norm=0.5,
                        schedule=bptt.StepDecay(0.5, 1, 1))


@pytest.mark.parametrize("saved_on, resumed_on", PAIRS, ids=lambda n: n)
@pytest.mark.parametrize("case", sorted(LM_CASES))
def test_language_model_resumes_on_the_other_backend(tmp_path, saved_on, resumed_on, case):
    c = LM_CASES[case]
    rng = np.random.default_rng(11)
    tokens = rng.integers(0, c["V"], c["n"])
    mask = (rng.random(len(tokens)) < 0.1) if c["resets"] else None    # document starts: keep masks in the ring
    with bptt.use_backend(saved_on):
        full = lm_trainer(c)
        full.fit(tokens, c["B"], epochs=2, reset_mask=mask)
        first = lm_trainer(c)
        first.fit(tokens, c["B"], epochs=2, max_steps=4, reset_mask=mask)
        assert first.position is not None and len(first.position.ring) >= 1
        if case == "gru-folded":
            assert any(seg.cache.stack.layers[0].projected for seg in first.position.ring)
        first.save_checkpoint(tmp_path / "c.npz")
    with bptt.use_backend(resumed_on):
        resumed = bptt.Trainer.from_checkpoint(tmp_path / "c.npz")
        assert resumed.backend.NAME == resumed_on
        assert len(resumed.position.ring) == len(first.position.ring)
        resumed.fit(tokens, c["B"], epochs=2, reset_mask=mask)
        uninterrupted_here = lm_trainer(c)
        uninterrupted_here.fit(tokens, c["B"], epochs=2, reset_mask=mask)
    assert resumed.step == full.step
    assert_weights_close(resumed, full)
    assert_weights_close(resumed, uninterrupted_here)


@pytest.mark.parametrize("saved_on, resumed_on", PAIRS, ids=lambda n: n)
def test_sequence_model_resumes_on_the_other_backend(tmp_path, saved_on, resumed_on):
    rng = np.random.default_rng(12)
    inputs, targets = rng.standard_normal((4, 11, 2)), rng.standard_normal((4, 11, 3))

    def make():
        m = bptt.SequenceModel(2, 4, 3, num_layers=2, cell="lstm", readout="every_step", dtype=np.float64, seed=3)
        return bptt.Trainer(m, bptt.SGD(0.1, momentum=0.9), k1=2, k2=5)

    with bptt.use_backend(saved_on):
        full = make()
        full.fit((inputs, targets), 2, epochs=2)
        part = make()
        part.fit((inputs, targets), 2, epochs=2, max_steps=3)
        assert len(part.position.ring) >= 2
        part.save_checkpoint(tmp_path / "c.npz")
    with bptt.use_backend(resumed_on):
        resumed = bptt.Trainer.from_checkpoint(tmp_path / "c.npz")
        resumed.fit((inputs, targets), 2, epochs=2)
    assert resumed.step == full.step
    assert_weights_close(resumed, full)
