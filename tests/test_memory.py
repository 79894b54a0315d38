"""Memory-efficient BPTT (``memory=``, bptt.memory): the contract, the schedules, and the
gradients against the plain path (every activation kept) and torch autograd.

On the reference and cpu backends the gradients, the weights after training, the states and
the dropout masks equal the plain path's bit for bit (``==``), in float64 and float32: every
gradient sum over time runs in the fixed time blocks of ``bptt_kernels.host.blocks`` and the
plans cut only at their boundaries (docs/memory.md, "What is exact"). The loss is a sum the two
paths add in other orders: equal to rounding. The module runs with time blocks of 4 steps, so
that short windows have several; ``test_default_blocks_*`` with the library's 16.
"""

import itertools
import math

import numpy as np
import pytest

import bptt
from bptt import losses, memory
from helpers import rel_err

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def _parts(state):
    return state if isinstance(state, tuple) else (state,)


@pytest.fixture(autouse=True)
def small_time_blocks(monkeypatch):
    monkeypatch.setattr(memory.blocks, "BLOCK_STEPS", 4)
    monkeypatch.setattr(memory.blocks, "BLOCK_ROWS", 0)


def _library_blocks(monkeypatch):
    monkeypatch.setattr(memory.blocks, "BLOCK_STEPS", 16)
    monkeypatch.setattr(memory.blocks, "BLOCK_ROWS", 512)


def _assert_equal(got, want, what):
    assert got.dtype == want.dtype and np.array_equal(got, want), \
        f"{what}: max |diff| {np.max(np.abs(got.astype(np.float64) - want))}"


# ------------------------------------------------------------------ contract


@pytest.mark.parametrize("value, expected", [(None, None), ("sqrt", "sqrt"), (" SQRT ", "sqrt"), (4096, 4096),
                                             ("512M", 512 << 20), ("2G", 2 << 30), ("300K", 300 << 10),
                                             ("1.5G", int(1.5 * (1 << 30))), ("2gb", 2 << 30)])
def test_parse_memory(value, expected):
    assert memory.parse_memory(value) == expected


@pytest.mark.parametrize("value", [0, -5, True, 1.5, "", "abc", "1.5X", "0M", "-2G", [1]])
def test_parse_memory_refuses(value):
    with pytest.raises(ValueError, match=r"^memory must be .*; got ") as e:
        memory.parse_memory(value)
    assert "\n" not in str(e.value)


def test_trainer_records_memory_in_config_and_checkpoint(tmp_path, rng):
    model = bptt.LanguageModel(11, 4, 6, seed=1)
    trainer = bptt.Trainer(model, bptt.SGD(lr=0.1), k1=4, memory="1M")
    assert trainer.memory == 1 << 20 and trainer.config["memory"] == 1 << 20
    trainer.fit(rng.integers(0, 11, 200), batch_size=2, max_steps=3)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    assert bptt.Trainer.from_checkpoint(tmp_path / "c.ckpt").memory == 1 << 20
    sd = trainer.state_dict()
    del sd["config"]["memory"]                                  # a checkpoint saved before memory existed
    fresh = bptt.Trainer(bptt.LanguageModel(11, 4, 6, seed=1), bptt.SGD(lr=0.1), k1=4, memory="sqrt")
    fresh.load_state_dict(sd)
    assert fresh.memory is None


def test_budget_below_the_smallest_fails_before_any_update(rng):
    model = bptt.LanguageModel(11, 4, 6, seed=1)
    before = model.state_dict()
    trainer = bptt.Trainer(model, bptt.SGD(lr=0.1), memory=1000)
    with pytest.raises(ValueError, match=r"^memory=1,000 bytes is below the smallest feasible budget [\d,]+") as e:
        trainer.fit(rng.integers(0, 11, 400), batch_size=2)
    assert "\n" not in str(e.value) and trainer.step == 0
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())
    smallest = int(str(e.value).split("budget ")[1].split(" ")[0].replace(",", ""))
    bptt.Trainer(model, bptt.SGD(lr=0.1), memory=smallest).fit(rng.integers(0, 11, 400), batch_size=2, max_steps=1)


