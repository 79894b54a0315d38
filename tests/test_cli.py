"""The command line end to end (train -> checkpoint -> eval -> sample, resume, tasks, errors)
and sampling, on a small text file with tiny models so the whole file stays fast."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import bptt
from bptt.cli import CHECKPOINT_FILE, METRICS_FILE, main

# tiny models: every run is a few updates
TINY = ["--hidden-size", "12", "--embedding-size", "6", "--k1", "6", "--batch-size", "3",
        "--max-steps", "4", "--sample-length", "20"]
TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n    y = 0\n\n"
        "for i in range(10):\n    print(add(i, i))\n") * 4


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _json_last_line(out):
    lines = out.strip().splitlines()
    return json.loads(lines[-1])


def _run(capsys, argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_train_eval_sample_resume(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    rc, out, err = _run(capsys, ["train", "--data", corpus_file, "--out", run, "--json", *TINY])
    assert rc == 0, err
    summary = _json_last_line(out)
    assert summary["steps"] == 4 and summary["task"] == "lm"
    for key in ("train_loss", "val_loss", "val_perplexity", "val_bits_per_token", "tokens_per_s"):
        assert np.isfinite(summary[key]) and summary[key] > 0, key
    assert summary["val_perplexity"] == pytest.approx(np.exp(summary["val_loss"]), rel=1e-6)
    assert (run / CHECKPOINT_FILE).is_file()
    assert "step" in err          # the progress line went to stderr

    rc, out, err = _run(capsys, ["eval", run, "--data", corpus_file, "--json"])
    assert rc == 0, err
    metrics = _json_last_line(out)
    assert metrics["bits_per_token"] == pytest.approx(metrics["loss"] / np.log(2), rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["loss"]), rel=1e-6)
    assert metrics["tokens"] == len(TEXT)

    # without --data: the held-out tenth of the training file, as the train summary reported
    rc, out, _ = _run(capsys, ["eval", run, "--json"])
    assert rc == 0 and _json_last_line(out)["loss"] == pytest.approx(summary["val_loss"], rel=1e-5)

    rc, out, err = _run(capsys, ["sample", run, "--length", "30", "--prime", "def ", "--seed", "3"])
    assert rc == 0, err
    text = out.rstrip("\n")
    assert text.startswith("def ") and len(text) == 34
    rc, again, _ = _run(capsys, ["sample", run, "--length", "30", "--prime", "def ", "--seed", "3"])
    assert again == out                                   # same seed, same text
    rc, out, _ = _run(capsys, ["sample", run, "--length", "10", "--prime", "ünknown€", "--top-k", "3",
                               "--temperature", "0.5"])
    assert rc == 0 and out.startswith("ünknown€")         # unseen prime symbols read as <unk>

    rc, out, err = _run(capsys, ["train", "--out", run, "--resume", "--max-steps", "3", "--json"])
    assert rc == 0, err
    resumed = _json_last_line(out)
    assert resumed["steps"] == 7 and resumed["updates_this_run"] == 3

    rc, out, err = _run(capsys, ["train", "--out", run, "--resume", "--hidden-size", "99"])
    assert rc == 1 and err.strip().splitlines() == [
        "bptt train: error: --hidden-size 99 differs from the checkpoint's 12: a resumed run keeps its model, "
        "data and optimizer"]

    events = [json.loads(line)["event"] for line in (run / METRICS_FILE).read_text().splitlines()]
    assert events.count("train_end") == 2 and events.count("eval") == 2


def test_default_corpus_run(tmp_path, capsys, monkeypatch):
    """No --data: the built-in corpus; no --out: runs/default under the working directory."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, ["train", "--max-chars", "3000", "--json", *TINY])
    assert rc == 0, err
    summary = _json_last_line(out)
    assert summary["out"] == os.path.join("runs", "default") and summary["steps"] == 4
    assert "python-help-topics" in err
    assert (tmp_path / "runs" / "default" / CHECKPOINT_FILE).is_file()
    assert len(summary["sample"]) == 20


