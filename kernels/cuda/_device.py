"""Array plumbing of the Numba-CUDA backend: which arrays are "device arrays", streams, launches.

Decision (documented in the package docstring too):

* On a real GPU the backend's arrays are **CuPy** arrays (``xp = cupy``): the trainer does its
  small elementwise glue with ``xp``, and CuPy arrays pass straight into Numba-CUDA kernels
  through ``__cuda_array_interface__``. Numba kernels are launched on CuPy's current stream,
  so kernels and CuPy operations stay ordered. CuPy is therefore required on a GPU.
* Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) CuPy cannot allocate (no driver), so
  the arrays are plain **NumPy** host arrays (``xp = numpy``), which the simulator's kernels
  take directly (it copies them in and back around every launch).
"""

import contextlib
import importlib

import numpy as np
from numba import cuda, float32, float64

from . import config

SIMULATOR = config.SIMULATOR


@contextlib.contextmanager
def _numpy_row_stack():
    """np.row_stack (= np.vstack) inside the block only, where NumPy (>= 2.5) lacks it."""
    lent = not hasattr(np, "row_stack")
    if lent:
        np.row_stack = np.vstack
    try:
        yield
    finally:
        if lent:
            del np.row_stack


def load_numpy_overloads():
    """Import numba-cuda's NumPy overloads, which its first compile would import: numba-cuda
    <= 0.30 overloads np.row_stack there and fails every compile under NumPy 2.5 without it
    (NVIDIA/numba-cuda#907), so the alias is lent for this import only."""
    with _numpy_row_stack():
        importlib.import_module("numba.cuda.np.arrayobj")


if not SIMULATOR:   # the simulator compiles nothing
    load_numpy_overloads()


class _Missing:
    """Stands in for CuPy where it does not import: the kernels still import (and compile to
    PTX), and the first use of an array says why this backend cannot run."""

    ndarray = ()  # isinstance(a, ()) is always False

    def __init__(self, reason):
        self._reason = reason

    def __getattr__(self, name):
        raise ImportError(self._reason)


if SIMULATOR:
    xp = np
    cupy = None
else:  # a real GPU: CuPy arrays are this backend's device arrays
    try:
        import cupy
    except Exception as e:  # ImportError, or a CuPy built for another CUDA major version
        cupy = _Missing(
            "the 'cuda' backend keeps its arrays as CuPy arrays on a real GPU, but cupy failed to "
            f"import ({type(e).__name__}: {e}); install bptt[cuda12] or bptt[cuda13]")
    xp = cupy

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
NUMBA_DTYPE = {np.dtype(np.float32): float32, np.dtype(np.float64): float64}  # for shared arrays

# Typed constants for kernel arithmetic. Compiled, a bare 1.0 would promote float32 math to
# float64, so the constants are float32 (exact, and promoted exactly in float64 kernels).
# Under the simulator kernels run as NumPy/Python code, where math.exp returns a Python float
# and np.float32(1) + <Python float> would round to float32 even in a float64 kernel, so
# there the constants are Python ints (NumPy's weak scalars: they take the other operand's type).
ZERO, ONE = (0, 1) if SIMULATOR else (np.float32(0), np.float32(1))

_streams = {}


def stream():
    """The stream kernels launch on: CuPy's current stream on a GPU, 0 under the simulator."""
    if SIMULATOR:
        return 0
    ptr = cupy.cuda.get_current_stream().ptr
    s = _streams.get(ptr)
    if s is None:
        s = _streams[ptr] = cuda.external_stream(ptr) if ptr else cuda.default_stream()
    return s


def kernel_args(*args):
    """Arguments ready for a Numba kernel launch: CuPy arrays become Numba device-array views
    (``as_cuda_array(sync=False)``: no copy, and no stream synchronisation, which Numba would
    otherwise do for every launch with a CuPy argument; the kernels run on CuPy's current
    stream anyway). Everything else (and everything under the simulator) passes unchanged.
    Convert once, outside a time loop, where the same arrays are launched on every step."""
    if SIMULATOR:
        return args
    return tuple(cuda.as_cuda_array(a, sync=False) if isinstance(a, cupy.ndarray) else a
                 for a in args)


def blocks_for(n, threads):
    """Blocks of a grid-stride launch over ``n`` items (capped: the loop covers the rest)."""
    return max(1, min((n + threads - 1) // threads, 65535))


def configure_1d(kernel, n):
    """``kernel`` configured for a grid-stride launch over ``n`` items (``config.THREADS`` per
    block, on :func:`stream`); call the result with the kernel's arguments. Configure once
    outside a time loop, launch every step."""
    threads = config.THREADS
    return kernel[blocks_for(n, threads), threads, stream()]


def launch_1d(kernel, n, *args):
    """Launch a grid-stride ``kernel(*args)`` over ``n`` items with ``config.THREADS`` per block."""
    if n:
        configure_1d(kernel, n)(*kernel_args(*args))


def asarray(a, dtype):
    """Copy a host array-like (or device array) into a fresh C-contiguous device array of ``dtype``."""
    if not SIMULATOR and isinstance(a, cupy.ndarray):
        return cupy.array(a, dtype=dtype, order="C", copy=True)
    return xp.array(np.asarray(a), dtype=dtype, order="C", copy=True)


def to_host(a):
    """Device array -> a fresh ``numpy.ndarray``."""
    if not SIMULATOR and isinstance(a, cupy.ndarray):
        return cupy.asnumpy(a)
    return np.array(a, copy=True)


def zeros(shape, dtype):
    """Zero-filled device array."""
    return xp.zeros(shape, dtype=dtype)


def empty(shape, dtype):
    """Uninitialised device array (every element is written by a kernel before it is read);
    NaN-filled where ``config.POISON_OUTPUTS`` is set, so an unwritten element shows."""
    if config.POISON_OUTPUTS:
        return xp.full(shape, np.nan, dtype=dtype)
    return xp.empty(shape, dtype=dtype)


def is_device_array(a):
    return isinstance(a, xp.ndarray)


def index_array(name, a):
    """Integer indices (token ids, targets) as a device int64 array; host array-likes are
    accepted and uploaded (they are small), floats or other types raise TypeError."""
    if not is_device_array(a):
        a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    return xp.asarray(a, dtype=np.int64)


def check_array(name, a, ndim=None, dtype=None, shape=None):
    """Raise TypeError/ValueError naming ``name`` unless ``a`` is a C-contiguous device array
    with the given ``ndim``, ``dtype`` (or one of DTYPES) and ``shape`` (None entries: any)."""
    if not is_device_array(a):
        raise TypeError(
            f"{name} must be a {xp.__name__}.ndarray (this backend's device array; convert with "
            f"asarray), got {type(a).__name__}")
    if dtype is None:
        if a.dtype not in DTYPES:
            raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    elif a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(a.shape)}")
    if shape is not None:
        if len(shape) != a.ndim or any(s is not None and s != d for s, d in zip(shape, a.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
