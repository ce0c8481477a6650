"""A pytest plugin that fails a test which leaves a process, a segment, an fd or a thread behind.

Installing aioshm changes nobody's test run: its ``pytest11`` entry point (the top-level module
``aioshm_pytest``, which imports nothing of aioshm) only adds the options below and the
``allow_leaks`` marker. Opt in for a whole run::

    # pyproject.toml
    [tool.pytest.ini_options]
    aioshm_leak_check = true

or with ``pytest --aioshm-leak-check`` (add ``-p aioshm_pytest`` when plugin autoloading is
off). Or load this module yourself (``pytest_plugins = ["aioshm.testing"]`` in a
``conftest.py``, or ``-p aioshm.testing``) and request the fixture where you want it::

    pytestmark = pytest.mark.usefixtures("aioshm_leak_check")

After each test that passed, the check fails it (an error at teardown) if it left behind

- a child process: still alive after the grace period, or a zombie nobody reaped. Such a
  process is killed in every case, so one leaky test does not break the ones after it;
- a new ``aioshm*`` entry in ``$AIOSHM_SHM_DIR`` (or ``/dev/shm``) owned by this process tree;
- a new open fd of this process, counted per kind (memfd, socket, pipe, anon_inode, shm, file);
- a new thread that does not finish within the grace period.

Long-lived helpers that the stdlib starts lazily and keeps for the whole session are not leaks:
the multiprocessing resource tracker and fork server (their processes and the pipe each keeps
in this process), the ``resource_sharer`` thread and socket, and trio's idle cached worker
threads. A test that leaks on purpose says so with ``@pytest.mark.allow_leaks("threads", ...)``
(kinds: ``processes``, ``shm``, ``fds``, ``threads``).

With the run-wide opt-in, named segments of the run (and of its children, which inherit the
variable) go to a private directory unless ``$AIOSHM_SHM_DIR`` is already set, and the session
fails if an aioshm segment created during it remains at the end.

The grace period is 5 s; the ``aioshm_leak_grace`` ini option or ``$AIOSHM_LEAK_GRACE``
(seconds) overrides it. Every wait is a wait on an fd (``Thread.join``, a pidfd), never a
sleep. Linux only (it reads ``/proc``). Works with any async test plugin (anyio's,
pytest-asyncio, pytest-trio): the check runs around the test, outside its event loop.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

__all__ = ("LEAK_KINDS", "aioshm_leak_check", "aioshm_session_leak_check", "enable")

from aioshm_pytest import CALL_REPORT as _CALL_REPORT
from aioshm_pytest import GRACE_DEFAULT as _GRACE_DEFAULT
from aioshm_pytest import LEAK_KINDS

from ._shm._segment import _pid_alive

# The options, the marker and the report hook live in the entry-point module (which imports
# nothing of aioshm); ``-p aioshm.testing`` loads it too when plugin autoloading is off.
pytest_plugins = ["aioshm_pytest"]

SHM_PREFIX = "aioshm"
# Direct children whose command line contains one of these are session-long stdlib helpers.
# (Only direct children: a worker forked *by* the fork server inherits its command line.)
HELPER_CMDLINE_MARKERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")

_ENABLED = pytest.StashKey[bool]()


def _run_wide_plugin() -> types.ModuleType:
    """Autouse fixtures that put every test and the session under the checks below, as a plugin
    of their own that only :func:`enable` registers (in this module's namespace they would be
    switched on by merely loading it)."""

    @pytest.fixture(autouse=True)
    def _aioshm_leak_check_all(aioshm_leak_check: None) -> None:
        pass

    @pytest.fixture(scope="session", autouse=True)
    def _aioshm_session_leak_check_all(aioshm_session_leak_check: None) -> None:
        pass

    plugin = types.ModuleType("aioshm.testing:run-wide")
    vars(plugin).update(
        _aioshm_leak_check_all=_aioshm_leak_check_all,
        _aioshm_session_leak_check_all=_aioshm_session_leak_check_all,
    )
    return plugin


def enable(config: pytest.Config) -> None:
    """Turn the leak check on for every test of this run (idempotent).

    What ``--aioshm-leak-check`` and the ``aioshm_leak_check`` ini option do; a ``conftest.py``
    may call it from its ``pytest_configure``.
    """
    if config.stash.get(_ENABLED, False):
        return
    config.stash[_ENABLED] = True
    if not os.environ.get("AIOSHM_SHM_DIR"):
        # Named segments of this run (and of its children, which inherit the variable) go to a
        # private directory, so test runs side by side never see each other's segments.
        private = tempfile.mkdtemp(
            prefix="pytest-aioshm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        os.environ["AIOSHM_SHM_DIR"] = private

        def drop_private_dir() -> None:
            if os.environ.get("AIOSHM_SHM_DIR") == private:
                del os.environ["AIOSHM_SHM_DIR"]
            shutil.rmtree(private, ignore_errors=True)

        config.add_cleanup(drop_private_dir)
    config.pluginmanager.register(_run_wide_plugin(), "aioshm-leak-check-run-wide")


def _grace(config: pytest.Config) -> float:
    value = os.environ.get("AIOSHM_LEAK_GRACE") or str(config.getini("aioshm_leak_grace") or "")
    return float(value) if value else _GRACE_DEFAULT


# --------------------------------------------------------------------------- /proc


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, ppid)`` of ``pid`` from ``/proc``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()  # the command name may hold spaces
    return fields[0].decode(), int(fields[1])


def _children(root: int) -> dict[int, int]:
    """``{pid: ppid}`` of every descendant of ``root``."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                parents.setdefault(st[1], []).append(int(entry))
    tree: dict[int, int] = {}
    todo = [root]
    while todo:
        parent = todo.pop()
        for pid in parents.get(parent, ()):
            if pid not in tree:
                tree[pid] = parent
                todo.append(pid)
    return tree


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            data = f.read()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in data.split(b"\0")[:-1]]

    return True


