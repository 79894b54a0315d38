"""``bptt train --memory all|sqrt|SIZE``: parsed as :func:`bptt.memory.parse_memory` reads it, stated
in --help, passed to the trainer, recorded in the run's checkpoints and kept by --resume; the
weights those of a run without it bit for bit (the same kernels recompute the same activations,
and the gradient sums run in the same time blocks);
a budget too small refused before anything is written."""

import itertools

import numpy as np
import pytest

from bptt.checkpoint import load_model
from bptt.cli import CHECKPOINT_FILE, build_parser, main
from bptt.cli.arguments import resolve_train
from bptt.cli.runs import read_meta
from bptt.memory import parse_memory
from test_cli import _run

# a tiny 2-layer char LSTM on the start of the built-in corpus, TBPTT windows of 12 steps
TINY = ["--max-chars", "3000", "--hidden-size", "12", "--embedding-size", "6", "--num-layers", "2",
        "--k1", "6", "--k2", "12", "--batch-size", "3", "--sample-length", "0", "--backend", "cpu",
        "--save-every-minutes", "0", "--dtype", "float64"]


def _weights(run):
    model, _ = load_model(run / CHECKPOINT_FILE)
    return model.state_dict()


def _configs(run):
    """(the run's config as bptt train recorded it, the trainer's own config) of its newest checkpoint."""
    import bptt
    meta = read_meta(run / CHECKPOINT_FILE)
    return meta["config"], bptt.Trainer.from_checkpoint(run / CHECKPOINT_FILE).config


@pytest.mark.parametrize("text", ["sqrt", "512M", "2G", "123456"])
def test_memory_flag_is_parsed_as_the_library_reads_it(text):
    args = build_parser().parse_args(["train", "--memory", text])
    assert args.memory == parse_memory(text) and args.memory is not None
    assert build_parser().parse_args(["train"]).memory is None


@pytest.mark.parametrize("text", ["all", " ALL "])
def test_memory_all_is_the_default_given(text):
    args = build_parser().parse_args(["train", "--memory", text])
    assert args.memory == "all"                       # told apart from an absent flag
    assert resolve_train(args)["memory"] is None      # the config: every activation kept


@pytest.mark.parametrize("text", ["lots", "0", "-5", "12Q", ""])
def test_bad_memory_value_is_one_line(text, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--memory", text])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""        # as every unparsable argument
    assert len(err.strip().splitlines()) == 1 and "argument --memory" in err and "Traceback" not in err


def test_help_states_the_memory_flag(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")             # argparse wraps help at $COLUMNS
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "[--memory all|sqrt|SIZE]" in out.splitlines()[0]      # the usage line
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("--memory"))
    line = " ".join([lines[start]] + list(itertools.takewhile(lambda t: not t.strip().startswith("-"),
                                                             lines[start + 1:])))    # help wrapped or not
    assert "sqrt(T)" in line and "512M" in line and "budget" in line and "bit for bit" in line
    assert "all = every step's of the window (the default)" in line


def test_sqrt_run_trains_the_same_weights_and_resume_keeps_it(tmp_path, capsys):
    plain, sqrt = tmp_path / "plain", tmp_path / "sqrt"
    rc, _, err = _run(capsys, ["train", "--out", plain, "--max-steps", "6", *TINY])
    assert rc == 0, err
    rc, _, err = _run(capsys, ["train", "--out", sqrt, "--max-steps", "4", "--memory", "sqrt", *TINY])
    assert rc == 0, err
    assert "memory sqrt" in err                       # the model line names it
    run_config, trainer_config = _configs(sqrt)
    assert run_config["memory"] == "sqrt" and trainer_config["memory"] == "sqrt"
    assert _configs(plain)[0]["memory"] is None and _configs(plain)[1]["memory"] is None

    rc, _, err = _run(capsys, ["train", "--out", sqrt, "--resume", "--max-steps", "2"])    # no --memory: kept
    assert rc == 0, err
    run_config, trainer_config = _configs(sqrt)
    assert run_config["memory"] == "sqrt" and trainer_config["memory"] == "sqrt"
    assert read_meta(sqrt / CHECKPOINT_FILE)["target"]["max_steps"] == 6
    # 4 + 2 updates with memory="sqrt" end with the weights of 6 updates keeping every activation
    expected, got = _weights(plain), _weights(sqrt)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert np.array_equal(got[name], value), name

    rc, _, err = _run(capsys, ["train", "--out", sqrt, "--resume", "--max-steps", "1", "--memory", "1"])
    assert rc == 1 and "smallest feasible budget" in err      # refused before the checkpoint is rewritten
    assert _configs(sqrt)[0]["memory"] == "sqrt" and read_meta(sqrt / CHECKPOINT_FILE)["target"]["max_steps"] == 6

    rc, _, err = _run(capsys, ["train", "--out", sqrt, "--resume", "--max-steps", "1", "--memory", "64M"])
    assert rc == 0, err                               # a resumed run may change it (the results do not)
    run_config, trainer_config = _configs(sqrt)
    assert run_config["memory"] == trainer_config["memory"] == parse_memory("64M")

    # back to every activation kept: not in the middle of an epoch with k2 > k1 (the ring holds states)
    rc, _, err = _run(capsys, ["train", "--out", sqrt, "--resume", "--max-steps", "1", "--memory", "all"])
    lines = [line for line in err.splitlines() if line.startswith("bptt train:")]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "memory cannot change from 67108864 to None in the middle of an epoch" in lines[0]
    assert _configs(sqrt)[0]["memory"] == parse_memory("64M")


def test_resume_with_memory_all_keeps_every_activation_again(tmp_path, capsys):
    same_k = [*TINY[:TINY.index("--k2")], *TINY[TINY.index("--k2") + 2:]]     # k2 = k1: nothing carried
    plain, run = tmp_path / "plain", tmp_path / "run"
    assert _run(capsys, ["train", "--out", plain, "--max-steps", "5", *same_k])[0] == 0
    assert _run(capsys, ["train", "--out", run, "--max-steps", "3", "--memory", "sqrt", *same_k])[0] == 0
    rc, _, err = _run(capsys, ["train", "--out", run, "--resume", "--max-steps", "2", "--memory", "all"])
    assert rc == 0, err
    assert ", memory" not in next(line for line in err.splitlines() if line.startswith("model:"))
    run_config, trainer_config = _configs(run)
    assert run_config["memory"] is None and trainer_config["memory"] is None
    expected, got = _weights(plain), _weights(run)
    for name, value in expected.items():
        assert np.array_equal(got[name], value), name


def test_infeasible_budget_is_one_line_naming_the_smallest(tmp_path, capsys):
    run = tmp_path / "small"
    rc, out, err = _run(capsys, ["train", "--out", run, "--max-steps", "2", "--memory", "1", *TINY])
    lines = [line for line in err.splitlines() if line.startswith("bptt train:")]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "memory=1 bytes" in lines[0] and "smallest feasible budget" in lines[0]
    assert not run.exists()                           # refused before the run directory is made
