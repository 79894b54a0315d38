"""BLAS GEMM callable from ``@njit`` code, for the CPU kernels, from one of two providers.

Numba's own ``np.dot`` inside ``@njit`` goes through scipy's bundled OpenBLAS and its
Fortran wrapper, slower than NumPy at the per-step shapes (docs/performance.md); calling
CBLAS directly runs at NumPy's speed. Two libraries can serve these calls ("providers"):

* ``openblas``: the CBLAS of the OpenBLAS that NumPy itself ships
  (``numpy.libs/libscipy_openblas64_*``: 64-bit integers), falling back to scipy's bundled
  OpenBLAS (32-bit integers). Always there; the default.
* ``mkl``: Intel MKL (``_mkl.py``, the optional extra ``bptt[mkl]``), with its packed GEMM
  API: a time loop packs its share of W_hh once per layer call into MKL's own GEMM layout
  (``?gemm_pack``) and multiplies every step against it (``?gemm_compute``), as PyTorch's
  oneDNN LSTM does with its weight.

Compiled code calls BLAS through a table of function addresses, ``SLOTS``, which LLVM knows
under the fixed symbol name ``bptt_blas_table``; each call loads the address from the table
(one load beside a GEMM), so ``cache=True`` works (a fresh process registers the table at
import and then loads the cached machine code) and the provider can change between layer
calls. The table points at OpenBLAS from import on; ``use_provider()`` (run by
``_loop.layer_threads`` at the start of each layer call that begins while no other runs)
points it at the provider that ``config.BLAS`` or ``BPTT_BLAS`` asks for. Where it holds no
packed-GEMM functions (OpenBLAS), the time loops use panels (``_panels.py``).

The GEMM helpers below take 2-D array views whose rows are contiguous (last stride = item
size; the row stride may be larger, so column blocks of a wider array are fine) and call
GEMM with row-major leading dimensions:

* ``gemm_nt(a, b, c, beta)``  c[M,N] = a[M,K] @ b[N,K]^T + beta * c
* ``gemm_nn(a, b, c, beta)``  c[M,N] = a[M,K] @ b[K,N]   + beta * c
* ``gemm_tn(a, b, c, beta)``  c[M,N] = a[K,M]^T @ b[K,N] + beta * c

``rows_product(a, b, c, b_transposed)`` is gemm_nt / gemm_nn with every row rounded as in a
product of many rows; ``gemv_row`` one row's product. The time loops' per-step products are
built on these in ``_panels.py``.

``blas_threads()`` / ``set_blas_threads(n)`` read and set OpenBLAS's thread count (through
``openblas_set_num_threads_local``, which returns the previous value), and
``set_mkl_threads_here(n)`` MKL's for the calling thread; ``_loop.py`` runs BLAS
single-threaded inside a layer call and splits the work over its own threads.
"""

import ctypes
import glob
import os
import sys
from typing import NamedTuple

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import _mkl, config
from ..host import rows as _rows

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_B_MATRIX, _PACKED = 162, 151     # MKL: CblasBMatrix (what ?gemm_pack packs), CblasPacked

PROVIDERS = ("auto", "openblas", "mkl")

# The table compiled code calls through (same order as _mkl.FUNCTIONS): CBLAS GEMM and GEMV,
# then MKL's packed GEMM (get_size, pack, compute) for float32 and float64; 0 where the
# provider has no such function.
SLOTS = tuple(ours for ours, _ in _mkl.FUNCTIONS)
_TABLE_SYMBOL = "bptt_blas_table"
_TABLE = (ctypes.c_void_p * len(SLOTS))()
llvm.add_symbol(_TABLE_SYMBOL, ctypes.addressof(_TABLE))


def _candidate_libraries():
    """(path, symbol suffix) to try, best first."""
    found = []
    for pkg, pattern, suffix in (("numpy", "libscipy_openblas64_*", "64_"),
                                 ("scipy", "libscipy_openblas-*", "")):
        try:
            mod = __import__(pkg)
        except ImportError:
            continue
        libdir = os.path.join(os.path.dirname(os.path.dirname(mod.__file__)), pkg + ".libs")
        for path in sorted(glob.glob(os.path.join(libdir, pattern + ".so*"))):
            found.append((path, suffix))
    return found


