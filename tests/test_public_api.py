"""The public namespaces, and the leak check that guards every other test."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import aioshm
import aioshm.multiprocessing as aioshm_mp


def test_multiprocessing_all_is_a_superset_of_the_stdlib() -> None:
    """``aioshm.multiprocessing`` exports every public name of ``multiprocessing``."""
    missing = set(multiprocessing.__all__) - set(aioshm_mp.__all__)
    assert not missing, f"missing from aioshm.multiprocessing.__all__: {sorted(missing)}"


def test_multiprocessing_all_names_exist() -> None:
    """Every name ``aioshm.multiprocessing.__all__`` promises is an attribute of the module."""
    absent = [name for name in aioshm_mp.__all__ if not hasattr(aioshm_mp, name)]
    assert not absent, f"in __all__ but not defined: {absent}"


def test_sync_dropin_does_not_import_anyio() -> None:
    """``import aioshm.multiprocessing`` in a fresh interpreter leaves anyio unimported."""
    code = "import sys, aioshm.multiprocessing; print('anyio' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", "aioshm.multiprocessing imported anyio"


def test_dropin_default_start_method_is_the_stdlibs() -> None:
    """In a fresh interpreter the drop-in's default start method is whatever the stdlib's is
    (on Linux ``fork`` up to Python 3.13, ``forkserver`` from 3.14), and its default
    context and ``Queue`` use it; the async face's is forkserver on Linux."""
    code = (
        "import json, multiprocessing, aioshm, aioshm.multiprocessing as mp\n"
        "print(json.dumps([multiprocessing.get_start_method(), mp.get_start_method(),\n"
        "    mp.get_context().get_start_method(),\n"
        "    mp.Queue()._ctx.get_start_method(), aioshm.DEFAULT_START_METHOD]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    stdlib, *dropin, async_face = json.loads(result.stdout)
    assert dropin == [stdlib] * 3
    if sys.platform.startswith("linux"):
        assert async_face == "forkserver"


def test_top_level_all_names_exist() -> None:
    """Every name in ``aioshm.__all__`` (once the package defines one) is an attribute."""
    names = getattr(aioshm, "__all__", [])
    absent = [name for name in names if not hasattr(aioshm, name)]
    assert not absent, f"in aioshm.__all__ but not defined: {absent}"


def test_without_ray_the_names_exist_and_ray_backend_names_the_extra() -> None:
    """Without Ray (``import ray`` fails, in a fresh interpreter): ``from aioshm import *``
    works, every name of ``aioshm.__all__`` exists, and making a ``RayBackend`` raises an
    ImportError that names the ``aioshm[ray]`` extra."""
    code = (
        "import json, sys\n"
        "sys.modules['ray'] = None\n"  # as if Ray were not installed: import ray fails
        "import aioshm\n"
        "from aioshm import *\n"
        "absent = [n for n in aioshm.__all__ if not hasattr(aioshm, n)]\n"
        "try:\n"
        "    aioshm.RayBackend()\n"
        "except ImportError as exc:\n"
        "    error = [type(exc).__name__, str(exc), exc.name]\n"
        "print(json.dumps([absent, error]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    absent, (kind, message, module) = json.loads(result.stdout)
    assert absent == []
    assert (kind, module) == ("ModuleNotFoundError", "ray")
    assert "pip install 'aioshm[ray]'" in message


_LEAKY_TESTS = """
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest


def test_clean():
    r, w = os.pipe()
    os.close(r)
    os.close(w)


def test_leaks_pipe():
    os.pipe()


def test_leaks_child():
    subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])


def test_leaks_zombie():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # dead, but not reaped
    proc.returncode = 0  # keep Popen.__del__ from reaping it behind the leak check's back


def test_leaks_thread():
    threading.Thread(target=threading.Event().wait, name="leaky-thread", daemon=True).start()


def test_leaks_shm_entry():
    path = os.path.join(os.environ["AIOSHM_SHM_DIR"], f"aioshm_{os.getpid()}_leaked")
    open(path, "w").close()


def test_ignores_other_owners_entry():
    path = os.path.join(os.environ["AIOSHM_SHM_DIR"], "aioshm_1_not_ours")
    open(path, "w").close()


@pytest.mark.allow_leaks("fds")
def test_allowed_pipe():
    os.pipe()


def test_fails_and_leaks_child():
    proc = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    with open("failed_child.pid", "w") as f:
        f.write(str(proc.pid))
    assert False, "this test fails on purpose"
"""


@pytest.mark.slow
def test_leak_check_reports_leaks(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leak check turns a leaked pipe, child, zombie, thread or segment into an error.

    It runs the real conftest on a file of leaky tests in a subprocess (so what they leak dies
    with it): each leak is an error naming what leaked, a segment owned by a live process
    outside the tree and an ``allow_leaks`` test pass, and a failing test's child is killed.
    """
    shm_dir = pytester.mkdir("shm")
    monkeypatch.setenv("AIOSHM_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("AIOSHM_LEAK_GRACE", "0.5")
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(test_leaky=_LEAKY_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)

    # 6 errors: 5 leaky tests, plus the session check for the segment that is still there.
    result.assert_outcomes(passed=8, failed=1, errors=6)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_pipe*",
            "*fds: pipe +2: fd * -> pipe:*, fd * -> pipe:*",
            "*ERROR at teardown of test_leaks_child*",
            "*processes: still running after 0.5 s, killed: pid * [[]*signal.pause()*",
            "*ERROR at teardown of test_leaks_zombie*",
            "*processes: zombie (exited, never reaped): pid *",
            "*ERROR at teardown of test_leaks_thread*",
            "*threads: leaky-thread (daemon) still running after 0.5 s*",
            "*ERROR at teardown of test_leaks_shm_entry*",
            f"*shm: new entry {shm_dir}/aioshm_*_leaked",
            "*aioshm shared-memory entries created during the session remain:*_leaked",
        ]
    )
    summary = result.stdout.str().split("short test summary info")[-1]
    for name in ("test_clean", "test_ignores_other_owners_entry", "test_allowed_pipe"):
        assert f"::{name} " not in summary
    assert "not_ours" not in result.stdout.str()
    failed_child = int((pytester.path / "failed_child.pid").read_text())
    assert not psutil.pid_exists(failed_child), "the failing test's child was not killed"
