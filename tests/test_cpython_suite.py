"""CPython's own multiprocessing test suite, run against ``aioshm.multiprocessing``.

For each start method this runs ``tests/cpython_suite/test_cpython_processes.py`` in a separate
pytest process. There ``multiprocessing`` is aliased to the drop-in, in the parent and in every
spawn/forkserver child (``mp_alias.py`` + ``sitecustomize.py``), and the "processes" flavour of
``test._test_multiprocessing`` is installed from the interpreter's own ``test`` package.
Deliberate exclusions are listed in ``tests/cpython_suite/deselect.txt`` (reasons in
``DESELECTED.md``).

``AIOSHM_CPYTHON_SUITE_METHODS`` (comma-separated, e.g. ``forkserver``) limits the start methods
this module runs; unset, both run. ``scripts/test.sh`` uses it to run spawn on 3.11 and
forkserver on 3.14 (the reason is written there).

Manual use, e.g. for the stdlib control run (``--stdlib`` leaves ``multiprocessing`` alone)::

    .venv/bin/python tests/test_cpython_suite.py [--stdlib] [spawn] [forkserver] [-- PYTEST ARGS]
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUITE_DIR = REPO / "tests" / "cpython_suite"
HARNESS = SUITE_DIR / "test_cpython_processes.py"
DESELECT_FILE = SUITE_DIR / "deselect.txt"
DROPIN = "aioshm.multiprocessing"
START_METHODS = ("spawn", "forkserver")
METHODS_ENV = "AIOSHM_CPYTHON_SUITE_METHODS"
MIN_PASSED = 100
INNER_TIMEOUT = 900  # whole inner run, seconds
PER_TEST_TIMEOUT = 120  # each CPython test, seconds

# Variables that would leak the outer pytest's configuration into the inner run.
_SCRUB_ENV = ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_CURRENT_TEST", "PYTEST_VERSION")
_COUNT_RE = re.compile(
    r"(\d+) (subtests )?(passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?|rerun)"
)
_SUMMARY_RE = re.compile(r"^=*\s*(?:\d+ \w+.*|no tests ran) in [\d.]+s")


@dataclass
class SuiteRun:
    start_method: str
    dropin: str | None
    counts: dict[str, int]
    output: str
    wall: float
    returncode: int
    reports: list[dict[str, object]]
    leftover_processes: bool

    def describe(self) -> str:
        order = (
            "passed",
            "failed",
            "errors",
            "skipped",
            "deselected",
            "xfailed",
            "xpassed",
            "subtests_passed",
            "subtests_failed",
        )
        shown = ", ".join(f"{k}={self.counts.get(k, 0)}" for k in order)
        target = self.dropin or "stdlib multiprocessing"
        return (
            f"CPython multiprocessing suite [{self.start_method}] against {target}: {shown}; "
            f"wall {self.wall:.1f}s; pytest exit {self.returncode}"
        )

    def failures(self) -> list[str]:
        """Node ids (relative to tests/cpython_suite) of failed/errored tests."""
        found = re.findall(
            r"^(?:FAILED|ERROR) \S*?(test_cpython_processes\.py::\S+)", self.output, re.MULTILINE
        )
        return list(dict.fromkeys(found))

    def message(self) -> str:
        listed = "".join(f"\n  {x}" for x in self.failures())
        return f"{self.describe()}{listed}\n--- tail of the inner run ---\n{self.tail()}"

    def tail(self, lines: int = 200) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


@functools.cache
def suite_unavailable_reason() -> str | None:
    """Why ``test._test_multiprocessing`` cannot be imported here, or None if it can."""
    proc = subprocess.run(
        [sys.executable, "-c", "import test._test_multiprocessing"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tempfile.gettempdir(),
        env=_scrubbed_env(),
    )
    if proc.returncode == 0:
        return None
    last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return (
        f"this interpreter ({sys.executable}) cannot import test._test_multiprocessing: {last}. "
        "Use a Python build that ships its test package (pyenv builds do; Debian/Ubuntu need "
        "libpython3.X-testsuite)."
    )


def _scrubbed_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in _SCRUB_ENV:
        env.pop(name, None)
    return env


def deselect_args(start_method: str, path: Path = DESELECT_FILE) -> list[str]:
    """Turn ``deselect.txt`` into pytest arguments for *start_method*.

    Each non-comment line is a node id relative to ``tests/cpython_suite`` (passed as
    ``--deselect``) or ``-k EXPR`` (the run gets ``-k "not (EXPR) and ..."``). A leading
    ``[spawn]`` / ``[forkserver]`` / ``[spawn,forkserver]`` limits the entry to those methods.
    """
    args: list[str] = []
    k_exprs: list[str] = []
    if not path.exists():
        return args
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^\[([\w,\s]+)\]\s*(.*)$", line)
        if m:
            methods = {x.strip() for x in m.group(1).split(",")}
            if start_method not in methods:
                continue
            line = m.group(2).strip()
        if line.startswith("-k "):
            k_exprs.append(line[3:].strip())
        else:
            args += ["--deselect", line]
    if k_exprs:
        args += ["-k", " and ".join(f"not ({e})" for e in k_exprs)]
    return args


def parse_summary(output: str) -> dict[str, int]:
    """Counts from pytest's final summary line ("140 passed, 2 skipped in 50.1s")."""
    for line in reversed(output.splitlines()):
        if _SUMMARY_RE.match(line.strip()):
            counts: dict[str, int] = {}
            for num, subtests, kind in _COUNT_RE.findall(line):
                key = {"error": "errors", "warning": "warnings"}.get(kind, kind)
                key = f"subtests_{key}" if subtests else key
                counts[key] = counts.get(key, 0) + int(num)
            return counts
    raise ValueError("no pytest summary line in the output")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_suite(
    start_method: str,
    dropin: str | None,
    workdir: Path,
    extra_args: list[str] | None = None,
    timeout: float = INNER_TIMEOUT,
) -> SuiteRun:
    """Run the harness in a fresh pytest process (own session, so it can be cleaned up)."""
    report = workdir / f"report-{start_method}.jsonl"
    report.unlink(missing_ok=True)
    env = _scrubbed_env()
    env["PYTHONPATH"] = os.pathsep.join(
        [str(SUITE_DIR), str(REPO), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["AIOSHM_CPYTHON_SUITE"] = "1"
    env["AIOSHM_MP_START"] = start_method
    env["AIOSHM_CPYTHON_SUITE_REPORT"] = str(report)
    env["PYTHONFAULTHANDLER"] = "1"
    if dropin:
        env["AIOSHM_MP_DROPIN"] = dropin
    else:
        env.pop("AIOSHM_MP_DROPIN", None)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rfE",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:anyio",
        f"--timeout={PER_TEST_TIMEOUT}",
        "-o",
        "addopts=",
        "-c",
        os.devnull,  # no ini file: the repo's pyproject settings must not apply
        f"--rootdir={SUITE_DIR}",
        f"--confcutdir={SUITE_DIR}",  # never load tests/conftest.py
        str(HARNESS),
        *deselect_args(start_method),
        *(extra_args or []),
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,  # the CPython tests drop TESTFN files into the cwd
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        output, _ = proc.communicate()
        output += f"\n[harness] inner pytest killed after {timeout}s\n"
    except BaseException:
        _kill_group(proc.pid)
        proc.communicate()
        raise
    wall = time.monotonic() - t0
    # Whatever the run left behind in its session (workers, tracker, forkserver) goes now.
    deadline = time.monotonic() + 5
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    leftover = _group_alive(proc.pid)
    if leftover:
        _kill_group(proc.pid)
    try:
        counts = parse_summary(output)
    except ValueError:
        counts = {}
    reports = []
    if report.exists():
        reports = [json.loads(x) for x in report.read_text(encoding="utf-8").splitlines() if x]
    return SuiteRun(start_method, dropin, counts, output, wall, proc.returncode, reports, leftover)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_cpython_multiprocessing_suite(
    start_method: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    record_property: Callable[[str, object], None],
) -> None:
    if start_method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"start method {start_method!r} is not available on this platform")
    chosen = os.environ.get(METHODS_ENV)
    if chosen is not None and start_method not in {m.strip() for m in chosen.split(",")}:
        pytest.skip(f"{METHODS_ENV}={chosen!r} leaves {start_method!r} out")
    reason = suite_unavailable_reason()
    if reason:
        pytest.skip(reason)

    run = run_suite(start_method, DROPIN, tmp_path)
    with capsys.disabled():
        print(f"\n{run.describe()}")
    for key, value in run.counts.items():
        record_property(f"cpython_{start_method}_{key}", value)

    assert run.counts, f"no pytest summary in the inner run\n{run.message()}"
    assert run.counts.get("failed", 0) == 0, run.message()
    assert run.counts.get("errors", 0) == 0, run.message()
    assert run.counts.get("subtests_failed", 0) == 0, run.message()
    assert run.counts.get("passed", 0) > MIN_PASSED, run.message()
    # The inner run really exercised the drop-in, in the parent and in a child process.
    seen = {str(r["who"]): r["multiprocessing"] for r in run.reports}
    assert seen.get("parent") == DROPIN, (seen, run.tail())
    assert seen.get(f"child:{start_method}") == DROPIN, (seen, run.tail())
    assert run.returncode == 0, run.message()


def _main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    dropin = None if "--stdlib" in argv else DROPIN
    methods = [a for a in argv if not a.startswith("-")] or list(START_METHODS)
    reason = suite_unavailable_reason()
    if reason:
        print(reason)
        return 0
    status = 0
    for method in methods:
        with tempfile.TemporaryDirectory(prefix=f"cpython-suite-{method}-") as tmp:
            run = run_suite(method, dropin, Path(tmp), extra)
        print(run.tail(60))
        print(run.describe())
        for nodeid in run.failures():
            print(f"  {nodeid}")
        if run.leftover_processes:
            print("[harness] processes were still alive 5s after the run and were killed")
        status |= run.returncode
    return status


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
