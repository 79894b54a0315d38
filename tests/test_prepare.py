"""Prepared corpora (``bptt prepare``, :func:`bptt.prepared.prepare`, :func:`bptt.prepared.open_prepared`):
the same ids as the in-memory path, bounded memory, memory-mapped training equal to in-memory
training (Python API, command line, resume), and one-line errors for damaged files."""

import json
import os
import tracemalloc
import zlib

import numpy as np
import pytest

import bptt
from bptt import token_file
from bptt.batches import Dataset
from bptt.checkpoint import load_model
from bptt.cli import CHECKPOINT_FILE, main
from bptt.data import EOS, Corpus, DataError, Vocabulary, default_corpus_text, load_corpus, read_text
from bptt.prepared import PreparedCorpus, open_prepared, prepare

# pieces of text that tokenizers trip over: every line break str.splitlines knows (\r\n split
# across chunks included), tabs and runs of spaces, multi-byte characters, blank lines
PIECES = ["the", "cat", "sät", "on", "€uro", "😀", "x" * 40, " ", "  ", "\t", "\n", "\n", "\r\n", "\r", "\n\n",
          "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029", " \r\n ", "a\rb"]


def random_text(rng, n_pieces, pieces=PIECES):
    return "".join(pieces[i] for i in rng.integers(0, len(pieces), n_pieces))


@pytest.fixture(autouse=True)
def reference_backend():
    with bptt.use_backend("reference"):
        yield


def same_ids(prepared, train, valid, vocab):
    assert isinstance(prepared, PreparedCorpus) and prepared.vocab == vocab
    np.testing.assert_array_equal(prepared.train, train)
    if valid is None or len(valid) == 0:
        assert prepared.valid is None
    else:
        np.testing.assert_array_equal(prepared.valid, valid)


# ------------------------------------------------------------------------------------------
# the same ids as the in-memory path


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
@pytest.mark.parametrize("valid_fraction", [0.1, 0.0, 0.37])
def test_same_ids_as_load_corpus(tmp_path, rng, level, chunk_size, valid_fraction):
    text = "\ufeff" + random_text(rng, 3000) + rng.choice(["", "\r", "tail", "\n"])   # a BOM, any ending
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8", newline="")
    prepared = prepare(path, tmp_path / "corpus", level=level, valid_fraction=valid_fraction,
                       chunk_size=chunk_size)
    corpus = load_corpus(path, level, valid_fraction=valid_fraction)
    same_ids(prepared, corpus.train, corpus.valid, corpus.vocab)
    assert prepared.n_chars == corpus.n_chars
    assert prepared.train.dtype == np.dtype("<u2") and prepared.meta["source"]["name"] == "text.txt"


def test_the_chunked_tokenizer_is_tokenize_on_many_short_texts(tmp_path, rng):
    """Every way a text can be cut into chunks (a word, a \r\n, a multi-byte character, a line
    of only spaces at the end) gives tokenize's tokens."""
    from bptt.data import tokenize
    from bptt.prepared import _chunk_tokens, _text_chunks
    path = tmp_path / "t.txt"
    for _ in range(300):
        text = "x" + random_text(rng, int(rng.integers(1, 60)))
        path.write_text(text, encoding="utf-8", newline="")
        for level in ("char", "word"):
            for chunk_size in (1, 2, 3, 5, 11):
                chunks = _chunk_tokens(_text_chunks(str(path), "utf-8", "strict", chunk_size), level)
                tokens = [t for chunk in chunks for t in (map(chr, chunk) if level == "char" else chunk)]
                assert tokens == tokenize(text, level), (text, chunk_size)


