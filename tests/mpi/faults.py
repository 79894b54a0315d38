"""``mpiexec -n N python tests/mpi/faults.py MODE``: a small LanguageModel run that goes wrong.

raise   rank 1 raises from a callback at update 3 (the others are in the next update's
        allreduce): every rank must stop within seconds, the error printed once;
batch   batch_size 6 on N = 4 ranks (not a multiple);
data    rank 1 is given other tokens than the rest;
ids     rank 1's tokens hold an id outside the vocabulary (an error before training, on one rank);
drift   rank 1 moves a weight by one float after update 2 (the checksum after update 3 differs);
In the last four each rank prints one line, "rank R: <error type>: <message>", and exits 0.
"""

import os
import sys

import numpy as np

import bptt
from bptt.distributed import mpi

VOCAB = 11


def main(mode):
    comm = mpi()
    bptt.use_backend("cpu")
    tokens = np.random.default_rng(5).integers(0, VOCAB, 600)
    if mode == "data" and comm.rank == 1:
        tokens[17] = (tokens[17] + 1) % VOCAB
    if mode == "ids" and comm.rank == 1:
        tokens[17] = VOCAB + 3
    model = bptt.LanguageModel(VOCAB, 6, 8, num_layers=2, seed=3)
    trainer = bptt.Trainer(model, bptt.Adam(lr=0.01), k1=5, comm=comm, check_replicas=mode == "drift")

    def fail(event):
        if event["rank"] == 1 and event["step"] == 3 and mode == "raise":
            raise RuntimeError(f"injected failure at update {event['step']} on rank {event['rank']}")
        if event["rank"] == 1 and event["step"] == 2 and mode == "drift":
            bias = model.params["decoder.bias"]
            bias[0] = np.nextafter(bias[0], np.inf)
    try:
        trainer.fit(tokens, 6 if mode == "batch" else 8, max_steps=20, callbacks=(fail,))
    except Exception as e:                                          # noqa: BLE001 -- printed for the test
        if mode == "raise":
            raise
        say(f"rank {comm.rank}: {type(e).__name__}: {e}")
        return
    say(f"rank {comm.rank}: no error")


def say(line):
    """One line on stdout in one write (mpiexec interleaves the ranks' output by writes)."""
    os.write(1, (line + "\n").encode())


if __name__ == "__main__":
    main(sys.argv[1])
