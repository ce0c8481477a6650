"""Small process helpers with no anyio in sight: parent-death handling, thread names, fd limits.

Everything here is safe to import in a freshly started child. Nothing here starts a thread in
the parent: :func:`arm_parent_death_watch` only ever starts its watcher thread in a process that
:mod:`multiprocessing` started (one that has a :func:`multiprocessing.parent_process`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = (
    "_get_thread_name",
    "_set_thread_name",
    "arm_parent_death_watch",
    "ensure_forkserver",
    "raise_fd_limit",
    "register_after_fork",
    "set_pdeathsig",
)

_IS_LINUX = sys.platform.startswith("linux")

# <linux/prctl.h>
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_GET_NAME = 16
_TASK_COMM_LEN = 16  # the kernel's buffer for a thread name, NUL included

# Upper bound for raise_fd_limit when the hard limit is unlimited (or absurdly high).
_FD_LIMIT_CAP = 1 << 20

#: How :func:`ensure_forkserver` tells :mod:`aioshm._fsmain`, in the fork server, which main
#: script to import (set only while the server is launched).
FORKSERVER_MAIN_ENV = "AIOSHM_FORKSERVER_MAIN"

_libc: ctypes.CDLL | None = None
_libc_loaded = False

_watch_lock = threading.Lock()
_watch_thread: threading.Thread | None = None


def _get_libc() -> ctypes.CDLL | None:
    """The C library with ``prctl`` (loaded once), or None when there is none to use."""
    global _libc, _libc_loaded
    if not _libc_loaded:
        _libc_loaded = True
        if _IS_LINUX:
            try:
                lib = ctypes.CDLL(
                    None, use_errno=True
                )  # the running libc; find_library runs ldconfig
                lib.prctl.restype = ctypes.c_int
                _libc = lib
            except (OSError, AttributeError):
                _libc = None
    return _libc


def _prctl(option: int, arg2: int | ctypes.Array[ctypes.c_char] | bytes) -> None:
    """Call ``prctl(option, arg2, 0, 0, 0)``; raise :class:`OSError` on failure."""
    libc = _get_libc()
    if libc is None:
        return
    zero = ctypes.c_ulong(0)
    second: object = ctypes.c_ulong(arg2) if isinstance(arg2, int) else arg2
    if libc.prctl(ctypes.c_int(option), second, zero, zero, zero) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent *thread* exits (Linux only).

    A no-op on other platforms. Note the kernel's notion of parent: the thread that created this
    process. A child started from a short-lived thread receives the signal when that thread
    exits, even though the parent process lives on.
    """
    if _IS_LINUX:
        _prctl(_PR_SET_PDEATHSIG, int(sig))


def _kill_self() -> None:
    """Die at once, without running any Python cleanup (the parent is gone: nobody listens)."""
    os.kill(os.getpid(), signal.SIGKILL)


def _sentinel_ready(sentinel: int) -> bool:
    """Whether the parent's sentinel fd is readable now (the parent's end has been closed)."""
    try:
        return bool(multiprocessing.connection.wait([sentinel], 0))
    except (OSError, ValueError):
        return False


def _watch_parent(sentinel: int) -> None:
    """Thread body: block until the parent's sentinel becomes readable, then kill this process."""
    try:
        multiprocessing.connection.wait([sentinel])
    except (OSError, ValueError):  # pragma: no cover - fd closed under us: nothing to watch
        return
    _kill_self()


def arm_parent_death_watch(expected_ppid: int | None = None) -> None:
    """Make this (child) process die with its parent.

    * Sets ``PR_SET_PDEATHSIG`` to SIGKILL (Linux), then re-checks ``os.getppid()``: if the
      parent already died before ``prctl`` took effect, the signal will never come, so the
      process kills itself. Pass ``expected_ppid`` when the direct parent's pid is known;
      otherwise the parent's sentinel (below) is polled once instead, which also catches it.
    * Under ``forkserver`` the direct parent is the fork server, not the process that asked for
      this child, so the death signal does not cover the real parent. Hence, when
      :func:`multiprocessing.parent_process` has a sentinel, one daemon thread waits on it and
      SIGKILLs this process when it becomes readable (the parent died). The thread is started
      at most once per process, and never in a process without a multiprocessing parent.
    """
    global _watch_thread
    parent = multiprocessing.parent_process()
    try:
        set_pdeathsig(signal.SIGKILL)
    except OSError:  # pragma: no cover - prctl refused: the sentinel watch still works
        pass
    if expected_ppid is not None and os.getppid() != expected_ppid:
        _kill_self()
    # Without an explicit expectation, a ppid other than the multiprocessing parent's pid means
    # either a forkserver child (whose parent is the fork server) or an orphan whose parent died
    # before prctl: the sentinel below tells the two apart.
    sentinel = parent.sentinel if parent is not None else None
    if sentinel is None:
        return
    if _sentinel_ready(sentinel):
        _kill_self()
    with _watch_lock:
        if _watch_thread is not None and _watch_thread.is_alive():
            return
        thread = threading.Thread(
            target=_watch_parent, args=(sentinel,), name="aioshm-parent-watch", daemon=True
        )
        thread.start()
        _watch_thread = thread