def _wait_exit(pids: list[int], deadline: float) -> list[int]:
    """Wait (on pidfds) until the processes have exited or the deadline; the live ones."""
    pidfds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                pidfds[os.pidfd_open(pid)] = pid
            except ProcessLookupError:
                continue
        poller = select.poll()
        for fd in pidfds:
            poller.register(fd, select.POLLIN)
        live = dict(pidfds)
        while live:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            for fd, _ in poller.poll(timeout * 1000):
                poller.unregister(fd)
                live.pop(fd, None)
        return sorted(live.values())
    finally:
        for fd in pidfds:
            os.close(fd)


def _reap(pids: list[int]) -> None:
    """Collect the exit status of those of ``pids`` that are our exited direct children."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


# --------------------------------------------------------------------------- snapshots


def _helper_pids(tree: dict[int, int]) -> set[int]:
    """Pids of the session-long stdlib helper processes (fork server, resource tracker)."""
    pids: set[int] = set()
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    if tracker is not None and getattr(tracker._resource_tracker, "_pid", None):
        pids.add(tracker._resource_tracker._pid)
    forkserver = sys.modules.get("multiprocessing.forkserver")
    if forkserver is not None and getattr(forkserver._forkserver, "_forkserver_pid", None):
        pids.add(forkserver._forkserver._forkserver_pid)
    me = os.getpid()
    for pid, ppid in tree.items():
        if ppid == me and any(m in " ".join(_cmdline(pid)) for m in HELPER_CMDLINE_MARKERS):
            pids.add(pid)
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
        with contextlib.suppress(AttributeError, OSError):
            fds.add(listener._listener._socket.fileno())
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
        with contextlib.suppress(AttributeError):
            threads.update(worker._thread for worker in list(cache.THREAD_CACHE._idle_workers))
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

    Segment names are ``aioshm_<owner pid>_<random>``, so a test run next to another one on the
    same machine ignores the other run's segments. A name without a pid, or with a dead owner,
    counts as ours.
    """
    for token in os.path.basename(path)[len(SHM_PREFIX) :].split("_"):
        if token.isdigit():
            pid = int(token)
            return pid not in tree and _pid_alive(pid)
    return False


def _new_shm(before: set[str], shm_dir: str) -> list[str]:
    new = _shm_entries(shm_dir) - before
    if not new:
        return []
    tree = {os.getpid(), *_children(os.getpid())}
    return sorted(p for p in new if not _foreign_owner(p, tree))


def _describe(pid: int) -> str:
    cmdline = _cmdline(pid)  # a zombie has none
    return f"pid {pid} {cmdline!r}" if cmdline else f"pid {pid}"


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
            children=set(_children(os.getpid())),
            threads=set(threading.enumerate()),
            fds=_open_fds(shm_dir),
            shm=_shm_entries(shm_dir),
            shm_dir=shm_dir,
        )


