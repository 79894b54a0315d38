"""Learning-rate schedules driven by epochs and by validation results: the lr of every epoch for a
scripted validation curve against the definitions (Zaremba et al.'s step decay, PyTorch
word_language_model's divide-on-plateau rule), early stopping after ``patience`` validations
without improvement, and the schedules' state through state_dict."""

import json
import math

import numpy as np
import pytest

import bptt
from bptt.optim import ConstantLR, PlateauDecay, StepDecay, schedule_from_state_dict


@pytest.fixture(autouse=True)
def reference_backend():
    with bptt.use_backend("reference"):
        yield


def test_zaremba_decay_definition():
    """--lr-decay F --lr-decay-after E: epoch e (counted from 1) runs at base * F ** max(0, e - E);
    Zaremba et al.: "after 4 epochs, decrease the lr by a factor of 2 each epoch"."""
    for factor, after in ((0.5, 4), (0.8, 2), (0.5, 0), (1.0, 3)):
        s = StepDecay(factor=factor, every=1, start=after)
        got = [s(1.0, e - 1) for e in range(1, 11)]          # the trainer passes 0-based epochs
        assert got == [factor ** max(0, e - after) for e in range(1, 11)]
    zaremba = StepDecay(0.5, 1, 4)
    assert [zaremba(1.0, e) for e in range(7)] == [1, 1, 1, 1, 0.5, 0.25, 0.125]


def test_plateau_definition_on_a_scripted_curve():
    """word_language_model: after a validation not below the best so far, lr /= F (ties and NaN
    are not improvements; the first finite value is)."""
    curve = [3.0, 2.5, 2.6, 2.4, 2.4, math.nan, 2.0, 2.1]
    s = PlateauDecay(4.0)
    lrs, best = [], None
    expected, n = [], 0
    for loss in curve:
        s.on_validation(loss)
        lrs.append(s(20.0, 0))
        if math.isfinite(loss) and (best is None or loss < best):
            best = loss
        else:
            n += 1
        expected.append(20.0 / 4.0 ** n)
    assert lrs == expected == [20, 20, 5, 5, 1.25, 0.3125, 0.3125, 0.078125]
    assert s.state == {"best": 2.0, "reductions": 4}
    # the state travels with the schedule (JSON), so a resumed run keeps its lr and best
    s2 = schedule_from_state_dict(json.loads(json.dumps(s.state_dict())))
    assert type(s2) is PlateauDecay and s2.state == s.state and s2(20.0, 3) == s(20.0, 3)
    s2.on_validation(2.05)
    assert s2(20.0, 0) == 20.0 / 4.0 ** 5
    with pytest.raises(ValueError, match="divide_by"):
        PlateauDecay(0.5)
    with pytest.raises(ValueError, match="divide_by"):
        PlateauDecay(math.inf)
    with pytest.raises(ValueError, match="no state"):
        schedule_from_state_dict({"type": "ConstantLR", "config": {}, "state": {"best": 1.0}})
    assert "state" not in ConstantLR().state_dict() and "state" not in StepDecay().state_dict()


def scripted_trainer(curve, schedule=None, lr=1.0):
    """A trainer on a tiny model whose validation losses are ``curve``, in order (evaluate() is
    replaced; the training itself is real). 12 steps per epoch, k1=4: 3 updates an epoch."""
    model = bptt.LanguageModel(5, 3, 4, cell="rnn_tanh", dtype=np.float64, seed=1)
    trainer = bptt.Trainer(model, bptt.SGD(lr), k1=4, schedule=schedule)
    losses = iter(curve)
    trainer.evaluate = lambda data, batch_size, reset_mask=None: {
        "loss": next(losses), "perplexity": 1.0, "bits_per_token": 1.0}
    tokens = np.random.default_rng(2).integers(0, 5, 2 * 13)
    return trainer, tokens


