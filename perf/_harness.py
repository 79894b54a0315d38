"""Shared helpers of the perf/ scripts: thread pinning, worker processes, timing, tables, JSON.

Every benchmark compares two sides ("ours" = bptt, "torch" = plain PyTorch) in SEPARATE
processes with the SAME thread settings, alternating between them, and reports medians.

Worker protocol (one JSON object per line):

* the parent starts ``python <script> --worker <side>`` with the environment of
  :func:`child_env`; the worker imports its libraries and answers one line
  ``{"ready": true, ...}`` or ``{"error": "<why it cannot run>"}``;
* then for every request line (a JSON object) it answers one JSON line;
  ``{"error": ...}`` on failure (the worker stays alive);
* EOF on stdin ends the worker.

Only the reply lines go to the real stdout: inside a worker, ``sys.stdout`` is redirected
to stderr so that stray prints (library warnings, progress) cannot break the protocol.
"""

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(PERF_DIR)
RESULTS_DIR = os.path.join(PERF_DIR, "results")
DEFAULT_THREADS = 2

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}   # gate blocks G of each cell


def step_flops(cell, T, B, I, H):
    """GEMM flops of one training step of one layer over T steps (the gate math not counted):
    forward 2TBGH*I + 2TBGH*H; backward dx and dW_ih 2 * 2TBGH*I, dh and dW_hh 2 * 2TBGH*H;
    in all 6*T*B*G*H*(I+H)."""
    return 6.0 * T * B * GATES[cell] * H * (I + H)


THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                   "NUMBA_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------

def child_env(threads=DEFAULT_THREADS, **extra):
    """Environment for a worker: every BLAS/OpenMP/Numba pool limited to ``threads``.

    ``extra``: more variables (a value of None removes the variable)."""
    env = dict(os.environ)
    for var in THREAD_ENV_VARS:
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    env["BPTT_BACKEND"] = env.get("BPTT_BACKEND", "cpu")
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def pin_threads(threads=DEFAULT_THREADS):
    """Inside a worker, after its imports: set the thread pools that have a runtime switch."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    if "numba" in sys.modules:
        try:
            sys.modules["numba"].set_num_threads(min(threads, sys.modules["numba"].config.NUMBA_NUM_THREADS))
        except Exception:  # numba without a threading layer: nothing to pin
            pass


class WorkerError(RuntimeError):
    """A worker could not start, died, or answered with an error."""


class Worker:
    """A long-lived benchmark process speaking the line protocol of this module.

    ``Worker(script, side, threads)`` starts ``python script --worker side``; ``ready`` is
    the start reply (a dict) or None when the side cannot run (``error`` says why)."""

    def __init__(self, script, side, threads=DEFAULT_THREADS, env_extra=None, args=()):
        self.side = side
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.pid = None
        self._proc = subprocess.Popen(
            [sys.executable, script, "--worker", side, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            env=child_env(threads, **(env_extra or {})), text=True, cwd=REPO_DIR)
        self.pid = self._proc.pid
        self.ready, self.error = None, None
        try:
            reply = self._read()
        except WorkerError as e:
            self.error = str(e)
            self.close()
            return
        if "error" in reply:
            self.error = reply["error"]
            self.close()
        else:
            self.ready = reply

    def _stderr_tail(self, n=1500):
        self._stderr.seek(0)
        return self._stderr.read()[-n:]

    def _read(self):
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            raise WorkerError(f"{self.side} worker exited (code {self._proc.returncode}); "
                              f"its stderr ends with:\n{self._stderr_tail()}")
        return json.loads(line)

    @property
    def alive(self):
        return self.ready is not None and self._proc.poll() is None

    def call(self, request):
        """Send one request (dict), return the reply (dict); raise WorkerError on failure."""
        if not self.alive:
            raise WorkerError(f"{self.side} worker is not running: {self.error}")
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise WorkerError(f"{self.side}: {reply['error']}")
        return reply

    def close(self):
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except Exception:
                self._proc.kill()
                self._proc.wait()
        self._stderr.close()


def serve(setup, handle):
    """Worker main loop. ``setup()`` imports and returns a dict for the ready line (raise
    :class:`MissingDependency` or any error to refuse); ``handle(request)`` returns a dict."""
    reply_stream = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr

    def reply(obj):
        reply_stream.write(json.dumps(obj) + "\n")
        reply_stream.flush()

    try:
        info = setup() or {}
    except MissingDependency as e:
        reply({"error": str(e)})
        return
    except Exception:
        reply({"error": traceback.format_exc()})
        return
    reply({"ready": True, **info})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply(handle(json.loads(line)))
        except MemoryError:
            reply({"error": "out of memory"})
        except Exception:
            reply({"error": traceback.format_exc()})


def run_once(argv, env, timeout=600):
    """Run a one-shot command; return (wall seconds, last JSON line of stdout as dict or None,
    the CompletedProcess)."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=REPO_DIR, capture_output=True, text=True,
                          timeout=timeout)
    wall = time.perf_counter() - t0
    result = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except ValueError:
                pass
            break
    return wall, result, proc


