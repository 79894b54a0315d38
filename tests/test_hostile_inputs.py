"""Hostile and broken inputs to ``bptt train|eval|sample`` and to checkpoint loading: each row of
:data:`ROWS` gives a non-zero exit status (2 for an unparsable flag, 1 otherwise; API rows raise
CheckpointError), exactly one line on stderr that names the problem and the file, no traceback,
and leaves every file as it was (the row's directory is compared before and after, file by
file: no run directory appears, no checkpoint or metrics file changes).

``python -m pytest tests/test_hostile_inputs.py -s`` prints the table of the rows and the
messages they gave (input | command | exit | message).

The data-size limit: bptt reads at most 128 MiB from a text file (``BPTT_MAX_TEXT_BYTES``
overrides it); a bigger file needs ``--max-chars N`` and is then read in chunks, only its first
N characters. The 1 GiB row uses a sparse file (no disk space, refused from its size alone)
through a real ``python -m bptt`` process; the 50 MB single-line rows lower the limit to 10 MB
through the environment variable.

Unwritable ``--out``: a file, and a path under a file, are refused for anyone. Root may write
into a chmod 0o555 directory, so that row uses such a directory where the tests do not run as
root, and ``/proc/sys`` (which root cannot create files in either) where they do; it is skipped
where neither applies.
"""

import hashlib
import io
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from typing import NamedTuple

import numpy as np
import pytest

import bptt
from bptt import checkpoint, checkpoint_file
from bptt.checkpoint import CheckpointError
from bptt.cli import CHECKPOINT_FILE, main

TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n    y = 0\n\n"
        "for i in range(10):\n    print(add(i, i))\n") * 4
TINY = ["--hidden-size", "12", "--embedding-size", "6", "--k1", "6", "--batch-size", "3", "--max-steps", "2",
        "--sample-length", "0", "--backend", "reference"]
REF = ["--backend", "reference"]
BIG_LIMIT = str(10_000_000)     # BPTT_MAX_TEXT_BYTES for the 50 MB rows


# ---------------------------------------------------------------------------------------------
# the inputs


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def _npy(array):
    """The bytes of ``array`` as an .npy file (object arrays pickled, as numpy would)."""
    f = io.BytesIO()
    np.lib.format.write_array(f, array, allow_pickle=True)
    return f.getvalue()


def _huge_npy(shape=(10 ** 12,), dtype="<f8", payload=64):
    """An .npy member whose header claims ``shape`` but which holds ``payload`` bytes."""
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
    return f.getvalue() + b"\0" * payload


def _header_npy(header):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    return _npy(np.frombuffer(raw, dtype=np.uint8))


def _rewrite_checkpoint(path, header=None, arrays=None, members=None, header_bytes=None):
    """Rewrite the checkpoint ``path`` as a zip of .npy members: its arrays (or ``arrays``), its
    header (or ``header``, or the raw ``header_bytes``) and the extra raw ``members``."""
    old_header, old_arrays = checkpoint_file.read(path)
    header = old_header if header is None else header
    arrays = old_arrays if arrays is None else arrays
    with zipfile.ZipFile(path, "w") as z:
        for name, array in arrays.items():
            z.writestr(name + ".npy", _npy(array))
        z.writestr(checkpoint_file.HEADER_KEY + ".npy",
                   _header_npy(header_bytes if header_bytes is not None else header))
        for name, data in (members or {}).items():
            z.writestr(name, data)


def _copy_run(runs, kind, tmp):
    """A copy of the trained run ``kind`` ("lm" or "copy") in ``tmp/run`` holding only
    checkpoint.npz and metrics.jsonl (no older checkpoint a resumed run could fall back to)."""
    run = tmp / "run"
    run.mkdir()
    for name in (CHECKPOINT_FILE, "metrics.jsonl"):
        if (runs[kind] / name).exists():
            shutil.copy2(runs[kind] / name, run / name)
    return run


def _edit(runs, tmp, kind="lm", **kw):
    run = _copy_run(runs, kind, tmp)
    _rewrite_checkpoint(run / CHECKPOINT_FILE, **kw)
    return {"run": run}


