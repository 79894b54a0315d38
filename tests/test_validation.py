"""Validation during training (Trainer.fit(validation=..., eval_every=..., patience=...)): it
leaves the training trajectory exactly as it is, its results reach the events and the history,
and what it decides (best value, plateau and patience counters, the schedule's state) resumes
from a checkpoint exactly as an uninterrupted run continues."""

import math

import numpy as np
import pytest

import bptt


def lm_trainer(schedule=None, seed=3):
    """Dropout (draws from the model's RNG), two levels, TBPTT(3, 7): a ring buffer of older
    chunks' caches and a carried state between updates."""
    model = bptt.LanguageModel(11, 5, 6, num_layers=2, cell="lstm", dropout=0.25, dtype=np.float64, seed=seed)
    return bptt.Trainer(model, bptt.Adam(0.03), k1=3, k2=7, clip_norm=1.0, schedule=schedule)


def data():
    rng = np.random.default_rng(4)
    return rng.integers(0, 11, 2 * 23 + 1), rng.integers(0, 11, 41)    # 22 steps/epoch: 8 updates


def weights(trainer):
    return trainer.model.state_dict()


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb)
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def test_validation_does_not_change_the_trajectory(backend):
    train, valid = data()
    plain, checked = lm_trainer(), lm_trainer()
    plain_w, checked_w = [], []
    plain.fit(train, 2, epochs=3, callbacks=[lambda e: plain_w.append(weights(plain))])
    checked.fit(train, 2, epochs=3, validation=valid, eval_every=2, validation_batch_size=3,
                callbacks=[lambda e: checked_w.append(weights(checked))])
    assert len(plain_w) == len(checked_w) == 24
    for a, b in zip(plain_w, checked_w):                 # after every update, bit for bit
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert plain.history["loss"] == checked.history["loss"]
    assert plain.model.rng.bit_generator.state == checked.model.rng.bit_generator.state
    # validations after updates 2, 4, 6, 8 (8: the epoch's end), 10, ..., 24
    assert checked.history["val_step"] == list(range(2, 25, 2))
    assert "val_loss" not in plain.history


def test_events_carry_the_validation_results_only_after_a_validation():
    train, valid = data()
    with bptt.use_backend("reference"):
        trainer = lm_trainer()
        events = []
        trainer.fit(train, 2, epochs=2, validation=valid, eval_every=3, callbacks=[events.append])
        validated = [e["step"] for e in events if "val_loss" in e]
        assert validated == [3, 6, 8, 9, 12, 15, 16]      # every 3rd update and each epoch's last (8, 16)
        for e in events:
            keys = {"val_loss", "val_perplexity", "val_bits_per_token"}
            assert keys <= set(e) if e["step"] in validated else not keys & set(e)
            assert e["update_s"] >= 0
        e = events[2]
        assert isinstance(e["val_loss"], float) and e["val_perplexity"] == pytest.approx(math.exp(e["val_loss"]))
        assert e["val_bits_per_token"] == pytest.approx(e["val_loss"] / math.log(2))
        # the same figures as evaluating the model at that point
        again = lm_trainer()
        again.fit(train, 2, epochs=1, max_steps=3)
        assert again.evaluate(valid, 2)["loss"] == e["val_loss"]
        assert trainer.history["val_loss"] == [e["val_loss"] for e in events if "val_loss" in e]
        assert trainer.history["val_epoch"] == [0, 0, 0, 1, 1, 1, 1]
        with pytest.raises(ValueError, match="validation"):
            trainer.fit(train, 2, epochs=3, eval_every=2)
        with pytest.raises(ValueError, match="eval_every"):
            trainer.fit(train, 2, epochs=3, validation=valid, eval_every=0)


@pytest.mark.parametrize("stop_at", [5, 6, 8, 13])
def test_resumed_run_validates_and_decides_as_an_uninterrupted_one(tmp_path, stop_at):
    """Interrupted after update ``stop_at`` (5: between validations; 6: right after one; 8: after
    the epoch's last update), saved to a file and resumed: the same weights, lr, validation
    curve, best value, counters and early stop as a run never interrupted."""
    train, valid = data()
    kw = dict(epochs=6, validation=valid, eval_every=3, patience=4)
    with bptt.use_backend("reference"):
        full = lm_trainer(bptt.PlateauDecay(2.0))
        full_lrs = []
        full.fit(train, 2, callbacks=[lambda e: full_lrs.append(e["lr"])], **kw)

        first = lm_trainer(bptt.PlateauDecay(2.0))
        first.fit(train, 2, max_steps=stop_at, **kw)
        path = tmp_path / "run.npz"
        first.save_checkpoint(path)
        resumed = bptt.Trainer.from_checkpoint(path)
        assert resumed.schedule.state == first.schedule.state
        assert resumed.validation_state == first.validation_state
        lrs = list(first.history["lr"])
        resumed.fit(train, 2, callbacks=[lambda e: lrs.append(e["lr"])], **kw)

    assert_same_weights(resumed, full)
    assert lrs == full_lrs and resumed.optimizer.lr == full.optimizer.lr
    for key in ("val_step", "val_loss", "val_lr", "loss"):
        assert resumed.history[key] == full.history[key], key
    assert resumed.validation_state == full.validation_state
    assert resumed.schedule.state == full.schedule.state
    assert resumed.stopped_early == full.stopped_early and resumed.step == full.step
    assert full.schedule.state["reductions"] > 0          # the plateau rule acted in this run


def test_task_model_validation():
    rng = np.random.default_rng(5)
    inputs = rng.standard_normal((24, 5, 2))
    targets = (inputs[:, :, 0] > 0).astype(np.int64)
    with bptt.use_backend("reference"):
        model = bptt.SequenceModel(2, 6, 2, cell="gru", dtype=np.float64, seed=6)
        trainer = bptt.Trainer(model, bptt.Adam(0.05))
        events = []
        trainer.fit((inputs[:16], targets[:16]), 4, epochs=2, validation=(inputs[16:], targets[16:]),
                    eval_every=3, callbacks=[events.append])
        assert [e["step"] for e in events if "val_loss" in e] == [3, 4, 6, 8]
        e = events[2]
        assert e["val_perplexity"] == pytest.approx(math.exp(e["val_loss"])) and 0 <= e["val_accuracy"] <= 1
        # MSE targets: a loss, no perplexity
        model = bptt.SequenceModel(2, 6, 1, cell="gru", dtype=np.float64, seed=6)
        trainer = bptt.Trainer(model, bptt.Adam(0.05))
        events = []
        y = np.cumsum(inputs[:, :, :1], axis=1)                              # float [N, T, 1]
        trainer.fit((inputs[:16], y[:16]), 4, epochs=1, validation=(inputs[16:], y[16:]), callbacks=[events.append])
        assert events[-1]["val_loss"] > 0 and math.isnan(events[-1]["val_perplexity"])