def _set_thread_name(name: str) -> None:
    """Set the calling thread's kernel name (``prctl(PR_SET_NAME)``, 15 bytes at most).

    Longer names are cut at a character boundary. A no-op off Linux.
    """
    if not _IS_LINUX:
        return
    raw = name.encode("utf-8")[: _TASK_COMM_LEN - 1]
    raw = raw.decode("utf-8", errors="ignore").encode("utf-8")
    _prctl(_PR_SET_NAME, ctypes.create_string_buffer(raw, _TASK_COMM_LEN))


def _get_thread_name() -> str:
    """The calling thread's kernel name (``prctl(PR_GET_NAME)``); ``""`` off Linux."""
    if not _IS_LINUX or _get_libc() is None:
        return ""
    buf = ctypes.create_string_buffer(_TASK_COMM_LEN)
    _prctl(_PR_GET_NAME, buf)
    return buf.value.decode("utf-8", errors="replace")


def register_after_fork(func: Callable[[], object]) -> None:
    """Run ``func()`` in the child after every ``os.fork()`` (torch's ``register_after_fork``)."""
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=func)
    else:  # pragma: no cover - Windows: only multiprocessing's own children
        import multiprocessing.util

        multiprocessing.util.register_after_fork(func, lambda f: f())


def stdlib_spawn() -> Any:
    """The stdlib's ``multiprocessing.spawn`` module, also where ``multiprocessing`` is aliased
    to ``aioshm.multiprocessing`` (the CPython-suite harness), whose ``spawn`` is torch's."""
    return importlib.import_module("multiprocessing.spawn")


def stdlib_forkserver_imports_main() -> bool:
    """Whether the stdlib's fork server imports the parent's main script itself.

    CPython fixed gh-126631 in 3.13.8 and 3.14: ``ForkServer.ensure_running`` looked for a
    ``main_path`` key that ``spawn.get_preparation_data`` never sets (it says
    ``init_main_from_path``), so the server never imported the script, and ignored the
    ``sys.path`` it was handed; since the fix it hands over the path, ``sys.path`` and
    ``sys.argv`` and imports the script, unguarded: a script that raises on import kills the
    server, and every later start fails with a connection error. Told by the fixed launcher's
    code (it names ``init_main_from_path``), not by the version number, so a backport counts.
    """
    from multiprocessing import forkserver

    code = getattr(forkserver.ForkServer.ensure_running, "__code__", None)
    return code is not None and "init_main_from_path" in code.co_consts


def ensure_forkserver() -> None:
    """Start the stdlib fork server if it is not running, with the parent's main script
    imported in it once, by :mod:`aioshm._fsmain` when that is among its preloads.

    :mod:`aioshm._fsmain` gets the path, ``sys.path`` and ``sys.argv`` (what a child sees when it
    runs the script) in an environment variable set only while the server is launched, and
    imports the script with its failures caught: a main script that raises (or exits) on
    import does not take the server down; its children then run it again and fail as spawn
    children would. Where the stdlib imports the script itself
    (:func:`stdlib_forkserver_imports_main`), its import is not guarded, so this launch leaves
    ``__main__`` out of the preload list and lets :mod:`aioshm._fsmain` do it; where it does not,
    children of a server aioshm did not start re-run the script, as the stdlib's did.
    """
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if getattr(server, "_forkserver_pid", None) is not None:
        return  # running (one that died is restarted by the stdlib, with the stdlib's preloads)
    preload = list(getattr(server, "_preload_modules", ()))
    data = stdlib_spawn().get_preparation_data("") if "aioshm._fsmain" in preload else {}
    if not data.get("init_main_from_path"):
        server.ensure_running()
        return
    main = {
        "path": data["init_main_from_path"],
        "sys_path": data["sys_path"],
        "argv": data["sys_argv"],
    }
    guarded = [m for m in preload if m != "__main__"]
    swap = guarded != preload and stdlib_forkserver_imports_main()
    old = os.environ.get(FORKSERVER_MAIN_ENV)
    os.environ[FORKSERVER_MAIN_ENV] = json.dumps(main)
    if swap:
        forkserver.set_forkserver_preload(guarded)
    try:
        server.ensure_running()
    finally:
        if swap and getattr(server, "_preload_modules", None) == guarded:  # unchanged since
            forkserver.set_forkserver_preload(preload)
        if old is None:
            os.environ.pop(FORKSERVER_MAIN_ENV, None)
        else:
            os.environ[FORKSERVER_MAIN_ENV] = old


