"""The progress display of ``bptt train`` on stderr, drawn with tqdm.

One line: the update step (of the run's last when the total is known, with a bar and the
percentage), an exponential moving average of the loss, tokens per second, the wall time since
the command began and the ETA, e.g.::

    train step 120/615 [###-----------------]  20%  loss 2.0411  10,912 tok/s  00:36 eta 02:26

On a terminal tqdm redraws the line in place (at most 10 times a second), its bar as wide as the
terminal leaves room for; otherwise (a log file, a pipe) a plain line is written every 10
seconds and at the end. The ETA leaves out the first
update, which on a Numba backend includes compiling the kernels. tqdm is imported on the first
update, not before.
"""

import math
import shutil
import sys
import threading
import time

BAR_FORMAT = ("train step {n}/{total} [{bar:20}] {percentage:3.0f}%  loss {loss}  {tokens_per_s} tok/s  "
              "{elapsed} eta {remaining}")
OPEN_FORMAT = "train step {n}  loss {loss}  {tokens_per_s} tok/s  {elapsed}"   # no total known
LINE_BAR = "-#"   # the bar of plain lines: '#' done, '-' to do


class Progress:
    """A trainer callback showing the progress of ``fit`` on ``stream`` (stderr).

    total: updates this run will make (None: unknown); start_step: the trainer's step before
    them (a resumed run). every_s: seconds between redraws or lines (default 0.1 on a terminal,
    10 otherwise). Tokens are the event's (the chunk's steps x streams) unless
    ``tokens_per_update`` says how many steps x sequences one update stands for (tasks, where
    chunks without targets make no update). ``wait_notice``: a line written once if no update
    has arrived ``wait_notice_s`` seconds after construction (the first run of a Numba backend
    compiles its kernels before the first update).
    """

    def __init__(self, total, stream=None, every_s=None, start_step=0, tokens_per_update=None,
                 wait_notice=None, wait_notice_s=3.0):
        self.total = total
        self.start_step = start_step
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = every_s if every_s is not None else 0.1 if self.tty else 10.0
        self.tokens_per_update = tokens_per_update
        self.start = time.monotonic()
        self.last_line = -math.inf
        self.avg_loss = None
        self.losses = []
        self.tokens = 0
        self.step = start_step
        self.first_step = self.first_time = None
        self.bar = None        # the tqdm bar on a terminal, made at the first update
        self._waiting = None
        if wait_notice:
            self._waiting = threading.Timer(wait_notice_s, self._write_line, (wait_notice,))
            self._waiting.daemon = True
            self._waiting.start()

    def _write_line(self, text):
        self.stream.write(text + "\n")
        self.stream.flush()

    def _stop_waiting(self):
        """Cancel the wait notice (if it has not been written) and wait for its thread."""
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting.join()
            self._waiting = None

    def __call__(self, event):
        self._stop_waiting()
        loss = float(event["loss"])
        self.losses.append(loss)
        if math.isfinite(loss):
            self.avg_loss = loss if self.avg_loss is None else 0.95 * self.avg_loss + 0.05 * loss
        self.tokens += self.tokens_per_update or int(event.get("tokens", 0) or 0)
        self.step = int(event["step"])
        now = time.monotonic()
        if self.first_step is None:
            self.first_step, self.first_time = self.step, now
        if self.tty:
            if self.bar is None:
                self.bar = _terminal_bar(self)
            self.bar.update(self.step - self.bar.n)      # tqdm redraws at most every every_s
        elif now - self.last_line >= self.every_s:
            self.last_line = now
            self._write_line(self.line(now))

    def fields(self, now):
        """The arguments of ``tqdm.format_meter`` for the line at time ``now``."""
        elapsed = now - self.start
        after_first = self.step - self.first_step if self.first_step is not None else 0
        rate = after_first / (now - self.first_time) if after_first > 0 and now > self.first_time else None
        known = bool(self.total)
        # initial: with no rate (before a second update) tqdm would derive one from n and elapsed
        return dict(n=self.step, total=self.start_step + self.total if known else None, elapsed=elapsed,
                    rate=rate, initial=self.step if rate is None else self.start_step, bar_format=BAR_FORMAT if known else OPEN_FORMAT,
                    loss="nan" if self.avg_loss is None else f"{self.avg_loss:.4f}",
                    tokens_per_s=f"{self.tokens / max(elapsed, 1e-9):,.0f}")

    def line(self, now=None):
        """The progress line as text (the plain lines written off a terminal)."""
        from tqdm import tqdm
        return tqdm.format_meter(ascii=LINE_BAR, **self.fields(time.monotonic() if now is None else now))

    def close(self):
        """End the display: the final state on the terminal, or a last plain line."""
        self._stop_waiting()
        if self.bar is not None:
            self.bar.close()
        elif not self.tty and self.first_step is not None:
            self._write_line(self.line())

    def elapsed(self):
        return time.monotonic() - self.start

    def tokens_per_s(self):
        return self.tokens / max(self.elapsed(), 1e-9)

    def recent_loss(self, n=50):
        """Mean of the last ``n`` finite update losses (None before any)."""
        tail = [x for x in self.losses[-n:] if math.isfinite(x)]
        return sum(tail) / len(tail) if tail else None


def _terminal_bar(progress):
    """A tqdm bar on ``progress.stream`` whose line shows ``progress.fields``."""
    from tqdm import tqdm

    class Bar(tqdm):
        monitor_interval = 0          # no monitor thread: every redraw comes from an update

        @property
        def format_dict(self):
            fields = progress.fields(time.monotonic())
            fields["bar_format"] = fields["bar_format"].replace("{bar:20}", "{bar}")   # the bar takes the width left
            return {**super().format_dict, **fields}

    # the size: tqdm's own guess on a terminal that reports none (0 x 0) hides the bar
    size = shutil.get_terminal_size()
    return Bar(total=progress.fields(progress.first_time)["total"], initial=progress.step, file=progress.stream,
               mininterval=progress.every_s, miniters=1, leave=True, ncols=size.columns, nrows=size.lines)
