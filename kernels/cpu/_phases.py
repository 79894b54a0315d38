"""The large GEMMs around the time loops (Haste style), threaded: the input projection of all
T steps before the forward loop, and after the backward loop the parameter gradients and dx
over the rows of the steps t >= t_start, one time block of ``bptt_kernels.host.blocks`` after
the other (this backend's own version of
``bptt_kernels.host.finish_backward``, split over threads and beside the time loop). Each takes (part, parts) to run in pieces on threads; where
the loop itself runs on one thread, they run beside it in pieces of time steps instead
(``forward_phases``, ``backward_phases``).
"""

from typing import NamedTuple

import numpy as np

from . import _buffers
from ._barrier import publish, wait_for
from ._blas import gemm_tn, rows_product
from ._loop import (NO_FLAGS, NO_PROGRESS, THREAD_STEPS, new_progress, overlaps_phases,
                    part_range, phase_parts, run_overlapped, run_parts, run_time_loop)
from ._math import jit
from ..host.blocks import time_blocks

# Where the GEMM phases run beside a time loop on one thread (``forward_phases``,
# ``backward_phases``): time steps in the first piece of the input projection; and the share
# of the steps whose dx the loop's thread computes after the loop, while the worker still
# finishes weight gradients (values as measured: docs/performance.md, "GEMM phases beside a
# one-thread loop"). The backward's GEMMs run in the time blocks of
# ``bptt_kernels.host.blocks`` (``time_blocks``), one block after the other from the top.
PROJECT_FIRST_STEPS = 10
DX_HERE_SHARE = 0.8


@jit
def add_column_sums(a, c0, c1, out):
    """out[c1 - c0] += sum over rows of a[M, c0:c1]. (The columns are cut from each row of a
    row-contiguous a, so the inner loop runs over a contiguous view and vectorises; a strided
    a[:, c0:c1] would not.)"""
    for m in range(a.shape[0]):
        row = a[m][c0:c1]
        for n in range(c1 - c0):
            out[n] += row[n]


@jit(inline="always")
def zero_units(a, blocks, H, j0, j1):
    """a[g*H + j0 : g*H + j1] = 0 for each of the ``blocks`` blocks of the row a [blocks*H]: a
    padded step's row (``lengths``), which the time loops write as zeros."""
    for g in range(blocks):
        a[g * H + j0:g * H + j1] = 0


def row_steps(lengths, T, B):
    """The int64 [B] steps of each batch row that the time loops take: ``lengths`` (checked),
    or T for every row. (One compare per row and step in the loops, none per element: the
    call without lengths runs the same code, steps all T.)"""
    return np.full(B, T, np.int64) if lengths is None else lengths


def final_rows(a, lengths):
    """[B,H] a fresh copy of each row's state after its own last step, from a [T,B,H]
    (``y`` or ``c``): a[T-1] without lengths."""
    if lengths is None:
        return a[-1].copy()
    return a[lengths - 1, np.arange(a.shape[1])]


def valid_rows(lengths, T, B, t_start=0):
    """int64 [N] the flat indices t*B + b (rows of a [T*B, F] view) of the steps t_start <= t
    < T that the batch rows run (t < lengths[b]), in time order; None where every row runs
    every step (no lengths, or all T), or where too few steps are padded to pay for gathering
    the rows (``PACK_MAX_SHARE``). The large GEMMs then run over these N rows only
    (``project_rows``, ``gather_rows``, ``finish_rows``)."""
    if lengths is None:
        return None
    runs = np.arange(t_start, T)[:, None] < lengths[None, :]          # T-t_start, B
    rows = np.flatnonzero(runs)
    if rows.size > PACK_MAX_SHARE * runs.size:
        return None
    return rows + t_start * B


# An input projection of fewer rows (T*B) than this is split by output columns instead: OpenBLAS
# packs the whole W_ih on every call, and a piece of few rows does not win that back
# (docs/performance.md, "Input projection").
PROJECT_BY_COLUMNS_ROWS = 400