def _edit_header(runs, tmp, change, kind="lm"):
    run = _copy_run(runs, kind, tmp)
    header, arrays = checkpoint_file.read(run / CHECKPOINT_FILE)
    change(header)
    _rewrite_checkpoint(run / CHECKPOINT_FILE, header=header, arrays=arrays)
    return {"run": run}


def _edit_arrays(runs, tmp, change):
    run = _copy_run(runs, "lm", tmp)
    header, arrays = checkpoint_file.read(run / CHECKPOINT_FILE)
    change(arrays)
    _rewrite_checkpoint(run / CHECKPOINT_FILE, header=header, arrays=arrays)
    return {"run": run}


def _vocab_edit(change):
    def edit(header):
        change(header["meta"]["vocab"]["symbols"])
    return edit


def _text_file(name, data):
    def make(runs, tmp):
        return {"data": _write(tmp / name, data), "out": tmp / "out"}
    return make


def _large_single_line(runs, tmp):
    path = tmp / "line.txt"
    with open(path, "wb") as f:
        for _ in range(50):
            f.write(b"ab" * 500_000)                  # 50 MB, no newline
    return {"data": path, "out": tmp / "out"}


def _sparse_gib(runs, tmp):
    path = tmp / "huge.txt"
    with open(path, "wb") as f:
        f.truncate(2 ** 30)                          # 1 GiB, no blocks on disk
    return {"data": path, "out": tmp / "out"}


def _random_bytes(runs, tmp):
    data = bytes(b or 1 for b in random.Random(0).randbytes(4096))    # no NUL: the other rule
    return {"data": _write(tmp / "random.bin", data), "out": tmp / "out"}


def _invalid_deep(runs, tmp):
    line = b"x" * 1023 + b"\n"
    return {"data": _write(tmp / "deep.txt", line * 2048 + b"ok \xff\n"), "out": tmp / "out"}


def _good_data(runs, tmp, out=None):
    return {"data": _write(tmp / "good.txt", TEXT), "out": out if out is not None else tmp / "out"}


def _out_is_file(runs, tmp):
    return _good_data(runs, tmp, _write(tmp / "afile", "keep me\n"))


def _out_under_file(runs, tmp):
    _write(tmp / "afile", "keep me\n")
    return _good_data(runs, tmp, tmp / "afile" / "sub")


def _out_not_writable(runs, tmp):
    if os.geteuid() != 0:
        locked = tmp / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
        return _good_data(runs, tmp, locked / "run")
    if os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
        return _good_data(runs, tmp, "/proc/sys/bptt-run")
    pytest.skip("running as root without an unwritable directory to point --out at")


def _api_expect_sequence_model(runs, tmp):
    run = _copy_run(runs, "lm", tmp)
    checkpoint.load_model(run / CHECKPOINT_FILE, expect=bptt.SequenceModel)


def _api_object_array(runs, tmp):
    run = _copy_run(runs, "lm", tmp)
    _rewrite_checkpoint(run / CHECKPOINT_FILE, members={"evil.npy": _npy(np.array([{"x": 1}], dtype=object))})
    bptt.Trainer.from_checkpoint(run / CHECKPOINT_FILE)


def _api_trainer_of_other_model(runs, tmp):
    """A LanguageModel's trainer state loaded into a trainer of a SequenceModel."""
    run = _copy_run(runs, "lm", tmp)
    parts = checkpoint_file.load(run / CHECKPOINT_FILE, trainer=True)
    trainer = bptt.Trainer(bptt.SequenceModel(2, 4, 1), bptt.Adam(0.01))
    trainer.load_state_dict(dict(parts["trainer"], model=parts["model"], meta=parts["meta"]))


# ---------------------------------------------------------------------------------------------
# the table


