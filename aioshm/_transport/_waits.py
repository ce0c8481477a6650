"""Waiting on fds from async code: single fds, and several fds at once through an epoll fd."""

from __future__ import annotations

import select
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import anyio

__all__ = ("Locks", "LoopWatch", "MultiWait", "locks_of", "loop_watch_supported")


class Locks:
    """Per-object async locks: one reader and one writer task at a time per event loop.

    anyio (trio in particular) allows one task at a time to wait on a given fd, so tasks of
    one process queue up here, in FIFO order, in front of the fd.
    """

    __slots__ = ("__weakref__", "join", "read", "waits", "write")

    def __init__(self) -> None:
        # fast_acquire: an uncontended acquire does not yield (the waits below do)
        self.read = anyio.Lock(fast_acquire=True)
        self.write = anyio.Lock(fast_acquire=True)
        self.join = anyio.Lock(fast_acquire=True)
        self.waits: dict[str, MultiWait] = {}

    def wait_for(self, key: str, fds: list[tuple[int, int]]) -> MultiWait:
        """The cached :class:`MultiWait` for ``key`` (built from ``fds`` on first use)."""
        mw = self.waits.get(key)
        if mw is None:
            mw = self.waits[key] = MultiWait(fds)
        return mw

    def close(self) -> None:
        for mw in self.waits.values():
            mw.close()
        self.waits.clear()


def locks_of(obj: Any) -> Locks:
    """The :class:`Locks` of ``obj`` (made on first use; epoll fds closed with ``obj``)."""
    state = obj._async_state
    if state is None:
        state = obj._async_state = Locks()
        weakref.finalize(obj, state.close)
    return state  # type: ignore[no-any-return]


class MultiWait:
    """Wait until any of several fds is readable, with one ``wait_readable`` on an epoll fd.

    Cheaper than a task group per wait and exact: the epoll fd is readable exactly when one
    of its registered fds is. (kqueue fds are pollable the same way on macOS.)
    """

    __slots__ = ("_ep", "fds")

    def __init__(self, fds: list[tuple[int, int]]) -> None:
        """``fds`` are ``(fd, select.POLLIN or select.POLLOUT)`` pairs."""
        self.fds = list(fds)
        if sys.platform.startswith("linux"):
            self._ep: Any = select.epoll()
            for fd, events in self.fds:
                self._ep.register(
                    fd, select.EPOLLIN if events == select.POLLIN else select.EPOLLOUT
                )
        else:  # pragma: no cover - macOS
            self._ep = select.kqueue()
            self._ep.control(
                [
                    select.kevent(
                        fd,
                        select.KQ_FILTER_READ if ev == select.POLLIN else select.KQ_FILTER_WRITE,
                        select.KQ_EV_ADD,
                    )
                    for fd, ev in self.fds
                ],
                0,
            )

    async def wait(self) -> None:
        await anyio.wait_readable(self._ep.fileno())

    def ready(self) -> set[int]:
        """The registered fds that are ready now (one non-blocking syscall)."""
        if sys.platform.startswith("linux"):
            return {fd for fd, _ in self._ep.poll(0)}
        return {ev.ident for ev in self._ep.control(None, len(self.fds), 0)}  # pragma: no cover

    def close(self) -> None:
        self._ep.close()


class LoopWatch:
    """asyncio only (Linux): the event loop itself watches a set of fds and calls
    ``callback(ready_fds)`` from the loop whenever some are ready, like a protocol's reader.

    The fds sit in one epoll fd registered with the loop (``add_reader``) for as long as the
    owner keeps the watch started, and the set is changed in place. A wait through
    ``anyio.wait_readable`` registers and unregisters its fd every time (two ``epoll_ctl``
    calls and the selector's bookkeeping, ~10 µs on a VM); a pool whose results come one at a
    time to a few awaiting tasks pays that per result, this pays it once.

    Everything but :meth:`close` runs in the loop's thread.
    """

    __slots__ = ("_callback", "_ep", "_fds", "has_out", "key", "loop", "started", "thread")

    def __init__(self, loop: Any, callback: Callable[[set[int]], None]) -> None:
        self.loop = loop
        self.thread = threading.get_ident()
        self._callback = callback
        self._ep = select.epoll()
        self._fds: dict[int, int] = {}  # fd -> epoll mask
        self.key: object = None  # of the watched set (see watch())
        self.has_out = False  # some fd is watched for writing
        self.started = False

    def watch(self, key: object, fds: list[tuple[int, int]]) -> None:
        """Watch ``fds`` (``(fd, POLLIN or POLLOUT)`` pairs). A new ``key`` means fds may have
        been closed and their numbers reused: the set is rebuilt instead of diffed."""
        new: dict[int, int] = {}
        for fd, events in fds:
            new[fd] = new.get(fd, 0) | (
                select.EPOLLIN if events == select.POLLIN else select.EPOLLOUT
            )
        if key != self.key:
            for fd in self._fds:
                try:
                    self._ep.unregister(fd)
                except OSError:  # closed since: the kernel dropped it already
                    pass
            self._fds = {}
            self.key = key
        old = self._fds
        if new == old:
            return
        for fd in old.keys() - new.keys():
            try:
                self._ep.unregister(fd)
            except OSError:
                pass
        for fd, mask in new.items():
            if fd not in old:
                self._ep.register(fd, mask)
            elif old[fd] != mask:
                self._ep.modify(fd, mask)
        self._fds = new
        self.has_out = any(mask & select.EPOLLOUT for mask in new.values())

    def start(self) -> None:
        if not self.started:
            self.loop.add_reader(self._ep.fileno(), self._fire)
            self.started = True

    def stop(self) -> None:
        if self.started:
            self.started = False
            self.loop.remove_reader(self._ep.fileno())

    def _fire(self) -> None:
        self._callback({fd for fd, _ in self._ep.poll(0)})

    def close(self) -> None:
        """Stop and close (from another thread: in the loop's thread, if it still runs)."""
        if self._ep.closed:
            return
        if self.started and threading.get_ident() != self.thread and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.close)
                return
            except RuntimeError:  # the loop closed meanwhile
                pass
        if self.started and not self.loop.is_closed() and threading.get_ident() == self.thread:
            self.stop()
        self.started = False
        self._ep.close()


def loop_watch_supported() -> bool:
    return sys.platform.startswith("linux")


#: Large value copies made for an async send are done this many bytes at a time, yielding to
#: the event loop in between: a 512 MiB array never stalls the loop for one long copy.
COPY_CHUNK = 4 << 20


async def copy_in_chunks(copies: list[tuple[Any, Any]]) -> None:
    """Do the ``(dst, src)`` array copies the reducers deferred, yielding between chunks."""
    import anyio.lowlevel
    import numpy as np

    for dst, src in copies:
        if dst.flags.f_contiguous and not dst.flags.c_contiguous:
            dst, src = dst.T, src.T
        if dst.flags.c_contiguous and src.flags.c_contiguous:
            dst, src = dst.reshape(-1), src.reshape(-1)
        row = max(1, dst[0].nbytes if dst.ndim > 1 else dst.itemsize)
        step = max(1, COPY_CHUNK // row)
        for start in range(0, len(dst), step):
            np.copyto(dst[start : start + step], src[start : start + step], casting="no")
            await anyio.lowlevel.checkpoint()
