"""Synchronous data-parallel training: what :class:`bptt.Trainer` does when given a
communicator of N ranks (:mod:`bptt.distributed`), as ChainerMN does it.

Data. Every rank is given the same whole data and builds the same
:class:`~bptt.batches.Dataset` (its fingerprint is compared over the ranks when fit starts).
Each group of B streams (sequences) is cut into contiguous blocks of rows: rank r runs rows
[r B/N, (r+1) B/N) (:func:`split_rows`; B must be a multiple of N; a SequenceModel's last,
smaller batch of B' rows is cut as evenly as it goes, a rank may get none), with their own
carried state, reset masks and TBPTT ring buffer (:class:`Rows`). A chunk is split at the
whole group's document starts, so the dropout masks are drawn in the order of one process;
every mask is drawn for all B rows from the model's RNG (the same on every rank) and this
rank's rows kept (``model.dropout_rows``): the masks of one process with batch B.

Update (:meth:`Replicas.reduce`). Each rank backpropagates the SUM of its loss terms; one
allreduce of a flat buffer in the model's dtype carries every gradient, the loss sum, the
counted targets and two flags (a pending Ctrl-C, SIGTERM); the sums are divided by the global
count, then the gradient norm, clipping and the optimizer step run identically on every rank.
The weights of N ranks are those of one process with batch B up to float rounding.

Start of fit (:meth:`Replicas.start`): the parameters and the dropout RNG are broadcast from
rank 0; with ``check_replicas`` a checksum of the parameters (exact: their bits) is compared
after every update
(:meth:`Replicas.verify`).

Errors (:class:`Ranks`; :meth:`Replicas.running` around fit, whose meeting point is
:meth:`Replicas.start`). An exception before the ranks meet (a bad argument, bad data) is
raised on every rank: its own where it has one, else a DistributedError naming the rank that
failed. Later, exceptions that every rank raises together by construction pass
(NonFiniteError of the global figures, a DistributedError of ranks that disagree, the
KeyboardInterrupt / Preempted of an agreed stop); any other one (a bug, a callback, a damaged
id in one rank's part of a memory-mapped file) is printed by its rank, which then aborts
every rank (``MPI_Abort``): no rank is left waiting for it.

Signals. Ctrl-C and SIGTERM (mpiexec hands them to every rank, each at its own moment) are
held during a distributed fit; the next update's allreduce tells every rank that one is
pending, and every rank stops after that same update with KeyboardInterrupt (Preempted for
SIGTERM), so the checkpoint saved next is consistent. A signal that arrives after fit's last
update is dropped (the run ends as it would have).

Checkpoints (:func:`gather_position`, :func:`position_from_dict`). The carried state of the
whole batch is the ranks' states concatenated along the batch axis, so a checkpoint looks like
that of one process and resumes on any number of ranks (the state of stream b goes to the rank
that runs stream b). A TBPTT ring buffer (k2 > k1) holds activations in each rank's layout:
a checkpoint with a non-empty one keeps each rank's (``ring_per_rank``) and resumes on the
same number of ranks only.
"""

import contextlib
import math
import os
import signal
import sys
import threading
import time
import traceback

import numpy as np

from bptt.batches import Group, Position, TokenGroup, stream_views
from bptt.distributed import DistributedError
from bptt.interrupts import Preempted

__all__ = ["split_rows", "Rows", "local_groups", "Ranks", "Replicas", "gather_position", "position_from_dict",
           "sum_over_ranks"]

ABORT_GRACE_S = 1.0     # between a failed rank's report and the abort
FLAGS = (signal.SIGTERM, signal.SIGINT)     # a slot each in the update's buffer (ranks holding one), in
                                            # the order they win when both are held


