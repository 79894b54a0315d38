"""Importing the library changes nothing in the process: OpenBLAS keeps the thread count the
user gave it (the CPU backend runs its own BLAS calls on one OpenBLAS thread, and only inside
those calls), and glibc's malloc keeps its thresholds until a training loop asks for the
backend's settings (``bptt_kernels.cpu._memory.keep_freed_memory``).

The import checks run in fresh processes, with OpenBLAS started at 2 threads so that a
change to 1 shows.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import random_layer_problem

threadpoolctl = pytest.importorskip("threadpoolctl")


def run_fresh(code, **env_changes):
    """(returncode, stdout lines, stderr) of ``python -c code`` with OPENBLAS_NUM_THREADS=2 and
    no BPTT_* thread or memory settings, plus ``env_changes`` (a value None removes it)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("BPTT_NUM_THREADS", "BPTT_KEEP_FREED_MEMORY")}
    env.update(OPENBLAS_NUM_THREADS="2", BPTT_BACKEND="cpu")
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    return r.returncode, r.stdout.split(), r.stderr


# ---------------------------------------------------------------------------------------------
# BLAS threads
# ---------------------------------------------------------------------------------------------

IMPORT_AND_CALL = """
import numpy, threadpoolctl
a = threadpoolctl.threadpool_info()
import bptt
bptt.LSTM(8, 8)
import bptt_kernels.cpu
assert threadpoolctl.threadpool_info() == a, (a, threadpoolctl.threadpool_info())
import numpy as np
rng = np.random.default_rng(0)
x = rng.standard_normal((5, 3, 4))
w_ih, w_hh = rng.standard_normal((32, 4)), rng.standard_normal((32, 8))
b = numpy.zeros(32)
h0 = numpy.zeros((3, 8))
bptt_kernels.cpu.lstm_forward(x, (h0, h0), w_ih, w_hh, b, b)
bptt_kernels.cpu.linear_forward(x.reshape(15, 4), w_ih, b)
# Numba's own array math loads scipy's OpenBLAS on first use (at its default, 2 here)
after = {lib["filepath"]: lib["num_threads"] for lib in threadpoolctl.threadpool_info()}
assert all(after[lib["filepath"]] == lib["num_threads"] for lib in a), (a, after)
assert set(after.values()) == {2}, after
print(*sorted({lib["num_threads"] for lib in a}))
"""


def test_import_and_layer_calls_leave_blas_threads_alone():
    rc, out, err = run_fresh(IMPORT_AND_CALL)
    assert rc == 0, err
    assert out == ["2"]


def threads_in_fresh_process(setting):
    """(returncode, [THREADS, OpenBLAS thread count after import], stderr) of a fresh process
    importing the backend with BPTT_NUM_THREADS=setting (None: unset)."""
    return run_fresh("from bptt_kernels.cpu import _loop, _blas; "
                     "print(_loop.THREADS, _blas.blas_threads())", BPTT_NUM_THREADS=setting)


@pytest.mark.parametrize("setting, threads", [(None, "2"), ("3", "3")])
def test_import_reads_thread_count_and_leaves_openblas_alone(setting, threads):
    """The pieces a large layer call runs in: OpenBLAS's thread count at import, or
    BPTT_NUM_THREADS; OpenBLAS keeps its count."""
    rc, out, err = threads_in_fresh_process(setting)
    assert rc == 0, err
    assert out == [threads, "2"]


def test_bad_thread_setting_is_a_clear_error():
    rc, out, err = threads_in_fresh_process("two")
    assert rc != 0 and "BPTT_NUM_THREADS must be a positive integer" in err


@pytest.fixture
def blas_at_two_threads():
    """OpenBLAS (and any other BLAS) at 2 threads for the test, the earlier setting after."""
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        yield


def blas_counts():
    return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]


@pytest.mark.parametrize("workers", [1, 2])
def test_layer_calls_run_blas_on_one_thread_inside(workers, blas_at_two_threads, monkeypatch):
    """Inside a recurrent layer call and the output layer's GEMMs OpenBLAS runs on one thread
    (seen from the code that hands the pieces out); after them it is back at 2."""
    from bptt_kernels import cpu
    from bptt_kernels.cpu import _blas, _loop, linear
    assert _blas.blas_threads() == 2
    monkeypatch.setattr(_loop, "THREADS", workers)
    monkeypatch.setattr(_loop, "MIN_WORK_FOR_THREADS", 0)
    seen = []

    def watching(run_parts):
        def run(*args, **kwargs):
            seen.append(_blas.blas_threads())
            return run_parts(*args, **kwargs)
        return run
    monkeypatch.setattr(_loop, "run_parts", watching(_loop.run_parts))
    monkeypatch.setattr(linear, "run_parts", watching(linear.run_parts))

    p = random_layer_problem(np.random.default_rng(workers), "lstm", 6, 3, 4, 5, np.float32)
    y, _, cache = cpu.lstm_forward(p["x"], p["state"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])
    grads = tuple(g.copy() for g in p["grads0"])
    cpu.lstm_backward(p["dy"], p["dfinal"], cache, p["w_ih"], p["w_hh"], *grads)
    layer_calls = len(seen)
    assert layer_calls >= 2, "the layer calls' pieces were not seen"
    w, b = p["w_hh"], p["b_ih"]                  # [20, 5], [20]: an output layer on y
    out = cpu.linear_forward(y.reshape(-1, 5), w, b)
    cpu.linear_backward(np.ones_like(out), y.reshape(-1, 5), w, np.zeros_like(w), np.zeros_like(b))
    assert len(seen) == layer_calls + 2, "the output layer's pieces were not seen"
    assert seen == [1] * len(seen), f"OpenBLAS thread counts inside the calls: {seen}"
    assert _blas.blas_threads() == 2 and blas_counts() and set(blas_counts()) == {2}


