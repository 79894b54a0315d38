"""A spin barrier for the threads of one layer call, callable from ``@njit`` code.

When a layer call's time loop is split by hidden units instead of batch rows (``_loop.py``),
every step needs the whole h_{t-1} that all threads wrote, so the threads meet after every
step. A pool handoff (~50 us) per step would cost more than the step; this barrier costs
well under a microsecond while all threads are on their own cores.

``flags`` is an int64 array of ``(parts + 1) * PAD`` zeros made fresh for each call: thread
``part`` owns the counter ``flags[part * PAD]`` (one cache line each). ``barrier(flags, part,
parts, count)`` publishes this thread's ``count`` with a release store (everything the thread
wrote before is visible to a thread that sees the count) and waits, with acquire loads, until
every counter reaches ``count``. ``count`` must grow by one per barrier (1, 2, 3...).

``flags[parts * PAD]`` is the abort word: the caller sets it when a piece stopped early (an
exception, Ctrl-C before the calling thread entered its piece), and then barrier returns True
instead of waiting for a count that will never come; the kernels return at once. Without it a
pool thread would spin at its barrier for good, and the next call queued behind it would hang.

``publish``/``wait_for`` are the one-way form for two threads in a pipeline (``_loop.
run_overlapped``): one thread publishes how many time steps it has done, the other waits
for a count before it reads those steps' rows.

A waiting thread calls ``sched_yield`` after SPINS_BEFORE_YIELD polls, so that a thread
descheduled by other load gets its core back instead of the waiter burning its time slice.
"""

import ctypes

import llvmlite.binding as llvm
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._math import jit

PAD = 8                    # int64s per counter: one 64-byte cache line each
SPINS_BEFORE_YIELD = 2000  # polls (~1-2 us of spinning) before each sched_yield

llvm.add_symbol("bptt_sched_yield",
                ctypes.cast(ctypes.CDLL(None).sched_yield, ctypes.c_void_p).value)
_sched_yield = types.ExternalFunction("bptt_sched_yield", types.int32())


@intrinsic
def _load_acquire(typingctx, arr, index):
    """arr[index] (int64 array) read with acquire ordering."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)
    return types.int64(arr, index), codegen


@intrinsic
def _store_release(typingctx, arr, index, value):
    """arr[index] = value (int64 array) written with release ordering."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()
    return types.none(arr, index, value), codegen


@jit
def _wait_until(flags, index, count, abort_index):
    """Spin (acquire loads) until flags[index] >= count; False, or True once flags[abort_index]
    is set."""
    spins = 0
    while _load_acquire(flags, index) < count:
        if _load_acquire(flags, abort_index) != 0:
            return True
        spins += 1
        if spins == SPINS_BEFORE_YIELD:
            _sched_yield()
            spins = 0
    return False


@jit
def barrier(flags, part, parts, count):
    """Wait until all ``parts`` threads have called barrier with this ``count``; False, or True
    if the call was aborted meanwhile. flags: [(parts + 1) * PAD] int64 (zeros at the start)."""
    _store_release(flags, part * PAD, count)
    for q in range(parts):
        if _wait_until(flags, q * PAD, count, parts * PAD):
            return True
    return False


@jit
def publish(progress, count):
    """Tell the thread waiting on ``progress`` that ``count`` steps are done (release store).
    progress: [2 * PAD] int64, zeros at the start: the count, then the abort word."""
    _store_release(progress, 0, count)


@jit
def wait_for(progress, count):
    """Wait until ``publish`` has told at least ``count`` steps; False, or True if the call
    was aborted meanwhile (``abort(progress, 1)``)."""
    return _wait_until(progress, 0, count, PAD)


def abort(flags, parts):
    """Release every piece waiting at a barrier of this call (see above)."""
    flags[parts * PAD] = 1
