"""Pool results: ``AsyncResult`` (awaitable, an asyncio Future-like object), ``MapResult``,
the ``imap`` iterator, and the statistics and progress types.

They hold no pool state: they drive their pool (blocking ``get``/``wait``, ``await``) through
the methods of :class:`~aioshm._pool._api.PoolAPI`.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
import multiprocessing
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Self, cast

import anyio
import anyio.lowlevel

from .._exceptions import (
    TaskCancelled,
)
from .._transport._waits import (
    running_asyncio_loop,
)

if TYPE_CHECKING:
    from typing_extensions import TypeVar

    from ._api import PoolAPI
    from ._drivers import _Waiter

    #: What a result gives (``await r``, ``r.get()``); ``Any`` for a bare ``AsyncResult``.
    ResultT = TypeVar("ResultT", default=Any)
else:
    from typing import TypeVar

    ResultT = TypeVar("ResultT")  # TypeVar(default=...) needs Python 3.13

__all__ = ("AsyncResult", "IMapIterator", "MapResult", "PoolStatistics", "ProgressEvent")


@dataclass(frozen=True)
class PoolStatistics:
    """A snapshot of a pool (``Pool.statistics()``)."""

    idle_workers: int
    busy_workers: int
    tasks_pending: int
    tasks_running: int
    tasks_done: int
    workers_replaced: int
    live_segments: int
    live_segment_bytes: int


@dataclass(frozen=True)
class ProgressEvent:
    """Progress of a long pool operation: ``done`` of ``total`` items finished.

    Every operation over many items takes ``on_progress=callback``: ``map``, ``starmap``,
    ``map_async``, ``starmap_async``, ``imap`` and ``imap_unordered``. The callback gets an event
    each time a chunk finishes in a worker (``done`` counts items the workers finished, not
    items the caller consumed; it grows to ``total`` unless an item raises). It runs where
    other callbacks run: in whichever thread, task or loop callback drives the pool. A
    ``map_async`` result also has ``async for event in result.progress()``.

    ``total`` is the number of items: always known for the ``map`` family (which reads the
    whole iterable first); for ``imap`` it is ``len(iterable)`` when the iterable has one, else
    ``None`` until the iterable is exhausted (then the count of its items).
    """

    done: int
    total: int | None


# --------------------------------------------------------------------------- results


class AsyncResult(Generic[ResultT]):
    """The stdlib's ``AsyncResult`` (``get``, ``wait``, ``ready``, ``successful``), awaitable:
    ``await result`` and ``result.get()`` give the function's return value (``ResultT``).

    On asyncio it is also a Future-like object (asyncio's duck-typed future protocol:
    ``done``, ``result``, ``exception``, ``add_done_callback``, ``cancel``…), so
    ``asyncio.gather``, ``wait``, ``wait_for``, ``shield`` and ``as_completed`` take it as it
    is, with a done callback, instead of wrapping every result in a Task: the event loop
    already drives the pool (see :meth:`Pool._loop_watch`). ``cancel()`` does what cancelling
    an ``await`` of it does (see ``apply_async``'s ``cancellable``).
    """

    def __init__(
        self,
        pool: PoolAPI,
        callback: Callable[[ResultT], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> None:
        self._pool = pool
        self._callback = callback
        self._error_callback = error_callback
        self._value: ResultT = cast("ResultT", None)  # set (once) with _ready
        self._error: BaseException | None = None
        self._ready = False
        self._jobs: set[Any] = set()  # the pool's jobs for it
        self._waiters: list[_Waiter] | None = None  # tasks awaiting it (not driving the pool)
        # the asyncio future protocol
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done_callbacks: list[tuple[Callable[[Any], object], contextvars.Context]] | None = (
            None
        )
        self._cancelled = False
        self._cancel_message: str | None = None
        self._watched = False  # counted among what keeps the pool's LoopWatch running

    def ready(self) -> bool:
        return self._ready

    def successful(self) -> bool:
        if not self._ready:
            raise ValueError(f"{self!r} not ready")
        return self._error is None

    def wait(self, timeout: float | None = None) -> None:
        """Block until the result is ready or ``timeout`` passes (driving the pool)."""
        self._pool._drive_until(self.ready, timeout)

    def get(self, timeout: float | None = None) -> ResultT:
        """Block for the value; re-raise the task's exception. ``multiprocessing.TimeoutError``."""
        self.wait(timeout)
        if not self._ready:
            raise multiprocessing.TimeoutError
        if self._error is not None:
            raise self._error
        return self._value

    def _finish(self, value: Any = None, error: BaseException | None = None) -> None:
        if self._ready:
            return
        self._value, self._error, self._ready = value, error, True
        if self._jobs:
            for job in list(self._jobs):
                self._pool._forget(job)
            self._jobs.clear()
        for waiter in self._waiters or ():
            self._pool._notify(waiter)
        if self._watched:
            self._watched = False
            self._pool._unwatch()
        try:
            if error is None and self._callback is not None:
                self._callback(value)
            elif error is not None and self._error_callback is not None:
                self._error_callback(error)
        finally:
            if self._done_callbacks:
                self._schedule_done_callbacks()

    # -- asyncio's future protocol -------------------------------------------------------------
    @property
    def _asyncio_future_blocking(self) -> bool | None:
        """asyncio's mark of a future (None: not one; then asyncio wraps it in a Task)."""
        return False if self._pool._future_like else None

    def get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def done(self) -> bool:
        return self._ready

    def cancelled(self) -> bool:
        return self._cancelled

    def result(self) -> ResultT:
        """The value (asyncio's ``Future.result``: ``InvalidStateError`` if not ready)."""
        if not self._ready:
            raise asyncio.InvalidStateError("the result is not ready")
        if self._cancelled:
            raise self._make_cancelled_error()
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self) -> BaseException | None:
        if not self._ready:
            raise asyncio.InvalidStateError("the result is not ready")
        if self._cancelled:
            raise self._make_cancelled_error()
        return self._error

    def _make_cancelled_error(self) -> asyncio.CancelledError:
        return asyncio.CancelledError(self._cancel_message or "")

    def add_done_callback(
        self, fn: Callable[[Self], object], *, context: contextvars.Context | None = None
    ) -> None:
        """Call ``fn(self)`` from the event loop once the result is ready."""
        loop = self.get_loop()
        if context is None:
            context = contextvars.copy_context()
        if self._ready:
            loop.call_soon(fn, self, context=context)
            return
        if self._done_callbacks is None:
            self._done_callbacks = []
            self._watched = self._pool._watch_for(self, loop)
        self._done_callbacks.append((fn, context))

    def remove_done_callback(self, fn: Callable[[Self], object]) -> int:
        callbacks = self._done_callbacks or []
        kept = [(f, ctx) for f, ctx in callbacks if f != fn]
        if self._done_callbacks is not None:
            self._done_callbacks[:] = kept
        return len(callbacks) - len(kept)

    def cancel(self, msg: Any = None) -> bool:
        """Cancel as cancelling an await of it would: a ``cancellable`` task's worker is
        stopped and replaced, a task not sent yet is dropped, any other runs on and its
        result is discarded. False if the result is ready already."""
        if self._ready:
            return False
        self._cancel_message = msg
        self._cancelled = True
        self._pool._cancel(self)
        return True

    def _cancel_awaited(self) -> None:
        """The await of this result was cancelled: the result is cancelled, as a future
        awaited by a cancelled task is (asyncio's ``Task.cancel`` cancels the future it
        waits on). That is what makes ``asyncio.wait_for`` cancel it on every Python:
        before 3.12 it calls :meth:`cancel`, since then it cancels the awaiting task (it is
        built on ``asyncio.timeout``). A task that runs on in its worker has its result
        discarded; a ``cancellable`` one was stopped already (:meth:`PoolAPI._abandon`)."""
        self._cancelled = True
        if not self._ready:
            self._finish(None, TaskCancelled("the awaiting task was cancelled"))

    def _schedule_done_callbacks(self) -> None:
        callbacks, self._done_callbacks = self._done_callbacks or [], None
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        same_thread = running_asyncio_loop() is loop
        for fn, context in callbacks:
            if same_thread:
                loop.call_soon(fn, self, context=context)
            else:
                loop.call_soon_threadsafe(fn, self, context=context)

    def _job_done(self, job: Any, value: Any, error: BaseException | None) -> None:
        self._jobs.discard(job)
        self._finish(value, error)

    def _add_waiter(self, waiter: _Waiter) -> None:
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)

    def _remove_waiter(self, waiter: _Waiter) -> None:
        if self._waiters is not None:
            self._waiters.remove(waiter)

    def __await__(self) -> Generator[Any, None, ResultT]:
        return self._await().__await__()

    async def _await(self) -> ResultT:
        try:
            await self._pool._drive_until_async(self.ready, self)
        except BaseException as exc:
            if not self._ready:
                await self._pool._abandon(self)
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    self._cancel_awaited()
            raise
        if self._error is not None:
            raise self._error
        return self._value