def test_word_level_run(tmp_path, corpus_file, capsys):
    run = tmp_path / "words"
    rc, out, err = _run(capsys, ["train", "--data", corpus_file, "--level", "word", "--out", run,
                                 "--cell", "gru", "--optimizer", "sgd", "--lr", "0.5", "--json", *TINY])
    assert rc == 0, err
    assert np.isfinite(_json_last_line(out)["val_loss"])
    rc, out, _ = _run(capsys, ["sample", run, "--length", "5", "--prime", "def zebra", "--json"])
    assert rc == 0 and _json_last_line(out)["text"].startswith("def zebra ")


@pytest.mark.parametrize("task, key", [("copy", "recall_accuracy"), ("adding", "val_mse")])
def test_task_runs(tmp_path, capsys, task, key):
    run = tmp_path / task
    rc, out, err = _run(capsys, ["train", "--task", task, "--lag", "4", "--n-train", "12", "--hidden-size", "8",
                                 "--batch-size", "4", "--k1", "4", "--k2", "8", "--max-steps", "3",
                                 "--out", run, "--json"])
    assert rc == 0, err
    summary = _json_last_line(out)
    assert 0 <= summary[key] and np.isfinite(summary[key])
    if task == "copy":
        assert summary[key] <= 1
    rc, out, _ = _run(capsys, ["eval", run, "--json"])
    assert rc == 0 and key in _json_last_line(out)
    rc, _, err = _run(capsys, ["sample", run])
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "sampling needs a language model" in err


def test_forget_bias_shifts_only_the_lstm_forget_gates():
    from bptt.cli.build import build_model
    cfg = dict(task="copy", hidden_size=5, num_layers=2, cell="lstm", dtype="float64", seed=4)
    plain = build_model(dict(cfg, forget_bias=0.0)).state_dict()
    shifted = build_model(dict(cfg, forget_bias=2.5)).state_dict()
    for name, value in plain.items():
        delta = shifted[name] - value
        if name.startswith("rnn.bias_ih"):
            np.testing.assert_allclose(delta, np.repeat([0, 2.5, 0, 0], 5), atol=1e-12)   # gates i, f, g, o
        else:
            assert not delta.any(), name


def test_grad_norms_written(tmp_path, corpus_file, capsys):
    run = tmp_path / "gn"
    rc, out, err = _run(capsys, ["train", "--data", corpus_file, "--out", run, "--grad-norms", "--k2", "12",
                                 "--json", *TINY])
    assert rc == 0, err
    from bptt.diagnostics import load_grad_norms
    records = load_grad_norms(run / "grad_norms.json")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    first = records[0]["dh_norms"][0]            # level 0, oldest step first, the whole k2 window
    assert len(first) == 6 and all(v > 0 for v in first)   # the first window is the first chunk


def test_diverging_run_is_one_line(tmp_path, corpus_file, capsys):
    rc, out, err = _run(capsys, ["train", "--data", corpus_file, "--out", tmp_path / "div", "--cell", "rnn_relu",
                                 "--lr", "1000", "--clip", "0", "--hidden-size", "16", "--max-steps", "30",
                                 "--k1", "8", "--batch-size", "3"])
    assert rc == 1
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("bptt train:")]
    assert len(lines) == 1 and "non-finite" in lines[0] and "--lr" in lines[0]
    assert "Traceback" not in err and "Warning" not in err


