"""Running one layer call on several threads, without OpenBLAS's own threads.

A layer call has three phases, each split into ``parts`` independent pieces that run on a
small pool of Python threads (the kernels are compiled with ``nogil=True``) while OpenBLAS
runs single-threaded:

1. the input projection x W_ih^T: split by rows of the [T*B, I] input;
2. the time loop: split by batch rows. Row b of h_t depends only on row b of h_{t-1}, so each
   thread runs all T steps for its own rows and the threads meet once at the end, not at
   every step. With fewer batch rows than threads (B = 1), or few rows and a large W_hh
   (``run_time_loop``), it is split by hidden units instead: each thread owns units j0:j1,
   i.e. its rows of W_hh (the products of a small batch are bound by streaming W_hh through
   the core, and now each core streams only its share) and the gate math of its units; the
   threads meet at a spin barrier (``_barrier.py``) after every step, since every unit of
   h_t needs all of h_{t-1};
3. (backward) the weight gradients, split by their rows, and dx, split by input rows.

Where the time loop runs on one thread alone (one batch row, W_hh too small for the unit
split: ``overlaps_phases``), the GEMM phases run beside it instead of before and after it
(``run_overlapped``): the input projection on the other thread, a few steps ahead of the
loop, and in backward the weight gradients and dx of the steps the loop has finished. The
two threads pass step counts through ``_barrier.publish``/``wait_for``.

Two independent layer calls (the directions of a bidirectional layer) run at once instead,
one thread each, every kernel call inside them in one piece (``run_beside``).

Why not OpenBLAS's threads: they synchronise inside every GEMM (every time step, for the
per-step GEMMs) and spin-wait between GEMMs, which clashes with anything else running
(docs/performance.md, "Threads").

OpenBLAS's thread setting is process-wide state, and it belongs to the user: importing this
backend only reads it (or ``BPTT_NUM_THREADS``) as the number of pieces a large layer call is
cut into, and changes nothing. Each call of the backend that runs BLAS (a recurrent layer, the
output layer's GEMMs in ``linear.py``) runs inside ``layer_threads``, which sets OpenBLAS to
one thread on entry and puts the caller's setting back on exit (~2 us per block). The user's
own NumPy GEMMs keep their threads. Every GEMM of a training step goes through the backend:
after a GEMM on several threads OpenBLAS's idle helper threads spin-wait (up to ~0.1 s) and
take a core from the layer threads.
"""

import os
import threading

import numpy as np

from ._barrier import PAD, abort
from ._blas import blas_threads, set_blas_threads, set_mkl_threads_here, use_provider
from ._math import jit

# multiply-adds of a whole layer call from which it is split over threads (handing work to
# the pool and joining costs ~50 us), and of one GEMM phase of a split call (the input
# projection; weight gradients and dx) from which that phase runs in pieces too
# (docs/performance.md, "Threads")
MIN_WORK_FOR_THREADS = 4_000_000
MIN_PHASE_WORK_FOR_THREADS = 10_000_000
# A recurrent layer call counts its work as THREAD_STEPS steps' whatever its length, so that a
# call's pieces, and with them the rounding of every product, do not depend on how many steps
# it runs (``bptt.memory`` recomputes a window's pieces in shorter calls than one over it)
THREAD_STEPS = 100

def _thread_count():
    setting = os.environ.get("BPTT_NUM_THREADS", "").strip()
    if not setting:
        return blas_threads()
    if not setting.isdigit() or int(setting) < 1:
        raise ValueError(f"BPTT_NUM_THREADS must be a positive integer; got {setting!r}")
    return int(setting)


THREADS = _thread_count()  # pieces a large layer call runs in (OpenBLAS's count at import)

NO_FLAGS = np.zeros(0, np.int64)     # "split by batch rows": no barrier counters
NO_PROGRESS = np.zeros(0, np.int64)  # a time loop outside run_overlapped: no step counter


class _Worker(threading.Thread):
    """A daemon thread that runs one piece of a layer call at a time, handed over through two
    plain locks: ~55 us per call's round trip on the 2-core machine, against ~120 us through a
    ThreadPoolExecutor (futures, work queue), four times per layer step."""

    def __init__(self):
        super().__init__(name="bptt-cpu", daemon=True)
        self._go, self._done = threading.Lock(), threading.Lock()
        self._go.acquire()
        self._done.acquire()
        self._job = self._error = None
        self.start()

    def run(self):
        while True:
            self._go.acquire()
            on_error, job = self._job
            try:
                _on_one_blas_thread(*job)
            except BaseException as e:  # noqa: BLE001 -- handed to the caller in wait()
                self._error = e
                if on_error is not None:
                    on_error()
            self._done.release()

    def submit(self, on_error, kernel, *args):
        self._job, self._error = (on_error, (kernel,) + args), None
        self._go.release()

    def wait(self):
        """Block until the piece is done; re-raise its exception."""
        self._done.acquire()
        error, self._job, self._error = self._error, None, None
        if error is not None:
            raise error


