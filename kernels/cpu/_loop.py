"""Running a layer's time loop on several threads: the batch rows are independent.

Row b of h_t depends only on row b of h_{t-1}, so the time loop of a layer splits cleanly by
batch rows: each thread runs all T steps for its own rows (its own small GEMMs on its rows,
its own gate loops) and the threads meet once at the end, not at every step. This uses the
cores without per-step synchronisation, which is what makes small per-step GEMMs slow when
OpenBLAS splits them itself (thread wake-up and join per step; a descheduled helper thread on
a busy machine stalls every step: measured with other jobs on the 2 cores, a [32,128]x[128,512]
step GEMM took 5.4 ms with 2 OpenBLAS threads against 0.14 ms with 1).

The kernels are compiled with ``nogil=True``; the threads are a small pool of Python threads.
While the loop runs, OpenBLAS is set to 1 thread (each time-loop thread calls it on its own);
a single-row batch runs on one thread and keeps OpenBLAS's threads only for per-step GEMMs of
at least ``STEP_GEMM_MIN_WORK_FOR_THREADS`` multiply-adds. The large GEMMs before and after the
loop run outside it, on all of OpenBLAS's threads. OpenBLAS's thread setting is process-wide
state: calls from several Python threads at once are correct but may run their large GEMMs on
fewer threads while another call's loop is running.
"""

import concurrent.futures
import os
import threading

from ._blas import blas_threads, set_blas_threads

# m*n*k of a per-step GEMM from which a loop on one thread lets OpenBLAS use its threads
STEP_GEMM_MIN_WORK_FOR_THREADS = 8_000_000
# multiply-adds of a whole time loop from which it is split over threads (handing work to the
# pool and joining costs ~50 us: T=1, B=4, H=16 LSTM forward+backward took 30 us on one
# thread against 80-130 us split)
LOOP_MIN_WORK_FOR_THREADS = 4_000_000

_pool = None             # (process id, executor, workers): a forked child makes its own pool
_pool_lock = threading.Lock()


def _get_pool(workers):
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[2] < workers:
            executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="bptt-cpu")
            _pool = (os.getpid(), executor, workers)
        return _pool[1]


def batch_slices(B, workers):
    """Split rows 0..B-1 into ``workers`` contiguous (start, stop) ranges of near-equal size."""
    base, extra = divmod(B, workers)
    bounds = [0]
    for k in range(workers):
        bounds.append(bounds[-1] + base + (k < extra))
    return list(zip(bounds[:-1], bounds[1:]))


def _on_one_blas_thread(kernel, *args):
    # Pool threads only run time loops; they keep OpenBLAS at 1 thread whether its setting is
    # per thread or per process (the caller restores the process-wide value after the join).
    set_blas_threads(1)
    kernel(*args)


def run_time_loop(kernel, args, B, T, step_work):
    """Call ``kernel(*args, b0, b1)`` for row ranges covering 0..B-1, in parallel where it pays.

    T: time steps; step_work: multiply-adds of one full-batch per-step GEMM (B * G*H * H).
    """
    workers = min(blas_threads(), B)
    if workers <= 1 or T * step_work < LOOP_MIN_WORK_FOR_THREADS:
        previous = None if step_work >= STEP_GEMM_MIN_WORK_FOR_THREADS else set_blas_threads(1)
        try:
            kernel(*args, 0, B)
        finally:
            if previous is not None:
                set_blas_threads(previous)
        return
    previous = set_blas_threads(1)
    try:
        slices = batch_slices(B, workers)
        futures = [_get_pool(workers - 1).submit(_on_one_blas_thread, kernel, *args, b0, b1)
                   for b0, b1 in slices[1:]]
        kernel(*args, *slices[0])                      # this thread takes the first rows
        for f in futures:
            f.result()
    finally:
        set_blas_threads(previous)
