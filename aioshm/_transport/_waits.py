"""Waiting on fds from async code: single fds, and several fds at once through an epoll fd."""

from __future__ import annotations

import asyncio
import math
import os
import select
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel

sniffio: Any
try:
    import sniffio
except ImportError:  # anyio no longer installs it; trio brings it
    sniffio = None

__all__ = (
    "Locks",
    "LoopWatch",
    "MultiWait",
    "asyncio_loop",
    "current_async_library",
    "locks_of",
    "loop_watch_supported",
    "running_asyncio_loop",
)


class Locks:
    """Per-object async locks: one reader and one writer task at a time per event loop.

    anyio (trio in particular) allows one task at a time to wait on a given fd, so tasks of
    one process queue up here, in FIFO order, in front of the fd. They belong to the event
    loop that made them (``loop``: the asyncio loop, None under trio): an object awaited from
    another loop later (a new ``asyncio.run``, or trio) gets new ones.
    """

    __slots__ = ("__weakref__", "aio", "backend", "join", "loop", "read", "waits", "write")

    def __init__(self, loop: Any = None) -> None:
        self.loop = loop
        #: the asyncio loop if the tasks using these locks are asyncio tasks (not trio, even
        #: in guest mode on an asyncio host): their waits park on that loop's futures
        self.aio = asyncio_loop() if loop is not None else None
        #: anyio's backend class for the running library, looked up once instead of per call
        #: (``backend.checkpoint_if_cancelled()`` is ``anyio.lowlevel``'s without the sniffing)
        self.backend = _current_backend()
        # fast_acquire: an uncontended acquire does not yield (the waits below do)
        self.read = anyio.Lock(fast_acquire=True)
        self.write = anyio.Lock(fast_acquire=True)
        self.join = anyio.Lock(fast_acquire=True)
        self.waits: dict[str, MultiWait] = {}

    def wait_for(self, key: str, fds: list[tuple[int, int]]) -> MultiWait:
        """The cached :class:`MultiWait` for ``key`` (built from ``fds`` on first use)."""
        mw = self.waits.get(key)
        if mw is None:
            mw = self.waits[key] = MultiWait(fds, persistent=True, loop=self.aio)
        return mw

    def close(self) -> None:
        for mw in self.waits.values():
            mw.close()
        self.waits.clear()


def locks_of(obj: Any) -> Locks:
    """The :class:`Locks` of ``obj`` for the running event loop (made on first use; epoll fds
    closed with ``obj``, or when another loop takes over: one loop at a time per object)."""
    state = obj._async_state
    loop = running_asyncio_loop()  # None under trio
    if state is None or state.loop is not loop:
        if state is not None:
            state.close()
        state = obj._async_state = Locks(loop)
        weakref.finalize(obj, state.close)
    return state  # type: ignore[no-any-return]


class _LoopReader:
    """An fd kept registered with an asyncio loop (``add_reader``) from one wait to the next.

    A wait through ``anyio.wait_readable`` registers and unregisters its fd every time (two
    ``epoll_ctl`` calls and the selector's bookkeeping, ~10 µs on a VM); waits that follow each
    other on the same fd (a queue's consumer, a pool's results) pay that once. Only ever for
    an fd of our own (an epoll fd), closed through :meth:`close` so that the loop's selector
    never keeps a closed fd number. Everything but :meth:`close` runs in the loop's thread.
    """

    __slots__ = ("callback", "fd", "loop", "pid", "registered", "thread")

    def __init__(self, loop: Any, fd: int, callback: Callable[[], None]) -> None:
        self.loop = loop
        self.fd = fd
        self.callback = callback
        self.thread = threading.get_ident()
        self.pid = os.getpid()
        self.registered = False

    def serves(self, loop: Any) -> bool:
        return self.loop is loop and self.thread == threading.get_ident()

    def dead(self) -> bool:
        """Its loop is closed, or it was inherited by a forked child: never touch that loop."""
        return bool(self.loop.is_closed()) or self.pid != os.getpid()

    def start(self) -> None:
        if not self.registered:
            self.loop.add_reader(self.fd, self.callback)
            self.registered = True

    def stop(self) -> None:
        if self.registered:
            self.registered = False
            self.loop.remove_reader(self.fd)

    def close(self, then: Callable[[], None]) -> None:
        """Stop, then call ``then`` (which closes the fd): now, or in the loop's thread if it
        runs in another one (the fd must leave its selector before its number can be reused)."""
        if self.registered and not self.dead():
            if threading.get_ident() == self.thread:
                self.stop()
            else:
                try:
                    self.loop.call_soon_threadsafe(self._stop_then, then)
                    return
                except RuntimeError:  # the loop closed meanwhile
                    pass
        self.registered = False
        then()

    def _stop_then(self, then: Callable[[], None]) -> None:
        self.stop()
        then()


