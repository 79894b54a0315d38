"""Variable-length sequences through SequenceModel, the trainer and evaluation; bidirectional
models' rules; the varlen task and its command line.

Oracles: PyTorch autograd (skipped without torch): pack_padded_sequence(enforce_sorted=False) ->
nn.LSTM/GRU/RNN -> pad_packed_sequence -> Linear, the last-step readout from torch's h_n (both
directions' concatenated when bidirectional), for outputs, final states and every gradient;
one SGD step of the trainer against torch's gradient of the same masked loss; evaluation
against each sequence cut to its own length and run alone. Besides: padded steps' inputs and
targets change nothing, errors name ``lengths``, TBPTT is refused with lengths and for
bidirectional models, checkpoints resume mid-epoch to the uninterrupted weights.
"""

import numpy as np
import pytest

import bptt
from bptt.cli import main
from bptt.models import SeqCache, model_from_dict, model_to_dict
from bptt.tasks import VARLEN_CLASSES, VARLEN_MIN_LENGTH, accuracy, make_task, predict, varlen_task
from bptt_kernels import CELLS
from helpers import assert_close
from test_bidirectional import as_parts, random_parts, torch_module
from test_lengths import _torch, make_lengths, torch    # torch: None when not installed

F64 = np.float64


def seq_model(cell="lstm", readout="last_step", bidirectional=False, I=3, H=4, O=3, L=1, seed=0):
    return bptt.SequenceModel(I, H, O, num_layers=L, cell=cell, readout=readout, dtype=F64, seed=seed,
                              bidirectional=bidirectional)


def torch_twin(model):
    """torch's nn.LSTM/GRU/RNN and nn.Linear holding ``model``'s weights (float64)."""
    t = _torch()
    module = torch_module(model.cell, model.input_size, model.hidden_size, model.num_layers, True, F64,
                          model.bidirectional)
    sd = model.state_dict()
    module.load_state_dict({k[len("rnn."):]: t.tensor(v) for k, v in sd.items() if k.startswith("rnn.")})
    readout = t.nn.Linear(model.num_directions * model.hidden_size, model.output_size, dtype=t.float64)
    readout.load_state_dict({"weight": t.tensor(sd["readout.weight"]), "bias": t.tensor(sd["readout.bias"])})
    return module, readout


