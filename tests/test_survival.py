"""A run survives what ends processes: periodic checkpoints (bptt.CheckpointCallback), Ctrl-C and
SIGTERM (stop at a finished update, save, exit 130 / 143 with the line that resumes), hard
kills at any moment (during an update, during a checkpoint write, between them: --resume ends
with the weights of the uninterrupted run, bit for bit on the cpu backend), damaged newest
checkpoints (the previous one is used, with a warning naming the file), a full disk (the
previous checkpoint stays whole, one line), and a second `bptt train` into the same directory
(refused unless --resume or --overwrite)."""

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import bptt
from bptt import checkpoint_file, checkpointing
from bptt.checkpoint_file import CheckpointError, CheckpointWriteError
from bptt.cli import main
from bptt.interrupts import Preempted

TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n    y = 0\n\n"
        "for i in range(10):\n    print(add(i, i))\n") * 4
TINY = ["--hidden-size", "12", "--embedding-size", "6", "--k1", "6", "--batch-size", "3", "--sample-length", "0",
        "--dtype", "float64"]


# ------------------------------------------------------------------------------- helpers


def lm_trainer(seed=0, k1=4, k2=6):
    model = bptt.LanguageModel(9, 4, 5, num_layers=2, cell="lstm", dropout=0.3, dtype=np.float64, seed=seed)
    return bptt.Trainer(model, bptt.Adam(0.02), k1=k1, k2=k2, clip_norm=0.5)


def tokens(n=2 * 20 + 1, seed=6):
    return np.random.default_rng(seed).integers(0, 9, n)


def weights(path):
    """The model weights a checkpoint file holds (host arrays, no backend involved)."""
    return checkpoint_file.load(path)["model"]["weights"]


