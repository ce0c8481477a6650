"""``aioshm.Pool`` and ``aioshm.run_sync``: a worker pool with both faces and no helper threads.

The whole stdlib ``multiprocessing.Pool`` API with its blocking semantics, plus: awaitable
``AsyncResult`` (``await pool.apply_async(f, args)``, ``await pool.map_async(f, xs)``),
``async for`` over ``imap``/``imap_unordered`` (lazy, with a bound on tasks in flight),
``async with Pool(...)``, per-task kill on cancellation, ``statistics()`` and progress events.

How it works::

    submit ──► pending deque ──► dispatch (2..MAX_DEPTH tasks in flight per worker)
                                     │ one SOCK_SEQPACKET record per task (never torn, never
                                     │ blocks the loop; big payloads spill to memfds)
                                     ▼
                               worker process (aioshm._poolworker, blocking loop)
                                     │ one record per result
                                     ▼
    AsyncResult ◄── _step(): read results, reap dead workers, replace them, dispatch

``_step()`` never blocks. Whoever waits drives it: a blocking call (``get``, ``wait``, ``map``,
``join``…) polls the workers' fds in its own thread. On asyncio, a task awaiting a result
parks on a future while the event loop itself watches one epoll fd covering every result
channel, sentinel and the wake-up pipe (:class:`~aioshm._transport._waits.LoopWatch`) and
steps the pool from its callback. Elsewhere (trio, and waits on other conditions: ``join``,
progress, ``imap``) one awaiting task at a time drives, waiting on such an epoll fd, while the
others park until it hands over. So the async face runs no thread at all, and callbacks run
in whichever thread, task or loop callback drives the pool.

Failures: a worker that dies fails only the task it was running (the oldest one it was sent;
it runs them in order) with :class:`~aioshm.ProcessExitedException`; tasks queued behind it are
sent elsewhere, and a replacement starts. A task's exception comes back as its original type
with the remote traceback as ``__cause__``; an unpicklable argument or result fails that task
alone.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
import logging
import math
import multiprocessing
import os
import pickle
import select
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import anyio
import anyio.lowlevel

from . import _procutil, _reduction
from ._connection import RecordChannel, record_pair
from ._context import DEFAULT_START_METHOD
from ._exceptions import (
    BrokenPool,
    PoolClosed,
    ProcessExitedException,
    ProcessRaisedException,
    RemoteTraceback,
    TaskCancelled,
    signal_name_of,
)
from ._poolworker import SWEEP, TaskCounter, worker_main
from ._shm import _segment
from ._transport._proc import stop_async
from ._transport._waits import (
    LoopWatch,
    MultiWait,
    asyncio_loop,
    loop_watch_supported,
    running_asyncio_loop,
)

__all__ = ("AsyncResult", "IMapIterator", "Pool", "PoolStatistics", "ProgressEvent", "run_sync")

#: Tasks sent ahead to one worker (the first runs, the rest wait in its channel): at least
#: DEPTH, and up to MAX_DEPTH while tasks are short, so that about AHEAD seconds of work wait
#: in each worker's channel. Short tasks then never leave a worker idle waiting for the next
#: one (nor the parent waking it for each), and a task that turns out long holds up at most
#: that much work queued behind it. The task time is a decaying maximum: one long task drops
#: the depth back to DEPTH at once, and it grows again over the next few dozen results.
DEPTH: Final = 2
MAX_DEPTH: Final = 32
AHEAD: Final = 0.002
#: Small tasks without fds are sent to a worker together, up to about this many bytes per record.
BATCH_BYTES: Final = 16 * 1024
#: Seconds a ``run_sync`` worker may stay idle before it is retired (anyio's value).
WORKER_MAX_IDLE_TIME: Final = 300.0
GRACE_PERIOD: Final = 2.0
#: Workers that die at start-up this many times in a row (before any worker reached its task
#: loop) break the pool: every pending and later task fails with ``BrokenPool``.
STARTUP_FAILURES: Final = 3

#: Worker deaths, replacements and broken pools are logged here (no handler installed).
log = logging.getLogger("aioshm")

_IN, _OUT = select.POLLIN, select.POLLOUT
_job_ids = itertools.count()


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
    """Progress of a ``map``: ``done`` of ``total`` items finished."""

    done: int
    total: int


# --------------------------------------------------------------------------- results


class AsyncResult:
    """The stdlib's ``AsyncResult`` (``get``, ``wait``, ``ready``, ``successful``), awaitable.

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
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> None:
        self._pool = pool
        self._callback = callback
        self._error_callback = error_callback
        self._value: Any = None
        self._error: BaseException | None = None
        self._ready = False
        self._jobs: set[Any] = set()  # the pool's jobs for it
        self._waiters: list[_Waiter] | None = None  # tasks awaiting it (not driving the pool)
        # the asyncio future protocol
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done_callbacks: list[tuple[Callable[[Any], object], Any]] | None = None
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

    def get(self, timeout: float | None = None) -> Any:
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

    def result(self) -> Any:
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

    def add_done_callback(self, fn: Callable[[Any], object], *, context: Any = None) -> None:
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

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
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

    def __await__(self) -> Generator[Any, None, Any]:
        return self._await().__await__()

    async def _await(self) -> Any:
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


class MapResult(AsyncResult):
    """The result of ``map_async``/``starmap_async``: one job per chunk."""

    def __init__(
        self,
        pool: PoolAPI,
        nchunks: int,
        total: int,
        callback: Callable[[Any], object] | None,
        error_callback: Callable[[BaseException], object] | None,
        on_progress: Callable[[ProgressEvent], object] | None,
    ) -> None:
        super().__init__(pool, callback, error_callback)
        self._chunks: list[list[Any] | None] = [None] * nchunks
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

    async def progress(self) -> Any:
        """``async for event in result.progress()``: a :class:`ProgressEvent` per chunk done."""
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


