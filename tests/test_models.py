"""Models: LanguageModel loads a torch RNNModel's state_dict and gives the same logits and
gradients; dropout placement and scaling; SequenceModel against torch; state_dict errors."""

import numpy as np
import pytest

import bptt
import bptt.models
import bptt.trainer
from bptt.losses import cross_entropy, mse

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

TORCH_RNN = {"lstm": lambda E, H, L: nn.LSTM(E, H, L), "gru": lambda E, H, L: nn.GRU(E, H, L),
             "rnn_tanh": lambda E, H, L: nn.RNN(E, H, L), "rnn_relu": lambda E, H, L: nn.RNN(E, H, L, nonlinearity="relu")}


@pytest.fixture(autouse=True)
def reference_backend():
    with bptt.use_backend("reference"):
        yield


def torch_lm(cell, V, E, H, L, tie=False, seed=0):
    """encoder/rnn/decoder modules named as word_language_model's RNNModel (float64)."""
    torch.manual_seed(seed)
    m = nn.Module()
    m.encoder = nn.Embedding(V, E)
    m.rnn = TORCH_RNN[cell](E, H, L)
    m.decoder = nn.Linear(H, V)
    nn.init.uniform_(m.encoder.weight, -0.1, 0.1)
    nn.init.uniform_(m.decoder.weight, -0.1, 0.1)
    nn.init.uniform_(m.decoder.bias, -0.1, 0.1)      # nonzero, so a wrong bias shows
    if tie:
        m.decoder.weight = m.encoder.weight
    return m.double()


def torch_state(cell, h):
    return tuple(torch.tensor(s) for s in h) if cell == "lstm" else torch.tensor(h)


@pytest.mark.parametrize("fold", [False, True], ids=["plain", "folded_embedding"])
@pytest.mark.parametrize("cell, L, tie", [("lstm", 2, False), ("gru", 1, False), ("rnn_tanh", 2, True),
                                          ("rnn_relu", 1, False)])
def test_language_model_matches_torch_rnnmodel(cell, L, tie, fold, monkeypatch):
    V, E, H, T, B = 13, 5, 5 if tie else 6, 7, 3
    monkeypatch.setattr(bptt.models, "EMBEDDING_FOLD_ROWS_PER_WORD", 1 if fold else 100)   # T*B = 21
    tm = torch_lm(cell, V, E, H, L, tie)
    bm = bptt.LanguageModel(V, E, H, L, cell=cell, tie_weights=tie, dtype=np.float64, seed=1)
    bm.load_state_dict(tm.state_dict())
    rng = np.random.default_rng(2)
    ids = rng.integers(0, V, (T, B))
    h0 = bm.init_state(B)
    h0 = tuple(rng.standard_normal(s.shape) * 0.5 for s in h0) if cell == "lstm" else rng.standard_normal(h0.shape) * 0.5
    logits, state, cache = bm.forward(ids, h0)
    assert cache.stack.layers[0].projected == fold
    t_h0 = torch_state(cell, h0)
    t_h0 = tuple(s.requires_grad_() for s in t_h0) if cell == "lstm" else t_h0.requires_grad_()
    out, t_state = tm.rnn(tm.encoder(torch.tensor(ids)), t_h0)
    t_logits = tm.decoder(out)
    np.testing.assert_allclose(logits, t_logits.detach().numpy(), rtol=1e-12, atol=1e-14)
    targets = rng.integers(-1, V, (T, B))
    loss, dlogits = cross_entropy(bm.backend, logits, targets)
    t_loss = F.cross_entropy(t_logits.reshape(-1, V), torch.tensor(targets).reshape(-1), ignore_index=-1)
    # a gradient into the final state too, as from a later chunk
    dfinal = tuple(rng.standard_normal(s.shape) for s in state) if cell == "lstm" else rng.standard_normal(state.shape)
    t_final = t_state if cell == "lstm" else (t_state,)
    extra = sum((s * torch.tensor(d)).sum() for s, d in zip(t_final, dfinal if cell == "lstm" else (dfinal,)))
    (t_loss + extra).backward()
    assert loss == pytest.approx(t_loss.item(), rel=1e-13)
    bm.zero_grad()
    dstate = bm.backward(dlogits, cache, dfinal)
    named = dict(tm.named_parameters())
    for name, g in bm.grads.items():
        ref = named[name].grad.numpy()
        np.testing.assert_allclose(g, ref, rtol=1e-10, atol=1e-13 * np.abs(ref).max(), err_msg=name)
    for d, t in zip(dstate if cell == "lstm" else (dstate,), t_h0 if cell == "lstm" else (t_h0,)):
        np.testing.assert_allclose(d, t.grad.numpy(), rtol=1e-10, atol=1e-14)
    # state_dict round trip: names as torch's, tied weight listed twice
    sd = bm.state_dict()
    assert set(sd) == set(tm.state_dict())
    for name, v in tm.state_dict().items():
        np.testing.assert_array_equal(sd[name], v.numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_folded_embedding_matches_plain_path_on_cpu(cell, dtype, monkeypatch):
    """Long chunks over a small vocabulary fold the embedding into level 0's input projection;
    logits, final state, every gradient and d(state) must match the plain path's, also with
    the gradient cut inside the chunk (t_start > 0) and a tied decoder."""
    pytest.importorskip("bptt_kernels.cpu")
    V, E, H, L, T, B, t_start = 7, 6, 6, 2, 9, 4, 3        # T*B = 36 >= 4 V: folds by default
    rng = np.random.default_rng(11)
    ids, targets = rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))

    def parts(name, state):
        return {f"{name}[{k}]": a for k, a in enumerate(state if isinstance(state, tuple) else (state,))}

    results = {}
    with bptt.use_backend("cpu"):
        for fold in (False, True):
            monkeypatch.setattr(bptt.models, "EMBEDDING_FOLD_ROWS_PER_WORD", 4 if fold else 10 ** 9)
            bm = bptt.LanguageModel(V, E, H, L, cell=cell, tie_weights=True, dtype=dtype, seed=3)
            logits, state, cache = bm.forward(ids)
            assert cache.stack.layers[0].projected == fold
            _, dlogits = cross_entropy(bm.backend, logits, targets)
            dstate = bm.backward(dlogits, cache, t_start=t_start)
            results[fold] = {"logits": logits, **parts("state", state), **bm.grads, **parts("dstate", dstate)}
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    for name, want in results[False].items():
        err = np.abs(results[True][name] - want).max() / np.abs(want).max()
        assert err <= rtol, f"{name}: folded path differs from the plain one by {err:.1e}"


