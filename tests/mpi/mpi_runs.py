"""Starting the scripts of tests/mpi under ``mpiexec -n N`` from pytest (skipped where mpi4py or
mpiexec is missing), one thread per rank (the ranks share the machine's cores)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 300     # a hung run fails the test instead of the suite


def mpiexec():
    """The mpiexec next to this Python (a virtual environment's) or on PATH; skips the test
    where it or mpi4py is missing."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install 'bptt[mpi]')")
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec (pip install 'bptt[mpi]' brings MPICH's)")
    return found


def env():
    """The environment of a rank: one thread for every pool (BLAS, Numba, the cpu backend)."""
    threads = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                "NUMBA_NUM_THREADS", "BPTT_NUM_THREADS")}
    return dict(os.environ, **threads)


def run(n, command, timeout=TIMEOUT_S, check=True):
    """``mpiexec -n n <command>`` (a list: the script name in tests/mpi first, or "-m" ...);
    returns the CompletedProcess (stdout and stderr as text)."""
    args = [mpiexec(), "-n", str(n), sys.executable, *command]
    if command[0].endswith(".py"):
        args[4] = os.path.join(HERE, command[0])
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env())
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def run_configs(n, configs, folder):
    """Train every configuration (name -> train.py's configuration) on n ranks in one run;
    returns {name: rank 0's result (setups.result) or the error text of rank 0's failure}."""
    path = os.path.join(folder, "configs.json")
    with open(path, "w") as f:
        json.dump(configs, f)
    run(n, ["train.py", path, os.fspath(folder)])
    results = {}
    for name in configs:
        err = os.path.join(folder, f"{name}.err0")
        if os.path.exists(err):
            with open(err) as f:
                results[name] = f.read()
        else:
            with np.load(os.path.join(folder, f"{name}.npz")) as z:
                results[name] = dict(z)
    return results
