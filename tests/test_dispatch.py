"""The backend dispatcher: BPTT_BACKEND, use_backend, clear errors, lazy GPU imports.

Checks that depend on process state (environment read at first use, what ``import bptt``
imports, what ``auto`` picks) run in fresh subprocesses. GPU cases assume no usable GPU and
skip where one is usable; the CUDA simulator switch is removed from their environment.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import bptt
from bptt import BackendUnavailableError


def run_python(code, **env_changes):
    """Run ``code`` in a fresh interpreter; env_changes: name -> value, or None to unset.

    BPTT_BACKEND and NUMBA_ENABLE_CUDASIM are unset unless given. Returns CompletedProcess.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("BPTT_BACKEND", "NUMBA_ENABLE_CUDASIM")}
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)


def last_json(proc):
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_env_var_is_read_at_first_use_not_at_import():
    proc = run_python("""
        import json, os, bptt
        os.environ["BPTT_BACKEND"] = "reference"      # set after import, before first use
        print(json.dumps(bptt.get_backend().NAME))
    """, BPTT_BACKEND="cpu")
    assert last_json(proc) == "reference"


def test_env_var_selects_backend_and_bad_name_fails_at_first_use():
    assert last_json(run_python("import bptt, json; print(json.dumps(bptt.get_backend().NAME))",
                                BPTT_BACKEND="reference")) == "reference"
    proc = run_python("""
        import json, bptt                              # importing must not fail
        try:
            bptt.get_backend()
        except ValueError as e:
            print(json.dumps(str(e)))
    """, BPTT_BACKEND="tpu")
    message = last_json(proc)
    assert "'tpu'" in message and all(n in message for n in ("cpu", "cuda", "cupy", "reference"))


def test_use_backend_as_call_and_context_manager():
    start = bptt.use_backend("reference").backend
    assert bptt.get_backend() is start and start.NAME == "reference"
    with bptt.use_backend("reference") as inner:
        assert bptt.get_backend() is inner
        assert bptt.LSTM(2, 3).backend is inner             # layers capture the current backend
    assert bptt.get_backend() is start
    cpu_ok = True
    try:
        import bptt_kernels.cpu  # noqa: F401
    except Exception:
        cpu_ok = False
    if cpu_ok:
        with bptt.use_backend("cpu") as cpu:
            layer = bptt.GRU(2, 3)
            with bptt.use_backend("reference"):
                assert bptt.get_backend().NAME == "reference"
            assert bptt.get_backend() is cpu
        assert bptt.get_backend() is start
        assert layer.backend is cpu                         # unchanged after the switch back
        bptt.use_backend("cpu")                             # as a call: stays switched
        assert bptt.get_backend().NAME == "cpu"


def test_use_backend_restores_after_an_exception():
    bptt.use_backend("reference")
    before = bptt.get_backend()
    with pytest.raises(RuntimeError):
        with bptt.use_backend("reference"):
            raise RuntimeError("inside")
    assert bptt.get_backend() is before


def test_unknown_backend_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'; known backends: .*cpu.*cuda.*cupy.*reference.*auto"):
        bptt.use_backend("tpu")
    with pytest.raises(TypeError, match="backend name must be a str"):
        bptt.use_backend(3)


@pytest.mark.parametrize("name", ["cuda", "cupy"])
def test_gpu_backend_by_name_without_gpu_says_why_and_what_is_available(name):
    proc = run_python(f"""
        import json, bptt
        try:
            bptt.use_backend({name!r})
            print(json.dumps(None))
        except Exception as e:
            print(json.dumps([type(e).__name__, str(e)]))
    """)
    result = last_json(proc)
    if result is None:
        pytest.skip(f"a GPU is usable here: backend {name!r} loaded")
    kind, message = result
    assert kind == BackendUnavailableError.__name__
    assert f"backend {name!r} was asked for but is unusable here: " in message
    reason = message.split("unusable here: ", 1)[1].split(". Available backends:")[0]
    assert len(reason) > 10, f"no reason given: {message}"
    available = message.split("Available backends: ", 1)[1]
    assert "cpu" in available and "reference" in available and name not in available


def test_import_bptt_touches_no_gpu_module():
    proc = run_python("""
        import json, sys
        import bptt
        after_import = sorted(m for m in sys.modules if m.split(".")[0] == "cupy" or m.startswith("numba.cuda"))
        import numpy as np
        for name in ("reference", "cpu"):
            try:
                bptt.use_backend(name)
            except ImportError:
                continue
            layer = bptt.LSTM(3, 4, num_layers=2)
            y, state, cache = layer.forward(np.ones((2, 2, 3)))
            layer.backward(np.ones((2, 2, 4)), cache)
        after_use = sorted(m for m in sys.modules if m.split(".")[0] == "cupy" or m.startswith("numba.cuda"))
        print(json.dumps([after_import, after_use]))
    """)
    after_import, after_use = last_json(proc)
    assert after_import == [], f"import bptt imported GPU modules: {after_import}"
    assert after_use == [], f"using the cpu/reference backends imported GPU modules: {after_use}"


def run_auto(setting):
    """(picked backend name, stderr) of a fresh process with BPTT_BACKEND=setting (None: unset)."""
    proc = run_python("import json, bptt; print(json.dumps(bptt.get_backend().NAME))", BPTT_BACKEND=setting)
    picked = last_json(proc)
    if picked in ("cuda", "cupy"):
        pytest.skip(f"a GPU is usable here: auto picked {picked!r}")
    return picked, proc.stderr


@pytest.mark.parametrize("setting", ["auto", None], ids=["BPTT_BACKEND=auto", "unset"])
def test_auto_picks_cpu_without_gpu(setting):
    assert run_auto(setting)[0] == "cpu"


def test_auto_reports_which_backend_it_picked():
    picked, stderr = run_auto("auto")
    assert "auto" in stderr and picked in stderr, f"stderr was: {stderr!r}"
