"""What a ``bptt train`` run is made of, from its config dict: the data (a text corpus, read
whole or a prepared corpus memory-mapped, or a task's sequences, :mod:`bptt.tasks`), the model
and the trainer."""

import json
import os

from bptt.cli.arguments import EVAL_BATCH, UsageError


def eval_batch(n_tokens):
    """Streams for evaluating a token stream: EVAL_BATCH, fewer for short data (2 tokens each)."""
    return max(1, min(EVAL_BATCH, n_tokens // 2))


def is_prepared(path):
    """Whether the ``--data`` of a command names a prepared corpus (a directory) rather than a text file."""
    return path is not None and os.path.isdir(path)


def load_corpus(cfg, vocab=None):
    """The corpus of a run's config: its text file read and tokenized (``vocab``: encoded with
    it), or the prepared corpus directory memory-mapped (of the config's level where given;
    ``vocab``: it must be the corpus's)."""
    from bptt.data import DataError, load_corpus
    from bptt.prepared import open_prepared
    if not is_prepared(cfg["data"]):
        return load_corpus(cfg["data"], cfg["level"], max_chars=cfg["max_chars"], vocab=vocab,
                           encoding=cfg.get("encoding") or "utf-8", errors=cfg.get("decode_errors") or "strict")
    corpus = open_prepared(cfg["data"])
    if cfg.get("level") not in (None, corpus.level):
        raise DataError(f"{cfg['data']}: a {corpus.level}-level prepared corpus, but --level {cfg['level']} was given")
    if vocab is not None and vocab != corpus.vocab:
        raise DataError(f"{cfg['data']}: its vocabulary ({len(corpus.vocab):,} symbols) is not the run's "
                        f"({len(vocab):,}): the corpus was prepared again from other text or options")
    return corpus


def prepared_eval_ids(corpus, vocab):
    """(ids, their file) that ``bptt eval --data DIR`` evaluates of the prepared ``corpus``: its
    valid.bin, or its train.bin without one; DataError unless it has the model's ``vocab``."""
    from bptt.data import DataError
    if corpus.vocab != vocab:
        raise DataError(f"{corpus.source}: prepared with another vocabulary ({len(corpus.vocab):,} symbols) than the "
                        f"model's ({len(vocab):,}); prepare the text with the model's: "
                        f"bptt prepare --data FILE --vocab RUN_DIR --out DIR")
    tokens = corpus.train if corpus.valid is None else corpus.valid
    return tokens, tokens.filename


def count_id(ids, value, block=1 << 22):
    """How many of ``ids`` [n] equal ``value``, counted a block at a time (no [n] temporary)."""
    import numpy as np
    return sum(int(np.count_nonzero(ids[i:i + block] == value)) for i in range(0, len(ids), block))


def vocab_of(path):
    """The vocabulary ``bptt prepare --vocab PATH`` names: a vocab.json, a prepared corpus's or
    a run directory's (its newest checkpoint's)."""
    from bptt.data import DataError, Vocabulary
    from bptt.cli.runs import checkpoint_path, read_meta
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "vocab.json")):
        ckpt = checkpoint_path(path)
        vocab = run_vocab(read_meta(ckpt), ckpt)
        if vocab is None:
            raise UsageError(f"--vocab {path}: that run holds no vocabulary (a --task run)")
        return vocab
    file = os.path.join(path, "vocab.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            return Vocabulary.from_json(json.load(f))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{file}: not a readable vocabulary ({getattr(e, 'strerror', None) or e})") from None


def run_vocab(meta, path, model=None):
    """The vocabulary a run's checkpoint ``path`` carries in its ``meta`` (None where it has none:
    a task run). CheckpointError (one line naming ``path``) if it is inconsistent: not a
    vocabulary, duplicate symbols, no ``<unk>`` first, another level than the run's, or (given
    the ``model``) another size than the model's embedding rows."""
    from bptt.checkpoint_file import CheckpointError
    from bptt.data import Vocabulary
    obj = meta.get("vocab")
    if obj is None:
        return None
    try:
        vocab = Vocabulary.from_json(obj)
    except ValueError as e:
        raise CheckpointError(f"{path}: the vocabulary in its meta is unusable: {e}") from None
    config = meta.get("config")
    level = config.get("level") if isinstance(config, dict) else None
    if level is not None and level != vocab.level:
        raise CheckpointError(f"{path}: the vocabulary in its meta is {vocab.level}-level, the run {level}-level")
    rows = getattr(model, "vocab_size", None)
    if rows is not None and rows != len(vocab):
        raise CheckpointError(f"{path}: the vocabulary in its meta has {len(vocab):,} symbols but the model's "
                              f"embedding has {rows:,} rows")
    return vocab


def task_data(cfg, n, seed):
    """``n`` sequences of the config's task."""
    from bptt.tasks import TASK_DEFAULTS, task
    return task(cfg["task"]).generate(n, cfg["lag"], cfg.get("n_symbols") or TASK_DEFAULTS["n_symbols"], seed)


