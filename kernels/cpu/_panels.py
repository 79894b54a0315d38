"""The time loops' per-step products: each piece of a loop (its batch rows, or its hidden units'
columns) prepares its share of W_hh once per layer call (``step_weight``: MKL's packed form
where the provider has a packed GEMM, else contiguous panels for OpenBLAS, or the weight in
place for a piece of one batch row) and multiplies every step by it (``step_product``; with
variable lengths only the rows that run the step: ``active_product``). Built on the BLAS calls
of ``_blas.py``.
"""

from typing import NamedTuple

import numpy as np
from numba import njit

from ..host.rows import SMALL_GEMM_MNK
from ._blas import (_NO_TRANS, _TRANS, _address, _compute, _has_packed_gemm, _pack, _pack_size,
                    _row_stride, gemm_nn, gemm_nt, gemv_row)


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
