"""The time blocks of the gradient sums (``bptt_kernels.host.blocks``, ``t_origin``): a layer
backpropagated in one call, or in calls that meet at block boundaries, gets the same parameter
gradients bit for bit on the reference and cpu backends (float64 and float32, every cell, with
t_start, with the caller's projected input, one thread and two).
"""

import numpy as np
import pytest

import bptt_kernels.cpu as cpu
import bptt_kernels.reference as ref
from bptt_kernels import CELLS
from bptt_kernels.host import blocks
from helpers import force_unit_split, random_layer_problem


@pytest.mark.parametrize("t_start, T, t_origin, want", [
    (0, 40, 0, [40, 32, 16, 0]),
    (0, 40, 5, [40, 27, 11, 0]),          # boundaries where the stream's step is a multiple of 16
    (13, 40, 5, [40, 27, 13]),
    (0, 16, 16, [16, 0]),
    (3, 4, 100, [4, 3]),
])
def test_time_blocks(t_start, T, t_origin, want):
    assert blocks.time_blocks(t_start, T, t_origin, 32).tolist() == want          # B = 32: 16 steps
    assert blocks.time_blocks(t_start, T, t_origin, 32, blocked=False).tolist() == [T, t_start]


@pytest.mark.parametrize("B, steps", [(1, 512), (7, 128), (8, 64), (16, 32), (32, 16), (1000, 16)])
def test_block_steps_hold_at_least_512_rows(B, steps):
    assert blocks.block_steps(B) == steps
    assert blocks.time_blocks(0, 1000, 0, B).tolist()[:2] == [1000, 1000 - 1000 % steps]


