"""Process queues: ``Queue``, ``JoinableQueue``, ``SimpleQueue`` (synchronous face, anyio-free).

The stdlib's blocking API and semantics, on a :class:`~aioshm._connection.RecordChannel`
instead of a pipe, two locks and a feeder thread:

* every item is one record on a ``SOCK_SEQPACKET`` socketpair, so any number of processes put
  and get with no cross-process lock, and a process killed mid-put or mid-get cannot wedge the
  queue for the others;
* ``put`` pickles and sends in the calling thread (no feeder thread): pickling errors raise
  from ``put`` itself, and a child's items are in the kernel when ``put`` returns, so joining
  a child before draining its queue cannot deadlock on a flush. The kernel buffer (a few MiB,
  about ten thousand items; large payloads are spilled to memfds) is the only buffer: an
  unbounded queue's ``put`` blocks only when that much is unconsumed;
* ``maxsize`` is enforced with a token pipe holding one byte per free slot, and ``qsize()``
  counts items with a second pipe (both approximate, as in the stdlib);
* ndarrays in shared memory travel as handles with their fds in the same record.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import queue as _queue
import struct
import termios
import time
import weakref
from collections.abc import Callable
from multiprocessing import context as _mp_context
from typing import Any, Final

from . import _reduction
from ._connection import RecordChannel, _wait, record_pair

__all__ = ("JoinableQueue", "Queue", "SimpleQueue")

try:
    from _multiprocessing import SemLock as _SemLock

    _SEM_VALUE_MAX: Final[int] = _SemLock.SEM_VALUE_MAX
except ImportError:  # pragma: no cover
    _SEM_VALUE_MAX = 2**31 - 1

_PIPE_MAX: Final = 1 << 20
_POLLIN: Final = 1


def _token_pipe(preload: int) -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) if hasattr(os, "pipe2") else os.pipe()
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _PIPE_MAX)
        except OSError:
            pass
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    if preload:
        os.write(w, b"\0" * preload)
    return r, w


def _pipe_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


def _close_fds(channels: list[RecordChannel], fds: list[int]) -> None:
    for ch in channels:
        ch.close()
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Queue:
    """A process-shared FIFO queue with the stdlib ``multiprocessing.Queue`` API."""

    def __init__(self, maxsize: int = 0, *, ctx: Any = None) -> None:
        if maxsize <= 0:
            maxsize = _SEM_VALUE_MAX
        self._maxsize = maxsize
        self._ctx = ctx if ctx is not None else multiprocessing.get_context()
        self._reader, self._writer = record_pair()
        bounded = maxsize <= _PIPE_MAX
        self._slots_r, self._slots_w = _token_pipe(maxsize) if bounded else (-1, -1)
        self._count_r, self._count_w = _token_pipe(0)
        self._closed = False
        self._after_init()

    def _after_init(self) -> None:
        self._finalizer = weakref.finalize(
            self,
            _close_fds,
            [self._reader, self._writer],
            [fd for fd in (self._slots_r, self._slots_w, self._count_r, self._count_w) if fd >= 0],
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} at {id(self):#x} maxsize={self._maxsize}>"

    # -- pickling: only while spawning a child, like the stdlib -----------------------------
    def __getstate__(self) -> dict[str, Any]:
        _mp_context.assert_spawning(self)
        fds = (self._slots_r, self._slots_w, self._count_r, self._count_w)
        return {
            "maxsize": self._maxsize,
            "reader": self._reader,
            "writer": self._writer,
            "fds": [_reduction.fd_ref(os.dup(fd), owned=True) if fd >= 0 else None for fd in fds],
            "extra": self._extra_state(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._maxsize = state["maxsize"]
        self._reader = state["reader"]
        self._writer = state["writer"]
        fds = [_reduction.take_fd(ref) if ref is not None else -1 for ref in state["fds"]]
        self._slots_r, self._slots_w, self._count_r, self._count_w = fds
        for fd in fds:
            if fd >= 0:
                os.set_blocking(fd, False)
        self._closed = False
        self._ctx = multiprocessing.get_context()
        self._set_extra_state(state["extra"])
        self._after_init()

    def _extra_state(self) -> Any:
        return None

    def _set_extra_state(self, state: Any) -> None:
        pass

    # -- accounting -------------------------------------------------------------------------
    def _take_slot(self, deadline: float | None) -> bool:
        if self._slots_r < 0:
            return True
        while True:
            try:
                if os.read(self._slots_r, 1):
                    return True
            except BlockingIOError:
                pass
            if not _wait(self._slots_r, _POLLIN, deadline):
                return False

    def _give_slot(self) -> None:
        if self._slots_w >= 0:
            try:
                os.write(self._slots_w, b"\0")
            except BlockingIOError:
                pass

    def _count_up(self) -> None:
        try:
            os.write(self._count_w, b"\0")
        except BlockingIOError:
            pass  # more than a pipe's worth of items: qsize() saturates

    def _count_down(self) -> None:
        try:
            os.read(self._count_r, 1)
        except BlockingIOError:
            pass

    def _check_closed(self) -> None:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    # -- the stdlib API ---------------------------------------------------------------------
    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` on the queue; block (up to ``timeout``) while it is full.

        :raises queue.Full: if no slot frees up in time (or at once, with ``block=False``).
        :raises ValueError: if the queue was closed in this process.
        """
        self._check_closed()
        record, fds, owned = self._writer.encode(obj)
        try:
            self._put_record(record, fds, block, timeout)
        finally:
            _reduction.close_owned(fds, owned)

    def _put_record(
        self, record: Any, fds: list[int], block: bool, timeout: float | None
    ) -> None:
        if not block:
            deadline: float | None = time.monotonic()
        elif timeout is None:
            deadline = None
        else:
            deadline = time.monotonic() + max(0.0, timeout)
        if not self._take_slot(deadline):
            raise _queue.Full
        self._count_up()
        try:
            while not self._writer.try_send_record(record, fds):
                if not _wait(self._writer.fileno(), 4, deadline):  # POLLOUT
                    raise _queue.Full
        except BaseException:
            self._count_down()
            self._give_slot()
            raise
        self._on_put()

    def _on_put(self) -> None:
        pass

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return an item; block (up to ``timeout``) while the queue is empty.

        :raises queue.Empty: if nothing arrives in time (or at once, with ``block=False``).
        :raises ValueError: if the queue was closed in this process.
        """
        self._check_closed()
        if not block:
            deadline: float | None = time.monotonic()
        elif timeout is None:
            deadline = None
        else:
            deadline = time.monotonic() + max(0.0, timeout)
        while True:
            got = self._reader.try_recv_record()
            if got is not None:
                break
            if not _wait(self._reader.fileno(), _POLLIN, deadline):
                raise _queue.Empty
        self._count_down()
        self._give_slot()
        return self._reader.decode(*got)

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, False)``."""
        self.put(obj, False)

    def get_nowait(self) -> Any:
        """``get(False)``."""
        return self.get(False)

    def qsize(self) -> int:
        """Approximate number of items in the queue."""
        self._check_closed()
        return _pipe_size(self._count_r)

    def empty(self) -> bool:
        """True if no item is waiting right now."""
        self._check_closed()
        return not self._reader.poll(0)

    def full(self) -> bool:
        """True if the queue holds ``maxsize`` items."""
        self._check_closed()
        if self._slots_r < 0:
            return False
        return _pipe_size(self._slots_r) == 0

    def close(self) -> None:
        """No more items from this process; release this process's end of the queue."""
        if self._closed:
            return
        self._closed = True
        self._reader.close()

    def join_thread(self) -> None:
        """Stdlib compatibility: there is no feeder thread, everything put is already sent."""
        assert self._closed, f"Queue {self!r} not closed"

    def cancel_join_thread(self) -> None:
        """Stdlib compatibility: nothing to cancel (no feeder thread)."""