def task_validation(cfg):
    """The held-out sequences of a task run (another seed than its training sequences)."""
    from bptt.tasks import TASK_DEFAULTS, VALID_SEED_OFFSET
    return task_data(cfg, cfg.get("n_valid") or TASK_DEFAULTS["n_valid"], cfg["seed"] + VALID_SEED_OFFSET)


class Data:
    """What training reads: ``train``/``valid`` (token streams, or (inputs, targets) of a task),
    ``vocab`` (None for tasks), ``line`` (a summary for stderr), ``tokens_per_epoch`` (tasks:
    steps x sequences of the training set, which an epoch's updates share; None for text)."""

    def __init__(self, train, valid, vocab, line, tokens_per_epoch=None):
        self.train, self.valid, self.vocab = train, valid, vocab
        self.line, self.tokens_per_epoch = line, tokens_per_epoch


def prepare_data(cfg, vocab=None):
    """Read the corpus (``vocab``: encode with it) or generate the task's sequences. A prepared
    corpus sets the config's level to its own."""
    task = cfg.get("task")
    if task is None:
        corpus = load_corpus(cfg, vocab)
        cfg["level"] = corpus.level
        if corpus.valid is None:
            from bptt.data import DataError
            raise DataError(f"{corpus.source}: no validation split to train with (prepared with --valid-fraction 0); "
                            "prepare it with --valid-fraction F or --valid FILE")
        kind = "prepared, " if is_prepared(cfg["data"]) else ""
        line = (f"data: {corpus.source} ({kind}{corpus.n_chars:,} chars, {cfg['level']} level, vocab {len(corpus.vocab)}, "
                f"{len(corpus.train):,} train / {len(corpus.valid):,} valid tokens)")
        return Data(corpus.train, corpus.valid, corpus.vocab, line)
    train = task_data(cfg, cfg["n_train"], cfg["seed"])
    valid = task_validation(cfg)
    seq_len = train[0].shape[1]
    lengths = train[2] if len(train) == 3 else None     # variable lengths: steps actually run
    shape = f"sequence length {seq_len}" if lengths is None else f"sequence lengths {lengths.min()}..{seq_len}"
    line = (f"data: task {task}, lag {cfg['lag']}, {shape}, "
            f"{cfg['n_train']:,} train / {len(valid[0]):,} valid sequences")
    return Data(train, valid, None, line, cfg["n_train"] * seq_len if lengths is None else int(lengths.sum()))


def build_model(cfg, vocab_size=None):
    """A fresh model: a LanguageModel over ``vocab_size`` tokens, or the task's SequenceModel."""
    import numpy as np
    import bptt
    from bptt.tasks import task
    dtype = np.dtype(cfg["dtype"]).type
    common = dict(num_layers=cfg["num_layers"], cell=cfg["cell"], dtype=dtype, seed=cfg["seed"])
    if cfg.get("task") is None:
        model = bptt.LanguageModel(vocab_size, cfg["embedding_size"], cfg["hidden_size"],
                                   dropout=cfg["dropout"], **common)
    else:
        model = task(cfg["task"]).build_model(cfg["hidden_size"], bidirectional=bool(cfg.get("bidirectional")),
                                              **common)
    if cfg["cell"] == "lstm" and cfg.get("forget_bias"):
        add_forget_bias(model, cfg["forget_bias"])
    return model


def add_forget_bias(model, value):
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


def build_trainer(cfg, model, comm=None):
    import bptt
    if cfg["optimizer"] == "adam":
        optimizer = bptt.Adam(lr=cfg["lr"])
    else:
        optimizer = bptt.SGD(cfg["lr"])
    return bptt.Trainer(model, optimizer, k1=cfg["k1"], k2=cfg["k2"], clip_norm=cfg["clip"] or None,
                        schedule=build_schedule(cfg), record_grad_norms=bool(cfg.get("grad_norms")), comm=comm,
                        memory=cfg.get("memory"))


def build_schedule(cfg):
    """The learning-rate schedule of --lr-decay F --lr-decay-after E (epoch e, counted from 1, at
    lr * F^max(0, e - E): bptt.StepDecay(F, 1, E)) or --lr-plateau F (bptt.PlateauDecay(F));
    None (constant) without either."""
    import bptt
    if cfg.get("lr_decay") is not None:
        return bptt.StepDecay(cfg["lr_decay"], every=1, start=cfg["lr_decay_after"])
    if cfg.get("lr_plateau") is not None:
        return bptt.PlateauDecay(cfg["lr_plateau"])
    return None


def validation_batch(cfg, valid):
    """Streams (token streams) or sequences (tasks) per batch when validating ``valid``: those of
    the final evaluation, so the last validation of a run and its summary agree."""
    if cfg.get("task") is None:
        return eval_batch(len(valid))
    from bptt.tasks import EVAL_BATCH
    return min(len(valid[0]), EVAL_BATCH)
