"""Trainer: parity with PyTorch's word_language_model training loop, TBPTT(k1, k2) windows and
per-stream resets against torch autograd, non-finite handling, bad k1/k2, evaluation metrics,
and SequenceModel training against torch autograd. float64 on the NumPy reference backend."""

import math

import numpy as np
import pytest

import bptt
from bptt.trainer import NonFiniteError, batchify

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

TORCH_CELLS = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN_TANH", "rnn_relu": "RNN_RELU"}


@pytest.fixture(autouse=True)
def reference_backend():
    with bptt.use_backend("reference"):
        yield


# ---------------------------------------------------------------------------------------------
# PyTorch's word_language_model example (model.py and the train() loop of main.py), written out.


class RNNModel(nn.Module):
    """examples/word_language_model/model.py: encoder, recurrent module, decoder."""

    def __init__(self, rnn_type, ntoken, ninp, nhid, nlayers, dropout=0.0, tie_weights=False):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        if rnn_type in ("LSTM", "GRU"):
            self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=dropout)
        else:
            nonlinearity = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}[rnn_type]
            self.rnn = nn.RNN(ninp, nhid, nlayers, nonlinearity=nonlinearity, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        self.rnn_type, self.nhid, self.nlayers = rnn_type, nhid, nlayers
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        if self.rnn_type == "LSTM":
            return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))
        return weight.new_zeros(self.nlayers, bsz, self.nhid)


def torch_batchify(data, bsz):
    nbatch = data.size(0) // bsz
    data = data.narrow(0, 0, nbatch * bsz)
    return data.view(bsz, -1).t().contiguous()


def get_batch(source, i, bptt_len):
    seq_len = min(bptt_len, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].reshape(-1)


def repackage_hidden(h):
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def torch_train(model, train_data, bsz, bptt_len, lr, clip, epochs, optimizer=None):
    """main.py's train() for ``epochs`` epochs; plain ``p.data.add_(p.grad, alpha=-lr)`` unless an
    optimizer is given. Returns the losses of every update."""
    criterion = nn.NLLLoss()
    losses = []
    for _ in range(epochs):
        model.train()
        hidden = model.init_hidden(bsz)
        for i in range(0, train_data.size(0) - 1, bptt_len):
            data, targets = get_batch(train_data, i, bptt_len)
            hidden = repackage_hidden(hidden)
            model.zero_grad()
            output, hidden = model(data, hidden)
            loss = criterion(output, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if optimizer is None:
                for p in model.parameters():
                    p.data.add_(p.grad, alpha=-lr)
            else:
                optimizer.step()
            losses.append(loss.item())
    return losses


def torch_evaluate(model, data_source, bsz, bptt_len):
    """main.py's evaluate(): mean loss per token over the batchified stream."""
    model.eval()
    total_loss = 0.0
    hidden = model.init_hidden(bsz)
    with torch.no_grad():
        for i in range(0, data_source.size(0) - 1, bptt_len):
            data, targets = get_batch(data_source, i, bptt_len)
            output, hidden = model(data, hidden)
            hidden = repackage_hidden(hidden)
            total_loss += len(data) * F.nll_loss(output, targets).item()
    return total_loss / (len(data_source) - 1)


def make_pair(cell, V=17, E=5, H=6, L=2, tie=False, seed=0):
    """A torch RNNModel (float64) and a bptt LanguageModel holding the same weights."""
    torch.manual_seed(seed)
    tm = RNNModel(TORCH_CELLS[cell], V, E, H, L, tie_weights=tie).double()
    bm = bptt.LanguageModel(V, E, H, L, cell=cell, tie_weights=tie, dtype=np.float64, seed=seed + 1)
    bm.load_state_dict(tm.state_dict())
    return tm, bm


def assert_same_weights(tm, bm, tol=1e-8):
    for name, value in tm.state_dict().items():
        ours = bm.state_dict()[name]
        ref = value.numpy()
        err = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-300)
        assert err <= tol, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("cell, opt, tie", [
    ("lstm", "plain", False),
    ("gru", "momentum", False),
    ("rnn_tanh", "adam", False),
    ("rnn_relu", "plain", False),
    ("lstm", "adam", True),
])
def test_word_language_model_parity(cell, opt, tie):
    """k1 == k2 trains update for update as the word_language_model loop (clipping on)."""
    check_word_language_model_parity(cell, opt, tie)


