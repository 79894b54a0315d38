"""Intel MKL as the cpu backend's second BLAS provider (optional: ``pip install bptt[mkl]``).

``load()`` finds MKL's single dynamic library ``libmkl_rt`` (the ``mkl`` wheel puts it in the
environment's ``lib/``), loads it once per process and returns an :class:`Mkl`: the addresses
of the functions the kernels call (CBLAS ``sgemm``/``dgemm``/``sgemv``/``dgemv`` and the packed
GEMM API ``?gemm_pack_get_size``/``?gemm_pack``/``?gemm_compute``, by the names
``_blas.SLOTS`` uses), MKL's version and a per-thread thread-count setter. It raises
ImportError with the reason where MKL cannot be used; importing this module loads nothing.

The ILP64 entry points (``cblas_sgemm_64`` ...: 64-bit integers, as the kernels declare them)
are taken where the library has them; an older MKL without them gets the LP64 names, relying
on the x86-64 calling convention as ``_blas.py`` does for SciPy's 32-bit-integer OpenBLAS.

Threads: the backend splits every layer call over its own threads, so MKL must run on one
thread inside them. ``Mkl.set_threads_here(n)`` (``MKL_Set_Num_Threads_Local``: the calling
thread only) does that for each thread of a layer call (``_loop.layer_threads``), as the
backend does with OpenBLAS: MKL's process-wide settings (``MKL_NUM_THREADS``, its threading
layer) stay the user's. (Asking MKL for its sequential threading layer instead would change
what MKL reports to everyone else in the process, e.g. threadpoolctl, for good; per call on
one thread the two measured within noise on the 2-core development machine.)
"""

import ctypes
import glob
import importlib.metadata
import os
import sys
import threading
from typing import NamedTuple

# (our name, MKL's CBLAS name): the functions the kernels call through _blas's table
FUNCTIONS = (("sgemm", "cblas_sgemm"), ("dgemm", "cblas_dgemm"), ("sgemv", "cblas_sgemv"),
             ("dgemv", "cblas_dgemv"),
             ("spack_size", "cblas_sgemm_pack_get_size"), ("spack", "cblas_sgemm_pack"),
             ("scompute", "cblas_sgemm_compute"),
             ("dpack_size", "cblas_dgemm_pack_get_size"), ("dpack", "cblas_dgemm_pack"),
             ("dcompute", "cblas_dgemm_compute"))


class Mkl(NamedTuple):
    """A loaded libmkl_rt."""
    path: str
    version: str              # e.g. "oneMKL 2026.2"
    addresses: dict           # our name (FUNCTIONS) -> function address
    set_threads_here: object  # set_threads_here(n) -> this thread's previous setting (0: none)


def _candidates():
    """Paths of libmkl_rt to try, best first: the ``mkl`` distribution's own file, then the
    environment's lib/, then the dynamic loader's search path."""
    found = []
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    found += sorted(str(f.locate()) for f in files if f.name.startswith("libmkl_rt.so"))
    found += sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")), reverse=True)
    found += ["libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"]
    return list(dict.fromkeys(found))


def _function(lib, name):
    """The ILP64 entry point ``name_64`` where the library has it, else ``name``."""
    for symbol in (name + "_64", name):
        if hasattr(lib, symbol):
            return getattr(lib, symbol)
    raise AttributeError(f"{name} not found")


def _open():
    tried = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
            addresses = {ours: ctypes.cast(_function(lib, theirs), ctypes.c_void_p).value
                         for ours, theirs in FUNCTIONS}
            set_local, version_string = lib.MKL_Set_Num_Threads_Local, lib.MKL_Get_Version_String
        except (OSError, AttributeError) as e:
            tried.append(f"{path}: {e}")
            continue
        set_local.argtypes, set_local.restype = [ctypes.c_int], ctypes.c_int
        buf = ctypes.create_string_buffer(256)
        version_string.argtypes, version_string.restype = [ctypes.c_char_p, ctypes.c_int], None
        version_string(buf, len(buf))
        words = buf.value.decode(errors="replace").split()
        version = next((w.split("-")[0] for w in words if w[:1].isdigit()), "?")
        return Mkl(path, f"oneMKL {version}", addresses, lambda n: int(set_local(int(n))))
    raise ImportError("Intel MKL (libmkl_rt) is not usable here; install it with "
                      "pip install 'bptt[mkl]'. Tried: " + "; ".join(tried))


_lock = threading.Lock()
_loaded = None       # the Mkl, or the ImportError of the one try


def load():
    """The process's libmkl_rt (loaded on the first call); ImportError where it is unusable."""
    global _loaded
    with _lock:
        if _loaded is None:
            try:
                _loaded = _open()
            except ImportError as e:
                _loaded = e
    if isinstance(_loaded, ImportError):
        raise ImportError(str(_loaded))
    return _loaded


def loaded():
    """The Mkl if ``load()`` has succeeded in this process, else None (loads nothing)."""
    return _loaded if isinstance(_loaded, Mkl) else None