@pytest.mark.parametrize("level", ["char", "word"])
def test_a_second_file_as_validation_is_encoded_with_the_first_files_vocabulary(tmp_path, rng, level):
    train_path, valid_path = tmp_path / "train.txt", tmp_path / "valid.txt"
    train_path.write_text(random_text(rng, 2000), encoding="utf-8", newline="")
    valid_path.write_text(random_text(rng, 500, PIECES + ["zebra", "ü"]), encoding="utf-8", newline="")
    prepared = prepare(train_path, tmp_path / "corpus", level=level, valid_path=valid_path, chunk_size=13)
    corpus = load_corpus(train_path, level, valid_fraction=0.0)
    valid = Corpus(read_text(valid_path), level, 0.0, vocab=corpus.vocab).train
    assert (valid == 0).any()                          # unseen symbols became <unk>
    same_ids(prepared, corpus.train, valid, corpus.vocab)
    assert prepared.meta["valid_source"]["name"] == "valid.txt"


def test_an_existing_vocabulary_an_encoding_and_replaced_bytes(tmp_path, rng):
    vocab = Vocabulary.build(list("aeiou \n"), "char")
    path = tmp_path / "latin.txt"
    path.write_bytes(("caf\xe9 au lait with a few more words\n" * 50).encode("latin-1"))
    prepared = prepare(path, tmp_path / "a", vocab=vocab, encoding="latin-1", chunk_size=5)
    corpus = load_corpus(path, "char", vocab=vocab, encoding="latin-1")
    same_ids(prepared, corpus.train, corpus.valid, vocab)
    with pytest.raises(DataError, match=r"latin.txt: not UTF-8 text \(invalid byte 0xe9 at offset 3, line 1\)"):
        prepare(path, tmp_path / "b")
    prepared = prepare(path, tmp_path / "b", errors="replace", chunk_size=3)
    corpus = load_corpus(path, "char", errors="replace")
    same_ids(prepared, corpus.train, corpus.valid, corpus.vocab)


def test_a_vocabulary_over_65536_symbols_takes_uint32(tmp_path, rng):
    words = [f"w{i}" for i in rng.permutation(70_000)]
    path = tmp_path / "words.txt"
    path.write_text("\n".join(" ".join(words[i:i + 9]) for i in range(0, len(words), 9)) + "\n")
    prepared = prepare(path, tmp_path / "corpus", level="word")
    corpus = load_corpus(path, "word")
    assert len(corpus.vocab) > 1 << 16 and prepared.train.dtype == np.dtype("<u4")
    same_ids(prepared, corpus.train, corpus.valid, corpus.vocab)