def _grads(be, cell, p, x, state, dy, dfinal, t_start, t_origin, projected):
    """Forward and backward of one call -> (dx, dstate, the four gradients)."""
    w_ih = None if projected else p["w_ih"]
    fwd, bwd = getattr(be, f"{cell}_forward"), getattr(be, f"{cell}_backward")
    _, final, cache = fwd(x, state, w_ih, p["w_hh"], p["b_ih"], p["b_hh"])
    grads = [g.copy() for g in p["grads0"]]
    if projected:
        grads[0] = None
    dx, dstate, _ = bwd(dy, dfinal, cache, w_ih, p["w_hh"], *grads, t_start=t_start, t_origin=t_origin)
    return final, dx, dstate, grads


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("projected", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("be", [ref, cpu], ids=["reference", "cpu"])
@pytest.mark.parametrize("cell", CELLS)
def test_calls_meeting_at_block_boundaries_sum_as_one(monkeypatch, rng, cell, be, dtype, projected, threads):
    """Steps [0, 37) of a stream starting at step 6 with blocks of 8: one call, against calls
    [0, 10) [10, 18) [18, 37) (10 and 18 are boundaries: 6 + 10 = 16, 6 + 18 = 24), the later
    call first, each gradient accumulated onto the last's; also from t_start = 4."""
    monkeypatch.setattr(blocks, "BLOCK_STEPS", 8)
    monkeypatch.setattr(blocks, "BLOCK_ROWS", 0)
    if threads == 2:
        force_unit_split(monkeypatch, 2)
    T, B, I, H, origin = 37, 3, 5, 7, 6
    p = random_layer_problem(rng, cell, T, B, I, H, dtype)
    x = (p["x"] @ p["w_ih"].T).astype(dtype) if projected else p["x"]
    for t_start in (0, 4):
        _, dx, dstate, grads = _grads(be, cell, p, x, p["state"], p["dy"], p["dfinal"], t_start, origin, projected)
        cuts, state, states = [0, 10, 18, T], p["state"], []
        for a, b in zip(cuts, cuts[1:]):                        # forward call by call
            states.append(state)
            state = getattr(be, f"{cell}_forward")(x[a:b], state, None if projected else p["w_ih"], p["w_hh"],
                                                   p["b_ih"], p["b_hh"])[1]
        dnext, pieces = p["dfinal"], {"grads0": p["grads0"]}
        for k in reversed(range(3)):                            # backward call by call, last first
            a, b = cuts[k], cuts[k + 1]
            if b <= t_start:
                break
            q = dict(p, **pieces)
            _, dx_k, dnext, g = _grads(be, cell, q, x[a:b], states[k], p["dy"][a:b], dnext, max(0, t_start - a),
                                       origin + a, projected)
            pieces = {"grads0": tuple(p["grads0"][0] if projected and i == 0 else gi for i, gi in enumerate(g))}
            assert np.array_equal(dx_k[max(0, t_start - a):], dx[max(a, t_start):b])
        for i, g in enumerate(grads):
            if g is not None:
                assert np.array_equal(pieces["grads0"][i], g), (i, np.max(np.abs(pieces["grads0"][i] - g)))
        for d_split, d_one in zip(dnext, dstate):
            assert np.array_equal(d_split, d_one)


def test_t_origin_is_checked(rng):
    p = random_layer_problem(rng, "gru", 5, 2, 3, 4, np.float64)
    _, _, cache = cpu.gru_forward(p["x"], p["state"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])
    args = (p["dy"], p["dfinal"], cache, p["w_ih"], p["w_hh"], *[g.copy() for g in p["grads0"]])
    with pytest.raises(ValueError, match=r"^t_origin must be >= 0, got -1$"):
        cpu.gru_backward(*args, t_origin=-1)
    with pytest.raises(TypeError, match=r"^t_origin must be an int, got float$"):
        ref.gru_backward(*args, t_origin=2.0)


# ------------------------------------------------------------------ rounding that does not depend on the call


@pytest.mark.parametrize("m", [1, 2, 5, 31, 200])
@pytest.mark.parametrize("n, k", [(1024, 32), (64, 256), (16, 1024)])
def test_rows_round_alike_in_calls_of_any_size(rng, m, n, k):
    """A row of x W^T or of x W is the same bit for bit in a call of m rows as in one of 600
    (OpenBLAS's small-matrix kernels, which a call of few rows would take, sum in another
    order): the cpu backend's rows_product and the host's rows_matmul."""
    from bptt_kernels.cpu._blas import rows_product
    from bptt_kernels.host.rows import rows_matmul
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((600, k)).astype(dtype)
        w = rng.standard_normal((n, k)).astype(dtype)
        wt = np.ascontiguousarray(w.T)
        for b, transposed in ((w, True), (wt, False)):
            whole, part = np.empty((600, n), dtype), np.full((m, n), np.nan, dtype)
            rows_product(x, b, whole, transposed)
            rows_product(x[7:7 + m], b, part, transposed)
            assert np.array_equal(part, whole[7:7 + m])
        assert np.array_equal(rows_matmul(x[7:7 + m], wt), rows_matmul(x, wt)[7:7 + m])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, I, H", [(1, 16, 256), (3, 32, 64), (32, 32, 256)])
@pytest.mark.parametrize("cell", CELLS)
def test_forward_cut_anywhere_equals_one_call(monkeypatch, rng, cell, B, I, H, threads):
    """cpu, float32: steps [0, 70) forward in one call, and in calls cut at 1, 17 and 60 from
    the states between: the same y bit for bit (a call's threads, pieces and products do not
    depend on its length)."""
    from bptt_kernels.cpu import _loop
    monkeypatch.setattr(_loop, "THREADS", threads)
    T = 70
    p = random_layer_problem(rng, cell, T, B, I, H, np.float32)
    fwd = getattr(cpu, f"{cell}_forward")
    y, _, _ = fwd(p["x"], p["state"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])
    cuts, state, pieces = [0, 1, 17, 60, T], p["state"], []
    for a, b in zip(cuts, cuts[1:]):
        y_ab, state, _ = fwd(p["x"][a:b], state, p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])
        pieces.append(y_ab)
    assert np.array_equal(np.concatenate(pieces), y)
