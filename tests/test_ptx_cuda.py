"""Every Numba-CUDA kernel of bptt_kernels.cuda compiles to PTX for sm_90 (no GPU needed).

Runs in the normal (CPU) pytest process, never under the simulator: the simulator does not
compile anything, so only this test catches a kernel Numba cannot type or lower. Where
``ptxas`` is on the PATH, each PTX is also assembled for sm_90 and its registers and spills are
printed (a report, not an assertion). Skips, saying why, only where numba-cuda's compiler
libraries (NVVM) are absent.
"""

import itertools
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("PTX checks need the real CUDA target; NUMBA_ENABLE_CUDASIM=1 is set",
                allow_module_level=True)

cuda_numba = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
from numba import types  # noqa: E402

CC = (9, 0)
_REPORT = []


def _compiler_missing_reason():
    """None if compile_ptx works here, else why not (only a missing compiler library)."""
    def trivial(a):
        a[0] = 1
    try:
        cuda_numba.compile_ptx(trivial, (types.float32[::1],), cc=CC)
    except Exception as e:  # noqa: BLE001 -- inspected below
        text = f"{type(e).__name__}: {e}"
        if re.search(r"nvvm|nvrtc|libdevice|CudaSupportError|NvvmSupportError", text, re.I):
            return text
        raise
    return None


_reason = _compiler_missing_reason()
if _reason is not None:
    print(f"\ntest_ptx_cuda: skipped, numba-cuda compiler libraries unavailable: {_reason}",
          file=sys.stderr)
    pytest.skip(f"numba-cuda compiler libraries unavailable: {_reason}", allow_module_level=True)

from bptt_kernels.cuda import cells, gemm, ops  # noqa: E402  (real target: xp is cupy)

i64, f64, b1 = types.int64, types.float64, types.boolean


def _arr(dtype, ndim):
    return types.Array(types.float32 if dtype == np.float32 else types.float64, ndim, "C")


def _kernels():
    """(id, python function, signature) of every kernel, as the drivers launch them."""
    out = []
    for dtype in (np.float32, np.float64):
        d = "f32" if dtype == np.float32 else "f64"
        A1, A2, A3 = (_arr(dtype, n) for n in (1, 2, 3))
        # each recurrent kernel without lengths (steps None) and masked (steps int32 [B])
        for cell, (masked, S) in itertools.product(cells.POINTS, ((False, types.none),
                                                                  (True, types.int32[::1]))):
            fwd, bwd = cells.gate_kernels(cell, masked)
            pfwd, pbwd = cells.persistent_kernels(cell, dtype, masked)
            m = ".masked" if masked else ""
            out += [
                (f"{cell}.gates_forward{m}.{d}", fwd.py_func,
                 (i64, S, A3, A1, A1, A1, A3, A3, A3, A3)),
                (f"{cell}.gates_backward{m}.{d}", bwd.py_func,
                 (i64, S, A3, A1, A1, A3, A3, A3, A3, A3, A3, A3)),
                (f"{cell}.persistent_forward{m}.{d}", pfwd.py_func,
                 (S, A3, A1, A1, A2, A3, A3, A3, A3)),
                (f"{cell}.persistent_backward{m}.{d}", pbwd.py_func,
                 (S, A3, A2, A1, A2, A3, A3, A3, A3, A3, A3, A3, i64, A2)),
            ]
        out += [
            (f"gemm.tile16.{d}", gemm._gemm_kernel(16, dtype).py_func, (A2, A2, A2, b1, b1, b1)),
            (f"softmax_xent.{d}", ops._softmax_xent_kernel(256, dtype).py_func,
             (A2, types.int64[::1], A2, f64, types.float64[::1])),
            (f"gather.{d}", ops._gather_kernel.py_func, (A2, types.int64[::1], A2)),
            (f"scatter_add.{d}", ops._scatter_add_kernel.py_func, (A2, types.int64[::1], A2)),
            (f"sgd.{d}", ops._sgd_kernel.py_func, (A1, A1, A1, f64, f64, f64, b1, b1)),
            (f"adam.{d}", ops._adam_kernel.py_func, (A1, A1, A1, A1) + (f64,) * 6),
            (f"sum_squares.{d}", ops._sum_squares_kernel(256).py_func, (A1, types.float64[::1])),
            (f"scale.{d}", ops._scale_kernel.py_func, (A1, f64)),
        ]
    return out


def _max_registers(name):
    """The register cap a kernel is jitted with (the persistent kernels'), for ptxas."""
    return cells.PERSISTENT_JIT_OPTIONS.get("max_registers") if ".persistent_" in name else None