def test_bidirectional_refused():
    model = bptt.SequenceModel(3, 4, 2, bidirectional=True)
    with pytest.raises(ValueError, match="memory='sqrt' needs a unidirectional model"):
        bptt.Trainer(model, bptt.SGD(lr=0.1), memory="sqrt")
    trainer = bptt.Trainer(model, bptt.SGD(lr=0.1))
    with pytest.raises(ValueError, match="memory='sqrt' needs a unidirectional model"):
        trainer.memory = "sqrt"
    assert trainer.memory is None


@pytest.mark.parametrize("bad", [0, "lots", 1.5])
def test_memory_set_between_fits_is_checked_and_changes_nothing_else(bad, rng):
    tokens = rng.integers(0, 11, 300)
    runs = []
    for switches in ([None, None, None], ["sqrt", None, "16K"]):
        trainer = bptt.Trainer(bptt.LanguageModel(11, 4, 6, num_layers=2, seed=1), bptt.Adam(lr=0.01), k1=5)
        for setting in switches:                 # three fits of 2 updates each, memory set before each
            trainer.memory = setting
            trainer.fit(tokens, batch_size=3, max_steps=trainer.step + 2)
        assert trainer.memory == memory.parse_memory(switches[-1]) == trainer.config["memory"]
        with pytest.raises(ValueError, match=r"^memory must be .*; got "):
            trainer.memory = bad
        assert trainer.memory == memory.parse_memory(switches[-1])     # unchanged by the refused value
        runs.append(trainer.model.state_dict())
    for name, value in runs[0].items():
        _assert_equal(runs[1][name], value, name)


@pytest.mark.parametrize("before, after", [(None, "sqrt"), ("sqrt", None), ("4M", None)])
def test_memory_kind_changes_only_where_no_steps_are_carried(before, after, rng):
    tokens = rng.integers(0, 11, 300)              # 2 streams of 150 steps: 30 updates of k1=5 an epoch
    runs = []
    for switch in (False, True):
        trainer = bptt.Trainer(bptt.LanguageModel(11, 4, 6, num_layers=2, seed=1), bptt.Adam(lr=0.01),
                               k1=5, k2=12, memory=before)
        trainer.fit(tokens, batch_size=2, max_steps=3)
        if switch:                                 # mid-epoch with k2 > k1: the ring holds steps
            with pytest.raises(ValueError, match=r"^memory cannot change from .* in the middle of an epoch") as e:
                trainer.memory = after
            assert "\n" not in str(e.value) and trainer.memory == memory.parse_memory(before)
            trainer.memory = {None: None, "sqrt": "64K", "4M": "sqrt"}[before]    # the same kind: allowed
        trainer.fit(tokens, batch_size=2, epochs=1)
        assert trainer.position is None            # an epoch boundary: any setting
        trainer.memory = after if switch else before
        trainer.fit(tokens, batch_size=2, max_steps=trainer.step + 4)
        assert trainer.memory == memory.parse_memory(after if switch else before)
        runs.append(trainer.model.state_dict())
    for name, value in runs[0].items():
        _assert_equal(runs[1][name], value, name)


# ------------------------------------------------------------------ schedules


def _brute_force(n, budget, slot, step, held=1):
    """The least recomputation of any plan of n steps (every tree of splits) within budget."""
    best = math.inf

    def trees(t):
        yield t
        for y in range(1, t):
            for left in trees(y):
                for right in trees(t - y):
                    yield (left, right)

    for pieces in _compositions(n):
        for trees_of in itertools.product(*[list(trees(p)) for p in pieces]):
            cost, peak = memory.simulate(None, list(trees_of), slot, step, held - 1)
            if peak <= budget:
                best = min(best, cost)
    return best


def _compositions(n):
    for cuts in itertools.product((0, 1), repeat=n - 1):
        pieces, size = [], 1
        for c in cuts:
            if c:
                pieces.append(size)
                size = 1
            else:
                size += 1
        yield pieces + [size]


