"""``Process``: the stdlib process classes, plus a return value and an awaitable face.

The classes here subclass the stdlib ones for each start method, so every blocking method
(``start``, ``join``, ``terminate``, ``kill``, ``close``, ``is_alive``, ``exitcode``, ``pid``,
``sentinel``) is the stdlib's. Added:

* the target's return value travels back over a result pipe (aioshm ``Connection``: arrays as
  shared-memory handles); an exception travels back as the original object plus its formatted
  traceback: one outcome report (:mod:`aioshm._wire._report`), sent by the one child runner
  and rebuilt by the one rebuilder below, which spawn ranks and pool workers share (Note
  [One child runner, one rebuilder]);
* ``await p`` starts the process if needed and returns the target's return value, or re-raises
  the child's exception as its original type with a :class:`~aioshm.RemoteTraceback` as
  ``__cause__``; a child that died without a result raises
  :class:`~aioshm.ProcessExitedException` (exit code, signal name) as soon as it is gone,
  because every wait races the process sentinel;
* ``await p.join_async(timeout)``, and ``async with p`` which terminates, waits a grace period,
  kills and reaps the child if the block exits with an error or is cancelled. Cancelling
  ``await p`` does the same before the cancellation propagates: an awaited child never outlives
  its awaiting task.

The async methods import :mod:`aioshm._transport` lazily; children never import anyio.
"""

from __future__ import annotations

import contextlib
import multiprocessing.context as _mp_context
import pickle
import sys
import traceback
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Self, overload

from . import _procutil, _reduction
from ._connection import Connection, Pipe
from ._exceptions import (
    ProcessExitedException,
    ProcessRaisedException,
    ProtocolError,
    RemoteTraceback,
    signal_name_of,
)
from ._typing import ReturnT, Ts
from ._wire._report import Raised, Report, Returned, decode_report, encode_report

__all__ = (
    "DEFAULT_GRACE_PERIOD",
    "ForkProcess",
    "ForkServerProcess",
    "Lost",
    "Process",
    "SpawnProcess",
    "raised_report",
    "rebuild_failure",
    "report_of",
    "run_and_report",
    "run_target",
    "send_report",
)

#: Seconds between SIGTERM and SIGKILL when aioshm stops a child on error or cancellation.
DEFAULT_GRACE_PERIOD = 2.0

_NO_REPORT = object()


# ---------------------------------------------------------------------------------------------
# Note [One child runner, one rebuilder]
#
# A Process child, a spawn rank and a pool worker (per task) all end the same way: the child
# runs its target with run_target(), turns the outcome into a Report (_wire/_report.py) and
# sends it with send_report(), which falls back to a Raised report naming the value when a
# return value cannot be pickled. The parent turns whatever arrived (a decoded Report, a Lost
# report it could not receive, or nothing) plus the exit code into a result or an exception in
# rebuild_failure(), and nowhere else. A child killed by a signal is ProcessExitedException
# naming the signal whatever part of a report it had written; a complete Raised report wins.


def _type_name(tp: type) -> str:
    """``ValueError`` for builtins, ``package.module.Class`` otherwise."""
    module = getattr(tp, "__module__", None)
    if module in (None, "builtins", "__builtin__"):
        return tp.__qualname__
    return f"{module}.{tp.__qualname__}"


def _round_trips(obj: object) -> bool:
    """Whether ``obj`` survives a ForkingPickler dump and a load (so the parent can rebuild it)."""
    try:
        pickle.loads(ForkingPickler.dumps(obj))
    except Exception:
        return False
    return True


def raised_report(exc: BaseException, key: int | None = None) -> Raised:
    """The report of ``exc``: type name, formatted traceback, the exception if it pickles."""
    tb_text = "".join(traceback.format_exception(exc))
    return Raised(_type_name(type(exc)), tb_text, exc if _round_trips(exc) else None, key)


def _run(
    fn: Callable[..., object],
    args: Sequence[object],
    kwargs: Mapping[str, object],
    key: int | None,
) -> tuple[Report, BaseException | None]:
    try:
        value = fn(*args, **kwargs)
    except (Exception, KeyboardInterrupt) as exc:  # a child's Ctrl-C is a failure too
        return raised_report(exc, key), exc
    return Returned(value, key), None