class MapResult(AsyncResult[list[ResultT]]):
    """The result of ``map_async``/``starmap_async`` (one job per chunk): ``await result`` and
    ``result.get()`` give the list of the function's values, in order."""

    def __init__(
        self,
        pool: PoolAPI,
        nchunks: int,
        total: int,
        callback: Callable[[list[ResultT]], object] | None,
        error_callback: Callable[[BaseException], object] | None,
        on_progress: Callable[[ProgressEvent], object] | None,
    ) -> None:
        super().__init__(pool, callback, error_callback)
        self._chunks: list[list[ResultT] | None] = [None] * nchunks
        self._left = nchunks
        self._total = total
        self._done_items = 0
        self._on_progress = on_progress
        self._progress: collections.deque[ProgressEvent] = collections.deque()
        if nchunks == 0:
            self._finish([])

    def _job_done(self, job: Any, value: Any, error: BaseException | None) -> None:
        self._jobs.discard(job)
        if self._ready:
            return
        if error is not None:
            self._finish(None, error)  # the stdlib fails the whole map on the first error
            return
        assert job.index is not None
        self._chunks[job.index] = value
        self._left -= 1
        self._done_items += len(value)
        event = ProgressEvent(self._done_items, self._total)
        self._progress.append(event)
        if self._on_progress is not None:
            self._on_progress(event)
        if self._left == 0:
            self._finish([x for chunk in self._chunks for x in chunk or ()])

    async def progress(self) -> AsyncIterator[ProgressEvent]:
        """``async for event in result.progress()``: a :class:`ProgressEvent` per chunk done,
        ending with ``done == total`` (unless an item raised)."""
        seen = 0
        while True:
            await self._pool._drive_until_async(lambda: self._ready or bool(self._progress))
            while self._progress:
                event = self._progress.popleft()
                seen = event.done
                yield event
            if self._ready:
                if seen < self._total and self._error is None:
                    yield ProgressEvent(self._total, self._total)
                return


