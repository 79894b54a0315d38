"""Checkpoints of data-parallel runs (mpiexec -n 2 and -n 4 runs of tests/mpi/train.py): rank 0
writes one checkpoint holding every rank's streams, shaped as one process's; resuming it on the
same number of ranks continues bit for bit (a TBPTT ring buffer included, with dropout);
resuming on another number of ranks (or in one process) re-splits the streams exactly where the
ring buffer is empty (k1 == k2), and is refused in one line naming both numbers where it is not.
Skipped where mpi4py or mpiexec is missing."""

import os
import sys
import zlib

import numpy as np
import pytest

import bptt
from bptt import checkpoint_file
from bptt.checkpoint_file import CheckpointError
from helpers import RTOL, rel_err

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "mpi"))
import mpi_runs  # noqa: E402
import setups  # noqa: E402

STOP = 7     # the update the first part of a run stops at (inside an epoch of 16 or 19)
RING = dict(model="lm", dtype="float64", k1=4, k2=9, dropout=0.3, clip=0.5, B=8, steps=20)   # ring kept
NO_RING = dict(model="lm", dtype="float64", k1=5, k2=5, dropout=0.3, clip=0.5, B=8, steps=20)


@pytest.fixture(scope="module")
def seed():
    base = int(os.environ.get("BPTT_TEST_SEED", "0"))
    return zlib.crc32(__name__.encode()) ^ base


@pytest.fixture(scope="module")
def stopped(seed, tmp_path_factory):
    """2-rank runs: each configuration whole (20 updates) and stopped at update STOP with a
    checkpoint. Returns (folder, {name: result}, {name: configuration})."""
    folder = tmp_path_factory.mktemp("stopped")
    ring, no_ring = dict(RING, data_seed=seed), dict(NO_RING, data_seed=seed)
    configs = {"ring_whole": ring, "no_ring_whole": no_ring,
               "ring_part": dict(ring, steps=STOP, save=os.fspath(folder / "ring.npz")),
               "no_ring_part": dict(no_ring, steps=STOP, save=os.fspath(folder / "no_ring.npz"))}
    return folder, mpi_runs.run_configs(2, configs, folder), {"ring": ring, "no_ring": no_ring}


def single(cfg, steps):
    trainer, data, fit = setups.build(dict(cfg, steps=steps))
    trainer.fit(data, **fit)
    return trainer


def max_weight_err(ours, expected):
    return max(rel_err(ours[k], expected[k]) for k in expected if k.startswith("w/"))


def test_the_checkpoint_is_shaped_as_one_process_s(stopped):
    folder, _, cfgs = stopped
    one = single(cfgs["no_ring"], STOP)
    expected = one.state_dict()["position"]
    position = checkpoint_file.load(folder / "no_ring.npz", trainer=True)["trainer"]["position"]
    assert position["ranks"] == 2 and position["ring"] == [] and "ring_per_rank" not in position
    assert {k: position[k] for k in ("group", "offset", "fingerprint", "batch_size")} == \
        {k: expected[k] for k in ("group", "offset", "fingerprint", "batch_size")}
    assert position["rng_state"] == expected["rng_state"]
    for ours, theirs in zip(position["state"], expected["state"], strict=True):      # h, c [L, B, H]
        assert ours.shape == theirs.shape == (2, 8, 8)
        assert rel_err(ours, theirs) <= RTOL[np.dtype(np.float64)]
    ring = checkpoint_file.load(folder / "ring.npz", trainer=True)["trainer"]["position"]
    assert ring["ring"] == [] and len(ring["ring_per_rank"]) == 2 and all(ring["ring_per_rank"])


def test_resuming_on_as_many_ranks_continues_bit_for_bit(stopped, tmp_path):
    folder, results, cfgs = stopped
    resumed = mpi_runs.run_configs(2, {
        "ring": dict(cfgs["ring"], resume=os.fspath(folder / "ring.npz")),
        "no_ring": dict(cfgs["no_ring"], resume=os.fspath(folder / "no_ring.npz"))}, tmp_path)
    for name in ("ring", "no_ring"):
        whole = results[f"{name}_whole"]
        assert set(resumed[name]) == set(whole)
        for key, value in whole.items():
            np.testing.assert_array_equal(resumed[name][key], value, err_msg=f"{name}: {key}")


def test_resuming_on_other_ranks_splits_the_streams_anew(stopped, tmp_path):
    """4 ranks, and one process, continue the 2-rank checkpoint of k1 == k2 as one process runs
    the whole; the checkpoint inside a ring buffer's window is refused in one line."""
    folder, _, cfgs = stopped
    expected = setups.result(single(cfgs["no_ring"], 20))
    four = mpi_runs.run_configs(4, {
        "no_ring": dict(cfgs["no_ring"], resume=os.fspath(folder / "no_ring.npz")),
        "ring": dict(cfgs["ring"], resume=os.fspath(folder / "ring.npz"))}, tmp_path)
    assert max_weight_err(four["no_ring"], expected) <= RTOL[np.dtype(np.float64)]
    assert four["ring"].startswith("CheckpointError: ") and four["ring"].endswith(
        "the checkpoint was written by 2 rank(s) inside a TBPTT window whose ring buffer (k2 > k1) holds each "
        "rank's activations: resume it on 2 rank(s), not 4)"), four["ring"]

    setups.build(cfgs["no_ring"])                                          # its backend
    trainer, data, fit = setups.build(cfgs["no_ring"], trainer=bptt.Trainer.from_checkpoint(folder / "no_ring.npz"))
    trainer.fit(data, **fit)
    assert max_weight_err(setups.result(trainer), expected) <= RTOL[np.dtype(np.float64)]
    with pytest.raises(CheckpointError, match=r"written by 2 rank\(s\) .* resume it on 2 rank\(s\), not 1\)$"):
        bptt.Trainer.from_checkpoint(folder / "ring.npz")
