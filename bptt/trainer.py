"""Training: full BPTT and truncated BPTT(k1, k2) over token streams and sets of sequences.

Semantics (docs/design.md, section 4)
---------------------------------------
A *group* is what the recurrent state runs through from zero: for a LanguageModel the whole
token stream of an epoch, cut into B contiguous streams exactly as PyTorch's word_language_model
``batchify`` (the last ``len % B`` tokens are dropped; input tokens[t], target tokens[t+1]); for a
SequenceModel one batch of B independent sequences (state reset per sequence).

* ``k1 = k2 = None``: full BPTT: one update per group, backpropagating over all its steps.
* ``TBPTT(k1, k2)`` (k2 = k1 when not given; 1 <= k1 <= k2): the group is run forward in chunks of
  k1 steps; after each chunk the losses of its steps (their mean) are backpropagated through the
  last k2 steps, the gradient is cut at the start of that window, the weights are updated and the
  state carries on (detached) into the next chunk. The final chunk of a group may be shorter
  (r < k1 steps); it trains as a shorter window: losses of its r steps, backpropagated through
  its r steps plus the k2 - k1 steps before it. With k1 == k2 this is PyTorch's
  word_language_model loop (``repackage_hidden`` between chunks), update for update.
* k2 > k1: the activations of the k2 - k1 steps before a chunk are not recomputed: the caches of
  the chunks they were computed in are kept in a ring buffer and backpropagated through chunk by
  chunk (``layer.backward`` with the state gradient carried and ``t_start`` where the window
  begins). Those activations were computed with the weights before the last update(s), while the
  backward pass uses the current weights: the standard, cheap choice (Williams & Peng's
  BPTT(h; h') as usually implemented); with a learning rate of 0 it is the exact gradient.
* Reset mask (token streams): True where a document starts; the state of that stream is set to
  zero before that token is read, and no gradient flows across the boundary. A chunk is split
  into segments at the reset positions (forward a segment, zero the rows of the streams that
  reset, go on; backward multiplies the carried state gradient by the keep mask there), so the
  result equals running the documents separately.
* Variable-length sequences (SequenceModel, data ``(inputs, targets, lengths)``): each batch
  passes its rows' lengths to ``model.forward``, row b runs its steps t < lengths[b] only;
  per-step targets past a row's end count in no mean and give no gradient, a last-step
  readout reads each row's own last step. Full BPTT only (ValueError with k1 set): a chunk in
  which a row has already ended is not expressible (the kernels need lengths >= 1).
* Bidirectional models train with full BPTT only (their reverse direction starts from each
  sequence's end); a LanguageModel cannot have a bidirectional stack.
* Data-parallel (``comm=bptt.distributed.mpi()`` in a script started by ``mpiexec -n N``): every
  rank is given the same whole data and runs a contiguous block of B/N of the streams; one
  allreduce per update sums the gradients, then every rank makes the same step: the weights of
  one process with batch B, up to float rounding (:mod:`bptt.data_parallel`).

Losses: integer targets -> softmax cross-entropy, mean over counted targets (-1 = ignored), as
``torch.nn.CrossEntropyLoss()``; float targets -> mean squared error as ``torch.nn.MSELoss()``.
A window whose targets are all ignored (e.g. early chunks of a last-step task) makes no update.

Gradient clipping is ``torch.nn.utils.clip_grad_norm_`` over all parameters. A non-finite loss or
gradient norm raises :class:`NonFiniteError` naming the step, before the weights are touched;
with ``on_nonfinite="skip"`` the update is skipped instead, the carried state is reset to zeros
and the overlap buffer dropped.

``epochs`` and ``max_steps`` of :meth:`Trainer.fit` are totals over the trainer's life (as Keras'
``epochs`` with ``initial_epoch``): ``Trainer.from_checkpoint(path).fit(...)`` with the arguments
of the interrupted call finishes that run from the saved position, ending with exactly the
weights of a run that was never interrupted. To train n more updates: ``max_steps=trainer.step + n``.
"""

import contextlib
import copy
import json
import math
import time

import numpy as np