_OPENBLAS_FUNCTIONS = ("sgemm", "dgemm", "sgemv", "dgemv")


def _load_openblas():
    """(library, description, {slot: address}) of the first usable OpenBLAS: its CBLAS sgemm,
    dgemm, sgemv, dgemv."""
    tried = []
    for path, suffix in _candidate_libraries():
        names = [f"scipy_cblas_{f}{suffix}" for f in _OPENBLAS_FUNCTIONS]
        try:
            lib = ctypes.CDLL(path)
            addresses = [ctypes.cast(getattr(lib, n), ctypes.c_void_p).value for n in names]
        except (OSError, AttributeError) as e:
            tried.append(f"{path}: {e}")
            continue
        return (lib, f"{os.path.basename(path)} ({', '.join(names)})",
                dict(zip(_OPENBLAS_FUNCTIONS, addresses)))
    raise ImportError(
        "bptt_kernels.cpu needs the OpenBLAS bundled with NumPy (numpy.libs) or SciPy "
        "(scipy.libs), as installed from PyPI wheels; none was usable. Tried: "
        + ("; ".join(tried) or "no candidate library found"))


class Provider(NamedTuple):
    """A BLAS library the kernels can call."""
    name: str            # "openblas" or "mkl"
    library: str         # which file and version
    addresses: dict      # slot (SLOTS) -> function address; absent: the library lacks it


_LIB, BLAS_LIBRARY, _openblas_addresses = _load_openblas()
OPENBLAS = Provider("openblas", BLAS_LIBRARY.split(" (")[0], _openblas_addresses)


def _install(provider):
    """Point the table at ``provider``'s functions."""
    for i, slot in enumerate(SLOTS):
        _TABLE[i] = provider.addresses.get(slot)


_install(OPENBLAS)
_chosen = (None, OPENBLAS)   # (the setting it was chosen for, the provider in the table)


def cpu_vendor():
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...; "" where unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _mkl_provider():
    """MKL as a Provider (loads it; ImportError where it is unusable)."""
    mkl = _mkl.load()
    return Provider("mkl", f"{mkl.version} ({os.path.basename(mkl.path)})", mkl.addresses)


def _setting():
    """The provider asked for: config.BLAS, else BPTT_BLAS, else "auto"; ValueError if it is
    none of PROVIDERS."""
    where, value = (("config.BLAS", config.BLAS) if config.BLAS is not None
                    else ("BPTT_BLAS", os.environ.get("BPTT_BLAS", "")))
    name = str(value).strip().lower() or "auto"
    if name not in PROVIDERS:
        raise ValueError(f"{where} must be one of {', '.join(PROVIDERS)}; got {value!r}")
    return name


def _choose(setting):
    """(Provider, why) for a setting of PROVIDERS. ``auto``: MKL where it is installed and the
    CPU is Intel's; OpenBLAS elsewhere: on the AMD EPYC development machine OpenBLAS's per-step
    panels ran 110-115 GFLOP/s on one core against MKL's packed GEMM's 59-93
    (docs/performance.md, "BLAS providers")."""
    if setting == "openblas":
        return OPENBLAS, "asked for"
    if setting == "mkl":
        try:
            return _mkl_provider(), "asked for"
        except ImportError as e:
            raise RuntimeError(f"BPTT_BLAS=mkl: {e}") from None
    vendor = cpu_vendor()
    if vendor != "GenuineIntel":
        return OPENBLAS, f"{vendor or 'unknown'} CPU"
    try:
        return _mkl_provider(), f"{vendor} CPU"
    except ImportError:
        return OPENBLAS, f"{vendor} CPU without MKL; pip install 'bptt[mkl]' adds it"


def use_provider():
    """Point the table at the provider the setting asks for (``config.BLAS``, else
    ``BPTT_BLAS``, else auto) and return it; ``auto`` says on stderr what it picked, once per
    choice. Cheap once chosen. Not while a kernel runs: ``_loop.layer_threads`` calls it
    at the start of a layer call that begins while no other is running."""
    global _chosen
    setting = _setting()
    if setting != _chosen[0]:
        provider, why = _choose(setting)
        if setting == "auto":
            print(f"bptt: BPTT_BLAS=auto picked '{provider.name}' ({why}: {provider.library})",
                  file=sys.stderr)
        _install(provider)
        _chosen = (setting, provider)
    return _chosen[1]


