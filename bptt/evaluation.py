"""Evaluation on held-out data: the loss of a model over token streams or sequences, with no
dropout and the state carried over each stream, and the "val_*" entries a validation adds to
a training update's event."""

import math

import numpy as np

from bptt.batches import Dataset, reset_rows
from bptt.data_parallel import local_groups, sum_over_ranks
from bptt.models import LanguageModel


def evaluate(model, data, batch_size, chunk, reset_mask=None, comm=None):
    """Loss of ``model`` on ``data`` (the forms of :meth:`bptt.Trainer.fit`), forward in chunks
    of ``chunk`` steps with the state carried (no truncation without backward: the chunking
    changes nothing but memory). Sequences of variable length (data ``(inputs, targets,
    lengths)``) and bidirectional models run each batch over all its steps at once.

    LanguageModel: {"loss" (nats per token), "perplexity", "bits_per_token"}. SequenceModel:
    {"loss"} plus "accuracy" (argmax over counted targets) for class targets.

    ``comm`` (a communicator of N ranks, every rank given the same data): collective; each rank
    evaluates its block of every batch's rows (:func:`bptt.data_parallel.local_groups`) and the
    sums are added over the ranks.
    """
    be = model.backend
    dataset = Dataset(model, data, batch_size, reset_mask)
    total, count, correct = 0.0, 0, 0
    for group in local_groups(dataset, data, comm):
        state = None
        whole = group.lengths is not None or getattr(model, "bidirectional", False)
        steps = group.T if whole else chunk
        for t0 in range(0, group.T, steps):
            for s0, s1, reset in group.segments(t0, min(t0 + steps, group.T)):
                if reset:
                    state = reset_rows(state, be.asarray(~group.resets[s0], model.dtype))
                out, state, _ = group.forward(model, s0, s1, state, train=False)
                n = group.count(s0, s1)
                if n == 0:
                    continue
                if group.ce:
                    tg = group.targets[s0:s1] if group.every_step else group.targets
                    tg_dev = be.asarray(tg, np.int64)
                    pred = be.xp.argmax(out, axis=-1)
                    correct += int(((pred == tg_dev) & (tg_dev >= 0)).sum())
                total += group.loss(be, out, s0, s1, 1)[0]
                count += n
    if comm is not None and comm.size > 1:
        total, count, correct = sum_over_ranks(comm, total, count, correct)
    loss = total / count if count else math.nan
    if isinstance(model, LanguageModel):
        return {"loss": loss, **_per_token(loss)}
    metrics = {"loss": loss}
    if dataset.groups[0].ce:
        metrics["accuracy"] = correct / count if count else math.nan
    return metrics


def _per_token(loss):
    """Perplexity and bits per token of a cross-entropy ``loss`` in nats."""
    return {"perplexity": math.exp(loss) if loss < 700 else math.inf,
            "bits_per_token": loss / math.log(2)}


def fresh_validation_state():
    """Trainer.validation_state before any validation: best loss and its step, validations made,
    the step of the last one, validations since the best (the patience counter)."""
    return {"best_loss": None, "best_step": None, "count": 0, "step": None, "since_best": 0}


def validation_entries(metrics):
    """The "val_*" entries of an update's event from :func:`evaluate`'s ``metrics``:
    val_loss, val_perplexity and val_bits_per_token (NaN for an MSE loss), val_accuracy
    where there is one."""
    loss = float(metrics["loss"])
    if "perplexity" in metrics or "accuracy" in metrics:      # cross-entropy
        per_token = _per_token(loss)
    else:                                                     # MSE: no perplexity
        per_token = {"perplexity": math.nan, "bits_per_token": math.nan}
    entries = {"val_loss": loss, "val_perplexity": float(per_token["perplexity"]),
               "val_bits_per_token": float(per_token["bits_per_token"])}
    if "accuracy" in metrics:
        entries["val_accuracy"] = float(metrics["accuracy"])
    return entries