@pytest.mark.parametrize("n", [1, 3, 5, 6])
def test_budget_plan_is_optimal_and_fits(n):
    slot, step = 2, 3
    for budget in range(slot + step, 2 * slot + n * step + 1):
        plan = memory.budget_plan(0, n, budget, slot, step, block=1)
        best = _brute_force(n, budget, slot, step)
        if plan is None:
            assert best == math.inf, (n, budget)
            continue
        assert plan.peak <= budget and plan.recomputed == best, (n, budget, plan, best)
        assert memory.simulate(None, plan.pieces, slot, step) == (plan.recomputed, plan.peak)


@pytest.mark.parametrize("n_old, n_new", [(0, 1000), (0, 100000), (40, 35), (0, 7)])
def test_plans_fit_their_budget_and_cover_the_window(n_old, n_new):
    slot, step = 131072, 450000                       # 2-layer LSTM H=256 B=32, float32
    for fraction in (0.02, 0.05, 0.3):
        budget = int(fraction * (n_old + n_new) * step) + 4 * slot
        plan = memory.budget_plan(n_old, n_new, budget, slot, step)
        if plan is None:
            continue
        assert plan.peak <= budget
        assert sum(memory.plan_steps(p) for p in plan.pieces) == n_new
        assert (plan.old is None) == (n_old == 0) and (not n_old or memory.plan_steps(plan.old) == n_old)


def test_sqrt_plan_pieces():
    plan = memory.sqrt_plan(0, 1000, 1, 1, block=16)
    assert plan.pieces == [32] * 31 + [8] and plan.recomputed == 1000 - 8
    plan = memory.sqrt_plan(20, 80, 1, 1, block=16)    # 10 steps, rounded up to a time block
    assert plan.pieces == [12, 16, 16, 16, 16, 4] and memory.plan_leaves(plan.old) == [16, 4]
    plan = memory.sqrt_plan(20, 80, 1, 1, phase=5, block=16)   # cuts where the stream's step is a multiple of 16
    assert plan.pieces == [7, 16, 16, 16, 16, 9] and memory.plan_leaves(plan.old) == [11, 9]
    plan = memory.sqrt_plan(20, 80, 1, 1, block=1)
    assert plan.pieces == [10] * 8 and memory.plan_leaves(plan.old) == [10, 10]


@pytest.mark.parametrize("phase", [0, 3, 16, 29])
@pytest.mark.parametrize("n_old, n_new", [(0, 1000), (40, 35), (5, 3)])
def test_plan_cuts_lie_on_time_blocks(n_old, n_new, phase):
    """Every cut between leaves is a time block boundary of the stream, or the chunk's first step."""
    slot, step = 131072, 450000
    block = memory.blocks.BLOCK_STEPS
    for plan in (memory.sqrt_plan(n_old, n_new, slot, step, phase=phase),
                 memory.budget_plan(n_old, n_new, int(0.05 * (n_old + n_new) * step) + 8 * slot, slot, step,
                                    phase=phase)):
        if plan is None:
            continue
        leaves = (memory.plan_leaves(plan.old) if plan.old is not None else []) + \
            [n for piece in plan.pieces for n in memory.plan_leaves(piece)]
        cuts = np.cumsum(leaves)[:-1]
        assert all((phase + c) % block == 0 or c == n_old for c in cuts), (plan, phase)
        assert sum(leaves) == n_old + n_new


# ------------------------------------------------------------------ the model-level helper


def _plain(model, inputs, targets):
    out, final, cache = model.forward(inputs)
    if np.asarray(targets).dtype.kind in "iu":
        loss, dout = losses.cross_entropy(model.backend, out, targets)
    else:
        loss, dout = losses.mse(model.backend, out, targets)
    model.backward(dout, cache)
    return loss, final


def _check_same(model, inputs, targets, mem, dtype):
    rng_state = model.rng.bit_generator.state
    model.zero_grad()
    loss0, final0 = _plain(model, inputs, targets)
    grads0 = {k: np.array(model.backend.to_host(g)) for k, g in model.grads.items()}
    rng_after = model.rng.bit_generator.state
    model.rng.bit_generator.state = rng_state
    model.zero_grad()
    loss1, final1 = memory.loss_and_backward(model, inputs, targets, memory=mem)
    assert model.rng.bit_generator.state == rng_after
    for a, b in zip(_parts(final0), _parts(final1)):
        _assert_equal(model.backend.to_host(b), model.backend.to_host(a), "final state")
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    assert abs(loss1 - loss0) <= rtol * abs(loss0)
    for k, g in grads0.items():
        _assert_equal(model.backend.to_host(model.grads[k]), g, k)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_loss_and_backward_language_model(backend, rng, cell, layers, dtype):
    model = bptt.LanguageModel(17, 5, 6, num_layers=layers, cell=cell, dropout=0.25, dtype=dtype, seed=2)
    ids, targets = rng.integers(0, 17, (29, 3)), rng.integers(0, 17, (29, 3))
    for mem in ("sqrt", 32000):
        _check_same(model, ids, targets, mem, dtype)