def check_word_language_model_parity(cell, opt, tie):
    V, B, k1, lr, clip, epochs = 17, 3, 5, 0.7, 0.25, 2
    H = 5 if tie else 6
    tm, bm = make_pair(cell, V=V, E=H, H=H, tie=tie)
    tokens = np.random.default_rng(1).integers(0, V, B * 24 + 2)       # 24 steps: chunks 5,5,5,5,3
    if opt == "plain":
        topt, bopt = None, bptt.SGD(lr)
    elif opt == "momentum":
        topt = torch.optim.SGD(tm.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3)
        bopt = bptt.SGD(lr, momentum=0.9, nesterov=True, weight_decay=1e-3)
    else:
        lr = 0.01
        topt = torch.optim.Adam(tm.parameters(), lr=lr, betas=(0.8, 0.99), weight_decay=1e-3)
        bopt = bptt.Adam(lr, betas=(0.8, 0.99), weight_decay=1e-3)
    t_losses = torch_train(tm, torch_batchify(torch.tensor(tokens), B), B, k1, lr, clip, epochs, topt)
    trainer = bptt.Trainer(bm, bopt, k1=k1, clip_norm=clip)
    history = trainer.fit(tokens, B, epochs=epochs)
    assert trainer.step == len(t_losses) == 10
    np.testing.assert_allclose(history["loss"], t_losses, rtol=1e-10)
    assert_same_weights(tm, bm)
    # the weights did move: a test that could not fail would pass on untouched weights too
    assert np.abs(bm.state_dict()["decoder.bias"]).max() > 1e-3


def test_evaluate_matches_word_language_model_evaluate():
    V, B, k1 = 17, 2, 7
    tm, bm = make_pair("lstm")
    tokens = np.random.default_rng(2).integers(0, V, 61)
    ref = torch_evaluate(tm, torch_batchify(torch.tensor(tokens), B), B, k1)
    m = bptt.Trainer(bm, bptt.SGD(1.0), k1=k1).evaluate(tokens, B)
    assert abs(m["loss"] - ref) <= 1e-12 * ref
    assert m["perplexity"] == pytest.approx(math.exp(ref), rel=1e-12)
    assert m["bits_per_token"] == pytest.approx(ref / math.log(2), rel=1e-12)
    # evaluation carries the state: chunking does not change the result
    m_full = bptt.Trainer(bm, bptt.SGD(1.0)).evaluate(tokens, B)
    assert m_full["loss"] == pytest.approx(m["loss"], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# TBPTT(k1, k2) and resets against torch autograd, one step at a time


def torch_window_grads(tm, src, resets, w0, t0, t1):
    """Gradient of the mean loss of steps [t0, t1) backpropagated through steps [w0, t1) only.

    src [n, B] batchified tokens; resets [n-1, B] bool or None (state zeroed before step t).
    The state entering w0 comes from a no-grad forward from zero (detached). Step by step in
    plain torch; returns {name: grad ndarray}.
    """
    tm.zero_grad()
    B = src.shape[1]
    x = torch.tensor(src[:-1])
    y = torch.tensor(src[1:])
    keep = None if resets is None else torch.tensor(~resets, dtype=torch.float64)

    def step(h, t):
        if keep is not None:
            k = keep[t][None, :, None]
            h = tuple(s * k for s in h) if isinstance(h, tuple) else h * k
        out, h = tm.rnn(tm.encoder(x[t:t + 1]), h)
        return out, h

    h = tm.init_hidden(B)
    with torch.no_grad():
        for t in range(w0):
            _, h = step(h, t)
    logps = []
    for t in range(w0, t1):
        out, h = step(h, t)
        if t >= t0:
            logps.append(F.log_softmax(tm.decoder(out[0]), dim=1))
    loss = F.nll_loss(torch.cat(logps), y[t0:t1].reshape(-1))
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in tm.named_parameters()}
    if tm.decoder.weight is tm.encoder.weight:
        grads["decoder.weight"] = grads["encoder.weight"]
    return grads


