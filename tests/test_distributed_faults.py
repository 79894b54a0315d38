"""Distributed runs that go wrong: a rank that raises during training stops every rank (the
error printed once, no hang), bad input before training is one clear error on every rank
(a batch size that is not a multiple of the ranks, ranks given different data, bad ids on one
rank), replicas whose weights drift apart are caught by the checksum, and the NCCL-or-MPI
decision for device buffers (a fake NCCL module, no GPU needed). The mpiexec runs are skipped
where mpi4py or mpiexec is missing."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "mpi"))
import mpi_runs  # noqa: E402

FAULT_TIMEOUT_S = 60      # far more than the seconds a stop takes; a hang fails here


@pytest.mark.parametrize("n", [2, 4])
def test_a_rank_that_raises_stops_every_rank(n):
    done = mpi_runs.run(n, ["faults.py", "raise"], timeout=FAULT_TIMEOUT_S, check=False)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert out.count("RuntimeError: injected failure at update 3 on rank 1") == 1, out
    assert out.count(f"bptt: rank 1 of {n} failed; stopping all {n} ranks") == 1, out


@pytest.mark.parametrize("mode, n, expected", [
    ("batch", 4, "ValueError: batch_size 6 is not a multiple of the 4 ranks"),
    ("data", 2, "DistributedError: the ranks were given different data (their fingerprints) (rank 0: "),
])
def test_bad_input_is_one_error_on_every_rank(mode, n, expected):
    done = mpi_runs.run(n, ["faults.py", mode], timeout=FAULT_TIMEOUT_S)
    lines = sorted(done.stdout.splitlines())
    assert len(lines) == n, done.stdout + done.stderr
    for rank, line in enumerate(lines):
        assert line.startswith(f"rank {rank}: {expected}"), line


def test_replicas_that_drift_apart_are_one_error_on_every_rank():
    done = mpi_runs.run(2, ["faults.py", "drift"], timeout=FAULT_TIMEOUT_S)
    lines = sorted(done.stdout.splitlines())
    assert len(lines) == 2, done.stdout + done.stderr
    for rank, line in enumerate(lines):
        assert line.startswith(f"rank {rank}: DistributedError: the parameters differ between the ranks after "
                               f"update 3 (checksums rank 0: 0x"), line
        assert line.endswith("their allreduce or optimizer steps disagree"), line


def test_an_error_on_one_rank_before_training_is_raised_on_every_rank():
    done = mpi_runs.run(2, ["faults.py", "ids"], timeout=FAULT_TIMEOUT_S)
    lines = sorted(done.stdout.splitlines())
    assert lines[0] == "rank 0: DistributedError: rank 1 of 2 failed: token ids must be in [0, 11); got range " \
                       "[0, 14]", lines
    assert lines[1] == "rank 1: ValueError: token ids must be in [0, 11); got range [0, 14]", lines


# ------------------------------------------------------------------------------------------
# NCCL or the host for device buffers (decided alike on every rank)


class FakeComm:
    """mpi4py's communicator as rank 0 of 2 sees it: the other rank holds the same buffer
    (Allreduce doubles it) and answers ``other`` in allgather."""

    def __init__(self, other):
        self.other, self.allgathers, self.host_sums = other, 0, 0

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 2

    def Split_type(self, kind, key):
        return type("Node", (), {"Get_rank": lambda s: 0, "Free": lambda s: None})()

    def Allreduce(self, in_place, buf, op):
        self.host_sums += 1
        buf *= 2

    def allgather(self, obj):
        self.allgathers += 1
        return [obj, self.other]

    def bcast(self, obj, root=0):
        return obj


class DeviceArray:
    """A stand-in for a GPU array: host memory behind a ``__cuda_array_interface__``."""

    def __init__(self, a):
        self.a = a

    size = property(lambda self: self.a.size)
    dtype = property(lambda self: self.a.dtype)

    @property
    def __cuda_array_interface__(self):
        return {"data": (self.a.ctypes.data, False), "shape": self.a.shape, "typestr": self.a.dtype.str,
                "version": 3}

    def __setitem__(self, index, value):
        self.a[index] = value


class DeviceBackend:
    NAME = "cupy"

    @staticmethod
    def to_host(buf):
        return buf.a.copy()

    @staticmethod
    def asarray(a, dtype):
        return np.asarray(a, dtype)


class FakeNccl:
    """cupy.cuda.nccl's names that the communicator uses; records the calls."""
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0
    calls = []

    @staticmethod
    def get_unique_id():
        return (42,)

    class NcclCommunicator:
        def __init__(self, size, uid, rank):
            FakeNccl.calls.append(("init", size, uid, rank))

        def allReduce(self, send, recv, count, dtype, op, stream):
            FakeNccl.calls.append(("allReduce", send, recv, count, dtype, op, stream))


@pytest.fixture
def communicator(monkeypatch):
    """communicator(nccl here, nccl on the other rank) -> (MPICommunicator over a FakeComm, FakeComm)."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'bptt[mpi]')")
    from bptt import distributed
    FakeNccl.calls = []
    stream = type("Stream", (), {"ptr": 99, "synchronize": lambda self: None})()
    monkeypatch.setattr(distributed, "_current_stream", lambda: stream)

    def make(here, there):
        monkeypatch.setattr(distributed, "_import_nccl", lambda: FakeNccl if here else None)
        fake = FakeComm(other=there)
        return distributed.MPICommunicator(fake), fake
    return make


@pytest.mark.parametrize("dtype, code", [(np.float32, 7), (np.float64, 8)])
def test_device_buffers_go_through_nccl_where_every_rank_has_it(communicator, rng, dtype, code):
    comm, fake = communicator(True, True)
    host = rng.standard_normal(13).astype(dtype)
    buf = DeviceArray(host)
    comm.allreduce_sum(buf, DeviceBackend)
    comm.allreduce_sum(buf, DeviceBackend)
    pointer = host.ctypes.data
    assert FakeNccl.calls == [("init", 2, (42,), 0)] + [("allReduce", pointer, pointer, 13, code, 0, 99)] * 2
    assert fake.host_sums == 0 and fake.allgathers == 1        # decided once, at the first buffer


@pytest.mark.parametrize("here, there", [(False, False), (False, True), (True, False)])
def test_device_buffers_are_summed_on_the_host_where_a_rank_lacks_nccl(communicator, rng, here, there):
    comm, fake = communicator(here, there)
    values = rng.standard_normal(9)
    buf = DeviceArray(values.copy())
    comm.allreduce_sum(buf, DeviceBackend)
    comm.allreduce_sum(buf, DeviceBackend)
    np.testing.assert_array_equal(buf.a, 4 * values)           # two sums of 2 ranks, through MPI
    assert FakeNccl.calls == [] and fake.host_sums == 2 and fake.allgathers == 1


def test_host_buffers_never_go_through_nccl(communicator, rng):
    comm, fake = communicator(True, True)
    values = rng.standard_normal(5)
    buf = values.copy()
    comm.allreduce_sum(buf, DeviceBackend)
    np.testing.assert_array_equal(buf, 2 * values)
    assert FakeNccl.calls == [] and fake.allgathers == 0