# With lengths, the large GEMMs run over the steps the rows run only (``valid_rows``) where
# those are at most this share of all T*B: gathering and scattering the rows costs a pass
# over them (docs/performance.md, "Variable-length batches and bidirectional layers").
PACK_MAX_SHARE = 0.9


@jit(nogil=True)
def project_inputs(x, w_ih, out, part, parts):
    """out[T,B,G*H] = x[T,B,I] @ w_ih[G*H,I]^T in ``parts`` pieces: by rows of T*B, or for
    fewer than PROJECT_BY_COLUMNS_ROWS rows by columns of out (rows of w_ih)."""
    T, B, I = x.shape
    M, N = T * B, out.shape[2]
    x2, out2 = x.reshape(M, I), out.reshape(M, N)
    if M < PROJECT_BY_COLUMNS_ROWS:
        n0, n1 = part_range(N, part, parts)
        rows_product(x2, w_ih[n0:n1], out2[:, n0:n1], True)
    else:
        m0, m1 = part_range(M, part, parts)
        rows_product(x2[m0:m1], w_ih, out2[m0:m1], True)


@jit(nogil=True)
def project_steps(x, w_ih, out, progress, t0, steps):
    """out[t0:T] = x[t0:T] @ w_ih^T (x: [T,B,I], w_ih: [G*H,I], out: [T,B,G*H]) in pieces of
    ``steps`` time steps, doubling after each piece, publishing on ``progress`` how many steps
    are done after each. (Every GEMM call packs all of w_ih: small pieces let the time loop go
    on early, and growing ones keep the packing from making the projection the slower side.)"""
    T, B, I = x.shape
    N = out.shape[2]
    x2, out2 = x.reshape(T * B, I), out.reshape(T * B, N)
    while t0 < T:
        t1 = min(t0 + steps, T)
        rows_product(x2[t0 * B:t1 * B], w_ih, out2[t0 * B:t1 * B], True)
        publish(progress, t1)
        t0, steps = t1, 2 * steps


@jit(inline="always")
def _gather(src, rows, dst):
    """dst[m] = src[rows[m]] for each row m of dst [M,F] (src: [R,F], rows: [M] int64);
    element loops (see ops._gather_kernel)."""
    for m in range(dst.shape[0]):
        a, b = src[rows[m]], dst[m]
        for n in range(b.size):
            b[n] = a[n]


@jit(inline="always")
def _scatter(src, rows, dst):
    """dst[rows[m]] = src[m] for each row m of src [M,F] (dst: [R,F], rows: [M] int64)."""
    for m in range(src.shape[0]):
        a, b = src[m], dst[rows[m]]
        for n in range(a.size):
            b[n] = a[n]


@jit(nogil=True)
def project_rows(x, w_ih, out, rows, x_rows, out_rows, part, parts):
    """out[T,B,G*H] = x[T,B,I] @ w_ih[G*H,I]^T at the flat rows ``rows`` [N] of [T*B]
    (``valid_rows``) only, in ``parts`` pieces of those rows: each piece gathers its rows of x
    into x_rows [N,I], multiplies them into out_rows [N,G*H] and scatters those into out (its
    other rows are left as they are: the time loop writes the padded steps)."""
    T, B, I = x.shape
    N = out.shape[2]
    m0, m1 = part_range(rows.size, part, parts)
    _gather(x.reshape(T * B, I), rows[m0:m1], x_rows[m0:m1])
    rows_product(x_rows[m0:m1], w_ih, out_rows[m0:m1], True)
    _scatter(out_rows[m0:m1], rows[m0:m1], out.reshape(T * B, N))


@jit(nogil=True)
def copy_inputs(x, out, part, parts):
    """out[T,B,G*H] = x[T,B,G*H] (an input the caller projected), rows of T*B in ``parts`` pieces."""
    T, B, N = x.shape
    m0, m1 = part_range(T * B, part, parts)
    x2, out2 = x.reshape(T * B, N), out.reshape(T * B, N)
    for m in range(m0, m1):             # element loops (see ops._gather_kernel)
        src, dst = x2[m], out2[m]
        for n in range(N):
            dst[n] = src[n]


