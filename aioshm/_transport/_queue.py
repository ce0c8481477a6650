"""Async twins of the queue methods: every wait is one ``wait_readable`` on an epoll fd that
watches the data fd (or the slot pipe) together with the queue's shutdown pipe."""

from __future__ import annotations

import math
import queue as _queue
import select
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.lowlevel

from .. import _reduction
from .._exceptions import ProtocolError, QueueShutDown
from .._queues import NO_SLOT, PUT
from ._waits import copy_in_chunks, locks_of

if TYPE_CHECKING:
    from .._connection import RecordChannel
    from .._queues import JoinableQueue, Queue, SimpleQueue

__all__ = (
    "get_async",
    "get_many_async",
    "iterate",
    "join_async",
    "put_async",
    "simple_get_async",
    "simple_put_async",
)

_IN, _OUT = select.POLLIN, select.POLLOUT
T = TypeVar("T")


def _deadline(block: bool, timeout: float | None) -> float:
    if not block:
        return -math.inf
    if timeout is None:
        return math.inf
    return time.monotonic() + max(0.0, timeout)


async def _wait_until(waiter: Any, deadline: float) -> bool:
    """Wait on ``waiter`` until ``deadline`` (monotonic); False if the deadline passed."""
    return bool(await waiter.wait(deadline))


async def put_async(q: Queue, obj: Any, block: bool, timeout: float | None) -> None:
    q._check_put()
    copies: list[Any] = []
    record, fds, owned = q._writer.encode(obj, copies)
    try:
        if copies:
            await copy_in_chunks(copies)
        locks = locks_of(q)
        await locks.backend.checkpoint_if_cancelled()
        # fast path, like loop.sock_sendall: no other task of ours is putting, and the item
        # goes out at once (nothing awaits in between)
        if not locks.write.locked() and q._try_put(record, fds) == PUT:
            return
        deadline = _deadline(block, timeout)
        async with locks.write:
            await locks.backend.checkpoint_if_cancelled()
            # like loop.sock_sendall: no yield when the item goes out at once. An attempt
            # holds no token when it returns, so a cancelled or killed put holds nothing
            while True:
                outcome = q._try_put(record, fds)
                if outcome == PUT:
                    break
                if q._counts.shut_down:
                    raise QueueShutDown(f"Queue {q!r} is shut down")
                if outcome == NO_SLOT:
                    if q._settle():
                        continue  # capacity a killed process took is back
                    waiter = locks.wait_for("slot", [(q._slots_r, _IN), (q._shut_r, _IN)])
                else:
                    waiter = locks.wait_for("room", [(q._writer.fileno(), _OUT), (q._shut_r, _IN)])
                if not await _wait_until(waiter, deadline):
                    raise _queue.Full
    finally:
        _reduction.close_owned(fds, owned)


#: A get that finds its item already there does not yield, like ``loop.sock_recv``; every
#: this many such calls in a row it does, so a busy queue cannot starve the event loop.
_FAIRNESS = 16


async def _take(q: Queue, block: bool, timeout: float | None, take: Callable[[], T | None]) -> T:
    """Wait (as ``get``) until ``take()`` returns something, and return it."""
    q._check_closed()
    locks = locks_of(q)
    await locks.backend.checkpoint_if_cancelled()
    if not locks.read.locked():
        got = take()  # fast path: nothing awaits between taking it and returning it
        if got is not None:
            q._eager = eager = q._eager + 1
            if eager >= _FAIRNESS:
                q._eager = 0
                await locks.backend.cancel_shielded_checkpoint()
            return got
        tried = True  # and the lock was free: taking it below does not yield
    else:
        tried = False
    q._eager = 0
    deadline = _deadline(block, timeout)
    waited = False
    lock = locks.read
    if tried:
        lock.acquire_nowait()  # free (checked above, nothing awaited since): no checkpoint
    else:
        await lock.acquire()
        await locks.backend.checkpoint_if_cancelled()  # we queued for the lock
    try:
        while True:
            if not tried:
                if waited:
                    q._check_closed()  # closed by another task while this one waited
                got = take()
                if got is not None:
                    break
                # the wait watches the shutdown pipe too: check it first only after a wait
                # (and before the first one, for a non-blocking get)
                if (waited or deadline == -math.inf) and q._counts.shut_down:
                    raise QueueShutDown(f"Queue {q!r} is shut down and empty")
            tried = False
            waiter = locks.wait_for("item", [(q._reader.fileno(), _IN), (q._shut_r, _IN)])
            if not await _wait_until(waiter, deadline):
                q._settle()
                if q._counts.shut_down:
                    raise QueueShutDown(f"Queue {q!r} is shut down and empty")
                raise _queue.Empty
            waited = True
    finally:
        lock.release()
    if not waited:
        # the record is ours now: yield without a cancellation point, so it cannot be lost
        await locks.backend.cancel_shielded_checkpoint()
    return got


async def get_async(q: Queue, block: bool, timeout: float | None) -> Any:
    return q._reader.decode(*await _take(q, block, timeout, q._try_get))


async def get_many_async(q: Queue, max_items: int, block: bool, timeout: float | None) -> list[Any]:
    q._check_batch(max_items)
    return await _take(q, block, timeout, partial(q._take_some, max_items))


async def iterate(q: Queue) -> AsyncIterator[Any]:
    while True:
        try:
            item = await get_async(q, True, None)
        except QueueShutDown:
            return
        yield item


async def join_async(q: JoinableQueue) -> None:
    locks = locks_of(q)
    async with locks.join:
        await anyio.lowlevel.checkpoint_if_cancelled()
        while not q._all_done():
            await locks.wait_for("done", [(q._done_r, _IN)]).wait()
    await anyio.lowlevel.cancel_shielded_checkpoint()


async def _channel_recv(ch: RecordChannel, lock: anyio.Lock) -> Any:
    async with lock:
        await anyio.lowlevel.checkpoint_if_cancelled()
        while True:
            got = ch.try_recv_record()
            if got is not None:
                break
            await anyio.wait_readable(ch.fileno())
    await anyio.lowlevel.cancel_shielded_checkpoint()
    return ch.decode(*got)


async def _channel_send(ch: RecordChannel, obj: Any, lock: anyio.Lock) -> None:
    copies: list[Any] = []
    record, fds, owned = ch.encode(obj, copies)
    try:
        await copy_in_chunks(copies)
        async with lock:
            await anyio.lowlevel.checkpoint_if_cancelled()
            while not ch.try_send_record(record, fds):
                await anyio.wait_writable(ch.fileno())
    finally:
        _reduction.close_owned(fds, owned)
    await anyio.lowlevel.cancel_shielded_checkpoint()


async def simple_get_async(q: SimpleQueue) -> Any:
    try:
        return await _channel_recv(q._reader, locks_of(q).read)
    except EOFError:  # this process holds a writer: not the end of the stream
        raise ProtocolError("received an empty record") from None


async def simple_put_async(q: SimpleQueue, obj: Any) -> None:
    await _channel_send(q._writer, obj, locks_of(q).write)