class JoinableQueue(Queue):
    """A :class:`Queue` with ``task_done()`` and ``join()``, like the stdlib's."""

    def __init__(self, maxsize: int = 0, *, ctx: Any = None) -> None:
        super().__init__(maxsize, ctx=ctx)
        self._unfinished_tasks = self._ctx.Semaphore(0)
        self._cond = self._ctx.Condition()

    def _extra_state(self) -> Any:
        return (self._unfinished_tasks, self._cond)

    def _set_extra_state(self, state: Any) -> None:
        self._unfinished_tasks, self._cond = state

    def _put_record(
        self, record: Any, fds: list[int], block: bool, timeout: float | None
    ) -> None:
        with self._cond:
            self._unfinished_tasks.release()
        try:
            super()._put_record(record, fds, block, timeout)
        except BaseException:
            with self._cond:
                self._unfinished_tasks.acquire(False)
                if self._unfinished_tasks._semlock._is_zero():
                    self._cond.notify_all()
            raise

    def task_done(self) -> None:
        """Mark one item taken with ``get()`` as processed."""
        with self._cond:
            if not self._unfinished_tasks.acquire(False):
                raise ValueError("task_done() called too many times")
            if self._unfinished_tasks._semlock._is_zero():
                self._cond.notify_all()

    def join(self) -> None:
        """Block until every item put has been marked done."""
        with self._cond:
            if not self._unfinished_tasks._semlock._is_zero():
                self._cond.wait()


class SimpleQueue:
    """An unbounded queue with only ``put``, ``get``, ``empty`` and ``close`` (stdlib API)."""

    def __init__(self, *, ctx: Any = None) -> None:
        ctx = ctx if ctx is not None else multiprocessing.get_context()
        self._reader, self._writer = record_pair()
        self._rlock = ctx.Lock()  # used by multiprocessing.pool's shutdown helpers only
        self._wlock = None
        self._poll: Callable[..., bool] = self._reader.poll
        self._finalizer = weakref.finalize(self, _close_fds, [self._reader, self._writer], [])

    def __getstate__(self) -> tuple[Any, ...]:
        _mp_context.assert_spawning(self)
        return (self._reader, self._writer, self._rlock)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self._reader, self._writer, self._rlock = state
        self._wlock = None
        self._poll = self._reader.poll
        self._finalizer = weakref.finalize(self, _close_fds, [self._reader, self._writer], [])

    def empty(self) -> bool:
        """True if no item is waiting right now."""
        return not self._reader.poll(0)

    def close(self) -> None:
        """Close both ends in this process."""
        self._reader.close()
        self._writer.close()

    def get(self) -> Any:
        """Remove and return an item, blocking while the queue is empty."""
        return self._reader.recv()

    def put(self, obj: Any) -> None:
        """Put ``obj`` on the queue."""
        self._writer.send(obj)