def test_initialisation_as_word_language_model():
    bm = bptt.LanguageModel(50, 8, 10, 2, cell="lstm", dtype=np.float64, seed=3)
    sd = bm.state_dict()
    assert np.abs(sd["encoder.weight"]).max() <= 0.1 and np.abs(sd["decoder.weight"]).max() <= 0.1
    assert np.abs(sd["encoder.weight"]).max() > 0.09
    np.testing.assert_array_equal(sd["decoder.bias"], 0)
    bound = 1 / np.sqrt(10)
    for k in range(2):
        w = sd[f"rnn.weight_hh_l{k}"]
        assert w.shape == (40, 10) and np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    assert sd["rnn.weight_ih_l0"].shape == (40, 8) and sd["rnn.weight_ih_l1"].shape == (40, 10)
    # the config rebuilds the same model; another seed gives other weights
    again = type(bm)(**bm.config).state_dict()
    for name in sd:
        np.testing.assert_array_equal(again[name], sd[name])
    other = bptt.LanguageModel(50, 8, 10, 2, cell="lstm", dtype=np.float64, seed=4).state_dict()
    assert not np.array_equal(other["rnn.weight_hh_l1"], sd["rnn.weight_hh_l1"])


def test_dropout_placement_and_gradients_match_torch_with_same_masks():
    """Dropout on embeddings, between levels and on the output (as RNNModel + nn.LSTM(dropout))."""
    V, E, H, L, T, B, p = 11, 4, 5, 3, 6, 2, 0.4
    tm = torch_lm("lstm", V, E, H, L)
    bm = bptt.LanguageModel(V, E, H, L, cell="lstm", dropout=p, dtype=np.float64, seed=5)
    bm.load_state_dict(tm.state_dict())
    ids = np.random.default_rng(6).integers(0, V, (T, B))
    logits, _, cache = bm.forward(ids)
    masks = [cache.emb_mask, *cache.stack.masks, cache.out_mask]
    assert len(masks) == L + 1
    for m in masks:
        assert set(np.unique(m)) <= {0.0, 1 / (1 - p)} and 0 < (m == 0).mean() < 1
    # torch with the same masks, level by level
    x = tm.encoder(torch.tensor(ids)) * torch.tensor(masks[0])
    levels = [nn.LSTM(E if k == 0 else H, H).double() for k in range(L)]
    for k, lv in enumerate(levels):
        sd = tm.rnn.state_dict()
        lv.load_state_dict({n[:-1] + "0": sd[n] for n in sd if n.endswith(str(k))})
        x, _ = lv(x)
        x = x * torch.tensor(masks[k + 1])
    t_logits = tm.decoder(x)
    np.testing.assert_allclose(logits, t_logits.detach().numpy(), rtol=1e-12, atol=1e-14)
    targets = np.random.default_rng(7).integers(0, V, (T, B))
    _, dlogits = cross_entropy(bm.backend, logits, targets)
    F.cross_entropy(t_logits.reshape(-1, V), torch.tensor(targets).reshape(-1)).backward()
    bm.zero_grad()
    bm.backward(dlogits, cache)
    for k, lv in enumerate(levels):
        for n, prm in lv.named_parameters():
            np.testing.assert_allclose(bm.grads["rnn." + n[:-1] + str(k)], prm.grad.numpy(), rtol=1e-10, atol=1e-14)
    for n in ("encoder.weight", "decoder.weight", "decoder.bias"):
        np.testing.assert_allclose(bm.grads[n], dict(tm.named_parameters())[n].grad.numpy(), rtol=1e-10, atol=1e-14)
    # no dropout in evaluation; the masks come from the model's own seeded RNG
    eval_logits, _, eval_cache = bm.forward(ids, train=False)
    assert eval_cache is None
    plain = bptt.LanguageModel(V, E, H, L, cell="lstm", dtype=np.float64, seed=5)
    plain.load_state_dict(tm.state_dict())
    np.testing.assert_allclose(eval_logits, plain.forward(ids, train=False)[0], rtol=1e-14)


