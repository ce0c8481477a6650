"""Importable targets for ``test_spawn_sync.py`` (children under spawn/forkserver import them).

Every target takes the rank first. Targets that must outlive a failing sibling block in
:func:`block_forever` until the parent terminates them; targets that must wait for a sibling
synchronise through a pipe (EOF once every other holder of the write end is gone), never by
sleeping.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import resource
import signal
import sys
import threading
from multiprocessing.connection import Connection

import psutil


class UnpicklableError(Exception):
    """Cannot be pickled at all: it carries a lock."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.lock = threading.Lock()


class BadInitError(Exception):
    """Pickles, but cannot be rebuilt: ``__init__`` wants two arguments, ``args`` holds one."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a} and {b}")


def _refuse_to_load() -> None:
    raise RuntimeError("this object cannot be rebuilt in the parent")


class FailsToLoad:
    """Pickles fine; unpickling raises RuntimeError."""

    def __reduce__(self) -> tuple[object, ...]:
        return (_refuse_to_load, ())


def block_forever() -> None:
    """Block until a signal kills this process (SIGTERM's default action does)."""
    while True:
        signal.pause()


def wait_for_eof(reader: Connection, writer: Connection) -> None:
    """Drop this process's copy of ``writer``, then block until every other copy is closed."""
    writer.close()
    try:
        reader.recv()
    except EOFError:
        pass
    finally:
        reader.close()


def success(rank: int) -> None:
    """Do nothing, successfully."""


def return_rank(rank: int, offset: int) -> tuple[int, int, int]:
    """Return ``(rank, rank + offset, pid)``."""
    return rank, rank + offset, os.getpid()


def return_blob(rank: int, nbytes: int) -> bytes:
    """Return ``nbytes`` bytes (bigger than a pipe buffer when ``nbytes`` is large)."""
    return bytes([rank]) * nbytes


def raise_big(rank: int, nbytes: int) -> None:
    """Raise a ValueError whose message (and so traceback) is ``nbytes`` long."""
    raise ValueError("x" * nbytes)


def exception_single(rank: int, failing_rank: int) -> None:
    """``failing_rank`` raises; the others block until terminated."""
    if rank == failing_rank:
        raise ValueError(f"legitimate exception from process {rank}")
    block_forever()


def exception_all(rank: int) -> None:
    """Every rank raises."""
    raise ValueError(f"legitimate exception from process {rank}")


def terminate_signal(rank: int) -> None:
    """Rank 0 aborts (SIGABRT, no core file); the others block until terminated."""
    if rank == 0:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        faulthandler.disable()  # a forked child inherits the test runner's, which would dump
        os.abort()
    block_forever()


def terminate_exit(rank: int, reader: Connection, writer: Connection, sibling_waits: bool) -> None:
    """Rank 0 calls ``sys.exit(123)``.

    The others either wait until rank 0 is gone and then return (``sibling_waits``), or block
    until terminated.
    """
    if rank == 0:
        sys.exit(123)
    if sibling_waits:
        wait_for_eof(reader, writer)
    else:
        block_forever()


def success_first_then_exception(rank: int, reader: Connection, writer: Connection) -> str:
    """Rank 0 returns; rank 1 raises once rank 0 is gone."""
    if rank == 0:
        return "rank 0 done"
    wait_for_eof(reader, writer)
    raise ValueError("legitimate exception from process 1, after process 0 exited")


def keyboard_interrupt(rank: int) -> None:
    """Rank 0 raises KeyboardInterrupt; the others block until terminated."""
    if rank == 0:
        raise KeyboardInterrupt
    block_forever()


def block(rank: int) -> None:
    """Block until terminated."""
    block_forever()


def wait_for_release(rank: int, reader: Connection, writer: Connection) -> int:
    """Block until the parent (and every sibling) dropped ``writer``, then return the rank."""
    wait_for_eof(reader, writer)
    return rank


def raise_custom(rank: int, kind: str) -> None:
    """Raise an exception that cannot travel back as itself."""
    if kind == "unpicklable":
        raise UnpicklableError(f"unpicklable from process {rank}")
    raise BadInitError(f"bad init from process {rank}", "more")


def return_unpicklable(rank: int) -> object:
    """Return a lock, which cannot be pickled."""
    return threading.Lock()


def return_fails_to_load(rank: int) -> object:
    """Return an object that pickles in the child but cannot be rebuilt in the parent."""
    return FailsToLoad()


def child_facts(rank: int) -> dict[str, object]:
    """Facts the parent checks: thread names, pid, command line (spawn vs fork)."""
    return {
        "threads": [t.name for t in threading.enumerate()],
        "pid": os.getpid(),
        "cmdline": psutil.Process().cmdline(),
    }


def signal_parent_then_block(rank: int, sig: int) -> None:
    """Rank 0 sends ``sig`` to the parent; every rank then blocks until terminated."""
    if rank == 0:
        parent = multiprocessing.parent_process()
        assert parent is not None and parent.pid is not None
        os.kill(parent.pid, sig)
    block_forever()


def report_pid_then_block(rank: int, conn: Connection) -> None:
    """Send this process's pid (the parent-death watch is armed by now), then block."""
    conn.send(os.getpid())
    conn.close()
    block_forever()
