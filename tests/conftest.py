"""Shared test machinery: the anyio backends and the leak check every test runs under.

Leak standard L0 (``/work/shared/research/reliability.md`` §5) is aioshm's own pytest plugin,
:mod:`aioshm.testing`, switched on for every test of this suite (its docstring says what it
checks: processes, segments, fds and threads after each passing test, with a grace period, and
the segments left at the end of the session). A test that leaks on purpose says so with
``@pytest.mark.allow_leaks("threads", ...)``; ``AIOSHM_LEAK_GRACE`` (seconds) overrides the 5 s
grace period.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import os
import signal
import sys

import pytest

pytest_plugins = ["pytester", "aioshm.testing"]

_STDERR_COPY = pytest.StashKey[int]()
_OWN_FAULTHANDLER = pytest.StashKey[bool]()


# --------------------------------------------------------------------------- pytest hooks


def pytest_configure(config: pytest.Config) -> None:
    import aioshm.testing  # registered by pytest_plugins above (imported there, rewritten)

    aioshm.testing.enable(config)
    # pytest's faulthandler plugin dumps all stacks after `faulthandler_timeout`. On top of
    # that: dump on fatal signals even when that plugin is disabled, and on demand with
    # `kill -USR1 <pid>` when a run hangs. fd 2 is the real stderr only now (pytest captures
    # it during tests), so the dumps go to a copy of it.
    stderr_copy = os.dup(sys.__stderr__.fileno() if sys.__stderr__ else 2)
    config.stash[_STDERR_COPY] = stderr_copy
    if not faulthandler.is_enabled():  # pytest's own plugin is off (-p no:faulthandler)
        faulthandler.enable(file=stderr_copy, all_threads=True)
        config.stash[_OWN_FAULTHANDLER] = True
    if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
        faulthandler.register(signal.SIGUSR1, file=stderr_copy, all_threads=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    stderr_copy = config.stash.get(_STDERR_COPY, None)
    if stderr_copy is not None:
        faulthandler.unregister(signal.SIGUSR1)
        if config.stash.get(_OWN_FAULTHANDLER, False):
            faulthandler.disable()
        os.close(stderr_copy)


# --------------------------------------------------------------------------- anyio backends


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(
            ("asyncio", {"use_uvloop": True}),
            id="asyncio+uvloop",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"
            ),
        ),
        pytest.param(("trio", {}), id="trio"),
    ],
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    """The event loops every ``@pytest.mark.anyio`` test runs on."""
    backend: tuple[str, dict[str, object]] = request.param
    return backend


@pytest.fixture(scope="session", autouse=True)
def _uvloop_pipe() -> None:
    """libuv opens a process-wide pipe when the first loop is created; open it before the first
    test, so it is part of every test's fd baseline instead of a leak of the first uvloop test."""
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        uvloop.new_event_loop().close()