@pytest.mark.parametrize("readout", ["every_step", "last_step"])
def test_sequence_model_matches_torch(readout):
    I, H, O, L, T, B = 3, 5, 2, 2, 6, 4
    bm = bptt.SequenceModel(I, H, O, L, cell="gru", readout=readout, dtype=np.float64, seed=8)
    rnn, lin = nn.GRU(I, H, L).double(), nn.Linear(H, O).double()
    sd = bm.state_dict()
    rnn.load_state_dict({k[4:]: torch.tensor(v) for k, v in sd.items() if k.startswith("rnn.")})
    lin.load_state_dict({"weight": torch.tensor(sd["readout.weight"]), "bias": torch.tensor(sd["readout.bias"])})
    rng = np.random.default_rng(9)
    x = rng.standard_normal((T, B, I))
    out, _, cache = bm.forward(x)
    y, _ = rnn(torch.tensor(x))
    t_out = lin(y if readout == "every_step" else y[-1])
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-12, atol=1e-14)
    targets = rng.standard_normal(out.shape)
    loss, dout = mse(bm.backend, out, targets)
    t_loss = F.mse_loss(t_out, torch.tensor(targets))
    t_loss.backward()
    assert loss == pytest.approx(t_loss.item(), rel=1e-13)
    bm.backward(dout, cache)
    for n, prm in list(rnn.named_parameters()):
        np.testing.assert_allclose(bm.grads["rnn." + n], prm.grad.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(bm.grads["readout.weight"], lin.weight.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_model_argument_and_state_dict_errors():
    with pytest.raises(ValueError, match="tie_weights"):
        bptt.LanguageModel(10, 4, 5, tie_weights=True)
    with pytest.raises(ValueError, match="cell"):
        bptt.LanguageModel(10, 4, 5, cell="transformer")
    with pytest.raises(ValueError, match="dropout"):
        bptt.LanguageModel(10, 4, 5, dropout=1.0)
    with pytest.raises(ValueError, match="readout"):
        bptt.SequenceModel(2, 3, 1, readout="mean")
    bm = bptt.LanguageModel(10, 4, 5, dtype=np.float64, seed=0)
    sd = bm.state_dict()
    bad = dict(sd)
    bad["decoder.bias"] = np.zeros(11)
    with pytest.raises(ValueError, match="decoder.bias"):
        bm.load_state_dict(bad)
    bad = dict(sd)
    bad["extra.weight"] = bad.pop("decoder.bias")
    with pytest.raises(ValueError, match="missing.*decoder.bias.*unexpected.*extra.weight"):
        bm.load_state_dict(bad)
    np.testing.assert_array_equal(bm.state_dict()["decoder.bias"], sd["decoder.bias"])   # nothing changed
    with pytest.raises(ValueError, match="token ids"):
        bm.forward(np.array([[0, 10]]))
    with pytest.raises(ValueError, match="int token ids"):
        bm.forward(np.zeros((2, 2)))
    tied = bptt.LanguageModel(10, 5, 5, tie_weights=True, dtype=np.float64, seed=0)
    tsd = tied.state_dict()
    tsd["decoder.weight"] = tsd["decoder.weight"] + 1
    with pytest.raises(ValueError, match="tied"):
        tied.load_state_dict(tsd)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning")
def test_non_finite_values_inside_a_model_show_as_a_non_finite_loss():
    """A user's NaN input is refused at the bottom level, naming the input; a NaN that arises
    inside the model (here from a level's weight) is not scanned for level by level: it
    reaches the outputs, and the trainer reports a non-finite loss."""
    rng = np.random.default_rng(31)
    bm = bptt.SequenceModel(3, 4, 2, num_layers=2, cell="lstm", dtype=np.float64, seed=32)
    x = rng.standard_normal((5, 2, 3))
    x[2, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"contains 1 non-finite value .* index \(2, 1, 0\)"):
        bm.forward(x)
    lm = bptt.LanguageModel(7, 3, 4, num_layers=2, cell="gru", dtype=np.float64, seed=33)
    lm.params["rnn.weight_hh_l0"][1, 2] = np.inf        # level 1 then takes NaN inputs
    logits, _, _ = lm.forward(rng.integers(0, 7, (6, 2)))
    assert not np.isfinite(logits).all()
    trainer = bptt.Trainer(lm, bptt.SGD(0.5), k1=3)
    with pytest.raises(bptt.trainer.NonFiniteError, match="loss"):
        trainer.fit(rng.integers(0, 7, 40), 2)