def provider():
    """The provider the table points at now (without reading the setting)."""
    return _chosen[1]


_GET_THREADS = next((getattr(_LIB, n) for n in ("scipy_openblas_get_num_threads64_",
                                               "scipy_openblas_get_num_threads",
                                               "openblas_get_num_threads") if hasattr(_LIB, n)), None)
_SET_THREADS = getattr(_LIB, "openblas_set_num_threads_local", None)  # OpenBLAS >= 0.3.27
for _f in (_GET_THREADS, _SET_THREADS):
    if _f is not None:
        _f.restype = ctypes.c_int
if _SET_THREADS is not None:
    _SET_THREADS.argtypes = [ctypes.c_int]


def blas_threads():
    """How many threads OpenBLAS uses for a large GEMM (OPENBLAS_NUM_THREADS, threadpoolctl...)."""
    return max(int(_GET_THREADS()), 1) if _GET_THREADS is not None else 1


def set_blas_threads(n):
    """Set OpenBLAS's thread count; return the previous one (no-op returning n if unsupported)."""
    return int(_SET_THREADS(int(n))) if _SET_THREADS is not None else n


def set_mkl_threads_here(n):
    """Set MKL's thread count for the calling thread where MKL is loaded; return the previous
    one (0: MKL's process-wide setting; also where MKL is not loaded: nothing to set)."""
    mkl = _mkl.loaded()
    return mkl.set_threads_here(n) if mkl is not None else 0


# The table's functions as Numba sees them. Integer arguments are declared 64-bit. For the
# 32-bit-integer libraries (SciPy's OpenBLAS, an MKL without ILP64 names) this relies on the
# x86-64 / AArch64 Linux calling conventions (integer arguments in 64-bit registers or 8-byte
# stack slots, read as their low 32 bits), which is where those wheels exist.
_i64, _ptr = types.int64, types.voidptr


def _gemm_signature(f):
    return types.void(_i64, _i64, _i64, _i64, _i64, _i64, f, _ptr, _i64, _ptr, _i64, f, _ptr, _i64)


def _gemv_signature(f):
    return types.void(_i64, _i64, _i64, _i64, f, _ptr, _i64, _ptr, _i64, f, _ptr, _i64)


def _pack_signature(f):
    return types.void(_i64, _i64, _i64, _i64, _i64, _i64, f, _ptr, _i64, _ptr)


def _compute_signature(f):
    return types.void(_i64, _i64, _i64, _i64, _i64, _i64, _ptr, _i64, _ptr, _i64, f, _ptr, _i64)


_SIGNATURES = {"gemm": _gemm_signature, "gemv": _gemv_signature,
               "pack_size": lambda f: _i64(_i64, _i64, _i64, _i64), "pack": _pack_signature,
               "compute": _compute_signature}


def _table_entry(builder, slot):
    """LLVM: load the table's entry ``slot`` (i8*)."""
    module = builder.module
    table = module.globals.get(_TABLE_SYMBOL)
    if table is None:
        table = ir.GlobalVariable(module, ir.ArrayType(cgutils.voidptr_t, len(SLOTS)),
                                  _TABLE_SYMBOL)
    return builder.load(builder.gep(table, [cgutils.int32_t(0), cgutils.int32_t(slot)]))


def _no_pointer(obj):
    raise TypeError("table functions are loaded at run time")


def _table_function(slot, signature):
    """An intrinsic returning the table's function ``slot`` (loaded at the call), to be called
    with ``signature``."""
    fntype = types.ExternalFunctionPointer(signature, get_pointer=_no_pointer)

    @intrinsic
    def load(typingctx):
        def codegen(context, builder, sig, args):
            entry = _table_entry(builder, SLOTS.index(slot))
            return builder.bitcast(entry, context.get_value_type(fntype))
        return fntype(), codegen
    return load


# kind (_SIGNATURES) -> dtype -> (intrinsic loading the table's function, scalar cast); the
# slot of a kind is its name after "s" (float32) or "d" (float64)
_FUNCTIONS = {kind: {dtype: (_table_function(prefix + kind, signature(dtype)), cast)
                     for prefix, dtype, cast in (("s", types.float32, np.float32),
                                                 ("d", types.float64, np.float64))}
              for kind, signature in _SIGNATURES.items()}


