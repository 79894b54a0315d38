"""The Numba-CUDA backend and variable-length batches, under the CUDA simulator: ``lengths``
is checked like on every backend, then refused (not implemented on this backend yet), in
forward and for a cache made with lengths on another backend."""

import numpy as np
import pytest

from helpers import random_layer_problem

MESSAGE = "lengths on the cuda backend: not yet; use the cpu or reference backend"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cuda_refuses_lengths(cuda, ref, cell):
    p = random_layer_problem(np.random.default_rng(4), cell, 3, 2, 4, 5, np.float32)
    d = {k: tuple(cuda.asarray(a, a.dtype) for a in v) if isinstance(v, tuple)
         else cuda.asarray(v, v.dtype) for k, v in p.items()}
    args = (d["x"], d["state"], d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"])
    fwd, bwd = getattr(cuda, f"{cell}_forward"), getattr(cuda, f"{cell}_backward")
    with pytest.raises(NotImplementedError, match=MESSAGE):
        fwd(*args, lengths=np.array([3, 1]))
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 3\], got 4 at row 0"):
        fwd(*args, lengths=np.array([4, 1]))
    _, _, cache = getattr(ref, f"{cell}_forward")(p["x"], p["state"], p["w_ih"], p["w_hh"],
                                                 p["b_ih"], p["b_hh"], lengths=np.array([3, 1]))
    foreign = cache._replace(**{f: cuda.asarray(a, a.dtype) for f, a in cache._asdict().items()
                                if isinstance(a, np.ndarray) and f != "lengths"})
    grads = [cuda.asarray(g, g.dtype) for g in p["grads0"]]
    with pytest.raises(NotImplementedError, match=MESSAGE):
        bwd(d["dy"], None, foreign, d["w_ih"], d["w_hh"], *grads)
