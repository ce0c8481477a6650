"""The ``pytest11`` entry point of aioshm: options only, until a run opts in to the leak check.

Kept outside the ``aioshm`` package on purpose: pytest loads every installed plugin in every
run, and importing ``aioshm`` loads numpy and registers its reducers with ``ForkingPickler``.
This module imports neither, so installing aioshm changes nobody's test run. Only
``--aioshm-leak-check`` or the ``aioshm_leak_check`` ini option loads :mod:`aioshm.testing`
(which holds the checks and the fixtures; see its docstring).
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

#: The call-phase report of each test, which the leak check needs (it judges passing tests).
CALL_REPORT = pytest.StashKey[pytest.TestReport]()
LEAK_KINDS = frozenset({"processes", "shm", "fds", "threads"})
GRACE_DEFAULT = 5.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("aioshm")
    group.addoption(
        "--aioshm-leak-check",
        action="store_true",
        default=False,
        help="fail tests that leave a child process, an aioshm segment, an fd or a thread behind",
    )
    parser.addini(
        "aioshm_leak_check",
        type="bool",
        default=False,
        help="run aioshm's leak check around every test (as --aioshm-leak-check)",
    )
    parser.addini(
        "aioshm_leak_grace",
        default="",
        help=f"seconds the leak check waits for threads and processes (default {GRACE_DEFAULT:g})",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_leaks(*kinds): skip aioshm's leak check for these kinds "
        f"({', '.join(sorted(LEAK_KINDS))})",
    )
    if config.getoption("aioshm_leak_check") or config.getini("aioshm_leak_check"):
        config.pluginmanager.import_plugin("aioshm.testing")
        import aioshm.testing

        aioshm.testing.enable(config)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.when == "call":
        item.stash[CALL_REPORT] = report
    return report
