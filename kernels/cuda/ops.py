"""Non-recurrent kernels of the Numba-CUDA backend: loss, embedding, optimizers, norms.

Each kernel's plain reference is the function of the same name in ``bptt_kernels.reference``;
tests/cudasim/test_ops.py checks them against it.
"""

import functools
import math

import numpy as np
from numba import cuda, float64

from . import _device, config
from ._device import NUMBA_DTYPE



def _block_threads():
    """config.THREADS rounded down to a power of two (the tree reductions need one)."""
    return 1 << (max(1, int(config.THREADS)).bit_length() - 1)


@cuda.jit(device=True)
def _block_reduce(red, value, is_max):
    """Sum (or max) of ``value`` over the block via shared ``red`` [blockDim.x, power of two];
    every thread gets the result. Ends with a barrier, so ``red`` may be reused at once."""
    tid = cuda.threadIdx.x
    red[tid] = value
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            other = red[tid + stride]
            if is_max:
                if other > red[tid]:
                    red[tid] = other
            else:
                red[tid] += other
        cuda.syncthreads()
        stride //= 2
    result = red[0]
    cuda.syncthreads()
    return result


# ----------------------------------------------------------------------------------------
# Fused softmax cross-entropy


@functools.lru_cache(maxsize=None)
def _softmax_xent_kernel(threads, dtype):
    nb_dtype = NUMBA_DTYPE[np.dtype(dtype)]

    @cuda.jit
    def softmax_xent(logits, targets, dlogits, scale, losses):
        # logits [N,V], targets [N] int64 (< 0: ignored), dlogits [N,V] (may alias logits),
        # losses [N] float64 out. One block per row (grid-stride over rows).
        red = cuda.shared.array(threads, float64)
        N = logits.shape[0]
        V = logits.shape[1]
        tid = cuda.threadIdx.x
        for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
            target = targets[n]                                   # uniform over the block
            if target < 0:
                for v in range(tid, V, threads):
                    dlogits[n, v] = 0
                if tid == 0:
                    losses[n] = 0.0
                continue
            m = -math.inf
            for v in range(tid, V, threads):
                m = max(m, float64(logits[n, v]))
            m = _block_reduce(red, m, True)                       # row max
            m_t = nb_dtype(m)
            s = 0.0
            for v in range(tid, V, threads):
                s += math.exp(logits[n, v] - m_t)
            s = _block_reduce(red, s, False)                      # sum of exp(logit - max)
            if tid == 0:
                losses[n] = math.log(s) - float64(logits[n, target] - m_t)  # -log softmax
            cuda.syncthreads()                                    # logits[n, target] read first
            inv_s = nb_dtype(1.0 / s)
            for v in range(tid, V, threads):
                p = math.exp(logits[n, v] - m_t) * inv_s          # softmax
                if v == target:
                    p -= 1
                dlogits[n, v] = scale * p

    return softmax_xent


def softmax_cross_entropy(logits, targets, dlogits, scale):
    """Summed cross-entropy of logits [N,V] against int targets [N] (< 0: row ignored), and
    dlogits [N,V] = scale * (softmax - onehot) in one pass (``dlogits`` may be ``logits``).
    Returns the loss sum (a Python float; computed per row in float64)."""
    _device.check_array("logits", logits, ndim=2)
    N, V = logits.shape
    _device.check_array("dlogits", dlogits, ndim=2, dtype=logits.dtype, shape=(N, V))
    targets = _device.index_array("targets", targets)
    if targets.shape != (N,):
        raise ValueError(f"targets must have shape [{N}] (one per logits row), got {list(targets.shape)}")
    if N and int(targets.max()) >= V:
        raise ValueError(f"targets must be < V={V} (or negative to ignore a row), got {int(targets.max())}")
    losses = _device.empty((N,), np.float64)
    (losses_arg,) = _device.kernel_args(losses)
    if N:
        threads = _block_threads()
        _softmax_xent_kernel(threads, logits.dtype)[_device.blocks_for(N, 1), threads, _device.stream()](
            *_device.kernel_args(logits, targets, dlogits), float(scale), losses_arg)
    return float(losses.sum())


# ----------------------------------------------------------------------------------------
# Embedding


@cuda.jit
def _gather_kernel(weight, ids, out):
    # weight [V,E], ids [N] int64, out [N,E]: out[n] = weight[ids[n]]
    E = weight.shape[1]
    for k in range(cuda.grid(1), ids.shape[0] * E, cuda.gridsize(1)):
        n = k // E
        e = k - n * E
        out[n, e] = weight[ids[n], e]


@cuda.jit
def _scatter_add_kernel(dweight, ids, dout):
    # dweight [V,E] += dout [N,E] at rows ids [N] (atomics: repeated ids accumulate)
    E = dweight.shape[1]
    for k in range(cuda.grid(1), ids.shape[0] * E, cuda.gridsize(1)):
        n = k // E
        e = k - n * E
        cuda.atomic.add(dweight, (ids[n], e), dout[n, e])


def _flat_ids(ids, V):
    """ids [...] -> device int64 [N], every id checked to lie in [0, V)."""
    flat = _device.index_array("ids", ids).reshape(-1)
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= V):
        raise ValueError(f"ids must be in [0, {V - 1}], got values in [{int(flat.min())}, {int(flat.max())}]")
    return flat