def torch_outputs(model, module, readout, x, lengths, state=None):
    """torch's outputs and final states of ``model``'s twin: packed sequences, the last-step
    readout from h_n (the top level's two directions concatenated when bidirectional)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    packed = pack_padded_sequence(x, torch.tensor(np.asarray(lengths, np.int64)), enforce_sorted=False)
    arg = None if state is None else (state if model.cell == "lstm" else state[0])
    out, final = module(packed, arg)
    final = final if isinstance(final, tuple) else (final,)
    if model.readout == "every_step":
        y, _ = pad_packed_sequence(out, total_length=x.shape[0])
        return readout(y), final
    h_n = final[0]
    features = torch.cat([h_n[-2], h_n[-1]], dim=1) if model.bidirectional else h_n[-1]
    return readout(features), final


# ----------------------------------------------------------------------------------------
# SequenceModel with lengths against torch


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("readout", ["every_step", "last_step"])
@pytest.mark.parametrize("cell", CELLS)
def test_sequence_model_with_lengths_matches_torch(backend, rng, cell, readout, bidirectional):
    T, B, L = 7, 5, 2
    model = seq_model(cell, readout, bidirectional, L=L)
    module, lin = torch_twin(model)
    D = model.num_directions
    x = rng.standard_normal((T, B, model.input_size))
    lengths = make_lengths("mixed", T, B, rng)
    state = random_parts(cell, (D * L, B, model.hidden_size), F64, rng)
    out_shape = (T, B, model.output_size) if readout == "every_step" else (B, model.output_size)
    dout = rng.standard_normal(out_shape)
    dfinal = random_parts(cell, state[0].shape, F64, rng)

    tx = torch.tensor(x)
    tstate = tuple(torch.tensor(s, requires_grad=True) for s in state)
    want, want_final = torch_outputs(model, module, lin, tx, lengths, tstate)
    loss = (want * torch.tensor(dout)).sum() + sum((f * torch.tensor(d)).sum() for f, d in zip(want_final, dfinal))
    loss.backward()

    unpack = (lambda s: s) if cell == "lstm" else (lambda s: s[0])
    out, final, cache = model.forward(x, unpack(state), lengths=lengths)
    model.zero_grad()
    dinit = model.backward(model.backend.asarray(dout, F64), cache, unpack(dfinal))
    host = model.backend.to_host
    what = f"{cell} {readout} D={D} lengths={list(lengths)}"
    assert_close(host(out), want.detach().numpy(), F64, f"{what} outputs")
    for k, part in enumerate(as_parts(final)):
        assert_close(host(part), want_final[k].detach().numpy(), F64, f"{what} final state[{k}]")
        assert_close(host(as_parts(dinit)[k]), tstate[k].grad.numpy(), F64, f"{what} d(initial state)[{k}]")
    want_grads = {"rnn." + n: p.grad.numpy() for n, p in module.named_parameters()}
    want_grads.update({"readout." + n: p.grad.numpy() for n, p in lin.named_parameters()})
    assert set(model.grads) == set(want_grads)
    for name, g in want_grads.items():
        assert_close(host(model.grads[name]), g, F64, f"{what} d{name}")


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_lengths_all_T_equal_no_lengths(backend, rng, bidirectional):
    T, B = 6, 3
    model = seq_model("gru", "last_step", bidirectional)
    x = rng.standard_normal((T, B, model.input_size))
    dout = model.backend.asarray(rng.standard_normal((B, model.output_size)), F64)
    results = []
    for lengths in (None, np.full(B, T)):
        out, final, cache = model.forward(x, lengths=lengths)
        model.zero_grad()
        model.backward(dout, cache)
        results.append((model.backend.to_host(out).copy(), {k: model.backend.to_host(g).copy()
                                                             for k, g in model.grads.items()}))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    for name in results[0][1]:
        np.testing.assert_array_equal(results[0][1][name], results[1][1][name], err_msg=name)


def test_cache_dict_round_trip_keeps_the_lengths(backend, rng):
    T, B = 6, 4
    model = seq_model("lstm", "last_step", True)
    x = rng.standard_normal((T, B, model.input_size))
    lengths = make_lengths("mixed", T, B, rng)
    dout = model.backend.asarray(rng.standard_normal((B, model.output_size)), F64)
    _, _, cache = model.forward(x, lengths=lengths)
    d = cache.to_dict(model.backend.to_host)
    np.testing.assert_array_equal(d["lengths"], lengths)
    grads = []
    for c in (cache, model.cache_from_dict(d)):
        assert isinstance(c, SeqCache)
        model.zero_grad()
        model.backward(dout, c)
        grads.append(model.backend.to_host(model.grads["rnn.weight_hh_l0_reverse"]).copy())
    np.testing.assert_array_equal(grads[0], grads[1])


def test_bad_lengths_are_one_line_errors_naming_lengths(backend, rng):
    T, B = 5, 3
    model = seq_model("lstm", "last_step")
    x = rng.standard_normal((T, B, model.input_size))
    cases = [([5, 1], ValueError, r"lengths must have shape \[3\].*got \[2\]"),
             ([5, 0, 1], ValueError, r"lengths must be in \[1, 5\], got 0"),
             ([5, 6, 1], ValueError, r"lengths must be in \[1, 5\], got 6"),
             (np.array([5.0, 1.0, 1.0]), TypeError, "lengths must be an array of integers.*float64"),
             (np.ones((3, 1), np.int64), ValueError, r"lengths must have shape \[3\]")]
    for lengths, error, message in cases:
        with pytest.raises(error, match=message) as info:
            model.forward(x, lengths=lengths)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"state must have shape .*\(1, 3, 4\).*\(1, 2, 4\)"):
        model.forward(x, state=model.init_state(2), lengths=[5, 1, 2])
    targets = rng.integers(0, 3, 4)
    data = rng.standard_normal((4, T, model.input_size))
    trainer = bptt.Trainer(model, bptt.SGD(0.1))
    for lengths, error, message in [([5, 1, 2], ValueError, r"lengths must have shape \[4\]"),
                                    ([5, 0, 1, 2], ValueError, "lengths must be in"),
                                    ([1.0] * 4, TypeError, "lengths must be an array of integers")]:
        with pytest.raises(error, match=message):
            trainer.fit((data, targets, lengths), 2)
    assert trainer.step == 0


# ----------------------------------------------------------------------------------------
# The trainer with lengths against one torch gradient step


def masked_torch_loss(model, out, targets, lengths):
    """The trainer's loss in torch: per-step terms past a row's length left out of the mean."""
    t = torch
    T = out.shape[0]
    if model.readout == "last_step":
        return t.nn.functional.cross_entropy(out, t.tensor(targets))
    valid = t.tensor(np.arange(T)[:, None] < lengths[None, :])                      # T,B
    if targets.dtype.kind == "i":
        tg = t.tensor(np.where(valid.numpy(), targets, -1))
        return t.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), tg.reshape(-1), ignore_index=-1)
    sq = ((out - t.tensor(targets)) ** 2) * valid[..., None]
    return sq.sum() / (valid.sum() * out.shape[-1])


@pytest.mark.parametrize("readout, kind, bidirectional", [
    ("last_step", "class", False), ("last_step", "class", True),
    ("every_step", "class", False), ("every_step", "float", True)])
def test_one_trainer_step_with_lengths_equals_torch_sgd(backend, rng, readout, kind, bidirectional):
    N, T, lr = 5, 6, 0.3
    model = seq_model("lstm", readout, bidirectional, L=2)
    module, lin = torch_twin(model)
    inputs = rng.standard_normal((N, T, model.input_size))
    lengths = make_lengths("mixed", T, N, rng)
    shape = (N,) if readout == "last_step" else (N, T)
    if kind == "class":
        targets = rng.integers(0, model.output_size, shape)
        if readout == "every_step":
            targets[0, 0] = -1                                      # an ignored target besides padding
    else:
        targets = rng.standard_normal(shape + (model.output_size,))

    x = torch.tensor(inputs.transpose(1, 0, 2))
    out, _ = torch_outputs(model, module, lin, x, lengths)
    tg = targets if readout == "last_step" else np.moveaxis(targets, 0, 1)
    masked_torch_loss(model, out, tg, lengths).backward()
    expected = {"rnn." + n: (p - lr * p.grad).detach().numpy() for n, p in module.named_parameters()}
    expected.update({"readout." + n: (p - lr * p.grad).detach().numpy() for n, p in lin.named_parameters()})

    trainer = bptt.Trainer(model, bptt.SGD(lr))
    trainer.fit((inputs, targets, lengths), batch_size=N, max_steps=1)
    assert trainer.step == 1
    weights = model.state_dict()
    for name, w in expected.items():
        assert_close(weights[name], w, F64, f"{readout} {kind} weight {name}")


@pytest.mark.parametrize("readout, kind", [("every_step", "class"), ("every_step", "float"), ("last_step", "class")])
def test_padded_steps_change_nothing(backend, rng, readout, kind):
    N, T = 6, 7
    inputs = rng.standard_normal((N, T, 3))
    lengths = make_lengths("mixed", T, N, rng)
    shape = (N,) if readout == "last_step" else (N, T)
    targets = rng.integers(0, 3, shape) if kind == "class" else rng.standard_normal(shape + (3,))
    padded = np.arange(T)[None, :] >= lengths[:, None]                              # N,T
    other_inputs = np.where(padded[..., None], rng.standard_normal(inputs.shape), inputs)
    other_targets = targets.copy()
    if readout == "every_step":
        other_targets[padded] = (rng.integers(0, 3, int(padded.sum())) if kind == "class"
                                 else rng.standard_normal((int(padded.sum()), 3)))
    assert not np.array_equal(other_inputs, inputs)

    runs = []
    for data in ((inputs, targets, lengths), (other_inputs, other_targets, lengths)):
        model = seq_model("gru", readout, bidirectional=True)
        trainer = bptt.Trainer(model, bptt.Adam(0.05))
        trainer.fit(data, batch_size=4, epochs=2)
        runs.append((model.state_dict(), trainer.history["loss"], trainer.evaluate(data, 4)))
    for name in runs[0][0]:
        np.testing.assert_array_equal(runs[0][0][name], runs[1][0][name], err_msg=name)
    assert runs[0][1] == runs[1][1] and runs[0][2] == runs[1][2]


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_evaluate_with_lengths_equals_each_sequence_alone(backend, rng, bidirectional):
    N, T = 7, 6
    model = seq_model("lstm", "last_step", bidirectional)
    inputs = rng.standard_normal((N, T, model.input_size))
    lengths = make_lengths("mixed", T, N, rng)
    labels = rng.integers(0, model.output_size, N)
    trainer = bptt.Trainer(model, bptt.SGD(0.1))
    metrics = trainer.evaluate((inputs, labels, lengths), batch_size=3)
    alone = [trainer.evaluate((inputs[i:i + 1, :lengths[i]], labels[i:i + 1]), 1) for i in range(N)]
    assert_close(metrics["loss"], np.mean([m["loss"] for m in alone]), F64, "mean loss")
    assert metrics["accuracy"] == pytest.approx(np.mean([m["accuracy"] for m in alone]))
    outputs = predict(model, inputs, batch_size=3, lengths=lengths)
    assert metrics["accuracy"] == pytest.approx(accuracy(outputs, labels))


# ----------------------------------------------------------------------------------------
# What needs full BPTT


def test_tbptt_with_lengths_is_refused_in_one_line(rng):
    model = seq_model("gru", "every_step")
    data = (rng.standard_normal((4, 6, 3)), rng.integers(0, 3, (4, 6)), [6, 2, 3, 1])
    trainer = bptt.Trainer(model, bptt.SGD(0.1), k1=3)
    with pytest.raises(ValueError, match=r"lengths\) train with full BPTT only .*k1=3") as info:
        trainer.fit(data, 2)
    assert "\n" not in str(info.value) and trainer.step == 0
    bptt.Trainer(model, bptt.SGD(0.1), k1=3).fit(data[:2], 2)      # the same data without lengths trains


def test_bidirectional_needs_full_bptt(rng):
    model = seq_model("lstm", "last_step", bidirectional=True)
    with pytest.raises(ValueError, match=r"bidirectional model trains with full BPTT only .*k1=4") as info:
        bptt.Trainer(model, bptt.SGD(0.1), k1=4)
    assert "\n" not in str(info.value)
    trainer = bptt.Trainer(model, bptt.SGD(0.1))
    sd = trainer.state_dict()
    sd["config"]["k1"] = 4                                        # a checkpoint edited to TBPTT
    with pytest.raises(ValueError, match="full BPTT only"):
        trainer.load_state_dict(sd)
    # evaluation of a bidirectional model runs whole sequences, not chunks with the state carried
    data = (rng.standard_normal((3, 9, 3)), rng.integers(0, 3, 3))
    whole = trainer.evaluate(data, 3)
    out, _, _ = model.forward(data[0].transpose(1, 0, 2), train=False)
    logits = model.backend.to_host(out)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert_close(whole["loss"], -logp[np.arange(3), data[1]].mean(), F64, "bidirectional evaluation loss")


def test_a_language_model_with_a_bidirectional_stack_is_refused():
    lm = bptt.LanguageModel(7, 4, 4, dtype=F64, seed=0)
    lm._init_stack("lstm", 4, 4, 1, 0.0, F64, 0, bidirectional=True)     # built by hand
    with pytest.raises(ValueError, match="LanguageModel cannot have a bidirectional stack") as info:
        bptt.Trainer(lm, bptt.SGD(0.1))
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------
# Config and checkpoints


def test_bidirectional_round_trips_through_model_dicts(rng):
    model = seq_model("gru", "last_step", bidirectional=True, L=2)
    assert model.config["bidirectional"] is True
    assert model.params["readout.weight"].shape == (3, 8)
    again = model_from_dict(model_to_dict(model))
    assert again.bidirectional and again.config == model.config
    x = rng.standard_normal((5, 2, 3))
    np.testing.assert_array_equal(again.backend.to_host(again.forward(x, lengths=[5, 2])[0]),
                                  model.backend.to_host(model.forward(x, lengths=[5, 2])[0]))
    # a dict saved before the key existed reads as the default (one direction)
    plain = seq_model("gru", "last_step")
    d = model_to_dict(plain)
    del d["config"]["bidirectional"]
    assert not model_from_dict(d).bidirectional
    d = model_to_dict(model)
    del d["config"]["bidirectional"]
    with pytest.raises(ValueError, match="unexpected .*_reverse"):      # its weights say otherwise
        model_from_dict(d)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_resume_mid_epoch_with_lengths_gives_the_uninterrupted_weights(backend, tmp_path, rng, bidirectional):
    N, T = 6, 7
    inputs = rng.standard_normal((N, T, 3))
    targets = rng.integers(0, 3, (N, T))
    lengths = make_lengths("mixed", T, N, rng)
    data = (inputs, targets, lengths)

    def make():
        model = seq_model("lstm", "every_step", bidirectional, seed=5)
        return bptt.Trainer(model, bptt.Adam(0.05), clip_norm=1.0)

    full = make()
    full.fit(data, 2, epochs=2)
    part = make()
    part.fit(data, 2, epochs=2, max_steps=4)                # 3 updates an epoch: inside epoch 2
    assert part.position is not None
    part.save_checkpoint(tmp_path / "c.npz")
    resumed = bptt.Trainer.from_checkpoint(tmp_path / "c.npz")
    with pytest.raises(ValueError, match="same data"):      # other lengths are other data
        resumed.fit((inputs, targets, np.full(N, T)), 2, epochs=2)
    resumed.fit(data, 2, epochs=2)
    assert resumed.step == full.step == 6
    for name, w in full.model.state_dict().items():
        np.testing.assert_array_equal(resumed.model.state_dict()[name], w, err_msg=name)


# ----------------------------------------------------------------------------------------
# The varlen task


def test_varlen_layout():
    x, y, lengths = varlen_task(400, 12, seed=3)
    assert x.shape == (400, 12, 8) and x.dtype == np.float32 and (x.sum(-1) == 1).all()
    assert y.shape == lengths.shape == (400,) and y.dtype == lengths.dtype == np.int64
    assert lengths.min() == VARLEN_MIN_LENGTH and lengths.max() == 12
    symbols = x.argmax(-1)
    np.testing.assert_array_equal(y, 2 * (symbols[:, 0] >= 4) + (symbols[:, 1] >= 4))
    assert set(np.unique(y)) == set(range(VARLEN_CLASSES))
    padded = np.arange(12)[None, :] >= lengths[:, None]
    assert len(np.unique(symbols[padded])) == 8                 # the padding is random symbols
    again = make_task("varlen", 400, 12, seed=3)
    for a, b in zip((x, y, lengths), again):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="max_length"):
        varlen_task(4, 4)


def test_varlen_trains_above_chance(rng):
    x, y, lengths = varlen_task(32 * 60, 12, seed=int(rng.integers(1 << 30)))
    xv, yv, lv = varlen_task(300, 12, seed=int(rng.integers(1 << 30)))
    model = bptt.SequenceModel(8, 16, VARLEN_CLASSES, cell="gru", readout="last_step", seed=0, bidirectional=True)
    trainer = bptt.Trainer(model, bptt.Adam(0.02), clip_norm=1.0)
    trainer.fit((x, y, lengths), 32)
    assert trainer.evaluate((xv, yv, lv), 100)["accuracy"] > 0.6          # chance: 0.25


def test_cli_trains_varlen(tmp_path, capsys):
    import json
    for extra in ([], ["--bidirectional", "--cell", "gru"]):
        run = tmp_path / f"run{len(extra)}"
        argv = ["train", "--task", "varlen", "--lag", "8", "--n-train", "16", "--hidden-size", "8",
                "--batch-size", "4", "--max-steps", "3", "--out", str(run), "--json", *extra]
        assert main(argv) == 0
        out, err = capsys.readouterr()
        summary = json.loads(out.strip().splitlines()[-1])
        assert 0 <= summary["accuracy"] <= 1 and summary["chance_accuracy"] == 0.25 and summary["steps"] == 3
        assert "sequence lengths 5..8" in err and ("bidirectional gru" in err) == bool(extra)
        assert main(["eval", str(run), "--json"]) == 0
        assert "accuracy" in json.loads(capsys.readouterr()[0].strip().splitlines()[-1])
    for argv, message in [(["--task", "varlen", "--k1", "4"], "--task varlen has sequences of variable length"),
                          (["--task", "copy", "--bidirectional", "--k1", "4"], "--bidirectional reads each"),
                          (["--bidirectional"], "--bidirectional is for --task"),
                          (["--task", "varlen", "--lag", "4"], "must be >= 5")]:
        assert main(["train", *argv, "--out", str(tmp_path / "x")]) == 1
        err = capsys.readouterr()[1]
        assert message in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "varlen" in capsys.readouterr()[0]