def split_rows(rows, ranks):
    """Bounds [0, ..., rows] of ``ranks`` contiguous blocks, as even as they go: rank r holds
    rows [bounds[r], bounds[r + 1]) (r rows/N each where N divides them)."""
    return [rows * r // ranks for r in range(ranks + 1)]


class Rows:
    """This rank's rows [r0, r1) of a group ``whole`` of B rows; ``part`` is a group of just
    those rows (None where this rank has none). Used as a group by the trainer and
    :func:`bptt.evaluation.evaluate` (forward, loss, count, resets, targets ... of the part), but
    a chunk is split at the whole group's segment bounds and dropout masks are drawn for all B
    rows (``model.dropout_rows``)."""

    def __init__(self, whole, part, r0, r1):
        self.whole, self.part, self.r0, self.r1 = whole, part, r0, r1
        self.B = r1 - r0

    def __getattr__(self, name):            # T, inputs, targets, resets, ce, every_step, lengths, loss
        return getattr(self.whole if self.part is None else self.part, name)

    def segments(self, t0, t1):
        """The whole group's segments of [t0, t1) (none where this rank has no rows)."""
        return [] if self.part is None else self.whole.segments(t0, t1)

    def count(self, t0, t1):
        """Loss terms of this rank's rows in steps [t0, t1)."""
        return 0 if self.part is None else self.part.count(t0, t1)

    def forward(self, model, s0, s1, state, train):
        model.dropout_rows = (self.whole.B, self.r0, self.r1)
        try:
            return self.part.forward(model, s0, s1, state, train)
        finally:
            model.dropout_rows = None


def local_groups(dataset, data, comm):
    """The groups of ``dataset`` (made of ``data``) as this rank runs them: the dataset's own
    in one process, else a :class:`Rows` of each."""
    if comm is None or comm.size == 1:
        return dataset.groups
    local = []
    for group in dataset.groups:
        bounds = split_rows(group.B, comm.size)
        r0, r1 = bounds[comm.rank], bounds[comm.rank + 1]
        local.append(Rows(group, _part(group, data, r0, r1) if r1 > r0 else None, r0, r1))
    return local


def _part(group, data, r0, r1):
    """A group of the rows [r0, r1) of ``group``, made of ``data``."""
    if isinstance(group, TokenGroup):
        streams = stream_views(np.asarray(data), group.B)[:, r0:r1]              # n, r1-r0 view
        resets = None if group.resets is None else group.resets[:, r0:r1]
        return TokenGroup(streams, resets, group.inputs.vocab_size, group.inputs.source)
    targets = group.targets[:, r0:r1] if group.every_step else group.targets[r0:r1]
    return Group(np.ascontiguousarray(group.inputs[:, r0:r1]), np.ascontiguousarray(targets), group.every_step,
                 lengths=None if group.lengths is None else group.lengths[r0:r1])


def sum_over_ranks(comm, *values):
    """The float64 sums over the ranks of a few host numbers (one allreduce)."""
    return [float(v) for v in comm.allreduce_sum(np.array(values, dtype=np.float64), None)]


# ------------------------------------------------------------------------------------------
# Errors on N ranks


class Ranks:
    """What a block of work on the ranks of ``comm`` does with an exception (:meth:`guard`):
    before the block's meeting point (:meth:`meet`) it is carried to the meeting, so every
    rank raises; after it, exceptions every rank raises together pass, any other one is
    printed by its rank, which aborts every rank (:meth:`abort`). An exception that leaves a
    guard on every rank is marked (``on_every_rank`` True), so a guard around it passes it too."""

    def __init__(self, comm):
        self.comm = comm
        self.met = False

    @contextlib.contextmanager
    def guard(self, agreed=()):
        """Around the block; ``agreed``: the exception types every rank raises together after
        the meeting (besides DistributedError)."""
        self.met = False
        try:
            yield self
        except BaseException as e:
            if not self.met:                     # before the ranks met: they meet here
                self.meet(e)
            elif not (getattr(e, "on_every_rank", False) or isinstance(e, (DistributedError, *agreed))):
                self.abort(e)
            e.on_every_rank = True
            raise

    def meet(self, error=None, facts=None):
        """The meeting point (collective): every rank learns whether one failed (``error``, this
        rank's exception, which the caller raises) and compares ``facts`` (name -> value, the
        same names on every rank). Raises DistributedError alike on every rank without an error
        of its own where one failed or the facts differ."""
        gathered = self.comm.allgather((None if error is None else _one_line(error), facts or {}))
        self.met = True
        if error is not None:
            return
        failed = [(r, message) for r, (message, _) in enumerate(gathered) if message is not None]
        if failed:
            rank, message = failed[0]
            raise DistributedError(f"rank {rank} of {self.comm.size} failed: {message}")
        for name, value in (facts or {}).items():
            values = [f[name] for _, f in gathered]
            if any(v != value for v in values):
                listed = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                raise DistributedError(f"the ranks were given different {name} ({listed}): every rank must be "
                                       f"given the same data and arguments, and resume the same checkpoint")

    def abort(self, error):
        """Print ``error`` with this rank (in one write, then a moment for the launcher to pass
        it on: the abort ends the job's output too) and stop every rank."""
        report = "".join([f"bptt: rank {self.comm.rank} of {self.comm.size} failed; stopping all "
                          f"{self.comm.size} ranks\n", *traceback.format_exception(type(error), error,
                                                                                 error.__traceback__)])
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), report.encode(errors="replace"))
        time.sleep(ABORT_GRACE_S)
        self.comm.abort(1)
        os._exit(1)             # MPI_Abort may return before the launcher stops this rank: print nothing more