# --------------------------------------------------------------------------- the checks


def _check_threads(base: _Snapshot, deadline: float, grace: float) -> list[str]:
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
            leaked.append(f"{thread.name} ({kind}) still running after {grace:g} s")
    return leaked


def _check_processes(base: _Snapshot, deadline: float, grace: float) -> list[str]:
    """Report new children; reap zombies and kill whatever is still alive after the grace."""
    multiprocessing.active_children()  # joins finished multiprocessing children
    tree = _children(os.getpid())
    helpers = _helper_pids(tree)
    kids = [pid for pid in tree if pid not in base.children and pid not in helpers]
    if not kids:
        return []
    leaked, live = [], []
    for pid in kids:
        st = _stat(pid)
        if st is None:
            continue
        if st[0] == "Z":
            leaked.append(f"zombie (exited, never reaped): {_describe(pid)}")
        else:
            live.append(pid)
    described = {pid: _describe(pid) for pid in live}
    # Wait for multiprocessing children through multiprocessing, so their objects learn the
    # exit code; everything else on pidfds.
    mp_children = {c.pid: c for c in multiprocessing.active_children()}
    for pid in live:
        if pid in mp_children:
            mp_children[pid].join(timeout=max(0.0, deadline - time.monotonic()))
    live = [p for p in live if p not in mp_children or mp_children[p].is_alive()]
    alive = _wait_exit(live, deadline)
    leaked += [f"still running after {grace:g} s, killed: {described[p]}" for p in alive]
    _kill(alive, grace)
    # Reap what we can (direct children); a zombie grandchild is its parent's to reap.
    _reap([p for p in kids if tree.get(p) == os.getpid() and p not in alive])
    return leaked


def _kill(pids: list[int], grace: float) -> None:
    if not pids:
        return
    wanted = set(pids)
    for child in multiprocessing.active_children():  # through multiprocessing, so it knows
        if child.pid in wanted:
            child.kill()
            child.join(timeout=grace)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_exit(pids, time.monotonic() + grace)
    _reap(pids)


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


@pytest.fixture
def aioshm_leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves a process, an aioshm segment, an fd or a thread behind.

    Only a test that passed is judged (a failed one keeps its frames, and their fds, alive in
    its traceback); stray processes are killed in every case. ``@pytest.mark.allow_leaks(...)``
    exempts kinds of leak.
    """
    allowed: set[str] = set()
    for marker in request.node.iter_markers("allow_leaks"):
        unknown = set(marker.args) - LEAK_KINDS
        if unknown:
            pytest.fail(f"allow_leaks: unknown kinds {sorted(unknown)}; use {sorted(LEAK_KINDS)}")
        allowed.update(marker.args)
    grace = _grace(request.config)
    base = _Snapshot.take()
    yield

    report = request.node.stash.get(_CALL_REPORT, None)
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
    deadline = time.monotonic() + grace
    problems: dict[str, list[str]] = {}
    if judged and "threads" not in allowed:
        problems["threads"] = _check_threads(base, deadline, grace)
    if "processes" not in allowed:
        problems["processes"] = _check_processes(base, deadline, grace)
    if judged and "shm" not in allowed:
        problems["shm"] = [f"new entry {p}" for p in _new_shm(base.shm, base.shm_dir)]
    if judged and "fds" not in allowed:
        problems["fds"] = _check_fds(base)
    lines = [f"  {kind}: {item}" for kind, items in problems.items() for item in items]
    if judged and lines:
        pytest.fail(
            "aioshm leak check failed; the test left behind:\n"
            + "\n".join(lines)
            + '\n(mark the test @pytest.mark.allow_leaks("<kind>") only if this is intended)',
            pytrace=False,
        )


@pytest.fixture(scope="session")
def aioshm_session_leak_check() -> Iterator[None]:
    """At the end of the session, no aioshm segment created during it may remain."""
    shm_dir = _shm_dir()
    before = _shm_entries(shm_dir)
    yield
    left = _new_shm(before, shm_dir)
    if left:
        pytest.fail(
            "aioshm shared-memory entries created during the session remain: " + ", ".join(left),
            pytrace=False,
        )
