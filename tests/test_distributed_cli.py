"""``mpiexec -n N bptt train ... --distributed mpi``: rank 0 alone prints and writes the run
directory, and the weights are those of the same command in one process; Ctrl-C stops every
rank after the same update and the run resumes on another number of processes; a batch size
that is not a multiple of the processes, --distributed mpi without mpi4py, and processes of
mpiexec without --distributed mpi, are one line each. The mpiexec runs are skipped where mpi4py
or mpiexec is missing."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bptt.checkpoint import load_model
from bptt.cli import main
from helpers import RTOL, rel_err

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "mpi"))
import mpi_runs  # noqa: E402

TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n    y = 0\n\n"
        "for i in range(10):\n    print(add(i, i))\n") * 30
TINY = ["--hidden-size", "12", "--embedding-size", "6", "--k1", "6", "--batch-size", "4", "--dtype", "float64"]


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def bptt_train(*args):
    return ["-m", "bptt", "train", "--distributed", "mpi", *map(str, args)]


def test_two_processes_print_once_and_train_as_one(tmp_path, corpus_file, capsys):
    args = ["--data", corpus_file, *TINY, "--dropout", "0.2", "--max-steps", "12", "--eval-every", "5",
            "--sample-length", "20", "--json"]
    done = mpi_runs.run(2, bptt_train(*args, "--out", tmp_path / "two"))
    assert done.stderr.count("done: 12 steps") == 1 and done.stderr.count("--- sample") == 1, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 12 and len(done.stdout.strip().splitlines()) == 1, done.stdout
    with open(tmp_path / "two" / "metrics.jsonl") as f:
        events = [json.loads(line)["event"] for line in f]
    assert events.count("train_end") == 1 and events.count("validation") == 2, events     # after updates 5 and 10

    assert main([str(a) for a in ["train", *args, "--out", tmp_path / "one"]]) == 0
    capsys.readouterr()
    two, _ = load_model(tmp_path / "two" / "checkpoint.npz")
    one, _ = load_model(tmp_path / "one" / "checkpoint.npz")
    expected = one.state_dict()
    for name, value in two.state_dict().items():
        assert rel_err(value, expected[name]) <= RTOL[np.dtype(np.float64)], name


def test_ctrl_c_stops_every_process_after_one_update_and_the_run_resumes_on_others(tmp_path, corpus_file):
    run = tmp_path / "run"
    command = [mpi_runs.mpiexec(), "-n", "2", sys.executable,
               *bptt_train("--data", corpus_file, *TINY, "--epochs", "1000", "--out", run)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mpi_runs.env())
    try:
        deadline = time.monotonic() + mpi_runs.TIMEOUT_S
        while not _has_step_record(run / "metrics.jsonl") and time.monotonic() < deadline:
            time.sleep(0.2)                                    # training has begun
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=mpi_runs.TIMEOUT_S)
    finally:
        process.kill()
    assert process.returncode == 130, err
    stopped = [line for line in err.splitlines() if line.startswith("interrupted after update ")]
    assert len(stopped) == 1, err
    step = int(stopped[0].split()[3].rstrip(":"))
    numbered = sorted(name for name in os.listdir(run) if name.startswith("checkpoint-"))
    assert numbered == ["checkpoint-00000000.npz", f"checkpoint-{step:08d}.npz"]     # one, saved by rank 0
    done = mpi_runs.run(4, bptt_train("--out", run, "--resume", "--max-steps", "3", "--sample-length", "0"))
    assert done.stdout.count(f"done: {step + 3} steps") == 1, done.stdout + done.stderr


def _has_step_record(path):
    try:
        with open(path) as f:
            return any(json.loads(line)["event"] == "step" for line in f)
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def test_a_batch_that_the_processes_do_not_divide_is_one_line(tmp_path, corpus_file):
    done = mpi_runs.run(2, bptt_train("--data", corpus_file, *TINY, "--batch-size", "5", "--out", tmp_path / "r"),
                        check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == \
        "bptt train: error: --batch-size 5 is not a multiple of the 2 processes of --distributed mpi: each " \
        "trains batch-size/2 of the streams", done.stderr
    assert done.stderr.count("error:") == 1 and not os.path.exists(tmp_path / "r")


def test_distributed_without_mpi4py_is_one_line(tmp_path, corpus_file, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mpi4py", None)                    # import mpi4py fails
    rc = main(["train", "--data", str(corpus_file), "--distributed", "mpi", "--out", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert err == ("bptt train: error: distributed training over MPI needs mpi4py and an MPI library: pip install "
                   "'bptt[mpi]' (mpi4py and mpich), then run under mpiexec -n N\n")
    assert not os.path.exists(tmp_path / "r")


def test_mpiexec_without_distributed_is_one_line(tmp_path, corpus_file, monkeypatch, capsys):
    monkeypatch.setenv("PMI_SIZE", "2")                                 # as mpiexec -n 2 starts us
    rc = main(["train", "--data", str(corpus_file), "--out", str(tmp_path / "r")])
    assert rc == 1 and capsys.readouterr().err == (
        "bptt train: error: started by mpiexec as one of 2 processes without --distributed mpi: each would "
        "train alone into the same --out; add --distributed mpi\n")
    assert not os.path.exists(tmp_path / "r")


def test_help_says_how(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--distributed {mpi}" in text and "'mpiexec -n N bptt train ... --distributed mpi'" in text
    assert "rank 0 alone prints progress, writes checkpoints and metrics and samples" in text
