"""Text corpora for language modelling: tokenizers, a JSON-serialisable vocabulary, a default corpus.

Two tokenizations of UTF-8 text:

* ``"char"``: every Unicode code point is a token (``"héllo"`` -> ``h é l l o``).
* ``"word"``: as the Penn Treebank language-model setup (PyTorch's ``word_language_model``):
  each line is split on whitespace and an end-of-line token ``"<eos>"`` is appended.

A :class:`Vocabulary` maps tokens to integer ids and back. Id 0 is always the unknown token
``"<unk>"``: a symbol never seen when the vocabulary was built (at evaluation or sampling time)
maps to it instead of failing. The vocabulary travels inside checkpoints as JSON
(:meth:`Vocabulary.to_json` / :meth:`Vocabulary.from_json`).

The default corpus (:func:`default_corpus_text`) needs no download: it is the text of the
Python language reference help topics shipped with the standard library
(``pydoc_data.topics.topics``, what ``help("assert")`` prints): the topics in sorted key order,
joined by blank lines, about 465,000 characters of English prose and code examples for
CPython 3.11. It is deterministic for a given Python version. Where a Python distribution
omits ``pydoc_data``, the docstrings of the ``builtins`` module (sorted by name) are used
instead, which is smaller but equally deterministic.

Errors about files (missing, a directory, empty, not UTF-8) are :class:`DataError`, a
``ValueError`` whose message names the file.
"""

import json
import os

import numpy as np

UNK = "<unk>"
EOS = "<eos>"
LEVELS = ("char", "word")
# what an unknown token looks like when char-level ids are turned back into text
CHAR_UNK_TEXT = "\ufffd"
DEFAULT_CORPUS_NAME = "python-help-topics"


class DataError(ValueError):
    """A data file or corpus cannot be used (the message names the file and why)."""


def _check_level(level):
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}; got {level!r}")


def tokenize(text, level):
    """Split ``text`` (str) into a list of tokens (str) at ``level`` ("char" or "word").

    Word level: ``line.split() + ["<eos>"]`` for every line (a final line without a
    newline still gets its ``<eos>``; an empty text gives no tokens).
    """
    _check_level(level)
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if level == "char":
        return list(text)
    tokens = []
    for line in text.splitlines():
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


