"""The Numba-CUDA backend against the one contract of every backend (tests/conformance.py),
under the CUDA simulator."""

import conformance


def test_signatures(cuda):
    conformance.check_signatures(cuda)


def test_cache_layout(cuda, rng):
    conformance.check_cache_layout(cuda, rng)


def test_same_error_for_same_bad_argument(cuda):
    conformance.check_errors(cuda, seed=11)


def test_backward_over_a_cache_from_another_backend(cuda, rng):
    conformance.check_foreign_cache(cuda, rng)
