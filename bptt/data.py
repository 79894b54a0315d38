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

Errors about files (missing, a directory, empty, binary, not valid in its encoding, too large,
too short to train on) are :class:`DataError`, a ``ValueError`` whose one-line message names
the file (and for an undecodable byte its offset and line). Text files are UTF-8 unless an
``encoding`` is given; at most :data:`MAX_TEXT_BYTES` (128 MiB, environment variable
``BPTT_MAX_TEXT_BYTES``) are read from one file, and ``max_chars`` reads only a file's first
characters, streaming, so a bigger file (even one line of a gigabyte) can be used in part.

A file of any size is used whole by preparing it once (:mod:`bptt.prepared`, ``bptt prepare``).
"""

import codecs
import itertools
import json
import os

import numpy as np

UNK = "<unk>"
EOS = "<eos>"
LEVELS = ("char", "word")
# what an unknown token looks like when char-level ids are turned back into text
CHAR_UNK_TEXT = "\ufffd"
DEFAULT_CORPUS_NAME = "python-help-topics"
# the most bytes read from one text file (the environment variable BPTT_MAX_TEXT_BYTES overrides it):
# char-level tokens and ids of 128 MiB of text take about 2 GiB of memory
MAX_TEXT_BYTES = 128 * 2 ** 20
DECODE_ERRORS = ("strict", "replace")


class DataError(ValueError):
    """A data file or corpus cannot be used (the message names the file and why)."""


def _check_level(level):
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}; got {level!r}")


def _describe(obj):
    """A short description of a JSON value for messages: ``a list``, ``an object with keys a, b``."""
    if isinstance(obj, dict):
        return f"an object with keys {', '.join(map(str, obj)) or '(none)'}"
    names = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
             type(None): "null"}
    return names.get(type(obj), type(obj).__name__)


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
        if isinstance(symbols, (str, bytes)):
            raise ValueError(f"symbols must be a list of str, not a {type(symbols).__name__}")
        symbols = list(symbols)
        bad = next((s for s in symbols if not isinstance(s, str)), None)
        if bad is not None:
            raise ValueError(f"symbols must be str; got {bad!r} ({type(bad).__name__})")
        if not symbols or symbols[0] != UNK:
            where = f" (it is at position {symbols.index(UNK)})" if UNK in symbols else ""
            raise ValueError(f"symbols must start with the unknown token {UNK!r}; got {symbols[:1]!r}{where}")
        if len(set(symbols)) != len(symbols):
            seen = set()
            dup = next(s for s in symbols if s in seen or seen.add(s))
            raise ValueError(f"symbols must be unique; {dup!r} appears {symbols.count(dup)} times")
        if level == "char":
            long = next((s for s in symbols[1:] if len(s) != 1), None)
            if long is not None:
                raise ValueError(f"a char-level vocabulary holds single characters; got {long!r}")
        elif EOS not in symbols:
            raise ValueError(f"a word-level vocabulary must hold the end-of-line token {EOS!r}")
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
        return np.fromiter(map(self.index.get, tokens, itertools.repeat(0)), dtype=np.int64, count=len(tokens))

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
            try:
                obj = json.loads(obj)
            except json.JSONDecodeError as e:
                raise ValueError(f"not a serialised Vocabulary (invalid JSON: {e})") from None
        if not isinstance(obj, dict) or "symbols" not in obj or "level" not in obj:
            raise ValueError("not a serialised Vocabulary (needs a JSON object with 'level' and 'symbols'; "
                             f"got {_describe(obj)})")
        if not isinstance(obj["symbols"], list):
            raise ValueError(f"not a serialised Vocabulary ('symbols' is {_describe(obj['symbols'])}, not a list)")
        return cls(obj["symbols"], obj["level"])


def max_text_bytes():
    """The most bytes :func:`read_text` reads from one file: :data:`MAX_TEXT_BYTES` (128 MiB),
    or the environment variable ``BPTT_MAX_TEXT_BYTES`` where set (a positive integer)."""
    value = os.environ.get("BPTT_MAX_TEXT_BYTES")
    if value is None:
        return MAX_TEXT_BYTES
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise DataError(f"BPTT_MAX_TEXT_BYTES must be a positive integer (bytes); got {value!r}")
    return limit


def _size(n):
    """A byte count for messages: ``1.0 GiB (1,073,741,824 bytes)``."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _codec(encoding):
    """The codec name to decode with (UTF-8: ``utf-8-sig``, so a byte-order mark is dropped) and
    the name messages show."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise DataError(f"unknown text encoding {encoding!r} (--encoding)") from None
    if name in ("utf-8", "utf-8-sig"):
        return "utf-8-sig", "UTF-8"
    return name, encoding


def looks_binary(sample, encoding="utf-8"):
    """Why the first bytes ``sample`` of a file look like binary data rather than text in
    ``encoding`` (a str such as ``"NUL bytes, first at offset 12"``), or None.

    Binary: a NUL character (U+0000) in the decoded sample, or, in a sample of at least 64
    characters, more than 10% of them control characters (other than tab, line breaks, form
    feed and escape) or undecodable bytes.
    """
    codec, _ = _codec(encoding)
    text = codecs.getincrementaldecoder(codec)(errors="replace").decode(sample, final=False)
    if "\0" in text:
        offset = sample.find(b"\0")
        where = f", first at byte offset {offset}" if offset >= 0 else ""
        return f"NUL bytes{where}"
    if len(text) >= 64:
        odd = sum(1 for c in text if c == "\ufffd" or (c < " " and c not in "\t\n\r\f\v\x1b"))
        if odd > 0.1 * len(text):
            return f"{odd / len(text):.0%} of its first {len(text):,} characters are control codes or undecodable"
    return None


def read_text(path, max_chars=None, encoding="utf-8", errors="strict"):
    """The text of the file ``path`` (str) in ``encoding``, at most ``max_chars`` characters.

    ``errors``: ``"strict"`` (an undecodable byte is an error naming its offset and line) or
    ``"replace"`` (it becomes U+FFFD). A UTF-8 byte-order mark is dropped. The file is read in
    chunks and decoding stops after ``max_chars`` characters, so a huge file (one line of a
    gigabyte) costs only what is kept; but at most :func:`max_text_bytes` bytes (128 MiB unless
    ``BPTT_MAX_TEXT_BYTES`` says otherwise) are read: a bigger file needs ``max_chars``, and
    ``max_chars`` that would read past the limit is an error.

    Raises :class:`DataError` naming the file if it is missing, a directory, unreadable, larger
    than the limit, binary (NUL bytes, mostly control codes), not valid in ``encoding``, or
    empty (nothing but whitespace).
    """
    path = os.fspath(path)
    if errors not in DECODE_ERRORS:
        raise ValueError(f"errors must be one of {', '.join(DECODE_ERRORS)}; got {errors!r}")
    if max_chars is not None and (isinstance(max_chars, bool) or int(max_chars) < 1):
        raise ValueError(f"max_chars must be a positive integer or None; got {max_chars!r}")
    codec, shown = _codec(encoding)
    limit = max_text_bytes()
    with _open_bytes(path) as f:
        size = os.fstat(f.fileno()).st_size
        if max_chars is None and size > limit:
            raise DataError(f"{path}: {_size(size)} is larger than the {_size(limit)} bptt reads whole; "
                            "give --max-chars N to read its first N characters (or raise BPTT_MAX_TEXT_BYTES)")
        parts, n_chars, n_bytes = [], 0, 0
        for part, n in _decoded_chunks(f, path, codec, shown, errors, limit):
            n_bytes += n
            parts.append(part)
            n_chars += len(part)
            if max_chars is not None and n_chars >= max_chars:
                break
            if n_bytes > limit:
                need = f"--max-chars {max_chars:,}" if max_chars is not None else "the whole file"
                raise DataError(f"{path}: {need} needs more than the {_size(limit)} bptt reads from one file; "
                                "give a smaller --max-chars (or raise BPTT_MAX_TEXT_BYTES)")
    text = "".join(parts)
    text = text if max_chars is None else text[:max_chars]
    if not text.strip():
        raise _empty_file(path, size)
    return text


def _open_bytes(path):
    """The file ``path`` opened for reading bytes; DataError naming it if it is missing, a
    directory or unreadable."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a text file")
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _empty_file(path, size):
    return DataError(f"{path}: file is empty" + (f" (only whitespace in {_size(size)})" if size else ""))


