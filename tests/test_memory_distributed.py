"""Memory-efficient BPTT on N ranks (``mpiexec -n 2``, tests/mpi/train.py): each rank replays the
dropout masks of its rows from draws made for the whole batch, as one process does, so the
weights after 12 (40) updates equal those of one process with memory=None to float rounding (and to
one process with the same memory setting). Skipped where mpi4py or mpiexec is missing."""

import os
import sys

import numpy as np
import pytest

from helpers import rel_err

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "mpi"))
import mpi_runs  # noqa: E402
import setups  # noqa: E402

RUNS = {
    "lm_k2>k1_dropout_sqrt": dict(model="lm", dtype="float64", k1=4, k2=9, dropout=0.3, clip=0.5, memory="sqrt"),
    "seq_full_budget": dict(model="seq", dtype="float64", k1=None, k2=None, memory=110000, block_rows=0),
    # 29 sequences in batches of 4: the last one's single row goes to rank 1, rank 0 runs none
    "seq_tbptt_sqrt_a_rank_without_rows": dict(model="seq", dtype="float64", k1=3, k2=5, memory="sqrt",
                                               B=4, steps=40),
}


def _single(cfg):
    trainer, data, fit = setups.build(cfg)
    trainer.fit(data, **fit)
    return setups.result(trainer)


def test_ranks_with_memory_train_as_one_process(tmp_path, monkeypatch):
    from bptt_kernels.host import blocks
    monkeypatch.setattr(blocks, "BLOCK_ROWS", blocks.BLOCK_ROWS)      # restored after the in-process runs
    configs = {name: dict({"B": 8, "steps": 12}, **cfg, data_seed=5) for name, cfg in RUNS.items()}
    results = mpi_runs.run_configs(2, configs, tmp_path)
    for name, cfg in configs.items():
        plain = _single(dict(cfg, memory=None))
        for key, value in plain.items():
            if key.startswith("w/"):
                assert rel_err(results[name][key], value) <= 1e-10, (name, key)
        assert np.allclose(results[name]["h/loss"], plain["h/loss"], rtol=1e-10, atol=0), name
