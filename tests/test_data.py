"""Tokenizers, vocabulary serialisation, file errors, the default corpus and the split."""

import json

import numpy as np
import pytest

from bptt.data import (EOS, UNK, Corpus, DataError, Vocabulary, default_corpus_text, load_corpus,
                       read_text, tokenize)

TEXT = "The cat sat.\nThe dög ran  fast\n\nend"


def test_char_round_trip_keeps_every_code_point():
    vocab = Vocabulary.build(tokenize(TEXT, "char"), "char")
    ids = vocab.encode(TEXT)
    assert ids.dtype == np.int64 and len(ids) == len(TEXT)
    assert vocab.decode(ids) == TEXT
    assert vocab.symbols[0] == UNK and "ö" in vocab.symbols


def test_word_tokens_follow_ptb_lines_and_eos():
    assert tokenize(TEXT, "word") == ["The", "cat", "sat.", EOS, "The", "dög", "ran", "fast", EOS,
                                      EOS, "end", EOS]
    vocab = Vocabulary.build(tokenize(TEXT, "word"), "word")
    assert EOS in vocab.symbols
    # whitespace is normalised to single spaces, lines survive
    assert vocab.decode(vocab.encode(TEXT)) == "The cat sat.\nThe dög ran fast\n\nend\n"


@pytest.mark.parametrize("level, unseen", [("char", "xyz€"), ("word", "zebra quokka")])
def test_unseen_symbols_map_to_unk(level, unseen):
    vocab = Vocabulary.build(tokenize(TEXT, level), level)
    ids = vocab.encode(unseen)
    assert (ids[: len(tokenize(unseen, level)) - (level == "word")] == vocab.unk_id).all()
    assert vocab.unk_id == 0


def test_char_unk_decodes_to_replacement_character():
    vocab = Vocabulary.build(list("ab"), "char")
    assert vocab.decode(vocab.encode("abc")) == "ab\ufffd"


def test_vocabulary_json_round_trip():
    vocab = Vocabulary.build(tokenize(TEXT, "word"), "word")
    again = Vocabulary.from_json(json.loads(json.dumps(vocab.to_json())))
    assert again == vocab and again.level == "word"
    assert Vocabulary.from_json(json.dumps(vocab.to_json())) == vocab
    with pytest.raises(ValueError, match="symbols"):
        Vocabulary.from_json({"level": "char"})


def test_vocabulary_is_deterministic_and_rejects_bad_level():
    a = Vocabulary.build(tokenize(TEXT, "char"), "char")
    b = Vocabulary.build(reversed(tokenize(TEXT, "char")), "char")
    assert a == b
    with pytest.raises(ValueError, match="level"):
        tokenize(TEXT, "byte")


def test_empty_file_error_names_the_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n")
    with pytest.raises(DataError, match="empty.txt.*empty"):
        read_text(path)


def test_non_utf8_file_error_names_the_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8.*0xe9 at offset 3"):
        read_text(path)


def test_missing_file_and_directory_errors(tmp_path):
    with pytest.raises(DataError, match="nope.txt: no such file"):
        load_corpus(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="directory"):
        read_text(tmp_path)


def test_utf8_file_with_bom_and_cap(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffhello world\n".encode("utf-8"))
    assert read_text(path) == "hello world\n"
    assert read_text(path, max_chars=5) == "hello"


def test_default_corpus_is_offline_deterministic_and_capped():
    text = default_corpus_text()
    assert len(text) > 100_000 and text == default_corpus_text()
    assert default_corpus_text(max_chars=1000) == text[:1000]


def test_split_holds_out_the_last_tenth():
    text = "abcdefghij" * 10
    corpus = Corpus(text, "char", valid_fraction=0.1)
    assert len(corpus.train) == 90 and len(corpus.valid) == 10
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.valid]), corpus.vocab.encode(text))
    assert corpus.vocab.decode(corpus.valid) == text[90:]