def _error_cases(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    good = tmp_path / "good.txt"
    good.write_text(TEXT)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 truncated")
    return {
        "missing file": (["train", "--data", tmp_path / "nope.txt"], "nope.txt"),
        "empty file": (["train", "--data", empty], "empty.txt: file is empty"),
        "not utf-8": (["train", "--data", latin], "latin.txt: not UTF-8"),
        "k1 > k2": (["train", "--data", good, "--k1", "20", "--k2", "10"], "--k1 (20) must be <= --k2 (10)"),
        "unknown backend": (["train", "--data", good, "--backend", "tpu"], "unknown backend 'tpu'"),
        "lag without task": (["train", "--lag", "5"], "--lag needs --task"),
        "task with data": (["train", "--task", "copy", "--data", good], "--data is for text corpora"),
        "resume without run": (["train", "--resume", "--out", tmp_path / "none"], "no such run directory"),
        "eval without checkpoint": (["eval", tmp_path], "no checkpoint"),
        "corrupt checkpoint": (["sample", corrupt], "checkpoint.npz: not a readable bptt checkpoint"),
        "eval on a missing file": (["eval", tmp_path, "--data", tmp_path / "gone.txt"], "gone.txt: no such file"),
        "bad choice": (["train", "--cell", "transformer"], "invalid choice"),
        "negative size": (["train", "--hidden-size", "-3"], "must be > 0"),
        "forget bias on gru": (["train", "--cell", "gru", "--forget-bias", "1"], "--forget-bias is for --cell lstm"),
    }


def test_error_cases_print_one_line(tmp_path, capsys):
    for name, (argv, message) in _error_cases(tmp_path).items():
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:               # argparse errors exit 2
            rc = e.code
        out, err = capsys.readouterr()
        assert rc not in (0, None), name
        assert message in err, (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)
        assert "Traceback" not in err and out == "", name


def test_console_entry_point_error_has_no_traceback(tmp_path):
    """A user error through `python -m bptt`: status 1, one line on stderr."""
    proc = subprocess.run([sys.executable, "-m", "bptt", "train", "--data", str(tmp_path / "missing.txt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"bptt train: error: {tmp_path / 'missing.txt'}: no such file"]


def test_help_imports_no_numerics():
    """`bptt --help` stays instant: parsing the arguments imports neither NumPy nor Numba."""
    code = ("import sys, bptt.cli\n"
            "try:\n    bptt.cli.main(['train', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print(sorted(m for m in ('numpy', 'numba', 'bptt.layers', 'bptt_kernels.host.checks', 'bptt_kernels.cpu', 'tqdm') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, COLUMNS="1000"))    # argparse wraps help at $COLUMNS
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "--k2" in proc.stdout and "--task" in proc.stdout
    assert "--cell {lstm,gru,rnn_tanh,rnn_relu}" in proc.stdout
    assert "(adding: " in proc.stdout and "lag=100;" in proc.stdout and "varlen: lag=50)" in proc.stdout


def test_cell_choices_are_the_kernels_cells():
    """The parser's --cell choices are the kernels' one cell table."""
    from bptt_kernels import CELLS
    from bptt.cli.arguments import build_parser
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert next(a for a in train._actions if a.dest == "cell").choices == tuple(CELLS)


# ---------------------------------------------------------------------------------------------
# sampling (bptt.sampling) on an untrained model: determinism, greedy, top-k, <unk> primes


@pytest.fixture
def lm_and_vocab():
    from bptt.data import Vocabulary, tokenize
    vocab = Vocabulary.build(tokenize(TEXT, "char"), "char")
    model = bptt.LanguageModel(len(vocab), 8, 16, seed=5)
    return model, vocab


def _greedy_chain(model, vocab, prime, length):
    """Independent oracle: re-run the whole sequence from scratch each step and take the argmax."""
    ids = list(vocab.encode(prime))
    for _ in range(length):
        logits, _, _ = model.forward(np.array(ids).reshape(-1, 1), None, train=False)
        scores = model.backend.to_host(logits)[-1, 0]
        ids.append(1 + int(np.argmax(scores[1:])))          # char level never generates <unk> (id 0)
    return vocab.decode(ids)


def test_greedy_sampling_matches_rerunning_from_scratch(lm_and_vocab):
    from bptt.sampling import sample
    model, vocab = lm_and_vocab
    assert sample(model, vocab, 12, temperature=0, prime="def ") == _greedy_chain(model, vocab, "def ", 12)
    # top_k=1 at any temperature is greedy as well
    assert sample(model, vocab, 12, temperature=2.0, top_k=1, prime="def ", seed=9) == \
        _greedy_chain(model, vocab, "def ", 12)


def test_sampling_is_seeded_and_respects_top_k(lm_and_vocab):
    from bptt import sampling
    model, vocab = lm_and_vocab
    a = sampling.sample_ids(model, vocab, 50, temperature=1.5, prime="cl", seed=1)
    assert np.array_equal(a, sampling.sample_ids(model, vocab, 50, temperature=1.5, prime="cl", seed=1))
    assert not np.array_equal(a, sampling.sample_ids(model, vocab, 50, temperature=1.5, prime="cl", seed=2))
    rng = np.random.default_rng(0)
    logits = rng.normal(size=len(vocab))
    top3 = set(np.argsort(logits)[-3:])
    draws = {sampling._next_token(logits, 1.0, 3, rng) for _ in range(300)}
    assert draws == top3


def test_sampling_bad_arguments(lm_and_vocab):
    from bptt.sampling import sample
    model, vocab = lm_and_vocab
    with pytest.raises(ValueError, match="temperature"):
        sample(model, vocab, 5, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        sample(model, vocab, 5, top_k=0)
    assert sample(model, vocab, 0, prime="ab€") == "ab€"


class _Stream:
    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def _feed(progress, steps, loss=lambda step: 2.0 / step):
    for step in steps:
        progress({"step": step, "epoch": 0, "loss": loss(step), "tokens": 100})
    progress.close()


def test_progress_redraws_one_line_on_a_terminal(monkeypatch):
    from bptt.cli.progress import Progress
    monkeypatch.setenv("COLUMNS", "120")        # a line wider than the terminal loses its end
    stream = _Stream(True)
    progress = Progress(total=4, stream=stream, every_s=0.0)
    _feed(progress, range(1, 5))
    assert "step 4/4" in stream.text and "100%" in stream.text and "tok/s" in stream.text
    average = np.mean([2.0 / step for step in (1, 2, 3, 4)])
    assert f"loss {average:.4f} (mean of last 4)" in stream.text and "eta 00:00" in stream.text
    assert stream.text.count("\r") >= 4 and stream.text.count("\n") == 1
    assert progress.recent_loss() == pytest.approx(np.mean([2.0, 1.0, 2 / 3, 0.5]))


LINE = re.compile(r"train step (\d+)/(\d+) \[([#-]{20})\] +(\d+)%  loss (\S+) \(mean of last \d+\)(?:  val (\S+))?  "
                  r"([\d,]+|\?) tok/s  (\d\d:\d\d) eta (\S+)")


def test_progress_writes_plain_lines_off_a_terminal():
    """Not a terminal (a pipe, a log file): whole lines, no carriage returns, one every
    every_s seconds and one at the end unless the last update's was just written; each shows the
    step of the total, the bar, the percentage, the mean loss of the last 50 updates, the
    throughput of the updates after the first, the time since the start and the ETA."""
    from bptt.cli.progress import Progress
    stream = _Stream(False)
    progress = Progress(total=4, stream=stream, every_s=0.0)
    _feed(progress, range(1, 5))
    assert "\r" not in stream.text
    lines = stream.text.splitlines()
    fields = [LINE.fullmatch(line).groups() for line in lines]
    assert [f[:4] for f in fields] == [("1", "4", "#" * 5 + "-" * 15, "25"), ("2", "4", "#" * 10 + "-" * 10, "50"),
                                       ("3", "4", "#" * 15 + "-" * 5, "75"), ("4", "4", "#" * 20, "100")]
    assert fields[0][4] == "2.0000" and fields[1][4] == "1.5000"                   # mean of the losses so far
    assert fields[0][6] == "?"                        # no throughput from the first update (compiling)
    assert all(int(f[6].replace(",", "")) > 0 for f in fields[1:])                # tokens per second
    assert fields[0][8] == "?" and fields[-1][8] == "00:00"       # no ETA from the first update alone

    # the default interval off a terminal is 10 s: a fast run writes its first update and the end
    stream = _Stream(False)
    progress = Progress(total=3, stream=stream, start_step=4)       # a resumed run: steps 5..7
    _feed(progress, range(5, 8))
    lines = stream.text.splitlines()
    assert [LINE.fullmatch(line).group(1, 2, 4) for line in lines] == [("5", "7", "71"), ("7", "7", "100")]

    stream = _Stream(False)
    Progress(total=3, stream=stream).close()                        # no update: no line
    assert stream.text == ""


@pytest.mark.slow
def test_copy_task_needs_a_window_that_spans_the_dependency(tmp_path, capsys):
    """The TBPTT demonstration with the CLI's copy-task defaults (lag 20: each symbol is recalled
    25 steps after it was shown; 1000 updates): TBPTT(10, 10) stays at chance (1/8), TBPTT(10, 30),
    whose window spans the dependency, learns the task (0.84-0.98 over seeds 0-3: where a run has
    got to after 1000 updates moves with the last bits of the gradients)."""
    accuracy = {}
    for k2 in (10, 30):
        rc, out, err = _run(capsys, ["train", "--task", "copy", "--k1", "10", "--k2", k2,
                                     "--out", tmp_path / f"k2_{k2}", "--json"])
        assert rc == 0, err
        accuracy[k2] = _json_last_line(out)["recall_accuracy"]
    assert accuracy[10] < 0.2
    assert accuracy[30] > 0.75


def test_ctrl_c_saves_a_consistent_checkpoint_and_resumes(tmp_path):
    """SIGINT during training: stop after the current update, save, exit 130; --resume goes on."""
    import signal
    import time
    data = tmp_path / "t.txt"
    data.write_text(TEXT * 20)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "bptt", "train", "--data", str(data), "--out", str(run), "--hidden-size", "8",
           "--embedding-size", "4", "--k1", "4", "--batch-size", "2", "--epochs", "1000", "--sample-length", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / METRICS_FILE).exists():          # the progress log: fit() is running
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted after update" in err and "Traceback" not in err
    from bptt.checkpoint import load_model
    _, meta = load_model(run / CHECKPOINT_FILE)
    assert meta["config"]["hidden_size"] == 8
    resumed = subprocess.run(cmd[:4] + ["--out", str(run), "--resume", "--max-steps", "2", "--json"],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert _json_last_line(resumed.stdout)["updates_this_run"] == 2


def test_ctrl_c_in_process_stops_at_the_last_finished_update(tmp_path, corpus_file, capsys, monkeypatch):
    """A SIGINT that arrives between updates (here: from a callback after update 2) ends fit at
    once; the checkpoint holds update 2 and the command exits with 130."""
    import signal
    from bptt.cli import commands

    class InterruptAfterStep2(commands.StepLog):
        def __call__(self, event):
            super().__call__(event)
            if event["step"] == 2:
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(commands, "StepLog", InterruptAfterStep2)
    run = tmp_path / "run"
    rc, out, err = _run(capsys, ["train", "--data", corpus_file, "--out", run, *TINY, "--max-steps", "10"])
    assert rc == 130 and out == ""
    assert f"interrupted after update 2: checkpoint saved to {run / CHECKPOINT_FILE}" in err
    trainer = bptt.Trainer.from_checkpoint(str(run / CHECKPOINT_FILE))
    assert trainer.step == 2 and len(trainer.history["step"]) == 2


@pytest.mark.parametrize("k1, k2", [(3, 3), (3, 7), (None, None)])
def test_updates_per_epoch_is_what_fit_does(k1, k2):
    """The count the progress total comes from: the updates of one epoch of fit, for a token
    stream (last partial chunk included) and for tasks (chunks without targets make none)."""
    from bptt.tasks import make_task, task
    tokens = np.random.default_rng(0).integers(0, 20, 203)
    cases = [(bptt.LanguageModel(20, 4, 6, seed=0), tokens)]
    for name in ("copy", "adding"):                   # copy: T = 15, targets at steps 11..14
        cases.append((task(name).build_model(6, seed=0), make_task(name, 11, 6, seed=1)))
    for model, data in cases:
        trainer = bptt.Trainer(model, bptt.SGD(0.01), k1=k1, k2=k2)
        expected = trainer.updates_per_epoch(data, 4)
        assert expected == len(trainer.fit(data, 4)["step"]) and expected > 0
    assert bptt.Trainer(cases[1][0], bptt.SGD(0.01), k1=3).updates_per_epoch(cases[1][1], 4) == 3 * 2
