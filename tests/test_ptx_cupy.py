"""Offline compilation checks of the CuPy backend's CUDA sources (no GPU needed).

* every kernels/cupy/*.cu compiles with ``nvcc --ptx -arch=sm_90`` (common.cu, the shared
  header, must define no kernel);
* the self-contained text the backend hands to NVRTC (headers inlined) compiles with the
  NVRTC library CuPy itself uses (where it is installed), and a compile unit (one cell and
  dtype) holds exactly its kernels;
* every kernel name the Python side launches (``_compile.KERNELS``) is an ``.entry`` of the
  PTX of its source, with as many parameters as the C signature the host launcher checks
  against, and no ``.entry`` is left unlaunched;
* ``ptxas -v`` (what ``nvcc --cubin -Xptxas -v`` runs) reports registers and spills of every
  kernel (printed as a table); float32 kernels must not spill, persistent kernels must fit
  1024 threads per block.

Skips with a printed reason where nvcc (or CuPy's NVRTC) is absent.
"""

import glob
import os
import re
import shutil
import subprocess

import pytest

from bptt_kernels.cupy import _compile

CU_FILES = sorted(glob.glob(os.path.join(_compile.SOURCE_DIR, "*.cu")))
ARCH = "sm_90"


def _nvcc():
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/bin/nvcc",
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = _nvcc()


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    return proc.stderr


def _entries(ptx):
    """{entry name: number of parameters} of a PTX text."""
    out = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\(([^)]*)\)", ptx):
        out[m.group(1)] = len(re.findall(r"\.param\b", m.group(2)))
    return out


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    """{file name: PTX text}: every kernels/cupy/*.cu compiled once by nvcc for sm_90."""
    if NVCC is None:
        pytest.skip("nvcc not found (set NVCC or CUDA_HOME)")
    d = tmp_path_factory.mktemp("ptx")
    out = {}
    for path in CU_FILES:
        name = os.path.basename(path)
        _run([NVCC, "--ptx", f"-arch={ARCH}", *_compile.COMPILE_OPTIONS, *_compile.CUPY_ADDED_OPTIONS,
              path, "-o", str(d / f"{name}.ptx")])
        out[name] = (d / f"{name}.ptx").read_text()
    return out


@pytest.mark.parametrize("name", [os.path.basename(p) for p in CU_FILES])
def test_every_cu_file_compiles_to_ptx(ptx, name):
    assert ptx[name].lstrip().startswith("//") and ".target sm_90" in ptx[name]


def test_every_cu_file_is_known():
    """A new .cu file must be either a kernel source or the shared header."""
    names = {os.path.basename(p) for p in CU_FILES}
    assert names == set(_compile.SOURCES) | {"common.cu"}


def test_launched_kernels_exist_in_ptx(ptx):
    sigs = _compile.kernel_signatures()
    assert set(sigs) == set(_compile.KERNELS), "signatures and launch table disagree"
    assert _entries(ptx["common.cu"]) == {}, "common.cu is a header: it must define no kernel"
    for source in _compile.SOURCES:
        entries = _entries(ptx[source])
        launched = {k for k, s in _compile.KERNELS.items() if s == source}
        missing = launched - set(entries)
        assert not missing, f"{source}: kernels launched from Python but absent from PTX: {missing}"
        unused = set(entries) - launched
        assert not unused, f"{source}: PTX entries never launched from Python: {unused}"
        for name in launched:
            assert entries[name] == len(sigs[name]), (
                f"{name}: {entries[name]} PTX parameters, {len(sigs[name])} in the C signature")


def _nvrtc_ptx(nvrtc, source, options):
    prog = nvrtc.createProgram(_compile.load_source(source), source, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, tuple(options) + _compile.CUPY_ADDED_OPTIONS
                                 + ("--gpu-architecture=compute_90",))
        except Exception as e:
            pytest.fail(f"NVRTC rejected {source} {options}: {e}\n{nvrtc.getProgramLog(prog)}")
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


def test_nvrtc_compiles_the_units_the_backend_loads():
    """The NVRTC library CuPy compiles with at run time accepts the exact sources (offline),
    and each compile unit the backend builds holds exactly the kernels it is asked for."""
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as e:  # no cupy, or no libnvrtc
        pytest.skip(f"CuPy's NVRTC is not loadable here ({type(e).__name__}: {e})")
    for unit in sorted(set(_compile.UNITS.values())):
        names = {k for k, u in _compile.UNITS.items() if u == unit}
        (source,) = {_compile.KERNELS[k] for k in names}
        entries = set(_entries(_nvrtc_ptx(nvrtc, source, _compile.unit_options(unit))))
        assert entries == names, unit
    assert set(_compile.UNITS) == set(_compile.KERNELS)
    assert len(set(_compile.UNITS.values())) == 2 * len(_compile.CELLS) + 2


def test_registers_and_spills(ptx, tmp_path, capsys):
    """ptxas -v figures for every kernel (the PTX above assembled for sm_90, as nvcc --cubin
    -Xptxas -v would): printed; float32 kernels must not spill."""
    ptxas = os.path.join(os.path.dirname(NVCC), "ptxas")
    rows = []
    for source in _compile.SOURCES:
        src = tmp_path / f"{source}.ptx"
        src.write_text(ptx[source])
        cubin = str(tmp_path / f"{source}.cubin")
        if os.access(ptxas, os.X_OK):
            log = _run([ptxas, f"-arch={ARCH}", "-v", str(src), "-o", cubin])
        else:
            log = _run([NVCC, "--cubin", f"-arch={ARCH}", "-Xptxas", "-v", *_compile.COMPILE_OPTIONS,
                        *_compile.CUPY_ADDED_OPTIONS, os.path.join(_compile.SOURCE_DIR, source),
                        "-o", cubin])
        for block in log.split("Compiling entry function")[1:]:
            name = re.search(r"'(\w+)'", block).group(1)
            regs = int(re.search(r"Used (\d+) registers", block).group(1))
            spill_st, spill_ld = map(int, re.search(
                r"(\d+) bytes spill stores, (\d+) bytes spill loads", block).groups())
            stack = int(re.search(r"(\d+) bytes stack frame", block).group(1))
            rows.append((name, regs, spill_st, spill_ld, stack))
    assert {r[0] for r in rows} == set(_compile.KERNELS)
    with capsys.disabled():
        print(f"\nptxas -v, {ARCH}: kernel, registers, spill stores/loads (bytes), stack (bytes)")
        for name, regs, st, ld, stack in sorted(rows):
            print(f"  {name:36s} {regs:4d} regs  spill {st:3d}/{ld:3d}  stack {stack:3d}")
    for name, regs, st, ld, _ in rows:
        if name.endswith("_f32"):
            assert st == 0 and ld == 0, f"{name} spills {st}/{ld} bytes"
        if "persistent" in name or "cooperative" in name:  # up to 1024 threads: 64 registers
            assert regs <= 64, f"{name} uses {regs} registers"
