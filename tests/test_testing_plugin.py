"""aioshm's pytest plugin (``aioshm.testing``): inert until asked, then a leak check.

Each case runs pytest in a subprocess (``pytester``) on a file of tests, so whatever those
tests leak dies with it: under pytest-asyncio and under anyio's plugin, a leaking test fails
naming the leak, a clean one passes, and ``allow_leaks`` exempts a kind. Installing aioshm alone
changes nothing: without the opt-in the same leaky tests pass and aioshm is never imported.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

_COMMON = """
from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest

KEEP = []


def leak_segment():
    import aioshm

    KEEP.append(aioshm.share(np.ones(100_000)))
"""

_ASYNCIO_TESTS = (
    _COMMON
    + """

@pytest.mark.asyncio
async def test_clean():
    r, w = os.pipe()
    os.close(r)
    os.close(w)


@pytest.mark.asyncio
async def test_leaks_pipe():
    os.pipe()


@pytest.mark.asyncio
async def test_leaks_thread():
    threading.Thread(target=threading.Event().wait, name="leaky-thread", daemon=True).start()


@pytest.mark.asyncio
async def test_leaks_segment():
    leak_segment()


@pytest.mark.asyncio
@pytest.mark.allow_leaks("fds")
async def test_allowed_pipe():
    os.pipe()
"""
)

_ANYIO_TESTS = (
    _COMMON
    + """

@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.mark.anyio
async def test_clean():
    import anyio

    await anyio.sleep(0)


@pytest.mark.anyio
async def test_leaks_pipe():
    os.pipe()


@pytest.mark.anyio
async def test_leaks_child():
    import subprocess

    subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])


@pytest.mark.anyio
async def test_leaks_segment():
    leak_segment()


@pytest.mark.anyio
@pytest.mark.allow_leaks("fds", "processes")
async def test_allowed():
    os.pipe()
"""
)

_INERT_TESTS = (
    _COMMON
    + """

def test_leaks_pipe():
    os.pipe()


def test_aioshm_not_imported():
    assert "aioshm" not in sys.modules
    assert "aioshm.testing" not in sys.modules


def test_leaks_segment():
    leak_segment()
"""
)

_PER_TEST_TESTS = (
    _COMMON
    + """

@pytest.mark.usefixtures("aioshm_leak_check")
def test_checked_leaks_pipe():
    os.pipe()


def test_unchecked_leaks_pipe():
    os.pipe()
"""
)

ASYNCIO_INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=120)


def test_installed_plugin_is_inert(pytester: pytest.Pytester) -> None:
    """Without the opt-in, leaky tests pass and the run never imports aioshm."""
    pytester.makeini(ASYNCIO_INI)
    pytester.makepyfile(test_inert=_INERT_TESTS.replace("    leak_segment()", "    pass"))
    result = run(pytester)
    result.assert_outcomes(passed=3)


def test_leak_check_under_pytest_asyncio(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--aioshm-leak-check`` with pytest-asyncio tests."""
    monkeypatch.setenv("AIOSHM_LEAK_GRACE", "0.5")
    pytester.makeini(ASYNCIO_INI)
    pytester.makepyfile(test_leaky=_ASYNCIO_TESTS)
    result = run(pytester, "-p", "asyncio", "--aioshm-leak-check")
    result.assert_outcomes(passed=5, errors=3)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_pipe*",
            "*fds: pipe +2: fd * -> pipe:*, fd * -> pipe:*",
            "*ERROR at teardown of test_leaks_thread*",
            "*threads: leaky-thread (daemon) still running after 0.5 s*",
            "*ERROR at teardown of test_leaks_segment*",
            "*fds: memfd +1: fd * -> /memfd:aioshm*",
        ]
    )
    summary = result.stdout.str().split("short test summary info")[-1]
    for name in ("test_clean", "test_allowed_pipe"):
        assert f"::{name} " not in summary


def test_leak_check_under_anyio(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``aioshm_leak_check`` ini option with anyio's plugin, on asyncio and trio."""
    monkeypatch.setenv("AIOSHM_LEAK_GRACE", "0.5")
    pytester.makeini("[pytest]\naioshm_leak_check = true\n" + ASYNCIO_INI.split("\n", 1)[1])
    pytester.makepyfile(test_leaky=_ANYIO_TESTS)
    result = run(pytester, "-p", "anyio")
    result.assert_outcomes(passed=10, errors=6)
    result.stdout.fnmatch_lines_random(
        [
            "*ERROR at teardown of test_leaks_pipe[[]asyncio]*",
            "*ERROR at teardown of test_leaks_pipe[[]trio]*",
            "*ERROR at teardown of test_leaks_child[[]asyncio]*",
            "*processes: still running after 0.5 s, killed: pid * [[]*signal.pause()*",
            "*ERROR at teardown of test_leaks_segment[[]trio]*",
            "*fds: memfd +1: fd * -> /memfd:aioshm*",
        ]
    )
    summary = result.stdout.str().split("short test summary info")[-1]
    for name in ("test_clean", "test_allowed"):
        assert f"::{name}[" not in summary


def test_per_test_fixture(pytester: pytest.Pytester) -> None:
    """Loaded by a conftest, the plugin checks only the tests that request its fixture."""
    pytester.makeini(ASYNCIO_INI)
    pytester.makeconftest('pytest_plugins = ["aioshm.testing"]\n')
    pytester.makepyfile(test_some=_PER_TEST_TESTS)
    result = run(pytester)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_checked_leaks_pipe*"])


def test_opt_in_with_autoload_off(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With plugin autoloading off, ``-p aioshm_pytest --aioshm-leak-check`` turns it on."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_inert=_INERT_TESTS.replace("def test_aioshm_not", "def _skip"))
    result = run(pytester, "-p", "aioshm_pytest", "--aioshm-leak-check")
    result.assert_outcomes(passed=2, errors=2)  # errors at the teardown of passing tests
    result.stdout.fnmatch_lines(["*fds: pipe +2*", "*fds: memfd +1*"])


def test_unknown_leak_kind_is_an_error(pytester: pytest.Pytester) -> None:
    """``allow_leaks`` with a kind that does not exist fails the test, naming the kinds."""
    pytester.makepyfile(
        test_bad="""
import pytest

@pytest.mark.allow_leaks("memory")
def test_x():
    pass
"""
    )
    result = run(pytester, "--aioshm-leak-check")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*allow_leaks: unknown kinds *memory*"])