class Row(NamedTuple):
    name: str          # the input, for the table
    make: object       # (runs, tmp) -> {placeholder: path}; or for an API row the call itself
    argv: tuple        # the command (placeholders {data}, {out}, {run}); () for an API row
    code: object       # exit status, or for an API row the name of the exception it raises
    message: str       # a regex the one line of stderr must contain
    env: tuple = ()    # (name, value) pairs set for the row
    subprocess: bool = False


TRAIN = ("train", "--data", "{data}", "--out", "{out}", *TINY)
OBJECT = {"evil.npy": _npy(np.array([{"x": 1}], dtype=object))}

ROWS = [
    # --- data files -----------------------------------------------------------------------------
    Row("empty file", _text_file("empty.txt", ""), TRAIN, 1, r"empty\.txt: file is empty$"),
    Row("one character", _text_file("one.txt", "a"), TRAIN, 1,
        r"one\.txt: too short to train on: 1 char token, at least 15 needed \(2 to hold out for validation\)"),
    Row("invalid UTF-8 (Latin-1 é on line 2)", _text_file("latin1.txt", "first line\ncafé au lait\n".encode("latin-1")),
        TRAIN, 1, r"latin1\.txt: not UTF-8 text \(invalid byte 0xe9 at offset 14, line 2\); give --encoding NAME "
        r"\(e\.g\. latin-1\) or --decode-errors replace"),
    Row("invalid UTF-8 after 2 MiB (past the first read chunk)", _invalid_deep, TRAIN, 1,
        r"deep\.txt: not UTF-8 text \(invalid byte 0xff at offset 2,097,155, line 2,049\)"),
    Row("invalid UTF-8, eval --data", _text_file("latin1.txt", "caf\xe9\n".encode("latin-1")),
        ("eval", "{out}", "--data", "{data}"), 1, r"^bptt eval: error: .*latin1\.txt: not UTF-8 text \(invalid byte 0xe9 "
        r"at offset 3, line 1\)"),
    Row("NUL bytes", _text_file("nul.txt", b"text\x00\x00 more text\n" * 20), TRAIN, 1,
        r"nul\.txt: looks like a binary file, not UTF-8 text \(NUL bytes, first at byte offset 4\)"),
    Row("random bytes (no NUL)", _random_bytes, TRAIN, 1,
        r"random\.bin: looks like a binary file, not UTF-8 text \(\d+% of its first [\d,]+ characters are "
        r"control codes or undecodable\)"),
    Row("UTF-16 text read as UTF-8", _text_file("utf16.txt", TEXT.encode("utf-16")), TRAIN, 1,
        r"utf16\.txt: looks like a binary file, not UTF-8 text \(NUL bytes"),
    Row("50 MB single line, limit lowered to 10 MB", _large_single_line, TRAIN, 1,
        r"line\.txt: 47\.7 MiB \(50,000,000 bytes\) is larger than the 9\.5 MiB \(10,000,000 bytes\) bptt reads whole; "
        r"give --max-chars N to read its first N characters \(or raise BPTT_MAX_TEXT_BYTES\)",
        env=(("BPTT_MAX_TEXT_BYTES", BIG_LIMIT),)),
    Row("50 MB single line, --max-chars past the 10 MB limit", _large_single_line,
        TRAIN + ("--max-chars", "20000000"), 1,
        r"line\.txt: --max-chars 20,000,000 needs more than the 9\.5 MiB \(10,000,000 bytes\) bptt reads from one "
        r"file; give a smaller --max-chars", env=(("BPTT_MAX_TEXT_BYTES", BIG_LIMIT),)),
    Row("1 GiB file (sparse), the real 128 MiB limit, python -m bptt", _sparse_gib, TRAIN, 1,
        r"huge\.txt: 1\.0 GiB \(1,073,741,824 bytes\) is larger than the 128\.0 MiB \(134,217,728 bytes\) bptt reads "
        r"whole; give --max-chars N", subprocess=True),
    Row("--data a folder", lambda runs, tmp: {"data": tmp, "out": tmp / "out"}, TRAIN, 1,
        r": is a directory but not a prepared corpus \(no meta\.json\); give a text file, or make a corpus with"),
    Row("--data a missing file", lambda runs, tmp: {"data": tmp / "nope.txt", "out": tmp / "out"}, TRAIN, 1,
        r"nope\.txt: no such file$"),
    Row("--encoding unknown", _text_file("good.txt", TEXT), TRAIN + ("--encoding", "klingon"), 2,
        r"argument --encoding: unknown encoding 'klingon'"),
    Row("--decode-errors unknown", _text_file("good.txt", TEXT), TRAIN + ("--decode-errors", "guess"), 2,
        r"argument --decode-errors: invalid choice: 'guess'"),
    # --- run directory ----------------------------------------------------------------------------
    Row("--out a regular file", _out_is_file, TRAIN, 1, r"--out .*afile: is a file, not a directory$"),
    Row("--out under a regular file", _out_under_file, TRAIN, 1,
        r"--out .*afile/sub: .*afile is a file, not a directory$"),
    Row("--out not writable", _out_not_writable, TRAIN, 1, r"--out .* \(.*\) (is not writable|is on a read-only)"),
    # --- vocabulary in the checkpoint's meta --------------------------------------------------------
    *[Row(f"vocabulary {what}, {cmd[0]}{' --resume' if cmd[0] == 'train' else ''}",
          lambda runs, tmp, change=change: _edit_header(runs, tmp, _vocab_edit(change)), cmd, 1, message)
      for what, change, message in [
          ("one symbol short of the embedding", lambda s: s.pop(),
           r"checkpoint\.npz: the vocabulary in its meta has 29 symbols but the model's embedding has 30 rows"),
          ("with a duplicate symbol", lambda s: s.__setitem__(2, s[3]),
           r"checkpoint\.npz: the vocabulary in its meta is unusable: symbols must be unique; '.' appears 2 times"),
          ("without <unk>", lambda s: s.pop(0),
           r"checkpoint\.npz: the vocabulary in its meta is unusable: symbols must start with the unknown token "
           r"'<unk>'"),
      ]
      for cmd in [("eval", "{run}", *REF), ("sample", "{run}", *REF), ("train", "--out", "{run}", "--resume", *REF)]],
    Row("vocabulary not a list", lambda runs, tmp: _edit_header(
        runs, tmp, lambda h: h["meta"]["vocab"].__setitem__("symbols", "abc")), ("sample", "{run}", *REF), 1,
        r"checkpoint\.npz: the vocabulary in its meta is unusable: not a serialised Vocabulary \('symbols' is a "
        r"string, not a list\)"),
    Row("meta config a list, sample", lambda runs, tmp: _edit_header(
        runs, tmp, lambda h: h["meta"].__setitem__("config", [1])), ("sample", "{run}", *REF), 1,
        r"checkpoint\.npz: its meta's config is not a JSON object$"),
    Row("meta config a list, train --resume", lambda runs, tmp: _edit_header(
        runs, tmp, lambda h: h["meta"].__setitem__("config", [1])), ("train", "--out", "{run}", "--resume", *REF), 1,
        r"the checkpoint's configuration \(its meta's config\) is not a JSON object: \[1\]$"),
    # --- checkpoints ------------------------------------------------------------------------------
    Row("a copy-task run given to sample", lambda runs, tmp: {"run": _copy_run(runs, "copy", tmp)},
        ("sample", "{run}", *REF), 1, r"holds a --task model; sampling needs a language model$"),
    Row("LanguageModel weights, meta of a task run", lambda runs, tmp: _edit_header(
        runs, tmp, lambda h: h["meta"]["config"].update(task="copy", lag=4)), ("eval", "{run}", *REF), 1,
        r"checkpoint\.npz: holds a LanguageModel, not a SequenceModel$"),
    Row("object array (pickled) member, sample", lambda runs, tmp: _edit(runs, tmp, members=OBJECT),
        ("sample", "{run}", *REF), 1,
        r"checkpoint\.npz: not a bptt checkpoint: array 'evil' holds Python objects, which would have to be "
        r"unpickled; refused$"),
    Row("object array (pickled) member, train --resume", lambda runs, tmp: _edit(runs, tmp, members=OBJECT),
        ("train", "--out", "{run}", "--resume", *REF), 1, r"array 'evil' holds Python objects"),
    Row("member declaring shape (10**12,) float64", lambda runs, tmp: _edit(runs, tmp, members={"big.npy": _huge_npy()}),
        ("eval", "{run}", *REF), 1,
        r"checkpoint\.npz: a damaged checkpoint \(array 'big' declares shape \(1000000000000,\) float64 = "
        r"8,000,000,000,000 bytes but holds 64\)$"),
    Row("a weight declaring a larger shape than it holds", lambda runs, tmp: _edit(
        runs, tmp, members={"model/weights/encoder.weight.npy": _huge_npy((26, 6 * 10 ** 9), "<f4", 624)},
        arrays={k: v for k, v in checkpoint_file.read(runs["lm"] / CHECKPOINT_FILE)[1].items()
                if k != "model/weights/encoder.weight"}),
        ("sample", "{run}", *REF), 1, r"array 'model/weights/encoder\.weight' declares shape \(26, 6000000000\)"),
    Row("string array member", lambda runs, tmp: _edit(runs, tmp, members={"s.npy": _npy(np.array(["x"]))}),
        ("sample", "{run}", *REF), 1, r"array 's' has dtype <U1, not a number type"),
    Row("JSON header a list", lambda runs, tmp: _edit(runs, tmp, header_bytes=b"[1, 2]"), ("sample", "{run}", *REF),
        1, r"checkpoint\.npz: not a bptt checkpoint \(its header is a JSON array, not an object\)$"),
    Row("JSON header a number", lambda runs, tmp: _edit(runs, tmp, header_bytes=b"3"), ("eval", "{run}", *REF),
        1, r"its header is a JSON number, not an object"),
    Row("JSON header invalid", lambda runs, tmp: _edit(runs, tmp, header_bytes=b"{not json"),
        ("train", "--out", "{run}", "--resume", *REF), 1, r"its header is not valid JSON: Expecting property name"),
    Row("JSON header not UTF-8", lambda runs, tmp: _edit(runs, tmp, header_bytes=b'{"a": "\xff"}'),
        ("sample", "{run}", *REF), 1, r"its header is not UTF-8: byte 7"),
    Row("header of another format", lambda runs, tmp: _edit_header(runs, tmp, lambda h: h.update(format="other")),
        ("sample", "{run}", *REF), 1, r"checkpoint\.npz: not a bptt checkpoint \(format 'other', expected "
        r"'bptt-checkpoint'\)$"),
    Row("an array the header refers to missing", lambda runs, tmp: _edit_arrays(
        runs, tmp, lambda a: a.pop("model/weights/encoder.weight")), ("sample", "{run}", *REF), 1,
        r"checkpoint\.npz: a damaged checkpoint \(its header refers to the array 'model/weights/encoder\.weight', "
        r"which the file lacks\)$"),
    Row("a weight of the wrong dtype (float16)", lambda runs, tmp: _edit_arrays(
        runs, tmp, lambda a: a.update({"model/weights/encoder.weight": a["model/weights/encoder.weight"].astype(
            np.float16)})), ("sample", "{run}", *REF), 1,
        r"checkpoint\.npz: the weight 'encoder\.weight' is float16, but the model is float32$"),
    Row("a weight of the wrong shape", lambda runs, tmp: _edit_arrays(
        runs, tmp, lambda a: a.update({"model/weights/encoder.weight": a["model/weights/encoder.weight"][:-1]})),
        ("eval", "{run}", *REF), 1, r"checkpoint\.npz: cannot rebuild the model \(ValueError: "
        r"state_dict\['encoder\.weight'\] must have shape \(30, 6\); got \(29, 6\)\)$"),
    Row("model config hidden_size 10**9", lambda runs, tmp: _edit_header(
        runs, tmp, lambda h: h["model"]["config"].update(hidden_size=10 ** 9)), ("sample", "{run}", *REF), 1,
        r"checkpoint\.npz: the model's hidden_size 1,000,000,000 does not match its weights \(the largest "
        r"dimension is 48\)$"),
    Row("a text file named checkpoint.npz", lambda runs, tmp: {"run": _write(tmp / "run" / CHECKPOINT_FILE,
                                                                             "hello\n").parent},
        ("sample", "{run}", *REF), 1,
        r"checkpoint\.npz: not a readable bptt checkpoint: not an \.npz \(zip\) archive, or a truncated one "
        r"\(BadZipFile: File is not a zip file\)$"),
    Row("a truncated checkpoint", lambda runs, tmp: {"run": _write(
        tmp / "run" / CHECKPOINT_FILE, (runs["lm"] / CHECKPOINT_FILE).read_bytes()[:3000]).parent},
        ("eval", "{run}", *REF), 1, r"checkpoint\.npz: not a readable bptt checkpoint: not an \.npz \(zip\) archive, "
        r"or a truncated one"),
    # --- the Python API -------------------------------------------------------------------------------
    Row("LanguageModel checkpoint, load_model(expect=SequenceModel)", _api_expect_sequence_model, (),
        "CheckpointError", r"checkpoint\.npz: holds a LanguageModel, not a SequenceModel$"),
    Row("LanguageModel trainer state into a SequenceModel trainer", _api_trainer_of_other_model, (),
        "ValueError", r"^the state is of a LanguageModel, not a SequenceModel$"),
    Row("object array member, Trainer.from_checkpoint", _api_object_array, (), "CheckpointError",
        r"array 'evil' holds Python objects, which would have to be unpickled; refused$"),
]