def openblas_thread_setter():
    """``set(n)`` for the thread count of the OpenBLAS bundled with NumPy (``numpy.libs``: the
    library NumPy's matmul, and the cpu backend's GEMMs, call), or None where it is not found.
    Loading it again by path returns the already loaded library, so the switch applies to it."""
    import ctypes
    import glob
    import numpy
    libdir = os.path.join(os.path.dirname(os.path.dirname(numpy.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libdir, "libscipy_openblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_int], None
                return fn
    return None


# ---------------------------------------------------------------------------------------------
# dependencies
# ---------------------------------------------------------------------------------------------

class MissingDependency(RuntimeError):
    """A module the benchmark needs is not importable (yet)."""


def require(module, what):
    """Import ``module`` or raise MissingDependency naming ``what`` needs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(f"{what} needs `{module}`, which cannot be imported here "
                                f"({type(e).__name__}: {e})") from None


def require_attr(module, name, what):
    """``getattr(module, name)`` or MissingDependency (bptt exposes its API lazily)."""
    try:
        return getattr(module, name)
    except (AttributeError, ImportError) as e:
        raise MissingDependency(f"{what} needs `{module.__name__}.{name}`, which is not "
                                f"available yet ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

def time_calls(fn, n):
    """Wall seconds of ``n`` separate calls of ``fn()`` (a list)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def sgemm_gflops(n=2048, repeats=5, matmul=None):
    """Best-of-``repeats`` GFLOP/s of a float32 ``n x n @ n x n`` (2 n^3 flops) by
    ``matmul(a, b, out)`` (default: numpy's, i.e. its OpenBLAS). The reference peak of this
    machine for the achieved-GFLOP/s columns."""
    import numpy as np
    matmul = matmul or (lambda a, b, c: np.matmul(a, b, out=c))
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    matmul(a, b, c)  # warm-up: thread pool start, page faults
    best = min(time_calls(lambda: matmul(a, b, c), repeats))
    return 2.0 * n ** 3 / best / 1e9


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mkl_matmul():
    """``matmul(a, b, out)`` through Intel MKL's cblas_sgemm (the library the cpu backend's
    ``mkl`` provider loads; its threads: MKL_NUM_THREADS), or None where MKL is not usable."""
    import ctypes
    try:
        from bptt_kernels.cpu import _mkl
        mkl = _mkl.load()
    except ImportError:
        return None
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    sgemm = ctypes.CFUNCTYPE(None, i64, i64, i64, i64, i64, i64, f32, ptr, i64, ptr, i64, f32,
                             ptr, i64)(mkl.addresses["sgemm"])

    def matmul(a, b, c):
        (m, k), n = a.shape, b.shape[1]
        sgemm(101, 111, 111, m, n, k, 1.0, a.ctypes.data, k, b.ctypes.data, n, 0.0,
              c.ctypes.data, n)
    return matmul


def ours_blas_info():
    """Inside a bptt worker (cpu backend): the BLAS provider its kernels use (the one
    ``BPTT_BLAS`` picks) and SGEMM 2048^3 GFLOP/s of each provider usable here, at the
    worker's thread settings."""
    from bptt_kernels.cpu import _blas
    provider = _blas.use_provider()
    gflops = {"openblas": sgemm_gflops()}
    mkl = _mkl_matmul()
    if mkl is not None:
        gflops["mkl"] = sgemm_gflops(matmul=mkl)
    return {"blas": f"{provider.name}: {provider.library}", "provider": provider.name,
            "sgemm_gflops": gflops}


def torch_blas_info():
    """Inside a torch worker: what torch's CPU LSTM and GEMMs run on (oneDNN, MKL versions from
    torch.__config__) and SGEMM 2048^3 GFLOP/s of torch.mm."""
    import re
    import torch
    shown = torch.__config__.show()

    def version(pattern):
        found = re.search(pattern, shown)
        return found.group(1) if found else "?"
    blas = version(r"BLAS_INFO=(\w+)")
    onednn = version(r"(?:MKL-DNN|oneDNN)[^v]*(v[\d.]+)")
    mkl = version(r"Math Kernel Library Version ([\d.]+)")
    isa = version(r"CPU capability usage: (\w+)")
    built = (f"torch {torch.__version__}: LSTM by oneDNN {onednn}, BLAS_INFO={blas}, MKL {mkl}, "
             f"CPU capability {isa}")
    gflops = sgemm_gflops(matmul=lambda a, b, c: torch.mm(torch.from_numpy(a), torch.from_numpy(b),
                                                         out=torch.from_numpy(c)))
    return {"blas": built, "provider": f"torch ({blas})",
            "sgemm_gflops": {f"torch.mm ({blas})": gflops}}


def blas_note(infos):
    """Lines naming the CPU, each side's BLAS and the SGEMM GFLOP/s of every provider measured
    (``infos``: side -> ours_blas_info()/torch_blas_info() result, or a list of them)."""
    lines = [f"CPU: {cpu_model()} ({os.cpu_count()} cores)"]
    for side, info in infos.items():
        runs = info if isinstance(info, list) else [info]
        rates = {}
        for run in runs:
            for name, g in run["sgemm_gflops"].items():
                rates.setdefault(name, []).append(g)
        sgemm = ", ".join(f"{name} {' / '.join(f'{g:.0f}' for g in v)}" for name, v in rates.items())
        lines.append(f"{side}: {runs[0]['blas']}; SGEMM 2048^3 GFLOP/s: {sgemm}")
    return "\n".join(lines)


def peak_rss_mb():
    """Peak resident set size of this process so far, in MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class LoadMonitor:
    """How busy the machine was with OTHER processes while a benchmark ran.

    Busy CPU time of the whole machine (/proc/stat) minus this process, its waited-for
    children (os.times) and the still running processes ``pids`` (/proc/<pid>/stat), over the
    wall time: the average number of cores other processes used. Linux only (else None)."""

    def __init__(self, pids=()):
        self.pids = tuple(pids)
        self._start = self._sample()

    def _sample(self):
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            running = 0
            for pid in self.pids:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
                running += int(stat[11]) + int(stat[12])  # utime, stime (fields 14, 15)
        except (OSError, ValueError, IndexError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = sum(fields) - fields[3] - fields[4]  # everything but idle and iowait
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system + running / tick
        return busy / tick, ours, time.perf_counter()

    def stop(self):
        end = self._sample()
        if self._start is None or end is None:
            return None
        busy, ours, wall = (e - s for e, s in zip(end, self._start))
        return {"other_processes_cores": max(0.0, (busy - ours) / wall), "wall_s": wall,
                "loadavg_1min": os.getloadavg()[0]}


def load_note(load):
    """One line describing a LoadMonitor result."""
    if not load:
        return "machine load: unknown"
    return (f"other processes kept {load['other_processes_cores']:.2f} of {os.cpu_count()} cores "
            f"busy on average during this {load['wall_s']:.0f} s run (load average now "
            f"{load['loadavg_1min']:.2f}); numbers are noisy when that is well above 0")


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------

def fmt(value, spec=".3g", missing="-"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, str):
        return value
    return format(value, spec)


def table(headers, rows):
    """Plain-text table of already formatted cells (first column left-aligned, others right)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def machine_info(threads):
    """What the numbers were measured on (goes into every JSON)."""
    info = {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "threads": threads, "date_utc": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR,
                                        capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return info


def save_json(name, payload):
    """Write ``payload`` to perf/results/<name>-<UTC time>.json; return the path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def parse_int_list(text):
    """``"1,8,32"`` -> [1, 8, 32] (argparse type)."""
    return [int(v) for v in str(text).split(",") if v.strip()]


def parse_str_list(text):
    return [v.strip() for v in str(text).split(",") if v.strip()]