_team = None                     # (process id, [workers]): a forked child makes its own
_team_lock = threading.Lock()    # held by the one call using the team


def _workers(n):
    """At least n workers of this process (made on first use)."""
    global _team
    if _team is None or _team[0] != os.getpid() or len(_team[1]) < n:
        old = _team[1] if _team is not None and _team[0] == os.getpid() else []
        _team = (os.getpid(), old + [_Worker() for _ in range(n - len(old))])
    return _team[1][:n]


@jit
def part_range(n, part, parts):
    """Rows [start, stop) of piece ``part`` when n rows are cut into ``parts`` near-equal pieces."""
    base, extra = divmod(n, parts)
    start = part * base + min(part, extra)
    return start, start + base + (1 if part < extra else 0)


class layer_threads:
    """``with layer_threads(work) as parts:`` -- how many pieces this layer call runs in
    (THREADS if the call does at least MIN_WORK_FOR_THREADS multiply-adds, else 1); OpenBLAS
    runs on one thread inside the block, also if someone raised its count meanwhile, and gets
    back on exit the count it had before; so does MKL, per thread, where it is loaded. Blocks
    of several Python threads may overlap: the setting of the first to enter is restored when
    the last one leaves. The first to enter also points the kernels at the BLAS provider the
    settings ask for (``_blas.use_provider``: a bad setting fails here, before any work)."""

    def __init__(self, work):
        alone = getattr(_beside, "alone", False)      # inside run_beside: one piece
        self.parts = THREADS if work >= MIN_WORK_FOR_THREADS and not alone else 1

    def __enter__(self):
        global _inside, _saved
        with _blas_lock:
            if _inside == 0:
                use_provider()
            previous = set_blas_threads(1)
            if _inside == 0:
                _saved = previous
            _inside += 1
        self._mkl_saved = set_mkl_threads_here(1)
        return self.parts

    def __exit__(self, *exc):
        global _inside
        set_mkl_threads_here(self._mkl_saved)
        with _blas_lock:
            _inside -= 1
            if _inside == 0:
                set_blas_threads(_saved)
        return False


_blas_lock = threading.Lock()   # guards the two below
_inside = 0                     # layer_threads blocks open now (any Python thread)
_saved = 1                      # OpenBLAS's thread count when the first of them entered


def phase_parts(parts, work):
    """Pieces for one GEMM phase of ``work`` multiply-adds in a call split into ``parts``."""
    return parts if work >= MIN_PHASE_WORK_FOR_THREADS else 1


def _on_one_blas_thread(kernel, *args):
    # Pool threads keep OpenBLAS at 1 thread whether its setting is per thread or per process
    # (a pool thread runs only inside a caller's layer_threads block, which restores the
    # caller's value after the join), and MKL's setting for this thread at 1.
    set_blas_threads(1)
    set_mkl_threads_here(1)
    kernel(*args)


def run_parts(kernel, args, parts, together=False, on_error=None):
    """``kernel(*args, part, parts)`` for every part in range(parts): this thread takes part 0,
    the workers the others; returns after all are done (re-raising a piece's exception).
    One call uses the workers at a time: a call from a second Python thread meanwhile runs its
    pieces one after another here, or, with ``together`` (pieces that wait for each other),
    returns False without running anything. ``on_error()`` runs as soon as any piece raises
    (to release pieces waiting for it at a barrier)."""
    if parts <= 1:
        kernel(*args, 0, 1)
        return True
    if not _team_lock.acquire(blocking=False):
        if together:
            return False
        for part in range(parts):
            kernel(*args, part, parts)
        return True
    try:
        _run_on_team((kernel, args + (0, parts)),
                     [(kernel, args + (part, parts)) for part in range(1, parts)], on_error)
    finally:
        _team_lock.release()
    return True


_beside = threading.local()     # .alone: this thread runs one of run_beside's calls


def _alone(call, results, index):
    """results[index] = call(), its layer calls in one piece each (``layer_threads``)."""
    _beside.alone = True
    try:
        results[index] = call()
    finally:
        _beside.alone = False


def run_beside(first, second, work):
    """(first(), second()): two independent calls of layer kernels of ``work`` multiply-adds
    each (the two directions of a bidirectional layer) at once, ``first`` on this thread and
    ``second`` on a worker, each layer call inside them in one piece on its own thread
    (``layer_threads``), so the two threads never wait for each other until both are done.
    One after the other, each layer call free to use the threads, where THREADS is 1, the
    work is under MIN_WORK_FOR_THREADS or the workers are busy (a second Python thread
    meanwhile). An exception of either is raised after both are done."""
    if (THREADS < 2 or work < MIN_WORK_FOR_THREADS or getattr(_beside, "alone", False)
            or not _team_lock.acquire(blocking=False)):
        return first(), second()
    results = [None, None]
    try:
        _run_on_team((_alone, (first, results, 0)), [(_alone, (second, results, 1))], None)
    finally:
        _team_lock.release()
    return results[0], results[1]


