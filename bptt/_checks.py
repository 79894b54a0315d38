"""Input validation shared by the user layer: every error names the argument, what was
expected and what was given, before anything reaches a kernel.

* wrong type or dtype (integer, bool, complex, strings) -> ``TypeError``
* wrong number of dimensions, wrong shape, out-of-range value, non-finite values -> ``ValueError``

Float arrays of another float dtype are converted to the layer's dtype (like ``torch.as_tensor``);
torch tensors on the host are accepted (through ``numpy.asarray``).
"""

import numbers

import numpy as np


def describe(a):
    """Short description of an array for error messages: 'array of shape (2, 3) and dtype float32'."""
    return f"array of shape {tuple(a.shape)} and dtype {a.dtype}"


def as_float_array(name, value, dtype, backend):
    """Return ``value`` as a C-contiguous ``backend`` array of the float ``dtype``.

    Accepts backend arrays, numpy arrays, nested sequences and host torch tensors. An array
    that already is a C-contiguous backend array of ``dtype`` is returned as is (no copy).
    Raises TypeError for non-float element types (ints, bools, complex, objects, strings).
    """
    xp = backend.xp
    if not isinstance(value, xp.ndarray):
        if hasattr(value, "detach") and callable(value.detach):
            value = value.detach()                  # a torch tensor: drop its autograd graph
        try:
            value = np.asarray(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a float array-like; got {type(value).__name__} "
                            f"that numpy cannot convert ({e})") from None
    kind = np.dtype(value.dtype).kind
    if kind != "f":
        what = {"i": "an integer", "u": "an unsigned integer", "b": "a bool",
                "c": "a complex"}.get(kind, "a non-numeric")
        raise TypeError(f"{name} must be a float array (converted to {np.dtype(dtype).name}); "
                        f"got {what} {describe(value)}")
    if isinstance(value, xp.ndarray) and value.dtype == dtype and value.flags.c_contiguous:
        return value
    return backend.asarray(value, dtype)


def expect_ndim(name, a, ndim, layout):
    """Raise ValueError unless ``a.ndim == ndim``; ``layout`` names the axes, e.g. '[T, B, I]'."""
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}; got {a.ndim}-D {describe(a)}")


def expect_shape(name, a, shape, layout):
    """Raise ValueError unless ``a.shape == shape``; ``layout`` names the axes, e.g. '[L, B, H]' (or '')."""
    shape = tuple(int(s) for s in shape)
    wanted = f"{layout} = {shape}" if layout else f"{shape}"
    if a.ndim != len(shape):
        raise ValueError(f"{name} must be {len(shape)}-D {wanted}; got {a.ndim}-D {describe(a)}")
    if tuple(a.shape) != shape:
        raise ValueError(f"{name} must have shape {wanted}; got {describe(a)}")


def expect_finite(name, a, backend):
    """Raise ValueError if ``a`` holds NaN or inf: says how many, where the first is and its value."""
    xp = backend.xp
    finite = xp.isfinite(a)
    if bool(finite.all()):
        return
    bad = backend.to_host(~finite)
    count = int(bad.sum())
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    value = backend.to_host(a)[first]
    raise ValueError(f"{name} contains {count} non-finite value{'s' if count != 1 else ''} "
                     f"(NaN or inf) out of {bad.size}; the first is {value} at index {first}")


def expect_int(name, value, low, high=None):
    """Return ``value`` as an int, checking low <= value (<= high when given).

    bools and non-integral numbers are rejected with TypeError; out of range -> ValueError.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}; got {value}")
    return value
