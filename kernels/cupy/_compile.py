"""Kernel sources of the CuPy backend and their lazy compilation.

Nothing here compiles or touches a GPU at import time: :class:`CupyLauncher` builds a
``cupy.RawModule`` the first time one of its kernels is launched (CuPy then caches the binary
on disk). ``KERNELS`` lists every kernel name the Python side launches, with its source file;
tests/test_ptx_cupy.py checks each one against the PTX that nvcc makes of that file.
"""

import os
import re

import numpy as np

from bptt_kernels import CELLS

SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))
SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}

_CELL_KERNELS = ("forward_step", "backward_step", "forward_persistent", "backward_persistent",
                 "forward_cooperative", "backward_cooperative")
_OPS_KERNELS = ("softmax_xent", "embedding_forward", "embedding_backward", "sgd_step",
                "adam_step", "sum_squares", "scale")

# kernel name -> source file; kernel name -> compile unit ("<cell>_<sfx>" or "<sfx>")
KERNELS = {}
UNITS = {}
for _sfx in SUFFIX.values():
    for _cell in CELLS:
        for _k in _CELL_KERNELS:
            KERNELS[f"{_cell}_{_k}_{_sfx}"] = "recurrent.cu"
            UNITS[f"{_cell}_{_k}_{_sfx}"] = f"{_cell}_{_sfx}"
    for _k in _OPS_KERNELS:
        KERNELS[f"{_k}_{_sfx}"] = "ops.cu"
        UNITS[f"{_k}_{_sfx}"] = _sfx

SOURCES = ("recurrent.cu", "ops.cu")  # the files holding kernels; common.cu is their header
COMPILE_OPTIONS = ("-std=c++17",)
# what cupy.RawModule adds to every compile on its own (float32 denormals flushed to zero);
# the offline checks compile with it too, so they see the code the GPU will run
CUPY_ADDED_OPTIONS = ("-ftz=true",)
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def kernel_name(base, dtype):
    """Name of the kernel ``base`` for ``dtype``: ``kernel_name("scale", float32) == "scale_f32"``."""
    return f"{base}_{SUFFIX[np.dtype(dtype)]}"


def unit_options(unit):
    """NVRTC options that build only the kernels of compile unit ``unit`` from its source."""
    return COMPILE_OPTIONS + ("-DBPTT_SELECT", f"-DBPTT_SELECT_{unit}")


def load_source(filename, _seen=None):
    """Text of ``filename`` with its local ``#include "x.cu"`` lines replaced by the files' text
    (each once), so the source handed to NVRTC is self-contained."""
    seen = set() if _seen is None else _seen
    with open(os.path.join(SOURCE_DIR, filename), encoding="utf-8") as f:
        text = f.read()

    def inline(m):
        name = m.group(1)
        if name in seen:
            return ""
        seen.add(name)
        return load_source(name, seen)

    return _INCLUDE.sub(inline, text)


class CupyLauncher:
    """Launches kernels by name on the current CuPy stream, compiling on first use only the
    compile unit (one cell and dtype of recurrent.cu, one dtype of ops.cu) a kernel is in.

    ``launcher(name, grid, block, args, shared_mem=0)``: ``args`` are CuPy arrays and NumPy
    scalars typed exactly as the kernel's C parameters (np.int32 for int, np.int64 for
    long long, the array dtype for Real).
    """

    def __init__(self):
        self._modules = {}   # compile unit -> cupy.RawModule
        self._kernels = {}   # kernel name -> cupy.RawKernel

    def _kernel(self, name):
        kernel = self._kernels.get(name)
        if kernel is None:
            import cupy

            unit = UNITS[name]
            module = self._modules.get(unit)
            if module is None:
                module = cupy.RawModule(code=load_source(KERNELS[name]), options=unit_options(unit))
                self._modules[unit] = module
            kernel = self._kernels[name] = module.get_function(name)
        return kernel

    def __call__(self, name, grid, block, args, shared_mem=0):
        kernel = self._kernel(name)
        if shared_mem > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < shared_mem:
            kernel.max_dynamic_shared_size_bytes = shared_mem  # opt in beyond 48 KiB
        kernel((int(grid),), (int(block),), tuple(args), shared_mem=int(shared_mem))


def cupy_device_limits():
    """(opt-in shared memory bytes per block, number of SMs) of the current CuPy device."""
    import cupy

    attrs = cupy.cuda.Device().attributes
    return attrs["MaxSharedMemoryPerBlockOptin"], attrs["MultiProcessorCount"]


_KERNEL_DECL = re.compile(r"BPTT_KERNEL\(([\w#]+),\s*\d+\)\(([^)]*)\)")
_MACRO_INSTANCE = re.compile(r"^BPTT_\w+_KERNELS\(([^)]*)\)\s*$", re.M)
_signatures = None


def kernel_signatures():
    """{kernel name: tuple of its C parameter types}, read from the sources, e.g.
    ``"scale_f32": ("long long", "float*", "float")`` (``const`` dropped, Real resolved).

    Lets the host launcher check every launch's arguments (count, scalar widths, array
    dtypes) against the kernel it calls, and the PTX test check the parameter counts."""
    global _signatures
    if _signatures is None:
        sigs = {}
        for source in SOURCES:
            text = load_source(source).replace("\\\n", " ")
            decls = [(name, [" ".join(p.replace("const", " ").split()[:-1])
                             for p in params.split(",")])
                     for name, params in _KERNEL_DECL.findall(text)]
            for inst in _MACRO_INSTANCE.findall(text):  # e.g. "lstm, bptt::Lstm<float>, f32, float"
                args = [a.strip() for a in inst.split(",")]
                cell, sfx, real = (args[0] if len(args) == 4 else None), args[-2], args[-1]
                for template, types in decls:
                    if ("NAME##" in template) != (cell is not None):
                        continue
                    name = template.replace("NAME##", cell or "").replace("##SFX", sfx)
                    sigs[name] = tuple(t.replace("Real", real) for t in types)
        _signatures = sigs
    return _signatures
