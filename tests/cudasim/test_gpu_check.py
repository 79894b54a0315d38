"""Pieces of perf/gpu_check.py (the one-shot GPU script) run under the CUDA simulator with the
cuda backend and tiny sizes, so the script is known to work before a GPU is lent: the parity
check against the reference and against torch.nn (on the CPU here), the op checks, the table."""

import importlib.util
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "perf", "gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cell,path", [("lstm", "persistent"), ("gru", "general")])
def test_check_recurrent_against_reference_and_torch(gpu_check, cuda, ref, rng, cell, path):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    res = gpu_check.check_recurrent(cuda, ref, cell, (3, 2, 3, 4), np.float64, 0, rng,
                                    path=path, torch_device="cpu")
    assert res["ok"], res
    assert res["vs_reference"] <= 1e-10 and res["vs_torch"] <= 1e-10
    res = gpu_check.check_recurrent(cuda, ref, cell, (3, 2, 3, 4), np.float32, 1, rng, path=path)
    assert res["ok"] and "vs_torch" not in res, res


def test_check_recurrent_reports_a_wrong_kernel(gpu_check, cuda, ref, rng, monkeypatch):
    """The script's check can fail: a backend whose forward output is off is caught."""
    real = cuda.rnn_tanh_forward

    def off_by_a_bit(*args):
        y, final, cache = real(*args)
        y[0, 0, 0] += 1e-6
        return y, final, cache

    monkeypatch.setattr(cuda, "rnn_tanh_forward", off_by_a_bit)
    res = gpu_check.check_recurrent(cuda, ref, "rnn_tanh", (2, 2, 3, 4), np.float64, 0, rng)
    assert not res["ok"] and res["vs_reference"] > 1e-10


def test_check_ops_and_table(gpu_check, cuda, ref, rng):
    checks = gpu_check.check_ops(cuda, ref, rng, np.float64, small=True)
    assert len(checks) == 5 and all(c["ok"] for c in checks), checks
    rows = [{"cell": "lstm", "T": 100, "B": 8, "H": 128, "torch_ms": 2.0, "cuda_ms": 1.0,
             "cuda_ratio": 0.5, "cuda_gflops": 123.0, "cuda_path": "general"}]
    e2e = [{"backend": "cuda", "rc": 0, "wall_s": 3.2, "last_line": "{}"}]
    path_rows = [{"cell": "gru", "T": 100, "B": 1, "H": 64, "cuda_persistent_ms": 0.7,
                  "cuda_general_ms": 3.1, "cuda_auto": "persistent"}]
    table = gpu_check.format_table(checks, rows, e2e, {"cupy": "no GPU"}, 50.0, path_rows)
    assert "5/5 checks passed" in table and "0.50" in table and "skipped backend cupy" in table
    assert "3.100" in table and "persi" in table
