"""Data-parallel training on N ranks against one process: ``mpiexec -n 2`` and ``-n 4`` runs of
tests/mpi/train.py (every configuration of CONFIGS in one run per N: each rank starts Python
once), compared with the same configuration trained here in one process with the whole batch.

Weights after 20 updates within WEIGHTS_RTOL (float64 1e-10, float32 5e-5: each rank sums its
B/N rows' gradients, the allreduce adds the ranks' sums, and Adam's normalised steps carry those
last-bit differences through 20 updates; measured up to 2.1e-5), and the history's losses,
gradient norms, tokens and validation losses, for LanguageModel (dropout, document starts, the
epoch boundary crossed) and SequenceModel (ignored targets, a last batch smaller than B: with 4
ranks it is cut 1/1/1/2), k1 == k2 and k2 > k1, clipping on and off, Adam and SGD; every
update's replicas checked equal (check_replicas). Skipped where mpi4py or mpiexec is missing.
"""

import json
import os
import sys
import zlib

import numpy as np
import pytest

from helpers import RTOL, rel_err

WEIGHTS_RTOL = {np.dtype(np.float64): RTOL[np.dtype(np.float64)], np.dtype(np.float32): 5e-5}

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "mpi"))
import mpi_runs  # noqa: E402
import setups  # noqa: E402

RUNS = {
    "lm_f64_k1=k2_dropout_clip": dict(model="lm", dtype="float64", k1=5, k2=5, dropout=0.3, clip=0.5, validation=True),
    "lm_f64_k2>k1_dropout_sgd": dict(model="lm", dtype="float64", k1=4, k2=9, dropout=0.3, optimizer="sgd"),
    "seq_f64_k1=k2_clip": dict(model="seq", dtype="float64", k1=4, k2=4, clip=1.0, validation=True),
    "seq_f64_k2>k1_clip": dict(model="seq", dtype="float64", k1=3, k2=7, clip=0.5),
    "lm_f32_k1=k2_dropout_clip": dict(model="lm", dtype="float32", k1=5, k2=5, dropout=0.3, clip=0.5),
    "lm_f32_k2>k1_dropout_clip": dict(model="lm", dtype="float32", k1=4, k2=9, dropout=0.3, clip=0.5),
    "seq_f32_k1=k2": dict(model="seq", dtype="float32", k1=4, k2=4, validation=True),
    "seq_f32_k2>k1_clip_sgd": dict(model="seq", dtype="float32", k1=3, k2=7, clip=0.5, optimizer="sgd"),
}


@pytest.fixture(scope="module")
def seed():
    """The data seed of this module's runs (fresh with BPTT_TEST_SEED)."""
    base = int(os.environ.get("BPTT_TEST_SEED", "0"))
    value = zlib.crc32(__name__.encode()) ^ base
    print(f"data seed {value} (BPTT_TEST_SEED={base})")
    return value


def configs(seed):
    return {name: dict(cfg, B=8, steps=20, data_seed=seed) for name, cfg in RUNS.items()}


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ranks_results(request, seed, tmp_path_factory):
    """(N, {name: the rank-0 result of an N-rank run}) of every configuration."""
    n = request.param
    return n, mpi_runs.run_configs(n, configs(seed), tmp_path_factory.mktemp(f"ranks{n}"))


_single = {}


def single(name, cfg):
    """The one-process result of ``cfg`` (made once per configuration)."""
    if name not in _single:
        trainer, data, fit = setups.build(cfg)
        trainer.fit(data, **fit)
        _single[name] = setups.result(trainer)
    return _single[name]


@pytest.mark.parametrize("name", list(RUNS))
def test_ranks_train_as_one_process(ranks_results, seed, name):
    n, results = ranks_results
    cfg = configs(seed)[name]
    ours, expected = results[name], single(name, cfg)
    tol = WEIGHTS_RTOL[np.dtype(cfg["dtype"])]
    weights = max(rel_err(ours[k], expected[k]) for k in expected if k.startswith("w/"))
    print(f"{name}, {n} ranks: max rel err of the weights {weights:.3g}")
    assert weights <= tol, f"{name} on {n} ranks: weights differ from one process by {weights:.3g} > {tol:g}"
    assert len(expected["h/loss"]) == cfg["steps"]
    np.testing.assert_array_equal(ours["h/tokens"], expected["h/tokens"])      # every rank's tokens
    assert len(expected["h/val_loss"]) >= (4 if cfg.get("validation") else 0)
    for key in ("h/loss", "h/grad_norm", "h/val_loss"):
        err = rel_err(ours[key], expected[key])
        assert err <= tol, f"{name} on {n} ranks: {key} differs from one process by {err:.3g}"


def test_a_world_of_one_rank_trains_exactly_as_one_process(seed):
    """mpi() outside mpiexec (one rank) changes nothing: the same weights, bit for bit."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'bptt[mpi]')")
    from bptt.distributed import mpi
    cfg = dict(RUNS["lm_f64_k2>k1_dropout_sgd"], B=8, steps=6, data_seed=seed)
    results, events = [], []
    for comm in (None, mpi()):
        trainer, data, fit = setups.build(cfg, comm)
        trainer.fit(data, **fit, callbacks=[events.append])
        results.append(setups.result(trainer))
    for key, value in results[0].items():
        np.testing.assert_array_equal(results[1][key], value, err_msg=key)
    assert {(e["rank"], e["comm_s"]) for e in events} == {(0, 0.0)}
