"""Prepared corpora: a text file of any size tokenized once, in bounded memory, into id files
that training memory-maps.

:func:`prepare` (``bptt prepare``) reads the text in chunks, twice: the first pass counts the
tokens and collects the vocabulary, the second writes the ids (the format:
:mod:`bptt.token_file`). :func:`open_prepared` memory-maps them; the ids are those
:func:`bptt.data.load_corpus` gives for the same text, so a model trains the same on either.
"""

import os

import numpy as np

from bptt import token_file
from bptt.data import (DECODE_ERRORS, EOS, UNK, DataError, Vocabulary, _check_level, _codec, _decoded_chunks,
                       _empty_file, _open_bytes, held_out)

PREPARE_CHUNK_BYTES = 1 << 16
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"   # the characters str.splitlines() ends a line at
N_CODE_POINTS = 0x110000


def _text_chunks(path, encoding, errors, chunk_size, progress=None, description=""):
    """The text of the file ``path`` as (text, final) chunks, decoded as :func:`bptt.data.read_text` decodes
    it but of any size; DataError naming the file as there (missing, binary, undecodable, empty).
    ``progress``: a tqdm-like factory ``progress(description, total_bytes)`` or None."""
    codec, shown = _codec(encoding)
    with _open_bytes(path) as f:
        size = os.fstat(f.fileno()).st_size
        bar = progress(description, size) if progress else None
        blank = True
        try:
            for text, n in _decoded_chunks(f, path, codec, shown, errors, chunk_size=chunk_size):
                blank = blank and not text.strip()
                if n == 0 and blank:
                    raise _empty_file(path, size)
                if bar is not None:
                    bar.update(n)
                yield text, n == 0
        finally:
            if bar is not None:
                bar.close()


def _chunk_tokens(chunks, level):
    """The tokens of a text given as (text, final) chunks, chunk by chunk; together exactly
    ``tokenize(whole text, level)``: char level the code points (uint32 [n]), word level lists
    of str. A word cut by a chunk's end, or a last ``"\\r"`` that a ``"\\n"`` may follow, waits
    for the next chunk (so a line of any length costs no more than its longest word); an
    unfinished line ends with its ``<eos>`` when a line break or the end of the text comes."""
    if level == "char":
        for text, _ in chunks:
            yield np.frombuffer(text.encode("utf-32-le", "surrogatepass"), "<u4")
        return
    carry = ""
    for text, final in chunks:
        lines = (carry + text).splitlines(keepends=True)
        tail = ""                                       # the unfinished last line
        if lines and not final and (lines[-1][-1] not in LINE_BREAKS or lines[-1][-1] == "\r"):
            tail = lines.pop()
        # every line's words and its <eos>: the lines (line breaks are whitespace) joined by <eos>
        tokens = f" {EOS} ".join(lines).split() + [EOS] if lines else []
        words = tail.split()
        # what the next chunk continues: a "\r", the cut word, or a space that keeps the line open
        carry = "" if not tail else "\r" if tail[-1] == "\r" else " " if tail[-1].isspace() else words.pop()
        tokens.extend(words)
        yield tokens


def _scan(path, level, encoding, errors, chunk_size, progress):
    """The first pass over ``path``: (tokens, characters, the vocabulary of its tokens)."""
    n_tokens, n_chars = 0, 0
    seen = np.zeros(N_CODE_POINTS, np.bool_) if level == "char" else set()

    def counted(chunks):
        nonlocal n_chars
        for text, final in chunks:
            n_chars += len(text)
            yield text, final

    chunks = _text_chunks(path, encoding, errors, chunk_size, progress, f"count {os.path.basename(path)}")
    for tokens in _chunk_tokens(counted(chunks), level):
        n_tokens += len(tokens)
        if level == "char":
            seen[tokens] = True
        else:
            seen.update(tokens)
    if level == "char":
        return n_tokens, n_chars, Vocabulary([UNK] + [chr(c) for c in np.flatnonzero(seen)], "char")
    return n_tokens, n_chars, Vocabulary.build(seen, "word")


def _encoder(vocab, dtype):
    """A function from one chunk's tokens (as :func:`_chunk_tokens` gives them) to their ids [n]
    (char level of ``dtype``), unknown tokens as ``<unk>`` (0)."""
    if vocab.level == "word":
        return vocab.encode_tokens
    codes = np.array([ord(s) for s in vocab.symbols[1:]], np.int64)
    table = np.zeros(codes.max(initial=0) + 2, dtype)    # code point -> id; the last: all above
    table[codes] = np.arange(1, len(vocab))
    top = len(table) - 1
    return lambda points: table[np.minimum(points, top)]


def _source(path, encoding, errors):
    return {"name": os.path.basename(path), "bytes": os.path.getsize(path), "encoding": encoding,
            "decode_errors": errors}