class Vocabulary:
    """A mapping between tokens (str) and ids (int, 0 .. len-1) for one tokenization level.

    ``symbols[0]`` is ``"<unk>"``; the other symbols follow in sorted order, so a vocabulary built
    from the same text is always the same. Word-level vocabularies also contain ``"<eos>"``.
    """

    def __init__(self, symbols, level):
        _check_level(level)
        symbols = list(symbols)
        if not symbols or symbols[0] != UNK:
            raise ValueError(f"symbols must start with {UNK!r}; got {symbols[:1]!r}")
        if len(set(symbols)) != len(symbols):
            raise ValueError("symbols must be unique")
        self.level = level
        self.symbols = symbols                       # id -> token
        self.index = {s: i for i, s in enumerate(symbols)}  # token -> id
        self.unk_id = 0

    @classmethod
    def build(cls, tokens, level):
        """A vocabulary of every distinct token in ``tokens`` (plus ``<unk>``, and ``<eos>`` for words)."""
        _check_level(level)
        distinct = set(tokens)
        distinct.discard(UNK)
        if level == "word":
            distinct.add(EOS)
        return cls([UNK] + sorted(distinct), level)

    def __len__(self):
        return len(self.symbols)

    def __eq__(self, other):
        return isinstance(other, Vocabulary) and (self.level, self.symbols) == (other.level, other.symbols)

    def __repr__(self):
        return f"Vocabulary(level={self.level!r}, size={len(self)})"

    def encode(self, text):
        """``text`` (str) -> int64 ids [n_tokens]; unseen tokens become ``<unk>`` (id 0)."""
        return self.encode_tokens(tokenize(text, self.level))

    def encode_tokens(self, tokens):
        """A list of tokens -> int64 ids [n_tokens]; unseen tokens become ``<unk>`` (id 0)."""
        get = self.index.get
        return np.fromiter((get(t, 0) for t in tokens), dtype=np.int64, count=len(tokens))

    def decode(self, ids):
        """Ids (iterable of int) -> text. Char level: tokens joined, ``<unk>`` shown as U+FFFD.
        Word level: tokens joined by spaces, ``<eos>`` shown as a line break."""
        tokens = [self.symbols[int(i)] for i in ids]
        if self.level == "char":
            return "".join(CHAR_UNK_TEXT if t == UNK else t for t in tokens)
        out = []
        for t in tokens:
            if t == EOS:
                out.append("\n")
            else:
                if out and out[-1] != "\n":
                    out.append(" ")
                out.append(t)
        return "".join(out)

    def to_json(self):
        """A JSON-able dict ``{"level", "symbols"}`` (what checkpoints store)."""
        return {"level": self.level, "symbols": list(self.symbols)}

    @classmethod
    def from_json(cls, obj):
        """Rebuild from :meth:`to_json`'s dict (or its JSON string)."""
        if isinstance(obj, str):
            obj = json.loads(obj)
        try:
            return cls(obj["symbols"], obj["level"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a serialised Vocabulary (needs 'level' and 'symbols'): {e}") from None


def read_text(path, max_chars=None):
    """The text of the UTF-8 file ``path`` (str), at most ``max_chars`` characters.

    Raises :class:`DataError` naming the file if it is missing, a directory, unreadable,
    not valid UTF-8, or empty (nothing but whitespace). A UTF-8 byte-order mark is dropped.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a UTF-8 text file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return _cap(text, max_chars)


def _cap(text, max_chars):
    if max_chars is None:
        return text
    if int(max_chars) < 1:
        raise ValueError(f"max_chars must be a positive integer or None; got {max_chars!r}")
    return text[: int(max_chars)]


def default_corpus_text(max_chars=None):
    """The offline default corpus (str), at most ``max_chars`` characters.

    The Python help topics shipped with the standard library (``pydoc_data.topics.topics``)
    in sorted key order joined by blank lines; the sorted ``builtins`` docstrings where
    ``pydoc_data`` is missing. Deterministic for a given Python version.
    """
    try:
        from pydoc_data.topics import topics
        text = "\n\n".join(topics[k].strip("\n") for k in sorted(topics)) + "\n"
    except ImportError:
        import builtins
        docs = (getattr(builtins, n).__doc__ for n in sorted(dir(builtins)))
        text = "\n\n".join(d.strip("\n") for d in docs if d) + "\n"
    return _cap(text, max_chars)


class Corpus:
    """A tokenized text split into training and validation id streams.

    Attributes: ``vocab`` (:class:`Vocabulary`, built from the whole text so the validation part
    has no unknown tokens), ``train`` and ``valid`` (int64 [n] token-id streams: the last
    ``valid_fraction`` of the tokens is held out, the rest trains), ``source`` (the file path or
    ``"python-help-topics"``), ``n_chars`` (characters read).
    """

    def __init__(self, text, level="char", valid_fraction=0.1, source="<text>", vocab=None):
        _check_level(level)
        if not 0.0 <= valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1); got {valid_fraction!r}")
        tokens = tokenize(text, level)
        if vocab is None:
            vocab = Vocabulary.build(tokens, level)
        elif vocab.level != level:
            raise ValueError(f"vocabulary is {vocab.level}-level but level={level!r} was asked")
        ids = vocab.encode_tokens(tokens)
        n_valid = int(round(len(ids) * valid_fraction))
        if len(ids) - n_valid < 2 or (valid_fraction > 0 and n_valid < 2):
            raise DataError(f"{source}: too short ({len(ids)} {level} tokens) to train on"
                            f"{' and hold out a validation part' if valid_fraction > 0 else ''}")
        self.vocab = vocab
        self.level = level
        self.source = source
        self.n_chars = len(text)
        self.train = ids[: len(ids) - n_valid]
        self.valid = ids[len(ids) - n_valid:]

    def __repr__(self):
        return (f"Corpus(source={self.source!r}, level={self.level!r}, vocab={len(self.vocab)}, "
                f"train={len(self.train)}, valid={len(self.valid)})")


def load_corpus(path=None, level="char", max_chars=None, valid_fraction=0.1, vocab=None):
    """Read and tokenize ``path`` (None: the default corpus) into a :class:`Corpus`.

    ``max_chars`` caps the characters read (the first ``max_chars``). ``vocab``: encode with an
    existing vocabulary (unseen tokens -> ``<unk>``) instead of building one.
    """
    if path is None:
        return Corpus(default_corpus_text(max_chars), level, valid_fraction, DEFAULT_CORPUS_NAME, vocab)
    return Corpus(read_text(path, max_chars), level, valid_fraction, os.fspath(path), vocab)