# ---------------------------------------------------------------------------------------------
# the test


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny char-level LM run and a tiny copy-task run, trained once (reference backend)."""
    base = tmp_path_factory.mktemp("runs")
    data = _write(base / "train.txt", TEXT)
    out = {"lm": base / "lm", "copy": base / "copy"}
    assert main(["train", "--data", str(data), "--out", str(out["lm"]), *TINY]) == 0
    assert main(["train", "--task", "copy", "--lag", "4", "--n-train", "12", "--hidden-size", "8", "--batch-size", "4",
                 "--k1", "4", "--max-steps", "2", "--out", str(out["copy"]), *REF]) == 0
    return out


def _snapshot(root):
    """Every directory and file under ``root``: a file by its size and hash (by size and mtime
    above 4 MiB)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            found[os.path.join(folder, d)] = "dir"
        for f in files:
            path = os.path.join(folder, f)
            st = os.lstat(path)
            if st.st_size > 4 << 20:
                found[path] = (st.st_size, st.st_mtime_ns)
            else:
                with open(path, "rb") as fh:
                    found[path] = (st.st_size, hashlib.sha256(fh.read()).hexdigest())
    return found


def _run_row(row, paths, tmp, capsys):
    argv = [a.format(**{k: os.fspath(v) for k, v in paths.items()}) for a in row.argv]
    if row.subprocess:
        env = dict(os.environ, **dict(row.env))
        env.pop("BPTT_DEBUG", None)
        proc = subprocess.run([sys.executable, "-m", "bptt", *argv], capture_output=True, text=True, timeout=300,
                              env=env, cwd=tmp)
        return proc.returncode, proc.stdout, proc.stderr
    try:
        rc = main(argv)
    except SystemExit as e:                       # argparse: status 2
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