def forward_phases(kernel, args, x, w_ih, out, parts, B, weight_size, lengths=None):
    """A forward's two phases: the input projection out[T,B,G*H] = x W_ih^T of all steps
    (``project_inputs``; x itself where w_ih is None: the caller projected the input), then the
    time loop ``kernel(*args, progress, flags, part, parts)`` (``_loop.run_time_loop``).
    With ``lengths`` [B] (or None), the projection covers only the steps the rows run
    (``valid_rows``, ``project_rows``).
    Where the loop would run on one thread alone (``_loop.overlaps_phases``), both at once:
    this thread projects the first PROJECT_FIRST_STEPS steps and runs the loop, while a worker
    projects the other steps (``project_steps``) and the loop waits for each step's rows."""
    T = x.shape[0]
    if w_ih is not None and overlaps_phases(parts, B, weight_size) and T > PROJECT_FIRST_STEPS:
        first = PROJECT_FIRST_STEPS
        progress = new_progress(first)

        def project_first_then_loop():
            project_inputs(x[:first], w_ih, out[:first], 0, 1)
            kernel(*args, progress, NO_FLAGS, 0, 1)

        run_overlapped((project_steps, (x, w_ih, out, progress, first, 2 * first)),
                       (project_first_then_loop, ()), progress, consumer_here=True)
        return
    rows = None if w_ih is None else valid_rows(lengths, T, B)
    if w_ih is None:
        run_parts(copy_inputs, (x, out), parts)
    elif rows is not None:
        I, GH = x.shape[2], out.shape[2]
        x_rows = _buffers.scratch("project.x", (T * B, I), x.dtype)[:rows.size]
        out_rows = _buffers.scratch("project.out", (T * B, GH), x.dtype)[:rows.size]
        run_parts(project_rows, (x, w_ih, out, rows, x_rows, out_rows),
                  phase_parts(parts, rows.size * I * GH))
    else:
        run_parts(project_inputs, (x, w_ih, out),
                  phase_parts(parts, THREAD_STEPS * B * x.shape[2] * out.shape[2]))
    run_time_loop(kernel, args + (NO_PROGRESS,), parts, B, weight_size)


def gate_gradients(name, shape, dtype, w_ih):
    """A backward's [T,B,G*H] gate gradients: per-thread scratch (``_buffers.scratch``), or a
    fresh array where the backward returns them as dL/d(x W_ih^T) (w_ih None)."""
    return _buffers.scratch(name, shape, dtype) if w_ih is not None else _buffers.empty(shape, dtype)


class InputSide(NamedTuple):
    """The input side of ``finish_backward``: x [T,B,I], w_ih [G*H,I], dw_ih [G*H,I] +=,
    dx [T,B,I] out. Where the caller projected the input (w_ih None): size-0 stand-ins of the
    same array types, so that its dW_ih and dx GEMMs do nothing (and compile no variant of
    their own)."""
    x: np.ndarray
    w_ih: np.ndarray
    dw_ih: np.ndarray
    dx: np.ndarray


def input_side(x, w_ih, dw_ih, dg_x, t_start):
    """(InputSide, what the backward returns as dx): a fresh dx [T,B,I]; or where w_ih is None,
    dg_x [T,B,G*H] itself as dL/d(x W_ih^T), its rows t < t_start zeroed here (the time loop
    writes the others)."""
    if w_ih is not None:
        dx = _buffers.empty(x.shape, x.dtype)
        return InputSide(x, w_ih, dw_ih, dx), dx
    T, B, GH = dg_x.shape
    dg_x[:t_start] = 0
    no_input, no_weight = np.empty((T, B, 0), dg_x.dtype), np.empty((GH, 0), dg_x.dtype)
    return InputSide(no_input, no_weight, no_weight, no_input), dg_x


