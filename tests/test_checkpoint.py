"""Checkpoints: an interrupted and resumed run ends with exactly the weights of an uninterrupted
one (TBPTT ring buffer, carried state, dropout RNG, Adam state, schedule); atomic writes; clear
errors for missing, corrupted and foreign files."""

import json
import os
import signal
import zipfile

import numpy as np
import pytest

import bptt
from bptt import checkpoint, checkpoint_file
from bptt.checkpoint import CheckpointError


@pytest.fixture(autouse=True)
def reference_backend():
    with bptt.use_backend("reference"):
        yield


def lm_trainer(seed=0, **kw):
    model = bptt.LanguageModel(9, 4, 5, num_layers=2, cell="lstm", dropout=0.3, dtype=np.float64, seed=seed)
    return bptt.Trainer(model, bptt.Adam(0.02), clip_norm=0.5, schedule=bptt.StepDecay(0.5, 1, 1), **kw)


def assert_same_weights(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)


@pytest.mark.parametrize("k1, k2, stop_at", [(4, 7, 7), (4, 7, 11), (3, 3, 4), (None, None, 1)])
def test_resume_gives_the_same_weights_as_uninterrupted_run(tmp_path, k1, k2, stop_at):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 9, 2 * 20 + 1)              # 19 steps per epoch
    mask = rng.random(len(tokens)) < 0.1                  # document starts
    full = lm_trainer(k1=k1, k2=k2)
    full.fit(tokens, 2, epochs=3, reset_mask=mask)

    first = lm_trainer(k1=k1, k2=k2)
    first.fit(tokens, 2, epochs=3, max_steps=stop_at, reset_mask=mask)
    assert first.step == stop_at
    path = tmp_path / "run.npz"
    first.save_checkpoint(path, meta={"vocab": ["a", "b"], "note": "x"})
    del first
    resumed = bptt.Trainer.from_checkpoint(path)
    assert resumed.meta == {"vocab": ["a", "b"], "note": "x"}
    assert resumed.step == stop_at and (resumed.k1, resumed.k2) == (k1, k2)
    mid_epoch = resumed.position is not None
    assert mid_epoch == (k1 is not None)
    if k1 is not None and k2 > k1:
        assert len(resumed.position.ring) >= 1            # the overlap buffer was saved
    resumed.fit(tokens, 2, epochs=3, reset_mask=mask)
    assert resumed.step == full.step
    assert_same_weights(resumed, full)
    np.testing.assert_array_equal(resumed.history["loss"], full.history["loss"])
    if not mid_epoch:
        return
    # without the saved ring buffer, state and RNG the result would differ: compare to a restart
    restarted = lm_trainer(k1=k1, k2=k2)
    restarted.fit(tokens, 2, epochs=3, max_steps=stop_at, reset_mask=mask)
    restarted.position = None
    restarted.fit(tokens, 2, epochs=3, reset_mask=mask)
    assert not np.array_equal(restarted.model.state_dict()["rnn.weight_hh_l0"],
                              full.model.state_dict()["rnn.weight_hh_l0"])


def test_resume_sequence_model_mid_sequence(tmp_path):
    rng = np.random.default_rng(2)
    inputs, targets = rng.standard_normal((5, 9, 2)), rng.standard_normal((5, 1))

    def make():
        m = bptt.SequenceModel(2, 4, 1, cell="gru", readout="last_step", dtype=np.float64, seed=3)
        return bptt.Trainer(m, bptt.SGD(0.1, momentum=0.9), k1=2, k2=5)

    full = make()
    full.fit((inputs, targets), 2, epochs=2)
    part = make()
    part.fit((inputs, targets), 2, epochs=2, max_steps=4)
    part.save_checkpoint(tmp_path / "c.npz")
    resumed = bptt.Trainer.from_checkpoint(tmp_path / "c.npz")
    resumed.fit((inputs, targets), 2, epochs=2)
    assert resumed.step == full.step == 6
    assert_same_weights(resumed, full)


def test_resume_with_other_data_is_refused(tmp_path):
    tokens = np.random.default_rng(4).integers(0, 9, 60)
    t = lm_trainer(k1=4)
    t.fit(tokens, 2, max_steps=2)
    t.save_checkpoint(tmp_path / "c.npz")
    resumed = bptt.Trainer.from_checkpoint(tmp_path / "c.npz")
    with pytest.raises(ValueError, match="same data"):
        resumed.fit(tokens[::-1].copy(), 2)
    with pytest.raises(ValueError, match="batch_size"):
        resumed.fit(tokens, 3)


