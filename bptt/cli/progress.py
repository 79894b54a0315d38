"""The progress display of ``bptt train`` on stderr, drawn with tqdm.

One line: the update step (of the run's last when the total is known, with a bar and the
percentage), the training loss as the mean of the last 50 updates' losses, the training
throughput, the wall time since the command began, the ETA and the last validation loss, e.g.::

    train step 120/615 [###-----------------]  20%  loss 2.0411 (mean of last 50)  val 1.9876  10,912 tok/s  00:36 eta 02:26

The throughput is that of the updates themselves: the tokens of the updates after the first of
this process over the time those updates took (validation left out). The first update is left
out because on a Numba backend it includes compiling the kernels or loading them from the cache
("? tok/s" until a second update). The ETA, from the wall time per update after the first,
includes validation. On a terminal tqdm redraws the line in place (at most 10 times a second),
its bar as wide as the terminal leaves room for; otherwise (a log file, a pipe) a plain line is
written every 10 seconds and once at the end (not twice when the last update's line was just
written). tqdm is imported on the first update, not before.
"""

import math
import shutil
import sys
import threading
import time

LOSS_WINDOW = 50   # the shown training loss: the mean of the last LOSS_WINDOW updates' losses
# (the validation figure before the throughput: a line wider than the terminal loses its end)
BAR_FORMAT = ("train step {n}/{total} [{bar:20}] {percentage:3.0f}%  loss {loss}{val}  {tokens_per_s} tok/s  "
              "{elapsed} eta {remaining}")
OPEN_FORMAT = "train step {n}  loss {loss}{val}  {tokens_per_s} tok/s  {elapsed}"   # no total known
LINE_BAR = "-#"   # the bar of plain lines: '#' done, '-' to do


class Progress:
    """A trainer callback showing the progress of ``fit`` on ``stream`` (stderr).

    total: updates this run will make (None: unknown); start_step: the trainer's step before
    them (a resumed run). every_s: seconds between redraws or lines (default 0.1 on a terminal,
    10 otherwise). Tokens are the event's (the chunk's steps x streams) unless
    ``tokens_per_update`` says how many steps x sequences one update stands for (tasks, where
    chunks without targets make no update); an update's duration is the event's "update_s"
    (the wall time between events where it is missing). An event with "val_loss" sets the
    line's "val" figure. ``wait_notice``: a line written once if no update
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
        self.losses = []
        self.tokens = 0
        self.timed_tokens = 0      # tokens of the updates after the first
        self.timed_s = 0.0         # and the seconds those updates took
        self.val_loss = None       # the last validation's loss
        self.step = start_step
        self.first_step = self.first_time = self.last_time = None
        self.written_step = None   # the step of the last plain line
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
        self.losses.append(float(event["loss"]))
        tokens = self.tokens_per_update or int(event.get("tokens", 0) or 0)
        self.tokens += tokens
        self.step = int(event["step"])
        if "val_loss" in event:
            self.val_loss = float(event["val_loss"])
        now = time.monotonic()
        if self.first_step is None:
            self.first_step, self.first_time = self.step, now
        else:
            self.timed_tokens += tokens
            self.timed_s += float(event["update_s"]) if "update_s" in event else now - self.last_time
        self.last_time = now
        if self.tty:
            if self.bar is None:
                self.bar = _terminal_bar(self)
            self.bar.update(self.step - self.bar.n)      # tqdm redraws at most every every_s
        elif now - self.last_line >= self.every_s:
            self.last_line = now
            self._write_line(self.line(now))
            self.written_step = self.step

    def fields(self, now):
        """The arguments of ``tqdm.format_meter`` for the line at time ``now``."""
        elapsed = now - self.start
        after_first = self.step - self.first_step if self.first_step is not None else 0
        rate = after_first / (now - self.first_time) if after_first > 0 and now > self.first_time else None
        known = bool(self.total)
        loss, n = self.recent_loss(), min(len(self.losses), LOSS_WINDOW)
        throughput = self.training_tokens_per_s()
        # initial: with no rate (before a second update) tqdm would derive one from n and elapsed
        return dict(n=self.step, total=self.start_step + self.total if known else None, elapsed=elapsed,
                    rate=rate, initial=self.step if rate is None else self.start_step,
                    bar_format=BAR_FORMAT if known else OPEN_FORMAT,
                    loss=f"{_num(loss)} (mean of last {n})",
                    tokens_per_s="?" if throughput is None else f"{throughput:,.0f}",
                    val="" if self.val_loss is None else f"  val {_num(self.val_loss)}")

    def line(self, now=None):
        """The progress line as text (the plain lines written off a terminal)."""
        from tqdm import tqdm
        return tqdm.format_meter(ascii=LINE_BAR, **self.fields(time.monotonic() if now is None else now))

    def close(self):
        """End the display: the final state on the terminal, or a last plain line."""
        self._stop_waiting()
        if self.bar is not None:
            self.bar.close()
        elif not self.tty and self.first_step is not None and self.written_step != self.step:
            self._write_line(self.line())
            self.written_step = self.step

    def elapsed(self):
        return time.monotonic() - self.start

    def training_tokens_per_s(self):
        """Tokens per second of the updates after the first (None before a second update)."""
        return self.timed_tokens / max(self.timed_s, 1e-9) if self.timed_s > 0 else None

    def tokens_per_s(self):
        """The training throughput (:meth:`training_tokens_per_s`); with a single update, that
        update's tokens over the time since the start (compiling included)."""
        rate = self.training_tokens_per_s()
        return rate if rate is not None else self.tokens / max(self.elapsed(), 1e-9)

    def recent_loss(self, n=LOSS_WINDOW):
        """Mean of the last ``n`` finite update losses (None before any)."""
        tail = [x for x in self.losses[-n:] if math.isfinite(x)]
        return sum(tail) / len(tail) if tail else None


def _num(x):
    return "nan" if x is None or not math.isfinite(x) else f"{x:.4f}"


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


class _PlainLines:
    """The stream of a tqdm bar off a terminal: every redraw becomes a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def byte_bar(description, total, stream=None):
    """A progress bar of one pass of ``bptt prepare`` over ``total`` bytes on ``stream`` (stderr):
    bytes done, percentage, MB/s and ETA, e.g. ``write big.txt:  40%|####      | 800M/2.00G
    [00:10<00:15, 80.0MB/s]``; redrawn in place on a terminal, otherwise a line every 10 s and
    one at the end of a pass that took longer than that (a short pass writes none). A factory of
    the ``progress`` argument of :func:`bptt.prepared.prepare`."""
    from tqdm import tqdm
    stream = stream if stream is not None else sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    every_s = 0.1 if tty else 10.0
    return tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1000, leave=True,
                file=stream if tty else _PlainLines(stream), mininterval=every_s, delay=0 if tty else every_s,
                dynamic_ncols=tty, ascii=not tty)