def backward_phases(kernel, loop_args, *, inputs, h0, y, dg_x, dg_h, dw_hh, db_ih, db_hh, dh,
                    t_start, t_origin, parts, lengths=None):
    """A backward's two phases: the time loop ``kernel(*loop_args, progress, flags, part,
    parts)`` from T-1 down to t_start (``_loop.run_time_loop``), then ``finish_backward`` over
    the rows t >= t_start in up to ``parts`` pieces (``phase_parts`` of its GEMMs'
    multiply-adds), block by block of the time blocks of a call whose step 0 is the stream's
    step ``t_origin`` (``time_blocks``). inputs: the :class:`InputSide` from ``input_side``;
    h0 [B,H], y [T,B,H] from the cache; dg_x, dg_h [T,B,G*H] the loop's gate gradients (the
    same array except for the GRU); dw_hh, db_ih, db_hh +=; dh [T,B,H] the loop's output.
    Where the loop would run on one thread alone (``_loop.overlaps_phases``), both at once:
    the loop here publishes each step it has done, and a worker finishes each time block once
    the loop has done its steps (``finish_backward_steps``), while the dx of the DX_HERE_SHARE
    of the steps that the loop reaches last (t_start onwards) is left to this thread after the
    loop (``input_gradient``), so that both end about together. With ``lengths`` [B] (or None),
    ``finish_backward`` covers only the steps the rows run (``valid_rows``: ``gather_rows``,
    then ``finish_rows``)."""
    T, B, I = inputs.x.shape
    H = h0.shape[1]
    GH = dg_x.shape[2]
    inputs.dx[:t_start] = 0                                # dx and dh of the steps not
    dh[:t_start] = 0                                       # backpropagated through
    bounds = time_blocks(t_start, T, t_origin, B)          # T, ..., t_start
    finish_args = tuple(inputs) + (h0, y, dg_x, dg_h, dw_hh, db_ih, db_hh, bounds)
    if overlaps_phases(parts, B, GH * H):
        progress = new_progress()
        t_dx = t_start + int((T - t_start) * DX_HERE_SHARE)    # dx of steps below: here

        def loop_then_dx():
            kernel(*loop_args, progress, NO_FLAGS, 0, 1)
            input_gradient(dg_x, inputs.w_ih, inputs.dx, t_start, t_dx)

        run_overlapped((loop_then_dx, ()),
                       (finish_backward_steps, finish_args + (t_dx, progress)),
                       progress)
        return
    run_time_loop(kernel, loop_args + (NO_PROGRESS,), parts, B, GH * H)
    rows = valid_rows(lengths, T, B, t_start)
    if rows is None:
        work = THREAD_STEPS * B * GH * (2 * I + H)            # per step, as layer_threads
        run_parts(finish_backward, finish_args, phase_parts(parts, work))
        return
    N, dtype = rows.size, dg_x.dtype
    x_rows, dx_rows = (_buffers.scratch(name, (T * B, I), dtype)[:N]
                       for name in ("finish.x", "finish.dx"))
    h_rows = _buffers.scratch("finish.h", (T * B, H), dtype)[:N]
    gx_rows = _buffers.scratch("finish.dg_x", (T * B, GH), dtype)[:N]
    gh_rows = gx_rows if dg_h is dg_x else _buffers.scratch("finish.dg_h", (T * B, GH), dtype)[:N]
    pieces = phase_parts(parts, N * GH * (2 * I + H))
    run_parts(gather_rows, (inputs.x, h0, y, dg_x, dg_h, inputs.dx, t_start, rows, x_rows,
                            h_rows, gx_rows, gh_rows), pieces)
    run_parts(finish_rows, (x_rows, inputs.w_ih, inputs.dw_ih, inputs.dx, h_rows, gx_rows,
                            gh_rows, dw_hh, db_ih, db_hh, rows, dx_rows), pieces)


