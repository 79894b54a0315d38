"""Running one layer call on several threads, without OpenBLAS's own threads.

A layer call has three phases, each split into ``parts`` independent pieces that run on a
small pool of Python threads (the kernels are compiled with ``nogil=True``) while OpenBLAS
runs single-threaded:

1. the input projection x W_ih^T: split by rows of the [T*B, I] input;
2. the time loop: split by batch rows. Row b of h_t depends only on row b of h_{t-1}, so each
   thread runs all T steps for its own rows and the threads meet once at the end, not at
   every step;
3. (backward) the weight gradients, split by their rows, and dx, split by input rows.

Why not OpenBLAS's threads: they synchronise inside every GEMM (every time step, for the
per-step GEMMs) and spin-wait between GEMMs, which clashes with anything else running. On the
shared 2-core development machine, an LSTM step GEMM [32,128]x[128,512] took 5.4 ms with 2
OpenBLAS threads against 0.14 ms with 1, and a whole LSTM layer (T=100, B=32, H=128,
forward+backward) ran 64 ms with OpenBLAS's threads in and around the time loop against
40 ms once its helper threads went to sleep right after each GEMM.

OpenBLAS's thread setting is process-wide state. Importing this backend therefore reads it
once (or ``BPTT_NUM_THREADS``) as the number of pieces a large layer call is cut into, and then
sets OpenBLAS to ONE thread for the whole process: after any NumPy GEMM on several threads
(a model's decoder, say) OpenBLAS's idle helper threads spin-wait and steal a core from the
layer threads. Measured (perf/bench_train.py, char-LM, 2-layer LSTM 256, B=32, 2 cores):
12,500 tokens/s with OpenBLAS at 2 threads outside layer calls, 19,300 with it idle-free.
The cost: other NumPy GEMMs in the same process run on one thread.
"""

import concurrent.futures
import os
import threading

from ._blas import blas_threads, set_blas_threads
from ._math import jit

# multiply-adds of a whole layer call from which it is split over threads (handing work to
# the pool and joining costs ~50 us: T=1, B=4, H=16 LSTM forward+backward took 30 us on one
# thread against 80-130 us split)
MIN_WORK_FOR_THREADS = 4_000_000

def _thread_count():
    setting = os.environ.get("BPTT_NUM_THREADS", "").strip()
    if not setting:
        return blas_threads()
    if not setting.isdigit() or int(setting) < 1:
        raise ValueError(f"BPTT_NUM_THREADS must be a positive integer; got {setting!r}")
    return int(setting)


THREADS = _thread_count()  # pieces a large layer call runs in (OpenBLAS's count at import)
set_blas_threads(1)        # for good: no spin-waiting OpenBLAS helper threads (see above)

_pool = None             # (process id, executor, workers): a forked child makes its own pool
_pool_lock = threading.Lock()


def _get_pool(workers):
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[2] < workers:
            executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="bptt-cpu")
            _pool = (os.getpid(), executor, workers)
        return _pool[1]


@jit
def part_range(n, part, parts):
    """Rows [start, stop) of piece ``part`` when n rows are cut into ``parts`` near-equal pieces."""
    base, extra = divmod(n, parts)
    start = part * base + min(part, extra)
    return start, start + base + (1 if part < extra else 0)


class layer_threads:
    """``with layer_threads(work) as parts:`` -- how many pieces this layer call runs in
    (THREADS if the call does at least MIN_WORK_FOR_THREADS multiply-adds, else 1); OpenBLAS
    runs on one thread inside the block, also if someone raised its count meanwhile."""

    def __init__(self, work):
        self.parts = THREADS if work >= MIN_WORK_FOR_THREADS else 1

    def __enter__(self):
        self.previous = set_blas_threads(1)
        return self.parts

    def __exit__(self, *exc):
        set_blas_threads(self.previous)
        return False


def _on_one_blas_thread(kernel, *args):
    # Pool threads keep OpenBLAS at 1 thread whether its setting is per thread or per process
    # (layer_threads restores the process-wide value after the join).
    set_blas_threads(1)
    kernel(*args)


def run_parts(kernel, args, parts):
    """``kernel(*args, part, parts)`` for every part in range(parts): this thread takes part 0,
    the pool the others; returns after all are done (re-raising a piece's exception)."""
    if parts <= 1:
        kernel(*args, 0, 1)
        return
    futures = [_get_pool(parts - 1).submit(_on_one_blas_thread, kernel, *args, part, parts)
               for part in range(1, parts)]
    kernel(*args, 0, parts)
    for f in futures:
        f.result()
