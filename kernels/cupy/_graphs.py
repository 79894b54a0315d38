"""CUDA graphs of the general path's time loops: T steps of launches replayed as one.

The general path issues two launches per time step (a cuBLAS GEMM and a fused gate kernel)
from Python, tens of microseconds of host time each; where the GPU's work per step is smaller
than that (B * H up to ~10^5) the host is the bottleneck. A CUDA graph records a loop's
launches once and replays them with one call. A graph bakes in every address it was recorded
with, so :class:`LoopGraphs` records each loop once per key (direction, cell, T, B, H, t_start,
dtype) on arrays of its own ("static" arrays), and each call copies its inputs into them,
replays the graph and copies its outputs out (device-to-device copies of the activations: a
few percent of a step's time where graphs pay, and memory for one more copy of them, capped by
``config.GRAPH_MEMORY``). A loop is recorded the second time its key comes: the first call runs
step by step (one-off sizes pay no recording, and every kernel is loaded before a capture). A
loop whose arrays need more than a quarter of GRAPH_MEMORY is never recorded, so the few loops
of a training step (forward and backward, a last shorter chunk) stay recorded together rather
than evicting each other and being recorded again at every call.
"""

import contextlib
import warnings
from collections import OrderedDict

from . import config

MAX_SEEN = 4096  # keys remembered as run once (forgotten all at once past this)


def cupy_capture(record):
    """Record the launches ``record()`` makes into a CUDA graph (``graph.launch()`` replays
    them on the current stream); nothing runs while recording."""
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)  # the legacy default stream cannot capture
    with stream:
        stream.begin_capture()
        try:
            record()
        except BaseException:
            with contextlib.suppress(Exception):
                stream.end_capture()
            raise
        return stream.end_capture()


class HostReplay:
    """The stand-in for a CUDA graph on the host emulation: recording runs nothing; each
    :meth:`launch` runs ``record()`` again, on the same (static) arrays, as a graph would."""

    def __init__(self, record):
        self._record = record

    def launch(self):
        self._record()


class LoopGraphs:
    """Graphs of time loops, one per key, least recently used dropped past config.GRAPH_MEMORY.

    capture(record) -> graph   records ``record()``'s launches; ``graph.launch()`` replays them
    """

    def __init__(self, capture):
        self._capture = capture
        self._entries = OrderedDict()  # key -> (graph, {name: static array}, bytes)
        self._seen = set()             # keys run once, step by step
        self.replays = 0               # calls served by a graph (tests, perf/gpu_check.py)
        self.failed = None             # why graphs were turned off in this process, if they were

    def clear(self):
        """Drop every graph and its static arrays."""
        self._entries.clear()
        self._seen.clear()

    def run(self, key, loop, arrays, inputs, outputs):
        """Run ``loop(arrays)`` (it issues every step's launches on the arrays of dict
        ``arrays``) as a graph: the arrays named in ``inputs`` are copied into the graph's own,
        those in ``outputs`` copied back (a name may be in both). Each name gets an array of
        its own, so no two names may hold the same memory (a graph would read one copy where
        the loop wrote the other). Returns False, having run
        nothing, where it will not take this loop (its key's first call, graphs failed before,
        or its arrays need more than config.GRAPH_MEMORY / 4): the caller runs it directly."""
        entry = self._entries.get(key)
        if entry is None:
            size = sum(a.nbytes for a in arrays.values())
            if self.failed is not None or 4 * size > config.GRAPH_MEMORY:
                return False
            if key not in self._seen:
                if len(self._seen) >= MAX_SEEN:
                    self._seen.clear()
                self._seen.add(key)
                return False
            while self._entries and size + self._held() > config.GRAPH_MEMORY:
                self._entries.popitem(last=False)
            static = {name: a.copy() for name, a in arrays.items()}  # the inputs, copied in
            try:
                graph = self._capture(lambda: loop(static))
            except Exception as e:  # noqa: BLE001 -- e.g. a driver without capture support
                self.failed = f"{type(e).__name__}: {e}"
                warnings.warn(f"bptt_kernels.cupy: CUDA graph capture failed ({self.failed}); the "
                              "general path runs its steps one launch at a time from now on",
                              RuntimeWarning, stacklevel=3)
                return False
            entry = self._entries[key] = (graph, static, size)
        else:
            self._entries.move_to_end(key)
            for name in inputs:
                entry[1][name][...] = arrays[name]
        graph, static, _ = entry
        graph.launch()
        for name in outputs:
            arrays[name][...] = static[name]
        self.replays += 1
        return True

    def _held(self):
        return sum(size for _, _, size in self._entries.values())