def assert_same_weights(a, b):
    assert set(a) == set(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def files(run_dir):
    return sorted(os.listdir(run_dir))


def temp_files(run_dir):
    return [n for n in os.listdir(run_dir) if n.endswith(".tmp")]


def _run(capsys, argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture
def reference_backend():
    with bptt.use_backend("reference"):
        yield


# ------------------------------------------------------------------------------- the trainer


def test_sigterm_during_an_update_raises_preempted_at_a_chunk_boundary(reference_backend, tmp_path, monkeypatch):
    """SIGTERM arriving inside the optimizer step is held until the update and its position are
    committed, then raised as Preempted (a KeyboardInterrupt carrying the signal); the checkpoint
    written then resumes to the uninterrupted result; fit puts SIGTERM's default handler back."""
    data = tokens()
    full = lm_trainer()
    full.fit(data, 2, epochs=2)
    t = lm_trainer()
    real_step = t.optimizer.step
    calls = []

    def step_with_sigterm(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)      # arrives in the middle of the update
        real_step(*args)

    monkeypatch.setattr(t.optimizer, "step", step_with_sigterm)
    with pytest.raises(Preempted) as e:
        t.fit(data, 2, epochs=2)
    assert isinstance(e.value, KeyboardInterrupt) and e.value.signum == signal.SIGTERM
    assert t.step == 3 and t.position.offset == 12
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    monkeypatch.undo()
    t.save_checkpoint(tmp_path / "c.npz")
    resumed = bptt.Trainer.from_checkpoint(tmp_path / "c.npz")
    resumed.fit(data, 2, epochs=2)
    assert_same_weights(resumed.model.state_dict(), full.model.state_dict())


def test_sigterm_between_updates_stops_fit_at_once(reference_backend):
    """Outside an update's commit (here: in a callback after update 2) SIGTERM raises at once."""
    t = lm_trainer()

    def callback(event):
        if event["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        t.fit(tokens(), 2, epochs=2, callbacks=[callback])
    assert t.step == 2 and len(t.history["step"]) == 2


# ------------------------------------------------------------------------------- CheckpointCallback


def test_checkpoint_callback_every_updates_keeps_the_last_k(reference_backend, tmp_path):
    run = tmp_path / "run"
    t = lm_trainer()
    saver = bptt.CheckpointCallback(t, run, every_updates=3, every_minutes=None, keep=2, meta={"note": 1})
    t.fit(tokens(), 2, epochs=3, max_steps=10, callbacks=[saver])
    assert files(run) == ["checkpoint-00000006.npz", "checkpoint-00000009.npz", "checkpoint.npz"]
    assert os.path.samefile(run / "checkpoint.npz", run / "checkpoint-00000009.npz")
    assert saver.save() == str(run / "checkpoint.npz")
    assert files(run) == ["checkpoint-00000009.npz", "checkpoint-00000010.npz", "checkpoint.npz"]
    resumed = checkpointing.resume(run)
    assert resumed.step == 10 and resumed.meta == {"note": 1}
    assert_same_weights(resumed.model.state_dict(), t.model.state_dict())


def test_without_hard_links_checkpoint_npz_is_a_copy(reference_backend, tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    t = lm_trainer()
    saver = bptt.CheckpointCallback(t, tmp_path, every_updates=2, every_minutes=None, keep=1)
    t.fit(tokens(), 2, epochs=3, max_steps=4, callbacks=[saver])
    assert files(tmp_path) == ["checkpoint-00000004.npz", "checkpoint.npz"]
    assert not os.path.samefile(tmp_path / "checkpoint.npz", tmp_path / "checkpoint-00000004.npz")
    assert (tmp_path / "checkpoint.npz").read_bytes() == (tmp_path / "checkpoint-00000004.npz").read_bytes()
    assert checkpointing.checkpoint_files(tmp_path)[0] == str(tmp_path / "checkpoint-00000004.npz")


def test_checkpoint_callback_every_minutes(reference_backend, tmp_path, monkeypatch):
    """Time-based checkpoints (a fake clock: 40 s per update, a checkpoint every minute)."""
    clock = [0.0]
    monkeypatch.setattr(checkpointing.time, "monotonic", lambda: clock[0])
    t = lm_trainer()
    saver = bptt.CheckpointCallback(t, tmp_path, every_minutes=1, keep=10)

    def tick(event):
        clock[0] += 40.0

    t.fit(tokens(), 2, epochs=3, max_steps=6, callbacks=[tick, saver])
    # due at 60 s: update 2 (80 s), then 60 s later: update 4 (160 s), then update 6 (240 s)
    assert files(tmp_path) == ["checkpoint-00000002.npz", "checkpoint-00000004.npz", "checkpoint-00000006.npz",
                               "checkpoint.npz"]


def test_best_npz_follows_the_lowest_validation_loss(reference_backend, tmp_path):
    """Events with "val_loss" (synthetic here, as validation during fit produces them): best.npz
    is rewritten only when the loss is lower than any before, also across a resume."""
    t = lm_trainer()
    data = tokens()
    saver = bptt.CheckpointCallback(t, tmp_path, every_minutes=None)
    best = tmp_path / checkpointing.BEST_FILE
    seen = []
    for val in (None, 2.0, 2.5, 1.5, None, 1.7):
        t.fit(data, 2, max_steps=t.step + 1)
        event = {"step": t.step, "loss": 1.0}
        if val is not None:
            event.update(val_loss=val, val_perplexity=np.exp(val), val_bits_per_token=val / np.log(2))
        saver(event)
        seen.append(checkpoint_file.load(best)["meta"]["best_step"] if best.exists() else None)
    assert seen == [None, 2, 2, 4, 4, 4]
    assert weights(best)["rnn.weight_hh_l0"].tolist() != t.model.state_dict()["rnn.weight_hh_l0"].tolist()
    assert checkpoint_file.load(best)["meta"]["best_val_loss"] == 1.5
    saver.save()                                   # the run's best travels in every checkpoint's meta
    assert checkpoint_file.load(tmp_path / "checkpoint.npz")["meta"]["best_val_loss"] == 1.5

    resumed = checkpointing.resume(tmp_path)
    again = bptt.CheckpointCallback(resumed, tmp_path, every_minutes=None)
    assert again.best == 1.5 and again.best_step == 4
    before = best.read_bytes()
    again({"step": resumed.step, "val_loss": 1.6})
    assert best.read_bytes() == before
    again({"step": resumed.step, "val_loss": 1.4})
    assert checkpoint_file.load(best)["meta"]["best_val_loss"] == 1.4


def test_the_command_line_writes_best_npz_from_its_validations(tmp_path, corpus_file, capsys):
    """Validation every 2 updates: best.npz holds the weights after the update with the lowest
    validation loss, and the best so far survives a resume."""
    run = tmp_path / "run"
    rc, _, err = _run(capsys, ["train", "--data", corpus_file, "--out", run, *TINY, "--max-steps", "6",
                               "--eval-every", "2"])
    assert rc == 0, err
    state = checkpoint_file.load(run / "checkpoint.npz", trainer=True)
    curve = dict(zip(state["trainer"]["history"]["val_step"], state["trainer"]["history"]["val_loss"]))
    best_step = min(curve, key=curve.get)
    best = checkpoint_file.load(run / "best.npz", trainer=True)
    assert best["trainer"]["step"] == best_step == best["meta"]["best_step"]
    assert best["meta"]["best_val_loss"] == curve[best_step] == state["meta"]["best_val_loss"]
    rc, _, err = _run(capsys, ["train", "--out", run, "--resume", "--max-steps", "4"])
    assert rc == 0, err
    state = checkpoint_file.load(run / "checkpoint.npz", trainer=True)
    losses = state["trainer"]["history"]["val_loss"]
    assert len(losses) == len(curve) + 2
    assert state["meta"]["best_val_loss"] == min(losses) == checkpoint_file.load(run / "best.npz")["meta"]["best_val_loss"]


def test_temp_files_of_killed_writes_are_removed(reference_backend, tmp_path):
    leftovers = [".checkpoint-00000003.npz.k2j4_x.tmp", ".checkpoint.npz.123.link.tmp", ".best.npz.abc.tmp"]
    for name in leftovers + ["notes.tmp"]:
        (tmp_path / name).write_bytes(b"partial")
    bptt.CheckpointCallback(lm_trainer(), tmp_path)
    assert files(tmp_path) == ["notes.tmp"]          # not ours: left alone


def test_callback_arguments_are_checked(reference_backend, tmp_path):
    t = lm_trainer()
    for kw in ({"keep": 0}, {"every_updates": 0}, {"every_minutes": -1}, {"keep": 1.5}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            bptt.CheckpointCallback(t, tmp_path, **kw)


# ------------------------------------------------------------------------------- damaged files, full disk


def _run_with_checkpoints(capsys, corpus_file, run, extra=()):
    rc, _, err = _run(capsys, ["train", "--data", corpus_file, "--out", run, *TINY, "--max-steps", "6",
                               "--save-every", "2", "--keep", "3", *extra])
    assert rc == 0, err


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, corpus_file, capsys):
    full = tmp_path / "full"
    _run_with_checkpoints(capsys, corpus_file, full, ["--max-steps", "10"])
    run = tmp_path / "run"
    _run_with_checkpoints(capsys, corpus_file, run)
    assert files(run) == ["checkpoint-00000002.npz", "checkpoint-00000004.npz", "checkpoint-00000006.npz",
                          "checkpoint.npz", "metrics.jsonl"]
    newest = run / "checkpoint-00000006.npz"
    size = newest.stat().st_size
    with open(newest, "r+b") as f:                 # a disk error: the newest file (and checkpoint.npz,
        f.truncate(size // 2)                      # the same file) lose their second half

    with pytest.warns(RuntimeWarning, match="checkpoint-00000006.npz"):
        assert checkpointing.resume(run).step == 4

    rc, out, err = _run(capsys, ["train", "--out", run, "--resume", "--max-steps", "6", "--json"])
    assert rc == 0, err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and str(newest) in warning[0] and "resuming from" in warning[0]
    assert str(run / "checkpoint-00000004.npz") in warning[0]
    assert json.loads(out.splitlines()[-1])["steps"] == 10
    assert_same_weights(weights(run / "checkpoint.npz"), weights(full / "checkpoint.npz"))

    for name in files(run):                        # nothing loads: one line naming each file
        if name.endswith(".npz"):
            (run / name).write_bytes(b"garbage")
    rc, _, err = _run(capsys, ["train", "--out", run, "--resume"])
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "no usable checkpoint" in err


def test_a_full_disk_leaves_the_previous_checkpoint_and_stops_with_one_line(tmp_path, corpus_file, capsys,
                                                                            monkeypatch):
    run = tmp_path / "run"
    _run_with_checkpoints(capsys, corpus_file, run)
    real_savez, calls, before = np.savez, [], {}

    def savez_until_the_disk_fills(f, **arrays):
        calls.append(1)
        if len(calls) == 1:
            return real_savez(f, **arrays)         # the resumed run's first checkpoint (update 6)
        before.update({name: (run / name).read_bytes() for name in files(run) if name.endswith(".npz")})
        f.write(b"partial data")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", savez_until_the_disk_fills)
    rc, out, err = _run(capsys, ["train", "--out", run, "--resume", "--max-steps", "4"])
    assert rc == 1 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("bptt train:")]
    assert lines == [f"bptt train: error: cannot write the checkpoint {run / 'checkpoint-00000008.npz'}: "
                     f"{os.strerror(errno.ENOSPC)}; no existing file was changed"]
    assert "Traceback" not in err and len(calls) == 2
    assert temp_files(run) == [] and len(before) == 4
    for name, content in before.items():
        assert (run / name).read_bytes() == content, name
    monkeypatch.undo()
    assert checkpointing.resume(run).step == 6


def test_write_error_is_an_oserror_naming_the_file(reference_backend, tmp_path, monkeypatch):
    t = lm_trainer()

    def no_space(f, **arrays):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", no_space)
    with pytest.raises(CheckpointWriteError) as e:
        t.save_checkpoint(tmp_path / "c.npz")
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert str(e.value) == f"cannot write the checkpoint {tmp_path / 'c.npz'}: No space left on device; " \
                           "no existing file was changed"
    assert files(tmp_path) == []


# ------------------------------------------------------------------------------- one run per directory


def test_a_directory_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data", corpus_file, "--out", run, *TINY, "--max-steps", "3"]
    rc, _, err = _run(capsys, argv)
    assert rc == 0, err
    first = (run / "checkpoint.npz").read_bytes()
    log = (run / "metrics.jsonl").read_text()

    rc, out, err = _run(capsys, argv)
    assert rc == 1 and out == ""
    assert err.strip().splitlines() == [
        f"bptt train: error: {run} already holds a run; continue it with 'bptt train --out {run} --resume' "
        "or replace it with --overwrite"]
    assert (run / "checkpoint.npz").read_bytes() == first and (run / "metrics.jsonl").read_text() == log

    rc, _, err = _run(capsys, argv[:1] + ["--out", run, "--resume", "--overwrite"])
    assert rc == 1 and "give one of them" in err and len(err.strip().splitlines()) == 1

    (run / "notes.txt").write_text("mine")
    (run / ".checkpoint-00000009.npz.x.tmp").write_bytes(b"partial")
    rc, out, err = _run(capsys, argv[:-1] + ["2", "--overwrite", "--json"])
    assert rc == 0, err
    assert json.loads(out.splitlines()[-1])["steps"] == 2
    assert files(run) == ["checkpoint-00000000.npz", "checkpoint-00000002.npz", "checkpoint.npz",
                          "metrics.jsonl", "notes.txt"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in records if r["event"] == "train_end"]
    assert len(ends) == 1 and ends[0]["steps"] == 2    # the old run's log went with it
    assert all(r["step"] <= 2 for r in records if r["event"] == "step")


def test_resume_alone_continues_to_the_target_and_max_steps_adds(tmp_path, corpus_file, capsys):
    """--resume alone: to the update the run was started for; --max-steps N: N more (the new target)."""
    run = tmp_path / "run"
    rc, _, err = _run(capsys, ["train", "--data", corpus_file, "--out", run, *TINY, "--max-steps", "5"])
    assert rc == 0, err
    rc, out, err = _run(capsys, ["train", "--out", run, "--resume", "--json"])
    assert rc == 0, err
    assert json.loads(out.splitlines()[-1])["steps"] == 5          # already there: nothing to do
    rc, out, err = _run(capsys, ["train", "--out", run, "--resume", "--max-steps", "2", "--json"])
    assert json.loads(out.splitlines()[-1])["steps"] == 7
    assert checkpoint_file.load(run / "checkpoint.npz")["meta"]["target"]["max_steps"] == 7


# ------------------------------------------------------------------------------- signals, subprocesses

SMALL = ["--hidden-size", "8", "--embedding-size", "4", "--k1", "4", "--batch-size", "2", "--sample-length", "0",
         "--dtype", "float64", "--backend", "cpu"]


def _train_cmd(data, run, *extra):
    return [sys.executable, "-m", "bptt", "train", "--data", str(data), "--out", str(run), *SMALL, *extra]


def _resume_cmd(run, *extra):
    return [sys.executable, "-m", "bptt", "train", "--out", str(run), "--resume", *extra]


def _wait_for(predicate, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def long_text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT * 20)
    return path


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_saves_and_resume_ends_as_the_uninterrupted_run(tmp_path, long_text, sig, status):
    steps = "2000"
    full = tmp_path / "full"
    done = subprocess.run(_train_cmd(long_text, full, "--max-steps", steps), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr

    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(long_text, run, "--max-steps", steps, "--save-every", "50"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (run / "checkpoint-00000050.npz").exists(), proc)    # fit is running
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if "after update" in line]
    name = "interrupted" if sig == signal.SIGINT else "stopped by SIGTERM"
    assert len(lines) == 1, err
    match = re.fullmatch(f"{name} after update (\\d+): checkpoint saved to (.*); continue with: (.*)", lines[0])
    assert match and match[2] == str(run / "checkpoint.npz") and match[3] == f"bptt train --out {run} --resume"
    step = int(match[1])
    assert "Traceback" not in err
    trainer_state = checkpoint_file.load(run / "checkpoint.npz", trainer=True)["trainer"]
    assert trainer_state["step"] == step and 50 <= step < 2000
    assert len(trainer_state["history"]["loss"]) == step

    resumed = subprocess.run(_resume_cmd(run, "--json"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.splitlines()[-1])
    assert summary["steps"] == 2000 and summary["updates_this_run"] == 2000 - step
    assert_same_weights(weights(run / "checkpoint.npz"), weights(full / "checkpoint.npz"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_during_the_save_exits_at_once(tmp_path, long_text, sig):
    """The first signal starts the final save, which the test hook holds between its temp file and
    the rename; a second signal ends the process there: the previous checkpoint (update 0) is
    whole and loads, and the next run removes any temp file the killed write left."""
    run = tmp_path / "run"
    env = dict(os.environ, BPTT_TEST_PAUSE_IN_WRITE="600,1")      # every write after update 0's
    proc = subprocess.Popen(_train_cmd(long_text, run, "--epochs", "1000", "--save-every-minutes", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(lambda: (run / "metrics.jsonl").exists(), proc)      # an update is logged: fit is running
    proc.send_signal(sig)
    _wait_for(lambda: temp_files(run), proc)                       # the final save, paused
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and err.strip().splitlines()[-1] == "bptt: interrupted", err
        assert temp_files(run) == []                               # removed by the interrupted write
    else:
        assert proc.returncode == -signal.SIGTERM, err             # the default action: ended at once
        assert len(temp_files(run)) == 1
    assert "after update" not in err and "Traceback" not in err
    assert checkpoint_file.load(run / "checkpoint.npz", trainer=True)["trainer"]["step"] == 0
    resumed = subprocess.run(_resume_cmd(run, "--max-steps", "2", "--json"), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1])["steps"] == 2
    assert temp_files(run) == []


# ------------------------------------------------------------------------------- the soak test

SOAK = ["--hidden-size", "32", "--max-chars", "20000", "--dtype", "float64", "--batch-size", "8",
        "--sample-length", "0", "--backend", "cpu", "--save-every", "7", "--keep", "2", "--epochs", "100"]
SOAK_STEPS = 500          # about 7 epochs of 70 updates
SOAK_KILLS = 15           # 5 aimed at each of: an update, a checkpoint write, just after a write
SOAK_PAUSE = 0.05         # seconds every write holds its complete temp file before the rename


class _Watch:
    """Polls a run directory for checkpoint writes (a temp file present)."""

    def __init__(self, run, proc):
        self.run, self.proc = run, proc

    def writing(self):
        return bool(os.path.isdir(self.run) and temp_files(self.run))

    def until(self, predicate):
        while not predicate():
            if self.proc.poll() is not None:
                return False
            time.sleep(0.002)
        return True

    def write_done(self):
        """Wait for a write to begin and then end; False if the process ended first."""
        return self.until(self.writing) and self.until(lambda: not self.writing())


def _newest_step(run):
    return max([int(n[11:19]) for n in os.listdir(run) if re.fullmatch(r"checkpoint-\d{8}\.npz", n)], default=-1)


def _kill(proc, watch, aim, rng, after_step):
    """Kill -9 ``proc`` at the moment ``aim`` names, once it has checkpointed update
    ``after_step``; returns where it hit (None: it had ended)."""
    if not watch.write_done():                  # the process's first checkpoint: training starts now
        return None
    if not watch.until(lambda: _newest_step(watch.run) >= after_step):
        return None
    if aim == "write":
        if not watch.until(watch.writing):
            return None
        time.sleep(rng.uniform(0, SOAK_PAUSE * 0.8))
    elif aim == "between":
        if not watch.write_done():
            return None
    else:                                       # mid-update: not in a write (try again after one)
        while True:
            time.sleep(rng.uniform(0, 0.03))
            if not watch.writing():
                break
            if not watch.until(lambda: not watch.writing()):
                return None
    hit = "during a checkpoint write" if watch.writing() else \
        "just after a write" if aim == "between" else "during an update"
    proc.kill()
    proc.wait()
    return None if proc.returncode == 0 else hit


@pytest.mark.slow
def test_soak_hard_kills_at_random_moments_end_with_the_uninterrupted_weights(tmp_path):
    """Train to update SOAK_STEPS in a subprocess, kill -9 it SOAK_KILLS times at random moments
    (seeded): during an update, during a checkpoint write (the test hook holds each write between
    its temp file and the rename), just after a write; `--resume` after each. The final weights
    and loss history equal the uninterrupted run's, bit for bit (cpu backend, float64)."""
    corpus = tmp_path / "corpus.txt"
    from bptt.data import load_corpus
    corpus.write_text(TEXT * 200)
    assert load_corpus(str(corpus), "char") is not None
    base = [sys.executable, "-m", "bptt", "train", "--data", str(corpus), *SOAK, "--max-steps", str(SOAK_STEPS)]
    full = tmp_path / "full"
    done = subprocess.run(base + ["--out", str(full)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    run = tmp_path / "run"
    rng = random.Random(20261205)
    aims = rng.sample(["update", "write", "between"] * (SOAK_KILLS // 3), SOAK_KILLS)
    env = dict(os.environ, BPTT_TEST_PAUSE_IN_WRITE=str(SOAK_PAUSE))
    cmd, kills, temps_left = base + ["--out", str(run)], [], 0
    for aim in aims:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        after = (kills[-1][2] if kills else 0) + rng.randrange(5, 35)    # spread the kills over the run
        hit = _kill(proc, _Watch(run, proc), aim, rng, after)
        if hit is None:                          # it finished first
            assert proc.returncode == 0, proc.stderr.read()
            break
        proc.stderr.close()
        temps_left += len(temp_files(run))
        path, parts, skipped = checkpointing.newest_checkpoint(run)    # every kill leaves a whole one
        assert skipped == []
        kills.append((aim, hit, parts["trainer"]["step"]))
        cmd = [sys.executable, "-m", "bptt", "train", "--out", str(run), "--resume"]
    final = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=600, env=env)
    assert final.returncode == 0, final.stderr
    assert json.loads(final.stdout.splitlines()[-1])["steps"] == SOAK_STEPS
    assert temp_files(run) == []

    ours = checkpoint_file.load(run / "checkpoint.npz", trainer=True)
    theirs = checkpoint_file.load(full / "checkpoint.npz", trainer=True)
    equal = all(np.array_equal(ours["model"]["weights"][k], theirs["model"]["weights"][k])
                for k in theirs["model"]["weights"])
    same_losses = ours["trainer"]["history"]["loss"] == theirs["trainer"]["history"]["loss"]
    where = {h: sum(1 for _, hit, _ in kills if hit == h)
             for h in ("during an update", "during a checkpoint write", "just after a write")}
    print(f"\nsoak: {len(kills)} kill -9 of a run to update {SOAK_STEPS}, then {len(kills)} resumes; "
          + ", ".join(f"{n} {h}" for h, n in where.items())
          + f"; newest whole checkpoint after each kill at updates {[s for _, _, s in kills]}; "
          f"{temps_left} temp files left by kills, all removed; final weights "
          f"{'EQUAL' if equal else 'DIFFERENT'} to the uninterrupted run's ({len(theirs['model']['weights'])} "
          f"parameters, np.array_equal), loss history {'equal' if same_losses else 'DIFFERENT'}")
    assert len(kills) == SOAK_KILLS and all(where.values())
    assert equal and same_losses