@pytest.mark.parametrize("readout", ["every_step", "last_step"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_loss_and_backward_sequence_model(backend, rng, readout, dtype):
    model = bptt.SequenceModel(3, 5, 2, num_layers=2, cell="lstm", readout=readout, dtype=dtype, seed=4)
    x = rng.standard_normal((23, 4, 3)).astype(dtype)
    y = rng.standard_normal((23, 4, 2) if readout == "every_step" else (4, 2)).astype(dtype)
    _check_same(model, x, y, "sqrt", dtype)


# ------------------------------------------------------------------ the trainer


def _train(mem, data, resets, k1, k2, cell="lstm", steps=10, dtype=np.float64):
    model = bptt.LanguageModel(13, 6, 7, num_layers=2, cell=cell, dropout=0.3, dtype=dtype, seed=3)
    trainer = bptt.Trainer(model, bptt.SGD(lr=0.5), k1=k1, k2=k2, clip_norm=1.0, memory=mem,
                           record_grad_norms=True)
    trainer.fit(data, batch_size=3, max_steps=steps, reset_mask=resets)
    return trainer


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("k1, k2", [(8, 8), (6, 15)])
def test_trainer_language_model_matches_plain(backend, rng, cell, k1, k2):
    data = rng.integers(0, 13, 600)
    resets = rng.random(600) < 0.03
    plain = _train(None, data, resets, k1, k2, cell)
    for mem in ("sqrt", 30000):
        ours = _train(mem, data, resets, k1, k2, cell)
        assert ours.model.rng.bit_generator.state == plain.model.rng.bit_generator.state
        for k, p in plain.model.params.items():
            _assert_equal(ours.model.params[k], p, k)
        assert np.allclose(ours.history["loss"], plain.history["loss"], rtol=1e-12, atol=0)
        for d0, d1 in zip(plain.history["grad_diagnostics"], ours.history["grad_diagnostics"]):
            assert d1["dh_norms"] == d0["dh_norms"] and d1["param_grad_norms"] == d0["param_grad_norms"]


@pytest.mark.parametrize("k1, k2", [(None, None), (6, 15), (5, 5)])
def test_trainer_float32_equals_plain(backend, rng, k1, k2):
    data = rng.integers(0, 13, 600)
    resets = rng.random(600) < 0.03
    plain = _train(None, data, resets, k1, k2, "gru", dtype=np.float32, steps=4)
    ours = _train("sqrt", data, resets, k1, k2, "gru", dtype=np.float32, steps=4)
    assert ours.model.rng.bit_generator.state == plain.model.rng.bit_generator.state
    for k, p in plain.model.params.items():
        _assert_equal(ours.model.params[k], p, k)


@pytest.mark.parametrize("cell", ["lstm", "rnn_relu"])
def test_default_blocks_equal_plain(backend, rng, monkeypatch, cell):
    """Time blocks of 16 steps (the library's BLOCK_STEPS; B = 3 would take 256 with its
    BLOCK_ROWS): full BPTT over 140 steps and TBPTT(20, 45) with resets, cut at those blocks and
    at the chunks' and windows' first steps."""
    _library_blocks(monkeypatch)
    monkeypatch.setattr(memory.blocks, "BLOCK_ROWS", 0)
    data = rng.integers(0, 13, 400)
    resets = rng.random(400) < 0.02
    for k1, k2 in ((None, None), (20, 45)):
        stream = data[:141] if k1 is None else data
        plain = _train(None, stream, resets[:stream.size], k1, k2, cell, steps=3)
        for mem in ("sqrt", 100000):
            ours = _train(mem, stream, resets[:stream.size], k1, k2, cell, steps=3)
            for k, p in plain.model.params.items():
                _assert_equal(ours.model.params[k], p, k)


@pytest.mark.parametrize("B, I, H, L, cell", [(1, 16, 256, 2, "lstm"), (4, 16, 64, 2, "gru"),
                                              (8, 32, 128, 1, "rnn_tanh"), (32, 32, 256, 2, "lstm")])
def test_realistic_sizes_equal_plain(rng, monkeypatch, B, I, H, L, cell):
    """cpu, float32, the library's time blocks (at least 16 steps and 512 rows: B = 1 blocks of
    512 steps, B = 32 of 16), the machine's threads: shapes where OpenBLAS takes its
    small-matrix kernels for some calls and not others, and where a layer call of the whole
    window and one of a piece would otherwise run on different threads."""
    _library_blocks(monkeypatch)
    T = max(150, 3 * memory.blocks.block_steps(B) + 10)      # several blocks
    with bptt.use_backend("cpu"):
        model = bptt.SequenceModel(I, H, 4, num_layers=L, cell=cell, dtype=np.float32, seed=4)
        x = rng.standard_normal((T, B, I)).astype(np.float32)
        y = rng.standard_normal((T, B, 4)).astype(np.float32)
        block = memory.blocks.block_steps(B)
        for mem in ("sqrt", 3 * memory.state_bytes(model, B) + 2 * block * memory.step_bytes(model, B, T)):
            _check_same(model, x, y, mem, np.float32)


@pytest.mark.parametrize("readout", ["every_step", "last_step"])
def test_trainer_sequence_model_full_bptt(backend, rng, readout):
    x = rng.standard_normal((6, 40, 3))
    y = rng.integers(0, 2, (6, 40) if readout == "every_step" else (6,))
    weights = []
    for mem in (None, "sqrt"):
        model = bptt.SequenceModel(3, 5, 2, num_layers=3, cell="gru", readout=readout, dtype=np.float64, seed=5)
        bptt.Trainer(model, bptt.Adam(lr=0.01), memory=mem).fit((x, y), batch_size=3, epochs=2)
        weights.append(model.state_dict())
    for k, w in weights[0].items():
        _assert_equal(weights[1][k], w, k)


@pytest.mark.parametrize("readout", ["every_step", "last_step"])
def test_trainer_sequence_model_tbptt(rng, readout):
    """k2 > k1 where the early chunks of a last-step task carry no loss (no update, ring kept)."""
    x = rng.standard_normal((8, 17, 3))
    y = rng.standard_normal((8, 17, 2) if readout == "every_step" else (8, 2))
    weights = []
    for mem in (None, "sqrt", 30000):
        model = bptt.SequenceModel(3, 5, 2, num_layers=2, cell="lstm", readout=readout, dtype=np.float64, seed=5)
        trainer = bptt.Trainer(model, bptt.SGD(lr=0.3), k1=4, k2=7, memory=mem)
        trainer.fit((x, y), batch_size=4, epochs=2)
        weights.append(model.state_dict())
    for other in weights[1:]:
        for k, w in weights[0].items():
            _assert_equal(other[k], w, k)


def test_resume_mid_epoch_with_memory(tmp_path, rng):
    data = rng.integers(0, 13, 600)
    resets = rng.random(600) < 0.03
    whole = _train(30000, data, resets, 6, 15, steps=12)
    first = _train(30000, data, resets, 6, 15, steps=5)
    assert first.position is not None and first.position.ring
    first.save_checkpoint(tmp_path / "c.ckpt")
    resumed = bptt.Trainer.from_checkpoint(tmp_path / "c.ckpt")
    resumed.fit(data, batch_size=3, max_steps=12, reset_mask=resets)
    for k, p in whole.model.params.items():
        assert np.array_equal(resumed.model.params[k], p), k


# ------------------------------------------------------------------ dropout replay, oracles, backends


def test_replay_draws_the_plain_forward_masks(rng):
    """The masks of steps [a, b) of a call over T steps, per site, are rows a..b-1 of the
    blocks the call draws in order from the RNG, without touching it."""
    gen = np.random.default_rng(int(rng.integers(1 << 30)))
    start = gen.bit_generator.state
    T, B, widths = 11, 3, (4, 7, 5)
    blocks = [gen.random((T, B, w)) for w in widths]              # the plain call's draws
    for a, b in ((0, 4), (4, 5), (5, 11), (0, 11)):
        replay = memory.Replay(start, T, a, rows=T * B)
        for w, block in zip(widths, blocks):
            assert np.array_equal(replay.draw((b - a, B, w)), block[a:b])
        assert replay.drawn == T * B * sum(widths)


@pytest.mark.parametrize("cell", CELLS)
def test_checkpointed_gradients_match_torch(rng, cell):
    torch = pytest.importorskip("torch")
    T, B, I, H, O, L = 19, 3, 4, 5, 2, 2
    model = bptt.SequenceModel(I, H, O, num_layers=L, cell=cell, dtype=np.float64, seed=6)
    x, y = rng.standard_normal((T, B, I)), rng.standard_normal((T, B, O))
    model.zero_grad()
    loss, _ = memory.loss_and_backward(model, x, y, memory=16000)
    kind = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(cell)
    rnn = kind(I, H, L, dtype=torch.float64) if kind else \
        torch.nn.RNN(I, H, L, nonlinearity=cell[4:], dtype=torch.float64)
    readout = torch.nn.Linear(H, O, dtype=torch.float64)
    weights = model.state_dict()
    rnn.load_state_dict({k[4:]: torch.tensor(v) for k, v in weights.items() if k.startswith("rnn.")})
    readout.load_state_dict({k[8:]: torch.tensor(v) for k, v in weights.items() if k.startswith("readout.")})
    out = readout(rnn(torch.tensor(x))[0])
    want = torch.nn.functional.mse_loss(out, torch.tensor(y))
    want.backward()
    assert abs(loss - want.item()) <= 1e-12 * want.item()
    grads = {**{"rnn." + k: p.grad for k, p in rnn.named_parameters()},
             **{"readout." + k: p.grad for k, p in readout.named_parameters()}}
    for k, g in grads.items():
        assert rel_err(model.grads[k], g.numpy()) <= 1e-10, k


def test_nonfinite_window_is_skipped_with_memory(rng):
    data = rng.integers(0, 13, 300)
    model = bptt.LanguageModel(13, 6, 7, num_layers=2, dtype=np.float64, seed=3)
    model.params["decoder.bias"][4] = np.inf
    trainer = bptt.Trainer(model, bptt.SGD(lr=0.1), k1=5, k2=9, memory="sqrt", on_nonfinite="skip")
    history = trainer.fit(data, batch_size=2, max_steps=3)
    assert len(history["skipped"]) == 30 and all(history["skipped"]) and trainer.step == 0
    assert trainer.position is None                     # the epoch ran to its end, nothing updated
    with pytest.raises(bptt.trainer.NonFiniteError, match="non-finite loss"):
        bptt.Trainer(model, bptt.SGD(lr=0.1), k1=5, memory="sqrt").fit(data, batch_size=2, max_steps=1)


def test_docs_memory_example_runs():
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "memory.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/memory.md", "exec"), {})


def test_trainer_on_the_emulated_cupy_backend(monkeypatch, rng):
    """The checkpointed path is host logic over model.forward/backward: on the host emulation of
    the CuPy backend it trains as the plain path there."""
    from bptt import backend as dispatch
    host_emulation = pytest.importorskip("bptt_kernels.cupy.host_emulation")
    if host_emulation.find_compiler() is None:
        pytest.skip("no host C++ compiler (g++/c++/clang++) to build the kernels")
    monkeypatch.setattr(dispatch, "_current", host_emulation.host_backend(reverse=True))
    data = rng.integers(0, 13, 300)
    resets = rng.random(300) < 0.03
    plain = _train(None, data, resets, 5, 9, steps=5)
    ours = _train("sqrt", data, resets, 5, 9, steps=5)
    assert ours.model.backend.NAME == plain.model.backend.NAME == "cupy-host"
    for k, p in plain.model.params.items():
        assert rel_err(ours.model.backend.to_host(ours.model.params[k]), plain.model.backend.to_host(p)) <= 1e-12, k
