"""Process groups with torch's semantics: ``spawn``, ``start_processes``, ``ProcessContext``.

``fn(rank, *args)`` runs in one process per rank. The first rank that fails makes ``join`` stop
the others (SIGTERM, a grace period, then SIGKILL) and raise
:class:`~aioshm._exceptions.ProcessRaisedException` (the child raised; the original exception is
its ``__cause__`` when it could be pickled) or
:class:`~aioshm._exceptions.ProcessExitedException` (the child died without a result).

Beyond torch: every rank's return value travels back (``ProcessContext.results``), the original
exception type survives, and a child's ``KeyboardInterrupt`` counts as a failure.

Each rank reports over its own one-way pipe, which ``join`` drains while it waits on the process
sentinels, so a child blocked writing a large traceback or result never deadlocks the join.
No anyio here: this is the synchronous face, and the code that runs in the child.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.process import BaseProcess
from typing import Any, Generic, Protocol, TypeVar, overload

from . import _connection, _procutil, _reduction
from ._exceptions import ProcessException
from ._process import Lost, rebuild_failure, report_of, run_and_report
from ._typing import ReturnT, Ts
from ._wire._report import Report, Returned

__all__ = (
    "ENV_VAR_PARALLEL_START",
    "ProcessContext",
    "spawn",
    "start_processes",
)

log = logging.getLogger(__name__)

ENV_VAR_PARALLEL_START = "TORCH_MP_PARALLEL_START"

# Default grace period between SIGTERM and SIGKILL when a rank fails (torch's value).
_DEFAULT_GRACE_PERIOD = 30.0

# Grace period used when the parent itself is interrupted while joining (Ctrl-C, an error).
_INTERRUPT_GRACE_PERIOD = 5.0

# The pipe factory for the result channel, called as ``_Pipe(duplex=False)`` → (reader, writer).
# Only send, recv, poll, fileno and close are used on its ends.
_Pipe = _connection.Pipe


class _ResultConnection(Protocol):
    """The part of a connection that the result channel uses."""

    def send(self, obj: Any) -> None: ...
    def recv(self) -> Any: ...
    def poll(self, timeout: float | None = ...) -> bool: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# child side


def _wrap(
    fn: Callable[..., object], rank: int, args: Sequence[object], result_conn: _ResultConnection
) -> None:
    """Child entry point: run ``fn(rank, *args)`` and report its outcome to the parent.

    The runner of :mod:`aioshm._process` (Note [One child runner, one rebuilder]) sends the
    report; a failure (``KeyboardInterrupt`` included, and a return value that cannot be
    pickled) exits with code 1. ``SystemExit`` passes through untouched (its code is the exit
    code).
    """
    _procutil.arm_parent_death_watch()
    try:
        failure = run_and_report(
            result_conn.send,
            fn,
            (rank, *args),
            {},
            f"process {rank}: the return value of {_fn_name(fn)}",
        )
    finally:
        result_conn.close()
    if failure is not None:
        sys.exit(1)


def _fn_name(fn: Callable[..., object]) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return f"{name}()" if name else repr(fn)


# ---------------------------------------------------------------------------------------------
# parent side


class ProcessContext(Generic[ReturnT]):
    """A started group of ranks (torch's ``ProcessContext``), plus their return values.

    Generic in what each rank's function returns (``ProcessContext[R]``).

    ``processes[i]`` runs rank ``i``; ``result_conns[i]`` is the reading end of its result pipe
    (the context owns it and closes it). ``results[i]`` holds rank ``i``'s return value once
    :meth:`join` has returned True (None for a rank that exited with code 0 without returning,
    such as ``sys.exit(0)``); after a failure it holds what the successful ranks returned.

    Once ``join`` has reaped a rank, it also closes the fds that rank's ``Process`` object kept
    for waiting: ``exitcode``, ``is_alive()`` and ``join()`` keep working, ``sentinel`` does not.
    """

    def __init__(
        self,
        processes: Sequence[BaseProcess],
        result_conns: Sequence[_ResultConnection | None],
    ) -> None:
        if len(processes) != len(result_conns):
            raise ValueError("one result connection per process is required")
        self.processes: list[BaseProcess] = list(processes)
        self.results: list[Any] = [None] * len(self.processes)
        # sentinel fd -> rank, for ranks not reaped yet (torch's attribute name).
        self.sentinels: dict[int, int] = {}
        for index, process in enumerate(self.processes):
            self.sentinels[process.sentinel] = index
        self._conns: dict[int, _ResultConnection] = {}
        self._reader_fds: dict[int, int] = {}  # reader fd -> rank
        for index, conn in enumerate(result_conns):
            if conn is not None:
                self._conns[index] = conn
                self._reader_fds[conn.fileno()] = index
        # rank -> the report it sent, or Lost when one came that could not be received
        self._reports: dict[int, Report | Lost] = {}
        self._error_index: int | None = None

    def pids(self) -> list[int]:
        """The process ids, in rank order."""
        return [int(p.pid) if p.pid is not None else -1 for p in self.processes]

    # -- the result pipes -----------------------------------------------------------------

    def _receive(self, index: int, *, exited: bool) -> None:
        """Read rank ``index``'s report if one is there, and close its pipe once it is done.

        While the rank runs, a readable pipe means a report is coming (or EOF): a blocking
        ``recv`` completes as the child writes. Once it has exited, whatever it wrote is already
        in the pipe, so the fd is made non-blocking first: a report cut short by a kill (with a
        forked grandchild still holding the write end) must not block the parent.
        """
        conn = self._conns.get(index)
        if conn is None:
            return
        try:
            if exited:
                try:
                    os.set_blocking(conn.fileno(), False)
                except OSError:
                    pass
            if conn.poll(0):
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    pass
                except Exception as exc:
                    self._reports.setdefault(index, Lost(exc))
                else:
                    self._reports.setdefault(index, report_of(msg))
                self._close_conn(index)
            elif exited:
                self._close_conn(index)
        except BaseException:
            self._close_conn(index)
            raise

    def _close_conn(self, index: int) -> None:
        conn = self._conns.pop(index, None)
        if conn is None:
            return
        for fd, rank in list(self._reader_fds.items()):
            if rank == index:
                del self._reader_fds[fd]
        conn.close()

    def _close_all_conns(self) -> None:
        for index in list(self._conns):
            self._close_conn(index)

    # -- waiting ---------------------------------------------------------------------------

    def _wait(self, timeout: float | None) -> list[int]:
        """Wait on the live sentinels and open pipes; drain readable pipes; return exited ranks.

        Returns as soon as at least one rank exited, or an empty list when ``timeout`` expires.
        Each returned rank is reaped and its pipe drained and closed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            waitables = [*self.sentinels, *self._reader_fds]
            if not waitables:
                return []
            ready = multiprocessing.connection.wait(waitables, remaining)
            exited: list[int] = []
            for obj in ready:
                assert isinstance(obj, int)
                if obj in self._reader_fds:
                    self._receive(self._reader_fds[obj], exited=False)
                elif obj in self.sentinels:
                    exited.append(obj)
            if exited:
                ranks = []
                for sentinel in exited:
                    index = self.sentinels.pop(sentinel)
                    self._reap(index)
                    self._receive(index, exited=True)
                    ranks.append(index)
                return ranks
            if not ready:
                return []

    def _reap(self, index: int) -> None:
        """Join rank ``index`` and release the fds its process object keeps for waiting.

        A reaped ``Process`` still answers ``exitcode``, ``is_alive()`` and ``join()`` (they use
        the stored return code), but its ``sentinel`` is closed from then on.
        """
        process = self.processes[index]
        process.join()
        popen = getattr(process, "_popen", None)
        if popen is not None and getattr(popen, "returncode", None) is not None:
            close = getattr(popen, "close", None)
            if callable(close):
                close()

    def _join_all(self, timeout: float) -> None:
        """Reap ranks (draining pipes) until none is left or ``timeout`` seconds have passed."""
        deadline = time.monotonic() + timeout
        while self.sentinels:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._wait(remaining):
                return

    def _failed(self, index: int) -> bool:
        return self._error(index) is not None

    def _value(self, index: int) -> Any:
        """What rank ``index`` returned (None if it sent no value)."""
        report = self._reports.get(index)
        return report.value if isinstance(report, Returned) else None

    def _stop_all(self, grace_period: float | None, *, wait_first: bool = True) -> None:
        """torch's shutdown: (wait out ``grace_period``), SIGTERM, wait, SIGKILL, reap, close.

        ``wait_first=False`` skips the first wait (the parent was interrupted: stop at once).
        """
        try:
            if grace_period is not None and wait_first:
                self._join_all(grace_period)
            for process in self.processes:
                if process.is_alive():
                    log.info("Terminating process %s via signal SIGTERM", process.pid)
                    process.terminate()
            self._join_all(_DEFAULT_GRACE_PERIOD if grace_period is None else grace_period)
        finally:
            for process in self.processes:
                if process.is_alive():
                    log.warning(
                        "Unable to shutdown process %s via SIGTERM , forcefully exiting via "
                        "SIGKILL",
                        process.pid,
                    )
                    process.kill()
            for index in range(len(self.processes)):
                self._reap(index)
            for index in list(self._conns):
                self._receive(index, exited=True)
            self.sentinels.clear()
            self._close_all_conns()

    def join(self, timeout: float | None = None, grace_period: float | None = None) -> bool:
        """Wait for the ranks (torch's algorithm); True once all of them exited successfully.

        Returns False when ``timeout`` expires or when only some ranks have exited so far; call
        it again (``while not ctx.join(): pass``). Once it returned True it keeps returning True.
        On the first failure the other ranks get ``grace_period`` seconds to exit by themselves
        (when given), then SIGTERM, then ``grace_period`` (default 30 s) more, then SIGKILL; all
        are reaped, every pipe is closed, and the failure is raised as
        :class:`ProcessRaisedException` or :class:`ProcessExitedException` (again by every
        later call). If the wait itself is interrupted (an exception in the parent, such as
        KeyboardInterrupt), every rank is stopped the same way, at once, before it propagates.
        """
        if self._error_index is not None:
            raise self._raise_error(self._error_index)
        if not self.sentinels:
            self._close_all_conns()
            return True
        try:
            ranks = self._wait(timeout)
        except BaseException:
            # The parent was interrupted (Ctrl-C, pytest-timeout, ...): leave no orphans.
            self._stop_all(_INTERRUPT_GRACE_PERIOD, wait_first=False)
            raise
        error_index = None
        for index in ranks:
            if self._failed(index):
                if error_index is None:
                    error_index = index
            else:
                self.results[index] = self._value(index)
        if error_index is None:
            if not self.sentinels:
                self._close_all_conns()
                return True
            return False
        self._error_index = error_index
        self._stop_all(grace_period)
        raise self._raise_error(error_index)

    def _error(self, index: int) -> BaseException | None:
        """Rank ``index``'s failure (:func:`~aioshm._process.rebuild_failure`), or None."""
        process = self.processes[index]
        return rebuild_failure(
            self._reports.get(index),
            process.exitcode,
            who=f"process {index}",
            pid=int(process.pid) if process.pid is not None else -1,
            index=index,
            group=True,
        )

    def _raise_error(self, index: int) -> ProcessException:
        """The exception for failed rank ``index``, with the original as ``__cause__``."""
        error = self._error(index)
        assert isinstance(error, ProcessException)
        return error


# ---------------------------------------------------------------------------------------------
# starting


def _kill_and_reap(processes: Iterable[BaseProcess]) -> None:
    """Best-effort cleanup of a half-started group: SIGKILL what runs, reap everything."""
    for process in processes:
        if process.pid is not None and process.is_alive():
            process.kill()
    for process in processes:
        if process.pid is not None:
            process.join()


_ContextT = TypeVar("_ContextT", bound=ProcessContext)


def _start(
    fn: Callable[..., object],
    args: Sequence[object],
    nprocs: int,
    daemon: bool,
    start_method: str,
    context_class: type[_ContextT],
) -> _ContextT:
    """Start the ranks and return a ``context_class`` over them (shared with the async face)."""
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be a positive int, got {nprocs!r}")
    ctx = multiprocessing.get_context(start_method)
    args = tuple(args)
    processes: list[BaseProcess] = []
    readers: list[_ResultConnection] = []
    writers: list[_ResultConnection] = []
    try:
        if start_method == "forkserver":
            _procutil.ensure_forkserver()  # the server imports the main script once
        parallel = (
            start_method == "forkserver" and os.environ.get(ENV_VAR_PARALLEL_START, "0") == "1"
        )

        def make(rank: int) -> BaseProcess:
            reader, writer = _Pipe(duplex=False)
            readers.append(reader)
            writers.append(writer)
            process: BaseProcess = ctx.Process(  # type: ignore[attr-defined]
                target=_wrap, args=(fn, rank, args, writer), daemon=daemon
            )
            processes.append(process)
            return process

        if parallel:
            for rank in range(nprocs):
                make(rank)
            with concurrent.futures.ThreadPoolExecutor(
                max_workers=max(1, nprocs), thread_name_prefix="aioshm-start"
            ) as executor:
                futures = [executor.submit(p.start) for p in processes]
                errors = [f.exception() for f in futures]
            for error in errors:
                if error is not None:
                    raise error
            for process in processes:
                _reduction.release_spawn_fds(getattr(process, "_popen", None))
            for writer in writers:
                writer.close()
        else:
            for rank in range(nprocs):
                process = make(rank)
                if start_method == "fork":
                    with _procutil.signals_deferred_over_fork():
                        process.start()
                else:
                    process.start()
                _reduction.release_spawn_fds(getattr(process, "_popen", None))
                # Close the parent's write end before the next start, so that under fork a
                # later sibling does not inherit it.
                writers[rank].close()
    except BaseException:
        for conn in (*writers, *readers):
            conn.close()
        _kill_and_reap(processes)
        raise

    return context_class(processes, readers)


# ``fn(rank, *args)``: the rank first, then ``args``, checked against ``fn``'s parameters.
@overload
def start_processes(
    fn: Callable[[int], ReturnT],
    args: tuple[()] = (),
    nprocs: int = 1,
    join: bool = True,
    daemon: bool = False,
    start_method: str = "spawn",
) -> ProcessContext[ReturnT] | None: ...
@overload
def start_processes(
    fn: Callable[[int, *Ts], ReturnT],
    args: tuple[*Ts],
    nprocs: int = 1,
    join: bool = True,
    daemon: bool = False,
    start_method: str = "spawn",
) -> ProcessContext[ReturnT] | None: ...
def start_processes(
    fn: Callable[..., object],
    args: Sequence[object] = (),
    nprocs: int = 1,
    join: bool = True,
    daemon: bool = False,
    start_method: str = "spawn",
) -> ProcessContext[Any] | None:
    """Start ``nprocs`` processes running ``fn(rank, *args)`` (torch's ``start_processes``).

    ``fn`` must be importable by the children under ``spawn`` and ``forkserver``. With
    ``start_method="forkserver"`` and ``TORCH_MP_PARALLEL_START=1`` in the environment the
    processes are started from a thread pool. With ``join=True`` this waits for all of them
    and returns None (raising on the first failure); otherwise it returns the
    :class:`ProcessContext`.
    """
    return _start_processes(fn, args, nprocs, join, daemon, start_method)


def _start_processes(
    fn: Callable[..., object],
    args: Sequence[object],
    nprocs: int,
    join: bool,
    daemon: bool,
    start_method: str,
) -> ProcessContext[Any] | None:
    """:func:`start_processes` and :func:`spawn`, unchecked (their overloads check callers)."""
    context = _start(fn, args, nprocs, daemon, start_method, ProcessContext)
    if not join:
        return context
    while not context.join():
        pass
    return None


@overload
def spawn(
    fn: Callable[[int], ReturnT],
    args: tuple[()] = (),
    nprocs: int = 1,
    join: bool = True,
    daemon: bool = False,
    start_method: str = "spawn",
) -> ProcessContext[ReturnT] | None: ...
@overload
def spawn(
    fn: Callable[[int, *Ts], ReturnT],
    args: tuple[*Ts],
    nprocs: int = 1,
    join: bool = True,
    daemon: bool = False,
    start_method: str = "spawn",
) -> ProcessContext[ReturnT] | None: ...
def spawn(
    fn: Callable[..., object],
    args: Sequence[object] = (),
    nprocs: int = 1,
    join: bool = True,
    daemon: bool = False,
    start_method: str = "spawn",
) -> ProcessContext[Any] | None:
    """torch's ``spawn``: :func:`start_processes` with ``start_method="spawn"``, always.

    Any other ``start_method`` is ignored with a :class:`FutureWarning`.
    """
    if start_method != "spawn":
        msg = (
            f"This method only supports start_method=spawn (got: {start_method}).\n"
            "To use a different start_method use:\n\t\t"
            " aioshm.multiprocessing.start_processes(...)"
        )
        warnings.warn(msg, FutureWarning, stacklevel=2)
    return _start_processes(fn, args, nprocs, join, daemon, "spawn")
