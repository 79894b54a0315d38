"""The arguments of ``bptt``: the parser, the defaults of a language-model run, and the checks
that turn the parsed flags of ``bptt train`` into one plain config dict.

Standard library only (``bptt --help`` must not load NumPy): the task table of :mod:`bptt.tasks`
is read without it, and ``bptt_kernels`` imports no third-party module for its cell table.
"""

import argparse
import codecs
import math
import os

from bptt.tasks import TASK_DEFAULTS, TASK_TABLE, TASKS
from bptt_kernels import CELLS  # the cell table: plain Python, loads no NumPy

EVAL_BATCH = 10  # token streams for validation and `bptt eval` (tasks: bptt.tasks.EVAL_BATCH)

# Defaults of `bptt train` on a text corpus: small enough to finish in a couple of minutes on
# two CPU cores (615 updates: 3 epochs of the 465,000-character default corpus, ~45 s on an
# idle pair of cores), big enough to produce recognisable words and Python keywords
# (validation ~1.3 nats/char; more epochs overfit this small corpus).
LM_DEFAULTS = dict(level="char", max_chars=None, encoding="utf-8", decode_errors="strict", cell="lstm", hidden_size=256, num_layers=1,
                   embedding_size=32, dropout=0.0, forget_bias=0.0, k1=32, k2=32, batch_size=64,
                   optimizer="adam", lr=1e-2, clip=1.0, epochs=3, max_steps=None, sample_length=300)
# Flags that define the model or its data: fixed by the checkpoint when resuming.
FIXED_ON_RESUME = ("data", "level", "max_chars", "encoding", "decode_errors", "task", "lag", "n_symbols", "n_train", "cell",
                   "bidirectional",
                   "hidden_size", "num_layers", "embedding_size", "dropout", "forget_bias", "dtype", "k1", "k2",
                   "batch_size", "optimizer", "lr", "clip", "seed", "lr_decay", "lr_decay_after", "lr_plateau")
# Flags a resumed run may change.
FREE_ON_RESUME = ("epochs", "max_steps", "json", "grad_norms", "sample_length", "backend", "out",
                  "save_every", "save_every_minutes", "keep", "distributed", "memory")
# Checkpoints of `bptt train`: every 5 minutes by default (a killed run loses at most that), the
# last 2 kept (bptt.checkpointing).
SAVE_EVERY_MINUTES = 5.0
KEEP = 2

# Validation flags a resumed run may change too (its schedule is the checkpoint's).
FREE_ON_RESUME += ("eval_every", "patience")
LR_DECAY_AFTER = 1   # --lr-decay without --lr-decay-after: the first epoch at --lr, then x F an epoch


class UsageError(Exception):
    """A user error: reported as one line on stderr, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a parse error as one line (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _bounded(kind, strict):
    """An argparse type: a number of ``kind`` > 0 (``strict``) or >= 0, finite."""
    sign = ">" if strict else ">="

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (value > 0 if strict else value >= 0) or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be {sign} 0, got {text!r}")
        return value
    parse.__name__ = f"{'positive' if strict else 'non-negative'} {kind.__name__}"
    return parse


def _positive(kind):
    return _bounded(kind, True)


def _non_negative(kind):
    return _bounded(kind, False)


def _encoding(text):
    """An argparse type: a text encoding Python knows (``utf-8``, ``latin-1``, ``cp1252``, ...)."""
    try:
        codecs.lookup(text)
    except LookupError:
        raise argparse.ArgumentTypeError(f"unknown encoding {text!r} (e.g. utf-8, latin-1, cp1252, utf-16)") from None
    return text


_encoding.__name__ = "encoding"
DECODE_ERRORS = ("strict", "replace")  # bptt.data.DECODE_ERRORS, without loading NumPy


def _add_decoding(group):
    group.add_argument("--encoding", type=_encoding, metavar="NAME",
                       help="the text file's encoding (default utf-8)")
    group.add_argument("--decode-errors", choices=DECODE_ERRORS,
                       help="bytes that are not valid in the encoding: strict = an error naming the first "
                       "(default), replace = read as U+FFFD")


def _fraction(text):
    """An argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


_fraction.__name__ = "fraction"


EVERY_ACTIVATION = "all"   # --memory all: every activation kept (the default; memory=None)


