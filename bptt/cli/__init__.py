"""The ``bptt`` command line: ``bptt train``, ``bptt eval``, ``bptt sample``, ``bptt plot`` (also
``python -m bptt``).

``bptt train`` with no arguments trains a small character-level LSTM language model with
truncated BPTT on the offline default corpus (the Python help topics shipped with the standard
library, see :mod:`bptt.data`), shows its progress on stderr, writes a checkpoint to
``runs/default`` and prints a sample. ``bptt train --task copy|adding|varlen`` trains a
SequenceModel on a synthetic long-range task instead (:mod:`bptt.tasks`; varlen: sequences of
variable length; ``--bidirectional``: a reverse direction too). Training validates on held-out
data at every epoch end (and every ``--eval-every`` updates), can follow a schedule fed by it
(``--lr-decay``, ``--lr-plateau``) and stop early (``--patience``); ``bptt plot DIR`` draws the
run's training curve into ``DIR/training.png``. ``bptt prepare --data FILE --out DIR``
tokenizes a text file of any size once, in bounded memory, into memory-mapped id files that
``bptt train --data DIR`` and ``bptt eval RUN --data DIR`` read without loading them
(:func:`bptt.prepared.prepare`, :mod:`bptt.token_file`); ``bptt prepare --verify DIR`` checks one whole.

Run directory (``--out``): ``checkpoint-<step>.npz`` (the last ``--keep``), ``checkpoint.npz``
(the newest), ``best.npz`` and ``metrics.jsonl`` (:mod:`bptt.cli.runs`, :mod:`bptt.checkpointing`);
checkpoints every ``--save-every-minutes`` (5) and ``--save-every`` updates. A directory holding
a run is refused unless ``--resume`` (continue it to its end) or ``--overwrite`` (replace it).
``--json`` makes the last line of stdout one JSON object with the final metrics. User errors
(a missing, binary, undecodable or too large data file, a damaged or foreign checkpoint, an
inconsistent vocabulary, an ``--out`` that cannot be a directory, a bad flag combination,
k1 > k2, an unknown backend) print one line on stderr and exit with status 1 (2 for unparsable
arguments), and leave the run directory as it was; set ``BPTT_DEBUG=1`` for a traceback.
Ctrl-C (SIGTERM) during training stops at the last finished update, saves the checkpoint, prints
the command that resumes and exits with status 130 (143); a second signal ends it at once.
``mpiexec -n N bptt train ... --distributed mpi`` trains data-parallel on N processes
(:mod:`bptt.data_parallel`; a GPU each with a GPU backend): rank 0 alone prints, writes the run
directory and samples; Ctrl-C or SIGTERM stops every rank after the same update.

Only the standard library is imported before the arguments are parsed, so ``bptt --help`` is
instant; NumPy, Numba, the kernels and tqdm load when a command runs.

The package: :mod:`.arguments` (parser, defaults, flag checks), :mod:`.commands` (train, eval,
sample, plot, prepare), :mod:`.build` (data, model and trainer of a run), :mod:`.progress` (the progress
display), :mod:`.runs` (the run directory's files), :mod:`.plot` (the training curve).

Examples::

    bptt train                                    # char LSTM on the built-in corpus -> runs/default
    bptt train --data ptb.train.txt --level word --cell gru --hidden-size 256 --out runs/ptb
    bptt train --out runs/ptb --resume             # continue a stopped run to its end
    bptt train --out runs/ptb --resume --epochs 1  # one more epoch of that run
    bptt eval runs/default --data other.txt --json
    bptt prepare --data big.txt --out data/big --valid-fraction 0.001   # tokenized once, memory-mapped
    bptt train --data data/big --max-steps 10000 --out runs/big
    bptt sample runs/default --prime "def " --length 200 --temperature 0.7 --top-k 10
    bptt train --task copy --k1 10 --k2 10         # TBPTT window shorter than the 25-step recall: chance
    bptt train --task copy --k1 10 --k2 30         # window spans it: recall accuracy > 0.9
    bptt train --task varlen --lag 100 --bidirectional   # lengths 5..100, classified at their ends
    bptt train --grad-norms --cell rnn_tanh --k1 20 --k2 60   # writes grad_norms.json / .png
    bptt train --task adding --lag 2000 --memory sqrt   # full BPTT over 2000 steps, states kept every ~45
    bptt train --level word --eval-every 100 --lr-plateau 4 --patience 5 --out runs/w
    mpiexec -n 2 bptt train --distributed mpi --out runs/dp   # 2 processes, batch/2 streams each
    bptt plot runs/w                               # runs/w/training.png
"""

import os
import sys

from bptt.cli.arguments import UsageError, build_parser
from bptt.cli.runs import CHECKPOINT_FILE, METRICS_FILE

__all__ = ["main", "build_parser", "UsageError", "CHECKPOINT_FILE", "METRICS_FILE"]


def main(argv=None):
    """Entry point of the ``bptt`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    from bptt.cli.commands import COMMANDS
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("bptt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user errors: one line, no traceback (BPTT_DEBUG=1 shows it)
        if os.environ.get("BPTT_DEBUG") == "1" or not _is_user_error(e):
            raise
        hint = " (training diverged: try a lower --lr or --clip)" if isinstance(e, FloatingPointError) else ""
        print(f"bptt {args.command}: error: {_one_line(e)}{hint}", file=sys.stderr)
        return 1


def _one_line(e):
    """The message of the user error ``e`` on one line: an OSError as ``file: reason``, a
    MemoryError with what to lower."""
    if isinstance(e, MemoryError):
        return f"out of memory{f' ({e})' if str(e) else ''}: try a smaller --max-chars, --batch-size or --hidden-size"
    if isinstance(e, OSError) and type(e).__str__ is OSError.__str__ and e.strerror:
        names = [n for n in (e.filename, e.filename2) if n is not None]
        text = f"{' -> '.join(map(str, names))}: {e.strerror}" if names else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split("\n")).strip()


def _is_user_error(e):
    from bptt.backend import BackendUnavailableError
    from bptt.distributed import DistributedError
    if isinstance(e, (UsageError, BackendUnavailableError, DistributedError, OSError, MemoryError)):
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
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the bptt package
    return filename.startswith(here) or "bptt_kernels" in filename or os.sep + "kernels" + os.sep in filename
