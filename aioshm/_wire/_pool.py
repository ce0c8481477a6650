"""Pool records: the tasks a pool sends its workers, and what the workers send back.

Note [Pool records]
~~~~~~~~~~~~~~~~~~~

A pool and each worker talk over two SOCK_SEQPACKET channels, one record per message,
pickled by the channel (arrays travel as shared-memory handles, fds beside the record)::

    parent → worker   (job_id, fn, args, kwds)                 a task: fn(*args, **kwds)
                      [pickle, pickle, ...]                    a batch of small tasks, each a
                                                               pickled task tuple, run in order
                      None                                     exit
                      SWEEP (raw bytes, not a pickle)          look at your retained segments

    worker → parent   an outcome report, per task              ("ok", job_id, value) or
                                                               ("raised", job_id, exc, type_name, tb)
                      ("init-failed", None, exc, type_name, tb)
                                                               the initializer raised; it exits

A task's outcome is the child outcome report of Process and spawn ranks
(:mod:`aioshm._wire._report`, Note [Outcome report]) with the job id as its key; a task that
could not even be unpickled in the worker is a ``raised`` report with the key None (the parent
knows which job it sent). Only the one record that is no task's outcome is defined here:
``init-failed``, a ``raised`` report under another tag.

Records come from another process: :func:`decode_task`, :func:`decode_init_failed` and
:func:`~aioshm._wire._report.decode_report` check the shape and every field's type and raise
:class:`~aioshm.ProtocolError` for anything else. Pure: no I/O, no processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, NamedTuple

from .._exceptions import ProtocolError
from ._report import Raised, decode_report

__all__ = (
    "EXIT",
    "INIT_FAILED",
    "SWEEP",
    "Task",
    "decode_init_failed",
    "decode_task",
    "init_failed_record",
)

#: A record that is no pickle (those start with b"\x80"): "sweep your retained segments".
SWEEP: Final = b"\x00sweep"
#: The task record that tells a worker to exit.
EXIT: Final = None
#: The tag of the worker's record "my initializer raised" (no task's outcome).
INIT_FAILED: Final = "init-failed"


class Task(NamedTuple):
    """One task: ``fn(*args, **kwds)``, job ``job_id`` of the pool."""

    job_id: int
    fn: Any
    args: tuple[Any, ...]
    kwds: dict[str, Any]


#: ``Task(...)`` without NamedTuple's Python-level ``__new__`` (one per task)
_new_task: Callable[[type[Task], tuple[Any, ...]], Task] = tuple.__new__


def decode_task(msg: object) -> Task | None:
    """The task ``msg`` carries, or None (:data:`EXIT`); ``ProtocolError`` if it is neither."""
    if msg is None:
        return None
    if type(msg) is tuple and len(msg) == 4:  # the common case, checked cheaply
        job_id, fn, args, kwds = msg
        simple = type(job_id) is int and type(args) is tuple and type(kwds) is dict
        if simple and not kwds and callable(fn):
            return _new_task(Task, msg)
    if type(msg) is not tuple or len(msg) != 4:
        raise ProtocolError(f"a pool task record is a 4-tuple, not {_shape(msg)}")
    job_id, fn, args, kwds = msg
    if type(job_id) is not int:
        raise ProtocolError(f"a pool task's job id is an int, not {type(job_id).__name__}")
    if not callable(fn):
        raise ProtocolError(f"a pool task's function is not callable: {type(fn).__name__}")
    if type(args) is not tuple:
        raise ProtocolError(f"a pool task's args are a tuple, not {type(args).__name__}")
    if type(kwds) is not dict or not all(type(k) is str for k in kwds):
        raise ProtocolError("a pool task's keyword arguments are a dict of str keys")
    return Task(job_id, fn, args, kwds)


def init_failed_record(report: Any) -> tuple[Any, ...]:
    """The ``init-failed`` record of an encoded ``raised`` report (the initializer's)."""
    return (INIT_FAILED, *report[1:])


def decode_init_failed(msg: object) -> Raised | None:
    """The initializer's failure an ``init-failed`` record carries, or None if ``msg`` is no
    such record; :class:`~aioshm.ProtocolError` if it is one but not a valid one."""
    if type(msg) is not tuple or not msg or msg[0] != INIT_FAILED or type(msg[0]) is not str:
        return None
    report = decode_report(("raised", *msg[1:]))
    if not isinstance(report, Raised) or report.key is not None:
        raise ProtocolError("an 'init-failed' pool record names a job")
    return report


def _shape(msg: object) -> str:
    if type(msg) is tuple:
        return f"a {len(msg)}-tuple"
    return f"a {type(msg).__name__}"
