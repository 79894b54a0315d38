"""Memory-efficient backpropagation through time: keep the recurrent state at a few steps,
recompute the activations between them during backward (docs/memory.md).

``memory`` (of :class:`bptt.Trainer` and :func:`loss_and_backward`) is read by
:func:`parse_memory`:

* ``None``: every activation of a window is kept (the plain forward/backward);
* ``"sqrt"``: the state of every level is kept every ~sqrt(n) steps of an n-step window;
* a budget in bytes (an int, or a string ``"512M"``, ``"2G"``, ``"300K"``, ``"1.5G"``): the
  schedule with the least recomputation whose counted peak fits the budget.
"""

import contextlib
import functools
import math
import re

import numpy as np

from bptt.batches import Group, Record, reset_rows
from bptt_kernels import GATES
from bptt_kernels.host import blocks

__all__ = ["parse_memory", "memory_for", "loss_and_backward", "state_bytes", "step_bytes", "plan_window", "smallest_budget",
           "sqrt_plan", "budget_plan", "simulate", "BudgetError", "WindowPlan", "Window", "Windows", "Replay"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_EXPECTED = "None, 'sqrt', a positive int of bytes or a size like '512M', '2G', '300K', '1.5G'"


def parse_memory(value):
    """``memory`` -> None | "sqrt" | int bytes (K, M, G, T are powers of 1024).

    ValueError in one line naming ``memory``, what it expects and what it got otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() == "sqrt":
            return "sqrt"
        match = _BUDGET.match(value)
        if match:
            size = float(match.group(1)) * _UNITS[match.group(2).upper()]
            if size >= 1 and math.isfinite(size):
                return int(size)
    elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 1:
        return int(value)
    raise ValueError(f"memory must be {_EXPECTED}; got {type(value).__name__} {value!r}")


def memory_for(model, value):
    """``value`` as :func:`parse_memory` reads it, for ``model``: ValueError in one line for a
    bidirectional model with memory set."""
    memory = parse_memory(value)
    if memory is not None and getattr(model, "bidirectional", False):
        raise ValueError(f"memory={memory!r} needs a unidirectional model: the reverse direction of a "
                         f"bidirectional stack starts from the sequence's end, so its states cannot be "
                         f"kept at boundaries and replayed forward; use memory=None")
    return memory


def state_bytes(model, batch_size):
    """Bytes of one boundary state of ``model``'s stack: h [L,B,H] (LSTM: and c) of B rows."""
    parts = 2 if model.cell == "lstm" else 1
    return parts * model.num_layers * batch_size * model.hidden_size * model.dtype.itemsize


def step_bytes(model, batch_size, call_steps=1):
    """Bytes one step of B rows holds while it is backpropagated with its activations kept: the
    caches of every level and dropout mask (measured on a forward of one and of two steps, as
    part of a forward call of ``call_steps`` steps: a language model folds its embedding into
    level 0's projection as that call does; the model's RNG untouched), the outputs (a language
    model's logits, then their gradient in the same buffer) and the backward's per-step arrays
    (dL/dy of the level above, dL/dx, dL/dgates and dL/dh of a level: B (G + 3) H floats; with
    the embedding folded, also dL/d(x W_ih^T) of level 0: B G H)."""
    be = model.backend
    sizes, G = [], GATES[model.cell]
    for T in (1, 2):
        if hasattr(model, "vocab_size"):
            inputs = np.zeros((T, batch_size), np.int64)
        else:
            inputs = be.zeros((T, batch_size, model.input_size), model.dtype)
        model.replay = Replay(model.rng.bit_generator.state, T, 0, max(call_steps, T) * batch_size)
        try:
            out, _, cache = model.forward(inputs, train=True)
        finally:
            model.replay = None
        sizes.append(_cache_nbytes(cache) + out.nbytes)
    folded = cache.stack.layers[0].projected
    scratch = batch_size * (G + 3 + G * folded) * model.hidden_size * model.dtype.itemsize
    return sizes[1] - sizes[0] + scratch


def _cache_nbytes(cache):
    """Bytes of the arrays of a model's cache (through its ``to_dict``, arrays left in place)."""
    def walk(item):
        if isinstance(item, dict):
            return sum(walk(v) for v in item.values())
        if isinstance(item, (list, tuple)):
            return sum(walk(v) for v in item)
        return int(getattr(item, "nbytes", 0))
    return walk(cache.to_dict(lambda a: a))


# ------------------------------------------------------------------------------------------
# Replaying part of a forward call


class Replay:
    """Steps [offset, offset + t) of a forward call over ``steps`` steps that began with the
    dropout RNG in ``rng_state``: :meth:`draw` gives the masks' uniforms that call drew for
    these steps. The call drew one [steps, B, F_j] block per dropout site j in order, one 64-bit
    draw per float (numpy's PCG64), so site j's rows of step ``offset`` start
    sum_{i<j} steps B F_i + offset B F_j draws after ``rng_state``. ``rows``: the call's T*B
    (a language model folds its embedding as that call did)."""

    def __init__(self, rng_state, steps, offset, rows):
        self.rng_state, self.steps, self.offset, self.rows = rng_state, steps, offset, rows
        self.drawn = 0                  # draws of the whole call's sites so far

    def draw(self, shape):
        """Uniforms [t, B, F...] of the next dropout site at these steps."""
        width = int(np.prod(shape[1:]))
        bits = np.random.PCG64()
        bits.state = self.rng_state
        bits.advance(self.drawn + self.offset * width)
        self.drawn += self.steps * width
        return np.random.Generator(bits).random(shape)


def advance_rng(rng, draws):
    """Move ``rng`` (a PCG64 Generator) on by ``draws`` 64-bit draws."""
    if draws:
        rng.bit_generator.advance(draws)


# ------------------------------------------------------------------------------------------
# Schedules
#
# A plan of n steps whose entering state is kept is a leaf (an int n: run the n steps forward
# keeping their activations, backpropagate them) or a split (left, right): run the left plan's
# steps forward without keeping activations, keep the state after them (one more slot), do the
# right plan, drop that state, then do the left plan. A window of the trainer (steps [w0, t1))
# is an ``old`` plan over the steps before the chunk (k2 > k1: recomputed from the kept state
# at w0) and the chunk's top-level ``pieces``: the first pass runs the chunk forward once (for
# its loss and the carried state) and keeps the state entering every piece; backward takes the
# pieces last first, each by its plan. A last piece that is a leaf keeps its activations from
# the first pass (nothing recomputed).
#
# Every cut between leaves lies on a time block boundary of the backward's gradient sums
# (bptt_kernels.host.blocks: stream steps that are multiples of ``block``), or at the window's
# or the chunk's first step: backpropagated leaf by leaf, the window then sums the same blocks
# in the same order as one backward call over it, and the gradients are the same bit for bit.
# A plan's steps count from the window's first step, which is ``phase`` steps past a boundary.

DP_UNITS = 128     # the budget's dynamic program runs over at most this many units of steps


def _boundaries(a, b, k, phase):
    """[a, the steps strictly between a and b that lie on a boundary of k-step units (step r
    with (phase + r) % k == 0), b]."""
    first = a + 1 + (-(phase + a + 1)) % k
    return [a] + list(range(first, b, k)) + [b]


def _sizes(bounds):
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _chain_of(sizes):
    """The plan running pieces of these sizes one after the other, each kept state after the last."""
    return sizes[0] if len(sizes) == 1 else (sizes[0], _chain_of(sizes[1:]))


def plan_steps(plan):
    """Steps a plan covers."""
    return plan if isinstance(plan, int) else plan_steps(plan[0]) + plan_steps(plan[1])


def plan_leaves(plan):
    """The leaf lengths of a plan, in step order (every forward runs leaf by leaf)."""
    if isinstance(plan, int):
        return [plan]
    return plan_leaves(plan[0]) + plan_leaves(plan[1])


class WindowPlan:
    """old: None or the plan of the steps before the chunk; pieces: plans of the chunk's
    top-level pieces; recomputed: steps run forward a second time (or more) during backward;
    peak: the counted bytes at the peak (:func:`simulate`)."""

    def __init__(self, old, pieces, recomputed, peak):
        self.old, self.pieces, self.recomputed, self.peak = old, pieces, recomputed, peak

    def __repr__(self):
        return (f"WindowPlan(old={self.old}, pieces={self.pieces}, recomputed={self.recomputed}, "
                f"peak={self.peak})")


def _tree_cost(plan, held, slot, step):
    """(steps recomputed, counted peak bytes) of backpropagating ``plan`` with ``held`` states
    kept: a leaf holds its steps' activations, a split first runs its left leaves forward."""
    if isinstance(plan, int):
        return plan, held * slot + plan * step
    left, right = plan
    cost_r, peak_r = _tree_cost(right, held + 1, slot, step)
    cost_l, peak_l = _tree_cost(left, held, slot, step)
    forward_peak = held * slot + max(plan_leaves(left)) * step
    return plan_steps(left) + cost_r + cost_l, max(forward_peak, peak_r, peak_l)


def simulate(old, pieces, slot, step, held=0):
    """(steps recomputed, counted peak bytes) of a window plan, as the executor runs it:
    ``held`` states kept throughout (those kept for later windows), one more for the window's
    first state when there are old steps; the first pass keeps the state entering each piece
    while it runs the pieces' leaves; backward takes the pieces last first."""
    base = held + (old is not None)
    recomputed, peak = 0, 0
    for i, piece in enumerate(pieces):                                  # the first pass
        peak = max(peak, (base + i + 1) * slot + max(plan_leaves(piece)) * step)
    for i in reversed(range(len(pieces))):
        if i == len(pieces) - 1 and isinstance(pieces[i], int):
            continue                                                    # kept from the first pass
        cost, p = _tree_cost(pieces[i], base + i + 1, slot, step)
        recomputed, peak = recomputed + cost, max(peak, p)
    if old is not None:
        cost, p = _tree_cost(old, held + 1, slot, step)
        recomputed, peak = recomputed + cost, max(peak, p)
    return recomputed, peak


def sqrt_plan(n_old, n_new, slot, step, held=0, phase=0, block=None):
    """Pieces of k steps over the window of n = n_old + n_new steps, k = ceil(sqrt(n)) rounded
    up to whole time blocks of ``block`` steps, cut where the stream's step is a multiple of k
    (the window's first step is ``phase`` steps past one; ``block`` None: BLOCK_STEPS; the
    trainer passes ``blocks.block_steps(B)``)."""
    block = block or blocks.BLOCK_STEPS
    k = block * math.ceil(math.ceil(math.sqrt(n_old + n_new)) / block)
    old = _chain_of(_sizes(_boundaries(0, n_old, k, phase))) if n_old else None
    pieces = _sizes(_boundaries(n_old, n_old + n_new, k, phase))
    return WindowPlan(old, pieces, *simulate(old, pieces, slot, step, held))


def _units_to_steps(plan, first, bounds):
    """A plan over units (unit ``first`` on) as a plan over steps; unit u is steps
    bounds[u] .. bounds[u+1]-1."""
    if isinstance(plan, int):
        return bounds[first + plan] - bounds[first]
    size = plan_steps(plan[0])
    return (_units_to_steps(plan[0], first, bounds), _units_to_steps(plan[1], first + size, bounds))


def _budget_tables(budget, slot, unit_bytes, units, held):
    """Gruslys et al.'s dynamic program over units: Q[t, j] the least units recomputed to
    backpropagate t units with j states kept (leaf if its activations fit beside them, else the
    best first split y: y + Q[t - y, j + 1] + Q[y, j]); F[t, j] the same for the chunk's
    top-level pieces, whose forward the first pass makes (a kept last leaf costs 0). Returns
    (Q, F, the best y of each)."""
    J = held + units + 2
    Q, F = np.full((units + 1, J + 1), np.inf), np.full((units + 1, J + 1), np.inf)
    Qy, Fy = np.zeros((units + 1, J + 1), np.int64), np.zeros((units + 1, J + 1), np.int64)
    Q[0, :] = F[0, :] = 0
    top = min(J, (budget - unit_bytes) // slot + 1)     # from j = top on not one unit fits: all inf
    for j in reversed(range(held, top)):
        fits = max(0, (budget - j * slot) // unit_bytes)           # units of activations beside j states
        for t in range(1, units + 1):
            if t <= fits:
                Q[t, j], F[t, j] = t, 0
                continue
            ys = np.arange(1, t)
            if not len(ys):
                continue
            q = ys + Q[t - ys, j + 1] + Q[ys, j]
            f = Q[ys, j] + F[t - ys, j + 1]
            Qy[t, j], Fy[t, j] = ys[np.argmin(q)], ys[np.argmin(f)]
            Q[t, j], F[t, j] = q.min(), f.min()
    return Q, F, Qy, Fy


def budget_plan(n_old, n_new, budget, slot, step, held=0, phase=0, block=None):
    """The plan of least recomputation whose counted peak fits ``budget`` bytes (None if none
    does), over units of g steps: the fewest whole time blocks of ``block`` steps with at most
    DP_UNITS units in the window, cut where the stream's step is a multiple of g (the window's
    first step is ``phase`` steps past one; the units at the window's ends and at the chunk's
    first step may be shorter, and count as long as the longest; ``block`` None: BLOCK_STEPS)."""
    block = block or blocks.BLOCK_STEPS
    return _budget_plan(n_old, n_new, int(budget), int(slot), int(step), held, phase % block, block)


@functools.lru_cache(maxsize=64)
def _budget_plan(n_old, n_new, budget, slot, step, held, phase, block):
    g = block * math.ceil(math.ceil((n_old + n_new) / DP_UNITS) / block)
    old_bounds = _boundaries(0, n_old, g, phase) if n_old else [0]
    new_bounds = _boundaries(n_old, n_old + n_new, g, phase)
    u_old, u_new = len(old_bounds) - 1, len(new_bounds) - 1
    unit = max(_sizes(old_bounds) + _sizes(new_bounds))         # steps of the longest unit
    Q, F, Qy, Fy = _budget_tables(budget, slot, unit * step, u_old + u_new, held)

    def q_tree(t, j):
        y = int(Qy[t, j])
        return t if y == 0 else (q_tree(y, j), q_tree(t - y, j + 1))

    def f_pieces(t, j):
        if F[t, j] == 0:
            return [t]
        y = int(Fy[t, j])
        return [q_tree(y, j)] + f_pieces(t - y, j + 1)

    first = held + 1 + (n_old > 0)                 # states kept while the first piece is done
    if not math.isfinite(F[u_new, first]) or (n_old and not math.isfinite(Q[u_old, held + 1])):
        return None
    old = _units_to_steps(q_tree(u_old, held + 1), 0, old_bounds) if n_old else None
    pieces, at = [], 0
    for piece in f_pieces(u_new, first):
        pieces.append(_units_to_steps(piece, at, new_bounds))
        at += plan_steps(piece)
    recomputed, peak = simulate(old, pieces, slot, step, held)
    return WindowPlan(old, pieces, recomputed, peak)


# ------------------------------------------------------------------------------------------
# Running a window by its plan


@contextlib.contextmanager
def _weights(model, weights):
    """Run with ``weights`` ({name: array}) in place of the model's (None: as they are)."""
    if weights is None:
        yield
        return
    current = {name: model.params[name].copy() for name in weights}
    try:
        for name, w in weights.items():
            model.params[name][...] = w
        yield
    finally:
        for name, w in current.items():
            model.params[name][...] = w


def forward_weights(model):
    """Copies of the parameters a forward of the recurrent stack reads ({name: array})."""
    return {name: p.copy() for name, p in model.params.items() if name.startswith("rnn.") or name == "encoder.weight"}


class Window:
    """Backpropagation of steps [w0, t1) of a group ``rows`` by ``plan`` (a :class:`WindowPlan`
    over steps [records[0].s0, t1)) through ``records`` (:class:`bptt.batches.Record`, covering
    [records[0].s0, t1) in order, the first one holding the state entering its s0 <= w0, a time
    block boundary or a segment's first step: the steps before w0 are run forward only).

    The steps of the chunk [t0, t1) carry the loss (``divisor``: the mean's count; ``loss_terms``:
    whether this chunk has any). ``on_dh(dh_list)``: called with each backward call's per-level
    dL/dh (newest steps first), or None.
    """

    def __init__(self, model, rows, records, t0, divisor, loss_terms, plan, w0=None, on_dh=None):
        self.model, self.rows, self.records, self.t0, self.plan = model, rows, records, t0, plan
        self.w0 = records[0].s0 if w0 is None else w0
        self.divisor, self.loss_terms, self.on_dh = divisor, loss_terms, on_dh
        self.states = {}            # step -> state entering it: the top-level pieces' of the chunk
        self.kept = None            # the chunk's last leaf, forward with activations, from the first pass
        self.later = ()             # first steps of later windows: the first pass keeps the state
                                    # entering the record holding each

    def _parts(self, a, b):
        for rec in self.records:
            if rec.s1 > a and rec.s0 < b:
                yield rec, max(a, rec.s0), min(b, rec.s1)

    def forward(self, a, b, state, first_pass=False):
        """Steps [a, b) forward from ``state`` (entering a) as forward calls of their records ->
        (state entering b, loss of the chunk's steps among them, [(record, p0, cache, dout)])."""
        model, loss, parts = self.model, 0.0, []
        for rec, p0, p1 in self._parts(a, b):
            if first_pass and p0 == rec.s0 and any(rec.s0 <= w < rec.s1 for w in self.later):
                rec.state = state
            if first_pass and p0 == rec.start:
                rng_state = model.rng.bit_generator.state
                for other in self.records:
                    if other.start == rec.start:
                        other.rng_state = rng_state
            if p0 == rec.start and rec.keep is not None:
                state = reset_rows(state, rec.keep)
            replay = Replay(rec.rng_state, rec.steps, p0 - rec.start, rec.rows)
            model.replay = replay
            try:
                with _weights(model, rec.weights):
                    out, state, cache = self.rows.forward(model, p0, p1, state, train=True)
            finally:
                model.replay = None
            if first_pass and p0 == rec.start:
                advance_rng(model.rng, replay.drawn)        # as far as the call's own draws took it
            dout = None
            if p0 >= self.t0 and self.loss_terms:
                part_loss, dout = self.rows.loss(model.backend, out, p0, p1, self.divisor)
                loss += part_loss
            parts.append((rec, p0, cache, dout))
        return state, loss, parts

    def first_pass(self, state, later=()):
        """Forward the chunk [t0, t1) leaf by leaf of the plan's pieces from the carried
        ``state``; keep the state entering each piece and that entering each record holding a
        step of ``later`` (into the record's ``state``), and the last leaf's activations where
        the last piece is a leaf. Returns (the chunk's loss, the state after it)."""
        pieces = self.plan.pieces
        loss, a, self.later = 0.0, self.t0, later
        for i, piece in enumerate(pieces):
            self.states[a] = state
            for n in plan_leaves(piece):
                state, leaf_loss, parts = self.forward(a, a + n, state, first_pass=True)
                loss, a = loss + leaf_loss, a + n
                if i == len(pieces) - 1 and isinstance(piece, int):
                    self.kept = parts
                del parts                   # a leaf's activations go before the next leaf runs
        return loss, state

    def backward(self, dstate=None):
        """Backpropagate the pieces last first, then the old steps; returns dL/d(state entering w0)."""
        old, pieces = self.plan.old, self.plan.pieces
        starts = [self.t0]
        for piece in pieces[:-1]:
            starts.append(starts[-1] + plan_steps(piece))
        for i in reversed(range(len(pieces))):
            kept, self.kept = self.kept, None           # the last leaf's, dropped once backpropagated
            dstate = self._backprop(pieces[i], starts[i], self.states.pop(starts[i]), dstate, kept)
            del kept
        if old is not None:
            dstate = self._backprop(old, self.records[0].s0, self.records[0].state, dstate)
        return dstate

    def _backprop(self, plan, a, state, dstate, kept=None):
        """Backpropagate ``plan`` over steps from a (``state`` entering it), dL/d(state after) ``dstate``."""
        if isinstance(plan, int):
            parts = kept if kept is not None else self.forward(a, a + plan, state)[2]
            while parts:
                rec, p0, cache, dout = parts.pop()          # each part's activations go once used
                t_start = max(0, self.w0 - p0)              # steps before w0: forward only
                if self.on_dh is None:
                    dstate = self.model.backward(dout, cache, dstate, t_start, t_origin=p0)
                else:
                    dstate, dh = self.model.backward(dout, cache, dstate, t_start, return_dh=True, t_origin=p0)
                    self.on_dh([d[t_start:] for d in dh])
                if p0 == rec.start and rec.keep is not None and not t_start:
                    dstate = reset_rows(dstate, rec.keep)           # no gradient across a reset
            return dstate
        left, right = plan
        mid = state
        for n, at in _leaf_starts(left, a):
            mid = self.forward(at, at + n, mid)[0]
        dstate = self._backprop(right, a + plan_steps(left), mid, dstate)
        del mid
        return self._backprop(left, a, state, dstate)


class Windows:
    """The trainer's windows under ``memory`` (TBPTT(k1, k2), or full BPTT where k1 is None):
    the plan of each, made once per shape, and its first pass. A window [w0, t1) ends with its
    chunk [t0, t1); with k2 > k1 its steps before t0 are recomputed from the time block
    boundary at or before w0 (or the segment start after it), where an earlier chunk's records
    were cut."""

    def __init__(self, model, memory, k1, k2):
        self.model, self.memory, self.k1 = model, memory, k1
        self.overlap = 0 if k1 is None else k2 - k1
        self.held = 0 if not self.overlap else math.ceil(self.overlap / k1) + 1    # states kept for later windows
        self.plans = {}

    def start(self, t0):
        """w0: the first step of the window whose chunk starts at t0."""
        return max(0, t0 - self.overlap)

    def check(self, dataset, local):
        """Plan every window of an epoch of ``dataset`` (this rank's rows ``local`` of each group):
        a budget too small for one of them fails here, before any update (:class:`BudgetError`
        naming the smallest budget that fits them all)."""
        errors = []
        for gi, group in enumerate(dataset.groups):
            k = group.T if self.k1 is None else self.k1
            for t0 in range(0, group.T, k):
                w0 = self.start(t0)             # recomputed from the block boundary before it at most
                try:
                    first = w0 if w0 == t0 else _block_floor(w0, local[gi].B)
                    self.plan(local[gi], t0, min(t0 + k, group.T), first)
                except BudgetError as e:
                    errors.append(e)
        if errors:
            raise BudgetError(self.memory, max(e.smallest for e in errors), max(e.steps for e in errors))

    def plan(self, rows, t0, t1, first):
        """The :class:`WindowPlan` of the window ending with the chunk [t0, t1) of ``rows``, its
        steps from ``first`` on (w0, or where its recomputation starts before it);
        :class:`BudgetError` where the budget is too small."""
        if rows.B == 0:                                  # a rank without rows of this group: nothing runs
            return WindowPlan(None, [t1 - t0], 0, 0)
        block = blocks.block_steps(rows.B)
        key = (rows.B, t0 - first, t1 - t0, first % block)
        if key not in self.plans:
            slot, step = state_bytes(self.model, rows.B), step_bytes(self.model, rows.B, t1 - t0)
            self.plans[key] = plan_window(self.memory, key[1], key[2], slot, step, self.held, key[3], block)
        return self.plans[key]

    def first_pass(self, rows, t0, t1, state, ring, divisor, count):
        """The chunk [t0, t1)'s forward by its window's plan, keeping states, not activations: its
        records go into ``ring`` (the trainer's ring buffer), cut at the time block boundary at or
        before each step of the chunk where a later window starts (the state entering that record
        is kept: the later window recomputes from there). ``divisor``: the loss's count; ``count``:
        the chunk's loss terms. Returns (the :class:`Window` for backward, the chunk's loss, the
        state after it)."""
        later = tuple(t - self.overlap for t in range(t1, t1 + self.overlap + 1, self.k1 or 1)
                      if self.overlap and t0 <= t - self.overlap < t1)          # later windows' first steps
        floors = sorted({_block_floor(w, rows.B) for w in later})   # the later windows' records start here
        new = []
        for s0, s1, reset in rows.segments(t0, t1):
            keep = self.model.backend.asarray(~rows.resets[s0], self.model.dtype) if reset else None
            cuts = [s0] + [f for f in floors if s0 < f < s1] + [s1]
            new += [Record(a, b, s0, s1 - s0, keep, rows=(s1 - s0) * rows.B) for a, b in zip(cuts, cuts[1:])]
        records = [rec for rec in ring if rec.s1 > self.start(t0)] + new
        window = Window(self.model, rows, records, t0, divisor, bool(count),
                        self.plan(rows, t0, t1, records[0].s0), self.start(t0))
        loss, state = window.first_pass(state, later)
        ring += new
        return window, loss, state


def _block_floor(t, B):
    """The time block boundary at or before the stream's step t for B batch rows
    (``bptt_kernels.host.blocks``)."""
    return t - t % blocks.block_steps(B)


def _leaf_starts(plan, a):
    """(leaf length, first step) of each leaf of ``plan`` starting at step a."""
    for n in plan_leaves(plan):
        yield n, a
        a += n


def plan_window(memory, n_old, n_new, slot, step, held=0, phase=0, block=None):
    """The plan of a window of ``n_old`` steps before its chunk and ``n_new`` in it under
    ``memory`` ("sqrt" or bytes; :func:`parse_memory`), one state costing ``slot`` bytes and one
    step's activations ``step`` bytes, ``held`` states kept beside it for later windows, its
    first step the stream's step ``phase`` (mod the time blocks of ``block`` steps: None,
    BLOCK_STEPS). ValueError naming the smallest feasible budget where the budget is below it."""
    if memory == "sqrt":
        return sqrt_plan(n_old, n_new, slot, step, held, phase, block)
    plan = budget_plan(n_old, n_new, memory, slot, step, held, phase, block)
    if plan is None:
        raise BudgetError(memory, smallest_budget(n_old, n_new, slot, step, held, phase, block), n_old + n_new)
    return plan


def smallest_budget(n_old, n_new, slot, step, held=0, phase=0, block=None):
    """The smallest budget (bytes) :func:`budget_plan` finds a plan within (a bisection)."""
    lo, hi = slot + step, (held + 2) * slot + (n_old + n_new) * step        # hi: one leaf each part
    while not budget_plan(n_old, n_new, hi, slot, step, held, phase, block):   # (units count as whole)
        lo, hi = hi, 2 * hi
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if budget_plan(n_old, n_new, mid, slot, step, held, phase, block) else (mid + 1, hi)
    return lo


class BudgetError(ValueError):
    """A budget below the smallest feasible one (``smallest``) for windows of up to ``steps``."""

    def __init__(self, memory, smallest, steps):
        super().__init__(f"memory={memory:,} bytes is below the smallest feasible budget {smallest:,} bytes for "
                         f"this model's windows of up to {steps} steps")
        self.memory, self.smallest, self.steps = memory, smallest, steps


def loss_and_backward(model, inputs, targets, state=None, memory="sqrt"):
    """Loss and gradients of one forward over all T steps of ``inputs``, keeping states rather
    than activations (``memory``: "sqrt" or a budget, :func:`parse_memory`); the same as::

        out, final, cache = model.forward(inputs, state)
        loss, dout = bptt.losses.cross_entropy(model.backend, out, targets)   # or losses.mse
        model.backward(dout, cache)

    inputs   LanguageModel: int ids [T,B]; SequenceModel: floats [T,B,I]
    targets  LanguageModel: ids [T,B]; SequenceModel: as its readout gives (every_step: int
             [T,B] classes (-1 ignored) or floats [T,B,O]; last_step: [B] or [B,O])
    Cross-entropy (mean over counted targets) for int targets, MSE for float ones. Gradients are
    added (+=) to ``model.grads``; dropout draws from ``model.rng`` as the plain forward does.
    Returns (loss, the state after step T-1).
    """
    memory = parse_memory(memory)
    if memory is None:
        raise ValueError("memory must be 'sqrt' or a budget for loss_and_backward; got None "
                         "(use model.forward and model.backward)")
    if getattr(model, "bidirectional", False):
        raise ValueError("memory needs a unidirectional model (a bidirectional stack runs from the sequence's end)")
    every_step = getattr(model, "readout", "every_step") == "every_step"
    host = np.asarray(targets)
    group = Group(np.asarray(inputs) if hasattr(model, "vocab_size") else inputs, host, every_step)
    T, B = group.T, group.B
    plan = plan_window(memory, 0, T, state_bytes(model, B), step_bytes(model, B, T), block=blocks.block_steps(B))
    count = group.count(0, T)
    window = Window(model, group, [Record(0, T, 0, T, None, rows=T * B)], 0, count, count > 0, plan)
    loss, final = window.first_pass(state)
    window.backward()
    return loss, final