def _memory(text):
    """An argparse type: the activation memory of backpropagation, ``all`` (kept as the string,
    so that a resumed run can tell it from an absent flag; None in the config), ``sqrt`` or a
    budget (``512M``, ``2G``, bytes) as :func:`bptt.memory.parse_memory` reads it (imported
    only when the flag is given: ``bptt --help`` loads no NumPy)."""
    if text.strip().lower() == EVERY_ACTIVATION:
        return EVERY_ACTIVATION
    from bptt.memory import parse_memory
    try:
        return parse_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_memory.__name__ = "memory"


def _listed(defaults):
    return ", ".join(f"{k}={v}" for k, v in defaults.items())


def build_parser():
    """The argument parser of the ``bptt`` command (stdlib only)."""
    parser = _Parser(prog="bptt", description="Train recurrent networks with exact (truncated) "
                     "backpropagation through time: train, evaluate, sample, plot the training curve.")
    parser.add_argument("--version", action="version", version="bptt 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,sample,plot,prepare}", parser_class=_Parser)
    sub.required = True

    # Defaults are None here and resolved in resolve_train: they differ between a language
    # model and a task, and a resumed run must tell given flags from defaults.
    overrides = "; ".join(f"{name}: {_listed({k: v for k, v in t.defaults.items() if TASK_DEFAULTS.get(k) != v})}"
                          for name, t in TASK_TABLE.items() if t.defaults != TASK_DEFAULTS)
    t = sub.add_parser("train", help="train a model (default: char-level LSTM on the built-in corpus)",
                       description="Train a language model on a UTF-8 text file (default: the Python "
                       "help topics shipped with Python, offline), or a sequence model on a synthetic "
                       "long-range task (--task). Defaults (language model / task): " +
                       _listed(LM_DEFAULTS) + " / " + _listed(TASK_DEFAULTS) + f" ({overrides}).")
    g = t.add_argument_group("data")
    g.add_argument("--data", metavar="FILE|DIR", help="UTF-8 text file, or a corpus directory made by bptt prepare "
                   "(memory-mapped: a corpus of any size; its level and validation split) (default: the built-in corpus)")
    g.add_argument("--level", choices=("char", "word"), help="tokens: characters, or words + <eos> per line")
    g.add_argument("--max-chars", type=_positive(int), metavar="N",
                   help="read at most the first N characters (default: all); files over 128 MiB "
                   "($BPTT_MAX_TEXT_BYTES) are read only in part, with --max-chars")
    _add_decoding(g)
    g.add_argument("--task", choices=TASKS, help="train on a synthetic task instead of text: copy (recall symbols "
                   "after a lag), adding (sum two marked values), varlen (classify sequences of variable length "
                   "at each one's own last step; prints the accuracy)")
    g.add_argument("--lag", type=_non_negative(int), metavar="N",
                   help="copy: blank steps between symbols and recall; adding: sequence length; "
                   "varlen: the longest sequence (lengths 5..N, trained with full BPTT)")
    g.add_argument("--n-symbols", type=_positive(int), metavar="S", help="copy: symbols to remember")
    g.add_argument("--n-train", type=_positive(int), metavar="N", help="task: training sequences")
    g = t.add_argument_group("model")
    g.add_argument("--cell", choices=CELLS)
    g.add_argument("--bidirectional", action="store_true", default=None,
                   help="task models: a reverse direction in every layer (full BPTT only)")
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
    g.add_argument("--memory", type=_memory, metavar="all|sqrt|SIZE",
                   help="activations kept for backpropagation: all = every step's of the window (the default); sqrt = the "
                   "stack's state every ~sqrt(T) steps, each segment recomputed during backward (about one more "
                   "forward pass); a budget SIZE (512M, 2G or bytes) = the least recomputation that fits it. "
                   "Exact: the gradients of the default, bit for bit on the cpu backend")
    g.add_argument("--epochs", type=_positive(int), metavar="N")
    g.add_argument("--max-steps", type=_positive(int), metavar="N", help="stop after N updates")
    g.add_argument("--seed", type=int, metavar="N", help="initialisation, data and sampling seed (default 0)")
    g.add_argument("--lr-decay", type=_positive(float), metavar="F",
                   help="Zaremba et al.'s schedule: after --lr-decay-after epochs, multiply the lr by F (0 < F <= 1) "
                   "at the start of every epoch: epoch e (from 1) runs at lr * F^max(0, e - E)")
    g.add_argument("--lr-decay-after", type=_non_negative(int), metavar="E",
                   help=f"epochs at the full lr before --lr-decay starts (default {LR_DECAY_AFTER})")
    g.add_argument("--lr-plateau", type=_positive(float), metavar="F",
                   help="word_language_model's rule: after a validation whose loss is not below the best so far, "
                   "divide the lr by F (> 1) from the next update on")
    g = t.add_argument_group("validation (on the held-out part of the corpus, or the task's held-out sequences)")
    g.add_argument("--eval-every", type=_positive(int), metavar="N",
                   help="validate every N updates as well as at the end of every epoch (default: epoch ends only); "
                   "results on the progress line, in metrics.jsonl and the --json summary")
    g.add_argument("--patience", type=_positive(int), metavar="P",
                   help="stop early after P validations in a row without a new best validation loss")
    g = t.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", help="run directory (default runs/default, runs/<task>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest whole checkpoint: to the update and epoch "
                   "the run was started for (after Ctrl-C, SIGTERM or a crash it ends with the weights of an "
                   "uninterrupted run), or with --max-steps/--epochs N for N more")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in --out even if it holds one, removing that run's files "
                   "(without it such an --out is refused)")
    g.add_argument("--save-every", type=_positive(int), metavar="N",
                   help="write a checkpoint every N updates (besides --save-every-minutes and the one at the end)")
    g.add_argument("--save-every-minutes", type=_non_negative(float), metavar="M",
                   help=f"write a checkpoint every M minutes of training (default {SAVE_EVERY_MINUTES:g}; 0 = off)")
    g.add_argument("--keep", type=_positive(int), metavar="K",
                   help=f"keep the last K checkpoints, checkpoint-<step>.npz, checkpoint.npz being the newest "
                   f"(default {KEEP}); best.npz holds the one of the lowest validation loss")
    g.add_argument("--backend", metavar="NAME", help="cpu, cuda, cupy, reference or auto (default: $BPTT_BACKEND or auto)")
    g.add_argument("--distributed", choices=("mpi",),
                   help="data-parallel training on the N processes of 'mpiexec -n N bptt train ... --distributed "
                   "mpi' (pip install 'bptt[mpi]'): each trains --batch-size/N of the streams (a multiple of N), "
                   "one gradient allreduce per update, the weights of one process; with a GPU backend each takes "
                   "GPU local_rank; rank 0 alone prints progress, writes checkpoints and metrics and samples. "
                   "Resumes on any N (at a chunk boundary with --k1 = --k2)")
    g.add_argument("--grad-norms", action="store_true",
                   help="record per-step gradient norms dL/dh_t and write grad_norms.json (and .png with matplotlib)")
    g.add_argument("--sample-length", type=_non_negative(int), metavar="N", help="tokens sampled at the end (0 = none)")
    g.add_argument("--json", action="store_true", help="last stdout line: one JSON object of final metrics")

    e = sub.add_parser("eval", help="loss, perplexity and bits per token of a trained model",
                       description="Evaluate the checkpoint in DIR on FILE (every token of it, encoded "
                       "with the model's vocabulary, unseen symbols as <unk>), or without --data on the "
                       "held-out part of its training corpus (tasks: fresh sequences).")
    e.add_argument("run_dir", metavar="DIR")
    e.add_argument("--data", metavar="FILE|DIR", help="a text file (all of it), or a corpus made by bptt prepare "
                   "with the model's vocabulary (its valid.bin, or its train.bin without one)")
    e.add_argument("--max-chars", type=_positive(int), metavar="N", help="read at most the first N characters of FILE")
    _add_decoding(e)
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

    p = sub.add_parser("plot", help="plot a run's training curve (matplotlib)",
                       description="Draw the training loss, the validation loss and the learning rate of "
                       "the run in DIR against the update step, from its metrics.jsonl, into DIR/training.png "
                       "(needs matplotlib: pip install 'bptt[plot]'); prints the file's path.")
    p.add_argument("run_dir", metavar="DIR")
    p.add_argument("--output", metavar="FILE", help="the image file (default DIR/training.png)")

    r = sub.add_parser("prepare", help="tokenize a text file of any size once, for training from a memory map",
                       description="Tokenize FILE in bounded memory (two streaming passes) into DIR: train.bin "
                       "and valid.bin (the token ids, uint16 or uint32), vocab.json and meta.json (the header: "
                       "counts, dtype, source, CRC32 of each file); the ids are those bptt train --data FILE would "
                       "use. Train with bptt train --data DIR. --verify DIR reads a prepared corpus whole and checks "
                       "every file's CRC32 and ids (opening one checks only the header and the file sizes).")
    r.add_argument("--data", metavar="FILE", help="the text file (UTF-8 unless --encoding)")
    r.add_argument("--out", metavar="DIR", help="the corpus directory (made if needed; a corpus in it is replaced)")
    r.add_argument("--level", choices=("char", "word"), help="tokens: characters (default), or words + <eos> per line")
    v = r.add_mutually_exclusive_group()
    v.add_argument("--valid-fraction", type=_fraction, metavar="F",
                   help="hold out the last F of the tokens as valid.bin (default 0.1; 0 = no validation split)")
    v.add_argument("--valid", metavar="FILE2", help="a second text file as valid.bin (encoded with FILE's vocabulary)")
    r.add_argument("--vocab", metavar="PATH", help="encode with an existing vocabulary, unseen tokens as <unk>: a "
                   "vocab.json, a prepared corpus or a run directory (its checkpoint's vocabulary)")
    _add_decoding(r)
    r.add_argument("--verify", metavar="DIR", help="instead: check the prepared corpus DIR whole (a full read)")
    r.add_argument("--json", action="store_true", help="last stdout line: one JSON object of what was written")
    return parser