RESULTS = []


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_hostile_input_fails_in_one_line_and_writes_nothing(row, runs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BPTT_DEBUG", raising=False)
    monkeypatch.delenv("BPTT_MAX_TEXT_BYTES", raising=False)
    monkeypatch.chdir(tmp_path)                   # a default runs/ folder would show in the snapshot
    for name, value in row.env:
        monkeypatch.setenv(name, value)
    if not row.argv:                              # an API row: the call raises row.code
        with pytest.raises(ValueError) as e:      # CheckpointError is a ValueError
            row.make(runs, tmp_path)
        message = str(e.value)
        assert type(e.value).__name__ == row.code and "\n" not in message
        assert re.search(row.message, message), message
        RESULTS.append((row, "(Python API)", message.replace(os.fspath(tmp_path) + os.sep, "")))
        return
    paths = row.make(runs, tmp_path)
    outside = [os.fspath(p) for p in paths.values() if not os.fspath(p).startswith(os.fspath(tmp_path))]
    before = _snapshot(tmp_path), [os.path.lexists(p) for p in outside]
    rc, out, err = _run_row(row, paths, tmp_path, capsys)
    lines = err.strip().splitlines()
    assert rc == row.code, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and out == ""
    command = row.argv[0]
    assert lines[0].startswith(f"bptt {command}: error: " if rc == 1 else f"bptt {command}: error: argument"), lines[0]
    assert re.search(row.message, lines[0]), lines[0]
    # nothing written, nothing half written: no run directory appeared, no file changed
    assert (_snapshot(tmp_path), [os.path.lexists(p) for p in outside]) == before
    RESULTS.append((row, _display(row.argv), lines[0].replace(os.fspath(tmp_path) + os.sep, "")))


def _display(argv):
    """The command of a row as the table shows it (the tiny model's flags left out)."""
    text = " ".join(["bptt", *argv]).replace(" " + " ".join(TINY), "").replace(" " + " ".join(REF), "")
    for name, shown in (("{data}", "FILE"), ("{out}", "DIR"), ("{run}", "RUN")):
        text = text.replace(name, shown)
    return text


def test_print_the_table():
    """The table of the rows run above (``-s`` shows it): input | command | exit | message."""
    if not RESULTS:
        pytest.skip("no rows ran")
    print("\n| input | command | exit | message |\n|---|---|---|---|")
    for row, command, message in RESULTS:
        text = message.split(": error: ", 1)[-1]
        print(f"| {row.name} | `{command}` | {row.code} | {text.replace('|', '/')} |")


# ---------------------------------------------------------------------------------------------
# the ways out the messages offer work


@pytest.mark.parametrize("name, data, flags, symbol", [
    ("latin1.txt", ("caf\xe9 au lait\n" + TEXT).encode("latin-1"), ["--decode-errors", "replace"], "\ufffd"),
    ("latin1.txt", ("caf\xe9 au lait\n" + TEXT).encode("latin-1"), ["--encoding", "latin-1"], "\xe9"),
    ("utf16.txt", TEXT.encode("utf-16"), ["--encoding", "utf-16"], "d"),
])
def test_the_suggested_decoding_trains(tmp_path, capsys, name, data, flags, symbol):
    path = _write(tmp_path / name, data)
    run = tmp_path / "run"
    assert main(["train", "--data", str(path), "--out", str(run), *TINY, *flags]) == 0, capsys.readouterr().err
    _, meta = checkpoint.load_model(run / CHECKPOINT_FILE)
    assert symbol in meta["vocab"]["symbols"]
    assert meta["config"]["encoding" if "--encoding" in flags else "decode_errors"] == flags[1]
    capsys.readouterr()
    # eval reads another file with the same options
    assert main(["eval", str(run), "--data", str(path), *flags, *REF]) == 0


def test_max_chars_reads_the_start_of_a_file_over_the_limit(tmp_path, capsys, monkeypatch):
    """Over the limit, --max-chars N trains on the first N characters, reading little more."""
    monkeypatch.setenv("BPTT_MAX_TEXT_BYTES", BIG_LIMIT)
    paths = _large_single_line(None, tmp_path)
    assert main(["train", "--data", str(paths["data"]), "--out", str(paths["out"]), *TINY,
                 "--max-chars", "20000"]) == 0
    assert "(20,000 chars, char level, vocab 3," in capsys.readouterr().err
    assert main(["eval", str(paths["out"]), "--data", str(paths["data"]), "--max-chars", "1000", *REF]) == 0
    from bptt.data import read_text
    assert read_text(paths["data"], max_chars=3) == "aba"
