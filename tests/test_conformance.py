"""Every backend against the one contract (tests/conformance.py): reference, cpu, and the
CuPy backend on its host emulation (its CUDA sources built for the host). The Numba-CUDA
backend runs the same checks under the simulator (cudasim/test_conformance_cuda.py)."""

import pytest

import conformance


def _cupy_host():
    from bptt_kernels.cupy import host_emulation
    if host_emulation.find_compiler() is None:
        pytest.skip("no host C++ compiler (g++/c++/clang++) to build the CuPy kernels")
    return host_emulation.host_backend()


def _module(name):
    import importlib
    return importlib.import_module(f"bptt_kernels.{name}")


BACKENDS = {"reference": lambda: _module("reference"), "cpu": lambda: _module("cpu"),
            "cupy-host": _cupy_host}


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def be(request):
    return BACKENDS[request.param]()


def test_signatures(be):
    conformance.check_signatures(be)


def test_cache_layout(be, rng):
    conformance.check_cache_layout(be, rng)


def test_same_error_for_same_bad_argument(be):
    conformance.check_errors(be, seed=11)


def test_backward_over_a_cache_from_another_backend(be, rng):
    conformance.check_foreign_cache(be, rng)