def embedding_forward(weight, ids):
    """Gather rows: weight [V,E], ids int [...] -> out [...,E]."""
    _device.check_array("weight", weight, ndim=2)
    V, E = weight.shape
    flat = _flat_ids(ids, V)
    out = _device.empty((flat.size, E), weight.dtype)
    _device.launch_1d(_gather_kernel, flat.size * E, weight, flat, out)
    return out.reshape(tuple(np.shape(ids)) + (E,))


def embedding_backward(dweight, ids, dout):
    """dweight [V,E] += scatter-add of dout [...,E] at ids [...] (repeated ids accumulate)."""
    _device.check_array("dweight", dweight, ndim=2)
    V, E = dweight.shape
    flat = _flat_ids(ids, V)
    _device.check_array("dout", dout, dtype=dweight.dtype, shape=tuple(np.shape(ids)) + (E,))
    _device.launch_1d(_scatter_add_kernel, flat.size * E, dweight, flat, dout.reshape(flat.size, E))


# ----------------------------------------------------------------------------------------
# Optimizer steps (torch.optim rules), norms and scaling: flat grid-stride kernels


@cuda.jit
def _sgd_kernel(param, grad, buf, lr, momentum, weight_decay, nesterov, first):
    # param, grad, buf [n] (buf unused when momentum == 0)
    for i in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
        d = grad[i]
        if weight_decay != 0:
            d = d + weight_decay * param[i]                       # L2 penalty
        if momentum != 0:
            b = d if first else momentum * buf[i] + d             # torch: buf = d on step 1
            buf[i] = b
            d = d + momentum * b if nesterov else b
        param[i] -= lr * d


@cuda.jit
def _adam_kernel(param, grad, m, v, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt):
    # param, grad, m, v [n]; step_size = lr / (1 - beta1^step), bc2_sqrt = sqrt(1 - beta2^step)
    for i in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
        g = grad[i]
        if weight_decay != 0:
            g = g + weight_decay * param[i]                       # L2 penalty
        m_i = m[i] + (1 - beta1) * (g - m[i])                     # first moment
        v_i = beta2 * v[i] + (1 - beta2) * g * g                  # second moment
        m[i] = m_i
        v[i] = v_i
        param[i] -= step_size * (m_i / (math.sqrt(v_i) / bc2_sqrt + eps))


def _check_like(name, a, param):
    _device.check_array(name, a, dtype=param.dtype, shape=tuple(param.shape))


def sgd_step(param, grad, buf, lr, momentum, weight_decay, nesterov, first):
    """One torch.optim.SGD step in place (dampening 0); ``buf`` may be None when momentum == 0."""
    _device.check_array("param", param)
    _check_like("grad", grad, param)
    if momentum != 0 or buf is not None:
        _check_like("buf", buf, param)
    buf_flat = buf.reshape(-1) if buf is not None else _device.empty((1,), param.dtype)
    _device.launch_1d(_sgd_kernel, param.size, param.reshape(-1), grad.reshape(-1), buf_flat,
                      float(lr), float(momentum), float(weight_decay), bool(nesterov), bool(first))


def adam_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """One torch.optim.Adam step in place (L2 weight decay, bias correction, ``step`` from 1)."""
    _device.check_array("param", param)
    for name, a in (("grad", grad), ("m", m), ("v", v)):
        _check_like(name, a, param)
    if int(step) < 1:
        raise ValueError(f"step must be >= 1 (counted from 1), got {step}")
    step_size = float(lr) / (1 - float(beta1) ** int(step))
    bc2_sqrt = math.sqrt(1 - float(beta2) ** int(step))
    _device.launch_1d(_adam_kernel, param.size, param.reshape(-1), grad.reshape(-1), m.reshape(-1),
                      v.reshape(-1), float(beta1), float(beta2), float(eps), float(weight_decay),
                      step_size, bc2_sqrt)


@functools.lru_cache(maxsize=None)
def _sum_squares_kernel(threads):
    @cuda.jit
    def sum_squares(a, out):
        # a [n], out [1] float64 += sum of a**2 (block reduction, one atomic per block)
        red = cuda.shared.array(threads, float64)
        acc = 0.0
        for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
            acc += float64(a[i]) * float64(a[i])
        acc = _block_reduce(red, acc, False)
        if cuda.threadIdx.x == 0:
            cuda.atomic.add(out, 0, acc)

    return sum_squares


@cuda.jit
def _scale_kernel(a, factor):
    # a [n] *= factor
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        a[i] *= factor


def sum_of_squares(arrays):
    """Sum of a**2 over every element of every array, accumulated in float64 (a Python float)."""
    arrays = list(arrays)
    for k, a in enumerate(arrays):
        _device.check_array(f"arrays[{k}]", a)
    out = _device.zeros((1,), np.float64)
    threads = _block_threads()
    kernel = _sum_squares_kernel(threads)
    (out_arg,) = _device.kernel_args(out)
    for a in arrays:
        if a.size:
            kernel[_device.blocks_for(a.size, threads), threads, _device.stream()](
                *_device.kernel_args(a.reshape(-1)), out_arg)
    return float(_device.to_host(out)[0])


def scale_(arrays, factor):
    """In place a *= factor for every array."""
    arrays = list(arrays)
    for k, a in enumerate(arrays):
        _device.check_array(f"arrays[{k}]", a)
    for a in arrays:
        _device.launch_1d(_scale_kernel, a.size, a.reshape(-1), float(factor))
