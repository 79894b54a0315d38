"""Run the CuPy backend's CUDA kernels on the CPU: the evidence available without a GPU.

The kernel sources (recurrent.cu, ops.cu) are compiled by a host C++ compiler with
``-DBPTT_HOST_HARNESS`` (one translation unit of both): each ``__global__`` kernel becomes a plain function
of the same name and arguments whose body is the very same template code. Grid-stride kernels
run as one host thread owning every item; block kernels (persistent recurrences, softmax, sum
of squares) run their blockDim threads as coroutines switched at every ``__syncthreads``, with
shared memory poisoned with NaN (see common.cu); cooperative kernels run the threads of all
their blocks as one set of coroutines, block by block from grid barrier to grid barrier.
:func:`host_engine` wires that library into the backend's own orchestration
(:class:`bptt_kernels.cupy._engine.Engine`) with NumPy as the array module, so everything
above the kernels (path choice, GEMM placement, caches, t_start, dh, weight-gradient GEMMs,
argument order) runs exactly as on the GPU. What this cannot check:
races between threads of one barrier interval that the two schedules below do not expose,
warp-level behaviour, NVRTC-specific compilation and device libm accuracy; perf/gpu_check.py
covers those on a GPU.

``reverse=True`` runs the threads of a block in reverse order between barriers (and walks
grid-stride items backwards), so a thread that reads another thread's output of the same
barrier interval disagrees between the two orders.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import types

import numpy as np

from bptt_kernels import CELLS
from bptt_kernels.reference import linear_backward, linear_forward

from . import config
from ._compile import SOURCE_DIR, SOURCES, kernel_signatures
from ._engine import DTYPES, Engine
from ._graphs import HostReplay

# the host build: every kernel source in one translation unit (common.cu is included once)
HARNESS_TEXT = "".join(f'#include "{name}"\n' for name in SOURCES)
HARNESS_SOURCES = ("common.cu",) + SOURCES
# H100 SXM figures, so that path choices match the GPU: opt-in shared memory per block, SMs
H100_LIMITS = (232448, 132)


def find_compiler():
    """Path of a host C++ compiler ($CXX, g++, c++, clang++), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build_library(build_dir=None, compiler=None):
    """Compile the host harness into a shared library (cached by source hash); return its path."""
    compiler = compiler or find_compiler()
    if compiler is None:
        raise RuntimeError("no host C++ compiler found (set CXX, or install g++)")
    flags = ["-x", "c++", "-std=c++17", "-O2", "-fno-fast-math", "-ffp-contract=off",
             "-DBPTT_HOST_HARNESS", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror"]
    digest = hashlib.sha256("\0".join([compiler, HARNESS_TEXT] + flags).encode())
    for name in HARNESS_SOURCES:
        with open(os.path.join(SOURCE_DIR, name), "rb") as f:
            digest.update(f.read())
    build_dir = build_dir or os.path.join(tempfile.gettempdir(), "bptt_cupy_host")
    os.makedirs(build_dir, exist_ok=True)
    lib = os.path.join(build_dir, f"bptt_cupy_host_{digest.hexdigest()[:16]}.so")
    if not os.path.exists(lib):
        tmp = f"{lib}.{os.getpid()}.tmp"
        cmd = [compiler] + flags + ["-I", SOURCE_DIR, "-", "-o", tmp]
        proc = subprocess.run(cmd, input=HARNESS_TEXT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"host harness build failed: {' '.join(cmd)}\n{proc.stderr}")
        os.replace(tmp, lib)  # atomic: concurrent builders do not see a half-written file
    return lib


# C parameter type -> (ctypes type of a scalar | NumPy dtype of an array)
_SCALARS = {"int": (np.int32, ctypes.c_int), "long long": (np.int64, ctypes.c_longlong),
            "float": (np.float32, ctypes.c_float), "double": (np.float64, ctypes.c_double)}
_POINTERS = {"float*": np.float32, "double*": np.float64, "int*": np.int32,
             "long long*": np.int64, "unsigned int*": np.uint32}


class HostLauncher:
    """Calls the host build of kernel ``name`` with the arguments the GPU launch would get.

    Every argument is checked against the kernel's C signature (read from the source by
    :func:`bptt_kernels.cupy._compile.kernel_signatures`): the count, each scalar's exact
    NumPy type (np.int32 for int, ...) and each array's dtype and C-contiguity, so that a
    plumbing mistake fails here rather than as garbage on a GPU.
    """

    def __init__(self, library_path, reverse=False):
        self.lib = ctypes.CDLL(library_path)
        self.lib.bptt_host_config.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                              ctypes.c_longlong]
        self.reverse = reverse
        self.calls = []  # (name, grid, block, shared_mem) of every launch, for tests

    def __call__(self, name, grid, block, args, shared_mem=0):
        signature = kernel_signatures().get(name)
        if signature is None:
            raise KeyError(f"no kernel named {name!r} in the CuPy backend's sources")
        if len(args) != len(signature):
            raise TypeError(f"{name} takes {len(signature)} arguments {signature}, got {len(args)}")
        c_args = []
        for k, (ctype, a) in enumerate(zip(signature, args)):
            if ctype in _POINTERS:
                if not isinstance(a, np.ndarray) or a.dtype != _POINTERS[ctype]:
                    raise TypeError(f"{name} argument {k} ({ctype}): expected an array of "
                                    f"{np.dtype(_POINTERS[ctype]).name}, got {type(a).__name__} "
                                    f"{getattr(a, 'dtype', '')}")
                if not a.flags.c_contiguous:
                    raise ValueError(f"{name} argument {k}: array is not C-contiguous")
                c_args.append(ctypes.c_void_p(a.ctypes.data))
            else:
                np_type, c_type = _SCALARS[ctype]
                if type(a) is not np_type:
                    raise TypeError(f"{name} argument {k} ({ctype}): expected "
                                    f"{np_type.__name__}, got {type(a).__name__}")
                c_args.append(c_type(a))
        if grid < 1 or block < 1:
            raise ValueError(f"{name}: launch with grid={grid}, block={block}")
        self.calls.append((name, grid, block, shared_mem))
        self.lib.bptt_host_config(int(grid), int(block), int(self.reverse), int(shared_mem))
        getattr(self.lib, name)(*c_args)
        if self.lib.bptt_host_error():
            raise RuntimeError(f"{name}: the threads of a block reached different barriers")