def run_target(
    fn: Callable[..., object],
    args: Sequence[object] = (),
    kwargs: Mapping[str, object] | None = None,
    key: int | None = None,
) -> Report:
    """Child side: call ``fn(*args, **kwargs)`` and capture its outcome as a report.

    ``KeyboardInterrupt`` is captured as a failure; ``SystemExit`` passes through."""
    return _run(fn, args, kwargs or {}, key)[0]


def send_report(
    send: Callable[[object], object], report: Report, what: str
) -> BaseException | None:
    """Child side: send ``report`` with ``send`` (a connection's or channel's ``send``).

    A return value that cannot be pickled is reported as a :class:`pickle.PicklingError`
    naming ``what`` ("the return value of f()") and the value's type; that error is returned
    (else None). A parent that is gone needs nothing: that is not an error here."""
    if isinstance(report, Returned):
        try:
            send(encode_report(report))
            return None
        except (BrokenPipeError, ConnectionResetError):
            return None
        except Exception as err:
            perr = pickle.PicklingError(
                f"{what} cannot be sent to the parent: a {_type_name(type(report.value))} "
                f"could not be pickled ({err!r})"
            )
            perr.__cause__ = err
            report = raised_report(perr, report.key)
            failure: BaseException | None = perr
    else:
        failure = None
    try:
        send(encode_report(report))
    except (BrokenPipeError, ConnectionResetError):
        pass
    except Exception:  # the exception itself would not go: its name and text still do
        with contextlib.suppress(Exception):
            send(encode_report(Raised(report.type_name, report.traceback, None, report.key)))
    return failure


def run_and_report(
    send: Callable[[object], object],
    fn: Callable[..., object],
    args: Sequence[object],
    kwargs: Mapping[str, object],
    what: str,
) -> BaseException | None:
    """Child side, the one runner of Process children and spawn ranks: run the target, send
    its outcome, return the exception it raised (or why its value could not be sent)."""
    report, raised = _run(fn, args, kwargs, None)
    failure = send_report(send, report, what)
    return raised if raised is not None else failure


@dataclass(frozen=True, slots=True)
class Lost:
    """Parent side: a report arrived but could not be received or decoded (``error`` says why)."""

    error: BaseException


def report_of(msg: object) -> Report | Lost:
    """Parent side: the report a received message carries, or :class:`Lost` if it is invalid."""
    try:
        return decode_report(msg)
    except ProtocolError as exc:
        return Lost(exc)


def rebuild_failure(
    report: Report | Lost | None,
    exitcode: int | None,
    *,
    who: str,
    pid: int = -1,
    index: int = 0,
    group: bool = False,
) -> BaseException | None:
    """Parent side, the one rebuilder: the exception for a child's outcome, or None if it
    succeeded (the value is then ``report.value``, or None when no report came).

    ``report`` is what arrived (None: nothing, or only a torn part), ``exitcode`` the child's
    (None if unknown: a pool task whose worker lives on), ``who`` names it in messages.

    * :class:`Raised`: the original exception type with a :class:`~aioshm.RemoteTraceback` as
      ``__cause__``; a ``KeyboardInterrupt`` or an exception that did not pickle becomes
      :class:`~aioshm.ProcessRaisedException` chained to the original (if any) and the
      ``RemoteTraceback``. With ``group`` (spawn ranks, torch's rule) it is always
      ``ProcessRaisedException`` whose message holds the remote traceback, chained to the
      original, which then carries no second copy. Each way the traceback prints once.
    * killed by a signal (whatever it had written): :class:`~aioshm.ProcessExitedException`
      with ``signal_name``.
    * :class:`Lost`: ``ProcessRaisedException`` whose ``__cause__`` says why.
    * no report: success for exit code 0, else ``ProcessExitedException``.
    """
    head = f"\n\n-- Process {index} terminated with the following error:\n" if group else ""
    if isinstance(report, Raised):
        name, tb_text, original = report.type_name, report.traceback, report.exception
        if not group and isinstance(original, Exception):
            original.__cause__ = RemoteTraceback(tb_text)
            return original
        if group:  # torch's message, holding the traceback; the original without a copy
            error = ProcessRaisedException(head + tb_text, index, pid, name, tb_text)
            error.__cause__ = original
            if original is not None:
                original.__cause__ = None
            return error
        # the traceback once, as the cause (of the original, when there is one)
        error = ProcessRaisedException(f"{who} raised {name}", index, pid, name, tb_text)
        if original is not None:
            original.__cause__ = RemoteTraceback(tb_text)
            error.__cause__ = original
        else:
            error.__cause__ = RemoteTraceback(tb_text)
        return error
    if isinstance(report, Returned) and (not group or exitcode == 0):
        return None
    signal_name = signal_name_of(exitcode) if exitcode is not None else None
    if signal_name is not None:
        return ProcessExitedException(
            f"{who} terminated with signal {signal_name}", index, pid, exitcode or -1, signal_name
        )
    if isinstance(report, Lost):
        lost = report.error
        tb_text = "".join(traceback.format_exception(lost))
        error = ProcessRaisedException(
            f"{head or who + ': '}its report could not be received by the parent:\n{tb_text}",
            index,
            pid,
            _type_name(type(lost)),
            tb_text,
        )
        error.__cause__ = lost
        return error
    if exitcode in (0, None):
        return None
    return ProcessExitedException(
        f"{who} terminated with exit code {exitcode}", index, pid, int(exitcode)
    )


