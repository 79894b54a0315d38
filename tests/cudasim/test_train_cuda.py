"""A few TBPTT training steps of a tiny language model on the cuda backend (simulator) end
where the same steps end on the reference backend: float64, losses and every parameter."""

import numpy as np
import pytest

import bptt
import bptt.models
from helpers import assert_close


def _train(backend_name, data, cell):
    with bptt.use_backend(backend_name) as backend:
        model = bptt.LanguageModel(11, 4, 5, num_layers=1, cell=cell, dtype=np.float64, seed=3)
        trainer = bptt.Trainer(model, bptt.Adam(lr=1e-2), k1=3, k2=5, clip_norm=0.5)
        history = trainer.fit(data, batch_size=2, max_steps=3)
        params = {k: backend.to_host(v) for k, v in model.params.items()}
    return history, params


@pytest.mark.parametrize("fold", [False, True], ids=["plain", "folded_embedding"])
@pytest.mark.parametrize("cell", ["lstm"])
def test_tbptt_training_matches_reference(cuda, cell, fold, monkeypatch):
    if not all(hasattr(bptt, n) for n in ("LanguageModel", "Trainer", "Adam")):
        pytest.skip("bptt.LanguageModel / Trainer / Adam not available")
    # T*B = 6 rows against V = 11: the model folds its embedding only when told to
    monkeypatch.setattr(bptt.models, "EMBEDDING_FOLD_ROWS_PER_WORD", 0.5 if fold else 4)
    folds, decide = [], bptt.models.LanguageModel._folds_embedding
    monkeypatch.setattr(bptt.models.LanguageModel, "_folds_embedding",
                        lambda self, *a: folds.append(decide(self, *a)) or folds[-1])
    data = np.random.default_rng(11).integers(0, 11, 40)
    want_hist, want = _train("reference", data, cell)
    got_hist, got = _train("cuda", data, cell)
    np.testing.assert_allclose(got_hist["loss"], want_hist["loss"], rtol=1e-10)
    assert folds and all(f == fold for f in folds)
    assert got.keys() == want.keys()
    for k in want:
        assert_close(got[k], want[k], np.float64, k)
