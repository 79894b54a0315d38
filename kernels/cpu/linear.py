"""The linear map of a model's output layer (a language model's decoder, a sequence model's
readout) on the layer threads: out = x W^T + b and its backward, as the GEMMs around the
recurrent time loops (``_phases.py``) are run, in ``parts`` pieces (``_loop.run_parts``).

OpenBLAS runs on one thread in this process (``_loop.py``), so NumPy's own matmul would run
these GEMMs on one core. Char-LM of perf/bench_train.py (N = T*B = 1600 rows, H = 256,
V = 104): decoder forward + backward 3.4 ms per update through NumPy on one thread.
"""

from . import _args, _buffers
from ._blas import gemm_tn, rows_product
from ._phases import add_column_sums
from ._loop import layer_threads, part_range, run_parts
from ._math import jit


@jit(nogil=True)
def _forward_rows(x, w, b, out, part, parts):
    # x: [N,I]  w: [O,I]  b: [O]  out: [N,O] = x w^T + b, rows n0:n1 of this piece
    n0, n1 = part_range(x.shape[0], part, parts)
    rows_product(x[n0:n1], w, out[n0:n1], True)
    for n in range(n0, n1):
        row = out[n]
        for o in range(b.shape[0]):
            row[o] += b[o]


@jit(nogil=True)
def _backward_rows(dout, x, w, dw, db, dx, part, parts):
    # dout: [N,O]  x: [N,I]  w: [O,I]  dw: [O,I] +=  db: [O] +=  dx: [N,I] out
    # this piece: rows o0:o1 of dw and db, rows n0:n1 of dx
    o0, o1 = part_range(w.shape[0], part, parts)
    gemm_tn(dout[:, o0:o1], x, dw[o0:o1], 1.0)            # dW += dout^T x
    add_column_sums(dout, o0, o1, db[o0:o1])              # db += sum over rows of dout
    n0, n1 = part_range(x.shape[0], part, parts)
    rows_product(dout[n0:n1], w, dx[n0:n1], False)        # dx = dout W


def _inputs(x, w):
    x = _args.as_input("x", x, shape=(None, None))
    return x, _args.as_input("w", w, x.dtype, (None, x.shape[1]))


def linear_forward(x, w, b):
    """x [N,I], w [O,I], b [O] -> out [N,O] = x w^T + b."""
    x, w = _inputs(x, w)
    b = _args.as_input("b", b, x.dtype, (w.shape[0],))
    out = _buffers.empty((x.shape[0], w.shape[0]), x.dtype)
    with layer_threads(x.shape[0] * w.shape[0] * x.shape[1]) as parts:
        run_parts(_forward_rows, (x, w, b, out), parts)
    return out


def linear_backward(dout, x, w, dw, db):
    """dout [N,O] = dL/d(x w^T + b), x [N,I], w [O,I]; accumulates dw [O,I] += dout^T x and
    db [O] += column sums of dout -> dx [N,I] = dout w."""
    x, w = _inputs(x, w)
    dout = _args.as_input("dout", dout, x.dtype, (x.shape[0], w.shape[0]))
    _args.as_output("dw", dw, x.dtype, w.shape)
    _args.as_output("db", db, x.dtype, (w.shape[0],))
    dx = _buffers.empty(x.shape, x.dtype)
    with layer_threads(2 * x.shape[0] * w.shape[0] * x.shape[1]) as parts:
        run_parts(_backward_rows, (dout, x, w, dw, db, dx), parts)
    return dx
