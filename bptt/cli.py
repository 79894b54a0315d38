"""The ``bptt`` command line: ``bptt train``, ``bptt eval``, ``bptt sample`` (also ``python -m bptt``).

``bptt train`` with no arguments trains a small character-level LSTM language model with
truncated BPTT on the offline default corpus (the Python help topics shipped with the standard
library, see :mod:`bptt.data`), shows a progress bar on stderr, writes a checkpoint to
``runs/default`` and prints a sample. ``bptt train --task copy|adding`` trains a SequenceModel
on a synthetic long-range task instead (:mod:`bptt.tasks`).

Run directory (``--out``): ``checkpoint.npz`` (weights, optimizer and trainer state; the
vocabulary and this command's configuration travel in its meta) and ``metrics.jsonl`` (one JSON
object per line, appended by every train and eval run).

``--json`` makes the last line of stdout one JSON object with the final metrics. User errors
(a missing file, a bad flag combination, k1 > k2, an unknown backend) print one line on stderr
and exit with status 1 (2 for unparsable arguments); set ``BPTT_DEBUG=1`` for a traceback.

Only the standard library is imported before the arguments are parsed, so ``bptt --help`` is
instant; NumPy, Numba and the kernels load when a command runs.

Examples::

    bptt train                                    # char LSTM on the built-in corpus -> runs/default
    bptt train --data ptb.train.txt --level word --cell gru --hidden-size 256 --out runs/ptb
    bptt train --out runs/ptb --resume --epochs 1  # one more epoch of that run
    bptt eval runs/default --data other.txt --json
    bptt sample runs/default --prime "def " --length 200 --temperature 0.7 --top-k 10
    bptt train --task copy --k1 10 --k2 10         # TBPTT window shorter than the 25-step recall: chance
    bptt train --task copy --k1 10 --k2 30         # window spans it: recall accuracy > 0.9
    bptt train --grad-norms --cell rnn_tanh --k1 20 --k2 60   # writes grad_norms.json / .png
"""

import argparse
import json
import math
import os
import sys
import threading
import time

CHECKPOINT_FILE = "checkpoint.npz"
METRICS_FILE = "metrics.jsonl"
EVAL_BATCH = 10  # token streams for validation and `bptt eval` (tasks: sequences per batch 250)