def run_overlapped(producer, consumer, progress, consumer_here=False):
    """Run two ``(kernel, args)`` pieces at once, one here and one on a worker: ``producer``
    publishes on ``progress`` how many time steps it has done (``_barrier.publish``) and
    ``consumer`` waits for those counts before it reads the steps' rows (``_barrier.wait_for``).
    The producer runs here unless ``consumer_here`` (the piece here starts at once; the worker
    first has to wake up). Returns after both are done; a piece that raises aborts the other's
    wait. With the workers busy (a second Python thread meanwhile) the producer runs first and
    then the consumer, both here."""
    if not _team_lock.acquire(blocking=False):
        for kernel, args in (producer, consumer):
            kernel(*args)
        return
    here, elsewhere = (consumer, producer) if consumer_here else (producer, consumer)
    try:
        _run_on_team(here, [elsewhere], lambda: abort(progress, 1))
    finally:
        _team_lock.release()


def _run_on_team(here, elsewhere, on_error):
    """Run the ``(kernel, args)`` pieces ``elsewhere`` on workers and ``here`` on this thread;
    return after all are done, re-raising a piece's exception. The caller holds _team_lock."""
    waiting = []
    try:
        for (kernel, args), worker in zip(elsewhere, _workers(len(elsewhere))):
            worker.submit(on_error, kernel, *args)
            waiting.append(worker)
        try:
            here[0](*here[1])
        except BaseException:
            if on_error is not None:
                on_error()
            raise
        finally:
            error = None
            while waiting:
                try:
                    waiting[0].wait()
                except Exception as e:  # noqa: BLE001 -- a worker's piece; raised below
                    error = error or e
                waiting.pop(0)
            if error is not None:
                raise error
    finally:
        if waiting:              # interrupted while waiting: leave those workers to finish
            global _team         # their piece, and make a new team for later calls
            _team = None


@jit
def split_ranges(B, H, flags, part, parts):
    """(b0, b1, j0, j1): the batch rows and hidden units of piece ``part`` of a time loop;
    split by batch rows if ``flags`` is empty, else by units (see run_time_loop)."""
    if flags.size == 0:
        b0, b1 = part_range(B, part, parts)
        return b0, b1, 0, H
    j0, j1 = part_range(H, part, parts)
    return 0, B, j0, j1


# When the time loop is split by hidden units rather than batch rows: once W_hh is large
# enough that each core streaming (or packing) only its share of it pays for the barrier per
# step: with fewer than FEW_ROWS rows (or fewer rows than threads) from UNIT_SPLIT_WEIGHT_FEW_ROWS
# elements (below that one row runs on one thread alone), up to UNIT_SPLIT_ROWS rows per
# thread from UNIT_SPLIT_WEIGHT (the sweep behind these: docs/performance.md, "Split by
# batch rows or by hidden units").
FEW_ROWS = 8
UNIT_SPLIT_WEIGHT_FEW_ROWS = 1 << 17
UNIT_SPLIT_WEIGHT = 1 << 21
UNIT_SPLIT_ROWS = 64


def split_by_units(B, parts, weight_size):
    """Whether a time loop over B rows in ``parts`` pieces with a W_hh of ``weight_size``
    elements runs split by hidden units (see the table above)."""
    if parts <= 1:
        return False
    if B < parts or B < FEW_ROWS:
        return weight_size >= UNIT_SPLIT_WEIGHT_FEW_ROWS
    return B <= UNIT_SPLIT_ROWS * parts and weight_size >= UNIT_SPLIT_WEIGHT


def overlaps_phases(parts, B, weight_size):
    """Whether a layer call of ``parts`` pieces runs its GEMM phases beside its time loop
    (``_common.forward_phases/backward_phases``): where the loop itself would run on one
    thread (one batch row, not split by units), leaving the other cores idle."""
    return parts >= 2 and min(parts, B) == 1 and not split_by_units(B, parts, weight_size)


def new_progress(done=0):
    """Fresh step counter (at ``done``) and abort word for ``run_overlapped``
    (``_barrier.publish``)."""
    progress = np.zeros(2 * PAD, np.int64)
    progress[0] = done
    return progress


def run_time_loop(kernel, args, parts, B, weight_size):
    """Run a cell's time loop ``kernel(*args, flags, part, parts)`` in ``parts`` pieces: by batch
    rows (``flags`` empty), or by hidden units where ``split_by_units`` says so (``flags``:
    fresh barrier counters; the pieces meet after every step). A barrier needs every piece
    running at once: a call that finds the workers busy (a second Python thread training
    meanwhile) splits by batch rows instead."""
    if split_by_units(B, parts, weight_size):
        flags = np.zeros((parts + 1) * PAD, np.int64)
        if run_parts(kernel, args + (flags,), parts, together=True,
                     on_error=lambda: abort(flags, parts)):  # release pieces waiting for this one
            return
    run_parts(kernel, args + (NO_FLAGS,), min(parts, B))