def windows(n_steps, k1, k2):
    """(w0, t0, t1) of every TBPTT window of a group of n_steps steps."""
    return [(max(0, t0 - (k2 - k1)), t0, min(t0 + k1, n_steps)) for t0 in range(0, n_steps, k1)]


def run_recording_grads(bm, tokens, B, k1, k2, reset_mask=None, epochs=1):
    """Train with lr 0 (weights fixed) and record every window's gradient (before any update)."""
    recorded = []
    trainer = bptt.Trainer(bm, bptt.SGD(0.0), k1=k1, k2=k2)
    trainer.fit(tokens, B, epochs=epochs, reset_mask=reset_mask,
                callbacks=[lambda e: recorded.append({n: g.copy() for n, g in bm.grads.items()})])
    return recorded


@pytest.mark.parametrize("cell, k1, k2, tie", [
    ("lstm", 3, 7, False),     # k2 not a multiple of k1: the window starts inside an old chunk
    ("gru", 4, 8, False),
    ("rnn_tanh", 2, 5, True),
    ("lstm", 5, 5, False),
])
def test_tbptt_window_gradients_match_torch(cell, k1, k2, tie):
    check_tbptt_window_gradients(cell, k1, k2, tie)


def check_tbptt_window_gradients(cell, k1, k2, tie):
    V, B = 11, 2
    H = 4
    tm, bm = make_pair(cell, V=V, E=H, H=H, tie=tie, seed=3)
    tokens = np.random.default_rng(4).integers(0, V, B * 21 + 1)     # 20 steps: last chunk shorter
    src = batchify(tokens, B)
    recorded = run_recording_grads(bm, tokens, B, k1, k2)
    wins = windows(src.shape[0] - 1, k1, k2)
    assert len(recorded) == len(wins)
    for (w0, t0, t1), got in zip(wins, recorded):
        ref = torch_window_grads(tm, src, None, w0, t0, t1)
        for name, g in got.items():
            scale = max(np.abs(ref[name]).max(), 1e-12)
            assert np.abs(g - ref[name]).max() <= 1e-10 * scale, f"window {w0, t0, t1}: {name}"
    # the window really reaches back: k2 > k1 gives other gradients than k2 == k1
    if k2 > k1:
        plain = run_recording_grads(bm, tokens, B, k1, k1)
        assert not np.allclose(plain[2]["rnn.weight_hh_l0"], recorded[2]["rnn.weight_hh_l0"], rtol=1e-6)


def test_trainer_on_the_cpu_backend():
    """The same parity checks with the Numba kernels (float64)."""
    try:
        switch = bptt.use_backend("cpu")
    except ImportError as e:
        pytest.skip(f"cpu backend not importable: {e}")
    with switch:
        check_word_language_model_parity("lstm", "momentum", False)
        check_tbptt_window_gradients("gru", 3, 7, False)


def random_resets(n_tokens, rng, p=0.12):
    mask = rng.random(n_tokens) < p
    mask[0] = True
    return mask


