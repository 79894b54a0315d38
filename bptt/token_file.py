"""The prepared-corpus format: token ids in flat binary files beside a JSON header, memory-mapped
for training (what ``bptt prepare`` writes; :func:`bptt.prepared.prepare`, :func:`bptt.prepared.open_prepared`).

A prepared corpus is a directory (nanoGPT's ``train.bin``/``val.bin`` layout):

* ``train.bin``, ``valid.bin``: the token ids and nothing else, little-endian ``uint16`` where the
  vocabulary has at most 65,536 symbols, else ``uint32``. ``valid.bin`` is absent when no
  validation split was asked for.
* ``vocab.json``: the vocabulary, as :meth:`bptt.data.Vocabulary.to_json` writes it.
* ``meta.json``: the header::

      {"format": "bptt-prepared-corpus", "version": 1, "level": "char", "vocab_size": 97,
       "dtype": "uint16", "chars": 2000000000,
       "source": {"name": "big.txt", "bytes": 2000000000, "encoding": "utf-8", "decode_errors": "strict"},
       "valid_source": null, "valid_fraction": 0.001,
       "splits": {"train": {"file": "train.bin", "tokens": 1998000000, "bytes": 3996000000, "crc32": 123},
                  "valid": {"file": "valid.bin", "tokens": 2000000, "bytes": 4000000, "crc32": 456}}}

  ``chars`` counts the characters of the training text, ``source``/``valid_source`` the text
  files it came from (``valid_source`` null when the validation split is the end of the training
  file); ``crc32`` is the CRC32 of the file's bytes, computed while it was written.

Writing: every file goes to a temporary name in the directory, is fsynced and renamed into place;
an old ``meta.json`` is removed before the first rename and the new one renamed last, so a
directory with a ``meta.json`` is always a whole corpus (an interrupted ``prepare`` leaves none).

Reading (:func:`read_header`, :func:`open_tokens`) checks the header's fields, and that every
token file exists and has exactly ``tokens x itemsize`` bytes: cheap, done on every open.
:func:`verify_tokens` reads a file whole: its CRC32 against the header's, and every id below the
vocabulary size (``bptt prepare --verify DIR``). Training does not read the file whole; it checks
the ids of each chunk as it copies them (:class:`bptt.batches.TokenRows`). Every error is a
:class:`bptt.data.DataError` whose one line names the file.
"""

import json
import os
import tempfile
import zlib

import numpy as np

from bptt.data import LEVELS, DataError, Vocabulary

FORMAT = "bptt-prepared-corpus"
VERSION = 1
META_FILE = "meta.json"
VOCAB_FILE = "vocab.json"
SPLIT_FILES = {"train": "train.bin", "valid": "valid.bin"}
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
VERIFY_CHUNK_BYTES = 1 << 24