def flag(name):
    """The command-line spelling of a config key: ``max_steps`` -> ``--max-steps``."""
    return "--" + name.replace("_", "-")


def resolve_train(args):
    """Check flag combinations and fill defaults into a plain config dict (raises UsageError)."""
    given = {k: v for k, v in vars(args).items() if v is not None and k != "command"}
    if given.get("memory") == EVERY_ACTIVATION:
        given["memory"] = None           # given (a resumed run goes back to it), as memory=None
    check_out_dir(args.out or os.path.join("runs", args.task or "default"))
    cfg = {}
    if args.resume:
        return given
    if args.task is not None:
        task = TASK_TABLE[args.task]
        for name in ("data", "level", "max_chars", "encoding", "decode_errors", "embedding_size"):
            if name in given:
                raise UsageError(f"{flag(name)} is for text corpora and cannot be used with --task {args.task}")
        if not task.uses_symbols and "n_symbols" in given:
            raise UsageError(f"--n-symbols is for --task copy, not --task {args.task}")
        if args.sample_length:
            raise UsageError("--sample-length is for language models, not --task")
        cfg.update(task.defaults)
    else:
        for name in ("lag", "n_symbols", "n_train"):
            if name in given:
                raise UsageError(f"{flag(name)} needs --task ({', '.join(TASKS)})")
        cfg.update(LM_DEFAULTS, data=None)
        if given.get("data") is not None and os.path.isdir(given["data"]):    # a prepared corpus
            for name in ("max_chars", "encoding", "decode_errors"):
                if name in given:
                    raise UsageError(f"{flag(name)} is for text files; {given['data']} is a prepared corpus")
            cfg["level"] = None          # the corpus's own, unless --level is given (then checked)
    cfg.update(given)
    cfg.setdefault("seed", 0)
    cfg.setdefault("dtype", "float32")
    cfg.setdefault("out", os.path.join("runs", args.task or "default"))
    cfg.setdefault("save_every_minutes", SAVE_EVERY_MINUTES)
    cfg.setdefault("keep", KEEP)
    cfg.setdefault("memory", None)       # every activation kept
    if args.task == "adding" and cfg["lag"] < 2:
        raise UsageError(f"--lag is the sequence length of --task adding and must be >= 2; got {cfg['lag']}")
    if args.task == "varlen" and cfg["lag"] < 5:
        raise UsageError(f"--lag is the longest sequence of --task varlen and must be >= 5; got {cfg['lag']}")
    if cfg.get("bidirectional") and args.task is None:
        raise UsageError("--bidirectional is for --task models: a language model must not read the tokens it predicts")
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
    if k1 is not None and args.task is not None and (TASK_TABLE[args.task].variable_lengths or cfg.get("bidirectional")):
        why = "--bidirectional reads each sequence from its end" if cfg.get("bidirectional") else \
            f"--task {args.task} has sequences of variable length"
        raise UsageError(f"--k1/--k2 (TBPTT) cannot be used here: {why}, which trains with full BPTT only")
    if "forget_bias" in given and cfg["cell"] != "lstm":
        raise UsageError(f"--forget-bias is for --cell lstm, not --cell {cfg['cell']}")
    if cfg["dropout"] >= 1:
        raise UsageError(f"--dropout must be in [0, 1); got {cfg['dropout']}")
    if cfg["dropout"] and args.task:
        raise UsageError("--dropout is for language models, not --task")
    check_schedule(cfg, given)
    return cfg


