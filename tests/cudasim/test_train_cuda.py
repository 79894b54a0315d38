"""A few TBPTT training steps of a tiny language model on the cuda backend (simulator) end
where the same steps end on the reference backend: float64, losses and every parameter."""

import numpy as np
import pytest

import bptt


def _train(backend_name, data, cell):
    with bptt.use_backend(backend_name) as backend:
        model = bptt.LanguageModel(11, 4, 5, num_layers=1, cell=cell, dtype=np.float64, seed=3)
        trainer = bptt.Trainer(model, bptt.Adam(lr=1e-2), k1=3, k2=5, clip_norm=0.5)
        history = trainer.fit(data, batch_size=2, max_steps=3)
        params = {k: backend.to_host(v) for k, v in model.params.items()}
    return history, params


@pytest.mark.parametrize("cell", ["lstm"])
def test_tbptt_training_matches_reference(cuda, cell):
    if not all(hasattr(bptt, n) for n in ("LanguageModel", "Trainer", "Adam")):
        pytest.skip("bptt.LanguageModel / Trainer / Adam not available")
    data = np.random.default_rng(11).integers(0, 11, 40)
    want_hist, want = _train("reference", data, cell)
    got_hist, got = _train("cuda", data, cell)
    np.testing.assert_allclose(got_hist["loss"], want_hist["loss"], rtol=1e-10)
    assert got.keys() == want.keys()
    for k in want:
        err = np.max(np.abs(got[k] - want[k])) / np.max(np.abs(want[k]))
        assert err <= 1e-10, f"{k}: relative error {err:.3e}"