def dtype_for(vocab_size):
    """The name of the id type of a vocabulary of ``vocab_size`` symbols: uint16 when it fits."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class TokenMemmap(np.memmap):
    """The memory-mapped ids [n] of one token file. ``checksum``: the header's CRC32 of the file,
    which the whole-file array and its plain views keep (a slice, a cast, a reshape or any array
    computed from it gets None): a cheap fingerprint of gigabytes of ids."""

    def __array_finalize__(self, obj):
        super().__array_finalize__(obj)
        whole = (isinstance(obj, TokenMemmap) and obj.checksum is not None and self.shape == obj.shape
                 and self.dtype == obj.dtype and self.strides == obj.strides
                 and self.__array_interface__["data"][0] == obj.__array_interface__["data"][0])
        self.checksum = obj.checksum if whole else None

    # as np.memmap does for itself: what is not a view of the file (a fancy index, a ufunc's
    # result) is a plain ndarray
    def __array_wrap__(self, arr, context=None, return_scalar=False):
        arr = super().__array_wrap__(arr, context, return_scalar)
        if arr is self or not isinstance(arr, np.memmap):
            return arr
        return arr[()] if return_scalar else arr.view(np.ndarray)

    def __getitem__(self, index):
        res = super().__getitem__(index)
        return res.view(np.ndarray) if isinstance(res, np.memmap) and res._mmap is None else res


# ------------------------------------------------------------------------------------------
# writing


class TokenWriter:
    """Ids appended to a temporary file in ``directory`` (the CRC32 computed as they are written),
    renamed to ``name`` by :func:`commit`. ``dtype``: "uint16" or "uint32"."""

    def __init__(self, directory, name, dtype):
        self.name, self.dtype = name, DTYPES[dtype]
        fd, self.tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        self.file = os.fdopen(fd, "wb")
        self.tokens, self.crc32 = 0, 0

    def write(self, ids):
        """Append ``ids`` [n] (ints below 2**16 or 2**32, as the dtype)."""
        data = np.ascontiguousarray(ids, dtype=self.dtype)
        self.file.write(data)
        self.crc32 = zlib.crc32(data, self.crc32)
        self.tokens += len(data)

    def close(self):
        """Flush and fsync; the header's entry of the file: {"file", "tokens", "bytes", "crc32"}."""
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        return {"file": self.name, "tokens": self.tokens, "bytes": self.tokens * self.dtype.itemsize,
                "crc32": self.crc32}

    def discard(self):
        """Close and remove the temporary file (a failed or interrupted prepare)."""
        self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def _temp_json(directory, name, obj):
    """``obj`` as JSON in a fsynced temporary file in ``directory``; returns its path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1 if name == META_FILE else None)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return tmp


def commit(directory, writers, vocab_json, meta):
    """Put a prepared corpus in place in ``directory``: the closed ``writers``' files, ``vocab_json``
    (the vocabulary's dict) and the header ``meta`` (its "splits" filled from the writers), each
    renamed over the old file, ``meta.json`` removed first and renamed last. Returns ``meta``."""
    meta["splits"] = {split: w.close() for split, w in writers.items()}
    temps = {VOCAB_FILE: _temp_json(directory, VOCAB_FILE, vocab_json)}
    temps[META_FILE] = _temp_json(directory, META_FILE, meta)
    meta_path = os.path.join(directory, META_FILE)
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for split, name in SPLIT_FILES.items():           # a split not written this time is removed
        path = os.path.join(directory, name)
        if split in writers:
            os.replace(writers[split].tmp, path)
        elif os.path.exists(path):
            os.remove(path)
    os.replace(temps[VOCAB_FILE], os.path.join(directory, VOCAB_FILE))
    os.replace(temps[META_FILE], meta_path)
    _fsync_directory(directory)
    return meta


def _fsync_directory(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:                                    # not possible on every platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------
# reading


def _int(value, minimum=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def read_header(directory):
    """The checked header (``meta.json``) of the prepared corpus ``directory`` (a dict)."""
    path = os.path.join(directory, META_FILE)
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: no such directory" if not os.path.exists(directory) else
                        f"{directory}: not a directory (a prepared corpus is a directory made by bptt prepare)")
    if not os.path.exists(path):
        raise DataError(f"{directory}: is a directory but not a prepared corpus (no {META_FILE}); give a text "
                        f"file, or make a corpus with: bptt prepare --data FILE --out {directory}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable header ({e}); prepare the corpus again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{path}: not a bptt prepared-corpus header (format {found!r}, expected {FORMAT!r})")
    if not _int(meta.get("version"), 1) or meta["version"] > VERSION:
        raise DataError(f"{path}: format version {meta.get('version')!r}; this bptt reads version {VERSION} "
                        "(prepare the corpus again with this bptt)")

    def bad(what):
        return DataError(f"{path}: {what}; prepare the corpus again")

    if meta.get("level") not in LEVELS:
        raise bad(f"level must be one of {', '.join(LEVELS)}, got {meta.get('level')!r}")
    if not _int(meta.get("vocab_size"), 2):
        raise bad(f"vocab_size must be an integer >= 2, got {meta.get('vocab_size')!r}")
    if meta.get("dtype") not in DTYPES:
        raise bad(f"dtype must be one of {', '.join(DTYPES)}, got {meta.get('dtype')!r}")
    if np.iinfo(DTYPES[meta["dtype"]]).max < meta["vocab_size"] - 1:
        raise bad(f"dtype {meta['dtype']} cannot hold the ids of {meta['vocab_size']:,} symbols")
    if not _int(meta.get("chars")):
        raise bad(f"chars must be an integer >= 0, got {meta.get('chars')!r}")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or "train" not in splits or not set(splits) <= set(SPLIT_FILES):
        raise bad(f"splits must be an object with 'train' (and 'valid'), got {splits!r:.80}")
    itemsize = DTYPES[meta["dtype"]].itemsize
    for split, entry in splits.items():
        if not isinstance(entry, dict) or entry.get("file") != SPLIT_FILES[split]:
            raise bad(f"splits.{split} must be an object with file {SPLIT_FILES[split]!r}, got {entry!r:.80}")
        if not _int(entry.get("tokens"), 1) or entry.get("bytes") != entry["tokens"] * itemsize:
            raise bad(f"splits.{split}: tokens must be a positive integer and bytes tokens x {itemsize}, "
                      f"got {entry.get('tokens')!r} and {entry.get('bytes')!r}")
        if not _int(entry.get("crc32")) or entry["crc32"] >= 1 << 32:
            raise bad(f"splits.{split}.crc32 must be a 32-bit unsigned integer, got {entry.get('crc32')!r}")
    return meta


def read_vocab(directory, meta):
    """The vocabulary (``vocab.json``) of the prepared corpus ``directory`` whose header is ``meta``;
    DataError naming the file if it is unreadable or not the header's level and size."""
    path = os.path.join(directory, VOCAB_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            vocab = Vocabulary.from_json(json.load(f))
    except (OSError, UnicodeDecodeError, ValueError) as e:      # JSONDecodeError is a ValueError
        raise DataError(f"{path}: unreadable vocabulary ({e}); prepare the corpus again") from None
    if (vocab.level, len(vocab)) != (meta["level"], meta["vocab_size"]):
        raise DataError(f"{path}: a {vocab.level}-level vocabulary of {len(vocab):,} symbols, but {META_FILE} says "
                        f"{meta['level']}-level, {meta['vocab_size']:,}; prepare the corpus again")
    return vocab


def open_tokens(directory, entry, dtype):
    """The ids of the token file of the header's ``entry`` in ``directory`` as a read-only
    :class:`TokenMemmap` [tokens] (checked: it exists and has exactly the header's size)."""
    path = os.path.join(directory, entry["file"])
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise DataError(f"{path}: {e.strerror or e} (the header {META_FILE} lists it); prepare the corpus again") \
            from None
    if size != entry["bytes"]:
        how = "truncated" if size < entry["bytes"] else "longer than written"
        raise DataError(f"{path}: {size:,} bytes, but {META_FILE} says {entry['bytes']:,} ({entry['tokens']:,} "
                        f"{dtype} ids): the file is {how}; prepare the corpus again")
    try:
        tokens = TokenMemmap(path, dtype=DTYPES[dtype], mode="r", shape=(entry["tokens"],))
    except OSError as e:
        raise DataError(f"{path}: cannot map ({e.strerror or e})") from None
    tokens.checksum = entry["crc32"]
    return tokens


def verify_tokens(directory, entry, dtype, vocab_size, progress=None):
    """Read the token file of ``entry`` whole: DataError naming it unless its CRC32 is the
    header's and every id is below ``vocab_size``. ``progress``: a tqdm-like factory
    ``progress(description, total_bytes)`` (``update(n)``, ``close()``) or None."""
    path = os.path.join(directory, entry["file"])
    dt = DTYPES[dtype]
    chunk = VERIFY_CHUNK_BYTES - VERIFY_CHUNK_BYTES % dt.itemsize
    crc, position, first_bad = 0, 0, None
    bar = progress(f"verify {entry['file']}", entry["bytes"]) if progress else None
    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(chunk)
                if not data:
                    break
                crc = zlib.crc32(data, crc)
                ids = np.frombuffer(data, dt, count=len(data) // dt.itemsize)
                if first_bad is None and ids.size and ids.max() >= vocab_size:
                    at = int(np.argmax(ids >= vocab_size))
                    first_bad = (int(ids[at]), position + at)
                position += ids.size
                if bar is not None:
                    bar.update(len(data))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    finally:
        if bar is not None:
            bar.close()
    if position != entry["tokens"]:
        raise DataError(f"{path}: {position:,} ids, but {META_FILE} says {entry['tokens']:,}; prepare the corpus again")
    if crc != entry["crc32"]:
        raise DataError(f"{path}: CRC32 {crc:#010x} differs from {META_FILE}'s {entry['crc32']:#010x}: "
                        "the file is damaged; prepare the corpus again")
    if first_bad is not None:
        raise DataError(f"{path}: token id {first_bad[0]:,} at position {first_bad[1]:,} is not below the "
                        f"vocabulary size {vocab_size:,}; prepare the corpus again")