def resolve_prepare(args):
    """Check the flags of ``bptt prepare`` (UsageError): --data FILE --out DIR, or --verify DIR alone."""
    if args.verify is not None:
        extra = [flag(k) for k in ("data", "out", "level", "valid_fraction", "valid", "vocab", "encoding",
                                   "decode_errors") if getattr(args, k) is not None]
        if extra:
            raise UsageError(f"--verify DIR checks a prepared corpus and takes no {', '.join(extra)}")
        return
    for name in ("data", "out"):
        if getattr(args, name) is None:
            raise UsageError(f"{flag(name)} is required: bptt prepare --data FILE --out DIR (or --verify DIR)")


def check_schedule(cfg, given):
    """The learning-rate schedule flags (UsageError for a bad combination; fills the default E)."""
    if cfg.get("lr_decay") is not None and cfg.get("lr_plateau") is not None:
        raise UsageError("--lr-decay and --lr-plateau are two schedules: give one of them")
    if "lr_decay_after" in given and cfg.get("lr_decay") is None:
        raise UsageError("--lr-decay-after needs --lr-decay F (the factor applied each epoch after it)")
    if cfg.get("lr_decay") is not None:
        if cfg["lr_decay"] > 1:
            raise UsageError(f"--lr-decay F multiplies the lr each epoch and must be in (0, 1]; got {cfg['lr_decay']} "
                             f"(for a division by {cfg['lr_decay']:g} give {1 / cfg['lr_decay']:g})")
        cfg.setdefault("lr_decay_after", LR_DECAY_AFTER)
    if cfg.get("lr_plateau") is not None and cfg["lr_plateau"] <= 1:
        raise UsageError(f"--lr-plateau F divides the lr and must be > 1; got {cfg['lr_plateau']}")


