"""The CuPy backend with variable-length batches (``lengths``), on its host emulation: the CUDA
sources built for the CPU (bptt_kernels.cupy.host_emulation), every kernel in both thread
orders, outputs NaN-poisoned, every launch's arguments checked against the kernel's C
signature.

Oracles: the float64 NumPy reference (helpers.RTOL) and, where torch is installed,
torch.nn through pack_padded_sequence (tests/gpu/gpu_checks.py, the checks the GPU runs too):

* every cell on every path (general, persistent, cooperative), float64 and float32, lengths
  mixed and unsorted, all 1 and all T, t_start 0 and inside (rows wholly before t_start get
  dfinal_state back), the projected input (w_ih None); y, dx, dh and the cache exactly zero
  at padded steps, the final state after each row's own last step, every gradient;
* the one-launch paths over several blocks (rows or units per block) and split dot products;
* lengths all T bit-identical to no lengths;
* the general path's CUDA graphs (host replays) with lengths changing between calls of one
  key, and calls without lengths between them;
* caches with lengths crossing backends; bptt's layers on the emulated backend.
"""

import numpy as np
import pytest

from bptt_kernels import CELLS
from bptt_kernels import reference as ref
from bptt_kernels.cupy import _plan, config, host_emulation
from gpu.gpu_checks import (check_caches_cross, check_graph_replays_with_lengths,
                            check_layers_with_lengths, check_lengths_all_T, check_recurrent)
from test_lengths import make_lengths

PATHS = ("general", "persistent", "cooperative")
DTYPES = (np.float64, np.float32)

pytestmark = pytest.mark.skipif(host_emulation.find_compiler() is None,
                                reason="no host C++ compiler (g++/c++/clang++) to build the kernels")


def _torch_device():
    """"cpu" where torch is installed (the torch.nn comparisons), else None."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    return "cpu"


@pytest.fixture(scope="module")
def hosts():
    """{reverse: the backend over the host build of the kernels (H100 limits)}."""
    return {rev: host_emulation.host_backend(reverse=rev) for rev in (False, True)}


@pytest.fixture(autouse=True)
def _fresh_config():
    config.reset()
    yield
    config.reset()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", CELLS)
def test_every_path_matches_reference_and_torch(hosts, cell, path, dtype, rng):
    """T=7, B=5: lengths mixed (t_start 0, with torch; t_start 3, rows of lengths <= 3 wholly
    before it), all 1 and all T (t_start 0), in both thread orders."""
    T, B, I, H = 7, 5, 4, 6
    for reverse, be in hosts.items():
        for kind, t_start in (("mixed", 0), ("mixed", 3), ("1", 0), ("T", 0)):
            lengths = make_lengths(kind, T, B, rng)
            check_recurrent(be, ref, cell, (T, B, I, H), dtype, t_start, rng, path=path,
                            lengths=lengths, torch_device=_torch_device() if t_start == 0 else None)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", CELLS)
def test_projected_input_with_lengths(hosts, cell, path, rng):
    """w_ih None: x W_ih^T given; dx is dL/d(x W_ih^T), zero at padded steps."""
    lengths = np.array([2, 6, 1, 4])
    for t_start in (0, 2):
        check_recurrent(hosts[True], ref, cell, (6, 4, 3, 5), np.float64, t_start, rng, path=path,
                        lengths=lengths, projected=True)


@pytest.mark.parametrize("splits", [1, 2, 8])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("path", ["persistent", "cooperative"])
def test_one_launch_paths_blocks_and_splits(path, cell, splits, rng):
    """persistent: B=5 on a 2-SM device, 3 rows per block (the last block partial);
    cooperative: H=8 on a 3-SM device, 3 units per block; dot products split in 1, 2, 8
    parts. Lengths mixed, t_start 2 (the row of length 1 wholly before it)."""
    dtype = np.float64
    if path == "persistent":
        T, B, I, H, n_sm, per_block = 5, 5, 3, 6, 2, 3
        smem = max(_plan.persistent_smem_layout(cell, H, per_block, dtype, splits))
    else:
        T, B, I, H, n_sm, per_block = 5, 3, 3, 8, 3, 3
        smem = max(_plan.cooperative_smem_layout(cell, H, B, per_block, dtype, splits))
    be = host_emulation.host_backend(reverse=True, limits=(smem, n_sm))
    config.PATH = path
    assert be.engine.plan(cell, B, H, dtype) == (path, per_block, splits)
    lengths = np.array([4, 1, 5, 2, 3][:B])
    check_recurrent(be, ref, cell, (T, B, I, H), dtype, 2, rng, path=path, lengths=lengths)
    assert {c[1] for c in be.engine.launch.calls} == {-(-(B if path == "persistent" else H)
                                                        // per_block)}          # blocks


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", CELLS)
def test_lengths_all_T_bit_identical(hosts, cell, path, rng):
    """Every length T gives exactly what no lengths gives (the masks cost no rounding)."""
    for t_start in (0, 2):
        check_lengths_all_T(hosts[False], cell, (5, 3, 4, 5), np.float32, t_start, rng, path)


@pytest.mark.parametrize("cell", CELLS)
def test_general_path_graphs_replay_with_lengths(cell, rng):
    """The general path's graphs (HostReplay: the recorded loop re-run on the graph's own
    arrays, as a CUDA graph replays its baked-in addresses) with lengths changing between
    calls of one key, and calls without lengths before and after."""
    be = host_emulation.host_backend()
    check_graph_replays_with_lengths(be, ref, be.engine.graphs, cell, rng)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", CELLS)
def test_caches_with_lengths_cross_backends(hosts, cell, path, rng):
    """A reference cache made with lengths (moved field by field as a checkpoint stores it)
    drives this backend's backward, and this backend's cache the reference's."""
    check_caches_cross(hosts[True], ref, cell, (5, 4, 3, 4), np.array([5, 1, 3, 2]), 1, rng, path)


@pytest.mark.parametrize("cell", CELLS)
def test_bptt_layers_with_lengths_on_the_emulated_backend(monkeypatch, cell, rng, make_layer):
    """bptt's layer (2 layers) over the emulated backend, forward(x, lengths=...) and its
    backward (t_start 2, return_dh), matches the same layer over the reference backend on
    every path."""
    import bptt
    from bptt import backend as dispatch

    T, B, I, H = 6, 4, 3, 5
    with bptt.use_backend("reference"):
        want_layer = make_layer(cell, I, H, 2, True, np.float64, seed=3)
    host = host_emulation.host_backend(reverse=True)
    monkeypatch.setattr(dispatch, "_current", host)
    layer = make_layer(cell, I, H, 2, True, np.float64, seed=3)
    assert layer.backend is host
    layer.load_state_dict(want_layer.state_dict())
    x, dy = rng.standard_normal((T, B, I)), rng.standard_normal((T, B, H))
    for path in PATHS:
        config.PATH = path
        check_layers_with_lengths(layer, want_layer, x, dy, np.array([3, 6, 1, 4]), 2,
                                  f"{cell} {path}")