class IMapIterator(Generic[ResultT]):
    """``imap``/``imap_unordered``: a lazy iterator of the function's values, sync (``for``,
    ``next``) and async (``async for``).

    At most ``max_inflight`` chunks are submitted ahead of what was consumed, so an endless
    iterable works and memory stays bounded. ``on_progress`` gets a :class:`ProgressEvent`
    each time a chunk finishes in a worker.
    """

    def __init__(
        self,
        pool: PoolAPI,
        fn: Callable[..., ResultT],
        iterable: Iterable[Any],
        chunksize: int,
        ordered: bool,
        star: bool,
        max_inflight: int,
        on_progress: Callable[[ProgressEvent], object] | None = None,
    ) -> None:
        self._pool = pool
        self._fn = fn
        self._on_progress = on_progress
        self._total = len(iterable) if isinstance(iterable, Sized) else None
        self._items = 0  # items read from the iterable so far
        self._done_items = 0  # items the workers finished
        self._source = _chunks(iterable, chunksize)
        self._ordered = ordered
        self._star = star
        self._max_inflight = max(1, max_inflight)
        self._next_index = 0
        self._submitted = 0
        self._inflight: dict[int, AsyncResult[list[ResultT]]] = {}
        self._done: dict[int, AsyncResult[list[ResultT]]] = {}
        # one entry per finished chunk not yet consumed: a deque of its items, or a _Raise
        self._buffer: collections.deque[collections.deque[ResultT] | _Raise] = collections.deque()
        self._exhausted = False

    def _fill(self) -> None:
        while (
            not self._exhausted
            and len(self._inflight) + len(self._done) + len(self._buffer) < self._max_inflight
        ):
            try:
                chunk = next(self._source)
            except StopIteration:
                self._exhausted = True
                if self._total is None:
                    self._total = self._items
                    if self._on_progress is not None and self._done_items == self._items:
                        self._on_progress(ProgressEvent(self._done_items, self._total))
                return
            self._items += len(chunk)
            index = self._submitted
            self._submitted += 1
            callback = None if self._on_progress is None else self._chunk_done
            result: AsyncResult[list[ResultT]] = AsyncResult(self._pool, callback)
            self._inflight[index] = result
            self._pool._submit(_run_chunk, (self._fn, chunk, self._star), {}, result, None)

    def _chunk_done(self, values: list[ResultT]) -> None:
        assert self._on_progress is not None
        self._done_items += len(values)
        self._on_progress(ProgressEvent(self._done_items, self._total))

    def _collect(self) -> bool:
        """Move finished chunks to the buffer; True if something is ready to yield."""
        for index, result in list(self._inflight.items()):
            if result.ready():
                del self._inflight[index]
                self._done[index] = result
        if self._ordered:
            while self._next_index in self._done:
                self._emit(self._done.pop(self._next_index))
                self._next_index += 1
        else:
            for index in list(self._done):
                self._emit(self._done.pop(index))
        return bool(self._buffer)

    def _emit(self, result: AsyncResult[list[ResultT]]) -> None:
        if result._error is not None:
            self._buffer.append(_Raise(result._error))
        elif result._value:
            self._buffer.append(collections.deque(result._value))

    def _finished(self) -> bool:
        return self._exhausted and not self._inflight and not self._done

    def _pop(self) -> ResultT:
        chunk = self._buffer[0]
        if isinstance(chunk, _Raise):
            self._buffer.popleft()
            raise chunk.error
        item = chunk.popleft()
        if not chunk:
            self._buffer.popleft()
        return item

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> ResultT:
        return self.next()

    def next(self, timeout: float | None = None) -> ResultT:
        """The next value (blocking, driving the pool); ``multiprocessing.TimeoutError`` after
        ``timeout`` seconds."""
        self._fill()
        if not self._collect():
            if self._finished():
                raise StopIteration
            self._pool._drive_until(lambda: self._collect() or self._finished(), timeout)
            if not self._buffer:
                if self._finished():
                    raise StopIteration
                raise multiprocessing.TimeoutError
        value = self._pop()
        self._fill()
        return value

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ResultT:
        self._fill()
        if not self._collect():
            if self._finished():
                raise StopAsyncIteration
            await self._pool._drive_until_async(lambda: self._collect() or self._finished())
            if not self._buffer:
                raise StopAsyncIteration
        value = self._pop()
        self._fill()
        await anyio.lowlevel.checkpoint()
        return value


@dataclass
class _Raise:
    error: BaseException


def _run_chunk(fn: Callable[..., ResultT], chunk: list[Any], star: bool) -> list[ResultT]:
    if star:
        return [fn(*args) for args in chunk]
    return [fn(x) for x in chunk]


def _chunks(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(iterable)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk
