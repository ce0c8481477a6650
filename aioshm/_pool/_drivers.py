"""Driving a pool: who waits on its fds, and how awaiting tasks are woken.

Blocking callers, asyncio's event loop (a :class:`LoopWatch`) and trio's tasks each move the
pool's bytes by calling its ``_step``; this module holds those ways of waiting, and
:class:`_Waiter`, the parked state of a task that awaits while something else drives.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import select
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel

from .._transport._waits import (
    LoopWatch,
    MultiWait,
    asyncio_loop,
    loop_watch_supported,
    running_asyncio_loop,
)
from ._api import PoolAPI
from ._results import AsyncResult

__all__ = ("PoolDrivers",)


class _Waiter:
    """A task awaiting the pool while another task drives it (see ``_drive_until_async``).

    It parks on the cheapest primitive of its event loop: a bare future on asyncio (and
    uvloop), an ``anyio.Event`` elsewhere. A gathered batch of thousands of awaits makes one
    waiter each, and every object alive per await costs allocation and garbage-collector time.
    """

    __slots__ = ("_loop", "_parked", "done", "elected", "thread")

    def __init__(
        self, done: Callable[[], bool], loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        """``loop``: the running asyncio loop, if the caller knows it is on asyncio."""
        self.done = done
        self.elected = False  # woken to take over driving the pool
        self.thread = threading.get_ident()
        self._loop = loop if loop is not None else asyncio_loop()
        self._parked: Any = None
        self.rearm()

    def rearm(self) -> None:
        """Park again (after a wake-up that did not finish the wait)."""
        self._parked = self._loop.create_future() if self._loop is not None else anyio.Event()
        self.elected = False

    def is_set(self) -> bool:
        parked = self._parked
        return bool(parked.done() if self._loop is not None else parked.is_set())

    def wake(self) -> bool:
        """Wake the task; False if that cannot be done from this thread (an ``anyio.Event``
        of another thread's loop: the caller hands it to that loop's driver instead)."""
        parked = self._parked
        if self.thread != threading.get_ident():
            if self._loop is None:
                return False
            self._loop.call_soon_threadsafe(self.wake)
        elif self._loop is None:
            parked.set()
        elif not parked.done():  # a cancelled wait leaves a done future
            parked.set_result(None)
        return True

    def wait(self) -> Awaitable[Any]:
        parked: Any = self._parked
        return parked if self._loop is not None else parked.wait()  # type: ignore[no-any-return]


class PoolDrivers(PoolAPI):
    """The ways a pool is driven, on the state :class:`~aioshm._pool._pool.Pool` keeps.

    Blocking callers poll the pool's fds in their own thread (:meth:`_drive_until`); on
    asyncio the event loop watches them (:meth:`_loop_watch`, a :class:`LoopWatch`) and
    awaiting tasks park (:meth:`_await_watched`); elsewhere one awaiting task at a time
    drives, waiting on one epoll fd (:meth:`_drive`), and hands over to the next.
    """

    _mutex: threading.RLock
    _generation: int
    _pending: collections.deque[Any]
    _wake_r: int
    _wake_w: int
    _woken: bool
    _parked: int
    _driving: bool
    _driver_thread: int
    _followers: dict[_Waiter, None]
    _generic: list[_Waiter]
    _foreign: collections.deque[_Waiter]
    _waiter: MultiWait | None
    _waiter_key: tuple[int, list[tuple[int, int]]] | None
    _watch: LoopWatch | None
    _watching: int
    _watch_idle: int

    def _step(self, ready: set[int] | None = None) -> None:
        raise NotImplementedError

    def _wait_fds(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    #: results are asyncio Future-like objects (the loop drives the pool; see _loop_watch)
    _future_like = True

    def _wake(self) -> None:
        """Wake whoever is parked waiting on the pool's fds."""
        with self._mutex:
            if self._woken or self._wake_w < 0:
                return
            self._woken = True
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass

    def _notify(self, waiter: _Waiter) -> None:
        """Wake an awaiting task (from the thread of its event loop, or through the driver)."""
        if not waiter.wake():
            self._foreign.append(waiter)
            self._wake()

    def _refresh_watch(self) -> None:
        """Keep the loop's watch of the pool's fds current after a step (under the mutex).

        The rule: while a :class:`LoopWatch` is started, it watches the fds of the workers
        there are now. A step that changed them (a worker started or removed) or that may
        have changed what waits for room to be sent, and that is not the loop's own
        callback, must bring the watch up to date, because it may have eaten the wake-up
        byte that would have made the loop's callback do it. (A blocking ``get`` right after
        a cancel-kill did, and the next await parked for ever on the dead worker's fds.) In
        the loop's thread the watch is changed here; from another thread a new wake-up byte
        makes the loop's callback change it.
        """
        watch = self._watch
        if watch is None or not watch.started:
            return
        stale = watch.key != self._generation
        if not (stale or self._pending or watch.has_out):
            return
        if watch.thread == threading.get_ident():
            watch.watch(self._generation, self._wait_fds())
        elif stale:
            self._wake()

    # -- driving: blocking face ---------------------------------------------------------------
    def _drive_until(self, done: Callable[[], bool], timeout: float | None) -> None:
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        ready: set[int] | None = None
        while True:
            self._step(ready)
            if done():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            poller = select.poll()
            with self._mutex:
                fds = self._wait_fds()
                self._parked += 1
            try:
                for fd, events in fds:
                    poller.register(fd, events)
                got = poller.poll(None if remaining == math.inf else max(1, int(remaining * 1000)))
            finally:
                with self._mutex:
                    self._parked -= 1
            ready = {fd for fd, _ in got}

    # -- driving: async face ------------------------------------------------------------------
    async def _drive_until_async(
        self, done: Callable[[], bool], result: AsyncResult | None = None
    ) -> None:
        """Return once ``done()``: drive the pool, or wait while another task drives it.

        One awaiting task at a time drives the pool: it waits on one epoll fd covering every
        result channel and sentinel, reads what arrived and wakes the tasks whose results
        came (each waits on an ``anyio.Event`` of its own). When it is done it hands driving
        over to the oldest task still waiting.

        It is a checkpoint like any anyio call, without paying for a separate one when it
        waits anyway: the waits below are cancellation points; only a return without waiting
        passes through ``checkpoint()``.
        """
        if done():
            await anyio.lowlevel.checkpoint()
            return
        if result is not None:
            loop = asyncio_loop()
            if loop is not None and self._loop_watch(loop) is not None:
                await self._await_watched(done, result, loop)
                return
        waiter: _Waiter | None = None
        try:
            while True:
                if not self._driving:
                    if waiter is not None:
                        waiter.elected = False
                    self._driving = True
                    self._driver_thread = threading.get_ident()
                    try:
                        waited = await self._drive(done)
                    finally:
                        self._driving = False
                        self._elect()
                    if not waited and waiter is None:
                        await anyio.lowlevel.checkpoint()
                    return
                if waiter is None:
                    waiter = _Waiter(done)
                    self._followers[waiter] = None
                    if result is None:
                        self._generic.append(waiter)
                    else:
                        result._add_waiter(waiter)
                await waiter.wait()
                if done():
                    return
                waiter.rearm()
        finally:
            if waiter is not None:
                self._followers.pop(waiter, None)
                if result is None:
                    self._generic.remove(waiter)
                else:
                    result._remove_waiter(waiter)
                if waiter.elected and not self._driving:
                    self._elect()  # it was asked to drive but leaves: ask the next one

    def _watch_for(self, result: AsyncResult, loop: asyncio.AbstractEventLoop) -> bool:
        if running_asyncio_loop() is loop and self._loop_watch(loop) is not None:
            self._watching += 1  # the loop drives the pool until the result is ready
            return True
        return super()._watch_for(result, loop)  # a task drives it

    def _unwatch(self) -> None:
        self._watching -= 1

    # -- driving: asyncio ------------------------------------------------------------------------
    def _loop_watch(self, loop: asyncio.AbstractEventLoop) -> LoopWatch | None:
        """On asyncio the event loop drives the pool: a :class:`LoopWatch` steps it whenever
        one of its fds is ready, and a task awaiting a result just parks until it is woken.
        No task drives, so no driving is handed over from task to task (a few tasks awaiting
        one result each, as ``run_sync`` does, paid a hand-over and a fresh wait per result).

        The started watch, current; None where it cannot serve (no epoll, a closed pool, or a
        watch owned by the loop of another thread): those awaits take the driving path.
        """
        with self._mutex:
            watch = self._watch
            if watch is not None and watch.loop is not loop and watch.loop.is_closed():
                self._drop_watch()  # the pool outlived the loop that watched it
                watch = None
            if watch is None:
                if not loop_watch_supported() or self._wake_r < 0:
                    return None
                watch = self._watch = LoopWatch(loop, self._on_loop_ready)
            elif watch.loop is not loop or watch.thread != threading.get_ident():
                return None
            if not watch.started:
                watch.watch(self._generation, self._wait_fds())
                watch.start()
                self._parked += 1
            elif watch.key != self._generation:  # see _refresh_watch
                watch.watch(self._generation, self._wait_fds())
            self._watch_idle = 0
            return watch

    def _on_loop_ready(self, ready: set[int]) -> None:
        """The loop's callback when some of the pool's fds are ready."""
        self._step(ready)
        with self._mutex:
            watch = self._watch
            if watch is None or not watch.started:
                return
            if not self._watching:
                self._watch_idle += 1
                if self._watch_idle >= 2:  # nobody awaits through it any more: stop watching
                    watch.stop()
                    self._parked -= 1
                    return

    async def _await_watched(
        self, done: Callable[[], bool], result: AsyncResult, loop: asyncio.AbstractEventLoop
    ) -> None:
        # a scope cancelled before the await raises, even if the result comes first
        await anyio.lowlevel.checkpoint_if_cancelled()
        if done():
            return
        waiter = _Waiter(done, loop)
        result._add_waiter(waiter)
        self._watching += 1
        try:
            while True:
                await waiter.wait()
                if done():
                    return
                waiter.rearm()
        finally:
            self._watching -= 1
            result._remove_waiter(waiter)

    def _elect(self) -> None:
        """Hand driving over to the oldest waiting task that is not already woken."""
        for waiter in self._followers:
            if not waiter.is_set():
                waiter.elected = True
                self._notify(waiter)
                return

    async def _drive(self, done: Callable[[], bool]) -> bool:
        """Drive the pool until ``done()``; return whether it had to wait."""
        ready: set[int] | None = None
        waited = False
        while True:
            self._step(ready)
            if self._foreign:  # woken from another thread (an anyio.Event of another
                # thread's loop stays for that loop's own driver)
                keep = [waiter for waiter in self._foreign if not waiter.wake()]
                self._foreign.clear()
                self._foreign.extend(keep)
            for waiter in self._generic:
                if waiter.done():
                    waiter.wake()
            if done():
                return waited
            with self._mutex:
                # fd numbers are reused by replacement workers: key on the generation too
                key = (self._generation, self._wait_fds())
                if self._waiter is None or self._waiter_key != key:
                    if self._waiter is not None:
                        self._waiter.close()
                    self._waiter = MultiWait(key[1])
                    self._waiter_key = key
                multi = self._waiter
                self._parked += 1
            try:
                waited = True
                await multi.wait()
            finally:
                with self._mutex:
                    self._parked -= 1
            ready = multi.ready() if self._waiter is multi else None

    def _drop_watch(self) -> None:
        if self._watch is not None:
            if self._watch.started:
                self._parked -= 1
            self._watch.close()
            self._watch = None