from bptt import checkpoint_file
from bptt.batches import Dataset, Position, Segment, batchify, reset_rows
from bptt.data_parallel import Replicas, gather_position, local_groups, position_from_dict
from bptt.distributed import Solo
from bptt.evaluation import evaluate, fresh_validation_state, validation_entries
from bptt.interrupts import DeferredInterrupt, Preempted
from bptt.memory import Windows, forward_weights, memory_for
from bptt.models import (LanguageModel, NonFiniteGradientError, SequenceModel, check_model_dict, load_model_dict,
                         model_from_dict, model_to_dict)
from bptt.optim import (OPTIMIZERS, ConstantLR, Optimizer, Schedule, clip_grad_norm_, schedule_from_state_dict,
                        step_norms)

__all__ = ["Trainer", "NonFiniteError", "Preempted", "check_truncation", "batchify", "Dataset", "Position", "Segment"]

ON_NONFINITE = ("raise", "skip")
EVAL_CHUNK = 256   # steps per forward call in evaluate() when k1 is None


class NonFiniteError(FloatingPointError):
    """The loss or the gradient of a training window was NaN or inf."""


def _check_k(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a positive int or None; got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int or None; got {value}")
    return int(value)


def check_truncation(k1, k2):
    """Validate (k1, k2) -> (k1, k2) with k2 defaulting to k1; (None, None) is full BPTT."""
    k1, k2 = _check_k("k1", k1), _check_k("k2", k2)
    if k1 is None:
        if k2 is not None:
            raise ValueError(f"k2={k2} needs k1 (TBPTT(k1, k2) runs the forward in chunks of k1 steps); "
                             f"use k1=k2=None for full BPTT")
        return None, None
    if k2 is None:
        k2 = k1
    if k2 < k1:
        raise ValueError(f"TBPTT needs k1 <= k2 (the losses of the last k1 steps are backpropagated "
                         f"through the last k2 steps); got k1={k1}, k2={k2}")
    return k1, k2


class Trainer:
    """Trains a model with full BPTT or TBPTT(k1, k2); see the module docstring for semantics.

    model         LanguageModel or SequenceModel
    optimizer     bptt.SGD / bptt.Adam; its lr is the base lr the schedule scales
    k1, k2        TBPTT chunk and window lengths (None, None: full BPTT)
    clip_norm     None or max global gradient norm (torch.nn.utils.clip_grad_norm_)
    schedule      None (constant) or a bptt.optim schedule: lr of each epoch
    on_nonfinite  "raise" (default) or "skip"
    record_grad_norms  True: per window, store ||dL/dh_t|| of every step and every level and the
                  norm of every parameter's gradient in ``history["grad_diagnostics"]`` (on N
                  ranks the dh norms are of this rank's streams)
    comm          None (one process) or a communicator of N ranks (``bptt.distributed.mpi()``):
                  data-parallel training, :mod:`bptt.data_parallel`. Then ``fit``, ``evaluate``,
                  ``state_dict`` and ``save_checkpoint`` are collective (every rank calls them; rank
                  0 writes the file), callbacks run on every rank (``event["rank"]``: print and write
                  files where it is 0) and ``position`` holds this rank's streams
    check_replicas  True: after every update compare a checksum of the parameters over the ranks
                  (DistributedError where they differ)
    memory        None (every activation of a window kept), "sqrt" (the stack's state kept every
                  ~sqrt(n) steps of an n-step window, the steps between recomputed during
                  backward) or a budget in bytes (an int or "512M", "2G"): the schedule with the
                  least recomputation that fits it (:mod:`bptt.memory`, docs/memory.md)
    """

    def __init__(self, model, optimizer, k1=None, k2=None, clip_norm=None, schedule=None,
                 on_nonfinite="raise", record_grad_norms=False, comm=None, check_replicas=False, memory=None):
        if not isinstance(model, (LanguageModel, SequenceModel)):
            raise TypeError(f"model must be a bptt.LanguageModel or bptt.SequenceModel; got {type(model).__name__}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a bptt.SGD or bptt.Adam; got {type(optimizer).__name__}")
        if isinstance(model, LanguageModel) and getattr(model, "bidirectional", False):
            raise ValueError("a LanguageModel cannot have a bidirectional stack: a bidirectional layer needs the "
                             "whole sequence (full BPTT only), a token stream trains in chunks, and the reverse "
                             "direction would read the tokens it is to predict")
        self.model = model
        self.optimizer = optimizer
        self.comm = Solo() if comm is None else comm
        self._replicas = Replicas(self.comm, model, check_replicas) if self.comm.size > 1 else None
        self._configure(k1=k1, k2=k2, clip_norm=clip_norm, on_nonfinite=on_nonfinite,
                        record_grad_norms=record_grad_norms, memory=memory)
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be None or a bptt.optim schedule; got {type(schedule).__name__}")
        self.schedule = schedule if schedule is not None else ConstantLR()
        self.base_lr = optimizer.lr
        self.step = 0            # updates made
        self.epoch = 0           # epochs completed
        self.position = None     # Position inside the current epoch, None at an epoch boundary
        self.meta = {}
        self.history = {"step": [], "epoch": [], "loss": [], "lr": [], "grad_norm": [], "tokens": [],
                        "skipped": [], "epoch_loss": [], "grad_diagnostics": []}
        self.validation_state = fresh_validation_state()
        self.stopped_early = False   # the last fit() ended because of its patience

    def _configure(self, k1, k2, clip_norm, on_nonfinite, record_grad_norms, memory=None):
        """Check the settings of :attr:`config`, then set them (nothing is set if one is bad).
        ``memory`` defaults to None for the configs of checkpoints saved before it existed."""
        k1, k2 = check_truncation(k1, k2)
        memory = memory_for(self.model, memory)
        if k1 is not None and getattr(self.model, "bidirectional", False):
            raise ValueError(f"a bidirectional model trains with full BPTT only (k1=k2=None), got k1={k1}: its "
                             f"reverse direction reads each sequence from its last step, so a chunk of k1 steps "
                             f"cannot be run before the whole sequence is seen")
        if clip_norm is not None and (isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float))
                                      or not 0 < clip_norm < math.inf):
            raise ValueError(f"clip_norm must be None or a positive finite number; got {clip_norm!r}")
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}; got {on_nonfinite!r}")
        self.k1, self.k2 = k1, k2
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.on_nonfinite = on_nonfinite
        self.record_grad_norms = bool(record_grad_norms)
        self._memory = memory

    @property
    def memory(self):
        """None, "sqrt" or a budget in bytes (the constructor's ``memory``). May be set between
        ``fit`` calls (e.g. after :meth:`from_checkpoint`): the updates stay the same, only their
        activation memory and time change; between None and the others only where no steps
        are carried into later windows (k2 == k1, or at an epoch boundary)."""
        return self._memory

    @memory.setter
    def memory(self, value):
        memory = memory_for(self.model, value)
        if (memory is None) != (self._memory is None) and self.position is not None and self.position.ring:
            raise ValueError(f"memory cannot change from {self._memory!r} to {memory!r} in the middle of an epoch "
                             f"of TBPTT with k2 > k1: the steps carried into the next windows are kept as "
                             f"{'activations' if self._memory is None else 'states'}; change it at an epoch "
                             f"boundary")
        self._memory = memory

    @property
    def backend(self):
        return self.model.backend

    @property
    def config(self):
        """Constructor settings besides model/optimizer/schedule (JSON-able)."""
        return {"k1": self.k1, "k2": self.k2, "clip_norm": self.clip_norm, "on_nonfinite": self.on_nonfinite,
                "record_grad_norms": self.record_grad_norms, "memory": self.memory}

    # ------------------------------------------------------------------ training

    def updates_per_epoch(self, data, batch_size, reset_mask=None):
        """Updates one epoch of :meth:`fit` makes on this data (arguments as there): one per chunk of
        k1 steps (per group under full BPTT) that holds a loss term; chunks without one (the early
        chunks of a last-step task) make none. A skipped non-finite update counts too."""
        dataset = Dataset(self.model, data, batch_size, reset_mask)
        n = 0
        for group in dataset.groups:
            k = group.T if self.k1 is None else self.k1
            n += sum(1 for t in range(0, group.T, k) if group.count(t, min(t + k, group.T)))
        return n

    @DeferredInterrupt.preemptible()
    def fit(self, data, batch_size, epochs=1, max_steps=None, validation=None, callbacks=(), reset_mask=None,
            eval_every=None, patience=None, validation_batch_size=None):
        """Train until ``epochs`` epochs are complete or ``max_steps`` updates are made, both counted
        over the trainer's life (a resumed run counts what was done before the checkpoint).

        data: 1-D int token stream (LanguageModel) or (inputs [N,T,I], targets) (SequenceModel),
        or (inputs, targets, lengths [N] ints in 1..T) for sequences of variable length (full BPTT);
        reset_mask: 1-D bool like data (token streams): True where a document starts.
        callbacks: cb(event) after every update, event = {"step", "epoch", "loss", "tokens"
        (tokens of this update), "tokens_per_s", "lr", "grad_norm", "skipped", "update_s" (seconds
        this update took), "comm_s" (of them in the allreduce; 0 in one process), "rank" (this
        process's; 0 in one process)}. Returns ``history``. On N ranks the figures are those of
        the whole batch (every rank's), alike on every rank.

        Validation: ``validation`` (data in the same form) is evaluated (:meth:`evaluate`, batch
        ``validation_batch_size``, default ``batch_size``) after the last update of every epoch and,
        with ``eval_every=N``, after every update whose step is a multiple of N. The event of an
        update after which validation ran also holds "val_loss", "val_perplexity" and
        "val_bits_per_token" (floats; a task model's perplexity is exp(loss) for class targets,
        NaN for MSE) and "val_accuracy" where :meth:`evaluate` gives one. Each result is fed to the
        schedule (:meth:`bptt.optim.Schedule.on_validation`: a :class:`bptt.optim.PlateauDecay`
        lowers the lr from the next update on) and appended to ``history`` ("val_step",
        "val_epoch", "val_lr", "val_loss", ...). ``validation_state`` keeps the best loss, its step
        and the validations since it improved; with ``patience=P``, training stops after the
        update of the P-th validation in a row without improvement (``stopped_early`` is then
        True; a later fit() with that patience returns at once). Validation changes nothing of the
        training itself: the same weights after every update with or without it (no dropout; the
        model's RNG, the carried state and the ring buffer untouched).
        """
        ranks = contextlib.nullcontext() if self._replicas is None else \
            self._replicas.running(agreed=(NonFiniteError,))      # errors and signals on N ranks
        with ranks:
            return self._fit(data, batch_size, epochs, max_steps, validation, callbacks, reset_mask, eval_every,
                             patience, validation_batch_size)

    def _fit(self, data, batch_size, epochs, max_steps, validation, callbacks, reset_mask, eval_every, patience,
             validation_batch_size):
        """The body of :meth:`fit` (arguments as there)."""
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer))
                                      or max_steps < 0):
            raise ValueError(f"max_steps must be None or an int >= 0; got {max_steps!r}")
        eval_every = _check_k("eval_every", eval_every)
        patience = _check_k("patience", patience)
        if validation is None and (eval_every is not None or patience is not None):
            raise ValueError("eval_every and patience need validation data (validation=...)")
        dataset = Dataset(self.model, data, batch_size, reset_mask)
        if self.k1 is not None and any(group.lengths is not None for group in dataset.groups):
            raise ValueError(f"variable-length sequences (lengths) train with full BPTT only (k1=k2=None), got "
                             f"k1={self.k1}: a TBPTT chunk in which some rows have already ended cannot be run "
                             f"(every row's length within a chunk must be >= 1)")
        if self.position is not None and (self.position.fingerprint != dataset.fingerprint
                                          or self.position.batch_size != dataset.batch_size):
            raise ValueError("fit() must continue the interrupted epoch with the same data, reset_mask and "
                             f"batch_size (batch_size was {self.position.batch_size}, now {dataset.batch_size}; "
                             "or the data differ)")
        if self._replicas is not None:      # the ranks compare their data; rank 0's weights for all
            self._replicas.start(self, dataset)
        local = local_groups(dataset, data, self.comm)     # this rank's rows of each group
        if self.memory is not None:
            if any(group.lengths is not None for group in dataset.groups):
                raise ValueError(f"memory={self.memory!r} does not apply to variable-length sequences (lengths): "
                                 f"their forward runs over all steps at once; use memory=None")
            self._windows = Windows(self.model, self.memory, self.k1, self.k2)
            self._windows.check(dataset, local)             # an infeasible budget fails here
        keep_freed_memory = getattr(self.backend, "keep_freed_memory", None)
        if keep_freed_memory is not None:   # cpu: the next update reuses freed pages (opt out:
            keep_freed_memory()             # BPTT_KEEP_FREED_MEMORY=0)
        stop = math.inf if max_steps is None else max_steps
        clock = _Clock()
        last_chunk = self._last_update_chunk(dataset)   # the epoch's last update: validation after it
        val_batch = batch_size if validation_batch_size is None else validation_batch_size
        self.stopped_early = patience is not None and self.validation_state["since_best"] >= patience
        while self.epoch < epochs and self.step < stop and not self.stopped_early:
            self.optimizer.lr = self.schedule(self.base_lr, self.epoch)
            if self.position is None:                   # a new epoch begins
                self.position = Position(0, 0, None, (), self.model.rng.bit_generator.state,
                                         dataset.fingerprint, dataset.batch_size)
            pos = self.position
            self.model.rng.bit_generator.state = pos.rng_state
            epoch_losses = []
            for gi in range(pos.group, len(dataset.groups)):
                group = dataset.groups[gi]
                t, state, ring = (pos.offset, pos.state, list(pos.ring)) if gi == pos.group else (0, None, [])
                while t < group.T and not self.stopped_early:
                    if self.step >= stop:
                        return self.history
                    t1 = group.T if self.k1 is None else min(t + self.k1, group.T)
                    began = time.perf_counter()
                    event = self._train_chunk(dataset, local, gi, t, t1, state, ring, clock)
                    if event is not None:
                        event["update_s"] = time.perf_counter() - began
                        epoch_losses.append(event["loss"])
                        if validation is not None and ((gi, t) == last_chunk or (
                                eval_every is not None and self.step % eval_every == 0
                                and self.validation_state["step"] != self.step)):
                            event.update(self._validate(validation, val_batch, event, clock))
                            self.stopped_early = patience is not None and \
                                self.validation_state["since_best"] >= patience
                        for cb in callbacks:
                            cb(event)
                    t, state = t1, self.position.state
                if self.stopped_early and (gi, t) != (len(dataset.groups) - 1, group.T):
                    return self.history                 # stopped inside the epoch
            self.epoch += 1
            self.position = None
            self.history["epoch_loss"].append(float(np.mean(epoch_losses)) if epoch_losses else math.nan)
        return self.history

    def _last_update_chunk(self, dataset):
        """(group, first step) of the last chunk of an epoch that makes an update (None if none)."""
        for gi in reversed(range(len(dataset.groups))):
            group = dataset.groups[gi]
            k = group.T if self.k1 is None else self.k1
            for t in reversed(range(0, group.T, k)):
                if group.count(t, min(t + k, group.T)):
                    return gi, t
        return None

    def _validate(self, validation, batch_size, event, clock):
        """Evaluate ``validation`` after the update of ``event``; feed the schedule, update
        ``validation_state`` and ``history``. Returns the event's "val_*" entries. The model's
        RNG is restored afterwards (evaluation draws nothing, but training must not depend on it)
        and the time it took is left out of the training clock."""
        began = time.perf_counter()
        rng_state = self.model.rng.bit_generator.state
        try:
            m = self.evaluate(validation, batch_size)
        finally:
            self.model.rng.bit_generator.state = rng_state
        result = validation_entries(m)
        loss = result["val_loss"]
        vs = self.validation_state
        vs["step"], vs["count"] = self.step, vs["count"] + 1
        if math.isfinite(loss) and (vs["best_loss"] is None or loss < vs["best_loss"]):
            vs["best_loss"], vs["best_step"], vs["since_best"] = loss, self.step, 0
        else:
            vs["since_best"] += 1
        self.schedule.on_validation(loss)
        self.optimizer.lr = self.schedule(self.base_lr, self.epoch)
        for k, v in (("val_step", self.step), ("val_epoch", event["epoch"]), ("val_lr", event["lr"]),
                     *result.items()):
            self.history.setdefault(k, []).append(v)
        clock.start += time.perf_counter() - began
        return result

    def _train_chunk(self, dataset, local, gi, t0, t1, state, ring, clock):
        """Forward steps [t0, t1) of group ``gi`` (this rank's rows ``local[gi]`` of it),
        backpropagate the window, update; then record the new position (carried state, ring
        buffer trimmed to what later windows need).

        The update and the new position are committed together with Ctrl-C deferred, so an
        interrupted run's checkpoint is always at a chunk boundary. Returns the event or None.
        """
        be, model = self.backend, self.model
        group, rows = dataset.groups[gi], local[gi]
        count = group.count(t0, t1)                     # loss terms of the whole batch
        divisor = count if self._replicas is None else 1    # N ranks: sums, divided after the allreduce
        overlap = 0 if self.k1 is None else self.k2 - self.k1
        w0 = max(0, t0 - overlap)                       # the window: steps [w0, t1)
        window = snapshot = None
        if self.memory is None:
            loss = 0.0
            for s0, s1, reset in rows.segments(t0, t1):
                keep = None
                if reset:
                    keep = be.asarray(~rows.resets[s0], model.dtype)                      # B
                    state = reset_rows(state, keep)
                out, state, cache = rows.forward(model, s0, s1, state, train=True)
                seg_loss, dout = rows.loss(be, out, s0, s1, divisor) if count else (0.0, None)
                loss += seg_loss
                ring.append(Segment(s0, s1, cache, dout, keep))
        else:
            snapshot = forward_weights(model) if overlap else None      # what the chunk's forward reads
            window, loss, state = self._windows.first_pass(rows, t0, t1, state, ring, divisor, count)
        if count:
            skipped, loss, grad_norm, dh_norms = self._backward_window(loss, ring, w0, t0, t1,
                                                                       rows.count(t0, t1), count, window)
        with DeferredInterrupt():
            event = None
            if count:
                if skipped is None:
                    if self.record_grad_norms:
                        self._record(dh_norms, w0, t1)
                    grads = list(model.grads.values())
                    if self.clip_norm is not None:
                        clip_grad_norm_(grads, self.clip_norm, be, total_norm=grad_norm)
                    self.optimizer.step(model.params, model.grads, be)
                    self.step += 1
                else:
                    state, ring[:] = None, []
                event = self._log(loss, grad_norm, skipped is not None, (t1 - t0) * group.B, clock)
            for seg in ring:
                if self.memory is None:
                    seg.dout = None
                elif seg.weights is None:
                    seg.weights = snapshot                # later windows recompute it as it ran
            ring[:] = [seg for seg in ring if seg.s1 > t1 - overlap]
            self.position = Position(gi, t1, state, tuple(ring), model.rng.bit_generator.state,
                                     dataset.fingerprint, dataset.batch_size)
        if self._replicas is not None and event is not None:
            self._replicas.after_update(self.step)
        return event

    def _nonfinite(self, what, t0, t1):
        msg = (f"non-finite {what} at step {self.step + 1} (epoch {self.epoch}, steps {t0}..{t1 - 1} "
               f"of the stream); the weights were not updated")
        if self.on_nonfinite == "raise":
            raise NonFiniteError(msg + " (on_nonfinite='skip' skips such updates)")
        return msg

    def _backward_window(self, loss, ring, w0, t0, t1, local_count, count, window=None):
        """Backward over the window [w0, t1) through the ring buffer (newest segment first), or by
        the plan of ``window`` (``memory`` set), into
        ``model.grads``; on N ranks (``loss``: the sum of this rank's ``local_count`` terms) the
        allreduce makes them the whole batch's mean over its ``count`` terms. Returns (skip
        message or None, the window's loss, gradient norm, per-segment dh norms)."""
        be, model = self.backend, self.model
        model.zero_grad()
        dstate, dh_norms, error = None, [], None
        try:
            if window is not None and math.isfinite(loss):
                if self.record_grad_norms:
                    window.on_dh = lambda dh: dh_norms.append([step_norms(be, d) for d in dh])
                window.backward()
            for seg in reversed(ring if math.isfinite(loss) and window is None else ()):   # non-finite loss: none
                if seg.s1 <= w0:
                    break
                ts = max(0, w0 - seg.s0)
                dstate, dh = model.backward(seg.dout, seg.cache, dstate, ts, return_dh=True, t_origin=seg.s0)
                if self.record_grad_norms:
                    dh_norms.append([step_norms(be, d[ts:]) for d in dh])
                if seg.keep is not None and ts == 0:
                    dstate = reset_rows(dstate, seg.keep)      # no gradient across a reset
        except NonFiniteGradientError as e:
            error = e
        if self._replicas is not None:          # every rank: NaN gradients where one rank's are not finite
            loss = self._replicas.reduce(loss, local_count, count, poisoned=error is not None)
        if not math.isfinite(loss):
            return self._nonfinite(f"loss ({loss})", t0, t1), loss, math.nan, []
        if error is None:
            grad_norm = math.sqrt(be.sum_of_squares(list(model.grads.values())))
            error = None if math.isfinite(grad_norm) else f"gradient norm {grad_norm}"
        if error is not None:
            return self._nonfinite(f"gradient ({error})", t0, t1), loss, math.nan, []
        return None, loss, grad_norm, dh_norms

    def _log(self, loss, grad_norm, skipped, tokens, clock):
        """The event of one window, also appended to ``history``."""
        clock.tokens += tokens
        event = {"step": self.step, "epoch": self.epoch, "loss": loss, "tokens": tokens,
                 "tokens_per_s": clock.rate(), "lr": self.optimizer.lr, "grad_norm": grad_norm,
                 "skipped": skipped, "rank": self.comm.rank,
                 "comm_s": 0.0 if self._replicas is None else self._replicas.comm_s}
        for k in ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "skipped"):
            self.history[k].append(event[k])
        return event

    def _record(self, dh_norms, w0, t1):
        """Store one window's gradient diagnostics (dh norms oldest step first, per level)."""
        be = self.backend
        levels = len(dh_norms[0])
        per_level = [[v for seg in reversed(dh_norms) for v in seg[k]] for k in range(levels)]
        self.history["grad_diagnostics"].append({
            "step": self.step + 1, "epoch": self.epoch, "window": [w0, t1], "dh_norms": per_level,
            "param_grad_norms": {n: math.sqrt(be.sum_of_squares([g])) for n, g in self.model.grads.items()}})

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, data, batch_size, reset_mask=None):
        """Loss on held-out data, no dropout, state carried over the whole stream (chunks of k1
        steps, or EVAL_CHUNK under full BPTT): see :func:`bptt.evaluation.evaluate`. On N ranks each
        evaluates its block of every batch (collective)."""
        return evaluate(self.model, data, batch_size, self.k1 or EVAL_CHUNK, reset_mask, comm=self.comm)

    # ------------------------------------------------------------------ state and checkpoints

    def state_dict(self):
        """Everything needed to resume, as plain dicts of host numpy arrays (copies) and JSON-able
        values, readable on any backend (caches by field name, no class names)::

            {"model": {"type", "config", "rng_state", "weights"}, "optimizer": its state_dict,
             "schedule": {"type", "config"[, "state"]}, "config": :attr:`config`, "base_lr", "step",
             "epoch", "history", "validation": :attr:`validation_state`, "position": None at an epoch boundary, else Position.to_dict (carried
             state, TBPTT ring buffer, dropout RNG state, data fingerprint), "meta"}

        On N ranks it is collective and every rank gets the whole batch's position
        (:func:`bptt.data_parallel.gather_position`).
        """
        be = self.backend
        return {"model": model_to_dict(self.model), "optimizer": self.optimizer.state_dict(be),
                "schedule": self.schedule.state_dict(), "config": dict(self.config),
                "base_lr": self.base_lr, "step": self.step, "epoch": self.epoch,
                "history": copy.deepcopy(self.history),
                "validation": dict(self.validation_state),
                "position": None if self.position is None else gather_position(self.position, be, self.comm),
                "meta": copy.deepcopy(self.meta)}

    def load_state_dict(self, sd):
        """Continue from :meth:`state_dict`'s ``sd`` (saved on any backend): the model's weights and
        dropout RNG, the optimizer's state, schedule, settings, counters, history, position and
        meta. The model and optimizer must be of the type and config ``sd`` was saved with (the
        seed and lr aside); ValueError otherwise, before anything is changed. ``sd`` is copied."""
        m, opt = sd["model"], sd["optimizer"]
        check_model_dict(self.model, m)
        if opt["type"] != type(self.optimizer).__name__:
            raise ValueError(f"the state is of a {opt['type']} optimizer, not a {type(self.optimizer).__name__}")
        ours = {k: v for k, v in _json(self.optimizer.config).items() if k != "lr"}
        theirs = {k: v for k, v in _json(opt["config"]).items() if k != "lr"}
        if ours != theirs:
            raise ValueError(f"the state is of a {opt['type']} with config {theirs}; this one has {ours}")
        schedule = schedule_from_state_dict(sd["schedule"])
        check_truncation(sd["config"]["k1"], sd["config"]["k2"])
        position = None if sd["position"] is None else position_from_dict(sd["position"], self.model, self.comm)
        load_model_dict(self.model, m)
        self.optimizer.load_state_dict(opt, self.backend)
        self._configure(**sd["config"])
        self.schedule = schedule
        self.base_lr = float(sd["base_lr"])
        self.step, self.epoch = int(sd["step"]), int(sd["epoch"])
        self.history = copy.deepcopy(sd["history"])
        self.validation_state = {**fresh_validation_state(), **(sd.get("validation") or {})}
        self.position = position
        self.meta = copy.deepcopy(sd.get("meta") or {})

    def save_checkpoint(self, path, meta=None):
        """Write :meth:`state_dict` to the file ``path`` atomically (:mod:`bptt.checkpoint_file`),
        with ``meta`` (JSON-able) in place of ``self.meta`` when given. On N ranks: collective,
        rank 0 writes."""
        sd = self.state_dict()
        if self.comm.rank != 0:
            return
        model, own_meta = sd.pop("model"), sd.pop("meta")
        checkpoint_file.save(path, model, sd, meta if meta is not None else own_meta)

    @classmethod
    def from_checkpoint(cls, path, comm=None, check_replicas=False):
        """The trainer of :meth:`save_checkpoint`'s file, on the current backend (whichever backend
        wrote it); ``trainer.meta`` holds its meta. CheckpointError naming the file if unusable.
        ``comm``, ``check_replicas``: as the constructor's (every rank reads the file and takes
        its streams; a file written by any number of ranks, see
        :func:`bptt.data_parallel.position_from_dict`)."""
        parts = checkpoint_file.load(path, trainer=True)
        model = checkpoint_file.rebuild(path, "model", model_from_dict, parts["model"])
        sd = dict(parts["trainer"], model=parts["model"], meta=parts["meta"])
        return checkpoint_file.rebuild(path, "trainer", cls._from_state_dict, model, sd, comm, check_replicas)

    @classmethod
    def _from_state_dict(cls, model, sd, comm=None, check_replicas=False):
        opt = sd["optimizer"]
        if opt["type"] not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer type {opt['type']!r}; known: {', '.join(OPTIMIZERS)}")
        trainer = cls(model, OPTIMIZERS[opt["type"]](**opt["config"]),
                      schedule=schedule_from_state_dict(sd["schedule"]), comm=comm, check_replicas=check_replicas,
                      **sd["config"])
        trainer.load_state_dict(sd)
        return trainer


def _json(value):
    """``value`` as it comes back from JSON (tuples as lists), for comparing settings."""
    return json.loads(json.dumps(value))


class _Clock:
    """Tokens processed and wall time since fit() began (for tokens_per_s)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.tokens = 0

    def rate(self):
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)