@pytest.mark.parametrize("cell, k1, k2", [("lstm", 4, 7), ("gru", 3, 3), ("rnn_tanh", None, None)])
def test_reset_mask_gradients_match_torch(cell, k1, k2):
    """Resets inside chunks, at chunk starts, and inside the TBPTT overlap."""
    V, B = 11, 3
    tm, bm = make_pair(cell, V=V, E=4, H=5, seed=5)
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, V, B * 17 + 2)
    mask = random_resets(len(tokens), rng)
    src, resets = batchify(tokens, B), batchify(mask, B)[:-1]
    assert resets[1:].any(axis=1).sum() >= 3
    recorded = run_recording_grads(bm, tokens, B, k1, k2, reset_mask=mask)
    n = src.shape[0] - 1
    wins = windows(n, k1, k2) if k1 else [(0, 0, n)]
    assert len(recorded) == len(wins)
    for (w0, t0, t1), got in zip(wins, recorded):
        ref = torch_window_grads(tm, src, resets, w0, t0, t1)
        for name, g in got.items():
            scale = max(np.abs(ref[name]).max(), 1e-12)
            assert np.abs(g - ref[name]).max() <= 1e-10 * scale, f"window {w0, t0, t1}: {name}"


def test_reset_mask_equals_documents_run_separately():
    """Evaluation with resets == every document of every stream run on its own from zero."""
    V, B = 9, 2
    bm = bptt.LanguageModel(V, 4, 5, 2, cell="lstm", dtype=np.float64, seed=7)
    rng = np.random.default_rng(8)
    tokens = rng.integers(0, V, B * 30 + 1)
    mask = random_resets(len(tokens), rng, p=0.15)
    src, resets = batchify(tokens, B), batchify(mask, B)
    total, count = 0.0, 0
    for b in range(B):
        starts = [0] + [t for t in range(1, src.shape[0] - 1) if resets[t, b]] + [src.shape[0] - 1]
        for a, e in zip(starts[:-1], starts[1:]):
            logits, _, _ = bm.forward(src[a:e, b:b + 1], None, train=False)
            logp = logits[:, 0] - np.log(np.exp(logits[:, 0]).sum(axis=1, keepdims=True))
            total -= logp[np.arange(e - a), src[a + 1:e + 1, b]].sum()
            count += e - a
    for k1 in (3, None):
        m = bptt.Trainer(bm, bptt.SGD(1.0), k1=k1).evaluate(tokens, B, reset_mask=mask)
        assert m["loss"] == pytest.approx(total / count, rel=1e-12)
    # and the resets matter
    assert bptt.Trainer(bm, bptt.SGD(1.0), k1=3).evaluate(tokens, B)["loss"] != pytest.approx(total / count, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# SequenceModel: full BPTT and TBPTT within each sequence, state reset per sequence


def torch_seq_grads(bm, x, targets, t_windows, readout):
    """Per-window gradients of a SequenceModel copy in torch: x [T,B,I]; windows (w0, t0, t1)."""
    cls = {"lstm": nn.LSTM, "gru": nn.GRU}[bm.cell]
    rnn = cls(bm.input_size, bm.hidden_size, bm.num_layers).double()
    lin = nn.Linear(bm.hidden_size, bm.output_size).double()
    sd = bm.state_dict()
    rnn.load_state_dict({k[4:]: torch.tensor(v) for k, v in sd.items() if k.startswith("rnn.")})
    lin.load_state_dict({"weight": torch.tensor(sd["readout.weight"]), "bias": torch.tensor(sd["readout.bias"])})
    xt = torch.tensor(x)
    out = []
    T = x.shape[0]
    for w0, t0, t1 in t_windows:
        rnn.zero_grad()
        lin.zero_grad()
        with torch.no_grad():
            _, h = rnn(xt[:w0]) if w0 else (None, None)
        y, _ = rnn(xt[w0:t1], h)
        if readout == "every_step":
            logits = lin(y[t0 - w0:])
            tg = torch.tensor(targets[t0:t1])
            loss = F.cross_entropy(logits.reshape(-1, bm.output_size), tg.reshape(-1), ignore_index=-1)
        else:
            if t1 < T:
                out.append(None)
                continue
            loss = F.mse_loss(lin(y[-1]), torch.tensor(targets))
        loss.backward()
        g = {"rnn." + n: p.grad.numpy().copy() for n, p in rnn.named_parameters()}
        g.update({"readout." + n: p.grad.numpy().copy() for n, p in lin.named_parameters()})
        out.append(g)
    return out


@pytest.mark.parametrize("readout, k1, k2", [("every_step", None, None), ("every_step", 3, 5),
                                              ("last_step", 4, 6), ("last_step", None, None)])
def test_sequence_model_gradients_match_torch(readout, k1, k2):
    N, T, I, H, O, B = 5, 10, 3, 4, 3, 2
    rng = np.random.default_rng(9)
    bm = bptt.SequenceModel(I, H, O, num_layers=2, cell="gru" if k1 else "lstm", readout=readout,
                            dtype=np.float64, seed=10)
    inputs = rng.standard_normal((N, T, I))
    if readout == "every_step":
        targets = rng.integers(-1, O, (N, T))         # -1: ignored positions
    else:
        targets = rng.standard_normal((N, O))
    recorded = []
    trainer = bptt.Trainer(bm, bptt.SGD(0.0), k1=k1, k2=k2)
    trainer.fit((inputs, targets), B, callbacks=[lambda e: recorded.append({n: g.copy() for n, g in bm.grads.items()})])
    wins = windows(T, k1, k2) if k1 else [(0, 0, T)]
    expected = []
    for b0 in range(0, N, B):                          # batches of B sequences, last one smaller
        x = inputs[b0:b0 + B].transpose(1, 0, 2)
        tg = targets[b0:b0 + B].T if readout == "every_step" else targets[b0:b0 + B]
        expected += [g for g in torch_seq_grads(bm, x, tg, wins, readout) if g is not None]
    assert len(recorded) == len(expected) == trainer.step
    for got, ref in zip(recorded, expected):
        for name, g in got.items():
            scale = max(np.abs(ref[name]).max(), 1e-12)
            assert np.abs(g - ref[name]).max() <= 1e-10 * scale, name


def test_sequence_model_learns_and_evaluates_accuracy():
    rng = np.random.default_rng(11)
    N, T = 32, 6
    inputs = rng.standard_normal((N, T, 2))
    targets = (inputs[:, :, 0] > 0).astype(np.int64)   # class = sign of the current input
    bm = bptt.SequenceModel(2, 8, 2, cell="lstm", dtype=np.float64, seed=12)
    trainer = bptt.Trainer(bm, bptt.Adam(0.05))
    before = trainer.evaluate((inputs, targets), 16)
    trainer.fit((inputs, targets), 8, epochs=15)
    after = trainer.evaluate((inputs, targets), 16)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.9


# ---------------------------------------------------------------------------------------------
# Errors: bad k1/k2, non-finite loss or gradient, bad data


@pytest.mark.parametrize("k1, k2", [(0, None), (-2, None), (2.5, None), ("4", None), (True, None),
                                    (5, 3), (None, 4), (3, 0), (4, 4.0)])
def test_bad_k1_k2_raise_value_error(k1, k2):
    bm = bptt.LanguageModel(5, 3, 3, dtype=np.float64, seed=0)
    with pytest.raises(ValueError, match="k1|k2"):
        bptt.Trainer(bm, bptt.SGD(1.0), k1=k1, k2=k2)


def _poisoned_model():
    bm = bptt.LanguageModel(7, 3, 4, cell="gru", dtype=np.float64, seed=13)
    before = bm.state_dict()
    bm.params["decoder.bias"][2] = np.inf        # logits inf -> loss NaN
    return bm, before


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nonfinite_loss_raises_naming_step_and_keeps_weights():
    bm, _ = _poisoned_model()
    snapshot = {n: p.copy() for n, p in bm.params.items()}
    tokens = np.random.default_rng(14).integers(0, 7, 60)
    trainer = bptt.Trainer(bm, bptt.SGD(1.0, momentum=0.5), k1=4)
    with pytest.raises(NonFiniteError, match="step 1 "):
        trainer.fit(tokens, 2)
    for n, p in bm.params.items():
        np.testing.assert_array_equal(p, snapshot[n])
    assert trainer.step == 0


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nonfinite_loss_skip_mode_leaves_weights():
    bm, _ = _poisoned_model()
    snapshot = {n: p.copy() for n, p in bm.params.items()}
    tokens = np.random.default_rng(14).integers(0, 7, 60)
    trainer = bptt.Trainer(bm, bptt.SGD(1.0), k1=4, on_nonfinite="skip")
    history = trainer.fit(tokens, 2)
    assert trainer.step == 0 and all(history["skipped"]) and len(history["skipped"]) == 8
    for n, p in bm.params.items():
        np.testing.assert_array_equal(p, snapshot[n])


def test_nonfinite_gradient_raises_before_update(monkeypatch):
    bm = bptt.LanguageModel(7, 3, 4, cell="lstm", dtype=np.float64, seed=15)
    tokens = np.random.default_rng(16).integers(0, 7, 60)
    real_backward = bm.backward
    calls = []

    def backward(*args, **kwargs):                  # the 3rd window's gradient turns NaN
        out = real_backward(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            bm.grads["rnn.weight_hh_l0"][0, 0] = np.nan
        return out

    monkeypatch.setattr(bm, "backward", backward)
    trainer = bptt.Trainer(bm, bptt.SGD(0.5), k1=5)
    snapshot = {}
    with pytest.raises(NonFiniteError, match="gradient.*step 3 "):
        trainer.fit(tokens, 2, callbacks=[lambda e: snapshot.update({n: p.copy() for n, p in bm.params.items()})])
    assert trainer.step == 2
    for n, p in bm.params.items():
        np.testing.assert_array_equal(p, snapshot[n])


def test_bad_data_errors():
    bm = bptt.LanguageModel(5, 3, 3, dtype=np.float64, seed=0)
    trainer = bptt.Trainer(bm, bptt.SGD(1.0), k1=3)
    with pytest.raises(ValueError, match="token ids"):
        trainer.fit(np.array([0, 1, 7, 2, 3, 4]), 1)
    with pytest.raises(ValueError, match="too few"):
        trainer.fit(np.arange(5) % 5, 4)
    with pytest.raises(ValueError, match="reset_mask"):
        trainer.fit(np.arange(20) % 5, 2, reset_mask=np.zeros(19, bool))
    with pytest.raises(ValueError, match="batch_size"):
        trainer.fit(np.arange(20) % 5, 0)


def test_events_history_and_schedule():
    bm = bptt.LanguageModel(6, 3, 4, cell="rnn_tanh", dtype=np.float64, seed=17)
    tokens = np.random.default_rng(18).integers(0, 6, 2 * 13 + 1)     # 12 steps, k1=5 -> 3 updates/epoch
    events = []
    trainer = bptt.Trainer(bm, bptt.SGD(0.4), k1=5, schedule=bptt.StepDecay(0.5, every=1, start=1))
    history = trainer.fit(tokens, 2, epochs=3, callbacks=[events.append], validation=tokens[:15])
    assert [e["step"] for e in events] == list(range(1, 10))
    assert [e["tokens"] for e in events] == [10, 10, 4] * 3
    assert [e["lr"] for e in events] == [0.4] * 3 + [0.2] * 3 + [0.1] * 3
    assert set(events[0]) >= {"step", "epoch", "loss", "tokens", "tokens_per_s", "lr", "grad_norm"}
    assert len(history["val_loss"]) == 3 and len(history["epoch_loss"]) == 3
    # epochs and max_steps are totals over the trainer's life: the same call again does nothing
    trainer.fit(tokens, 2, epochs=3)
    assert trainer.step == 9
    trainer.fit(tokens, 2, epochs=5, max_steps=11)
    assert trainer.step == 11 and trainer.epoch == 3 and trainer.position.offset == 10


def test_full_bptt_one_update_per_epoch():
    bm = bptt.LanguageModel(6, 3, 4, cell="gru", dtype=np.float64, seed=19)
    tokens = np.random.default_rng(20).integers(0, 6, 41)
    trainer = bptt.Trainer(bm, bptt.SGD(0.1))
    trainer.fit(tokens, 2, epochs=2)
    assert trainer.step == 2 and trainer.history["tokens"] == [38, 38]


def test_gradient_diagnostics_recorded_and_written(tmp_path):
    from bptt import diagnostics
    bm = bptt.LanguageModel(6, 3, 4, num_layers=2, cell="lstm", dtype=np.float64, seed=21)
    tokens = np.random.default_rng(22).integers(0, 6, 2 * 20 + 1)
    trainer = bptt.Trainer(bm, bptt.SGD(0.0), k1=3, k2=7, record_grad_norms=True)
    grads = []
    history = trainer.fit(tokens, 2, callbacks=[lambda e: grads.append({n: g.copy() for n, g in bm.grads.items()})])
    records = history["grad_diagnostics"]
    assert len(records) == trainer.step == 7
    r = records[3]                                   # window [5, 12): 7 steps, 2 levels
    assert r["window"] == [5, 12] and [len(d) for d in r["dh_norms"]] == [7, 7]
    for name, g in grads[3].items():
        assert r["param_grad_norms"][name] == pytest.approx(np.linalg.norm(g), rel=1e-12)
    # dL/dh_t of the newest step is the decoder's gradient alone; of older steps it comes through
    # the recurrence only, so it is smaller here (vanishing with small weights)
    assert all(v > 0 for v in r["dh_norms"][1])
    assert r["dh_norms"][1][0] < r["dh_norms"][1][-1]
    path = tmp_path / "norms.json"
    diagnostics.save_grad_norms(history, path)
    assert diagnostics.load_grad_norms(path) == records


def test_gradient_diagnostics_plot(tmp_path, monkeypatch):
    from bptt import diagnostics
    bm = bptt.LanguageModel(6, 3, 4, cell="gru", dtype=np.float64, seed=23)
    tokens = np.random.default_rng(24).integers(0, 6, 2 * 12 + 1)
    history = bptt.Trainer(bm, bptt.SGD(0.1), k1=3, k2=5, record_grad_norms=True).fit(tokens, 2)
    with pytest.raises(ValueError, match="record_grad_norms"):
        diagnostics.plot_grad_norms([])
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)     # as if not installed
    with pytest.raises(ImportError, match="matplotlib"):
        diagnostics.plot_grad_norms(history, tmp_path / "x.png")
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    fig = diagnostics.plot_grad_norms(history, tmp_path / "norms.png")
    assert (tmp_path / "norms.png").stat().st_size > 1000
    import matplotlib.pyplot as plt
    plt.close(fig)
    # the CLI's entry point: records one full window without changing the model
    before = bm.state_dict()
    records = diagnostics.write_grad_norms(bm, tokens, tmp_path / "g.json", {"k1": 3, "k2": 5, "batch_size": 2})
    assert records[-1]["window"] == [4, 9] and (tmp_path / "g.png").is_file()
    for name, v in bm.state_dict().items():
        np.testing.assert_array_equal(v, before[name])


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_float32_training_learns_a_repeating_pattern(backend_name):
    try:
        switch = bptt.use_backend(backend_name)
    except ImportError as e:
        pytest.skip(f"backend {backend_name} not importable: {e}")
    with switch:
        tokens = np.tile(np.array([0, 3, 1, 4, 1, 5, 2, 6]), 40)
        bm = bptt.LanguageModel(7, 8, 16, cell="gru", dropout=0.1, dtype=np.float32, seed=25)
        trainer = bptt.Trainer(bm, bptt.Adam(0.02), k1=8, k2=12, clip_norm=1.0)
        before = trainer.evaluate(tokens, 4)["loss"]
        trainer.fit(tokens, 4, epochs=6)
        after = trainer.evaluate(tokens, 4)
        assert all(p.dtype == np.float32 for p in bm.params.values())
        assert all(b.dtype == np.float32 for s in trainer.optimizer.state.values() for b in s.values())
        assert after["loss"] < 0.3 * before and after["perplexity"] < 2.0