class IMapIterator:
    """``imap``/``imap_unordered``: a lazy iterator, sync (``next``) and async (``async for``).

    At most ``max_inflight`` chunks are submitted ahead of what was consumed, so an endless
    iterable works and memory stays bounded.
    """

    def __init__(
        self,
        pool: PoolAPI,
        fn: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int,
        ordered: bool,
        star: bool,
        max_inflight: int,
    ) -> None:
        self._pool = pool
        self._fn = fn
        self._source = _chunks(iterable, chunksize)
        self._ordered = ordered
        self._star = star
        self._max_inflight = max(1, max_inflight)
        self._next_index = 0
        self._submitted = 0
        self._inflight: dict[int, AsyncResult] = {}
        self._done: dict[int, AsyncResult] = {}
        # one entry per finished chunk not yet consumed: a deque of its items, or a _Raise
        self._buffer: collections.deque[collections.deque[Any] | _Raise] = collections.deque()
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
                return
            index = self._submitted
            self._submitted += 1
            result = AsyncResult(self._pool)
            self._inflight[index] = result
            self._pool._submit(_run_chunk, (self._fn, chunk, self._star), {}, result, None)

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

    def _emit(self, result: AsyncResult) -> None:
        if result._error is not None:
            self._buffer.append(_Raise(result._error))
        elif result._value:
            self._buffer.append(collections.deque(result._value))

    def _finished(self) -> bool:
        return self._exhausted and not self._inflight and not self._done

    def _pop(self) -> Any:
        chunk = self._buffer[0]
        if isinstance(chunk, _Raise):
            self._buffer.popleft()
            raise chunk.error
        item = chunk.popleft()
        if not chunk:
            self._buffer.popleft()
        return item

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self, timeout: float | None = None) -> Any:
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

    async def __anext__(self) -> Any:
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


def _run_chunk(fn: Callable[..., Any], chunk: list[Any], star: bool) -> list[Any]:
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


# --------------------------------------------------------------------------- workers and jobs


class _Job:
    __slots__ = (
        "abandoned",
        "args",
        "cancellable",
        "fn",
        "id",
        "index",
        "kwds",
        "result",
        "sent_at",
        "worker",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwds: dict[str, Any],
        result: AsyncResult,
        index: int | None,
        cancellable: bool,
    ) -> None:
        self.id = next(_job_ids)
        self.fn, self.args, self.kwds = fn, args, kwds
        self.result = result
        self.index = index
        self.cancellable = cancellable
        self.abandoned = False  # its awaiter was cancelled (cancellable jobs only)
        self.worker: _Worker | None = None
        self.sent_at = 0.0


class _Worker:
    __slots__ = (
        "budget",
        "eof",
        "finished",
        "idle_since",
        "inflight",
        "init_error",
        "proc",
        "results",
        "results_fd",
        "sentinel",
        "stopping",
        "taken",
        "tasks",
    )

    def __init__(
        self,
        proc: Any,
        tasks: RecordChannel,
        results: RecordChannel,
        taken: TaskCounter,
        budget: int | None,
    ):
        self.proc = proc
        self.sentinel: int = proc.sentinel
        self.tasks = tasks
        self.results = results
        self.results_fd = results.fileno()
        self.taken = taken  # task records the worker took off its channel (shared page)
        self.finished = 0  # results (or reports) received from it
        self.inflight: collections.deque[_Job] = collections.deque()
        self.budget = budget  # tasks it may still be sent (maxtasksperchild)
        self.idle_since = time.monotonic()
        self.eof = False  # its result channel reached EOF: it is exiting
        self.stopping = False  # being terminated by a cancelled await
        self.init_error: tuple[BaseException, str] | None = None  # its initializer raised

    def close_channels(self) -> None:
        self.tasks.close()
        self.results.close()
        self.taken.close()


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


#: tasks the pools start on asyncio (for results used as futures), kept alive until done
_tasks: set[asyncio.Task[None]] = set()


def _keep(task: asyncio.Task[None]) -> None:
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


