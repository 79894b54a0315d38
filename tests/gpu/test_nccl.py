"""NCCL on a real GPU, one rank: cupy's NCCL bindings behind bptt.distributed sum a device
buffer in place (float32 and float64), and the rank takes GPU local_rank. Multi-rank runs use
the same calls (tests/test_distributed*.py run the MPI side on CPUs).

    python -m pytest -m gpu tests/gpu/test_nccl.py

Skipped without a usable GPU, cupy, NCCL or mpi4py."""

import os

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture
def nccl_comm():
    """(cupy, an MPICommunicator of this one process, its NCCL communicator)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("the CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1): no real GPU")
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no GPU")
    except Exception as e:  # noqa: BLE001 -- no driver, no device
        pytest.skip(f"no usable GPU: {type(e).__name__}: {e}")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'bptt[mpi]')")
    from bptt import distributed
    if distributed._import_nccl() is None:
        pytest.skip("cupy has no NCCL (cupy.cuda.nccl.available is False)")
    import bptt
    comm = distributed.MPICommunicator()
    with bptt.use_backend("cupy") as backend:
        comm.use_local_device(backend)
        assert cupy.cuda.Device().id == comm.local_rank
        nccl = distributed._Nccl.create(comm)
        assert nccl is not None
        yield cupy, comm, nccl


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nccl_sums_a_device_buffer_in_place(nccl_comm, rng, dtype):
    cupy, comm, nccl = nccl_comm
    values = rng.standard_normal(1001).astype(dtype)
    buf = cupy.asarray(values)
    pointer = buf.data.ptr
    nccl.all_reduce_sum(buf)
    assert buf.data.ptr == pointer
    np.testing.assert_array_equal(cupy.asnumpy(buf), values * comm.size)     # one rank: unchanged
