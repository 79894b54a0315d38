"""Scalar activations for the ``@njit`` gate loops, chosen by dtype at compile time.

float64 uses the exact libm functions (``math.tanh``, ``math.exp``): results agree with
NumPy/PyTorch to the last bits, which the float64 gradient checks need.

float32 uses a rational approximation of tanh (the minimax form used by Eigen) that has no
libm call, so LLVM vectorises the gate loops (the pip llvmlite has no SVML; a libm ``tanhf``
per element costs ~14 ns). Measured against float64 ``tanh`` over [-10, 10]:
max abs error 4.8e-7 of tanh and 2.4e-7 of sigmoid (float32's epsilon is 1.2e-7).
``sigmoid(x) = 0.5 * tanh(0.5 * x) + 0.5`` shares it.

``exp_`` (float32) is Cephes' expf reduction and polynomial with the power of two built by
integer bit arithmetic (vectorisable; ~1e-7 relative error, inputs clamped to [-87.3, 88.3]);
float64 calls libm.

``tanh_``, ``sigmoid_``, ``exp_`` take one scalar; ``one_like(x)`` returns 1 of x's type, for typed
constants (a bare ``1.0`` would promote float32 arithmetic to float64).

``jit`` is the decorator of every CPU kernel: ``cache=True`` (compiled code is reused by later
processes) and ``error_model="numpy"`` (a float division by zero gives inf/nan as in NumPy
instead of a Python ZeroDivisionError check, which would stop LLVM from vectorising any loop
that divides: the float32 tanh loop runs ~10x faster with it).
"""

import functools
import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

jit = functools.partial(njit, cache=True, error_model="numpy")

_F32 = np.float32
# tanh(x) ~= x * P(x^2) / Q(x^2) on [-9, 9]; outside, float32 tanh is +-1 (Eigen's ptanh_float)
_CLAMP = _F32(9.0)
_A1, _A3, _A5, _A7 = (_F32(4.89352455891786e-03), _F32(6.37261928875436e-04),
                      _F32(1.48572235717979e-05), _F32(5.12229709037114e-08))
_A9, _A11, _A13 = _F32(-8.60467152213735e-11), _F32(2.00018790482477e-13), _F32(-2.76076847742355e-16)
_B0, _B2, _B4, _B6 = (_F32(4.89352518554385e-03), _F32(2.26843463243900e-03),
                      _F32(1.18534705686654e-04), _F32(1.19825839466702e-06))
_HALF32 = _F32(0.5)


@jit(inline="always")
def _tanh_f32(x):
    x = min(max(x, -_CLAMP), _CLAMP)
    x2 = x * x
    p = x2 * _A13 + _A11
    p = x2 * p + _A9
    p = x2 * p + _A7
    p = x2 * p + _A5
    p = x2 * p + _A3
    p = x2 * p + _A1
    q = x2 * _B6 + _B4
    q = x2 * q + _B2
    q = x2 * q + _B0
    return x * p / q


# exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 (ln 2 split in two: exact k * LN2_HI)
_EXP_LO, _EXP_HI = _F32(-87.3), _F32(88.3)
_LOG2E, _LN2_HI, _LN2_LO = _F32(1.44269504088896341), _F32(0.693359375), _F32(-2.12194440e-4)
_E0, _E1, _E2 = _F32(1.9875691500e-4), _F32(1.3981999507e-3), _F32(8.3334519073e-3)
_E3, _E4, _E5 = _F32(4.1665795894e-2), _F32(1.6666665459e-1), _F32(5.0000001201e-1)
_ONE32 = _F32(1.0)


@intrinsic
def _int32_bits_as_float32(typingctx, i):
    """Reinterpret the bits of an int32 as a float32 (no conversion)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@jit(inline="always")
def _exp_f32(x):
    x = min(max(x, _EXP_LO), _EXP_HI)
    k = np.floor(x * _LOG2E + _HALF32)
    r = x - k * _LN2_HI - k * _LN2_LO
    p = r * _E0 + _E1
    p = r * p + _E2
    p = r * p + _E3
    p = r * p + _E4
    p = r * p + _E5
    p = p * r * r + r + _ONE32
    return p * _int32_bits_as_float32((np.int32(k) + np.int32(127)) << np.int32(23))


def exp_(x):
    """exp of one scalar (float32: vectorisable Cephes-style expf; float64: exact libm)."""
    return math.exp(x)


@overload(exp_, inline="always")
def _exp_impl(x):
    if x == types.float32:
        return lambda x: _exp_f32(x)
    return lambda x: math.exp(x)


def tanh_(x):
    """tanh of one scalar (float32: vectorisable approximation; float64: exact)."""
    return math.tanh(x)


def sigmoid_(x):
    """1 / (1 + exp(-x)) of one scalar (float32: via the tanh approximation; float64: exact)."""
    return 1.0 / (1.0 + math.exp(-x))


def one_like(x):
    """The number 1 in x's floating type."""
    return type(x)(1)


@overload(tanh_, inline="always")
def _tanh_impl(x):
    if x == types.float32:
        return lambda x: _tanh_f32(x)
    return lambda x: math.tanh(x)


@overload(sigmoid_, inline="always")
def _sigmoid_impl(x):
    if x == types.float32:
        return lambda x: _HALF32 * _tanh_f32(_HALF32 * x) + _HALF32
    one = np.float64(1.0)
    return lambda x: one / (one + math.exp(-x))


@overload(one_like, inline="always")
def _one_like_impl(x):
    if x == types.float32:
        return lambda x: np.float32(1.0)
    return lambda x: np.float64(1.0)