class MultiWait:
    """Wait until any of several fds is readable, with one ``wait_readable`` on an epoll fd.

    Cheaper than a task group per wait and exact: the epoll fd is readable exactly when one
    of its registered fds is. (kqueue fds are pollable the same way on macOS.) A ``persistent``
    one that is waited on again and again (a queue's, a connection's) keeps its epoll fd
    registered with an asyncio loop between waits (:class:`_LoopReader`) and parks each wait
    on a future.
    """

    __slots__ = ("_ep", "_fut", "_idle", "_loop", "_persistent", "_reader", "_waiting", "fds")

    def __init__(
        self, fds: list[tuple[int, int]], *, persistent: bool = False, loop: Any = None
    ) -> None:
        """``fds`` are ``(fd, select.POLLIN or select.POLLOUT)`` pairs. ``loop``: the asyncio
        loop every wait of a persistent one comes from (else it is looked up per wait)."""
        self.fds = list(fds)
        self._persistent = persistent and loop_watch_supported()
        self._loop = loop
        self._reader: _LoopReader | None = None
        self._fut: Any = None  # the parked wait (persistent, asyncio)
        self._idle = 0  # the reader's callbacks with no wait parked
        self._waiting = False  # a wait through anyio.wait_readable is on (trio, ...)
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

    async def wait(self, deadline: float = math.inf) -> bool:
        """Wait until an fd is ready (True) or ``deadline`` (``time.monotonic()``) passes
        (False). On asyncio, a persistent wait's deadline is a timer on its future, not a
        cancel scope: a consumer that always passes a timeout pays no scope per wait."""
        reader = self._loop_reader()
        if reader is not None:
            if self._fut is not None and not self._fut.done():
                raise anyio.BusyResourceError("waiting on")
            timer = None
            if deadline != math.inf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
            fut = self._fut = reader.loop.create_future()
            if deadline != math.inf:
                timer = reader.loop.call_later(remaining, _expire, fut)
            self._idle = 0
            reader.start()
            try:
                return bool(await fut)
            finally:
                self._fut = None
                if timer is not None:
                    timer.cancel()
        if deadline == math.inf:
            await self._wait_readable()
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        with anyio.move_on_after(remaining):
            await self._wait_readable()
            return True
        return False

    async def _wait_readable(self) -> None:
        self._waiting = True
        try:
            await anyio.wait_readable(self._ep.fileno())
        except anyio.ClosedResourceError:
            pass  # closed meanwhile (see close()): the caller finds its object closed
        finally:
            self._waiting = False

    def _loop_reader(self) -> _LoopReader | None:
        """The registration with the running asyncio loop a persistent wait parks on (made
        on first use); None when not persistent or not on asyncio."""
        if not self._persistent:
            return None
        reader = self._reader
        if reader is not None and self._loop is not None and reader.loop is self._loop:
            return reader  # the common case: the loop of our Locks (one thread)
        loop = self._loop or asyncio_loop()
        if loop is None:
            return None
        if reader is not None and not reader.serves(loop) and reader.dead():
            reader = self._reader = None  # its loop is gone: register with this one
        if reader is None:
            reader = self._reader = _LoopReader(loop, self._ep.fileno(), self._fire)
        return reader if reader.serves(loop) else None

    def _fire(self) -> None:
        fut = self._fut
        if fut is not None:
            self._fut = None
            if not fut.done():
                fut.set_result(True)
        elif self._reader is not None:
            # level-triggered: a callback may come once more before the woken task reads;
            # one more with nobody waiting means nobody is waiting any more
            self._idle += 1
            if self._idle >= 2:
                self._reader.stop()

    def ready(self) -> set[int]:
        """The registered fds that are ready now (one non-blocking syscall)."""
        if sys.platform.startswith("linux"):
            return {fd for fd, _ in self._ep.poll(0)}
        return {ev.ident for ev in self._ep.control(None, len(self.fds), 0)}  # pragma: no cover

    def close(self) -> None:
        """Close the epoll fd. A wait parked on it returns (its caller then finds its object
        closed) instead of waiting forever on an fd that is gone."""
        fut, self._fut = self._fut, None
        if fut is not None and self._reader is not None and not self._reader.dead():
            if threading.get_ident() == self._reader.thread:
                _resolve(fut)
            else:
                try:
                    self._reader.loop.call_soon_threadsafe(_resolve, fut)
                except RuntimeError:  # the loop closed meanwhile
                    pass
        if self._waiting and not self._ep.closed:
            try:  # wakes the waiting task (its library must be running in this thread)
                anyio.notify_closing(self._ep.fileno())
            except Exception:  # noqa: S110 - closed from elsewhere: nothing to wake from here
                pass
        if self._reader is not None:
            reader, self._reader = self._reader, None
            reader.close(self._ep.close)
        else:
            self._ep.close()


