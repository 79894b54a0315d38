"""``bptt train`` with validation during training (--eval-every, --patience), learning-rate
schedules (--lr-decay/--lr-decay-after, --lr-plateau), what the run logs for its training curve,
the honest progress figures, and ``bptt plot``."""

import json
import math

import pytest

import bptt
from bptt.cli import METRICS_FILE, main

# tiny models: a word-level corpus of a few hundred tokens, a few updates an epoch
TINY = ["--level", "word", "--hidden-size", "8", "--embedding-size", "4", "--k1", "5", "--batch-size", "2",
        "--sample-length", "0"]
WORDS = " ".join(f"w{(i * 7) % 13}" for i in range(120))
TEXT = "\n".join(WORDS[i:i + 40] for i in range(0, len(WORDS), 40)) + "\n"


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def run(capsys, argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def records(run_dir, kind):
    lines = (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == kind]


def test_validation_during_training_is_logged_shown_and_summarised(tmp_path, corpus_file, capsys):
    out_dir = tmp_path / "run"
    rc, out, err = run(capsys, ["train", "--data", corpus_file, *TINY, "--epochs", "3", "--eval-every", "4",
                                "--out", out_dir, "--json"])
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    steps = records(out_dir, "step")
    per_epoch = len(steps) // 3
    assert [r["step"] for r in steps] == list(range(1, 3 * per_epoch + 1))    # short run: every update logged
    for r in steps:
        assert r["loss_mean"] == r["loss"] and "val_loss" not in r
    vals = records(out_dir, "validation")
    expected = sorted({s for s in range(4, 3 * per_epoch + 1, 4)} | {per_epoch * e for e in (1, 2, 3)})
    assert [v["step"] for v in vals] == expected
    for v in vals:
        assert set(v) >= {"step", "epoch", "val_loss", "val_perplexity", "val_bits_per_token", "lr", "time"}
        assert v["val_perplexity"] == pytest.approx(math.exp(v["val_loss"]))
    # the last validation ran after the last update, on the batches of the final evaluation
    assert vals[-1]["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-12)
    assert summary["val_curve_length"] == len(vals) and summary["last_val_loss"] == vals[-1]["val_loss"]
    best = min(vals, key=lambda v: v["val_loss"])
    assert (summary["best_val_loss"], summary["best_val_step"]) == (best["val_loss"], best["step"])
    assert summary["stopped_early"] is False and summary["tokens_per_s"] > 0
    assert f"val {vals[-1]['val_loss']:.4f}" in err                     # on the progress line
    assert "tok/s training, first update excluded" in err and "(mean of the last" in err
    assert f"validation curve: {len(vals)} points" in err


def test_progress_prints_the_final_line_once(tmp_path, corpus_file, capsys):
    rc, _, err = run(capsys, ["train", "--data", corpus_file, *TINY, "--max-steps", "3", "--out", tmp_path / "r"])
    assert rc == 0
    lines = [line for line in err.splitlines() if line.startswith("train step")]
    assert [line.split()[2] for line in lines] == ["1/3", "3/3"]       # off a terminal: first and last
    assert "? tok/s" in lines[0] and "? tok/s" not in lines[1]       # no throughput from the first update


def test_lr_decay_schedule_per_epoch(tmp_path, corpus_file, capsys):
    out_dir = tmp_path / "run"
    rc, _, err = run(capsys, ["train", "--data", corpus_file, *TINY, "--optimizer", "sgd", "--lr", "0.8",
                              "--epochs", "5", "--lr-decay", "0.5", "--lr-decay-after", "2", "--out", out_dir])
    assert rc == 0, err
    lrs = {}
    for r in records(out_dir, "step"):
        lrs.setdefault(r["epoch"], set()).add(r["lr"])
    # epoch e (from 1) at 0.8 * 0.5 ** max(0, e - 2)
    assert [lrs[e] for e in range(5)] == [{0.8 * 0.5 ** max(0, e + 1 - 2)} for e in range(5)]


def test_lr_plateau_and_patience_on_a_scripted_curve(tmp_path, corpus_file, capsys, monkeypatch):
    """Validation losses 5, 4, 4.5, 4.2, 4.1, ... (evaluate() replaced): --lr-plateau 4 divides the
    lr after each validation not below 4; --patience 3 stops after the third, exit status 0."""
    curve = iter([5.0, 4.0, 4.5, 4.2, 4.1, 3.0, 3.0])
    monkeypatch.setattr(bptt.Trainer, "evaluate", lambda self, data, batch_size, reset_mask=None: {
        "loss": next(curve), "perplexity": 1.0, "bits_per_token": 1.0})
    out_dir = tmp_path / "run"
    rc, out, err = run(capsys, ["train", "--data", corpus_file, *TINY, "--optimizer", "sgd", "--lr", "1",
                                "--epochs", "10", "--lr-plateau", "4", "--patience", "3", "--out", out_dir, "--json"])
    assert rc == 0, err
    vals = records(out_dir, "validation")
    assert [v["val_loss"] for v in vals] == [5.0, 4.0, 4.5, 4.2, 4.1]
    lrs = {}
    for r in records(out_dir, "step"):
        lrs.setdefault(r["epoch"], set()).add(r["lr"])
    assert [lrs[e] for e in sorted(lrs)] == [{1.0}, {1.0}, {1.0}, {0.25}, {1 / 16}]
    stop_lines = [line for line in err.splitlines() if line.startswith("stopped early")]
    assert len(stop_lines) == 1 and "--patience 3" in stop_lines[0] and "after update" in stop_lines[0]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped_early"] is True and summary["best_val_loss"] == 4.0
    assert summary["lr"] == 1 / 64 and summary["val_curve_length"] == 5
    # resumed, the run stays stopped: its counters are in the checkpoint
    rc, out, err = run(capsys, ["train", "--out", out_dir, "--resume", "--json"])
    assert rc == 0 and "stopped early" in err and "none in this run" in err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == summary["steps"]


def test_task_runs_validate_with_their_loss(tmp_path, capsys):
    out_dir = tmp_path / "copy"
    rc, out, err = run(capsys, ["train", "--task", "copy", "--lag", "2", "--n-symbols", "2", "--n-train", "16",
                                "--hidden-size", "6", "--batch-size", "8", "--epochs", "2", "--eval-every", "1",
                                "--out", out_dir, "--json"])
    assert rc == 0, err
    vals = records(out_dir, "validation")
    assert [v["step"] for v in vals] == [1, 2, 3, 4]
    assert all(v["val_loss"] > 0 and 0 <= v["val_accuracy"] <= 1 for v in vals)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["val_curve_length"] == 4 and summary["last_val_loss"] == pytest.approx(summary["val_loss"])


@pytest.mark.parametrize("flags, message", [
    (["--lr-decay", "0.5", "--lr-plateau", "4"], "give one of them"),
    (["--lr-decay-after", "2"], "--lr-decay-after needs --lr-decay"),
    (["--lr-decay", "2"], "must be in (0, 1]"),
    (["--lr-plateau", "0.5"], "must be > 1"),
])
def test_schedule_flag_errors_are_one_line(tmp_path, corpus_file, capsys, flags, message):
    rc, _, err = run(capsys, ["train", "--data", corpus_file, *TINY, *flags, "--out", tmp_path / "r"])
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1


def test_plot_writes_a_png(tmp_path, corpus_file, capsys):
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "run"
    assert run(capsys, ["train", "--data", corpus_file, *TINY, "--epochs", "2", "--eval-every", "3",
                        "--lr-decay", "0.5", "--out", out_dir])[0] == 0
    rc, out, err = run(capsys, ["plot", out_dir])
    assert rc == 0, err
    png = out_dir / "training.png"
    assert out.strip() == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_errors_are_one_line(tmp_path, corpus_file, capsys, monkeypatch):
    rc, _, err = run(capsys, ["plot", tmp_path / "missing"])
    assert rc == 1 and err.strip() == f"bptt plot: error: {tmp_path / 'missing'}: no such run directory"
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, ["plot", tmp_path / "empty"])
    assert rc == 1 and "no metrics.jsonl" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / METRICS_FILE).write_text('{"event": "eval", "loss": 1.0}\n{"event": "st', encoding="utf-8")
    rc, _, err = run(capsys, ["plot", tmp_path / "evals"])
    assert rc == 1 and "no training updates logged" in err and len(err.strip().splitlines()) == 1
    out_dir = tmp_path / "run"
    assert run(capsys, ["train", "--data", corpus_file, *TINY, "--max-steps", "2", "--out", out_dir])[0] == 0
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)      # not installed
    rc, _, err = run(capsys, ["plot", out_dir])
    assert rc == 1 and "matplotlib" in err and "pip install 'bptt[plot]'" in err
    assert len(err.strip().splitlines()) == 1


def test_step_log_covers_every_update_and_every_epoch_start(tmp_path):
    """Step records every ``every`` updates and at each epoch's first update, each with the mean
    of the finite losses since the record before; a validation record after each validation."""
    from bptt.cli.runs import StepLog
    log = StepLog(tmp_path, every=4)
    epochs = [0] * 6 + [1] * 4
    for step, epoch in enumerate(epochs, 1):
        event = {"step": step, "epoch": epoch, "loss": math.nan if step == 3 else float(step), "lr": 0.1,
                 "tokens": 10}
        if step == 6:
            event.update(val_loss=2.5, val_perplexity=math.exp(2.5), val_bits_per_token=2.5 / math.log(2))
        log(event)
    steps = records(tmp_path, "step")
    assert [(r["step"], r["loss_mean"]) for r in steps] == [(1, 1.0), (4, 3.0), (7, 6.0), (8, 8.0)]
    assert all("val_loss" not in r for r in steps)
    (val,) = records(tmp_path, "validation")
    assert (val["step"], val["epoch"], val["val_loss"], val["lr"]) == (6, 0, 2.5, 0.1)