def test_too_short_and_empty_files_fail_as_in_memory(tmp_path):
    short, blank = tmp_path / "short.txt", tmp_path / "blank.txt"
    short.write_text("ab")
    blank.write_text(" \n\t\n")
    for path, message in ((short, "short.txt: too short to train on: 2 char tokens"),
                          (blank, "blank.txt: file is empty")):
        with pytest.raises(DataError, match=message):
            load_corpus(path)
        with pytest.raises(DataError, match=message):
            prepare(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------
# bounded memory


def _write_big(path, rng, n_bytes):
    """A text file of about ``n_bytes``: the default corpus's lines, shuffled, again and again."""
    lines = default_corpus_text().splitlines(keepends=True)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < n_bytes:
            block = "".join(lines[i] for i in rng.permutation(len(lines)))
            f.write(block)
            written += len(block)
    return os.path.getsize(path)


def _traced_peak(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("level, small_mb, big_mb, below", [("char", 8, 32, 8), ("word", 2.5, 10, 3)])
def test_memory_stays_bounded_whatever_the_file_size(tmp_path, rng, level, small_mb, big_mb, below):
    """The Python-allocated peak (NumPy's arrays included) of prepare is a fraction of the file
    size (the word level's, traced token by token, on a smaller file), and no larger for a file
    four times as big."""
    peaks, sizes = [], []
    for mb in (small_mb, big_mb):
        path = tmp_path / f"{mb}.txt"
        sizes.append(_write_big(path, rng, int(mb * 10 ** 6)))
        out = tmp_path / f"out{mb}"
        peaks.append(_traced_peak(lambda: prepare(path, out, level=level)))
        assert len(open_prepared(out).train) > 0
        os.remove(path)
    assert peaks[1] < sizes[1] / below, (peaks, sizes)
    assert peaks[1] < peaks[0] + 1e6, (peaks, sizes)


# ------------------------------------------------------------------------------------------
# training from the memory map


def lm_trainer(vocab_size, k1=5, k2=8):
    model = bptt.LanguageModel(vocab_size, 6, 7, num_layers=2, cell="lstm", dropout=0.2, dtype=np.float64, seed=3)
    return bptt.Trainer(model, bptt.Adam(0.01), k1=k1, k2=k2, clip_norm=1.0)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)


@pytest.fixture
def text_file(tmp_path, rng):
    path = tmp_path / "text.txt"
    path.write_text(random_text(rng, 1500, PIECES[:12]), encoding="utf-8")
    return path


def test_the_dataset_holds_views_of_the_memory_map_and_a_cheap_fingerprint(tmp_path, text_file):
    prepared = prepare(text_file, tmp_path / "corpus")
    model = bptt.LanguageModel(len(prepared.vocab), 4, 5)
    dataset = Dataset(model, prepared.train, 3)
    group = dataset.groups[0]
    for rows in (group.inputs.rows, group.targets.rows):
        assert np.shares_memory(rows, prepared.train) and rows.dtype == np.dtype("<u2")
    chunk = group.inputs[2:6]
    assert chunk.dtype == np.int64 and not np.shares_memory(chunk, prepared.train)
    n = len(prepared.train) // 3
    np.testing.assert_array_equal(chunk, np.asarray(prepared.train[:3 * n]).reshape(3, n).T[2:6])
    # the fingerprint comes from the header's CRC32: the same corpus opened again gives the same,
    # a copy of the same ids in memory is hashed instead
    assert Dataset(model, open_prepared(tmp_path / "corpus").train, 3).fingerprint == dataset.fingerprint
    copy = np.array(prepared.train)
    assert Dataset(model, copy, 3).fingerprint != dataset.fingerprint
    assert Dataset(model, prepared.train[:-1], 3).fingerprint == Dataset(model, copy[:-1], 3).fingerprint
    # text prepared from a different file gives another fingerprint
    other = tmp_path / "other.txt"
    other.write_text(read_text(text_file)[::-1])
    assert Dataset(model, prepare(other, tmp_path / "o", vocab=prepared.vocab).train, 3).fingerprint \
        != dataset.fingerprint


@pytest.mark.parametrize("level", ["char", "word"])
def test_training_on_a_prepared_corpus_equals_training_in_memory(tmp_path, text_file, level):
    prepared = prepare(text_file, tmp_path / "corpus", level=level)
    corpus = load_corpus(text_file, level)
    on_disk, in_memory = lm_trainer(len(prepared.vocab)), lm_trainer(len(corpus.vocab))
    on_disk.fit(prepared.train, 4, epochs=2, max_steps=9, validation=prepared.valid, eval_every=4)
    in_memory.fit(corpus.train, 4, epochs=2, max_steps=9, validation=corpus.valid, eval_every=4)
    assert on_disk.step == in_memory.step == 9
    assert_same_weights(on_disk.model, in_memory.model)
    assert on_disk.history["val_loss"] == in_memory.history["val_loss"]


def test_resume_from_a_checkpoint_on_a_prepared_corpus(tmp_path, text_file):
    prepared = prepare(text_file, tmp_path / "corpus")
    full = lm_trainer(len(prepared.vocab))
    full.fit(prepared.train, 8, max_steps=12)
    first = lm_trainer(len(prepared.vocab))
    first.fit(prepared.train, 8, max_steps=5)
    first.save_checkpoint(tmp_path / "run.npz")
    resumed = bptt.Trainer.from_checkpoint(tmp_path / "run.npz")
    assert resumed.position is not None and len(resumed.position.ring) >= 1
    resumed.fit(open_prepared(tmp_path / "corpus").train, 8, max_steps=12)
    assert resumed.step == full.step == 12
    assert_same_weights(resumed.model, full.model)
    # the corpus prepared again from other text is refused
    other = tmp_path / "other.txt"
    other.write_text(read_text(text_file) + "more text at the end\n")
    resumed = bptt.Trainer.from_checkpoint(tmp_path / "run.npz")
    with pytest.raises(ValueError, match="same data"):
        resumed.fit(prepare(other, tmp_path / "o", vocab=prepared.vocab).train, 8, max_steps=12)


TINY = ["--hidden-size", "8", "--embedding-size", "5", "--k1", "5", "--k2", "7", "--batch-size", "3",
        "--sample-length", "0", "--json"]


def _run(capsys, argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


@pytest.mark.parametrize("level", ["char", "word"])
def test_the_command_line_trains_the_same_from_a_prepared_directory(tmp_path, text_file, capsys, level):
    summary, err = _run(capsys, ["prepare", "--data", text_file, "--out", tmp_path / "corpus", "--level", level,
                                  "--json"])
    assert summary["train_tokens"] + summary["valid_tokens"] == len(load_corpus(text_file, level).vocab.encode(
        read_text(text_file)))
    assert "MB/s" in err
    runs = {}
    for name, data in (("file", text_file), ("dir", tmp_path / "corpus")):
        level_flag = ["--level", level] if name == "file" else []       # a directory has its own
        summary, err = _run(capsys, ["train", "--data", data, *level_flag, "--out", tmp_path / name,
                                     "--max-steps", "6", *TINY])
        runs[name] = summary
    assert "(prepared, " in err
    assert runs["dir"]["val_loss"] == runs["file"]["val_loss"]
    models = {name: load_model(tmp_path / name / CHECKPOINT_FILE)[0] for name in runs}
    assert_same_weights(models["dir"], models["file"])

    # interrupted after 3 updates and resumed to 6: the same weights
    _run(capsys, ["train", "--data", tmp_path / "corpus", "--out", tmp_path / "resumed", "--max-steps", "3", *TINY])
    _run(capsys, ["train", "--out", tmp_path / "resumed", "--resume", "--max-steps", "3", "--json"])
    assert_same_weights(load_model(tmp_path / "resumed" / CHECKPOINT_FILE)[0], models["dir"])

    # eval on the directory: its valid.bin, as eval of the run's held-out part
    by_dir, _ = _run(capsys, ["eval", tmp_path / "file", "--data", tmp_path / "corpus", "--json"])
    held_out, _ = _run(capsys, ["eval", tmp_path / "file", "--json"])
    assert by_dir["loss"] == held_out["loss"] and by_dir["tokens"] == held_out["tokens"]
    # a text prepared with the run's vocabulary and no validation split: as eval of the text file
    other = tmp_path / "other.txt"
    other.write_text(read_text(text_file)[::-1] + "\nnew words ü\n")
    _run(capsys, ["prepare", "--data", other, "--out", tmp_path / "test", "--vocab", tmp_path / "dir",
                  "--valid-fraction", "0", "--json"])
    by_dir, _ = _run(capsys, ["eval", tmp_path / "dir", "--data", tmp_path / "test", "--json"])
    by_file, _ = _run(capsys, ["eval", tmp_path / "dir", "--data", other, "--json"])
    assert by_dir["loss"] == by_file["loss"] and by_dir["unk_tokens"] == by_file["unk_tokens"] > 0


def test_the_progress_bar_shows_bytes_and_their_rate(monkeypatch):
    import io
    from bptt.cli.progress import byte_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, lines in ((Terminal(), 0), (io.StringIO(), 2)):
        clock = iter(range(0, 100, 5))
        monkeypatch.setattr("tqdm.std.time", lambda: float(next(clock)))       # 5 s a reading
        bar = byte_bar("write big.txt", 8 * 10 ** 9, stream)
        for _ in range(4):
            bar.update(2 * 10 ** 9)
        bar.close()
        text = stream.getvalue()
        assert "write big.txt: 100%" in text and "8.00G/8.00G" in text and "MB/s" in text, text
        if lines:                                   # off a terminal: a plain line every 10 s
            assert "\r" not in text and 2 <= len(text.splitlines()) <= 3, text


# ------------------------------------------------------------------------------------------
# damaged corpora: one line naming the file


def _rewrite_meta(directory, change):
    path = directory / "meta.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def _bad_id(directory):
    """train.bin gets an id past the vocabulary near its end, the header's CRC32 made to match."""
    path = directory / "train.bin"
    ids = np.fromfile(path, "<u2")
    ids[-3] = 60_000
    ids.tofile(path)
    _rewrite_meta(directory, lambda m: m["splits"]["train"].update(crc32=zlib.crc32(ids.tobytes())))


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


# (what is done to the corpus, the file the error names, its message, found when opening (else: verify))
DAMAGES = {
    "truncated token file": (lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-2]),
                             "train.bin", "bytes, but meta.json says .* the file is truncated", True),
    "longer token file": (lambda d: (d / "valid.bin").write_bytes((d / "valid.bin").read_bytes() + b"\0\0"),
                          "valid.bin", "the file is longer than written", True),
    "missing token file": (lambda d: (d / "valid.bin").unlink(), "valid.bin", "No such file", True),
    "missing header": (lambda d: (d / "meta.json").unlink(), "corpus", "is a directory but not a prepared corpus "
                       "\\(no meta.json\\)", True),
    "garbled header": (lambda d: (d / "meta.json").write_text('{"format": "bptt-prep'), "meta.json",
                       "unreadable header", True),
    "foreign header": (lambda d: (d / "meta.json").write_text('{"vocab_size": 50000}'), "meta.json",
                       "not a bptt prepared-corpus header", True),
    "newer version": (lambda d: _rewrite_meta(d, lambda m: m.update(version=7)), "meta.json",
                      "format version 7; this bptt reads version 1", True),
    "token count": (lambda d: _rewrite_meta(d, lambda m: m["splits"]["train"].update(tokens=-1)), "meta.json",
                    "tokens must be a positive integer", True),
    "garbled vocabulary": (lambda d: (d / "vocab.json").write_text("[1, 2"), "vocab.json",
                           "unreadable vocabulary", True),
    "another vocabulary": (lambda d: (d / "vocab.json").write_text(json.dumps({"level": "char", "symbols": [
        "<unk>", "a"]})), "vocab.json", "2 symbols, but meta.json says char-level", True),
    "flipped byte": (lambda d: _flip_a_byte(d / "train.bin"), "train.bin", "CRC32 .* differs from meta.json's", False),
    "id past the vocabulary": (_bad_id, "train.bin", "token id 60,000 at position [0-9,]+ is not below the "
                               "vocabulary size", False),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_corpus_fails_in_one_line_naming_the_file(tmp_path, text_file, capsys, damage):
    corpus = tmp_path / "corpus"
    prepare(text_file, corpus)
    do, name, message, on_open = DAMAGES[damage]
    do(corpus)
    pattern = f"{name}: .*{message}" if name != "corpus" else f"corpus: {message}"
    if on_open:
        with pytest.raises(DataError, match=pattern):
            open_prepared(corpus)
        argv = ["train", "--data", corpus, "--out", tmp_path / "run", *TINY]
    else:
        open_prepared(corpus)                          # opening checks only the sizes
        with pytest.raises(DataError, match=pattern):
            open_prepared(corpus, verify=True)
        argv = ["prepare", "--verify", corpus]
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert name in err and not (tmp_path / "run").exists(), err


def test_an_id_past_the_vocabulary_fails_when_training_reaches_its_chunk(tmp_path, text_file):
    """Training does not read the file whole: the chunks before the bad id train, the chunk
    with it is a one-line error naming the file and the id's position."""
    corpus = tmp_path / "corpus"
    prepared = prepare(text_file, corpus)
    _bad_id(corpus)
    trainer = lm_trainer(len(prepared.vocab))
    bad = open_prepared(corpus).train
    position = len(bad) - 3
    with pytest.raises(DataError, match=f"train.bin: token id 60,000 at position {position:,} is not in the "
                                        f"model's vocabulary of {len(prepared.vocab)} ids"):
        trainer.fit(bad, 1, epochs=1)
    assert trainer.step == (position - 1) // trainer.k1      # the updates before its chunk were made


def test_a_failed_prepare_leaves_the_previous_corpus_and_no_temporary_file(tmp_path, text_file):
    corpus = tmp_path / "corpus"
    first = prepare(text_file, corpus).meta
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"valid start\n" * 100 + b"\xff\n")
    with pytest.raises(DataError, match=r"bad.txt: not UTF-8 text \(invalid byte 0xff at offset 1,200, line 101\)"):
        prepare(text_file, corpus, valid_path=bad)
    assert sorted(os.listdir(corpus)) == ["meta.json", "train.bin", "valid.bin", "vocab.json"]
    assert open_prepared(corpus, verify=True).meta == first
    # prepared again without a validation split: valid.bin goes
    prepare(text_file, corpus, valid_fraction=0.0)
    assert sorted(os.listdir(corpus)) == ["meta.json", "train.bin", "vocab.json"]
    assert open_prepared(corpus, verify=True).valid is None


