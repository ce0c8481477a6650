"""Shared test machinery: the anyio backends and the leak check every test runs under.

Leak standard L0 (``/work/shared/research/reliability.md`` §5): after each test that passed, the
autouse ``_leak_check`` fixture fails the test if it left behind

- a child process (live after a grace period, or a zombie nobody reaped) -- any such process is
  also killed, so one leaky test does not break the ones after it;
- a new ``aioshm*`` entry in ``$AIOSHM_SHM_DIR`` (where aioshm puts named segments; unless it is
  already set, the run sets it to a private directory under ``/dev/shm``, so runs side by side
  never see each other's segments) or, if it is unset, in ``/dev/shm``;
- a new open fd of this process, counted per kind (memfd, socket, pipe, anon_inode, shm, file);
- a new thread that does not finish within the grace period.

Long-lived helpers that the stdlib starts lazily and keeps for the whole session are not leaks:
the multiprocessing resource tracker and fork server (their processes and the one pipe each keeps
in this process), the ``resource_sharer`` thread and socket, and trio's idle cached worker
threads. A test that leaks on purpose says so with ``@pytest.mark.allow_leaks("threads", ...)``.

The grace period is 5 s; ``AIOSHM_LEAK_GRACE`` (seconds) overrides it. Waiting is done with
``Thread.join`` and ``psutil.wait_procs``, never by sleeping.
"""

from __future__ import annotations

import faulthandler
import gc
import importlib.util
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import psutil
import pytest

pytest_plugins = ["pytester"]

LEAK_GRACE = float(os.environ.get("AIOSHM_LEAK_GRACE", "5"))
SHM_PREFIX = "aioshm"
LEAK_KINDS = frozenset({"processes", "shm", "fds", "threads"})
# Direct children whose command line contains one of these are session-long stdlib helpers.
# (Only direct children: a worker forked *by* the fork server inherits its command line.)
HELPER_CMDLINE_MARKERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")

_CALL_REPORT = pytest.StashKey[pytest.TestReport]()
_STDERR_COPY = pytest.StashKey[int]()
_OWN_FAULTHANDLER = pytest.StashKey[bool]()