def test_overlapping_layer_blocks_restore_the_first_setting(blas_at_two_threads):
    """Blocks of two Python threads that overlap (entered A, B, left A, B): OpenBLAS stays at
    one thread until the last one leaves, then gets the count from before the first."""
    from bptt_kernels.cpu import _blas
    from bptt_kernels.cpu._loop import layer_threads
    a, b = layer_threads(0), layer_threads(0)
    a.__enter__()
    assert _blas.blas_threads() == 1
    b.__enter__()
    a.__exit__(None, None, None)
    assert _blas.blas_threads() == 1, "left while another block was still running"
    b.__exit__(None, None, None)
    assert _blas.blas_threads() == 2


def test_layer_block_left_by_an_exception_restores_blas_threads(blas_at_two_threads):
    from bptt_kernels.cpu import _blas
    from bptt_kernels.cpu._loop import layer_threads
    with pytest.raises(ZeroDivisionError):
        with layer_threads(0):
            1 / 0
    assert _blas.blas_threads() == 2


# ---------------------------------------------------------------------------------------------
# malloc
# ---------------------------------------------------------------------------------------------

# In the fresh process every function looked up in a shared library through ctypes is
# recorded, so a call of glibc's mallopt shows (the backend reaches it only through ctypes).
SPY = """
import ctypes
looked_up = []
_getitem = ctypes.CDLL.__getitem__
def _spy(self, name):
    looked_up.append(name)
    return _getitem(self, name)
ctypes.CDLL.__getitem__ = _spy
"""

IMPORT_THEN_KEEP = SPY + """
import bptt, bptt_kernels.cpu
from bptt_kernels.cpu import _memory
bptt.LSTM(8, 8)
print(looked_up.count("mallopt"), _memory.KEEPS_FREED_MEMORY, bptt_kernels.cpu.keep_freed_memory is _memory.keep_freed_memory)
print(_memory.keep_freed_memory(), looked_up.count("mallopt"))
print(_memory.keep_freed_memory(), looked_up.count("mallopt"))
"""


@pytest.fixture
def glibc():
    if not hasattr(__import__("ctypes").CDLL(None), "mallopt"):
        pytest.skip("libc without mallopt (not glibc)")


def test_import_leaves_malloc_alone_until_asked(glibc):
    """No mallopt at import; keep_freed_memory() applies the settings, once."""
    rc, out, err = run_fresh(IMPORT_THEN_KEEP)
    assert rc == 0, err
    assert out[:3] == ["0", "False", "True"], "mallopt was called at import"
    assert out[3:] == ["True", "1", "True", "1"]


FIT_THEN_COUNT = SPY + """
import numpy as np, bptt
bptt.use_backend("cpu")
model = bptt.LanguageModel(7, 4, 8, seed=0)
print(looked_up.count("mallopt"))
trainer = bptt.Trainer(model, bptt.SGD(0.1), k1=5)
trainer.fit(np.random.default_rng(0).integers(0, 7, 200), batch_size=2, max_steps=1)
print(looked_up.count("mallopt"))
"""


def test_training_on_cpu_keeps_freed_memory(glibc):
    """Trainer.fit on the cpu backend applies the malloc settings (building a model does not)."""
    rc, out, err = run_fresh(FIT_THEN_COUNT)
    assert rc == 0, err
    assert out == ["0", "1"]


def test_keep_freed_memory_at_import_when_told(glibc):
    """BPTT_KEEP_FREED_MEMORY=1: the settings are applied at import already."""
    rc, out, err = run_fresh(IMPORT_THEN_KEEP, BPTT_KEEP_FREED_MEMORY="1")
    assert rc == 0, err
    assert out == ["1", "True", "True", "True", "1", "True", "1"]


def test_keep_freed_memory_never_when_told(glibc):
    """BPTT_KEEP_FREED_MEMORY=0: malloc is left alone, also when a training loop asks."""
    rc, out, err = run_fresh(IMPORT_THEN_KEEP, BPTT_KEEP_FREED_MEMORY="0")
    assert rc == 0, err
    assert out == ["0", "False", "True", "False", "0", "False", "0"]