def epoch_lrs(trainer):
    """The lr of each epoch's updates (one value per epoch: the lr never changes inside one here)."""
    h = trainer.history
    per_epoch = {}
    for e, lr in zip(h["epoch"], h["lr"]):
        per_epoch.setdefault(e, set()).add(lr)
    assert all(len(v) == 1 for v in per_epoch.values())
    return [per_epoch[e].pop() for e in sorted(per_epoch)]


def test_trainer_applies_the_plateau_rule_per_epoch():
    curve = [3.0, 2.0, 2.5, 1.5, 1.5, 1.6, 1.0]
    trainer, tokens = scripted_trainer(curve, PlateauDecay(2.0), lr=8.0)
    trainer.fit(tokens, 2, epochs=7, validation=tokens)
    # validation after epoch e decides the lr of epoch e + 1
    assert epoch_lrs(trainer) == [8, 8, 8, 4, 4, 2, 1]
    assert trainer.history["val_loss"] == curve and trainer.history["val_step"] == [3, 6, 9, 12, 15, 18, 21]
    assert trainer.validation_state == {"best_loss": 1.0, "best_step": 21, "count": 7, "step": 21, "since_best": 0}
    assert trainer.history["val_lr"] == [8, 8, 8, 4, 4, 2, 1]      # the lr of the updates before each


def test_trainer_applies_the_decay_rule_per_epoch():
    trainer, tokens = scripted_trainer([5.0] * 6, StepDecay(0.5, 1, 2), lr=1.0)
    trainer.fit(tokens, 2, epochs=6, validation=tokens)
    assert epoch_lrs(trainer) == [1, 1, 0.5, 0.25, 0.125, 0.0625]    # validation has no say
    assert trainer.validation_state["since_best"] == 5 and not trainer.stopped_early


def test_patience_stops_after_p_validations_without_improvement():
    curve = [3.0, 2.0, 2.1, 2.0, 1.9, 2.2, 2.3, 2.4, 0.1]
    trainer, tokens = scripted_trainer(curve, PlateauDecay(4.0))
    events = []
    trainer.fit(tokens, 2, epochs=20, validation=tokens, patience=3, callbacks=[events.append])
    # 2.1, 2.0 (a tie) do not improve on 2.0; 1.9 does; then 2.2, 2.3, 2.4: three in a row -> stop
    assert trainer.stopped_early and trainer.history["val_loss"] == curve[:8]
    assert trainer.epoch == 8 and trainer.step == 24 and trainer.position is None   # the epoch completed
    assert trainer.validation_state["best_loss"] == 1.9 and trainer.validation_state["since_best"] == 3
    assert epoch_lrs(trainer) == [1, 1, 1, 1 / 4, 1 / 16, 1 / 16, 1 / 64, 1 / 256]
    assert events[-1]["val_loss"] == 2.4 and events[-1]["step"] == 24
    # the stop is part of the state: fit again (or after resuming) with that patience does nothing
    trainer.fit(tokens, 2, epochs=20, validation=tokens, patience=3)
    assert trainer.step == 24 and trainer.stopped_early
    resumed = bptt.Trainer(trainer.model, bptt.SGD(1.0), k1=4)
    resumed.load_state_dict(trainer.state_dict())
    resumed.fit(tokens, 2, epochs=20, validation=tokens, patience=3)
    assert resumed.step == 24 and resumed.stopped_early
    # a larger patience goes on from there
    trainer.fit(tokens, 2, epochs=9, validation=tokens, patience=4)
    assert trainer.step == 27 and not trainer.stopped_early and trainer.validation_state["best_loss"] == 0.1


def test_patience_inside_an_epoch_with_eval_every():
    curve = [2.0, 2.5, 2.6, 1.0]
    trainer, tokens = scripted_trainer(curve)
    trainer.fit(tokens, 2, epochs=5, validation=tokens, eval_every=2, patience=2)
    # validations after updates 2, 3 (epoch end), 4: the third is the second without improvement
    assert trainer.history["val_step"] == [2, 3, 4] and trainer.stopped_early
    assert trainer.step == 4 and trainer.epoch == 1 and trainer.position is not None
