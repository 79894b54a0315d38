"""Numba-CUDA kernels under the CUDA simulator: run this directory in its own process with

    NUMBA_ENABLE_CUDASIM=1 python -m pytest -q tests/cudasim

The variable must be set before ``numba.cuda`` is first imported, so without it every test
here is skipped (with that reason) and nothing here imports ``numba.cuda``: the test modules
get the backend only through the ``cuda`` fixture below.

Every test here runs with *poisoned* scratch memory (``config.POISON_OUTPUTS``): every
uninitialised array the backend allocates (outputs, caches, gate buffers) starts as NaN, so an
element a kernel forgets to write, or a buffer read before it is written, turns into NaN and
fails the comparison.

Sizes are tiny: the simulator runs every CUDA thread as a Python thread.
"""

import os

import pytest

SIMULATOR_ON = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
_SKIP_REASON = ("CUDA simulator tests: run them in their own process with "
                "NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim")
_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    if SIMULATOR_ON:
        return
    skip = pytest.mark.skip(reason=_SKIP_REASON)
    for item in items:
        if str(item.path).startswith(_HERE):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cuda():
    """The bptt_kernels.cuda backend module, running on the simulator."""
    if not SIMULATOR_ON:
        pytest.skip(_SKIP_REASON)
    import bptt_kernels.cuda as backend
    if not backend.SIMULATOR:
        pytest.skip("numba.cuda was imported before NUMBA_ENABLE_CUDASIM=1 took effect")
    return backend


@pytest.fixture(scope="session")
def ref():
    """The float64-exact NumPy reference backend (the oracle)."""
    import bptt_kernels.reference as reference
    return reference


@pytest.fixture(autouse=True)
def _poison_and_reset(request):
    """NaN-poison every uninitialised device array; restore the backend's config afterwards."""
    if not SIMULATOR_ON:
        yield
        return
    from bptt_kernels.cuda import config
    config.POISON_OUTPUTS = True
    yield
    config.reset()
