"""The backend dispatcher: which compute backend (``bptt_kernels.<name>``) runs the kernels.

Choose with the ``BPTT_BACKEND`` environment variable (read at first use, not at import)
or with :func:`use_backend`, as a call or a context manager::

    bptt.use_backend("cpu")
    with bptt.use_backend("reference"):
        ...
    bptt.get_backend().NAME

Names: ``cpu`` (Numba @njit), ``cuda`` (Numba-CUDA), ``cupy`` (CuPy), ``auto`` (default:
cupy, then cuda, where a GPU is really usable, else cpu; it reports which it picked), and
``reference`` (the plain NumPy oracle: slow, float64-exact, for tests and reading).

GPU modules are imported lazily, only when a GPU backend is asked for or probed by ``auto``.
"""

import importlib
import os
import sys

KNOWN = ("cpu", "cuda", "cupy", "reference")
_current = None  # the backend module in use, or None until first use


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here."""


def _driver_missing():
    """The reason no NVIDIA driver is usable here, or None. Cheap: loads libcuda only, so that
    ``auto`` on a CPU-only machine does not pay for importing cupy and numba.cuda."""
    import ctypes
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll", "libcuda.dylib"):
        try:
            ctypes.CDLL(lib)
            return None
        except OSError:
            continue
    return "no NVIDIA driver found (libcuda could not be loaded)"


def _probe_cupy():
    """Return None if CuPy can allocate on a GPU here, else the reason it cannot."""
    missing = _driver_missing()
    if missing:
        return missing
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install
        return f"cupy is not installed or failed to import ({type(e).__name__}: {e}); install bptt[cuda12] or bptt[cuda13]"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return "cupy found no CUDA device"
        cupy.zeros(1)
    except Exception as e:
        return f"cupy cannot use a GPU ({type(e).__name__}: {e})"
    return None


def _probe_cuda():
    """Return None if Numba-CUDA can use a GPU here (or the simulator is on), else the reason."""
    simulator = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    missing = None if simulator else _driver_missing()
    if missing:
        return missing
    try:
        from numba import cuda
    except Exception as e:
        return f"numba.cuda failed to import ({type(e).__name__}: {e}); install bptt[cuda12] or bptt[cuda13]"
    if simulator:
        return None  # the CUDA simulator runs kernels on the CPU (slowly); used by the tests
    try:
        if not cuda.is_available():
            return "numba.cuda reports no usable CUDA driver or device"
    except Exception as e:
        return f"numba.cuda cannot use a GPU ({type(e).__name__}: {e})"
    return None


_PROBES = {"cupy": _probe_cupy, "cuda": _probe_cuda}


def _unavailable_reason(name):
    probe = _PROBES.get(name)
    return probe() if probe else None


def available_backends():
    """Names of the backends usable on this machine (probes GPU backends; may import cupy/numba.cuda)."""
    return [n for n in KNOWN if _unavailable_reason(n) is None]


def _load(name):
    """Import and return the backend module ``name``, or raise a clear error."""
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, got {type(name).__name__}")
    name = name.strip().lower()
    if name == "auto":
        picked = next((c for c in ("cupy", "cuda") if _unavailable_reason(c) is None), "cpu")
        print(f"bptt: BPTT_BACKEND=auto picked '{picked}'", file=sys.stderr)
        return importlib.import_module(f"bptt_kernels.{picked}")
    if name not in KNOWN:
        raise ValueError(
            f"unknown backend {name!r}; known backends: {', '.join(KNOWN + ('auto',))}")
    reason = _unavailable_reason(name)
    if reason is not None:
        usable = [n for n in KNOWN if n not in _PROBES] + [
            n for n in _PROBES if n != name and _unavailable_reason(n) is None]
        raise BackendUnavailableError(
            f"backend {name!r} was asked for but is unusable here: {reason}. "
            f"Available backends: {', '.join(usable)}")
    return importlib.import_module(f"bptt_kernels.{name}")


def get_backend():
    """The backend module in use (chosen from ``BPTT_BACKEND`` on first call; default ``auto``)."""
    global _current
    if _current is None:
        _current = _load(os.environ.get("BPTT_BACKEND", "auto"))
    return _current


class use_backend:
    """Switch backend: ``use_backend("cpu")`` switches for good; ``with use_backend("cpu"):``
    switches for the block and restores the previous backend after it."""

    def __init__(self, name):
        global _current
        self._previous = _current
        _current = _load(name)
        self.backend = _current

    def __enter__(self):
        return self.backend

    def __exit__(self, *exc):
        global _current
        _current = self._previous
        return False

    def __repr__(self):
        return f"use_backend({self.backend.NAME!r})"