@jit
def _finish_steps(x, w_ih, dw_ih, dx, h0, y, dg_x, dg_h, dw_hh, db_ih, db_hh, t0, t1, r0, r1,
                  m0, m1):
    """``finish_backward`` of the steps t0:t1: gradient rows r0:r1 of the weights and biases,
    and rows m0:m1 of dx's window of (t1 - t0) * B rows."""
    T, B, I = x.shape
    H = h0.shape[1]
    GH = dg_x.shape[2]
    first, last = t0 * B, t1 * B                           # rows of the window
    x2 = x.reshape(T * B, I)[first:last]                   # N,I
    gx2 = dg_x.reshape(T * B, GH)[first:last]              # N,G*H
    gh2 = dg_h.reshape(T * B, GH)[first:last]              # N,G*H
    # h_prev: step t0 sees h0 or y[t0-1], later steps see y[t-1]
    _weight_gradients(x2, gx2, gh2, h0 if t0 == 0 else y[t0 - 1],
                      y.reshape(T * B, H)[first:last - B], dw_ih, dw_hh, db_ih, db_hh, r0, r1,
                      dg_h is dg_x)
    dx_rows = dx.reshape(T * B, I)[first + m0:first + m1]
    rows_product(gx2[m0:m1], w_ih, dx_rows, False)         # dx = dg_x W_ih


@jit
def _weight_gradients(x2, gx2, gh2, h_first, h_rest, dw_ih, dw_hh, db_ih, db_hh, r0, r1,
                      shared):
    """Rows r0:r1 of dW_ih += gx2^T x2, dW_hh += gh2^T h_prev, db_ih += column sums of gx2,
    db_hh of gh2, over N rows: x2 [N,I], gx2, gh2 [N,G*H] (the same array where ``shared``:
    LSTM, Elman), h_prev [N,H] the rows of h_first, then those of h_rest."""
    n_first = h_first.shape[0]
    gemm_tn(gx2[:, r0:r1], x2, dw_ih[r0:r1], 1.0)          # dW_ih += dg_x^T x
    gemm_tn(gh2[:n_first, r0:r1], h_first, dw_hh[r0:r1], 1.0)   # dW_hh += dg_h^T h_prev
    gemm_tn(gh2[n_first:, r0:r1], h_rest, dw_hh[r0:r1], 1.0)
    if shared:                                             # LSTM, Elman: one sum for both
        db = np.zeros(r1 - r0, db_ih.dtype)
        add_column_sums(gx2, r0, r1, db)
        db_ih[r0:r1] += db
        db_hh[r0:r1] += db
    else:
        add_column_sums(gx2, r0, r1, db_ih[r0:r1])
        add_column_sums(gh2, r0, r1, db_hh[r0:r1])


@jit(nogil=True)
def gather_rows(x, h0, y, dg_x, dg_h, dx, t_start, rows, x_rows, h_rows, gx_rows, gh_rows,
                part, parts):
    """The rows of the backward's GEMMs at the flat rows ``rows`` [N] of [T*B]
    (``valid_rows``), in ``parts`` pieces of them: x_rows [N,I] of x [T,B,I], h_rows [N,H] of
    h_prev (h0 [B,H] at step 0, else y [T,B,H] a step earlier), gx_rows, gh_rows [N,G*H] of
    dg_x, dg_h [T,B,G*H] (gh_rows is gx_rows where dg_h is dg_x); and zeros into this piece's
    share of dx [T,B,I]'s rows t >= t_start (``finish_rows`` then writes the rows run)."""
    T, B, I = x.shape
    H, GH = h0.shape[1], dg_x.shape[2]
    m0, m1 = part_range(rows.size, part, parts)
    mine = rows[m0:m1]
    _gather(x.reshape(T * B, I), mine, x_rows[m0:m1])
    _gather(dg_x.reshape(T * B, GH), mine, gx_rows[m0:m1])
    if gh_rows is not gx_rows:
        _gather(dg_h.reshape(T * B, GH), mine, gh_rows[m0:m1])
    y2 = y.reshape(T * B, H)
    for m in range(m0, m1):
        r = rows[m]
        src, dst = h0[r] if r < B else y2[r - B], h_rows[m]
        for n in range(H):
            dst[n] = src[n]
    z0, z1 = part_range((T - t_start) * B, part, parts)
    dx.reshape(T * B, I)[t_start * B + z0:t_start * B + z1] = 0