def test_existing_vocab_encodes_new_file_with_unk(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello there\n" * 5)
    vocab = Vocabulary.build(list("helo \n"), "char")
    corpus = load_corpus(path, "char", vocab=vocab)
    assert corpus.vocab is vocab
    assert (np.concatenate([corpus.train, corpus.valid]) == 0).sum() == 2 * 5   # t, r unseen


def test_too_short_corpus_is_an_error():
    with pytest.raises(DataError, match="too short"):
        Corpus("ab", "char")


def test_chunked_read_keeps_characters_split_across_chunks(tmp_path, monkeypatch):
    """The file is decoded in chunks: a multi-byte character across a chunk boundary survives,
    an invalid byte is reported at its offset in the file, and max_chars stops reading early."""
    from bptt import data
    path = tmp_path / "t.txt"
    text = "aé€😀\n" * 1000
    path.write_bytes(text.encode("utf-8"))
    with open(path, "rb") as f:
        chunks = data._decoded_chunks(f, str(path), "utf-8-sig", "UTF-8", "strict", chunk_size=3)
        assert "".join(part for part, _ in chunks) == text
    path.write_bytes("é".encode("utf-8") * 10 + b"\n\xff")
    with open(path, "rb") as f, pytest.raises(DataError, match=r"0xff at offset 21, line 2\)"):
        list(data._decoded_chunks(f, str(path), "utf-8-sig", "UTF-8", "strict", chunk_size=4))
    assert read_text(path, errors="replace") == "é" * 10 + "\n\ufffd"
    monkeypatch.setenv("BPTT_MAX_TEXT_BYTES", "8")
    with pytest.raises(DataError, match=r"22 bytes is larger than the 8 bytes bptt reads whole"):
        read_text(path)
    assert read_text(path, max_chars=3) == "ééé"            # 6 bytes: under the limit
    with pytest.raises(DataError, match=r"--max-chars 9 needs more than the 8 bytes"):
        read_text(path, max_chars=9)
    monkeypatch.setenv("BPTT_MAX_TEXT_BYTES", "lots")
    with pytest.raises(DataError, match="BPTT_MAX_TEXT_BYTES must be a positive integer"):
        read_text(path)


def test_other_encodings_and_binary_detection(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("naïve café\n".encode("utf-16"))
    assert read_text(path, encoding="utf-16") == "naïve café\n"
    with pytest.raises(DataError, match=r"looks like a binary file, not UTF-8 text \(NUL bytes"):
        read_text(path)
    with pytest.raises(DataError, match="unknown text encoding 'klingon'"):
        read_text(path, encoding="klingon")
    with pytest.raises(ValueError, match="errors must be one of strict, replace"):
        read_text(path, errors="ignore")
    path.write_bytes(bytes(range(1, 32)) * 4)                # control codes only, no NUL
    with pytest.raises(DataError, match="looks like a binary file.*control codes"):
        read_text(path)
    path.write_text("tab\tand\x1b[1mescape\x1b[0m\n" * 10)   # tabs and ANSI escapes are text
    assert read_text(path).startswith("tab\t")


def test_too_short_says_how_many_tokens_are_needed():
    from bptt.data import min_tokens
    assert (min_tokens(0.1), min_tokens(0.0), min_tokens(0.5)) == (15, 2, 4)
    with pytest.raises(DataError, match=r"<text>: too short to train on: 3 word tokens, at least 15 needed"):
        Corpus("a b\n", "word")
    Corpus("a" * 15, "char")
    with pytest.raises(DataError, match="1 char token, at least 2 needed$"):
        Corpus("a", "char", valid_fraction=0.0)


@pytest.mark.parametrize("symbols, level, message", [
    (["a", UNK], "char", r"start with the unknown token '<unk>'; got \['a'\] \(it is at position 1\)"),
    ([UNK, "a", "b", "a"], "char", "must be unique; 'a' appears 2 times"),
    ([UNK, "ab"], "char", "single characters; got 'ab'"),
    ([UNK, 3], "char", r"must be str; got 3 \(int\)"),
    ([UNK, "word"], "word", "must hold the end-of-line token '<eos>'"),
    ("<unk>ab", "char", "a list of str, not a str"),
])
def test_inconsistent_vocabularies_are_refused(symbols, level, message):
    with pytest.raises(ValueError, match=message):
        Vocabulary(symbols, level)
    if isinstance(symbols, list):                        # as a checkpoint's meta carries it
        with pytest.raises(ValueError, match=message):
            Vocabulary.from_json(json.dumps({"level": level, "symbols": symbols}))


@pytest.mark.parametrize("obj, message", [
    ([1, 2], "needs a JSON object with 'level' and 'symbols'; got a list"),
    ("{not json", "invalid JSON"),
    ({"level": "char", "symbols": "abc"}, r"'symbols' is a string, not a list"),
    ({"symbols": [UNK]}, "got an object with keys symbols"),
])
def test_vocabulary_from_bad_json(obj, message):
    with pytest.raises(ValueError, match=message):
        Vocabulary.from_json(obj)