@intrinsic
def _has_packed_gemm(typingctx):
    """Whether the table holds a packed GEMM (MKL), as a bool, read at run time."""
    def codegen(context, builder, sig, args):
        entry = _table_entry(builder, SLOTS.index("spack"))
        return builder.icmp_unsigned("!=", entry, cgutils.voidptr_t(None))
    return types.boolean(), codegen


@intrinsic
def _data_ptr(typingctx, arr):
    """The address of arr's first element, as void*."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.bitcast(ary.data, cgutils.voidptr_t)
    return types.voidptr(arr), codegen


@intrinsic
def _address(typingctx, arr):
    """The address of arr's first element, as an integer."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.ptrtoint(ary.data, cgutils.intp_t)
    return types.intp(arr), codegen


def _typed_function(kind, *operands):
    """(intrinsic loading the table function, scalar cast) of ``kind`` ("gemm", "gemv",
    "pack_size", "pack", "compute") for the operands' common dtype, at typing time."""
    dtype = operands[0].dtype
    if any(o.dtype != dtype for o in operands):
        raise TypeError(f"{kind} operands must share one dtype")
    if dtype not in _FUNCTIONS[kind]:
        raise TypeError(f"{kind} supports float32 and float64, not {dtype}")
    return _FUNCTIONS[kind][dtype]