def check_out_dir(out):
    """UsageError unless the run directory ``out`` is, or can be made, a writable directory
    (nothing is created here: a run that fails on its input leaves no directory behind)."""
    path = os.path.abspath(out)
    target = path
    while not os.path.lexists(target):             # the nearest existing ancestor
        target = os.path.dirname(target)
    if not os.path.isdir(target):
        what = "is a file" if target == path else f"{target} is a file"
        raise UsageError(f"--out {out}: {what}, not a directory")
    try:
        read_only = bool(os.statvfs(target).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    if read_only or not os.access(target, os.W_OK | os.X_OK):
        where = "" if target == path else f" ({target})"
        why = "is on a read-only file system" if read_only else "is not writable"
        raise UsageError(f"--out {out}{where} {why}")


def check_resume(cfg, meta):
    """The config of a resumed run: the checkpoint's, with the flags a resumed run may change
    (UsageError for a flag that would change the model, data or optimizer)."""
    saved = meta.get("config", {})
    if not isinstance(saved, dict):
        raise UsageError(f"the checkpoint's configuration (its meta's config) is not a JSON object: {saved!r:.60}")
    for name in FIXED_ON_RESUME:
        if name in cfg and cfg[name] != saved.get(name):
            raise UsageError(f"{flag(name)} {cfg[name]} differs from the checkpoint's "
                             f"{saved.get(name)!r}: a resumed run keeps its model, data and optimizer")
    merged = dict(saved)
    for name in FREE_ON_RESUME:
        if name in cfg:
            merged[name] = cfg[name]
    merged["resume"] = True
    return merged