def _decoded_chunks(f, path, codec, shown, errors, limit=None, chunk_size=1 << 20):
    """Decode the open binary file ``f`` chunk by chunk: yields (text, bytes read for it), the
    last pair with 0 bytes (the end of the file, where the decoder is flushed). At most
    ``limit + 1`` bytes are read (None: no limit). DataError if the first bytes look binary, or
    for an undecodable byte (its offset and line) under ``errors="strict"``."""
    decoder = codecs.getincrementaldecoder(codec)(errors=errors)
    n_bytes, n_lines = 0, 0
    while True:
        chunk = f.read(chunk_size if limit is None else min(chunk_size, limit + 1 - n_bytes))
        if n_bytes == 0:
            why = looks_binary(chunk[:65536], codec)
            if why:
                raise DataError(f"{path}: looks like a binary file, not {shown} text ({why})")
        final = not chunk
        pending = decoder.getstate()[0]
        try:
            part = decoder.decode(chunk, final=final)
        except UnicodeDecodeError as e:
            data = pending + chunk
            offset = n_bytes - len(pending) + e.start
            line = n_lines + data[: e.start].decode(codec, "replace").count("\n") + 1
            raise DataError(f"{path}: not {shown} text (invalid byte 0x{data[e.start]:02x} at offset {offset:,}, "
                            f"line {line:,}); give --encoding NAME (e.g. latin-1) or --decode-errors replace") from None
        n_bytes += len(chunk)
        n_lines += part.count("\n")
        yield part, len(chunk)
        if final:
            return


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
        n_valid = held_out(len(ids), valid_fraction, level, source)
        self.vocab = vocab
        self.level = level
        self.source = source
        self.n_chars = len(text)
        self.train = ids[: len(ids) - n_valid]
        self.valid = ids[len(ids) - n_valid:]

    def __repr__(self):
        return (f"Corpus(source={self.source!r}, level={self.level!r}, vocab={len(self.vocab)}, "
                f"train={len(self.train)}, valid={len(self.valid)})")