# ------------------------------------------------------------------------------------------
# The trainer's replicas


class Replicas:
    """The model replicated on the ranks of ``comm`` (module docstring): start, the update's
    allreduce, the optional checksum, signals and errors. ``comm_s``: seconds the last
    :meth:`reduce` took (packing, allreduce, unpacking)."""

    def __init__(self, comm, model, check=False):
        self.comm, self.model, self.check = comm, model, bool(check)
        self.ranks = Ranks(comm)
        self.comm_s = 0.0
        self._buffer = None          # the flat buffer of the gradients, made at the first update
        self._held = self._stop = None

    # ---------------------------------------------------------------- around fit

    @contextlib.contextmanager
    def running(self, agreed=()):
        """Around the body of fit on every rank (errors and signals: module docstring); its
        meeting point is :meth:`start`. ``agreed``: the exception types every rank raises
        together (besides the KeyboardInterrupt of an agreed stop and DistributedError)."""
        self._held = self._stop = None
        with self._holding_signals(), self.ranks.guard(agreed=(KeyboardInterrupt, *agreed)):
            yield

    def start(self, trainer, dataset):
        """Collective, when fit has read its data (the meeting point): check that the ranks
        were given the same data and stand at the same point; broadcast the parameters and the
        dropout RNG from rank 0. ValueError for a batch size that is not a multiple of the
        ranks, DistributedError where the ranks disagree (on every rank)."""
        B, N = dataset.batch_size, self.comm.size
        if B % N:
            raise ValueError(f"batch_size {B} is not a multiple of the {N} ranks: each rank runs batch_size/{N} "
                             f"of the streams; give a multiple of {N}")
        pos = trainer.position
        self.ranks.meet(facts={"data (their fingerprints)": dataset.fingerprint, "batch_size": B,
                               "step": trainer.step, "epoch": trainer.epoch,
                               "position (group, step)": None if pos is None else (pos.group, pos.offset)})
        be, rng = self.model.backend, self.model.rng
        for p in self.model.params.values():
            self.comm.bcast_array(p, be)
        rng.bit_generator.state = self.comm.bcast(rng.bit_generator.state)

    @contextlib.contextmanager
    def _holding_signals(self):
        """SIGINT and SIGTERM only noted (the first one) while fit runs (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def hold(signum, frame):
            if self._held is None:
                self._held = signum
        previous = {s: signal.signal(s, hold) for s in FLAGS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, signal.default_int_handler if handler is None and s == signal.SIGINT
                              else signal.SIG_DFL if handler is None else handler)

    def after_update(self, step):
        """After update ``step`` is committed: the checksum (:meth:`verify`); then
        KeyboardInterrupt (Preempted for SIGTERM) on every rank where the update's allreduce
        said some rank holds a signal."""
        self.verify(step)
        if self._stop == signal.SIGTERM:
            raise Preempted(signal.SIGTERM)
        if self._stop == signal.SIGINT:
            raise KeyboardInterrupt

    # ---------------------------------------------------------------- every update

    def reduce(self, loss, count, expected, poisoned=False):
        """Sum the ranks' gradients (``model.grads``, sums of their loss terms), losses and
        counted targets in one allreduce; the gradients become the global mean's (divided by
        the ``expected`` count of the whole batch, checked against the counted one) in place.
        ``poisoned``: this rank's gradient is not finite (every rank gets NaN). Returns the
        mean loss of the whole batch."""
        began = time.perf_counter()
        be, grads = self.model.backend, list(self.model.grads.values())
        n = sum(g.size for g in grads)
        if self._buffer is None:
            self._buffer = be.zeros((n + 2 + len(FLAGS),), self.model.dtype)
        buf = self._buffer
        offset = 0
        for g in grads:                                           # pack
            buf[offset:offset + g.size] = math.nan if poisoned else g.reshape(-1)
            offset += g.size
        flags = [1.0 if self._held == s else 0.0 for s in FLAGS]
        buf[n:] = be.asarray(np.array([loss, count, *flags]), self.model.dtype)
        self.comm.allreduce_sum(buf, be)
        total, counted, *flags = (float(v) for v in be.to_host(buf[n:]))
        if abs(counted - expected) > 0.5 + 1e-6 * expected:      # float32 counts exactly to 2**24
            raise DistributedError(f"the ranks counted {counted:.0f} loss terms in this update; the data has "
                                   f"{expected}: the ranks do not run the same data")
        self._stop = next((s for s, f in zip(FLAGS, flags) if f > 0), None)
        if self._stop is not None:
            self._held = None
        buf[:n] /= expected                                       # the mean over the whole batch
        offset = 0
        for g in grads:                                           # unpack
            g[...] = buf[offset:offset + g.size].reshape(g.shape)
            offset += g.size
        self.comm_s = time.perf_counter() - began
        return total / expected

    def verify(self, step):
        """With ``check_replicas``: compare a checksum of the parameters over the ranks (the sum
        of their bit patterns as unsigned ints, mod 2**64: one bit's difference shows);
        DistributedError on every rank where they differ."""
        if not self.check:
            return
        xp = self.model.backend.xp
        bits = {4: np.uint32, 8: np.uint64}
        mine = sum(int(xp.sum(p.view(bits[p.itemsize]), dtype=np.uint64)) for p in self.model.params.values())
        sums = self.comm.allgather(mine % 2 ** 64)
        if any(s != sums[0] for s in sums):
            listed = ", ".join(f"rank {r}: {s:#x}" for r, s in enumerate(sums))
            raise DistributedError(f"the parameters differ between the ranks after update {step} (checksums "
                                   f"{listed}): their allreduce or optimizer steps disagree")


def _one_line(error):
    return " ".join((str(error) or type(error).__name__).split())


# ------------------------------------------------------------------------------------------
# Positions in checkpoints


def gather_position(position, backend, comm):
    """Collective: ``position`` (this rank's, :class:`bptt.batches.Position`) as the dict of
    :meth:`Position.to_dict` for the whole batch: the ranks' carried states concatenated along
    the batch axis; "ranks": N; rings: the single process's "ring" where every rank's is empty,
    else "ring": [] and "ring_per_rank" (rank r's ring at r)."""
    mine = position.to_dict(backend)
    if comm is None or comm.size == 1:
        return mine
    parts = comm.allgather(mine)
    whole = dict(parts[0], ranks=comm.size, ring=[])
    states = [p["state"] for p in parts if p["state"] is not None]     # a rank without rows has none
    whole["state"] = [np.concatenate(pieces, axis=1) for pieces in zip(*states)] if states else None
    if any(p["ring"] for p in parts):
        whole["ring_per_rank"] = [p["ring"] for p in parts]
    return whole


def position_from_dict(d, model, comm):
    """This rank's :class:`Position` of a checkpoint's position dict ``d`` (written by any
    number of ranks): its rows of the carried state, and its ring buffer where ``d`` has one.
    ValueError naming both numbers of ranks where a non-empty ring buffer would change hands."""
    ranks, rank = (1, 0) if comm is None else (comm.size, comm.rank)
    written = int(d.get("ranks", 1))
    rings = d.get("ring_per_rank") or [d["ring"]]
    if written != ranks and any(rings):
        raise ValueError(f"the checkpoint was written by {written} rank(s) inside a TBPTT window whose ring buffer "
                         f"(k2 > k1) holds each rank's activations: resume it on {written} rank(s), not {ranks}")
    ring = rings[rank] if len(rings) > 1 else rings[0]
    state = d["state"]
    if state is not None and ranks > 1:
        bounds = split_rows(state[0].shape[1], ranks)
        r0, r1 = bounds[rank], bounds[rank + 1]
        state = [np.ascontiguousarray(s[:, r0:r1]) for s in state] if r1 > r0 else None
    return Position.from_dict(dict(d, state=state, ring=ring), model)