def raise_fd_limit() -> None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (at most ``1 << 20``); ignore failures."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = _FD_LIMIT_CAP if hard == resource.RLIM_INFINITY else min(hard, _FD_LIMIT_CAP)
        if soft == resource.RLIM_INFINITY or soft >= target:
            return
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        pass


# --------------------------------------------------------------------------- fork and signals

_deferred_mask: set[int | signal.Signals] | None = None


@contextlib.contextmanager
def signals_deferred_over_fork() -> Iterator[None]:
    """Hold catchable signals back while the calling (main) thread forks.

    CPython runs Python after-fork callbacks (``logging``'s, aioshm's) inside ``os.fork()``;
    an exception a signal handler raises there is printed and dropped ("Exception ignored"),
    so a Ctrl-C during a fork start would be lost. Blocked signals stay pending and are
    handled right after, where the exception propagates. The child unblocks its copy of
    the mask in an after-fork hook before any of its own code runs.
    """
    global _deferred_mask
    if (
        not hasattr(signal, "pthread_sigmask")
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    catchable = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, catchable)
    _deferred_mask = old
    try:
        yield
    finally:
        _deferred_mask = None
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _restore_mask_in_child() -> None:
    global _deferred_mask
    if _deferred_mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, _deferred_mask)
        _deferred_mask = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_restore_mask_in_child)


# --------------------------------------------------------------------------- fork children

# Note [What a forked child must not hold]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# A child knows its parent is gone when the parent's end of a pipe reaches EOF: the sentinel
# read by ``arm_parent_death_watch`` (the parent keeps its write end, ``_parent_w`` of a
# forkserver popen, ``parent_w`` of a fork or spawn popen) and the fork server's keep-alive
# pipe (the server exits, and its children get PDEATHSIG, once every write end is closed).
# ``O_CLOEXEC`` does not help against ``fork``: a child forked later (``get_context("fork")``,
# the stdlib's default start method, a plain ``os.fork()``) inherits every one of those write
# ends, and as long as it lives no EOF comes, so ranks and workers would outlive a SIGKILLed
# parent. The hook below runs in every forked child, inside ``os.fork()`` and before any of
# the child's own code: it closes the parent-side fds of every process the parent started
# (cancelling the finalizers that would close those numbers again later, since another file
# may have them by then) and forgets the parent's fork server (closing its keep-alive fd), so
# the child starts its own server if it needs one; the stdlib's ``ensure_running`` could not
# use the parent's anyway (``waitpid`` on a process that is not its child fails).


def _parent_only_fds() -> list[tuple[object, list[int]]]:
    """``(finalizer, fds)`` for every started child's parent-side pipe ends."""
    from multiprocessing import process, util

    close_fds = getattr(util, "close_fds", None)
    found = []
    for child in list(getattr(process, "_children", ())):
        popen = getattr(child, "_popen", None)
        finalizer = getattr(popen, "finalizer", None)
        if finalizer is None or getattr(finalizer, "_callback", None) is not close_fds:
            continue
        fds = [fd for fd in getattr(finalizer, "_args", ()) if isinstance(fd, int)]
        found.append((finalizer, fds))
    return found


def _drop_parent_fds_in_child() -> None:
    """After ``fork`` in the child: close the parent's liveness fds (see the Note above)."""
    if "multiprocessing.util" in sys.modules:
        for finalizer, fds in _parent_only_fds():
            cancel = getattr(finalizer, "cancel", None)
            if callable(cancel):
                cancel()
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
    forkserver = sys.modules.get("multiprocessing.forkserver")
    server = getattr(forkserver, "_forkserver", None)
    alive = getattr(server, "_forkserver_alive_fd", None)
    if server is not None and alive is not None:
        with contextlib.suppress(OSError):
            os.close(alive)
        server._forkserver_alive_fd = None
        server._forkserver_pid = None
        server._forkserver_address = None  # the parent's socket: not ours to unlink
        if hasattr(server, "_forkserver_authkey"):  # 3.14
            server._forkserver_authkey = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_parent_fds_in_child)