class _ResultMixin(Generic[ReturnT]):
    """Adds the result pipe and the async face to a stdlib process class.

    Generic in the target's return type: ``Process(target=f, args=(x,))`` is a
    ``Process[R]`` when ``f`` returns ``R``, and ``await p`` (or ``p.result()``) gives an ``R``.
    """

    _result_w: Connection | None = None
    _result_r: Connection | None = None
    _report: Any = _NO_REPORT
    _async_state: Any = None
    grace_period: float = DEFAULT_GRACE_PERIOD

    if TYPE_CHECKING:
        # The stdlib's constructor, with the target's arguments checked against ``args`` and
        # its return type kept (for ``await p``). Checkers only: the stdlib's runs.
        @overload
        def __init__(
            self,
            group: None = None,
            *,
            target: Callable[[], ReturnT],
            name: str | None = None,
            daemon: bool | None = None,
        ) -> None: ...
        @overload
        def __init__(
            self,
            group: None = None,
            *,
            target: Callable[[*Ts], ReturnT],
            name: str | None = None,
            args: tuple[*Ts],
            daemon: bool | None = None,
        ) -> None: ...
        @overload
        def __init__(  # keyword arguments, or a list of arguments: not checked one by one
            self,
            group: None = None,
            *,
            target: Callable[..., ReturnT],
            name: str | None = None,
            args: list[Any] | tuple[Any, ...] = (),
            kwargs: Mapping[str, Any],
            daemon: bool | None = None,
        ) -> None: ...
        @overload
        def __init__(
            self,
            group: None = None,
            *,
            target: Callable[..., ReturnT],
            name: str | None = None,
            args: list[Any],
            daemon: bool | None = None,
        ) -> None: ...
        @overload
        def __init__(  # positional, as the stdlib allows: not checked one by one
            self,
            group: None,
            target: Callable[..., ReturnT] | None = None,
            name: str | None = None,
            args: Iterable[Any] = (),
            kwargs: Mapping[str, Any] = {},
            *,
            daemon: bool | None = None,
        ) -> None: ...
        @overload
        def __init__(  # no target: a subclass that overrides run()
            self, group: None = None, *, name: str | None = None, daemon: bool | None = None
        ) -> None: ...
        def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    # -- parent: starting -------------------------------------------------------------------
    def start(self) -> None:
        """Start the child (stdlib semantics), with a pipe for its result."""
        r, w = Pipe(duplex=False)
        self._result_w = w
        try:
            super().start()  # type: ignore[misc]
        except BaseException:
            r.close()
            raise
        finally:
            self._result_w = None
            w.close()
            _reduction.release_spawn_fds(getattr(self, "_popen", None))
        self._result_r = r

    def close(self) -> None:
        super().close()  # type: ignore[misc]
        if self._result_r is not None:
            self._result_r.close()
            self._result_r = None

    # -- child: running ---------------------------------------------------------------------
    def run(self) -> None:
        """Run the target and send its outcome to the parent (child side)."""
        conn = self._result_w
        if conn is None:  # a subclass called us some other way
            super().run()  # type: ignore[misc]
            return
        target = getattr(self, "_target", None)
        try:
            failure = run_and_report(
                conn.send,
                target if target is not None else _none,
                getattr(self, "_args", ()),
                getattr(self, "_kwargs", {}),
                f"the return value of the target of {self!r}",
            )
        finally:
            conn.close()
        if failure is not None:
            raise failure  # the stdlib prints it and exits with code 1

    # -- parent: results --------------------------------------------------------------------
    def _take_report(self, msg: Any) -> None:
        """Keep the first outcome message received (None: nothing came), close the pipe."""
        if self._report is _NO_REPORT and msg is not _NO_REPORT:
            self._report = None if msg is None else report_of(msg)
        if self._result_r is not None:
            self._result_r.close()
            self._result_r = None

    def _take_lost(self, error: BaseException) -> None:
        """A report arrived but could not be received (``error`` says why)."""
        if self._report is _NO_REPORT:
            self._report = Lost(error)
        self._take_report(_NO_REPORT)

    def _outcome(self) -> Any:
        """The return value, or raise the child's failure (after the child was reaped)."""
        report = None if self._report is _NO_REPORT else self._report
        pid = self.pid  # type: ignore[attr-defined]
        error = rebuild_failure(
            report,
            self.exitcode,  # type: ignore[attr-defined]
            who=f"process {self.name} (pid {pid})",  # type: ignore[attr-defined]
            pid=pid or -1,
        )
        if error is not None:
            raise error
        return report.value if isinstance(report, Returned) else None

    def result(self, timeout: float | None = None) -> ReturnT:
        """Blocking: wait for the child and return its result (or raise its failure)."""
        from multiprocessing.connection import wait

        if self._popen is None:  # type: ignore[attr-defined]
            self.start()
        conn = self._result_r
        if conn is not None and self._report is _NO_REPORT:
            ready = wait([conn, self.sentinel], timeout)  # type: ignore[attr-defined]
            if not ready:
                raise TimeoutError(f"{self!r} did not finish within {timeout} s")
            if conn in ready or conn.poll(0):
                try:
                    self._take_report(conn.recv())
                except (EOFError, OSError):
                    self._take_report(_NO_REPORT)
                except Exception as exc:
                    self._take_lost(exc)
        self.join()  # type: ignore[attr-defined]
        if self._result_r is not None:
            self._take_report(_NO_REPORT)
        return self._outcome()

    # -- async face ---------------------------------------------------------------------------
    def __await__(self) -> Generator[Any, None, ReturnT]:
        from ._transport import _proc

        return _proc.result_async(self).__await__()

    async def join_async(self, timeout: float | None = None) -> None:
        """Awaitable :meth:`join`: wait (up to ``timeout``) for the child to exit, reap it."""
        from ._transport import _proc

        await _proc.join_async(self, timeout)

    async def __aenter__(self) -> Self:
        if self._popen is None:  # type: ignore[attr-defined]
            self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        from ._transport import _proc

        if exc_type is not None:
            await _proc.stop_async([self], self.grace_period)
        else:
            await _proc.join_async(self, None)


def _none() -> None:
    return None


class Process(_ResultMixin[ReturnT], _mp_context.Process):
    """A process of the default start method, with a return value and an awaitable face."""

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        # forkserver is the stdlib's default on Linux from 3.14: start the server as aioshm does
        if _mp_context._default_context.get_start_method() == "forkserver":
            _procutil.ensure_forkserver()
        return _mp_context.Process._Popen(process_obj)


class SpawnProcess(_ResultMixin[ReturnT], _mp_context.SpawnProcess):
    """A ``spawn`` process with a return value and an awaitable face."""


if sys.platform != "win32":

    class ForkProcess(_ResultMixin[ReturnT], _mp_context.ForkProcess):
        """A ``fork`` process with a return value and an awaitable face."""

    class ForkServerProcess(_ResultMixin[ReturnT], _mp_context.ForkServerProcess):
        """A ``forkserver`` process with a return value and an awaitable face."""

        @staticmethod
        def _Popen(process_obj: Any) -> Any:
            _procutil.ensure_forkserver()  # the server imports the main script once
            return _mp_context.ForkServerProcess._Popen(process_obj)