# --------------------------------------------------------------------------- pytest hooks


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get("AIOSHM_SHM_DIR"):
        # Named segments of this run (and of its children, which inherit the variable) go to a
        # private directory, so test runs side by side never see each other's segments.
        private = tempfile.mkdtemp(
            prefix="pytest-aioshm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        os.environ["AIOSHM_SHM_DIR"] = private

        def drop_private_dir() -> None:
            del os.environ["AIOSHM_SHM_DIR"]
            shutil.rmtree(private, ignore_errors=True)

        config.add_cleanup(drop_private_dir)
    config.addinivalue_line(
        "markers",
        "allow_leaks(*kinds): skip the leak check for these kinds "
        f"({', '.join(sorted(LEAK_KINDS))})",
    )
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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.when == "call":
        item.stash[_CALL_REPORT] = report
    return report


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


# --------------------------------------------------------------------------- snapshots


def _helper_pids() -> set[int]:
    """Pids of the session-long stdlib helper processes (fork server, resource tracker)."""
    pids: set[int] = set()
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    if tracker is not None and getattr(tracker._resource_tracker, "_pid", None):
        pids.add(tracker._resource_tracker._pid)
    forkserver = sys.modules.get("multiprocessing.forkserver")
    if forkserver is not None and getattr(forkserver._forkserver, "_forkserver_pid", None):
        pids.add(forkserver._forkserver._forkserver_pid)
    for child in psutil.Process().children():
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if any(marker in cmdline for marker in HELPER_CMDLINE_MARKERS):
            pids.add(child.pid)
    return pids


def _helper_fds() -> set[int]:
    """fds this process keeps open for the helpers: tracker pipe, fork-server pipe, sharer."""
    fds: set[int | None] = set()
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    if tracker is not None:
        fds.add(getattr(tracker._resource_tracker, "_fd", None))
    forkserver = sys.modules.get("multiprocessing.forkserver")
    if forkserver is not None:
        fds.add(getattr(forkserver._forkserver, "_forkserver_alive_fd", None))
    sharer = sys.modules.get("multiprocessing.resource_sharer")
    listener = getattr(getattr(sharer, "_resource_sharer", None), "_listener", None)
    if listener is not None:
        try:
            fds.add(listener._listener._socket.fileno())
        except (AttributeError, OSError):
            pass
    return {fd for fd in fds if fd is not None and fd >= 0}


def _helper_threads() -> set[threading.Thread]:
    """Threads that outlive tests by design: the resource sharer, trio's idle cached workers."""
    threads: set[threading.Thread] = set()
    sharer = sys.modules.get("multiprocessing.resource_sharer")
    thread = getattr(getattr(sharer, "_resource_sharer", None), "_thread", None)
    if thread is not None:
        threads.add(thread)
    cache = sys.modules.get("trio._core._thread_cache")
    if cache is not None:
        try:
            threads.update(worker._thread for worker in list(cache.THREAD_CACHE._idle_workers))
        except AttributeError:
            pass
    return threads


def _fd_kind(target: str, shm_dir: str) -> str:
    if target.startswith(("/memfd:", "memfd:")):
        return "memfd"
    for kind in ("socket", "pipe", "anon_inode"):
        if target.startswith(kind + ":"):
            return kind
    if target.startswith(("/dev/shm/", shm_dir.rstrip("/") + "/")):
        return "shm"
    return "file"


def _open_fds(shm_dir: str) -> dict[int, tuple[str, str]]:
    """``{fd: (kind, readlink target)}`` for this process, minus the helpers' fds."""
    fd_dir = f"/proc/{os.getpid()}/fd"
    skip = _helper_fds()
    fds: dict[int, tuple[str, str]] = {}
    for name in os.listdir(fd_dir):
        fd = int(name)
        if fd in skip:
            continue
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:  # the listing's own fd, or closed meanwhile
            continue
        if target == fd_dir:
            continue
        fds[fd] = (_fd_kind(target, shm_dir), target)
    return fds


def _shm_dir() -> str:
    """Where named segments go: ``$AIOSHM_SHM_DIR``, else ``/dev/shm`` (as in aioshm)."""
    return os.environ.get("AIOSHM_SHM_DIR") or "/dev/shm"


def _shm_entries(shm_dir: str) -> set[str]:
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return set()
    return {os.path.join(shm_dir, n) for n in names if n.startswith(SHM_PREFIX)}


def _foreign_owner(path: str, tree: set[int]) -> bool:
    """True if the name encodes a live owner pid outside this process tree.

    Segment names follow ``<prefix>_<ownerpid>_<random>`` (reliability.md §2), so a test run next
    to another one on the same machine ignores the other run's segments. A name without a pid,
    or with a dead owner, counts as ours.
    """
    for token in os.path.basename(path)[len(SHM_PREFIX) :].split("_"):
        if token.isdigit():
            pid = int(token)
            return pid not in tree and psutil.pid_exists(pid)
    return False


def _new_shm(before: set[str], shm_dir: str) -> list[str]:
    new = _shm_entries(shm_dir) - before
    if not new:
        return []
    tree = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
    return sorted(p for p in new if not _foreign_owner(p, tree))


def _describe(proc: psutil.Process) -> str:
    for what in (proc.cmdline, proc.name):  # a zombie has a name but no command line
        try:
            return f"pid {proc.pid} {what()!r}"
        except psutil.Error:
            continue
    return f"pid {proc.pid}"


@dataclass
class _Snapshot:
    children: set[int]
    threads: set[threading.Thread]
    fds: dict[int, tuple[str, str]]
    shm: set[str]
    shm_dir: str

    @classmethod
    def take(cls) -> _Snapshot:
        shm_dir = _shm_dir()
        return cls(
            children={p.pid for p in psutil.Process().children(recursive=True)},
            threads=set(threading.enumerate()),
            fds=_open_fds(shm_dir),
            shm=_shm_entries(shm_dir),
            shm_dir=shm_dir,
        )


# --------------------------------------------------------------------------- the checks


def _check_threads(base: _Snapshot, deadline: float) -> list[str]:
    leaked = []
    for thread in threading.enumerate():
        if (
            thread in base.threads
            or thread in _helper_threads()
            or thread is threading.current_thread()
            or isinstance(thread, threading._DummyThread)  # a foreign thread: cannot be joined
        ):
            continue
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if thread.is_alive() and thread not in _helper_threads():
            kind = "daemon" if thread.daemon else "non-daemon"
            leaked.append(f"{thread.name} ({kind}) still running after {LEAK_GRACE:g} s")
    return leaked


def _check_processes(base: _Snapshot, deadline: float) -> list[str]:
    """Report new children; reap zombies and kill whatever is still alive after the grace."""
    multiprocessing.active_children()  # joins finished multiprocessing children
    helpers = _helper_pids()
    kids = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in base.children and p.pid not in helpers
    ]
    if not kids:
        return []
    leaked, live = [], []
    for proc in kids:
        try:
            zombie = proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            continue
        if zombie:
            leaked.append(f"zombie (exited, never reaped): {_describe(proc)}")
        else:
            live.append(proc)
    described = {p.pid: _describe(p) for p in live}
    # Wait for multiprocessing children through multiprocessing, so their objects learn the
    # exit code; everything else through psutil (which reaps our direct children).
    mp_children = {c.pid: c for c in multiprocessing.active_children()}
    for proc in live:
        if proc.pid in mp_children:
            mp_children[proc.pid].join(timeout=max(0.0, deadline - time.monotonic()))
    live = [p for p in live if p.pid not in mp_children or mp_children[p.pid].is_alive()]
    _, alive = psutil.wait_procs(live, timeout=max(0.0, deadline - time.monotonic()))
    leaked += [f"still running after {LEAK_GRACE:g} s, killed: {described[p.pid]}" for p in alive]
    _kill(alive)
    # Reap what we can (direct children); a zombie grandchild is its parent's to reap.
    psutil.wait_procs([p for p in kids if p.pid not in {a.pid for a in alive}], timeout=0)
    return leaked


