"""Data-parallel training over MPI (mpi4py), with NCCL for the gradients of GPU backends.

A communicator is what :class:`bptt.Trainer` needs from a group of N processes (ranks): its
rank and N, one in-place sum of a flat buffer per update (the gradients, the loss and the
counted targets together), a broadcast of the parameters from rank 0, small host objects
gathered to every rank (stream states for a checkpoint, data fingerprints to compare) and an
abort that stops every rank. ``mpi()`` gives the one over ``MPI.COMM_WORLD``; :class:`Solo`
is the communicator of one process (every collective the identity).

Run ``mpiexec -n N bptt train ... --distributed mpi`` or, in Python,
``Trainer(model, opt, ..., comm=bptt.distributed.mpi())`` in a script started by mpiexec
(:mod:`bptt.data_parallel` says what the trainer does with it). Outside mpiexec ``mpi()`` is a
world of one rank and training runs as in one process.

Device buffers (the cupy and cuda backends) are summed by NCCL (``cupy.cuda.nccl``; the NCCL
id made on rank 0 and broadcast over MPI) where every rank has it, else copied to the host,
summed over MPI and copied back; the decision is made once, alike on every rank, at the first
device buffer. Each rank uses GPU ``local_rank`` (its rank among the processes of its machine):
:meth:`MPICommunicator.use_local_device`.
"""

import os
import sys

import numpy as np

__all__ = ["DistributedError", "Solo", "MPICommunicator", "mpi", "available", "launched_processes"]

class DistributedError(RuntimeError):
    """A distributed run cannot go on (a missing library, ranks that disagree)."""


def available():
    """True when mpi4py imports (the ``mpi`` extra: ``pip install 'bptt[mpi]'``)."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


class Solo:
    """The communicator of one process: every collective is the identity."""

    rank, size, local_rank = 0, 1, 0

    def allreduce_sum(self, buf, backend):
        """Sum ``buf`` (a contiguous 1-D host (numpy) or device array of ``backend``) over ranks,
        in place; returns it."""
        return buf

    def bcast_array(self, a, backend):
        """Overwrite ``a`` (host or device) with rank 0's values, in place; returns it."""
        return a

    def allgather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank (small, picklable objects)."""
        return [obj]

    def bcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        return obj

    def use_local_device(self, backend):
        """Nothing to choose in one process: the backend's current device is used."""

    def abort(self, code=1):
        """End this process with status ``code``."""
        sys.exit(code)

    def __repr__(self):
        return "Solo()"


class MPICommunicator(Solo):
    """The ranks of an mpi4py communicator (default ``MPI.COMM_WORLD``).

    Host buffers are summed with ``Allreduce(IN_PLACE)``; device buffers through NCCL where
    every rank has it, else on the host (module docstring). ``local_rank``: this process's rank
    among those of its machine (``MPI.COMM_TYPE_SHARED``).
    """

    def __init__(self, comm=None):
        from mpi4py import MPI
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = node.Get_rank()
        node.Free()
        self._nccl = None     # None: not decided yet; False: NCCL absent; else an _Nccl

    # ---------------------------------------------------------------- collectives

    def allreduce_sum(self, buf, backend):
        if self.size == 1:
            return buf
        if isinstance(buf, np.ndarray):
            self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
            return buf
        nccl = self.nccl()
        if nccl is not None:
            nccl.all_reduce_sum(buf)
            return buf
        host = np.ascontiguousarray(backend.to_host(buf))          # no NCCL: through the host
        self.comm.Allreduce(self._MPI.IN_PLACE, host, op=self._MPI.SUM)
        buf[...] = backend.asarray(host, host.dtype)
        return buf

    def bcast_array(self, a, backend):
        if self.size == 1:
            return a
        host = np.ascontiguousarray(backend.to_host(a))
        self.comm.Bcast(host, root=0)
        a[...] = host if isinstance(a, np.ndarray) else backend.asarray(host, host.dtype)
        return a

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def abort(self, code=1):
        """Stop every rank of the job now (``MPI_Abort``): no rank is left waiting in a
        collective for one that failed."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)

    # ---------------------------------------------------------------- GPUs

    def use_local_device(self, backend):
        """Make GPU ``local_rank`` current for a GPU backend (one GPU per rank); the cpu and
        reference backends need nothing. Call before the model is built.
        DistributedError where the machine has fewer GPUs than ranks."""
        if backend.NAME == "cupy":
            import cupy
            count = cupy.cuda.runtime.getDeviceCount()
        elif backend.NAME == "cuda":
            from numba import cuda
            count = len(cuda.gpus)
        else:
            return
        if self.local_rank >= count:
            raise DistributedError(f"rank {self.rank} is process {self.local_rank} of its machine, which has "
                                   f"{count} GPU(s): start at most {count} ranks per machine")
        if backend.NAME == "cupy":
            cupy.cuda.Device(self.local_rank).use()
        else:
            cuda.select_device(self.local_rank)

    def nccl(self):
        """The NCCL communicator for device buffers, or None where some rank lacks NCCL (then
        device buffers are summed on the host). Decided once, collectively: every rank calls
        this at the same point (its first device buffer)."""
        if self._nccl is None:
            self._nccl = _Nccl.create(self) or False
        return self._nccl or None

    def __repr__(self):
        return f"MPICommunicator(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"


def _import_nccl():
    """cupy's NCCL bindings (``cupy.cuda.nccl``), or None where cupy or NCCL is missing."""
    try:
        from cupy.cuda import nccl
    except Exception:                    # noqa: BLE001 -- no cupy, no CUDA driver, ...
        return None
    return nccl if getattr(nccl, "available", True) else None


def _current_stream():
    """The pointer of cupy's current CUDA stream (the NCCL call is ordered on it)."""
    import cupy
    return cupy.cuda.get_current_stream()


class _Nccl:
    """An NCCL communicator over the ranks of an :class:`MPICommunicator`, summing device
    buffers that expose ``__cuda_array_interface__`` (cupy and Numba-CUDA arrays)."""

    def __init__(self, nccl, communicator):
        self.nccl, self.comm = nccl, communicator
        self.types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}

    @classmethod
    def create(cls, mpi_comm):
        """The communicator, or None unless every rank has NCCL (the same answer on every rank)."""
        nccl = _import_nccl()
        if not all(mpi_comm.allgather(nccl is not None)):
            return None
        uid = mpi_comm.bcast(nccl.get_unique_id() if mpi_comm.rank == 0 else None)
        return cls(nccl, nccl.NcclCommunicator(mpi_comm.size, uid, mpi_comm.rank))

    def all_reduce_sum(self, buf):
        """Sum the contiguous 1-D device array ``buf`` over the ranks, in place (synchronous)."""
        pointer = buf.__cuda_array_interface__["data"][0]
        stream = _current_stream()
        self.comm.allReduce(pointer, pointer, buf.size, self.types[np.dtype(buf.dtype)], self.nccl.NCCL_SUM,
                            stream.ptr)
        stream.synchronize()


def mpi():
    """The communicator of ``MPI.COMM_WORLD`` (a world of one rank outside mpiexec).
    DistributedError with the install line when mpi4py is missing."""
    if not available():
        raise DistributedError("distributed training over MPI needs mpi4py and an MPI library: "
                               "pip install 'bptt[mpi]' (mpi4py and mpich), then run under mpiexec -n N")
    return MPICommunicator()


def launched_processes():
    """How many processes the MPI launcher that started this one started (MPICH's PMI_SIZE, Open
    MPI's OMPI_COMM_WORLD_SIZE); 1 outside a launcher. Needs no mpi4py."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1