def test_command_line_misuse_is_one_line(tmp_path, text_file, capsys):
    corpus = tmp_path / "corpus"
    prepare(text_file, corpus, valid_fraction=0.0)
    cases = {
        "no --out": (["prepare", "--data", text_file], "--out is required"),
        "verify with data": (["prepare", "--verify", corpus, "--data", text_file], "takes no --data"),
        "both validations": (["prepare", "--data", text_file, "--out", corpus, "--valid-fraction", "0.1",
                              "--valid", text_file], "not allowed with argument"),
        "fraction of 1": (["prepare", "--data", text_file, "--out", corpus, "--valid-fraction", "1"],
                          "must be in [0, 1)"),
        "max-chars with a directory": (["train", "--data", corpus, "--max-chars", "10"],
                                       "--max-chars is for text files"),
        "another level": (["train", "--data", corpus, "--level", "word", "--out", tmp_path / "r"],
                          "a char-level prepared corpus, but --level word was given"),
        "no validation split": (["train", "--data", corpus, "--out", tmp_path / "r"], "no validation split"),
        "out is a file": (["prepare", "--data", text_file, "--out", text_file], "is a file, expected a directory"),
    }
    for name, (argv, message) in cases.items():
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:                        # argparse errors exit 2
            rc = e.code
        out, err = capsys.readouterr()
        assert rc not in (0, None) and out == "", name
        assert message in err and len(err.strip().splitlines()) == 1, (name, err)
    assert not (tmp_path / "r").exists()


def test_the_header_names_the_format_and_its_files(tmp_path, text_file):
    prepared = prepare(text_file, tmp_path / "corpus", level="word", valid_fraction=0.2)
    meta = json.loads((tmp_path / "corpus" / "meta.json").read_text())
    assert meta == prepared.meta
    assert (meta["format"], meta["version"], meta["level"], meta["dtype"]) == (token_file.FORMAT, 1, "word", "uint16")
    assert meta["vocab_size"] == len(prepared.vocab) and EOS in prepared.vocab.symbols
    assert meta["source"]["bytes"] == os.path.getsize(text_file)
    for split, entry in meta["splits"].items():
        data = (tmp_path / "corpus" / entry["file"]).read_bytes()
        assert (entry["bytes"], entry["crc32"]) == (len(data), zlib.crc32(data))
        assert entry["tokens"] == len(getattr(prepared, split))