def prepare(path, out_dir, level="char", valid_fraction=None, valid_path=None, vocab=None, encoding="utf-8",
            errors="strict", progress=None, chunk_size=PREPARE_CHUNK_BYTES):
    """Tokenize the text file ``path`` into the prepared corpus ``out_dir`` (a directory, made
    if needed; a corpus already there is replaced) and return it opened (:func:`open_prepared`).

    The ids are those of ``load_corpus(path, level, valid_fraction=..., vocab=...)`` (same
    tokenization, vocabulary, ``<unk>`` and split), but the file is read in chunks of
    ``chunk_size`` bytes, twice (the first pass counts the tokens and collects the vocabulary,
    the second writes the ids), so memory stays bounded whatever its size; there is no
    :func:`max_text_bytes` limit. ``valid_fraction``: the last part of the tokens held out in
    ``valid.bin`` (default 0.1; 0: none). ``valid_path``: a second text file as the validation
    split instead (encoded with the training file's vocabulary, its unseen tokens ``<unk>``).
    ``vocab``: encode with this :class:`bptt.data.Vocabulary` instead of building one. ``encoding``,
    ``errors``: as :func:`bptt.data.read_text`. ``progress``: a tqdm-like factory ``progress(description,
    total_bytes)`` returning a bar with ``update(n_bytes)`` and ``close()``, one per pass.
    The files are written as :mod:`bptt.token_file` describes, atomically.
    """
    path, out_dir = os.fspath(path), os.fspath(out_dir)
    _check_level(level)
    if errors not in DECODE_ERRORS:
        raise ValueError(f"errors must be one of {', '.join(DECODE_ERRORS)}; got {errors!r}")
    if valid_fraction is None:
        valid_fraction = 0.0 if valid_path is not None else 0.1
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1); got {valid_fraction!r}")
    if valid_path is not None and valid_fraction > 0:
        raise ValueError("give valid_fraction or valid_path, not both: the validation split is one of them")
    if vocab is not None and vocab.level != level:
        raise ValueError(f"vocabulary is {vocab.level}-level but level={level!r} was asked")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"{out_dir}: is a file, expected a directory for the prepared corpus")
    _codec(encoding)
    n_tokens, n_chars, found = _scan(path, level, encoding, errors, chunk_size, progress)
    vocab = vocab or found
    n_valid = held_out(n_tokens, valid_fraction, level, path)
    os.makedirs(out_dir, exist_ok=True)
    dtype = token_file.dtype_for(len(vocab))
    encode = _encoder(vocab, token_file.DTYPES[dtype])
    writers = {}
    try:
        writers["train"] = train = token_file.TokenWriter(out_dir, token_file.SPLIT_FILES["train"], dtype)
        if n_valid or valid_path is not None:
            writers["valid"] = token_file.TokenWriter(out_dir, token_file.SPLIT_FILES["valid"], dtype)
        chunks = _text_chunks(path, encoding, errors, chunk_size, progress, f"write {os.path.basename(path)}")
        for ids in map(encode, _chunk_tokens(chunks, level)):
            cut = max(0, min(len(ids), n_tokens - n_valid - train.tokens))
            train.write(ids[:cut])
            if cut < len(ids):
                writers["valid"].write(ids[cut:])
        written = sum(w.tokens for w in writers.values())
        if written != n_tokens:
            raise DataError(f"{path}: changed while it was read ({n_tokens:,} tokens, then {written:,})")
        if valid_path is not None:
            valid_path = os.fspath(valid_path)
            chunks = _text_chunks(valid_path, encoding, errors, chunk_size, progress,
                                  f"write {os.path.basename(valid_path)}")
            for ids in map(encode, _chunk_tokens(chunks, level)):
                writers["valid"].write(ids)
            held_out(writers["valid"].tokens, 0.0, level, valid_path)
        meta = {"format": token_file.FORMAT, "version": token_file.VERSION, "level": level,
                "vocab_size": len(vocab), "dtype": dtype, "chars": n_chars,
                "source": _source(path, encoding, errors),
                "valid_source": None if valid_path is None else _source(valid_path, encoding, errors),
                "valid_fraction": valid_fraction}
        token_file.commit(out_dir, writers, vocab.to_json(), meta)
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    return open_prepared(out_dir)


class PreparedCorpus:
    """A corpus made by :func:`prepare`, opened by :func:`open_prepared`: ``train`` and ``valid``
    (the memory-mapped ids, :class:`bptt.token_file.TokenMemmap` [n]; ``valid`` None without a
    validation split), ``vocab``, ``level``, ``source`` (the directory), ``n_chars``
    (characters of the training text), ``meta`` (the header). Used where a :class:`bptt.data.Corpus` is."""

    def __init__(self, directory, meta, vocab, splits):
        self.source, self.meta, self.vocab, self.level = directory, meta, vocab, meta["level"]
        self.n_chars = meta["chars"]
        self.train, self.valid = splits["train"], splits.get("valid")

    def __repr__(self):
        valid = 0 if self.valid is None else len(self.valid)
        return (f"PreparedCorpus(source={self.source!r}, level={self.level!r}, vocab={len(self.vocab)}, "
                f"train={len(self.train)}, valid={valid})")


def open_prepared(directory, verify=False, progress=None):
    """The prepared corpus in ``directory`` (:class:`PreparedCorpus`), its ids memory-mapped,
    nothing read yet. Checked: the header, the vocabulary, and every token file's size (cheap).
    ``verify=True`` also reads every token file whole: its CRC32 against the header's, every id
    below the vocabulary size (``progress``: as :func:`prepare`'s). Errors are DataError, one
    line naming the file."""
    directory = os.fspath(directory)
    meta = token_file.read_header(directory)
    vocab = token_file.read_vocab(directory, meta)
    splits = {split: token_file.open_tokens(directory, entry, meta["dtype"]) for split, entry in meta["splits"].items()}
    if verify:
        for entry in meta["splits"].values():
            token_file.verify_tokens(directory, entry, meta["dtype"], len(vocab), progress)
    return PreparedCorpus(directory, meta, vocab, splits)
