"""The one exception tree of aioshm.

::

    AioshmError(Exception)                       anything aioshm itself raises
    ├── SharedMemoryError                        a segment could not be created, attached or mapped
    │   ├── SharedMemoryFull(OSError)            /dev/shm (or the memfd tmpfs) has no room: ENOSPC
    │   ├── FdLimitError(OSError)                the fd table is exhausted, or SCM_RIGHTS was truncated
    │   └── InvalidHandle(ValueError)            a received handle is malformed or does not fit its segment
    ├── ProtocolError                            a peer sent a frame that breaks the wire protocol
    ├── QueueShutDown                            the queue was shut down (raised in every waiter)
    ├── PoolClosed(ValueError)                   work was pending in a pool that was terminated
    ├── BrokenPool                               a pool gave up: its workers kept dying at start-up
    ├── TaskCancelled                            a pool task was killed because its await was cancelled
    └── ProcessException                         torch's: a child process failed (error_index, pid)
        ├── ProcessRaisedException               the child raised; the remote traceback is in the message
        └── ProcessExitedException               the child exited without a result (exit_code, signal_name)

    RemoteTraceback(Exception)                   not raised: set as ``__cause__`` of a re-raised child
                                                 exception, carrying the child's formatted traceback

Every exception here survives a pickle round trip (``__reduce__`` where the constructor takes
more than the message), so a child can send it to its parent unchanged.
"""

from __future__ import annotations

import errno
import signal

__all__ = (
    "AioshmError",
    "BrokenPool",
    "FdLimitError",
    "InvalidHandle",
    "PoolClosed",
    "ProcessException",
    "ProcessExitedException",
    "ProcessRaisedException",
    "ProtocolError",
    "QueueShutDown",
    "RemoteTraceback",
    "SharedMemoryError",
    "SharedMemoryFull",
    "TaskCancelled",
    "signal_name_of",
)


class AioshmError(Exception):
    """Base of every exception aioshm raises itself."""


class SharedMemoryError(AioshmError):
    """A shared-memory segment could not be created, attached or mapped."""


class SharedMemoryFull(SharedMemoryError, OSError):
    """The shared-memory filesystem has no room for a new segment (``ENOSPC``).

    Raised at allocation time, because aioshm reserves every page when it creates a segment:
    a full ``/dev/shm`` never turns into a SIGBUS later.
    """

    def __init__(self, message: str, nbytes: int = 0) -> None:
        OSError.__init__(self, errno.ENOSPC, message)
        self.nbytes = nbytes

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.strerror, self.nbytes))

    def __str__(self) -> str:
        return str(self.strerror)


class FdLimitError(SharedMemoryError, OSError):
    """The file-descriptor table is exhausted, or the kernel dropped passed fds (``MSG_CTRUNC``).

    Raise the soft limit (``ulimit -n``), hold fewer arrays at once, or switch to the
    ``file_system`` sharing strategy, which passes names instead of descriptors.
    """

    def __init__(self, message: str) -> None:
        OSError.__init__(self, errno.EMFILE, message)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.strerror,))

    def __str__(self) -> str:
        return str(self.strerror)


class InvalidHandle(SharedMemoryError, ValueError):
    """A shared-array handle is malformed, or does not fit the segment it names.

    Handles are untrusted input: dtype, shape, strides and offset are checked against the
    real size of the segment before numpy sees the memory.
    """


class ProtocolError(AioshmError):
    """A peer sent data that violates the wire protocol (bad length, truncated frame, stray fds)."""


class QueueShutDown(AioshmError):
    """The queue was shut down: raised in every task waiting on it and in later calls."""


class PoolClosed(AioshmError, ValueError):
    """A pool was terminated (or its event loop ended) while this task was still pending."""


class BrokenPool(AioshmError):
    """A pool gave up: its workers kept dying before they could take a task.

    Raised by every task pending in the pool and every later one, instead of restarting
    workers for ever. Typical causes: a script that starts a pool without an
    ``if __name__ == "__main__":`` guard, a main module that workers cannot import (read from
    stdin), an ``initializer`` that raises. ``__cause__`` is the last worker's failure: its
    exception with the remote traceback when it raised, else a ``ProcessExitedException``;
    ``remote_traceback`` holds that traceback's text ("" when the worker died before it could
    send one: then it printed it to its own stderr).
    """

    def __init__(self, msg: str, remote_traceback: str = "") -> None:
        super().__init__(msg)
        self.msg = msg
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.msg, self.remote_traceback))


class TaskCancelled(AioshmError):
    """A ``cancellable=True`` pool task was stopped because the task awaiting it was cancelled.

    Only other holders of the same ``AsyncResult`` see it; the cancelled task itself gets
    its cancellation."""


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in another process.

    aioshm re-raises a child's exception as its original type and sets an instance of this
    class as its ``__cause__``, so the traceback printed in the parent shows both sides.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def signal_name_of(exitcode: int) -> str | None:
    """The name of the signal behind a negative ``exitcode`` (``-9`` → ``"SIGKILL"``), else None."""
    if exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"<Unknown signal {-exitcode}>"


class ProcessException(AioshmError):
    """A child process of a spawn context or pool failed (torch's ``ProcessException``)."""

    def __init__(self, msg: str, error_index: int, pid: int) -> None:
        super().__init__(msg)
        self.msg = msg
        self.error_index = error_index
        self.pid = pid

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.msg, self.error_index, self.pid))


class ProcessRaisedException(ProcessException):
    """A child raised an exception.

    The message carries the remote traceback text; ``__cause__`` holds the original exception
    when it could be pickled (``exc_type_name`` names it either way).
    """

    def __init__(
        self,
        msg: str,
        error_index: int,
        error_pid: int,
        exc_type_name: str = "",
        remote_traceback: str = "",
    ) -> None:
        super().__init__(msg, error_index, error_pid)
        self.exc_type_name = exc_type_name
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (
            type(self),
            (self.msg, self.error_index, self.pid, self.exc_type_name, self.remote_traceback),
        )


class ProcessExitedException(ProcessException):
    """A child exited without a result: killed by a signal, ``os._exit``, a segfault, the OOM killer."""

    def __init__(
        self,
        msg: str,
        error_index: int,
        error_pid: int,
        exit_code: int,
        signal_name: str | None = None,
    ) -> None:
        super().__init__(msg, error_index, error_pid)
        self.exit_code = exit_code
        self.signal_name = signal_name

    def __reduce__(self) -> tuple[object, ...]:
        return (
            type(self),
            (self.msg, self.error_index, self.pid, self.exit_code, self.signal_name),
        )