KERNELS = _kernels()
# kernels that accumulate or take their scalars in float64 on purpose (losses, norms, optimizers)
_F64_BY_DESIGN = ("softmax_xent", "sgd", "adam", "sum_squares", "scale")


def _ptxas_usage(ptx, tmp_path, max_registers=None):
    """(registers, spill stores + loads in bytes) from ptxas -v, or None without ptxas."""
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        return None
    src = tmp_path / "k.ptx"
    src.write_text(ptx)
    cap = [f"-maxrregcount={max_registers}"] if max_registers else []
    res = subprocess.run([ptxas, f"-arch=sm_{CC[0]}{CC[1]}", "-v", *cap, str(src), "-o", os.devnull],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"ptxas rejected the PTX:\n{res.stderr[-2000:]}"
    regs = re.findall(r"Used (\d+) registers", res.stderr)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    return (int(regs[-1]) if regs else None,
            sum(int(a) + int(b) for a, b in spills))


class _OfflineDevice:
    """Stands in for the current device while compiling offline: numba-cuda compiles the
    device functions a kernel calls for ``get_current_device().compute_capability``, which
    needs a driver; compile_ptx itself takes the target ``cc``."""
    compute_capability = CC


@pytest.fixture(scope="module", autouse=True)
def _offline_device():
    import numba.cuda.dispatcher as dispatcher
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dispatcher, "get_current_device", _OfflineDevice)
        yield


def test_numpy_alias_lent_to_the_compiler_only():
    """numba-cuda 0.30 overloads np.row_stack when it first compiles; under a NumPy without it
    (2.5, imitated here) a compile fails, unless the backend's import, which lends the alias
    to numba-cuda's overload module only, came first; NumPy keeps no row_stack afterwards."""
    numpy_without = ("import numpy as np\n"
                     "if hasattr(np, 'row_stack'):\n"
                     "    del np.row_stack\n"
                     "    np.__all__ = [n for n in np.__all__ if n != 'row_stack']\n")
    compile_one = ("from numba import cuda, types\n"
                   "import numba.cuda.dispatcher as d\n"
                   "d.get_current_device = type('Device', (), {'compute_capability': (9, 0)})\n"
                   "def k(a):\n"
                   "    a[0] = 1\n"
                   "ptx, _ = cuda.compile_ptx(k, (types.float32[::1],), cc=(9, 0))\n"
                   "assert '.entry' in ptx and not hasattr(np, 'row_stack')\n"
                   "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}

    def run(code):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, timeout=300)

    res = run(numpy_without + "import bptt_kernels.cuda\n"
              "assert not hasattr(np, 'row_stack'), 'the import left np.row_stack'\n"
              + compile_one)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    bare = run(numpy_without + compile_one)  # without the backend: the failure it works around
    if bare.returncode == 0:
        pytest.skip("this numba-cuda compiles without np.row_stack: the alias is no longer needed")
    assert "row_stack" in bare.stderr, bare.stderr[-2000:]


@pytest.mark.parametrize("name,fn,sig", KERNELS, ids=[k[0] for k in KERNELS])
def test_kernel_compiles_to_ptx_sm90(name, fn, sig, tmp_path):
    ptx, restype = cuda_numba.compile_ptx(fn, sig, cc=CC)
    assert restype == types.void
    assert ".entry" in ptx and f".target sm_{CC[0]}{CC[1]}" in ptx
    if name.endswith(".f32") and not name.startswith(_F64_BY_DESIGN):
        # a bare float literal would silently promote float32 math to float64 (slow on GPUs)
        f64_lines = [ln.strip() for ln in ptx.splitlines() if re.search(r"\.f64\b", ln)]
        assert not f64_lines, f"float64 instructions in a float32 kernel: {f64_lines[:3]}"
    usage = _ptxas_usage(ptx, tmp_path, _max_registers(name))
    _REPORT.append((name, usage))


def test_print_register_report(capsys):
    """Prints the registers and spills ptxas reported (after the compile tests above)."""
    if not _REPORT:
        pytest.skip("no kernels compiled in this session")
    lines = [f"{'kernel':40s} {'regs':>5s} {'spill bytes':>11s}  (persistent: capped at "
             f"{cells.PERSISTENT_JIT_OPTIONS.get('max_registers')} for 1024 threads)"]
    for name, usage in _REPORT:
        regs, spill = usage if usage else ("-", "-")
        lines.append(f"{name:40s} {regs!s:>5s} {spill!s:>11s}")
    with capsys.disabled():  # shown even under -q
        print("\nsm_90 register report (ptxas -v):\n" + "\n".join(lines))