def host_engine(reverse=False, limits=H100_LIMITS, build_dir=None):
    """An :class:`Engine` over NumPy whose kernels are the host build of the CUDA sources."""
    launcher = HostLauncher(build_library(build_dir), reverse=reverse)
    return Engine(np, launcher, lambda: limits, lambda a: np.array(a, copy=True),
                  capture=HostReplay)


def host_backend(reverse=False, limits=H100_LIMITS, build_dir=None):
    """A module-like object with the whole backend interface (NAME "cupy-host", xp numpy) over
    :func:`host_engine`: the CuPy backend's code paths, usable by bptt's layers and trainer on
    a machine without a GPU (slow; for tests)."""
    eng = host_engine(reverse=reverse, limits=limits, build_dir=build_dir)
    ns = types.SimpleNamespace(NAME="cupy-host", xp=np, DTYPES=DTYPES, TIME_BLOCKS=False, config=config,
                               engine=eng)
    for name in ("asarray", "to_host", "zeros", "choose_path", "softmax_cross_entropy",
                 "embedding_forward", "embedding_backward", "sgd_step", "adam_step",
                 "sum_of_squares", "scale_"):
        setattr(ns, name, getattr(eng, name))
    ns.linear_forward, ns.linear_backward = linear_forward, linear_backward   # as the GPU module
    for cell in CELLS:
        setattr(ns, f"{cell}_forward", functools.partial(eng.recurrent_forward, cell))
        setattr(ns, f"{cell}_backward", functools.partial(eng.recurrent_backward, cell))
    return ns