def held_out(n_tokens, valid_fraction, level, source):
    """How many of ``n_tokens`` tokens the last ``valid_fraction`` holds out (rounded); DataError
    naming ``source`` if fewer than 2 are left to train on, or fewer than 2 held out where
    ``valid_fraction`` > 0."""
    n_valid = int(round(n_tokens * valid_fraction))
    if n_tokens - n_valid < 2 or (valid_fraction > 0 and n_valid < 2):
        held = " (2 to hold out for validation)" if valid_fraction > 0 else ""
        raise DataError(f"{source}: too short to train on: {n_tokens:,} {level} token"
                        f"{'' if n_tokens == 1 else 's'}, at least {min_tokens(valid_fraction)} needed{held}")
    return n_valid


def min_tokens(valid_fraction=0.1):
    """The fewest tokens a :class:`Corpus` with ``valid_fraction`` accepts (2 to train, and 2
    held out where ``valid_fraction`` > 0)."""
    n = 2
    while n - int(round(n * valid_fraction)) < 2 or (valid_fraction > 0 and int(round(n * valid_fraction)) < 2):
        n += 1
    return n


def load_corpus(path=None, level="char", max_chars=None, valid_fraction=0.1, vocab=None, encoding="utf-8",
                errors="strict"):
    """Read and tokenize ``path`` (None: the default corpus) into a :class:`Corpus`.

    ``max_chars`` caps the characters read (the first ``max_chars``). ``vocab``: encode with an
    existing vocabulary (unseen tokens -> ``<unk>``) instead of building one. ``encoding`` and
    ``errors``: how the file is decoded (:func:`read_text`).
    """
    if path is None:
        return Corpus(default_corpus_text(max_chars), level, valid_fraction, DEFAULT_CORPUS_NAME, vocab)
    return Corpus(read_text(path, max_chars, encoding, errors), level, valid_fraction, os.fspath(path), vocab)
