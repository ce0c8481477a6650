"""Awaiting processes: results, joins and stopping, all on fds (sentinels and result pipes)."""

from __future__ import annotations

import math
import os
import select
import socket
import time
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel

from .. import _reduction
from ._waits import MultiWait, locks_of

__all__ = ("join_async", "result_async", "stop_async", "wait_exit")

_IN = select.POLLIN


def _readable(fd: int) -> bool:
    p = select.poll()
    p.register(fd, _IN)
    return bool(p.poll(0))


async def wait_reapable(pid: int) -> None:
    """Wait until child ``pid`` can be reaped without blocking.

    A child closes its fds (so its sentinel turns readable) a moment *before* it becomes a
    zombie; a pidfd turns readable only once it is one. Without pidfds, the short wait
    happens in ``join()``.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return
    try:
        await anyio.wait_readable(pidfd)
    finally:
        os.close(pidfd)


async def wait_exit(proc: Any, timeout: float | None = None) -> bool:
    """Wait until ``proc`` has exited and reap it; False if ``timeout`` passed first."""
    if proc.exitcode is None:
        with anyio.move_on_after(math.inf if timeout is None else timeout):
            await anyio.wait_readable(proc.sentinel)
            # cancellable: a caller's cancel path kills and reaps
            await wait_reapable(proc.pid)
        if not _readable(proc.sentinel):
            return False
        proc.join(0)
        if proc.exitcode is None and (timeout is None or not _has_pidfd()):
            proc.join()  # no pidfd: the last microseconds of the child's exit
    return proc.exitcode is not None


def _has_pidfd() -> bool:
    return hasattr(os, "pidfd_open")


async def join_async(proc: Any, timeout: float | None) -> None:
    if proc._popen is None:
        raise AssertionError("can only join a started process")
    await anyio.lowlevel.checkpoint_if_cancelled()
    with anyio.move_on_after(math.inf if timeout is None else timeout):
        async with locks_of(proc).read:  # one waiter per fd: other awaiters queue here
            await wait_exit(proc)


async def stop_async(procs: Sequence[Any], grace_period: float) -> None:
    """SIGTERM, up to ``grace_period`` seconds, SIGKILL, reap: shielded from cancellation."""
    with anyio.CancelScope(shield=True):
        alive = [p for p in procs if p._popen is not None and p.exitcode is None]
        for p in alive:
            p.terminate()
        deadline = time.monotonic() + grace_period
        for p in alive:
            await wait_exit(p, max(0.0, deadline - time.monotonic()))
        for p in alive:
            if p.exitcode is None:
                p.kill()
        for p in alive:
            await wait_exit(p)


async def _receive_report(proc: Any, *, exited: bool) -> None:
    conn = proc._result_r
    if conn is None:
        return
    if exited:
        # everything the child wrote is there; a torn report must not block us
        try:
            while True:
                got = conn._next_frame()
                if got is not None:
                    proc._take_report(_reduction.loads(*got))
                    return
                conn._read_some(socket.MSG_DONTWAIT)
        except (BlockingIOError, EOFError, OSError):
            proc._take_report(None)
        except Exception as exc:  # a torn frame (ProtocolError), a report that cannot load
            proc._take_lost(exc)
        return
    try:
        report = await conn.recv_async()
    except (EOFError, OSError):
        proc._take_report(None)
    except Exception as exc:
        proc._take_lost(exc)
    else:
        proc._take_report(report)


async def result_async(proc: Any) -> Any:
    if proc._popen is None:
        proc.start()
    try:
        await anyio.lowlevel.checkpoint_if_cancelled()
        async with locks_of(proc).read:  # several tasks may await one process
            await _await_outcome(proc)
    except BaseException:
        await stop_async([proc], proc.grace_period)
        raise
    return proc._outcome()


async def _await_outcome(proc: Any) -> None:
    """Wait for the child's report (racing its sentinel), then for its exit; reap it."""
    if proc._result_r is not None:
        waiter = MultiWait([(proc._result_r.fileno(), _IN), (proc.sentinel, _IN)])
        try:
            while proc._result_r is not None:
                await waiter.wait()
                if _readable(proc.sentinel):
                    await _receive_report(proc, exited=True)
                elif _readable(proc._result_r.fileno()):
                    await _receive_report(proc, exited=False)
        finally:
            waiter.close()
    await wait_exit(proc)
