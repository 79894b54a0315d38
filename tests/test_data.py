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