def _eval_batch(n_tokens):
    """Streams for evaluating a token stream: EVAL_BATCH, fewer for short data (2 tokens each)."""
    return max(1, min(EVAL_BATCH, n_tokens // 2))
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
TASKS = ("copy", "adding")

# Defaults of `bptt train` on a text corpus: small enough to finish in a couple of minutes on
# two CPU cores (615 updates: 3 epochs of the 465,000-character default corpus, ~45 s on an
# idle pair of cores), big enough to produce recognisable words and Python keywords
# (validation ~1.3 nats/char; more epochs overfit this small corpus).
LM_DEFAULTS = dict(level="char", max_chars=None, cell="lstm", hidden_size=256, num_layers=1,
                   embedding_size=32, dropout=0.0, forget_bias=0.0, k1=32, k2=32, batch_size=64,
                   optimizer="adam", lr=1e-2, clip=1.0, epochs=3, max_steps=None, sample_length=300)
# Defaults of `bptt train --task copy|adding`: full BPTT unless --k1/--k2 are given.
# The copy task's T = 2*4 + 20 + 1 = 29 steps fit TBPTT chunks of k1 = 10 (the last chunk, 9
# steps, holds every recall position), and the LSTM starts with forget gates near 1 (sigmoid(2)
# = 0.88) so that gradients survive the 25-step dependency early in training (with 0, PyTorch's
# init, full BPTT needs many more updates; with 3 the random memory alone lets TBPTT(10, 10)
# decode some symbols, which blurs the comparison).
TASK_DEFAULTS = dict(cell="lstm", hidden_size=64, num_layers=1, dropout=0.0, forget_bias=2.0, k1=None,
                     k2=None, batch_size=32, optimizer="adam", lr=1e-2, clip=1.0, epochs=1, max_steps=1000,
                     lag=20, n_symbols=4, n_train=32_000, n_valid=1000)
# The adding problem over 100 steps: 3000 updates bring the MSE from the 0.167 baseline to ~1e-3.
ADDING_DEFAULTS = dict(lag=100, epochs=3, max_steps=3000)
# Flags that define the model or its data: fixed by the checkpoint when resuming.
FIXED_ON_RESUME = ("data", "level", "max_chars", "task", "lag", "n_symbols", "n_train", "cell",
                   "hidden_size", "num_layers", "embedding_size", "dropout", "forget_bias", "dtype", "k1", "k2",
                   "batch_size", "optimizer", "lr", "clip", "seed")


class UsageError(Exception):
    """A user error: reported as one line on stderr, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a parse error as one line (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _non_negative(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value >= 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
        return value
    parse.__name__ = f"non-negative {kind.__name__}"
    return parse


def build_parser():
    """The argument parser of the ``bptt`` command (stdlib only)."""
    parser = _Parser(prog="bptt", description="Train recurrent networks with exact (truncated) "
                     "backpropagation through time: train, evaluate, sample.")
    parser.add_argument("--version", action="version", version="bptt 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,sample}", parser_class=_Parser)
    sub.required = True

    # Defaults are None here and resolved in _resolve_train: they differ between a language
    # model and a task, and a resumed run must tell given flags from defaults.
    t = sub.add_parser("train", help="train a model (default: char-level LSTM on the built-in corpus)",
                       description="Train a language model on a UTF-8 text file (default: the Python "
                       "help topics shipped with Python, offline), or a sequence model on a synthetic "
                       "long-range task (--task). Defaults (language model / task): " +
                       ", ".join(f"{k}={v}" for k, v in LM_DEFAULTS.items()) + " / " +
                       ", ".join(f"{k}={v}" for k, v in TASK_DEFAULTS.items()) + " (adding: " +
                       ", ".join(f"{k}={v}" for k, v in ADDING_DEFAULTS.items()) + ").")
    g = t.add_argument_group("data")
    g.add_argument("--data", metavar="FILE", help="UTF-8 text file (default: the built-in corpus)")
    g.add_argument("--level", choices=("char", "word"), help="tokens: characters, or words + <eos> per line")
    g.add_argument("--max-chars", type=_positive(int), metavar="N",
                   help="read at most the first N characters (default: all)")
    g.add_argument("--task", choices=TASKS, help="train on a synthetic task instead of text")
    g.add_argument("--lag", type=_non_negative(int), metavar="N",
                   help="copy: blank steps between symbols and recall; adding: sequence length")
    g.add_argument("--n-symbols", type=_positive(int), metavar="S", help="copy: symbols to remember")
    g.add_argument("--n-train", type=_positive(int), metavar="N", help="task: training sequences")
    g = t.add_argument_group("model")
    g.add_argument("--cell", choices=CELLS)
    g.add_argument("--hidden-size", type=_positive(int), metavar="N")
    g.add_argument("--num-layers", type=_positive(int), metavar="N")
    g.add_argument("--embedding-size", type=_positive(int), metavar="N", help="language model only")
    g.add_argument("--dropout", type=_non_negative(float), metavar="P", help="between layers (language model)")
    g.add_argument("--forget-bias", type=float, metavar="B",
                   help="LSTM: added to the forget-gate biases at initialisation (default 0 = PyTorch's "
                   "init for text, 2 for tasks: forget gates start near sigmoid(2) = 0.88)")
    g.add_argument("--dtype", choices=("float32", "float64"))
    g = t.add_argument_group("training")
    g.add_argument("--k1", type=_positive(int), metavar="N", help="TBPTT: update every k1 steps")
    g.add_argument("--k2", type=_positive(int), metavar="N",
                   help="TBPTT: backpropagate through the last k2 steps (k2 >= k1); "
                   "tasks: both unset = full BPTT")
    g.add_argument("--batch-size", type=_positive(int), metavar="N")
    g.add_argument("--optimizer", choices=("sgd", "adam"))
    g.add_argument("--lr", type=_positive(float), metavar="X")
    g.add_argument("--clip", type=_non_negative(float), metavar="X", help="global gradient-norm clip (0 = off)")
    g.add_argument("--epochs", type=_positive(int), metavar="N")
    g.add_argument("--max-steps", type=_positive(int), metavar="N", help="stop after N updates")
    g.add_argument("--seed", type=int, metavar="N", help="initialisation, data and sampling seed (default 0)")
    g = t.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", help="run directory (default runs/default, runs/<task>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out for --max-steps more updates")
    g.add_argument("--backend", metavar="NAME", help="cpu, cuda, cupy, reference or auto (default: $BPTT_BACKEND or auto)")
    g.add_argument("--grad-norms", action="store_true",
                   help="record per-step gradient norms dL/dh_t and write grad_norms.json (and .png with matplotlib)")
    g.add_argument("--sample-length", type=_non_negative(int), metavar="N", help="tokens sampled at the end (0 = none)")
    g.add_argument("--json", action="store_true", help="last stdout line: one JSON object of final metrics")

    e = sub.add_parser("eval", help="loss, perplexity and bits per token of a trained model",
                       description="Evaluate the checkpoint in DIR on FILE (every token of it, encoded "
                       "with the model's vocabulary, unseen symbols as <unk>), or without --data on the "
                       "held-out part of its training corpus (tasks: fresh sequences).")
    e.add_argument("run_dir", metavar="DIR")
    e.add_argument("--data", metavar="FILE")
    e.add_argument("--batch-size", type=_positive(int), metavar="N",
                   help=f"streams or sequences per batch (default {EVAL_BATCH}, fewer for short data)")
    e.add_argument("--backend", metavar="NAME")
    e.add_argument("--json", action="store_true")

    s = sub.add_parser("sample", help="generate text from a trained language model")
    s.add_argument("run_dir", metavar="DIR")
    s.add_argument("--length", type=_non_negative(int), default=300, metavar="N", help="tokens to generate")
    s.add_argument("--temperature", type=_non_negative(float), default=0.8, metavar="X", help="0 = greedy")
    s.add_argument("--top-k", type=_positive(int), metavar="K")
    s.add_argument("--prime", default="", metavar="TEXT", help="text the model reads first")
    s.add_argument("--seed", type=int, default=0, metavar="N")
    s.add_argument("--backend", metavar="NAME")
    s.add_argument("--json", action="store_true")
    return parser


# ---------------------------------------------------------------------------------------------
# small helpers


def _flag(name):
    return "--" + name.replace("_", "-")


def _append_jsonl(run_dir, record):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, METRICS_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _checkpoint_path(run_dir):
    path = os.path.join(run_dir, CHECKPOINT_FILE)
    if not os.path.isfile(path):
        if not os.path.isdir(run_dir):
            raise UsageError(f"{run_dir}: no such run directory")
        raise UsageError(f"{run_dir}: no checkpoint ({CHECKPOINT_FILE}) in this directory")
    return path


def _select_backend(name):
    import bptt
    if name is not None:
        bptt.use_backend(name)
    return bptt.get_backend()


def _finite(x):
    return None if x is None or not math.isfinite(x) else float(x)


def _fmt_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """A trainer callback drawing a progress line on ``stream`` (stderr).

    On a terminal the line is redrawn in place (``\\r``) at most 10 times a second; otherwise a
    new line is written every 10 seconds and at the end (``every_s`` overrides either). Shows the update step (of
    ``total`` when known), an exponential moving average of the loss, tokens/s and the ETA.
    Every ``log_every`` steps the event is also appended to the run's JSONL log. Tokens are the
    event's (the chunk's steps x streams) unless ``tokens_per_update`` says how many steps x
    sequences one update stands for (tasks, where chunks without targets make no update).
    ``wait_notice``: a line written once if no update has arrived ``wait_notice_s`` seconds after
    construction (the first run of a Numba backend compiles its kernels before the first update).
    """

    def __init__(self, total, stream=None, every_s=None, run_dir=None, log_every=50, tokens_per_update=None,
                 wait_notice=None, wait_notice_s=3.0):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = every_s if every_s is not None else 0.1 if self.tty else 10.0
        self.run_dir = run_dir
        self.log_every = log_every
        self.tokens_per_update = tokens_per_update
        self.start = time.monotonic()
        self.last_draw = -math.inf
        self.avg_loss = None
        self.losses = []
        self.tokens = 0
        self.step = 0
        self.first_step = None
        self.last_event = None
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
        if self._waiting is not None:
            self._stop_waiting()
        loss = float(event["loss"])
        self.losses.append(loss)
        if math.isfinite(loss):
            self.avg_loss = loss if self.avg_loss is None else 0.95 * self.avg_loss + 0.05 * loss
        self.tokens += self.tokens_per_update or int(event.get("tokens", 0) or 0)
        self.step = int(event["step"])
        if self.first_step is None:
            self.first_step = self.step
            self.first_time = time.monotonic()   # the ETA leaves out the first update (JIT warm-up)
        self.last_event = event
        if self.run_dir is not None and self.step % self.log_every == 0:
            _append_jsonl(self.run_dir, {"event": "step", "time": time.time(),
                                         **{k: _jsonable(v) for k, v in event.items()}})
        now = time.monotonic()
        if now - self.last_draw >= self.every_s:
            self.draw(now)

    def elapsed(self):
        return time.monotonic() - self.start

    def tokens_per_s(self):
        return self.tokens / max(self.elapsed(), 1e-9)

    def line(self, now):
        elapsed = now - self.start
        done = self.step - (self.first_step or 1) + 1
        if self.total:
            frac = min(done / self.total, 1.0)
            bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
            head = f"step {self.step} [{bar}] {100 * frac:3.0f}%"
            if done > 1:
                eta = (now - self.first_time) / (done - 1) * (self.total - done)
                tail = f"eta {_fmt_duration(max(eta, 0))}"
            else:
                tail = "eta -:--"
        else:
            head, tail = f"step {self.step}", ""
        loss = "nan" if self.avg_loss is None else f"{self.avg_loss:.4f}"
        return (f"train {head}  loss {loss}  {self.tokens / max(elapsed, 1e-9):,.0f} tok/s  "
                f"{_fmt_duration(elapsed)} {tail}").rstrip()

    def draw(self, now=None):
        now = time.monotonic() if now is None else now
        self.last_draw = now
        if self.step == 0:
            return
        text = self.line(now)
        if self.tty:
            self.stream.write("\r" + text.ljust(getattr(self, "_width", 0)))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        self._stop_waiting()
        self.draw()
        if self.tty and self.step:
            self.stream.write("\n")
            self.stream.flush()

    def recent_loss(self, n=50):
        """Mean of the last ``n`` finite update losses (None before any)."""
        tail = [x for x in self.losses[-n:] if math.isfinite(x)]
        return sum(tail) / len(tail) if tail else None


def _jsonable(value):
    try:
        import numpy as np
        if isinstance(value, np.generic):
            value = value.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


# ---------------------------------------------------------------------------------------------
# train


def _resolve_train(args):
    """Check flag combinations and fill defaults into a plain config dict (raises UsageError)."""
    given = {k: v for k, v in vars(args).items() if v is not None and k != "command"}
    cfg = {}
    if args.resume:
        return given
    if args.task is not None:
        for name in ("data", "level", "max_chars", "embedding_size"):
            if name in given:
                raise UsageError(f"{_flag(name)} is for text corpora and cannot be used with --task {args.task}")
        if args.task == "adding" and "n_symbols" in given:
            raise UsageError("--n-symbols is for --task copy, not --task adding")
        if args.sample_length:
            raise UsageError("--sample-length is for language models, not --task")
        cfg.update(TASK_DEFAULTS)
        if args.task == "adding":
            cfg.update(ADDING_DEFAULTS)
    else:
        for name in ("lag", "n_symbols", "n_train"):
            if name in given:
                raise UsageError(f"{_flag(name)} needs --task copy or --task adding")
        cfg.update(LM_DEFAULTS, data=None)
    cfg.update(given)
    cfg.setdefault("seed", 0)
    cfg.setdefault("dtype", "float32")
    cfg.setdefault("out", os.path.join("runs", args.task or "default"))
    if args.task == "adding" and cfg["lag"] < 2:
        raise UsageError(f"--lag is the sequence length of --task adding and must be >= 2; got {cfg['lag']}")
    # TBPTT: one given -> the other equal; none -> defaults (tasks: full BPTT)
    k1, k2 = given.get("k1"), given.get("k2")
    if k1 is None and k2 is None:
        k1, k2 = cfg["k1"], cfg["k2"]
    elif k1 is None or k2 is None:
        k1 = k2 = k1 or k2
    if k1 is not None and k1 > k2:
        raise UsageError(f"--k1 ({k1}) must be <= --k2 ({k2}): every k1 steps the last k1 losses are "
                         "backpropagated through the last k2 steps")
    cfg["k1"], cfg["k2"] = k1, k2
    if "forget_bias" in given and cfg["cell"] != "lstm":
        raise UsageError(f"--forget-bias is for --cell lstm, not --cell {cfg['cell']}")
    if cfg["dropout"] >= 1:
        raise UsageError(f"--dropout must be in [0, 1); got {cfg['dropout']}")
    if cfg["dropout"] and args.task:
        raise UsageError("--dropout is for language models, not --task")
    return cfg


def _check_resume(cfg, meta):
    saved = meta.get("config", {})
    for name in FIXED_ON_RESUME:
        if name in cfg and cfg[name] != saved.get(name):
            raise UsageError(f"{_flag(name)} {cfg[name]} differs from the checkpoint's "
                             f"{saved.get(name)!r}: a resumed run keeps its model, data and optimizer")
    merged = dict(saved)
    for name in ("epochs", "max_steps", "json", "grad_norms", "sample_length", "backend", "out"):
        if name in cfg:
            merged[name] = cfg[name]
    merged["resume"] = True
    return merged


def _load_corpus(cfg, vocab=None):
    from bptt.data import load_corpus
    return load_corpus(cfg["data"], cfg["level"], max_chars=cfg["max_chars"], vocab=vocab)


def _task_data(cfg, n, seed):
    from bptt.tasks import make_task
    return make_task(cfg["task"], n, cfg["lag"], n_symbols=cfg.get("n_symbols") or 4, seed=seed)


def _build_model(cfg, vocab_size=None):
    import numpy as np
    import bptt
    dtype = np.dtype(cfg["dtype"]).type
    if cfg.get("task") is None:
        model = bptt.LanguageModel(vocab_size, cfg["embedding_size"], cfg["hidden_size"],
                                   num_layers=cfg["num_layers"], cell=cfg["cell"], dropout=cfg["dropout"],
                                   dtype=dtype, seed=cfg["seed"])
    elif cfg["task"] == "copy":
        from bptt.tasks import COPY_ALPHABET, COPY_INPUT_SIZE
        model = bptt.SequenceModel(COPY_INPUT_SIZE, cfg["hidden_size"], COPY_ALPHABET,
                                   num_layers=cfg["num_layers"], cell=cfg["cell"], readout="every_step",
                                   dtype=dtype, seed=cfg["seed"])
    else:
        model = bptt.SequenceModel(2, cfg["hidden_size"], 1, num_layers=cfg["num_layers"], cell=cfg["cell"],
                                   readout="last_step", dtype=dtype, seed=cfg["seed"])
    if cfg["cell"] == "lstm" and cfg.get("forget_bias"):
        _add_forget_bias(model, cfg["forget_bias"])
    return model


def _add_forget_bias(model, value):
    """Add ``value`` to the forget-gate part (rows H..2H of the gate order i, f, g, o) of every
    LSTM level's ``bias_ih`` (Gers et al. 2000; Jozefowicz et al. 2015 use 1)."""
    sd = model.state_dict()
    H = model.hidden_size
    for k in range(model.num_layers):
        name = f"rnn.bias_ih_l{k}"
        if name in sd:
            sd[name] = sd[name].copy()
            sd[name][H:2 * H] += value
    model.load_state_dict(sd)


def _build_trainer(cfg, model):
    import bptt
    if cfg["optimizer"] == "adam":
        optimizer = bptt.Adam(lr=cfg["lr"])
    else:
        optimizer = bptt.SGD(cfg["lr"])
    return bptt.Trainer(model, optimizer, k1=cfg["k1"], k2=cfg["k2"], clip_norm=cfg["clip"] or None,
                        record_grad_norms=bool(cfg.get("grad_norms")))


def _steps_per_epoch(cfg, data):
    """Updates in one epoch of ``Trainer.fit``. Token stream: cut into batch_size streams, one
    update per k1-step chunk. Task: one update per k1-step chunk of each batch that holds a
    scored target (chunks before the first target make none)."""
    import numpy as np
    b, k1 = cfg["batch_size"], cfg["k1"]
    if cfg.get("task") is None:
        return math.ceil(max(len(data) // b - 1, 1) / k1)
    inputs, targets = data
    batches = math.ceil(len(inputs) / b)
    if k1 is None:
        return batches
    if targets.ndim == 2 and targets.dtype.kind in "iu":   # every-step class targets, -1 = none
        scored = np.nonzero((targets >= 0).any(axis=0))[0]
        chunks = len({int(t) // k1 for t in scored})
    else:                                                    # last-step targets
        chunks = 1
    return batches * chunks


class _StopRequested(Exception):
    pass


class _StopAfterUpdate:
    """Ctrl-C during training stops after the current update, so the checkpoint saved then is
    consistent (weights, optimizer and stream position all after the same update); a second
    Ctrl-C interrupts at once. Used as a context manager (installs the SIGINT handler in the
    main thread) and as a trainer callback (raises between updates once a stop was asked)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, kind, value, tb):
        import signal
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return kind is _StopRequested

    def _on_sigint(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __call__(self, event):
        if self.requested:
            raise _StopRequested


class _Data:
    """What training reads: ``train``/``valid`` (token streams, or (inputs, targets) of a task),
    ``vocab`` (None for tasks), ``per_epoch`` (updates per epoch), ``line`` (a summary for
    stderr), ``tokens_per_update`` (tasks: steps x sequences one update stands for; else None)."""

    def __init__(self, train, valid, vocab, per_epoch, line, tokens_per_update=None):
        self.train, self.valid, self.vocab = train, valid, vocab
        self.per_epoch, self.line, self.tokens_per_update = per_epoch, line, tokens_per_update


def _prepare_data(cfg, vocab=None):
    """Read the corpus (``vocab``: encode with it) or generate the task's sequences."""
    task = cfg.get("task")
    if task is None:
        corpus = _load_corpus(cfg, vocab)
        line = (f"data: {corpus.source} ({corpus.n_chars:,} chars, {cfg['level']} level, vocab {len(corpus.vocab)}, "
                f"{len(corpus.train):,} train / {len(corpus.valid):,} valid tokens)")
        return _Data(corpus.train, corpus.valid, corpus.vocab, _steps_per_epoch(cfg, corpus.train), line)
    train = _task_data(cfg, cfg["n_train"], cfg["seed"])
    valid = _task_data(cfg, cfg.get("n_valid") or TASK_DEFAULTS["n_valid"], cfg["seed"] + 1_000_003)
    seq_len = train[0].shape[1]
    per_epoch = _steps_per_epoch(cfg, train)
    line = (f"data: task {task}, lag {cfg['lag']}, sequence length {seq_len}, "
            f"{cfg['n_train']:,} train / {len(valid[0]):,} valid sequences")
    return _Data(train, valid, None, per_epoch, line, cfg["n_train"] * seq_len / per_epoch)


def cmd_train(args):
    cfg = _resolve_train(args)
    import warnings
    # overflow warnings of a diverging run would bury the trainer's one-line non-finite error
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="bptt")
    out = cfg.get("out") or os.path.join("runs", args.task or "default")
    if args.resume:
        ckpt_path = _checkpoint_path(out)
        meta = _read_meta(ckpt_path)
        cfg = _check_resume(cfg, meta)   # flag conflicts first, before any backend is chosen
        backend = _select_backend(cfg.get("backend"))
        import bptt
        from bptt.data import Vocabulary
        trainer = bptt.Trainer.from_checkpoint(ckpt_path)
        model = trainer.model
        trainer.record_grad_norms = trainer.record_grad_norms or bool(cfg.get("grad_norms"))
        data = _prepare_data(cfg, Vocabulary.from_json(meta["vocab"]) if meta.get("vocab") else None)
    else:
        data = _prepare_data(cfg)        # data errors first, before any backend is chosen
        backend = _select_backend(cfg.get("backend"))
        import bptt
        model = _build_model(cfg, len(data.vocab) if data.vocab else None)
        trainer = _build_trainer(cfg, model)
    task = cfg.get("task")
    vocab, train_data, valid_data, total_per_epoch = data.vocab, data.train, data.valid, data.per_epoch

    # fit's epochs and max_steps are totals over the trainer's life: a resumed run trains
    # --max-steps more updates and --epochs more epochs (an unfinished epoch counts as one)
    max_steps = trainer.step + cfg["max_steps"] if cfg.get("max_steps") else None
    epochs = trainer.epoch + cfg["epochs"]
    total = min(total_per_epoch * cfg["epochs"], cfg["max_steps"] or math.inf)
    tbptt = "full BPTT" if cfg["k1"] is None else f"TBPTT k1={cfg['k1']} k2={cfg['k2']}"
    err = sys.stderr
    print(data.line, file=err)
    fb = f", forget bias {cfg['forget_bias']}" if cfg["cell"] == "lstm" and cfg.get("forget_bias") else ""
    print(f"model: {cfg['cell']} {cfg['num_layers']}x{cfg['hidden_size']}{fb}, {tbptt}, batch {cfg['batch_size']}, "
          f"{cfg['optimizer']} lr {cfg['lr']}, clip {cfg['clip']}, backend {backend.NAME}, "
          f"{'resuming' if args.resume else 'run dir'} {out}", file=err)

    os.makedirs(out, exist_ok=True)
    compiles = backend.NAME in ("cpu", "cuda")       # Numba: compiled on first use, then cached
    notice = ("(no update yet: the first run on a machine compiles the kernels, about 20 s; "
              "later runs load them from the cache)") if compiles else None
    progress = Progress(total, run_dir=out, tokens_per_update=data.tokens_per_update, wait_notice=notice)
    meta = {"config": {k: v for k, v in cfg.items() if k not in ("json", "resume", "backend", "out")},
            "vocab": vocab.to_json() if vocab else None, "bptt_version": bptt.__version__}
    ckpt = os.path.join(out, CHECKPOINT_FILE)
    stop = _StopAfterUpdate()
    try:
        with stop:
            trainer.fit(train_data, cfg["batch_size"], epochs=epochs, max_steps=max_steps,
                        callbacks=(progress, stop))
    finally:
        progress.close()
    trainer.save_checkpoint(ckpt, meta=meta)
    if stop.requested:
        print(f"interrupted after update {trainer.step}: checkpoint saved to {ckpt}; continue with --resume",
              file=err)
        return 130
    wall = progress.elapsed()

    summary = {"command": "train", "task": task or "lm", "steps": int(trainer.step),
               "updates_this_run": len(progress.losses), "tokens": int(round(progress.tokens)),
               "tokens_per_s": round(progress.tokens_per_s(), 1), "wall_s": round(wall, 2),
               "train_loss": _finite(progress.recent_loss()), "backend": backend.NAME,
               "out": out, "checkpoint": ckpt}
    if task is None:
        metrics = trainer.evaluate(valid_data, _eval_batch(len(valid_data)))
        summary.update(val_loss=_finite(metrics["loss"]), val_perplexity=_finite(metrics["perplexity"]),
                       val_bits_per_token=_finite(metrics["bits_per_token"]))
    else:
        summary.update(_task_metrics(cfg, model, trainer, valid_data))
    if cfg.get("grad_norms"):
        summary["grad_norms_file"] = _write_grad_norms(trainer, out)

    lines = [f"done: {summary['steps']} steps in {_fmt_duration(wall)} ({summary['tokens_per_s']:,.0f} tok/s), "
             f"train loss {_num(summary['train_loss'])}"]
    if task is None:
        lines.append(f"validation: loss {_num(summary['val_loss'])}, perplexity {_num(summary['val_perplexity'])}, "
                     f"{_num(summary['val_bits_per_token'])} bits/{cfg['level']}")
    elif task == "copy":
        lines.append(f"validation: loss {_num(summary['val_loss'])}, recall accuracy "
                     f"{summary['recall_accuracy']:.3f} (chance 0.125)")
    else:
        lines.append(f"validation: MSE {summary['val_mse']:.4f} (baseline of answering 1: "
                     f"{summary['baseline_mse']:.4f})")
    lines.append(f"checkpoint: {ckpt}")
    print("\n".join(lines), file=err if args.json else sys.stdout)

    if task is None and cfg.get("sample_length"):
        from bptt.sampling import sample
        text = sample(model, vocab, cfg["sample_length"], temperature=0.8, seed=cfg["seed"])
        summary["sample"] = text
        print("--- sample (temperature 0.8) ---\n" + text + "\n---", file=err if args.json else sys.stdout)
    _append_jsonl(out, {"event": "train_end", "time": time.time(), **summary,
                        "config": meta["config"]})
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0


def _num(x, digits=4):
    return "nan" if x is None else f"{x:.{digits}f}"


def _task_metrics(cfg, model, trainer, valid_data):
    """Validation metrics of a task model: loss (the trainer's: cross-entropy per recalled symbol,
    or MSE); copy: recall_accuracy (from the model's outputs); adding: val_mse and the baseline."""
    from bptt.tasks import ADDING_BASELINE_MSE, mse, predict, recall_accuracy
    inputs, targets = valid_data
    loss = trainer.evaluate(valid_data, min(len(inputs), 250))["loss"]
    outputs = predict(model, inputs)
    if cfg["task"] == "copy":
        return {"val_loss": _finite(loss), "recall_accuracy": recall_accuracy(outputs, targets),
                "chance_accuracy": 0.125}
    return {"val_loss": _finite(loss), "val_mse": mse(outputs, targets), "baseline_mse": ADDING_BASELINE_MSE}


def _write_grad_norms(trainer, out):
    """Write the trainer's gradient diagnostics (per update: ||dL/dh_t|| of every step of the
    backpropagated window, per level, and every parameter's gradient norm; see
    :mod:`bptt.diagnostics`) to ``grad_norms.json``, and where matplotlib is installed their plot
    to ``grad_norms.png``. Returns the JSON path."""
    from bptt import diagnostics
    path = diagnostics.save_grad_norms(trainer.history, os.path.join(out, "grad_norms.json"))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return path
    if trainer.history.get("grad_diagnostics"):
        plt.close(diagnostics.plot_grad_norms(trainer.history, os.path.join(out, "grad_norms.png")))
    return path


# ---------------------------------------------------------------------------------------------
# eval and sample


def _read_meta(path):
    """The meta dict of the checkpoint ``path`` (no model is built, no backend chosen)."""
    from bptt.checkpoint import read
    meta = read(path)[0].get("meta") or {}
    if "config" not in meta:
        raise UsageError(f"{path}: not a checkpoint written by 'bptt train' (no config in its meta)")
    return meta


def _load_run(run_dir, backend_name, check=None):
    """(model, meta, backend) of the run in ``run_dir``; ``check(meta)`` runs before a backend is
    chosen or the model built, so flag errors come first."""
    path = _checkpoint_path(run_dir)
    meta = _read_meta(path)
    if check is not None:
        check(meta)
    backend = _select_backend(backend_name)
    from bptt.checkpoint import load_model
    model, _ = load_model(path)
    return model, meta, backend


def cmd_eval(args):
    from bptt.data import Corpus, Vocabulary, read_text
    text = read_text(args.data) if args.data is not None else None   # file errors before the model loads

    def check(meta):
        task = meta["config"].get("task")
        if task is not None and args.data is not None:
            raise UsageError(f"--data is for language models; {args.run_dir} holds a --task {task} model")

    model, meta, backend = _load_run(args.run_dir, args.backend, check)
    cfg = meta["config"]
    import bptt
    if cfg.get("task") is not None:
        valid = _task_data(cfg, cfg.get("n_valid") or TASK_DEFAULTS["n_valid"], cfg["seed"] + 1_000_003)
        metrics = _task_metrics(cfg, model, bptt.Trainer(model, bptt.SGD(0.0), k1=cfg["k1"], k2=cfg["k2"]), valid)
        metrics["loss"] = metrics.pop("val_loss")
        source = f"task {cfg['task']} (the held-out sequences of training)"
    else:
        vocab = Vocabulary.from_json(meta["vocab"])
        if text is not None:
            ids, source = Corpus(text, vocab.level, 0.0, args.data, vocab).train, args.data
        else:
            ids, source = _load_corpus(cfg, vocab).valid, "held-out part of the training corpus"
        trainer = bptt.Trainer(model, bptt.SGD(0.0), k1=cfg["k1"], k2=cfg["k2"])
        m = trainer.evaluate(ids, args.batch_size or _eval_batch(len(ids)))
        metrics = {"loss": float(m["loss"]), "perplexity": float(m["perplexity"]),
                   "bits_per_token": float(m["bits_per_token"]), "tokens": int(len(ids))}
        unk = int((ids == vocab.unk_id).sum())
        if unk:
            metrics["unk_tokens"] = unk
    summary = {"command": "eval", "run_dir": args.run_dir, "data": source, "backend": backend.NAME,
               **{k: _jsonable(v) for k, v in metrics.items()}}
    _append_jsonl(args.run_dir, {"event": "eval", "time": time.time(), **summary})
    text = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    print(f"{source}: {text}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0


def cmd_sample(args):

    def check(meta):
        if meta["config"].get("task") is not None or not meta.get("vocab"):
            raise UsageError(f"{args.run_dir} holds a --task model; sampling needs a language model")

    model, meta, _ = _load_run(args.run_dir, args.backend, check)
    from bptt.data import Vocabulary
    from bptt.sampling import sample
    vocab = Vocabulary.from_json(meta["vocab"])
    text = sample(model, vocab, args.length, temperature=args.temperature, top_k=args.top_k,
                  prime=args.prime, seed=args.seed)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps({"command": "sample", "text": text, "length": args.length,
                          "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed}))
    else:
        print(text)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample}


def main(argv=None):
    """Entry point of the ``bptt`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("bptt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user errors: one line, no traceback (BPTT_DEBUG=1 shows it)
        if os.environ.get("BPTT_DEBUG") == "1" or not _is_user_error(e):
            raise
        hint = " (training diverged: try a lower --lr or --clip)" if isinstance(e, FloatingPointError) else ""
        print(f"bptt {args.command}: error: {e}{hint}", file=sys.stderr)
        return 1


def _is_user_error(e):
    from bptt.backend import BackendUnavailableError
    if isinstance(e, (UsageError, BackendUnavailableError, OSError)):
        return True
    from bptt.data import DataError
    if isinstance(e, DataError):
        return True
    # errors raised by bptt's own argument checks (shapes, values) are messages for the user,
    # and so is a diverging run (the trainer's NonFiniteError, a FloatingPointError)
    return isinstance(e, (ValueError, TypeError, FloatingPointError)) and _raised_in_bptt(e)


def _raised_in_bptt(e):
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    here = os.path.dirname(os.path.abspath(__file__))
    return filename.startswith(here) or "bptt_kernels" in filename or os.sep + "kernels" + os.sep in filename
