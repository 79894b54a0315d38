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
packed-GEMM functions (OpenBLAS), the time loops use panels (below).

The three helpers below take 2-D array views whose rows are contiguous (last stride = item
size; the row stride may be larger, so column blocks of a wider array are fine) and call
GEMM with row-major leading dimensions:

* ``gemm_nt(a, b, c, beta)``  c[M,N] = a[M,K] @ b[N,K]^T + beta * c
* ``gemm_nn(a, b, c, beta)``  c[M,N] = a[M,K] @ b[K,N]   + beta * c
* ``gemm_tn(a, b, c, beta)``  c[M,N] = a[K,M]^T @ b[K,N] + beta * c

A time loop's per-step products go through ``step_weight``/``step_product`` (below): once
per layer call each piece of the loop (its batch rows, or its hidden units' columns) packs
its share of the weight (MKL's packed form, or contiguous panels for OpenBLAS) and then runs
one GEMM per packed segment (MKL) or small sgemm per panel (OpenBLAS) and step; a piece of
one batch row calls sgemv on the weight in place instead.

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


# Panels. A piece of a time loop multiplies every step by its share of W_hh^T: the columns of
# its units (split by units) or all of them (split by batch rows). Read in place, those columns
# are a poor stream (K rows, each a row stride after the last), so each piece copies its share
# once per layer call into panels, each a contiguous [K, width] block, and runs one
# small-matrix sgemm per panel and step. A piece of ONE batch row multiplies by the weight in
# place with sgemv instead (no panels), except a piece split by units of the weight given
# transposed, whose columns are a strided block. OpenBLAS (0.3.17+, x86-64) runs a GEMM with
# M*N*K <= SMALL_GEMM_MNK through "small matrix" kernels that skip packing the operands (a
# larger one repacks b on every call, i.e. the constant weight every step), so panels are at
# most PANEL_MAX_WIDTH columns wide and, where a panel's whole K would pass that size, split
# into K-blocks accumulating into the same c. The measurements behind each of these:
# docs/performance.md, "Per-step GEMM panels".
SMALL_GEMM_MNK = _rows.SMALL_GEMM_MNK
PANEL_MAX_WIDTH = 64
MIN_KBLOCK = 32   # narrower K-blocks than this: panels 16 wide instead of 64
TILE = 32


@njit(cache=True)
def _transpose_into(a, out):
    """out[K,n] = a[n,K]^T, in TILE x TILE tiles (a plain column walk of a large a misses the
    cache on every element: NumPy's own transposed copy of a [4096,1024] float32 took 31 ms)."""
    n, K = a.shape
    for i0 in range(0, n, TILE):
        i1 = min(i0 + TILE, n)
        for k0 in range(0, K, TILE):
            k1 = min(k0 + TILE, K)
            for i in range(i0, i1):
                row = a[i]
                for k in range(k0, k1):
                    out[k, i] = row[k]


@njit(cache=True)
def pack_panels(w, transposed, segments, stride, s0, s1, width):
    """The columns g*stride + s0 : g*stride + s1 (g < segments) of w^T, cut into panels of at
    most ``width`` columns, each stored as one contiguous [K, cols] block, one after another
    -> [K * segments * (s1 - s0)]. w: [N,K], or with ``transposed`` w^T itself [K,N]."""
    K = w.shape[0] if transposed else w.shape[1]
    panels = np.empty(K * segments * (s1 - s0), w.dtype)
    at = 0
    for g in range(segments):
        end = g * stride + s1
        for p0 in range(g * stride + s0, end, width):
            cols = min(width, end - p0)
            panel = panels[at:at + K * cols].reshape((K, cols))
            if transposed:               # element loops: Numba's panel[:] = w[:, ..] checks for
                for k in range(K):       # overlap first (H=256/512/1024: 0.11/0.46/3.1 -> 0.04/0.13/1.6 ms)
                    src, dst = w[k], panel[k]
                    for c in range(cols):
                        dst[c] = src[p0 + c]
            else:
                _transpose_into(w[p0:p0 + cols], panel)
            at += K * cols
    return panels


@njit(cache=True)
def panel_product(a, panels, c, beta, segments, stride, s0, s1, width, kblock):
    """c[:, g*stride + s0 : g*stride + s1] = a[M,K] @ (those columns of w^T) + beta * c, for
    g < segments, one sgemm per panel of ``pack_panels(w, .., segments, stride, s0, s1,
    width)`` and K-block of ``kblock`` rows. a: [M,K]  c: [M,N]."""
    K = a.shape[1]
    at = 0
    for g in range(segments):
        end = g * stride + s1
        for p0 in range(g * stride + s0, end, width):
            cols = min(width, end - p0)
            panel, out = panels[at:at + K * cols].reshape((K, cols)), c[:, p0:p0 + cols]
            for k0 in range(0, K, kblock):
                k1 = min(k0 + kblock, K)
                gemm_nn(a[:, k0:k1], panel[k0:k1], out, beta if k0 == 0 else 1.0)
            at += K * cols


PACK_ALIGN = 64   # bytes: each packed segment starts on a cache line


@njit(cache=True)
def pack_segments(w, transposed, segments, stride, s0, s1, rows):
    """MKL's packed form (``?gemm_pack``) of the columns g*stride + s0 : g*stride + s1
    (g < segments) of w^T, each segment packed alone as the B operand of products with
    ``rows`` rows -> (uint8 buffer, bytes per segment). w: [N,K], or with ``transposed`` w^T
    itself [K,N]."""
    K = w.shape[0] if transposed else w.shape[1]
    n = s1 - s0
    size = (_pack_size(w, rows, n, K) + PACK_ALIGN - 1) // PACK_ALIGN * PACK_ALIGN
    buffer = np.empty(segments * size + PACK_ALIGN, np.uint8)
    base = -_address(buffer) % PACK_ALIGN
    packed = buffer[base:base + segments * size]
    for g in range(segments):
        n0 = g * stride + s0
        if transposed:                  # B = w[:, n0:n0+n], [K, n]
            _pack(_NO_TRANS, rows, n, K, w[:, n0:n0 + n], _row_stride(w), packed[g * size:])
        else:                           # B = w[n0:n0+n]^T
            _pack(_TRANS, rows, n, K, w[n0:n0 + n], _row_stride(w), packed[g * size:])
    return packed, size


@njit(cache=True)
def packed_product(a, packed, size, c, beta, segments, stride, s0, s1):
    """c[:, g*stride + s0 : g*stride + s1] = a[M,K] @ (those columns of w^T) + beta * c, for
    g < segments: one ``?gemm_compute`` per segment of ``pack_segments``. a: [M,K]  c: [M,N]."""
    M, K = a.shape
    n = s1 - s0
    for g in range(segments):
        n0 = g * stride + s0
        _compute(M, n, K, a, _row_stride(a), packed[g * size:], beta, c[:, n0:n0 + n],
                 _row_stride(c))


class StepWeight(NamedTuple):
    """One time-loop piece's recurrent weight (``step_weight``), for ``step_product``."""
    w: np.ndarray        # [N,K], or [K,N] when given transposed
    transposed: bool
    panels: np.ndarray   # the piece's columns of w^T in panels (pack_panels), or empty
    width: int           # panel width; 0: no panels
    kblock: int          # rows of a panel per sgemm (K-blocks under the small-matrix size)
    packed: np.ndarray   # uint8: the piece's columns of w^T in MKL's packed form, or empty
    packed_size: int     # bytes per segment in ``packed``
    segments: int        # the piece's columns: g*stride + s0 : g*stride + s1, g < segments
    stride: int          #   (by units: the gate blocks, H and the units j0:j1;
    s0: int              #    by batch rows: one segment, all N columns)
    s1: int
    b0: int              # the piece's batch rows
    b1: int


@njit(cache=True)
def step_weight(w, transposed, blocks, H, b0, b1, j0, j1, by_units):
    """What a time-loop piece (``_loop.split_ranges``: batch rows b0:b1, or with ``by_units``
    all rows and units j0:j1 of each of the ``blocks`` gate blocks) multiplies each of its
    steps by: its share of w^T in MKL's packed form where the provider has a packed GEMM, else
    packed in panels (see above); but w in place where the piece is one batch row (and not
    split by units of a transposed w). However few steps the call runs: the sgemm shapes, and
    so the rounding of a step's product, must not depend on the call's length (``bptt.memory``
    recomputes a window's pieces in shorter calls than one over the window).
    w: [blocks*H, K] for c = a @ w^T, or with ``transposed`` that w^T itself, [K, blocks*H]
    (the backward pass's W_hh)."""
    rows = b1 - b0
    N, K = (w.shape[1], w.shape[0]) if transposed else w.shape
    if by_units:
        segments, stride, s0, s1 = blocks, H, j0, j1
    else:
        segments, stride, s0, s1 = 1, N, 0, N
    no_panels, no_packed = np.empty(0, w.dtype), np.empty(0, np.uint8)
    if rows == 1 and not (by_units and transposed):
        return StepWeight(w, transposed, no_panels, 0, 0, no_packed, 0, segments, stride,
                          s0, s1, b0, b1)
    if _has_packed_gemm() and s1 > s0 and K > 0:
        packed, size = pack_segments(w, transposed, segments, stride, s0, s1, rows)
        return StepWeight(w, transposed, no_panels, 0, 0, packed, size, segments, stride,
                          s0, s1, b0, b1)
    width, kblock = _panel_shape(rows, K)
    if width == 0:
        width, kblock = max(s1 - s0, 1), max(K, 1)    # one ordinary sgemm per segment
    panels = pack_panels(w, transposed, segments, stride, s0, s1, width)
    return StepWeight(w, transposed, panels, width, kblock, no_packed, 0, segments, stride,
                      s0, s1, b0, b1)


@njit(cache=True)
def _panel_shape(rows, K):
    """(width, kblock) of the panels for ``rows`` rows against K: the widest panel up to
    PANEL_MAX_WIDTH, and K-blocks, with rows * width * kblock within the small-matrix size
    (kblock a multiple of 8, at most K); (0, 0) where that leaves under 16 rows per K-block."""
    for width in (PANEL_MAX_WIDTH, 16):
        kblock = min(K, SMALL_GEMM_MNK // max(rows * width, 1) // 8 * 8)
        if kblock >= min(K, MIN_KBLOCK if width > 16 else 16):
            return width, max(kblock, 1)
    return 0, 0


@njit(cache=True)
def step_product(a, sw, c, beta):
    """One time step's c = a @ w^T + beta * c for the piece of a time loop that ``sw``
    (``step_weight``) belongs to: its batch rows, or all rows and its units' columns. MKL's
    packed form: one ``?gemm_compute`` per segment; panels: their sgemm calls; w in place:
    one row by sgemv on w's rows (given transposed: on its columns), more rows by sgemm NT on
    w's rows or, given transposed, sgemm NN on its columns. a: [B,K]  c: [B,N]."""
    _piece_product(a[sw.b0:sw.b1], sw, c[sw.b0:sw.b1], beta)


@njit(cache=True)
def active_buffers(sw, steps, T):
    """Scratch for ``active_product`` of a time-loop piece (``step_weight``) whose batch rows
    run ``steps`` [B] steps each of T: (a_rows [rows, K], c_rows [rows, N]) where some of its
    rows stop before T and the piece is split by batch rows (its products cover whole rows);
    else two empty arrays (every step's product covers all of the piece's rows)."""
    N, K = (sw.w.shape[1], sw.w.shape[0]) if sw.transposed else sw.w.shape
    rows = sw.b1 - sw.b0
    if sw.segments != 1 or sw.s1 - sw.s0 != N or rows < 2 or steps[sw.b0:sw.b1].min() >= T:
        rows = 0
    return np.empty((rows, K), sw.w.dtype), np.empty((rows, N), sw.w.dtype)


@njit(cache=True)
def active_product(a, sw, c, beta, t, steps, buffers):
    """``step_product`` for the rows b of the piece that run step t (t < steps[b]) only: they
    are gathered into ``buffers`` (``active_buffers``), multiplied, and their rows of c
    scattered back; the other rows of c are left as they are. With empty buffers, or where
    every row runs step t, ``step_product`` itself (docs/performance.md, "Variable-length
    batches and bidirectional layers")."""
    a_rows, c_rows = buffers
    n = 0
    if a_rows.shape[0]:
        for b in range(sw.b0, sw.b1):
            if t < steps[b]:
                n += 1
    if n == sw.b1 - sw.b0 or a_rows.shape[0] == 0:
        step_product(a, sw, c, beta)
        return
    if n == 0:
        return
    i = 0
    for b in range(sw.b0, sw.b1):
        if t < steps[b]:
            _copy(a[b], a_rows[i])
            if beta != 0.0:
                _copy(c[b], c_rows[i])
            i += 1
    _piece_product(a_rows[:n], sw, c_rows[:n], beta)
    i = 0
    for b in range(sw.b0, sw.b1):
        if t < steps[b]:
            _copy(c_rows[i], c[b])
            i += 1


@njit(cache=True, inline="always")
def _copy(src, dst):
    """dst[:] = src[:] for two rows of one length (an element loop: Numba's slice assignment
    checks for overlap first)."""
    for j in range(src.size):
        dst[j] = src[j]


@njit(cache=True)
def _piece_product(a, sw, c, beta):
    """``step_product`` on a piece's rows: a [M,K], c [M,N] (M up to the piece's rows)."""
    if sw.packed.size:
        packed_product(a, sw.packed, sw.packed_size, c, beta, sw.segments, sw.stride, sw.s0,
                       sw.s1)
        return
    if sw.width:
        panel_product(a, sw.panels, c, beta, sw.segments, sw.stride, sw.s0, sw.s1, sw.width,
                      sw.kblock)
        return
    for g in range(sw.segments):
        n0, n1 = g * sw.stride + sw.s0, g * sw.stride + sw.s1
        if a.shape[0] == 1:
            gemv_row(a[0], sw.w[:, n0:n1] if sw.transposed else sw.w[n0:n1], c[0, n0:n1], beta,
                     sw.transposed)
        elif sw.transposed:
            gemm_nn(a, sw.w[:, n0:n1], c[:, n0:n1], beta)
        else:
            gemm_nt(a, sw.w[n0:n1], c[:, n0:n1], beta)