def _kill(procs: list[psutil.Process]) -> None:
    if not procs:
        return
    pids = {p.pid for p in procs}
    for child in multiprocessing.active_children():  # through multiprocessing, so it knows
        if child.pid in pids:
            child.kill()
            child.join(timeout=LEAK_GRACE)
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=LEAK_GRACE)


def _check_fds(base: _Snapshot) -> list[str]:
    now = _open_fds(base.shm_dir)
    before = Counter(kind for kind, _ in base.fds.values())
    after = Counter(kind for kind, _ in now.values())
    leaked = []
    for kind in sorted(after):
        grown = after[kind] - before[kind]
        if grown > 0:
            new = [
                f"fd {fd} -> {target}"
                for fd, (k, target) in sorted(now.items())
                if k == kind and base.fds.get(fd) != (k, target)
            ]
            leaked.append(f"{kind} +{grown}: {', '.join(new)}")
    return leaked


@pytest.fixture(autouse=True)
def _leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a process, an aioshm segment, an fd or a thread behind."""
    allowed: set[str] = set()
    for marker in request.node.iter_markers("allow_leaks"):
        unknown = set(marker.args) - LEAK_KINDS
        if unknown:
            pytest.fail(f"allow_leaks: unknown kinds {sorted(unknown)}; use {sorted(LEAK_KINDS)}")
        allowed.update(marker.args)
    base = _Snapshot.take()
    yield

    report = request.node.stash.get(_CALL_REPORT, None)
    # A failed test keeps its frames (and their fds) alive in the traceback, so only passing
    # tests are judged. Stray processes are killed in every case, so they cannot cascade.
    judged = report is not None and (
        report.passed or (report.skipped and not getattr(report, "wasxfail", None))
    )
    if judged:
        gc.collect()  # closes what only garbage cycles still hold, and stops Queue feeders
        shm = sys.modules.get("aioshm._shm")
        if shm is not None:
            # recycled transport segments stay mapped on purpose (bounded pool); release the
            # idle ones so only segments something still holds count as leaks
            shm.trim()
    deadline = time.monotonic() + LEAK_GRACE
    problems: dict[str, list[str]] = {}
    if judged and "threads" not in allowed:
        problems["threads"] = _check_threads(base, deadline)
    if "processes" not in allowed:
        problems["processes"] = _check_processes(base, deadline)
    if judged and "shm" not in allowed:
        problems["shm"] = [f"new entry {p}" for p in _new_shm(base.shm, base.shm_dir)]
    if judged and "fds" not in allowed:
        problems["fds"] = _check_fds(base)
    lines = [f"  {kind}: {item}" for kind, items in problems.items() for item in items]
    if judged and lines:
        pytest.fail(
            "leak check (L0) failed; the test left behind:\n"
            + "\n".join(lines)
            + '\n(mark the test @pytest.mark.allow_leaks("<kind>") only if this is intended)',
            pytrace=False,
        )


@pytest.fixture(scope="session", autouse=True)
def _session_checks() -> Iterator[None]:
    """At the end of the run, no aioshm segment created during the session may remain."""
    if importlib.util.find_spec("uvloop") is not None:
        # libuv opens a process-wide pipe when the first loop is created; open it now so it is
        # part of every test's fd baseline instead of a leak of the first uvloop test.
        import uvloop

        uvloop.new_event_loop().close()
    shm_dir = _shm_dir()
    before = _shm_entries(shm_dir)
    yield
    left = _new_shm(before, shm_dir)
    if left:
        pytest.fail(
            "aioshm shared-memory entries created during the session remain: " + ", ".join(left),
            pytrace=False,
        )
