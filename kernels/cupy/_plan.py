"""Path planning of the CuPy backend's recurrent layers: which of the three paths a call of
given sizes takes, and the shared-memory layouts and thread counts of the one-launch kernels.

* persistent: one block per slice of ``rows`` batch rows, W_hh in each block's shared memory;
* cooperative: one block per slice of ``units`` hidden units, W_hh spread over the shared
  memory of every SM, a grid barrier per step;
* general: the per-step GEMM and fused gate kernel (any size).

Pure arithmetic over the device's limits ``(opt-in shared memory bytes per block, SMs)``:
nothing here touches a GPU. The byte counts mirror the layouts at the top of
forward_/backward_persistent and forward_/backward_cooperative in recurrent.cu.
"""

import numpy as np

from bptt_kernels import GATES

from . import config

MAX_PERSISTENT_THREADS = 1024   # threads per block of the persistent and cooperative kernels


def ceil_div(a, b):
    return -(-a // b)


def persistent_smem_layout(cell, H, rows, dtype, splits=1):
    """(forward, backward) shared memory bytes per block of the persistent kernels.

    Forward: W_hh^T [G*H, H] + h [rows, H] + partial sums [splits, rows, G*H].
    Backward: W_hh [G*H, H] + dg [rows, G*H] + partial sums [splits, rows, H] + dc, dh_direct
    [rows, H] each.
    """
    gh = GATES[cell] * H
    forward = gh * H + rows * H + splits * rows * gh
    backward = gh * H + rows * gh + splits * rows * H + 2 * rows * H
    size = np.dtype(dtype).itemsize
    return forward * size, backward * size


def persistent_smem_bytes(cell, H, rows, dtype, splits=1):
    """Shared memory bytes per block the persistent kernels need: max of forward and backward."""
    return max(persistent_smem_layout(cell, H, rows, dtype, splits))


def persistent_max_hidden(cell, dtype, smem_limit, rows=1):
    """Largest H whose persistent kernels fit in ``smem_limit`` bytes (one split per dot)."""
    H = 0
    while persistent_smem_bytes(cell, H + 1, rows, dtype) <= smem_limit:
        H += 1
    return H


def persistent_splits(cell, H, rows, dtype, smem_limit):
    """Threads per dot product in the persistent kernels: the largest of 8, 4, 2, 1 that keeps
    splits * rows * H within one block of threads and the shared memory within the limit."""
    for splits in (8, 4, 2):
        if (splits * rows * H <= MAX_PERSISTENT_THREADS
                and persistent_smem_bytes(cell, H, rows, dtype, splits) <= smem_limit):
            return splits
    return 1


def cooperative_units(H, n_sm, wanted=None):
    """Hidden units per block of the cooperative kernels: ``wanted`` (config.COOPERATIVE_UNITS)
    where given, but never fewer than need no more blocks than SMs (every block must be
    resident at once), nor more than H."""
    fewest = ceil_div(H, n_sm)
    return fewest if wanted is None else max(fewest, min(H, int(wanted)))


def cooperative_smem_layout(cell, H, B, units, dtype, splits=1):
    """(forward, backward) shared memory bytes per block of the cooperative kernels.

    Forward: W_hh's rows of the block's units [H, odd(G*U)] + h [B, H] + partial sums
    [splits, B, G*U]. Backward: W_hh's columns of the block's units [G*H, odd(U)] + one gate's
    gradients [B, H] + partial sums [splits, B, U] + dc, dh_direct [B, U] each.
    """
    G, U = GATES[cell], units
    forward = H * (G * U | 1) + B * H + splits * B * G * U
    backward = G * H * (U | 1) + B * H + splits * B * U + 2 * B * U
    size = np.dtype(dtype).itemsize
    return forward * size, backward * size


def cooperative_splits(cell, H, B, units, dtype, smem_limit):
    """Threads per dot product in the cooperative kernels: the largest of 32, 16, .., 1 (at
    most H) that keeps splits * B * units within one block of threads and the shared memory
    within the limit; None where nothing fits."""
    for splits in (32, 16, 8, 4, 2, 1):
        if ((splits <= H or splits == 1) and splits * B * units <= MAX_PERSISTENT_THREADS
                and max(cooperative_smem_layout(cell, H, B, units, dtype, splits)) <= smem_limit):
            return splits
    return None


def plan(cell, B, H, dtype, limits):
    """("persistent", rows per block, splits per dot), ("cooperative", units per block,
    splits per dot) or ("general", 0, 0) for these sizes on a device of ``limits``
    (shared memory bytes per block, SMs), as config.PATH and its size rules say."""
    mode = config.PATH
    if mode not in config.PATHS:
        raise ValueError(f"bptt_kernels.cupy.config.PATH must be one of {config.PATHS}, "
                         f"got {mode!r}")
    if mode == "general":
        return "general", 0, 0
    smem_limit, n_sm = limits
    if mode == "cooperative":
        return _cooperative_plan(cell, B, H, dtype, limits, required=True)
    rows = max(1, ceil_div(B, n_sm))  # one block per SM at most, every block `rows` rows
    need = persistent_smem_bytes(cell, H, rows, dtype)
    fits = need <= smem_limit
    if mode == "persistent" and not fits:
        raise ValueError(
            f"the persistent {cell} kernel needs {need} bytes of shared memory per block "
            f"for H={H}, B={B} ({rows} rows per block, {np.dtype(dtype).name}); this "
            f"device allows {smem_limit} (largest H at 1 row per block: "
            f"{persistent_max_hidden(cell, dtype, smem_limit)}). Use config.PATH = "
            f"'auto' or 'general'")
    if mode == "persistent" or (fits and B <= config.PERSISTENT_MAX_BATCH):
        return "persistent", rows, persistent_splits(cell, H, rows, dtype, smem_limit)
    if B * H <= config.COOPERATIVE_MAX_STATE and B >= config.COOPERATIVE_MIN_BATCH:
        return _cooperative_plan(cell, B, H, dtype, limits, required=False)
    return "general", 0, 0


def _cooperative_plan(cell, B, H, dtype, limits, required):
    smem_limit, n_sm = limits
    units = cooperative_units(H, n_sm, config.COOPERATIVE_UNITS)
    splits = cooperative_splits(cell, H, B, units, dtype, smem_limit)
    if splits is not None:
        return "cooperative", units, splits
    if not required:
        return "general", 0, 0
    need = max(cooperative_smem_layout(cell, H, B, units, dtype))
    raise ValueError(
        f"the cooperative {cell} kernel needs {B * units} threads and {need} bytes of shared "
        f"memory per block for H={H}, B={B} ({units} units in each of {ceil_div(H, units)} "
        f"blocks, {np.dtype(dtype).name}); this device allows {MAX_PERSISTENT_THREADS} and "
        f"{smem_limit} on each of its {n_sm} SMs. Use config.PATH = 'auto' or 'general'")
