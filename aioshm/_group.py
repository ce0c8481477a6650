"""``await aioshm.spawn(fn, nprocs=n)``: process groups with an awaitable face.

:class:`AsyncProcessContext` is torch's :class:`~aioshm._spawn.ProcessContext` (the blocking
``join(timeout, grace_period)`` and ``pids()`` keep torch's semantics) plus:

* ``await ctx`` → the per-rank return values, in rank order;
* ``await ctx.join_async(timeout, grace_period)``, ``async with ctx``;
* the first failing rank stops the others (SIGTERM, ``grace_period`` seconds — 2 by default on
  the async face — then SIGKILL) and raises torch-style ``ProcessRaisedException`` /
  ``ProcessExitedException`` with the original exception chained;
* cancelling the awaiting task terminates and reaps every rank before the cancellation
  propagates.

Every wait is one ``wait_readable`` on an epoll fd holding the live sentinels and result pipes.
"""

from __future__ import annotations

import math
import select
import time
import warnings
from collections.abc import Awaitable, Callable, Generator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, overload

import anyio
import anyio.lowlevel

from . import _spawn
from ._backend import resolve
from ._context import DEFAULT_START_METHOD
from ._process import DEFAULT_GRACE_PERIOD, Lost, report_of
from ._transport._proc import wait_reapable
from ._transport._waits import MultiWait, current_async_library
from ._typing import ReturnT, Ts

if TYPE_CHECKING:
    from ._backend import Backend

__all__ = ("DEFAULT_START_METHOD", "AsyncProcessContext", "spawn", "start_processes")

_IN = select.POLLIN


def _ready(fds: list[int]) -> set[int]:
    p = select.poll()
    for fd in fds:
        p.register(fd, _IN)
    return {fd for fd, _ in p.poll(0)}


class AsyncProcessContext(_spawn.ProcessContext[ReturnT]):
    """A started group of ranks: torch's ``ProcessContext`` with an awaitable face.

    ``AsyncProcessContext[R]``: each rank's function returns ``R``; ``await ctx`` gives a
    ``list[R]`` in rank order.
    """

    grace_period: float = DEFAULT_GRACE_PERIOD

    def __await__(self) -> Generator[Any, None, list[ReturnT]]:
        return self._all_results().__await__()

    async def _all_results(self) -> list[ReturnT]:
        while not await self.join_async(grace_period=self.grace_period):
            pass
        return list(self.results)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            await self._stop_all_async(self.grace_period, wait_first=False)
        else:
            await self._all_results()

    async def join_async(
        self, timeout: float | None = None, grace_period: float | None = None
    ) -> bool:
        """Awaitable :meth:`join`: True once every rank exited successfully.

        False when ``timeout`` expires first. On the first failure the others are stopped
        (``grace_period`` defaults to 2 s here) and the failure is raised (again by every
        later call).
        """
        if self._error_index is not None:
            await anyio.lowlevel.checkpoint()
            raise self._raise_error(self._error_index)
        if not self.sentinels:
            self._close_all_conns()
            await anyio.lowlevel.checkpoint()
            return True
        grace = self.grace_period if grace_period is None else grace_period
        try:
            ranks = await self._wait_async(timeout)
        except BaseException:
            await self._stop_all_async(grace, wait_first=False)
            raise
        error_index = next((i for i in ranks if self._failed(i)), None)
        if error_index is None:
            for index in ranks:
                self.results[index] = self._value(index)
            if not self.sentinels:
                self._close_all_conns()
                return True
            return False
        self._error_index = error_index
        await self._stop_all_async(grace, wait_first=False)
        raise self._raise_error(error_index)

    async def _receive_async(self, index: int) -> None:
        conn = self._conns.get(index)
        if conn is None:
            return
        try:
            msg = await conn.recv_async()  # type: ignore[attr-defined]
        except (EOFError, OSError):
            pass
        except Exception as exc:
            self._reports.setdefault(index, Lost(exc))
        else:
            self._reports.setdefault(index, report_of(msg))
        self._close_conn(index)

    async def _wait_async(self, timeout: float | None) -> list[int]:
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while True:
            fds = [*self.sentinels, *self._reader_fds]
            if not fds:
                return []
            waiter = MultiWait([(fd, _IN) for fd in fds])
            try:
                with anyio.move_on_after(deadline - time.monotonic()):
                    await waiter.wait()
            finally:
                waiter.close()
            ready = _ready(fds)
            if not ready:
                return []
            exited = [fd for fd in ready if fd in self.sentinels]
            for fd in ready:
                if fd in self._reader_fds and fd not in exited:
                    index = self._reader_fds[fd]
                    if self.processes[index].exitcode is None:
                        await self._receive_async(index)
            if exited:
                ranks = []
                for sentinel in exited:
                    index = self.sentinels.pop(sentinel)
                    pid = self.processes[index].pid
                    if pid is not None:
                        try:
                            await wait_reapable(pid)
                        except BaseException:
                            self.sentinels[sentinel] = index  # still ours to stop and reap
                            raise
                    self._reap(index)  # reapable now: join() does not block
                    self._receive(index, exited=True)
                    ranks.append(index)
                return ranks

    async def _stop_all_async(self, grace_period: float, *, wait_first: bool) -> None:
        """SIGTERM every live rank, wait up to ``grace_period``, SIGKILL, reap: shielded."""
        from ._transport._proc import stop_async

        with anyio.CancelScope(shield=True):
            if wait_first and grace_period:
                with anyio.move_on_after(grace_period):
                    while self.sentinels and await self._wait_async(None):
                        pass
            await stop_async(self.processes, grace_period)
            for index in range(len(self.processes)):
                self._reap(index)
            for index in list(self._conns):
                self._receive(index, exited=True)
            self.sentinels.clear()
            self._close_all_conns()