@jit(nogil=True)
def finish_rows(x_rows, w_ih, dw_ih, dx, h_rows, gx_rows, gh_rows, dw_hh, db_ih, db_hh, rows,
                dx_rows, part, parts):
    """``finish_backward`` over the rows that ``gather_rows`` gathered: rows r0:r1 of the
    weight and bias gradients (``part_range`` of G*H), and dx [T,B,I] at this piece's share
    of ``rows`` through dx_rows [N,I] (the pieces are independent)."""
    N, I = x_rows.shape
    T, B = dx.shape[:2]
    r0, r1 = part_range(gx_rows.shape[1], part, parts)
    _weight_gradients(x_rows, gx_rows, gh_rows, h_rows, h_rows[N:], dw_ih, dw_hh, db_ih,
                      db_hh, r0, r1, gh_rows is gx_rows)
    m0, m1 = part_range(N, part, parts)
    rows_product(gx_rows[m0:m1], w_ih, dx_rows[m0:m1], False)    # dx = dg_x W_ih
    _scatter(dx_rows[m0:m1], rows[m0:m1], dx.reshape(T * B, I))


@jit(nogil=True)
def finish_backward(x, w_ih, dw_ih, dx, h0, y, dg_x, dg_h, dw_hh, db_ih, db_hh, bounds, part,
                    parts):
    """Accumulate parameter gradients and write dx from the per-step gate gradients.

    x: [T,B,I] layer input   w_ih: [G*H,I]   dw_ih: [G*H,I] +=
    dx: [T,B,I] out (rows t >= t_start)   (I = 0: no input side, ``input_side``)
    h0: [B,H] initial hidden state   y: [T,B,H] h_1 .. h_T
    dg_x: [T,B,G*H] dL/d(input-side pre-activations: x W_ih^T + b_ih), rows t >= t_start
    dg_h: [T,B,G*H] dL/d(hidden-side pre-activations: h W_hh^T + b_hh), rows t >= t_start
          (the same array as dg_x for LSTM and Elman cells)
    dw_hh: [G*H,H] +=   db_ih, db_hh: [G*H] +=
    bounds: int64 [n+1] the time blocks T, ..., t_start (``time_blocks``), summed one after
    the other from the top
    part, parts: this call does rows r0:r1 of the weight and bias gradients and rows m0:m1
    of each block's dx (``part_range``); the pieces are independent.
    """
    B = x.shape[1]
    r0, r1 = part_range(dg_x.shape[2], part, parts)        # gate rows of this piece
    for k in range(bounds.size - 1):
        t0, t1 = bounds[k + 1], bounds[k]
        m0, m1 = part_range((t1 - t0) * B, part, parts)    # dx rows of this piece
        _finish_steps(x, w_ih, dw_ih, dx, h0, y, dg_x, dg_h, dw_hh, db_ih, db_hh, t0, t1,
                      r0, r1, m0, m1)


@jit(nogil=True)
def finish_backward_steps(x, w_ih, dw_ih, dx, h0, y, dg_x, dg_h, dw_hh, db_ih, db_hh, bounds,
                          t_dx, progress):
    """``finish_backward`` on one thread beside the time loop, one time block of ``bounds``
    at a time from the top, each once ``progress`` says the loop has done its steps; dx only
    of the steps t >= t_dx (``input_gradient`` does the others)."""
    T, B = x.shape[:2]
    for k in range(bounds.size - 1):
        t0, t1 = bounds[k + 1], bounds[k]
        if wait_for(progress, T - t0):
            return                                         # the loop was aborted
        m0 = (max(t0, t_dx) - t0) * B                      # dx rows of this block
        _finish_steps(x, w_ih, dw_ih, dx, h0, y, dg_x, dg_h, dw_hh, db_ih, db_hh, t0, t1,
                      0, dg_x.shape[2], min(m0, (t1 - t0) * B), (t1 - t0) * B)


@jit(nogil=True)
def input_gradient(dg_x, w_ih, dx, t0, t1):
    """dx[t0:t1] = dg_x[t0:t1] @ w_ih (dg_x: [T,B,G*H], w_ih: [G*H,I], dx: [T,B,I])."""
    T, B, GH = dg_x.shape
    I = dx.shape[2]
    rows_product(dg_x.reshape(T * B, GH)[t0 * B:t1 * B], w_ih, dx.reshape(T * B, I)[t0 * B:t1 * B],
                 False)