class PoolAPI:
    """The stdlib ``Pool`` methods and their awaitable forms, on a pool's ``_submit`` (shared by
    :class:`Pool` and the Ray backend's pool)."""

    _processes: int
    #: ``imap``'s default bound on chunks in flight, per process of the pool
    _IMAP_AHEAD = 2

    _state: str  # "RUN", then "CLOSE" or "TERMINATE"

    def __reduce__(self) -> Any:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def _check_running(self) -> None:
        if self._state != "RUN":
            raise ValueError("Pool not running")
        error = self._broken_error()
        if error is not None:
            raise error

    def _broken_error(self) -> BrokenPool | None:
        """A new ``BrokenPool`` for a task if the pool gave up (see :data:`STARTUP_FAILURES`)."""
        return None

    # -- what a pool provides: the results and iterators drive it through these ---------------

    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwds: dict[str, Any],
        result: AsyncResult,
        index: int | None,
        cancellable: bool = False,
    ) -> None:
        raise NotImplementedError

    def _forget(self, job: Any) -> None:
        """``job``'s result finished early (e.g. a map's first error): drop it if unsent."""
        raise NotImplementedError

    def _notify(self, waiter: _Waiter) -> None:
        raise NotImplementedError

    def _drive_until(self, done: Callable[[], bool], timeout: float | None) -> None:
        raise NotImplementedError

    async def _drive_until_async(
        self, done: Callable[[], bool], result: AsyncResult | None = None
    ) -> None:
        raise NotImplementedError

    async def _abandon(self, result: AsyncResult) -> None:
        raise NotImplementedError

    # -- asyncio's future protocol of the results (see AsyncResult) ------------------------
    #: results are asyncio Future-like objects (the pool progresses without a Task per result)
    _future_like = False

    def _watch_for(self, result: AsyncResult, loop: asyncio.AbstractEventLoop) -> bool:
        """``result`` got a done callback: make sure the pool progresses until it is ready.
        True if the caller must :meth:`_unwatch` once it is; here a task drives the pool."""
        _keep(loop.create_task(self._drive_for(result)))
        return False

    async def _drive_for(self, result: AsyncResult) -> None:
        await self._drive_until_async(result.ready, result)

    def _unwatch(self) -> None:
        pass

    def _cancel(self, result: AsyncResult) -> None:
        """``result.cancel()``: abandon it as a cancelled await would, then mark it cancelled."""

        async def cancel() -> None:
            await self._abandon(result)
            if not result._ready:  # a task that runs on: its result is discarded
                result._finish(None, TaskCancelled("the result was cancelled"))

        result._cancelled = True
        _keep(result.get_loop().create_task(cancel()))

    def close(self) -> None:
        raise NotImplementedError

    def terminate(self) -> None:
        raise NotImplementedError

    async def join_async(self) -> None:
        raise NotImplementedError

    async def terminate_async(self) -> None:
        raise NotImplementedError

    # -- the stdlib API -----------------------------------------------------------------------
    def __enter__(self) -> Self:
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()  # the stdlib's context manager terminates

    async def __aenter__(self) -> Self:
        self._check_running()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close and join without blocking the loop; terminate on error or cancellation."""
        if exc_type is None:
            self.close()
            try:
                await self.join_async()
            except BaseException:
                await self.terminate_async()
                raise
        else:
            await self.terminate_async()

    def apply_async(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: dict[str, Any] | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        cancellable: bool = False,
    ) -> AsyncResult:
        """Submit ``func(*args, **kwds)``; ``await`` the result or call ``.get()``.

        :param cancellable: if True, cancelling the task that awaits the result stops the
            task: the worker running it is killed (terminate, grace period, kill) and
            replaced (on Ray: the task is force-cancelled). Otherwise cancelling the await
            leaves the task running and drops its result.
        """
        self._check_running()
        result = AsyncResult(self, callback, error_callback)
        self._submit(func, tuple(args), dict(kwds or {}), result, None, cancellable)
        return result

    def apply(
        self, func: Callable[..., Any], args: Iterable[Any] = (), kwds: dict[str, Any] | None = None
    ) -> Any:
        """Blocking ``func(*args, **kwds)`` in a worker."""
        return self.apply_async(func, args, kwds).get()

    def _map_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        callback: Callable[[Any], object] | None,
        error_callback: Callable[[BaseException], object] | None,
        star: bool,
        on_progress: Callable[[ProgressEvent], object] | None,
    ) -> MapResult:
        self._check_running()
        items = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(items), self._processes * 4)
            if extra:
                chunksize += 1
        chunksize = max(1, chunksize)
        chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
        result = MapResult(self, len(chunks), len(items), callback, error_callback, on_progress)
        for index, chunk in enumerate(chunks):
            self._submit(_run_chunk, (func, chunk, star), {}, result, index)
        return result

    def map_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        on_progress: Callable[[ProgressEvent], object] | None = None,
    ) -> MapResult:
        """``map`` that returns an awaitable :class:`MapResult` (with ``progress()`` events)."""
        return self._map_async(
            func, iterable, chunksize, callback, error_callback, False, on_progress
        )

    def starmap_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        on_progress: Callable[[ProgressEvent], object] | None = None,
    ) -> MapResult:
        """``starmap`` that returns an awaitable :class:`MapResult`."""
        return self._map_async(
            func, iterable, chunksize, callback, error_callback, True, on_progress
        )

    def map(
        self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None = None
    ) -> list[Any]:
        """Blocking ``[func(x) for x in iterable]`` across the workers."""
        return self.map_async(func, iterable, chunksize).get()  # type: ignore[no-any-return]

    def starmap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
    ) -> list[Any]:
        """Blocking ``[func(*args) for args in iterable]`` across the workers."""
        return self.starmap_async(func, iterable, chunksize).get()  # type: ignore[no-any-return]

    def imap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int = 1,
        *,
        max_inflight: int | None = None,
    ) -> IMapIterator:
        """Lazy ordered results; ``for``/``async for``; at most ``max_inflight`` chunks ahead."""
        return self._imap(func, iterable, chunksize, True, max_inflight)

    def imap_unordered(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int = 1,
        *,
        max_inflight: int | None = None,
    ) -> IMapIterator:
        """Like :meth:`imap`, in completion order."""
        return self._imap(func, iterable, chunksize, False, max_inflight)

    def _imap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int,
        ordered: bool,
        max_inflight: int | None,
    ) -> IMapIterator:
        self._check_running()
        ahead = max_inflight or self._IMAP_AHEAD * self._processes
        return IMapIterator(self, func, iterable, max(1, chunksize), ordered, False, ahead)


# --------------------------------------------------------------------------- the pool


class Pool(PoolAPI):
    """A process pool: the stdlib ``multiprocessing.Pool`` API, awaitable, without threads.

    :param processes: number of workers (default ``os.cpu_count()``).
    :param initializer: called as ``initializer(*initargs)`` in every worker at start.
    :param maxtasksperchild: a worker is replaced after this many tasks.
    :param context: a start-method context or name (default: forkserver on Linux).
    """

    _IMAP_AHEAD = 2 * DEPTH

    def __new__(cls, *args: Any, backend: Any = None, **kwargs: Any) -> Any:
        if backend is not None and getattr(backend, "name", "local") != "local":
            kwargs.pop("context", None)
            kwargs.pop("_lazy", None)
            return backend.Pool(*args, **kwargs)  # another engine's pool, same face
        return super().__new__(cls)

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: Any = None,
        *,
        backend: Any = None,
        _lazy: bool = False,
    ) -> None:
        if processes is None:
            processes = os.cpu_count() or 1
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0
        ):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if context is None or isinstance(context, str):
            context = multiprocessing.get_context(context or DEFAULT_START_METHOD)
        self._ctx = context
        self._processes = processes
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._maxtasks = maxtasksperchild
        self._workers: list[_Worker] = []
        self._pending: collections.deque[_Job] = collections.deque()
        self._jobs: dict[int, _Job] = {}
        self._state = "RUN"
        self._mutex = threading.RLock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._generation = 0
        self._depth = DEPTH  # tasks in flight per worker (see DEPTH)
        self._task_time = AHEAD  # decaying maximum of recent task times (seconds)
        self._tasks_done = 0
        self._replaced = 0
        self._woken = False  # a byte is in the wake-up pipe
        self._parked = 0  # drivers waiting on the pool's fds (they need a wake-up on changes)
        self._driving = False  # an awaiting task drives the pool
        self._driver_thread = 0  # the thread of its event loop
        self._followers: dict[_Waiter, None] = {}  # the tasks awaiting while it does, oldest first
        self._generic: list[_Waiter] = []  # those whose condition is not one result
        self._foreign: collections.deque[_Waiter] = collections.deque()  # woken by other threads
        self._waiter: MultiWait | None = None
        self._watch: LoopWatch | None = None  # asyncio: the loop watching the pool's fds
        self._watching = 0  # tasks awaiting a result through it
        self._watch_idle = 0  # its callbacks since the last such task left
        self._waiter_key: tuple[int, list[tuple[int, int]]] | None = None
        self._lazy = _lazy  # run_sync's pool starts workers on demand
        self._startup_deaths = 0  # workers dead at start-up since one last got through it
        self._broken: tuple[str, BaseException, str] | None = None  # (why, cause, traceback)
        self._guard: Any = None
        _pools.add(self)
        try:
            self._repopulate()
        except BaseException:
            self._kill_all()
            raise

    def __repr__(self) -> str:
        return f"<{type(self).__name__} state={self._state} pool_size={self._processes}>"

    # -- workers ----------------------------------------------------------------------------
    def _start_worker(self) -> None:
        task_r, task_w = record_pair()
        res_r, res_w = record_pair()
        taken = TaskCounter()
        proc = self._ctx.Process(
            target=worker_main,
            args=(task_r, res_w, self._initializer, self._initargs, self._maxtasks, taken),
            daemon=True,
        )
        proc.name = proc.name.replace("Process", "PoolWorker")
        try:
            if self._ctx.get_start_method() == "forkserver":
                _procutil.ensure_forkserver()  # the server imports the main script once
            proc.start()
        except BaseException:
            for ch in (task_r, task_w, res_r, res_w):
                ch.close()
            taken.close()
            raise
        finally:
            _reduction.release_spawn_fds(getattr(proc, "_popen", None))
        task_r.close()
        res_w.close()
        self._workers.append(_Worker(proc, task_w, res_r, taken, self._maxtasks))
        self._generation += 1
        if self._parked:
            self._wake()  # who waits on the pool's fds must watch this worker's too

    def _repopulate(self) -> None:
        if self._state != "RUN" or self._lazy or self._broken is not None:
            return
        while len(self._workers) < self._processes:
            self._start_worker()

    def _remove_worker(self, worker: _Worker) -> None:
        self._workers.remove(worker)
        worker.close_channels()
        self._generation += 1
        if self._parked:
            self._wake()

    # -- submitting ---------------------------------------------------------------------------
    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwds: dict[str, Any],
        result: AsyncResult,
        index: int | None,
        cancellable: bool = False,
    ) -> None:
        job = _Job(fn, args, kwds, result, index, cancellable)
        with self._mutex:
            error = self._broken_error()
            if error is not None:  # e.g. an imap's next chunk
                result._finish(None, error)
                return
            self._jobs[job.id] = job
            result._jobs.add(job)
            self._pending.append(job)
            generation = self._generation
            if self._lazy:
                self._grow()  # starts workers on demand
            self._dispatch()
            if self._parked and (self._pending or self._generation != generation):
                self._wake()  # the driver must watch other fds now

    def _forget(self, job: _Job) -> None:
        self._jobs.pop(job.id, None)
        if job.worker is None:
            try:
                self._pending.remove(job)
            except ValueError:
                pass

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

    # -- the pump -----------------------------------------------------------------------------
    def _step(self, ready: set[int] | None = None) -> None:
        """Read results, reap dead workers (failing their running task), refill, dispatch.

        ``ready``: the fds a wait found ready (only those are read); None reads everything.
        """
        with self._mutex:
            done_before = self._tasks_done
            self._step_locked(ready)
            if (
                self._tasks_done != done_before
                and self._driving
                and self._driver_thread != threading.get_ident()
            ):
                self._wake()  # the driving task may wait for a result read here: wake it
            self._refresh_watch()

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

    def _step_locked(self, ready: set[int] | None) -> None:
        if self._woken and (ready is None or self._wake_r in ready):
            try:
                while os.read(self._wake_r, 512):
                    pass
            except OSError:
                pass
            self._woken = False
        dead = False
        for worker in self._workers:
            if ready is None or worker.results_fd in ready or worker.sentinel in ready:
                self._read_results(worker)
            dead = dead or worker.eof or (ready is not None and worker.sentinel in ready)
        if dead:
            for worker in list(self._workers):
                if (worker.eof or ready is None or worker.sentinel in ready) and (
                    not worker.proc.is_alive()
                ):
                    self._worker_died(worker)
        if self._state == "RUN":
            if self._lazy:
                self._grow()
            elif len(self._workers) < self._processes:
                self._repopulate()
        self._dispatch()
        if self._state == "CLOSE" and not self._pending:
            for worker in list(self._workers):
                if not worker.inflight and not worker.tasks.closed:
                    self._send_exit(worker)

    def _grow(self) -> None:
        """A lazy pool (run_sync's) starts a worker for each task no idle worker can take."""
        if self._state != "RUN" or self._broken is not None:
            return
        busy = sum(1 for w in self._workers if w.inflight)
        want = min(self._processes, busy + len(self._pending))
        while len(self._workers) < want:
            self._start_worker()

    def _read_results(self, worker: _Worker) -> None:
        task_time = self._task_time
        try:
            self._read_results_into(worker)
        finally:
            if self._task_time != task_time:
                self._depth = max(DEPTH, min(MAX_DEPTH, int(AHEAD / max(self._task_time, 1e-6))))

    def _read_results_into(self, worker: _Worker) -> None:
        results = worker.results
        while not results.closed:
            try:
                got = results.try_recv_record()
            except EOFError:
                if not worker.eof:
                    worker.eof = True
                    self._generation += 1  # stop watching its result channel
                return
            if got is None:
                return
            try:
                msg = worker.results.decode(*got)
            except Exception as exc:
                msg, bad = None, exc
            if msg is not None and msg[0] == "init-failed":  # no task's result: it exits now
                _, _, original, type_name, tb_text = msg
                worker.init_error = (_remote_error(original, type_name, tb_text), str(tb_text))
                continue
            worker.finished += 1
            self._startup_deaths = 0  # a worker got through its start-up
            job = worker.inflight.popleft() if worker.inflight else None
            now = time.monotonic()
            if job is not None:
                # it ran from when it was sent, or from the previous result if it was queued
                took = now - max(job.sent_at, worker.idle_since)
                self._task_time = max(took, self._task_time * 0.9)
            worker.idle_since = now
            if msg is None:
                if job is not None:
                    self._complete(job, None, bad)
            else:
                if job is not None:
                    if msg[0] == "ok":
                        self._complete(job, msg[2], None)
                    else:
                        _, _, original, type_name, tb_text = msg
                        self._complete(job, None, _remote_error(original, type_name, tb_text))
            if worker.inflight and worker.inflight[0].abandoned and not worker.stopping:
                # the next task it runs was cancelled by its awaiter: stop the worker
                worker.stopping = True
                worker.proc.terminate()

    def _complete(self, job: _Job, value: Any, error: BaseException | None) -> None:
        self._tasks_done += 1
        self._jobs.pop(job.id, None)
        job.worker = None
        job.fn = job.args = job.kwds = None  # type: ignore[assignment]
        job.result._job_done(job, value, error)

    def _worker_died(self, worker: _Worker) -> None:
        self._read_results(worker)  # what it sent before dying is still there
        worker.proc.join()  # not alive any more: returns at once
        exitcode = worker.proc.exitcode
        startup_death = (
            not worker.taken.started
            and self._state == "RUN"
            and not worker.stopping
            and self._broken is None
        )
        if worker.taken.started:
            self._startup_deaths = 0
        elif startup_death:
            self._startup_deaths += 1
        breaking = startup_death and self._startup_deaths >= STARTUP_FAILURES
        if startup_death or (
            exitcode not in (0, None) and self._state == "RUN" and not worker.stopping
        ):
            log.warning(
                "pool worker %s (pid %s) died%s with %s%s",
                worker.proc.name,
                worker.proc.pid,
                " at start-up" if startup_death else "",
                _exit_text(exitcode),
                "" if breaking or self._broken is not None else "; replacing it",
            )
        elif worker.stopping and self._state == "RUN" and self._broken is None:
            log.info(
                "pool worker %s (pid %s) stopped; replacing it", worker.proc.name, worker.proc.pid
            )
        if worker.inflight and worker.taken.value > worker.finished:
            # it took its oldest task off the channel, so it died running that one
            running = worker.inflight.popleft()
            name = signal_name_of(exitcode) if exitcode is not None else None
            what = f"signal {name}" if name else f"exit code {exitcode}"
            error = ProcessExitedException(
                f"pool worker {worker.proc.name} (pid {worker.proc.pid}) terminated with {what} "
                "while running this task",
                0,
                worker.proc.pid or -1,
                exitcode if exitcode is not None else -1,
                name,
            )
            self._complete(running, None, error)
            self._replaced += 1
        elif exitcode not in (0, None) and self._state == "RUN":
            self._replaced += 1
        # tasks queued behind it never started: send them elsewhere (cancelled ones are dropped)
        for job in reversed(worker.inflight):
            job.worker = None
            if job.abandoned:
                self._jobs.pop(job.id, None)
            else:
                self._pending.appendleft(job)
        worker.inflight.clear()
        self._remove_worker(worker)
        _close_popen(worker.proc)
        if breaking:
            self._break(worker, exitcode)

    def _break(self, worker: _Worker, exitcode: int | None) -> None:
        """Give up (the broken-pool rule): fail every task, stop the workers left, start none."""
        n = self._startup_deaths
        if worker.init_error is not None:
            cause, tb_text = worker.init_error
            why = (
                f"the pool's initializer raised {type(cause).__name__} in {n} workers in a "
                f"row: {cause}"
            )
        else:
            tb_text = ""
            why = (
                f"{n} pool workers in a row died at start-up (the last, pid {worker.proc.pid}, "
                f"with {_exit_text(exitcode)}), before reaching their task loop. Does the script "
                'start the pool outside an `if __name__ == "__main__":` guard, or can the '
                "workers not import its main module (read from stdin)? The worker printed its "
                "traceback to its stderr"
            )
            cause = ProcessExitedException(
                f"pool worker {worker.proc.name} (pid {worker.proc.pid}) died at start-up with "
                f"{_exit_text(exitcode)}",
                0,
                worker.proc.pid or -1,
                exitcode if exitcode is not None else -1,
                signal_name_of(exitcode) if exitcode is not None else None,
            )
        self._broken = (f"the pool is broken: {why}", cause, tb_text)
        log.error("%s; it starts no more workers and fails every task", self._broken[0])
        self._fail_all("", self._broken_error)
        for other in self._workers:
            if not other.stopping and other.proc.is_alive():
                other.stopping = True
                other.proc.terminate()

    def _broken_error(self) -> BrokenPool | None:
        if self._broken is None:
            return None
        why, cause, tb_text = self._broken
        error = BrokenPool(why, tb_text)
        error.__cause__ = cause
        return error

    def _dispatch(self) -> None:
        """Send pending tasks, each batch to the ready worker with the fewest tasks in flight."""
        pending = self._pending
        if not pending:
            return
        depth = self._depth
        ready = [
            w
            for w in self._workers
            if len(w.inflight) < depth
            and w.budget != 0
            and not w.eof
            and not w.stopping
            and not w.tasks.closed
        ]
        while pending and ready:
            worker = ready[0]
            for w in ready:
                if len(w.inflight) < len(worker.inflight):
                    worker = w
            room = depth - len(worker.inflight)
            if worker.budget is not None:
                room = min(room, worker.budget)
            # leave the other ready workers their share of what is pending
            if not self._send_batch(worker, min(room, -(-len(pending) // len(ready)))):
                ready.remove(worker)  # its channel is full
                continue
            if len(worker.inflight) >= depth or worker.budget == 0:
                ready.remove(worker)

    def _send_batch(self, worker: _Worker, limit: int) -> bool:
        """Send up to ``limit`` pending tasks to ``worker`` in one record: small tasks without
        fds go together (one syscall here and one in the worker for all of them), any other
        alone. A task that cannot be pickled fails alone. False if the channel is full."""
        pending = self._pending
        jobs: list[_Job] = []
        payloads: list[Any] = []
        size = 0
        record: Any = None
        fds: list[int] = []
        owned: list[bool] = []
        while pending and len(jobs) < limit and size < BATCH_BYTES:
            job = pending[0]
            try:
                data, fds, owned = worker.tasks.encode((job.id, job.fn, job.args, job.kwds))
            except Exception as exc:  # the task cannot be pickled: it fails alone
                pending.popleft()
                self._complete(job, None, exc)
                continue
            if fds or len(data) > BATCH_BYTES:
                if jobs:  # it goes on its own, next
                    _reduction.close_owned(fds, owned)
                    fds, owned = [], []
                    break
                record = data
            pending.popleft()
            jobs.append(job)
            payloads.append(data)
            size += len(data)
            if record is not None:
                break
        if not jobs:
            return True
        if record is None:
            if len(payloads) == 1:
                record = payloads[0]
            else:  # a list of pickles (bytes only: this pickle cannot fail)
                record = pickle.dumps([bytes(p) for p in payloads], pickle.HIGHEST_PROTOCOL)
        try:
            sent = worker.tasks.try_send_record(record, fds)
        except OSError:
            sent = False
        finally:
            _reduction.close_owned(fds, owned)
        if not sent:
            pending.extendleft(reversed(jobs))
            return False
        now = time.monotonic()
        for job in jobs:
            job.worker = worker
            job.sent_at = now
            worker.inflight.append(job)
        if worker.budget is not None:
            worker.budget -= len(jobs)
        return True

    def _send_exit(self, worker: _Worker) -> None:
        try:
            worker.tasks.try_send_record(_reduction.dumps(None)[0], [])
        except OSError:
            pass
        worker.tasks.close()

    def _wait_fds(self) -> list[tuple[int, int]]:
        fds = [(self._wake_r, _IN)]
        for worker in self._workers:
            if not worker.results.closed and not worker.eof:
                fds.append((worker.results.fileno(), _IN))
            fds.append((worker.sentinel, _IN))
            if (
                self._pending
                and not worker.tasks.closed
                and len(worker.inflight) < self._depth
                and worker.budget != 0
                and not worker.stopping
            ):
                fds.append((worker.tasks.fileno(), _OUT))
        return fds

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

    # -- asyncio's future protocol of the results ------------------------------------------------
    _future_like = True

    def _watch_for(self, result: AsyncResult, loop: asyncio.AbstractEventLoop) -> bool:
        if running_asyncio_loop() is loop and self._loop_watch(loop) is not None:
            self._watching += 1  # the loop drives the pool until the result is ready
            return True
        return super()._watch_for(result, loop)  # a task drives it

    def _unwatch(self) -> None:
        self._watching -= 1

    def _cancel(self, result: AsyncResult) -> None:
        """``result.cancel()``, without waiting: like :meth:`_abandon`, except that a stopped
        worker is terminated now and killed after the grace period by a loop timer (its
        death is then seen, reaped and replaced like any other), and the result is marked
        cancelled at once, even if its task runs on."""
        with self._mutex:
            stop, _, _ = self._drop_jobs(result)
            result._cancelled = True
            result._finish(None, TaskCancelled("the result was cancelled"))
        loop = result.get_loop()
        for worker in stop:
            worker.proc.terminate()
            loop.call_later(GRACE_PERIOD, _kill_if_alive, worker.proc)
        if self._parked:
            self._wake()

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
        # the watched set changes with the workers and, while tasks wait for room in a full
        # channel, with their send-ahead state: the _step above brought it up to date

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

    def _drop_jobs(self, result: AsyncResult) -> tuple[list[_Worker], bool, bool]:
        """Give up ``result``'s jobs (under the mutex): drop the unsent ones, mark the sent
        cancellable ones abandoned and mark for stopping the workers running one of them.
        Returns ``(workers to stop, some job was cancelled, some job was dropped)``."""
        stop: list[_Worker] = []
        cancelled = dropped = False
        for job in list(result._jobs):
            worker = job.worker
            if worker is None:
                self._forget(job)
                result._jobs.discard(job)
                dropped = True
            elif job.cancellable:
                job.abandoned = cancelled = True
                if worker.inflight and worker.inflight[0] is job and not worker.stopping:
                    worker.stopping = True
                    stop.append(worker)
        return stop, cancelled, dropped

    async def _abandon(self, result: AsyncResult) -> None:
        """The awaiting task was cancelled before ``result`` was ready.

        Tasks not sent yet are dropped. A sent ``cancellable`` task is cancelled: if its
        worker is running it, the worker is stopped (terminate, grace, kill), reaped and
        replaced; if it waits behind another task there, the worker is stopped when it gets to
        it. A sent task that is not cancellable runs on; its result is discarded.
        """
        with self._mutex:
            stop, cancelled, dropped = self._drop_jobs(result)
            if cancelled:
                why = "the awaiting task was cancelled; the worker running it was stopped"
                result._finish(None, TaskCancelled(why))
            elif dropped and not result._jobs:
                why = "the awaiting task was cancelled before it ran"
                result._finish(None, TaskCancelled(why))
        if stop:
            with anyio.CancelScope(shield=True):
                await stop_async([w.proc for w in stop], GRACE_PERIOD)
                with self._mutex:
                    for worker in stop:
                        if worker in self._workers:
                            self._worker_died(worker)
                    self._step()
                if self._parked:
                    self._wake()

    # -- closing --------------------------------------------------------------------------------
    def close(self) -> None:
        """Accept no more work; workers exit once the submitted work is done."""
        with self._mutex:
            if self._state == "RUN":
                self._state = "CLOSE"
            self._step()
        self._wake()

    def terminate(self) -> None:
        """Stop the workers now; pending and running tasks fail with ``PoolClosed``."""
        with self._mutex:
            self._state = "TERMINATE"
            self._fail_all("the pool was terminated")
            for worker in self._workers:
                if worker.proc.is_alive():
                    worker.proc.terminate()
        self._wake()
        self._drive_until(lambda: not self._workers, GRACE_PERIOD)
        self._kill_all()

    def join(self) -> None:
        """Block until every worker exited (after :meth:`close` or :meth:`terminate`)."""
        if self._state == "RUN":
            raise ValueError("Pool is still running")
        self._drive_until(lambda: not self._workers, None)
        self._release()

    async def join_async(self) -> None:
        """Awaitable :meth:`join`."""
        if self._state == "RUN":
            raise ValueError("Pool is still running")
        await self._drive_until_async(lambda: not self._workers)
        self._release()

    async def terminate_async(self) -> None:
        """Awaitable :meth:`terminate` (terminate, grace period, kill, reap)."""
        with self._mutex:
            self._state = "TERMINATE"
            self._fail_all("the pool was terminated")
            procs = [w.proc for w in self._workers]
        with anyio.CancelScope(shield=True):
            await stop_async(procs, GRACE_PERIOD)
        with self._mutex:
            for worker in list(self._workers):
                self._worker_died(worker)
        self._release()

    def _fail_all(self, why: str, make_error: Callable[[], Any] | None = None) -> None:
        jobs = list(self._jobs.values())
        self._pending.clear()
        for worker in self._workers:
            worker.inflight.clear()
        for job in jobs:
            error = make_error() if make_error else PoolClosed(f"{why} before this task finished")
            self._complete(job, None, error)

    def _shutdown_now(self) -> None:
        with self._mutex:
            self._state = "TERMINATE"
            self._fail_all("the event loop ended")
        self._kill_all()

    def _kill_all(self) -> None:
        for worker in list(self._workers):
            if worker.proc.is_alive():
                worker.proc.kill()
            worker.proc.join()
            self._remove_worker(worker)
            _close_popen(worker.proc)
        self._release()

    def _release(self) -> None:
        if self._waiter is not None:
            self._waiter.close()
            self._waiter = None
        self._drop_watch()
        if self._wake_r >= 0 and not self._workers:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    def _drop_watch(self) -> None:
        if self._watch is not None:
            if self._watch.started:
                self._parked -= 1
            self._watch.close()
            self._watch = None

    def statistics(self) -> PoolStatistics:
        """Idle and busy workers, tasks pending/running/done, live shared segments and bytes."""
        with self._mutex:
            busy = sum(1 for w in self._workers if w.inflight)
            segs = _segment.live_segments()
            return PoolStatistics(
                idle_workers=len(self._workers) - busy,
                busy_workers=busy,
                tasks_pending=len(self._pending),
                tasks_running=busy,
                tasks_done=self._tasks_done,
                workers_replaced=self._replaced,
                live_segments=len(segs),
                live_segment_bytes=sum(s.size for s in segs),
            )

    def __del__(self) -> None:
        if getattr(self, "_workers", None):
            import warnings

            warnings.warn(f"unclosed running pool {self!r}", ResourceWarning, stacklevel=2)
            self._kill_all()


# Workers keep received segments mapped while another process holds them (see _poolworker).
# When this process closes a segment, tell the workers that retain some to look again.
_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


def _sweep_workers() -> None:
    """Send :data:`SWEEP` to every worker that retains segments (from any thread, even a
    finalizer: one non-blocking send per worker; a full channel means it will sweep after
    the tasks it has anyway)."""
    try:
        pools = list(_pools)
    except RuntimeError:  # the set changed under us (another thread): skip this one
        return
    for pool in pools:
        for worker in list(pool._workers):
            try:
                if worker.taken.retained and not worker.tasks.closed:
                    worker.tasks.try_send_record(SWEEP, [])
            except (OSError, ValueError):  # closing concurrently
                pass


_segment.set_close_hook(_sweep_workers)


def _kill_if_alive(proc: Any) -> None:
    try:
        if proc.is_alive():
            proc.kill()
    except ValueError:  # reaped and closed already
        pass


def _close_popen(proc: Any) -> None:
    popen = getattr(proc, "_popen", None)
    close = getattr(popen, "close", None)
    if popen is not None and getattr(popen, "returncode", None) is not None and callable(close):
        close()


def _exit_text(exitcode: int | None) -> str:
    name = signal_name_of(exitcode) if exitcode is not None else None
    return f"signal {name}" if name else f"exit code {exitcode}"


def _remote_error(original: Any, type_name: str, tb_text: str) -> BaseException:
    if isinstance(original, Exception):
        original.__cause__ = RemoteTraceback(str(tb_text))
        return original
    error = ProcessRaisedException(
        f"a pool task raised {type_name}:\n{tb_text}", 0, -1, str(type_name), str(tb_text)
    )
    error.__cause__ = RemoteTraceback(str(tb_text))
    return error


# --------------------------------------------------------------------------- run_sync

_default_pool: anyio.lowlevel.RunVar[Pool] = anyio.lowlevel.RunVar("aioshm_default_pool")
_default_limiter: anyio.lowlevel.RunVar[anyio.CapacityLimiter] = anyio.lowlevel.RunVar(
    "aioshm_default_limiter"
)


def _kill_at_loop_end(pool: Pool) -> None:
    """Stop ``pool``'s workers when the event loop ends (anyio.to_process does the same)."""
    import sniffio

    lib = sniffio.current_async_library()
    if lib == "trio":
        import trio

        async def guard_trio() -> None:
            try:
                await trio.sleep_forever()
            finally:
                pool._shutdown_now()

        trio.lowlevel.spawn_system_task(guard_trio)
    else:
        import asyncio

        async def guard_asyncio() -> None:
            try:
                await asyncio.sleep(math.inf)
            finally:
                pool._shutdown_now()

        # asyncio.run / anyio.run cancel the tasks left at the end of the loop
        pool._guard = asyncio.get_running_loop().create_task(guard_asyncio())


def current_default_pool() -> Pool:
    """The pool ``run_sync`` uses in this event loop (made on first use)."""
    try:
        return _default_pool.get()
    except LookupError:
        pool = Pool(os.cpu_count() or 1, _lazy=True)
        _default_pool.set(pool)
        _kill_at_loop_end(pool)
        return pool


def current_default_limiter() -> anyio.CapacityLimiter:
    """``run_sync``'s default capacity limiter: ``os.cpu_count()`` calls at once."""
    try:
        return _default_limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(os.cpu_count() or 1)
        _default_limiter.set(limiter)
        return limiter


async def run_sync(
    func: Callable[..., Any],
    *args: Any,
    cancellable: bool = False,
    limiter: anyio.CapacityLimiter | None = None,
    backend: Any = None,
) -> Any:
    """Run ``func(*args)`` in a worker process of the loop's default pool and return its value.

    ``anyio.to_process.run_sync`` semantics: at most ``limiter`` calls at once (default: CPU
    count), workers reused and retired after 5 minutes idle, keyword arguments through
    :func:`functools.partial`; arrays travel as shared-memory handles both ways. With
    ``cancellable=False`` (the default) the call is shielded from cancellation until it
    finishes; with ``True``, cancelling kills the worker running it. ``backend`` runs the
    call elsewhere (e.g. an :class:`aioshm.RayBackend`).
    """
    if backend is not None and getattr(backend, "name", "local") != "local":
        return await backend.run_sync(func, *args, cancellable=cancellable, limiter=limiter)
    pool = current_default_pool()
    _retire_idle(pool)
    async with limiter or current_default_limiter():
        result = pool.apply_async(func, args, cancellable=cancellable)
        if cancellable:
            return await result
        with anyio.CancelScope(shield=True):
            return await result


def _retire_idle(pool: Pool) -> None:
    now = time.monotonic()
    with pool._mutex:
        for worker in list(pool._workers):
            if not worker.inflight and now - worker.idle_since > WORKER_MAX_IDLE_TIME:
                pool._send_exit(worker)
