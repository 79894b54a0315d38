"""The cpu backend's BLAS providers (``kernels/cpu/_blas.py``): ``BPTT_BLAS=auto|openblas|mkl``.

* The setting: a bad value of ``BPTT_BLAS`` or ``config.BLAS`` fails at the next layer call in
  one line, as does ``mkl`` where MKL is not usable; ``auto`` picks MKL only where it is
  installed and the CPU is Intel's, says so on stderr once, and explicit settings say nothing.
* Under MKL (the ``mkl`` extra; skipped where it is not installed), in a fresh process with
  ``BPTT_BLAS=mkl`` (MKL loaded into this process would stay for the rest of the session):
  the per-step products through MKL's packed W_hh on every path of ``step_weight`` against
  NumPy; every cell's kernels with packed weights (time loops split by batch rows and by hidden
  units, lengths, t_start inside) against the float64 reference with NaN-poisoned buffers, and
  layers against torch's packed sequences; MKL on one thread inside layer calls, the caller's
  setting back after; and a representative subset of the existing cpu test modules.
"""

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

import bptt_kernels.cpu as cpu
from bptt_kernels import CELLS, GATES
from bptt_kernels.cpu import _blas, _loop, _mkl, _panels, config
from helpers import force_unit_split, random_layer_problem
from test_cpu_kernels import STEP_CASES
from test_lengths import check_cpu_against_reference, poisoned_buffers  # noqa: F401 (fixture)
from test_lengths import test_layer_matches_torch_packed as layer_matches_torch_packed

TESTS = os.path.dirname(os.path.abspath(__file__))
UNDER_MKL = os.environ.get("BPTT_BLAS", "").strip().lower() == "mkl"


# ---------------------------------------------------------------------------------------------
# the setting
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_choice(monkeypatch):
    """The next layer call reads the setting again; the provider of before is back after."""
    before = _blas._chosen
    monkeypatch.setattr(_blas, "_chosen", (None, before[1]))
    monkeypatch.delenv("BPTT_BLAS", raising=False)
    yield
    config.reset()
    monkeypatch.undo()
    _blas._install(before[1])


SMALL_LAYER_CALL = """
p = random_layer_problem(np.random.default_rng(0), "lstm", 3, 2, 4, 5, np.float32)
cpu.lstm_forward(p["x"], p["state"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])
"""


def small_layer_call():
    """One small cpu LSTM forward (a layer call, which reads the setting first)."""
    exec(SMALL_LAYER_CALL, {"np": np, "cpu": cpu, "random_layer_problem": random_layer_problem})


@pytest.mark.usefixtures("fresh_choice")
@pytest.mark.parametrize("where", ["BPTT_BLAS", "config.BLAS"])
def test_bad_setting_fails_in_one_line(where, monkeypatch):
    if where == "BPTT_BLAS":
        monkeypatch.setenv("BPTT_BLAS", "fastest")
    else:
        config.BLAS = "fastest"
    in_table = _blas.provider()
    with pytest.raises(ValueError) as e:
        small_layer_call()
    assert str(e.value) == f"{where} must be one of auto, openblas, mkl; got 'fastest'"
    assert _blas.provider() is in_table


@pytest.mark.usefixtures("fresh_choice")
def test_mkl_asked_for_but_unusable_fails_in_one_line(monkeypatch):
    def unusable():
        raise ImportError("Intel MKL (libmkl_rt) is not usable here; install it with "
                          "pip install 'bptt[mkl]'. Tried: libmkl_rt.so.3: not found")
    monkeypatch.setattr(_mkl, "load", unusable)
    monkeypatch.setenv("BPTT_BLAS", " MKL ")             # case and spaces do not matter
    with pytest.raises(RuntimeError) as e:
        small_layer_call()
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("BPTT_BLAS=mkl: Intel MKL") and "pip install 'bptt[mkl]'" in message


@pytest.mark.parametrize("vendor, mkl_usable, picked", [
    ("GenuineIntel", True, "mkl"), ("GenuineIntel", False, "openblas"),
    ("AuthenticAMD", True, "openblas"), ("", True, "openblas")])
def test_auto_rule(vendor, mkl_usable, picked, monkeypatch):
    """auto: MKL where it is usable and the CPU is Intel's; OpenBLAS on any other CPU (its
    panels beat MKL's packed GEMM on AMD EPYC) or without MKL (with a hint to install it)."""
    fake_mkl = _blas.Provider("mkl", "oneMKL (fake)", {})

    def mkl_provider():
        if not mkl_usable:
            raise ImportError("not installed")
        return fake_mkl
    monkeypatch.setattr(_blas, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(_blas, "_mkl_provider", mkl_provider)
    provider, why = _blas._choose("auto")
    assert provider.name == picked
    assert why.startswith(f"{vendor or 'unknown'} CPU")
    if vendor == "GenuineIntel" and not mkl_usable:
        assert "pip install 'bptt[mkl]'" in why
    assert _blas._choose("openblas")[0] is _blas.OPENBLAS


def fresh_process_choice(setting):
    """(stderr lines, provider name) of a fresh process running three layer calls with
    BPTT_BLAS=setting (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "BPTT_BLAS"}
    if setting is not None:
        env["BPTT_BLAS"] = setting
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import numpy as np, bptt_kernels.cpu as cpu\n"
            "from bptt_kernels.cpu import _blas\n"
            "from helpers import random_layer_problem\n"
            + SMALL_LAYER_CALL * 3 + "print(_blas.provider().name)")
    r = subprocess.run([sys.executable, "-c", code, TESTS], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stderr.splitlines(), r.stdout.split()[-1]


@pytest.mark.parametrize("setting", [None, "auto"], ids=["unset", "auto"])
def test_auto_says_once_what_it_picked(setting):
    lines, picked = fresh_process_choice(setting)
    said = [line for line in lines if "BPTT_BLAS" in line]
    assert len(said) == 1 and said[0].startswith(f"bptt: BPTT_BLAS=auto picked '{picked}' ("), lines
    if _blas.cpu_vendor() != "GenuineIntel":
        assert picked == "openblas"


def test_explicit_setting_says_nothing():
    lines, picked = fresh_process_choice("openblas")
    assert picked == "openblas" and not [line for line in lines if "BPTT_BLAS" in line], lines


# ---------------------------------------------------------------------------------------------
# under MKL: in a fresh process with BPTT_BLAS=mkl
# ---------------------------------------------------------------------------------------------

# the existing checks that run again under MKL (besides this module's own MKL tests)
UNDER_MKL_TOO = [
    "test_cpu_kernels.py::test_cell_matches_reference",
    "test_lengths.py::test_cpu_matches_reference_split_by_rows",
    "test_lengths.py::test_cpu_matches_reference_split_by_units",
    "test_lengths.py::test_layer_matches_torch_packed",
    "test_torch_parity.py::test_matches_torch_autograd",
    "test_gradcheck.py",
    "test_reference_parity.py::test_recurrent_kernels_match_reference",
]


def mkl_missing():
    """Why MKL cannot be loaded here (tried in a fresh process), or None."""
    r = subprocess.run([sys.executable, "-c", "from bptt_kernels.cpu import _mkl; _mkl.load()"],
                       capture_output=True, text=True, timeout=120)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]


@pytest.mark.skipif(UNDER_MKL, reason="this process runs under BPTT_BLAS=mkl itself")
def test_under_mkl_in_a_fresh_process():
    why = mkl_missing()
    if why:
        pytest.skip(f"MKL is not installed (pip install 'bptt[mkl]'): {why}")
    env = {**os.environ, "BPTT_BLAS": "mkl"}
    args = [os.path.join(TESTS, "test_blas_provider.py")] + [
        os.path.join(TESTS, t) for t in UNDER_MKL_TOO]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                       env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


needs_mkl_process = pytest.mark.skipif(
    not UNDER_MKL, reason="runs under BPTT_BLAS=mkl (test_under_mkl_in_a_fresh_process)")


@pytest.fixture
def mkl():
    """MKL in the table (BPTT_BLAS=mkl; fails where MKL is not usable)."""
    assert _blas.use_provider().name == "mkl"
    return _mkl.loaded()


def mkl_threads_here(mkl):
    """MKL's thread count for the calling thread."""
    return int(ctypes.CDLL(mkl.path).MKL_Get_Max_Threads())


@needs_mkl_process
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"{c[-1]}-B{c[1]}-K{c[4]}")
def test_packed_step_product_matches_numpy(dtype, beta, case, mkl):
    """step_product through MKL's packed W_hh where the OpenBLAS provider would use panels
    (w in place otherwise, through MKL's sgemm/sgemv): exactly the piece's rows and columns,
    a NaN-poisoned output never read with beta = 0."""
    by_units, B, b0, b1, K, blocks, H, j0, j1, transposed, path = case
    rng = np.random.default_rng(B * 1000 + K + j0)
    a = rng.standard_normal((B, K)).astype(dtype)
    w = rng.standard_normal((blocks * H, K)).astype(dtype)
    sw = _panels.step_weight(np.ascontiguousarray(w.T) if transposed else w, transposed, blocks,
                           H, b0, b1, j0, j1, by_units)
    packs = path in ("panels", "16-wide", "one panel") and j1 > j0
    assert sw.width == 0 and bool(sw.packed.size) == packs
    if packs:                                       # one packed segment per gate block
        assert sw.packed_size % _panels.PACK_ALIGN == 0
        assert sw.packed.size == (blocks if by_units else 1) * sw.packed_size
    c0 = rng.standard_normal((B, blocks * H)).astype(dtype)
    c = np.full_like(c0, np.nan) if beta == 0.0 else c0.copy()
    _panels.step_product(a, sw, c, beta)
    full = a.astype(np.float64) @ w.T.astype(np.float64) + (beta * c0 if beta else 0.0)
    mine = np.zeros((B, blocks * H), bool)
    for g in range(blocks):
        mine[b0:b1, g * H + j0:g * H + j1] = True
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert np.max(np.abs(c[mine] - full[mine]), initial=0) <= tol * np.max(np.abs(full))
    assert (np.isnan(c[~mine]).all() if beta == 0.0 else np.array_equal(c[~mine], c0[~mine]))


@needs_mkl_process
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("split", ["rows", "units"])
@pytest.mark.parametrize("cell", CELLS)
def test_kernels_with_packed_weights_match_reference(cell, split, dtype, mkl, poisoned_buffers,
                                                      monkeypatch):
    """Two pieces (3 batch rows each, or all 6 rows and 10 / 9 units), T = 10 steps: both time
    loops multiply by MKL's packed W_hh; lengths mixed, t_start 0 and inside."""
    T, B, I, H = 10, 6, 5, 19
    if split == "units":
        force_unit_split(monkeypatch, 2)
        rows, units = (0, B), (0, 10)
    else:
        monkeypatch.setattr(_loop, "THREADS", 2)
        monkeypatch.setattr(_loop, "MIN_WORK_FOR_THREADS", 0)
        for threshold in ("UNIT_SPLIT_WEIGHT_FEW_ROWS", "UNIT_SPLIT_WEIGHT"):
            monkeypatch.setattr(_loop, threshold, 1 << 40)
        rows, units = (0, B // 2), (0, H)
    G = GATES[cell]
    w_hh = np.ones((G * H, H), dtype)
    assert _panels.step_weight(w_hh, False, G, H, *rows, *units, split == "units").packed.size
    assert _panels.step_weight(w_hh, True, 1, H, *rows, *units, split == "units").packed.size
    check_cpu_against_reference(cell, dtype, T, B, I, H, np.array([10, 3, 10, 1, 7, 9]), (0, 4),
                                seed=[CELLS.index(cell), len(split)])


@needs_mkl_process
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell", CELLS)
def test_layers_with_packed_weights_match_torch(cell, dtype, mkl, rng, make_layer, monkeypatch):
    """2-layer stacks, T = 12, 8 rows in two pieces of 4 (packed W_hh in both directions),
    lengths mixed, against torch's packed sequences (test_lengths)."""
    monkeypatch.setattr(_loop, "THREADS", 2)
    monkeypatch.setattr(_loop, "MIN_WORK_FOR_THREADS", 0)
    import bptt
    with bptt.use_backend("cpu") as backend:
        layer_matches_torch_packed(backend, cell, (12, 8, 5, 9, 2, True, "mixed", True), dtype,
                                   rng, make_layer)


@needs_mkl_process
@pytest.mark.parametrize("workers", [1, 2])
def test_mkl_on_one_thread_inside_layer_calls(workers, mkl, monkeypatch):
    """Inside a layer call every piece sees MKL at one thread (its own per-thread setting);
    after it, the calling thread has its own setting back."""
    monkeypatch.setattr(_loop, "THREADS", workers)
    monkeypatch.setattr(_loop, "MIN_WORK_FOR_THREADS", 0)
    seen = []
    run_piece = _loop._on_one_blas_thread

    def watched(kernel):
        return lambda *args: (seen.append(("worker", mkl_threads_here(mkl))), kernel(*args))[1]
    monkeypatch.setattr(_loop, "_on_one_blas_thread",            # a worker's piece
                        lambda kernel, *args: run_piece(watched(kernel), *args))
    run_parts = _loop.run_parts                                 # the caller's time loop
    monkeypatch.setattr(_loop, "run_parts", lambda *a, **kw: (
        seen.append(("caller", mkl_threads_here(mkl))), run_parts(*a, **kw))[1])
    previous = mkl.set_threads_here(3)
    try:
        small_layer_call()
        assert mkl_threads_here(mkl) == 3
    finally:
        mkl.set_threads_here(previous)
    assert {count for _, count in seen} == {1}, seen
    assert {where for where, _ in seen} == ({"caller", "worker"} if workers > 1 else {"caller"})