def _resolve(fut: Any) -> None:
    if not fut.done():
        fut.set_result(True)


def _expire(fut: Any) -> None:
    if not fut.done():
        fut.set_result(False)


class LoopWatch:
    """asyncio only (Linux): the event loop itself watches a set of fds and calls
    ``callback(ready_fds)`` from the loop whenever some are ready, like a protocol's reader.

    The fds sit in one epoll fd registered with the loop (:class:`_LoopReader`) for as long
    as the owner keeps the watch started, and the set is changed in place; a pool whose
    results come one at a time to a few awaiting tasks pays no registration per result.

    Everything but :meth:`close` runs in the loop's thread.
    """

    __slots__ = ("_callback", "_ep", "_fds", "_reader", "has_out", "key")

    def __init__(self, loop: Any, callback: Callable[[set[int]], None]) -> None:
        self._callback = callback
        self._ep = select.epoll()
        self._reader = _LoopReader(loop, self._ep.fileno(), self._fire)
        self._fds: dict[int, int] = {}  # fd -> epoll mask
        self.key: object = None  # of the watched set (see watch())
        self.has_out = False  # some fd is watched for writing

    @property
    def loop(self) -> Any:
        return self._reader.loop

    @property
    def thread(self) -> int:
        return self._reader.thread

    @property
    def started(self) -> bool:
        return self._reader.registered

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
        self._reader.start()

    def stop(self) -> None:
        self._reader.stop()

    def _fire(self) -> None:
        self._callback({fd for fd, _ in self._ep.poll(0)})

    def close(self) -> None:
        """Stop and close (from another thread: in the loop's thread, if it still runs)."""
        if not self._ep.closed:
            self._reader.close(self._ep.close)


class _PublicBackend:
    """``anyio.lowlevel``'s checkpoints, for an anyio whose backend classes are out of reach."""

    checkpoint_if_cancelled = staticmethod(anyio.lowlevel.checkpoint_if_cancelled)
    cancel_shielded_checkpoint = staticmethod(anyio.lowlevel.cancel_shielded_checkpoint)


def _current_backend() -> Any:
    """anyio's backend class for the running async library (what every ``anyio.lowlevel``
    call looks up through sniffio first): a private anyio helper, so any failure falls back
    to the public functions."""
    try:
        from anyio._core._eventloop import get_async_backend

        backend = get_async_backend()
        backend.checkpoint_if_cancelled  # noqa: B018 - both must be there
        backend.cancel_shielded_checkpoint  # noqa: B018
    except Exception:  # pragma: no cover - another anyio layout
        return _PublicBackend
    return backend


def loop_watch_supported() -> bool:
    return sys.platform.startswith("linux")


#: The asyncio loop running in this thread, if any (whatever the current task's library).
running_asyncio_loop: Callable[[], Any] = asyncio._get_running_loop


def current_async_library() -> str | None:
    """``"asyncio"``, ``"trio"`` or None: the async library of the current task, decided as anyio
    decides it. sniffio is optional (anyio no longer installs it; trio brings it): when it is
    missing there is no trio, so a running asyncio loop means asyncio."""
    if sniffio is None:
        return "asyncio" if running_asyncio_loop() is not None else None
    try:
        library: str = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None
    return library


def asyncio_loop() -> Any:
    """The running asyncio loop if the current task is an asyncio one (not trio, even in guest
    mode on an asyncio host), else None."""
    if current_async_library() != "asyncio":
        return None
    return asyncio.get_running_loop()


#: Large value copies made for an async send are done this many bytes at a time, yielding to
#: the event loop in between: a 512 MiB array never stalls the loop for one long copy.
COPY_CHUNK = 1 << 20


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
            # yield first: what woke this task (a reply, say) may have made a timer overdue
            await anyio.lowlevel.checkpoint()
            np.copyto(dst[start : start + step], src[start : start + step], casting="no")