def _warn_fork_in_loop(start_method: str) -> None:
    if start_method != "fork":
        return
    if current_async_library() is None:
        return
    warnings.warn(
        "aioshm: starting processes with 'fork' while an event loop is running is unsafe "
        "(the child inherits the loop and its threads); prefer 'forkserver' or 'spawn'",
        RuntimeWarning,
        stacklevel=4,
    )


# ``fn(rank, *args)``: the rank first, then ``args``, checked against ``fn``'s parameters. With
# a backend the result is that backend's awaitable context (``await`` gives the same list).
@overload
def start_processes(
    fn: Callable[[int], ReturnT],
    args: tuple[()] = (),
    nprocs: int = 1,
    *,
    daemon: bool = False,
    start_method: str | None = None,
    backend: None = None,
) -> AsyncProcessContext[ReturnT]: ...
@overload
def start_processes(
    fn: Callable[[int, *Ts], ReturnT],
    args: tuple[*Ts],
    nprocs: int = 1,
    *,
    daemon: bool = False,
    start_method: str | None = None,
    backend: None = None,
) -> AsyncProcessContext[ReturnT]: ...
@overload
def start_processes(
    fn: Callable[[int], ReturnT],
    args: tuple[()] = (),
    nprocs: int = 1,
    *,
    daemon: bool = False,
    start_method: str | None = None,
    backend: Backend,
) -> Awaitable[list[ReturnT]]: ...
@overload
def start_processes(
    fn: Callable[[int, *Ts], ReturnT],
    args: tuple[*Ts],
    nprocs: int = 1,
    *,
    daemon: bool = False,
    start_method: str | None = None,
    backend: Backend,
) -> Awaitable[list[ReturnT]]: ...
def start_processes(
    fn: Callable[..., object],
    args: Sequence[object] = (),
    nprocs: int = 1,
    *,
    daemon: bool = False,
    start_method: str | None = None,
    backend: Backend | None = None,
) -> Awaitable[list[Any]]:
    """Start ``nprocs`` processes running ``fn(rank, *args)``; return the context at once.

    ``await`` the context for the return values in rank order. The default start method is
    :data:`DEFAULT_START_METHOD` (forkserver on Linux); ``fork`` only on request, with a
    warning when an event loop is running.
    """
    return _start(fn, args, nprocs, daemon, start_method, backend)


def _start(
    fn: Callable[..., object],
    args: Sequence[object],
    nprocs: int,
    daemon: bool,
    start_method: str | None,
    backend: Backend | None,
) -> Awaitable[list[Any]]:
    """:func:`start_processes` and :func:`spawn`, unchecked (their overloads check callers)."""
    engine = resolve(backend)
    if engine is not None:
        return engine.spawn(fn, args, nprocs, daemon=daemon, start_method=start_method)  # type: ignore[no-any-return]
    method = start_method or DEFAULT_START_METHOD
    _warn_fork_in_loop(method)
    return _spawn._start(fn, args, nprocs, daemon, method, AsyncProcessContext)


@overload
def spawn(
    fn: Callable[[int], ReturnT],
    args: tuple[()] = (),
    nprocs: int = 1,
    *,
    daemon: bool = False,
    start_method: str | None = None,
    backend: None = None,
) -> AsyncProcessContext[ReturnT]: ...
@overload
def spawn(
    fn: Callable[[int, *Ts], ReturnT],
    args: tuple[*Ts],
    nprocs: int = 1,
    *,
    daemon: bool = False,
    start_method: str | None = None,
    backend: None = None,
) -> AsyncProcessContext[ReturnT]: ...
@overload
def spawn(
    fn: Callable[[int], ReturnT],
    args: tuple[()] = (),
    nprocs: int = 1,
    *,
    daemon: bool = False,
    start_method: str | None = None,
    backend: Backend,
) -> Awaitable[list[ReturnT]]: ...
@overload
def spawn(
    fn: Callable[[int, *Ts], ReturnT],
    args: tuple[*Ts],
    nprocs: int = 1,
    *,
    daemon: bool = False,
    start_method: str | None = None,
    backend: Backend,
) -> Awaitable[list[ReturnT]]: ...
def spawn(
    fn: Callable[..., object],
    args: Sequence[object] = (),
    nprocs: int = 1,
    *,
    daemon: bool = False,
    start_method: str | None = None,
    backend: Backend | None = None,
) -> Awaitable[list[Any]]:
    """``await aioshm.spawn(fn, args, nprocs)`` → ``[fn(0, *args), fn(1, *args), …]``.

    Returns the :class:`AsyncProcessContext` at once (the processes are running); awaiting it
    gives the per-rank return values in rank order, or raises the first failure after the
    other ranks were stopped. ``backend`` runs the ranks elsewhere (e.g. an
    :class:`aioshm.RayBackend`); the default is local processes.
    """
    return _start(fn, args, nprocs, daemon, start_method, backend)