def test_ctrl_c_during_an_update_stops_at_a_chunk_boundary(tmp_path, monkeypatch):
    """SIGINT arriving inside the optimizer step is held until the update and the new position
    are committed; the checkpoint written then resumes to the uninterrupted result."""
    tokens = np.random.default_rng(6).integers(0, 9, 2 * 20 + 1)
    full = lm_trainer(k1=4, k2=6)
    full.fit(tokens, 2, epochs=2)
    t = lm_trainer(k1=4, k2=6)
    real_step = t.optimizer.step
    calls = []

    def step_with_interrupt(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)       # arrives in the middle of the update
        real_step(*args)

    monkeypatch.setattr(t.optimizer, "step", step_with_interrupt)
    with pytest.raises(KeyboardInterrupt):
        t.fit(tokens, 2, epochs=2)
    assert t.step == 3 and t.position.offset == 12
    monkeypatch.undo()
    t.save_checkpoint(tmp_path / "c.npz")
    resumed = bptt.Trainer.from_checkpoint(tmp_path / "c.npz")
    resumed.fit(tokens, 2, epochs=2)
    assert_same_weights(resumed, full)


def test_load_model_gives_the_same_outputs(tmp_path):
    t = lm_trainer(k1=4)
    tokens = np.random.default_rng(5).integers(0, 9, 40)
    t.fit(tokens, 2)
    t.save_checkpoint(tmp_path / "c.npz", meta={"level": "char"})
    model, meta = checkpoint.load_model(tmp_path / "c.npz")
    assert meta == {"level": "char"} and model.config == t.model.config
    ids = tokens[:12].reshape(6, 2)
    np.testing.assert_array_equal(model.forward(ids, train=False)[0], t.model.forward(ids, train=False)[0])
    checkpoint.save_model(model, tmp_path / "m.npz")
    again, meta = checkpoint.load_model(tmp_path / "m.npz")
    assert meta is None
    np.testing.assert_array_equal(again.forward(ids, train=False)[0], t.model.forward(ids, train=False)[0])
    with pytest.raises(CheckpointError, match="model-only"):
        bptt.Trainer.from_checkpoint(tmp_path / "m.npz")


