"""The public namespaces, and the leak check that guards every other test."""

from __future__ import annotations

import json
import multiprocessing
import re
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


# --------------------------------------------------------------------------- packaging


def test_version_is_the_installed_distributions() -> None:
    """``aioshm.__version__`` is the version the package metadata carries (one source)."""
    import importlib.metadata

    assert aioshm.__version__ == importlib.metadata.version("aioshm")
    assert re.fullmatch(r"\d+\.\d+\.\d+([a-z]+\d+)?(\.dev\d+)?", aioshm.__version__)


def test_distribution_metadata() -> None:
    """The installed metadata carries the licence (MIT, with its file), the classifiers of what
    is supported and tested, the project URLs and the ``aioshm`` command."""
    import importlib.metadata

    meta = importlib.metadata.metadata("aioshm")
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    classifiers = set(meta.get_all("Classifier") or ())
    for required in (
        "Typing :: Typed",
        "Framework :: AnyIO",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.14",
    ):
        assert required in classifiers, required
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or ())
    assert urls["Source"].startswith("https://") and "Issues" in urls
    assert "matplotlib>=3.8; extra == 'plot'" in (meta.get_all("Requires-Dist") or ())
    root = Path(__file__).resolve().parent.parent
    assert (root / "LICENSE").read_text().startswith("MIT License")


def test_dir_is_the_public_api() -> None:
    """``dir(aioshm)`` lists ``__all__`` (lazy names included), ``__version__`` and the public
    submodules, and none of the helpers the module imports (``Any``, ``annotations``…)."""
    names = dir(aioshm)
    assert set(aioshm.__all__) <= set(names)
    assert "__version__" in names and "multiprocessing" in names  # imported by this module
    for helper in ("Any", "annotations", "TYPE_CHECKING"):
        assert helper not in names
    private = [n for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, private
    assert "Any" not in dir(aioshm_mp) and "annotations" not in dir(aioshm_mp)


# --------------------------------------------------------------------------- the drop-in's submodules


def _stdlib_submodules() -> set[str]:
    """The stdlib package's submodules that import on this platform."""
    import importlib
    import pkgutil

    names = set()
    for info in pkgutil.iter_modules(multiprocessing.__path__):
        try:
            importlib.import_module(f"multiprocessing.{info.name}")
        except ImportError:  # another platform's (popen_spawn_win32)
            continue
        names.add(info.name)
    return names


def test_multiprocessing_submodules_are_attributes() -> None:
    """Every submodule of the stdlib package is an attribute of the drop-in, and is the
    stdlib's own module (``mp.reduction.ForkingPickler`` is the pickler aioshm registers its
    reducers with), except ``spawn``, which is torch's function there, as in torch."""
    import importlib

    stdlib = _stdlib_submodules()
    assert {"reduction", "context", "process", "util", "connection", "queues", "pool"} <= stdlib
    assert {"managers", "shared_memory", "synchronize", "sharedctypes", "heap"} <= stdlib
    for name in stdlib - {"spawn"}:
        assert getattr(aioshm_mp, name) is importlib.import_module(f"multiprocessing.{name}"), name
        assert name in dir(aioshm_mp)
    from multiprocessing.reduction import ForkingPickler

    assert aioshm_mp.reduction.ForkingPickler is ForkingPickler
    assert callable(aioshm_mp.spawn) and aioshm_mp.spawn.__module__ == "aioshm._spawn"
    assert aioshm_mp.reducer is multiprocessing.reducer  # the stdlib's other module attribute
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        aioshm_mp.nonexistent  # noqa: B018


def test_multiprocessing_submodules_in_a_fresh_interpreter() -> None:
    """Right after ``import aioshm.multiprocessing as mp`` (nothing else imported), the
    submodules are there, and reaching them still imports no anyio."""
    code = (
        "import sys, aioshm.multiprocessing as mp\n"
        "assert mp.reduction.ForkingPickler.__name__ == 'ForkingPickler'\n"
        "assert mp.shared_memory.SharedMemory and mp.managers.BaseManager and mp.pool.Pool\n"
        "assert mp.connection.wait and mp.queues.Queue and mp.util.Finalize\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('anyio', 'sniffio')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- without sniffio

_WITHOUT_SNIFFIO = """
import sys
sys.modules["sniffio"] = None  # as on a clean install: anyio >= 4.16 does not bring it
import warnings

import anyio
import numpy as np

import aioshm


def rank(r):
    return r


async def main():
    a = aioshm.share(np.arange(1 << 16, dtype=np.float64))
    print(await aioshm.run_sync(np.sum, a) == a.sum())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        print(await aioshm.spawn(rank, nprocs=1, start_method="fork"))
    print([str(w.message).split(":")[0] for w in caught if w.category is RuntimeWarning])


if __name__ == "__main__":
    anyio.run(main)
    print("sniffio" in sys.modules and sys.modules["sniffio"] is not None)
"""


def test_asyncio_without_sniffio(tmp_path: Path) -> None:
    """Without sniffio (anyio no longer installs it; only trio brings it), ``run_sync`` works on
    asyncio, and ``spawn(start_method="fork")`` under the running loop warns: both looked the
    library up through a bare ``import sniffio`` before (ModuleNotFoundError; no warning)."""
    script = tmp_path / "no_sniffio.py"
    script.write_text(_WITHOUT_SNIFFIO)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["True", "[0]", "['aioshm']", "False"], result.stdout
