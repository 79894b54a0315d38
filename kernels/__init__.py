"""bptt_kernels: the compute layer of bptt (the folder ``kernels/``, installed as ``bptt_kernels``).

One subpackage per backend, each exposing the SAME functions with the SAME signatures, over
one shared host layer:

* ``bptt_kernels.host``      -- what every backend shares, written once over an array module:
                                the cell tables, the cache layout (``RecurrentCache``), the
                                recurrent calls' argument checks, the after-loop GEMMs.
* ``bptt_kernels.reference`` -- plain NumPy, float64-capable, readable oracle (slow).
* ``bptt_kernels.cpu``       -- Numba ``@njit`` kernels.
* ``bptt_kernels.cuda``      -- Numba-CUDA kernels (imported lazily; needs a GPU).
* ``bptt_kernels.cupy``      -- CuPy RawKernel + cuBLAS kernels (imported lazily; needs a GPU).

Nothing here imports ``numba.cuda`` or ``cupy`` at import time, and ``import bptt_kernels``
loads no third-party module at all (the cell tables are plain Python).

The backend interface
=====================

Notation: T time steps, B batch (streams), I input size, H hidden size, G gates
(LSTM 4 in order i, f, g, o; GRU 3 in order r, z, n; Elman RNN 1).
Arrays are time-major and C-contiguous. Parameters use PyTorch's public layout.

Array plumbing
--------------
``NAME``                          backend name: "reference", "cpu", "cuda", "cupy".
``xp``                            its array module (``numpy`` or ``cupy``).
``DTYPES``                        tuple of supported numpy dtypes (float32 always; float64 on cpu/reference).
``TIME_BLOCKS``                   True where the gradient sums over time run in the time blocks of
                                  ``host/blocks.py`` (reference, cpu); False: one block (GPU backends).
``asarray(a, dtype)``             a host/array-like as a C-contiguous device array of ``dtype``; it may
                                  share memory with ``a`` (numpy backends): copy before mutating.
``to_host(a)``                    device array -> ``numpy.ndarray`` (may alias ``a`` on numpy backends).
``zeros(shape, dtype)``           zero-filled device array.
``run_beside(first, second, work)``  optional (cpu): (first(), second()) for two independent
                                  calls of layer kernels of ``work`` multiply-adds each, run at
                                  once on two threads (a bidirectional layer's directions);
                                  where a backend lacks it, the layers call one after the other.

Recurrent layers (one layer, all T steps per call; the time loop lives in the kernel)
--------------------------------------------------------------------------------------
For each cell in ("lstm", "gru", "rnn_tanh", "rnn_relu") the backend has
``<cell>_forward`` and ``<cell>_backward``::

    y, final_state, cache = <cell>_forward(x, state, w_ih, w_hh, b_ih, b_hh, lengths=None)
        x       [T, B, I]     input
        state   tuple of [B, H] arrays: (h0,) for gru/rnn, (h0, c0) for lstm
        w_ih    [G*H, I]      w_hh [G*H, H]   b_ih [G*H]   b_hh [G*H]
                (bias=False layers pass zero biases)
        lengths [B]           host integers (a numpy array of any integer dtype, or what
                              ``numpy.asarray`` makes one of), each in 1..T, in any order;
                              None: every row runs all T steps. Row b runs only its steps
                              t < lengths[b]: at its padded steps t >= lengths[b] its state
                              stays unchanged and y[t, b] = 0 (x[t, b] there is not used,
                              but must be finite: the backward's GEMMs multiply it by zero).
                              Exactly PyTorch's pack_padded_sequence(x, lengths,
                              enforce_sorted=False) -> nn.LSTM/GRU/RNN -> pad_packed_sequence.
                              (The cupy and cuda backends check it, then raise
                              NotImplementedError: not implemented there yet.)
        y       [T, B, H]     hidden state after every step (h_1 .. h_T; zero at padded steps)
        final_state           tuple like ``state``: (h_T,) or (h_T, c_T); with lengths each
                              row's state after its own last step lengths[b]-1
        cache                 ``bptt_kernels.host.RecurrentCache``, the same type and
                              fields on every backend: x, the initial state and every
                              step's activations (see host/cache.py) and the lengths
                              (``cache.lengths``, int64 host array, or None); a backend
                              accepts a cache made by another one.

    Argument errors are the same on every backend (``bptt_kernels.host.checks``):
    TypeError for a wrong array type, dtype or cache type, ValueError for a wrong shape or value
    (lengths: TypeError for a non-integer dtype, ValueError for a shape other than [B] or a
    value outside [1, T], naming the first such row).
    ``state`` / ``dfinal_state`` None means zeros.

    dx, dstate, dh = <cell>_backward(dy, dfinal_state, cache, w_ih, w_hh,
                                     dw_ih, dw_hh, db_ih, db_hh, t_start=0, t_origin=0)
        dy            [T, B, H]   dL/dy from above (loss or the next layer)
        dfinal_state  tuple like ``state``: dL/d(final state) from a later chunk
        cache         from the matching forward call
        dw_ih [G*H, I], dw_hh [G*H, H], db_ih [G*H], db_hh [G*H]:
                      parameter gradients, ACCUMULATED (+=) in place
        t_start       backpropagate only through steps t_start .. T-1 (0-based):
                      the gradient is cut at the state entering step t_start.
                      Used by TBPTT(k1, k2) when the k2 window starts inside a chunk.
        t_origin      the stream's step of step 0: the parameter gradients are sums over
                      the steps in time blocks of ``host.blocks.block_steps(B)`` steps at stream
                      steps that are multiples of it, added from the last block down (where
                      ``TIME_BLOCKS``), so calls that meet at block boundaries add up to
                      the one call's gradients bit for bit.
        dx            [T, B, I]   dL/dx; rows t < t_start are zero
        dstate        tuple like ``state``: dL/d(state entering step t_start)
                      (== dL/d(initial state) when t_start == 0)
        dh            [T, B, H]   total dL/dh_t for every step (dy[t] plus what
                      flows back through the recurrence); rows t < t_start are zero.
                      This is the vanishing/exploding-gradient diagnostic.

    With lengths (taken from the cache; the backward has no lengths argument) the backward
    is exact for them: padded steps give no gradient (dy there is ignored; dx, dh and the
    gate gradients there are zero, so no parameter gradient comes from them), and the state
    gradient passes unchanged through a row's padded steps: dfinal_state reaches the row's
    last real step lengths[b]-1, and for a row whose steps all lie before t_start
    (lengths[b] <= t_start) dstate is dfinal_state itself.

    Input projection done by the caller: pass ``w_ih=None`` to the forward and x as
    [T, B, G*H] holding x_t W_ih^T already (without b_ih, which the kernel still adds); the
    backward then takes ``w_ih=None`` and ``dw_ih=None`` and returns, in place of dx,
    dL/d(x W_ih^T) [T, B, G*H] (rows t < t_start zero), leaving dW_ih to the caller. A
    language model folds its embedding into this: (E W_ih^T)[ids] = E[ids] W_ih^T, one
    [V, G*H] table instead of a GEMM over all T*B rows (see bptt.models.LanguageModel).

Non-recurrent pieces used by the trainer
----------------------------------------
``softmax_cross_entropy(logits, targets, dlogits, scale)`` -> float
        logits [N, V], targets [N] int64 (a target < 0 is ignored: no loss, zero dlogits row).
        Returns the SUM of -log softmax(logits)[n, targets[n]] over counted rows (a Python float)
        and writes dlogits [N, V] = scale * (softmax(logits) - onehot(targets)) in one pass,
        numerically stable (max subtracted). ``dlogits`` may be the same array as ``logits``.
``linear_forward(x, w, b)`` -> out
        x [N, I], w [O, I], b [O] -> out [N, O] = x w^T + b (a model's decoder / readout).
``linear_backward(dout, x, w, dw, db)`` -> dx
        dout [N, O]; dw [O, I] += dout^T x, db [O] += column sums of dout; dx [N, I] = dout w.
``embedding_forward(weight, ids)`` -> out
        weight [V, E], ids int64 [...] -> out [..., E] (a gather).
``embedding_backward(dweight, ids, dout)``
        dweight [V, E] += scatter-add of dout [..., E] at ids (repeated ids accumulate).
``sgd_step(param, grad, buf, lr, momentum, weight_decay, nesterov, first)``
        in place, torch.optim.SGD's rule (dampening 0). ``buf`` same shape as param;
        ``first`` True on the first step (torch initialises buf = grad then).
``adam_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step)``
        in place, torch.optim.Adam's rule (L2 weight decay added to grad, bias
        correction with ``step`` counted from 1).
``sum_of_squares(arrays)`` -> float   sum over all elements of all arrays of a**2 (computed in float64).
``scale_(arrays, factor)``            in place a *= factor for every array.
"""

from .host.cells import CELLS, GATES, SEPARATE_HIDDEN_GRAD, STATE_PARTS  # noqa: E402

__all__ = ["CELLS", "GATES", "STATE_PARTS", "SEPARATE_HIDDEN_GRAD"]
