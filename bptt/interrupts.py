"""Signals during training: Ctrl-C (SIGINT) and SIGTERM stop :meth:`bptt.Trainer.fit` at the
last committed update, never inside one, so the trainer's state can be saved whole.

* :class:`Preempted`: what SIGTERM raises during ``fit`` (a KeyboardInterrupt carrying the
  signal number);
* :class:`DeferredInterrupt`: holds both signals back while an update and its position in the
  data are committed, then hands the first one on.
"""

import contextlib
import signal
import threading

__all__ = ["Preempted", "DeferredInterrupt"]


class Preempted(KeyboardInterrupt):
    """SIGTERM (a scheduler preempting the job, ``kill PID``) during :meth:`Trainer.fit`: raised,
    as Ctrl-C's KeyboardInterrupt is, at the last committed update, so the trainer's state is
    consistent and can be saved. A subclass of KeyboardInterrupt (code that stops on Ctrl-C stops
    on it too); ``signum`` is the signal's number (exit status 128 + signum, 143 for SIGTERM)."""

    def __init__(self, signum=signal.SIGTERM):
        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(self.signum).name}")


def _raise_preempted(signum, frame):
    raise Preempted(signum)


class DeferredInterrupt:
    """Hold back Ctrl-C (SIGINT) and SIGTERM inside the block and hand the first one that arrived
    to the handler that was in place after it (Python's SIGINT handler raises KeyboardInterrupt;
    inside :meth:`Trainer.fit` SIGTERM's raises :class:`Preempted`). Main thread only; elsewhere
    signals cannot arrive in Python code anyway.

    ``DeferredInterrupt.preemptible()`` (a context manager and decorator, on ``fit``): inside it
    SIGTERM raises Preempted instead of ending the process, where its handler is the default
    one; the default is back after it, so a second SIGTERM while the caller saves ends the
    process at once (the atomic checkpoint write leaves the previous file whole)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.pending = None
        self.active = threading.current_thread() is threading.main_thread()
        if self.active:
            self.previous = {s: signal.signal(s, self._hold) for s in self.SIGNALS}
        return self

    def _hold(self, signum, frame):
        if self.pending is None:
            self.pending = (signum, frame)

    def __exit__(self, *exc):
        if not self.active:
            return False
        for s, previous in self.previous.items():
            if previous is None:    # set outside Python: put Python's defaults back
                previous = signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL
                self.previous[s] = previous
            signal.signal(s, previous)
        if self.pending is not None:
            signum = self.pending[0]
            previous = self.previous[signum]
            if callable(previous):
                previous(*self.pending)              # Python's default raises KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt if signum == signal.SIGINT else Preempted(signum)
        return False

    @staticmethod
    @contextlib.contextmanager
    def preemptible():
        if threading.current_thread() is not threading.main_thread() \
                or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
            yield                        # another thread, or the caller handles SIGTERM itself
            return
        signal.signal(signal.SIGTERM, _raise_preempted)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
