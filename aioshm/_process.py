"""``Process``: the stdlib process classes, plus a return value and an awaitable face.

The classes here subclass the stdlib ones for each start method, so every blocking method
(``start``, ``join``, ``terminate``, ``kill``, ``close``, ``is_alive``, ``exitcode``, ``pid``,
``sentinel``) is the stdlib's. Added:

* the target's return value travels back over a result pipe (aioshm ``Connection``: arrays as
  shared-memory handles); an exception travels back as the original object plus its formatted
  traceback (same report protocol as :mod:`aioshm._spawn`);
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

import multiprocessing.context as _mp_context
import sys
from collections.abc import Generator
from types import TracebackType
from typing import Any

from . import _procutil, _reduction
from ._connection import Connection, Pipe
from ._exceptions import (
    ProcessExitedException,
    ProcessRaisedException,
    RemoteTraceback,
    signal_name_of,
)

__all__ = ("DEFAULT_GRACE_PERIOD", "ForkProcess", "ForkServerProcess", "Process", "SpawnProcess")

#: Seconds between SIGTERM and SIGKILL when aioshm stops a child on error or cancellation.
DEFAULT_GRACE_PERIOD = 2.0

_NO_REPORT = object()


class _ResultMixin:
    """Adds the result pipe and the async face to a stdlib process class."""

    _result_w: Connection | None = None
    _result_r: Connection | None = None
    _report: Any = _NO_REPORT
    _async_state: Any = None
    grace_period: float = DEFAULT_GRACE_PERIOD

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
        from ._spawn import _report_raised, _type_name

        conn = self._result_w
        if conn is None:  # a subclass called us some other way
            super().run()  # type: ignore[misc]
            return
        target = getattr(self, "_target", None)
        args = getattr(self, "_args", ())
        kwargs = getattr(self, "_kwargs", {})
        try:
            try:
                value = target(*args, **kwargs) if target is not None else None
            except (Exception, KeyboardInterrupt) as exc:
                _report_raised(conn, exc)
                raise
            try:
                conn.send(("ok", value))
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as err:
                import pickle

                perr = pickle.PicklingError(
                    f"the return value of the target of {self!r} cannot be sent to the parent: "
                    f"a {_type_name(type(value))} could not be pickled ({err!r})"
                )
                perr.__cause__ = err
                _report_raised(conn, perr)
                raise perr from err
        finally:
            conn.close()

    # -- parent: results --------------------------------------------------------------------
    def _take_report(self, report: Any) -> None:
        if self._report is _NO_REPORT:
            self._report = report
        if self._result_r is not None:
            self._result_r.close()
            self._result_r = None

    def _outcome(self) -> Any:
        """The return value, or raise the child's failure (after the child was reaped)."""
        report = self._report
        exitcode = self.exitcode  # type: ignore[attr-defined]
        pid = self.pid  # type: ignore[attr-defined]
        if isinstance(report, tuple) and report and report[0] == "ok":
            return report[1]
        if isinstance(report, tuple) and report and report[0] == "raised":
            _, original, type_name, tb_text = report
            if isinstance(original, Exception):
                original.__cause__ = RemoteTraceback(str(tb_text))
                raise original
            error = ProcessRaisedException(
                f"{self!r} raised {type_name}:\n{tb_text}",
                0,
                pid or -1,
                str(type_name),
                str(tb_text),
            )
            if isinstance(original, BaseException):  # KeyboardInterrupt: a failure, not ours
                original.__cause__ = RemoteTraceback(str(tb_text))
                raise error from original
            raise error from RemoteTraceback(str(tb_text))
        if isinstance(report, tuple) and report and report[0] == "lost":
            raise ProcessRaisedException(
                f"{self!r} sent a result that could not be received: {report[1]!r}",
                0,
                pid or -1,
                type(report[1]).__name__,
                "",
            ) from report[1]
        if exitcode == 0:
            return None
        name = signal_name_of(exitcode) if exitcode is not None else None
        what = f"signal {name}" if name else f"exit code {exitcode}"
        raise ProcessExitedException(
            f"process {self.name} (pid {pid}) terminated with {what} without a result",  # type: ignore[attr-defined]
            0,
            pid or -1,
            exitcode if exitcode is not None else -1,
            name,
        )

    def result(self, timeout: float | None = None) -> Any:
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
                    self._take_report(("lost", exc))
        self.join()  # type: ignore[attr-defined]
        if self._result_r is not None:
            self._take_report(_NO_REPORT)
        return self._outcome()

    # -- async face ---------------------------------------------------------------------------
    def __await__(self) -> Generator[Any, None, Any]:
        from ._transport import _proc

        return _proc.result_async(self).__await__()

    async def join_async(self, timeout: float | None = None) -> None:
        """Awaitable :meth:`join`: wait (up to ``timeout``) for the child to exit, reap it."""
        from ._transport import _proc

        await _proc.join_async(self, timeout)

    async def __aenter__(self) -> Any:
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


class Process(_ResultMixin, _mp_context.Process):
    """A process of the default start method, with a return value and an awaitable face."""

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        # forkserver is the stdlib's default on Linux from 3.14: start the server as aioshm does
        if _mp_context._default_context.get_start_method() == "forkserver":
            _procutil.ensure_forkserver()
        return _mp_context.Process._Popen(process_obj)


class SpawnProcess(_ResultMixin, _mp_context.SpawnProcess):
    """A ``spawn`` process with a return value and an awaitable face."""


if sys.platform != "win32":

    class ForkProcess(_ResultMixin, _mp_context.ForkProcess):
        """A ``fork`` process with a return value and an awaitable face."""

    class ForkServerProcess(_ResultMixin, _mp_context.ForkServerProcess):
        """A ``forkserver`` process with a return value and an awaitable face."""

        @staticmethod
        def _Popen(process_obj: Any) -> Any:
            _procutil.ensure_forkserver()  # the server imports the main script once
            return _mp_context.ForkServerProcess._Popen(process_obj)