def _gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Row-major CBLAS GEMM on the data of arrays a, b, c (dtype picks s/d)."""
    raise NotImplementedError("only callable from @njit code")


@overload(_gemm, jit_options={"cache": True})
def _gemm_impl(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    load, cast = _typed_function("gemm", a, b, c)

    def impl(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        fn = load()
        fn(_ROW_MAJOR, trans_a, trans_b, m, n, k, cast(alpha), _data_ptr(a), lda,
           _data_ptr(b), ldb, cast(beta), _data_ptr(c), ldc)
    return impl


def _gemv(trans, m, n, a, lda, x, beta, y):
    """Row-major CBLAS y = op(a) @ x + beta * y on the data of a, x, y (dtype picks s/d)."""
    raise NotImplementedError("only callable from @njit code")


@overload(_gemv, jit_options={"cache": True})
def _gemv_impl(trans, m, n, a, lda, x, beta, y):
    load, cast = _typed_function("gemv", a, x, y)

    def impl(trans, m, n, a, lda, x, beta, y):
        fn = load()
        fn(_ROW_MAJOR, trans, m, n, cast(1.0), _data_ptr(a), lda, _data_ptr(x), 1, cast(beta),
           _data_ptr(y), 1)
    return impl


def _pack_size(w, m, n, k):
    """Bytes of MKL's packed form of a [k, n] B operand for products with m rows (w: any
    array of the dtype)."""
    raise NotImplementedError("only callable from @njit code")


@overload(_pack_size, jit_options={"cache": True})
def _pack_size_impl(w, m, n, k):
    load, _ = _typed_function("pack_size", w)

    def impl(w, m, n, k):
        fn = load()
        return fn(_B_MATRIX, m, n, k)
    return impl


def _pack(trans, m, n, k, src, ld, dest):
    """MKL: pack op(src) [k, n] (src itself, or with ``trans`` src^T of src [n, k]; rows ``ld``
    elements apart) as the B operand of products with m rows into the bytes of ``dest``."""
    raise NotImplementedError("only callable from @njit code")


@overload(_pack, jit_options={"cache": True})
def _pack_impl(trans, m, n, k, src, ld, dest):
    load, cast = _typed_function("pack", src)

    def impl(trans, m, n, k, src, ld, dest):
        fn = load()
        fn(_ROW_MAJOR, _B_MATRIX, trans, m, n, k, cast(1.0), _data_ptr(src), ld, _data_ptr(dest))
    return impl


def _compute(m, n, k, a, lda, packed, beta, c, ldc):
    """MKL: c[m, n] = a[m, k] @ (the B operand packed in ``packed``) + beta * c."""
    raise NotImplementedError("only callable from @njit code")


@overload(_compute, jit_options={"cache": True})
def _compute_impl(m, n, k, a, lda, packed, beta, c, ldc):
    load, cast = _typed_function("compute", a, c)

    def impl(m, n, k, a, lda, packed, beta, c, ldc):
        fn = load()
        fn(_ROW_MAJOR, _NO_TRANS, _PACKED, m, n, k, _data_ptr(a), lda, _data_ptr(packed), n,
           cast(beta), _data_ptr(c), ldc)
    return impl


@njit(cache=True)
def _row_stride(a):
    """Leading dimension (in elements) of a 2-D view with contiguous rows."""
    item = a.itemsize
    if a.shape[1] > 1 and a.strides[1] != item:
        raise ValueError("gemm operand rows must be contiguous")
    return max(a.strides[0] // item, a.shape[1], 1)


@njit(cache=True)
def gemm_nt(a, b, c, beta):
    """c[M,N] = a[M,K] @ b[N,K]^T + beta * c."""
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k or c.shape[0] != m or c.shape[1] != n:
        raise ValueError("gemm_nt: shape mismatch")
    if m == 0 or n == 0:
        return
    _gemm(_NO_TRANS, _TRANS, m, n, k, 1.0, a, _row_stride(a), b, _row_stride(b),
          beta, c, _row_stride(c))


@njit(cache=True)
def gemm_nn(a, b, c, beta):
    """c[M,N] = a[M,K] @ b[K,N] + beta * c."""
    m, k = a.shape
    n = b.shape[1]
    if b.shape[0] != k or c.shape[0] != m or c.shape[1] != n:
        raise ValueError("gemm_nn: shape mismatch")
    if m == 0 or n == 0:
        return
    _gemm(_NO_TRANS, _NO_TRANS, m, n, k, 1.0, a, _row_stride(a), b, _row_stride(b),
          beta, c, _row_stride(c))


@njit(cache=True)
def gemm_tn(a, b, c, beta):
    """c[M,N] = a[K,M]^T @ b[K,N] + beta * c."""
    k, m = a.shape
    n = b.shape[1]
    if b.shape[0] != k or c.shape[0] != m or c.shape[1] != n:
        raise ValueError("gemm_tn: shape mismatch")
    if m == 0 or n == 0:
        return
    _gemm(_TRANS, _NO_TRANS, m, n, k, 1.0, a, _row_stride(a), b, _row_stride(b),
          beta, c, _row_stride(c))


_padded_rows = njit(cache=True)(_rows.padded_rows)


@njit(cache=True)
def rows_product(a, b, c, b_transposed):
    """c[M,N] = a[M,K] @ b^T for b [N,K] (``b_transposed``: ``gemm_nt``), else a @ b for b
    [K,N] (``gemm_nn``), every row of c rounded as in a product of many rows: a call small
    enough for OpenBLAS's small-matrix kernels (which sum in another order) runs with a padded
    past that size in zero rows (``bptt_kernels.host.rows``). So a row's value never depends
    on how many rows share the call (a window's input projection made whole, in thread pieces,
    or leaf by leaf in ``bptt.memory``)."""
    m, k = a.shape
    n = b.shape[0] if b_transposed else b.shape[1]
    rows = _padded_rows(m, n, k)
    if rows == m:
        _product(a, b, c, b_transposed)
        return
    padded = np.zeros((rows, k), a.dtype)
    padded[:m] = a
    out = np.empty((rows, n), c.dtype)
    _product(padded, b, out, b_transposed)
    c[:] = out[:m]


@njit(cache=True)
def _product(a, b, c, b_transposed):
    if b_transposed:
        gemm_nt(a, b, c, 0.0)
    else:
        gemm_nn(a, b, c, 0.0)


@njit(cache=True)
def gemv_row(a, w, c, beta, transposed):
    """c[N] = a[K] @ w^T + beta * c for w [N,K], or with ``transposed`` a[K] @ w for w [K,N]:
    one row's product against the weight in place (rows contiguous, any row stride). With
    beta 0, c is zeroed first rather than trusting BLAS not to read it (NaN * 0)."""
    if beta == 0.0:
        c[:] = 0
    trans = _TRANS if transposed else _NO_TRANS
    _gemv(trans, w.shape[0], w.shape[1], w, _row_stride(w), a, 1.0 if beta == 0.0 else beta, c)