def test_write_is_atomic(tmp_path, monkeypatch):
    t = lm_trainer(k1=4)
    path = tmp_path / "c.npz"
    t.save_checkpoint(path)
    good = path.read_bytes()

    def failing_savez(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        t.save_checkpoint(path)
    assert path.read_bytes() == good                      # the old checkpoint is intact
    assert os.listdir(tmp_path) == ["c.npz"]             # and no temp file is left behind


def test_bad_files_raise_checkpoint_error_naming_the_file(tmp_path):
    t = lm_trainer(k1=4)
    good = tmp_path / "good.npz"
    t.save_checkpoint(good)
    data = good.read_bytes()
    cases = {
        "missing.npz": None,
        "truncated.npz": data[: len(data) // 2],
        "garbage.npz": b"not a checkpoint at all" * 10,
        "flipped.npz": data[:200] + bytes(b ^ 0xFF for b in data[200:260]) + data[260:],
    }
    plain = tmp_path / "plain.npz"
    np.savez(plain, a=np.zeros(3))                        # an npz, but not ours
    cases["plain.npz"] = plain.read_bytes()
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        for load in (bptt.Trainer.from_checkpoint, checkpoint.load_model):
            with pytest.raises(CheckpointError, match=name):
                load(path)
    assert isinstance(CheckpointError("x"), ValueError)
    with zipfile.ZipFile(good) as z:
        assert "__header__.npy" in z.namelist()


def test_the_file_names_no_class():
    """Caches are stored by field name: no module path or class name anywhere in the header."""
    t = lm_trainer(k1=3, k2=7)
    t.fit(np.random.default_rng(8).integers(0, 9, 60), 2, max_steps=3)
    assert len(t.position.ring) >= 2
    arrays = {}
    header = json.dumps(checkpoint_file.flatten(t.state_dict(), "trainer", arrays))
    for word in ("bptt", "Cache", "Segment", "Position"):
        assert word not in header, word
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    assert any("/ring/" in k and k.endswith("/arrays/gates") for k in arrays)


def _version1_file(path, trainer):
    """A checkpoint as format version 1 wrote it (the model by type, config and arrays
    model/<name>; a trainer header of that version's layout)."""
    m = trainer.model
    header = {"format": checkpoint_file.FORMAT, "version": 1,
              "model": {"type": type(m).__name__, "config": m.config, "rng_state": m.rng.bit_generator.state},
              "optimizer": {"type": "Adam", "config": trainer.optimizer.config, "lr": 0.02, "steps": 0,
                            "buffers": {}},
              "schedule": trainer.schedule.state_dict(),
              "trainer": {"config": trainer.config, "base_lr": 0.02, "step": 0, "epoch": 0,
                          "history": trainer.history, "position": None},
              "meta": {"vocab": ["a"]}}
    checkpoint_file.write(path, header, {f"model/{k}": v for k, v in m.state_dict().items()})


def test_version_1_models_load_and_its_trainers_fail_in_one_line(tmp_path):
    t = lm_trainer(k1=4)
    path = tmp_path / "v1.npz"
    _version1_file(path, t)
    model, meta = checkpoint.load_model(path)
    assert meta == {"vocab": ["a"]}
    for name, w in t.model.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[name], w)
    with pytest.raises(CheckpointError) as e:
        bptt.Trainer.from_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and "v1.npz" in msg
    assert f"format version 1; this bptt resumes version {checkpoint.VERSION} only" in msg
    assert checkpoint.VERSION == 2


def test_an_unknown_version_fails_in_one_line_naming_both(tmp_path):
    t = lm_trainer(k1=4)
    path = tmp_path / "c.npz"
    t.save_checkpoint(path)
    header, arrays = checkpoint.read(path)
    header["version"] = 99
    checkpoint.write(path, header, arrays)
    for load in (bptt.Trainer.from_checkpoint, checkpoint.load_model):
        with pytest.raises(CheckpointError) as e:
            load(path)
        msg = str(e.value)
        assert "\n" not in msg
        assert "checkpoint format version 99; this bptt reads versions 1, 2 and writes version 2" in msg


def test_a_model_only_checkpoint_has_no_trainer(tmp_path):
    t = lm_trainer(k1=4)
    checkpoint.save_model(t.model, tmp_path / "m.npz")
    with pytest.raises(CheckpointError, match="model-only"):
        checkpoint.load_trainer(tmp_path / "m.npz")
    t.save_checkpoint(tmp_path / "t.npz")
    assert checkpoint.load_trainer(tmp_path / "t.npz").step == 0


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree


def test_state_dict_round_trip_continues_bit_equal():
    """state_dict -> load_state_dict into a fresh trainer (other seed, other settings) -> both
    continue to the same weights and history, bit for bit; the dict holds only host arrays
    and JSON-able values, and later training does not change it."""
    rng = np.random.default_rng(9)
    tokens = rng.integers(0, 9, 2 * 20 + 1)
    mask = rng.random(len(tokens)) < 0.1
    a = lm_trainer(k1=3, k2=7)
    a.meta = {"run": 1}
    a.fit(tokens, 2, epochs=3, max_steps=4, reset_mask=mask)
    sd = a.state_dict()
    assert len(sd["position"]["ring"]) >= 2 and sd["position"]["state"] is not None
    arrays = [x for x in _leaves(sd) if isinstance(x, np.ndarray)]
    assert arrays and all(type(x) is np.ndarray for x in arrays)
    json.dumps([x for x in _leaves(sd) if not isinstance(x, np.ndarray)])
    snapshot = [x.copy() for x in arrays]

    b = lm_trainer(seed=7)                                   # full BPTT until loaded
    b.load_state_dict(sd)
    assert (b.k1, b.k2, b.step, b.meta) == (3, 7, 4, {"run": 1})
    a.fit(tokens, 2, epochs=3, reset_mask=mask)
    b.fit(tokens, 2, epochs=3, reset_mask=mask)
    assert_same_weights(b, a)
    np.testing.assert_array_equal(b.history["loss"], a.history["loss"])
    assert all(np.array_equal(x, y) for x, y in zip(arrays, snapshot))   # sd was not aliased
    c = lm_trainer(seed=8)
    c.load_state_dict(sd)                                    # the same dict loads again
    c.fit(tokens, 2, epochs=3, reset_mask=mask)
    assert_same_weights(c, a)


def test_state_dict_at_an_epoch_boundary():
    tokens = np.random.default_rng(10).integers(0, 9, 41)
    a = lm_trainer(k1=4)
    a.fit(tokens, 2, epochs=1)
    sd = a.state_dict()
    assert sd["position"] is None and sd["epoch"] == 1
    b = lm_trainer(k1=4, seed=3)
    b.load_state_dict(sd)
    a.fit(tokens, 2, epochs=2)
    b.fit(tokens, 2, epochs=2)
    assert_same_weights(b, a)


def test_load_state_dict_refuses_another_model_or_optimizer_and_changes_nothing():
    a = lm_trainer(k1=3, k2=5)
    a.fit(np.random.default_rng(11).integers(0, 9, 41), 2, max_steps=3)
    sd = a.state_dict()
    other = bptt.Trainer(bptt.LanguageModel(9, 4, 6, num_layers=2, dtype=np.float64, seed=0), bptt.Adam(0.02))
    before = other.model.state_dict()
    with pytest.raises(ValueError, match="config"):
        other.load_state_dict(sd)
    sgd = bptt.Trainer(lm_trainer().model, bptt.SGD(0.1))
    with pytest.raises(ValueError, match="Adam optimizer, not a SGD"):
        sgd.load_state_dict(sd)
    assert other.step == 0 and other.position is None and other.k1 is None
    for name, w in before.items():
        np.testing.assert_array_equal(other.model.state_dict()[name], w)
