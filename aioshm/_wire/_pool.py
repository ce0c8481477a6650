"""Pool records: the tasks a pool sends its workers and the results they send back.

Note [Pool records]
~~~~~~~~~~~~~~~~~~~

A pool and each worker talk over two SOCK_SEQPACKET channels, one record per message,
pickled by the channel (arrays travel as shared-memory handles, fds beside the record)::

    parent → worker   (job_id, fn, args, kwds)                 a task: fn(*args, **kwds)
                      [pickle, pickle, ...]                    a batch of small tasks, each a
                                                               pickled task tuple, run in order
                      None                                     exit
                      SWEEP (raw bytes, not a pickle)          look at your retained segments

    worker → parent   ("ok", job_id, value)                    the task returned value
                      ("raised", job_id, exc, type_name, tb)   the task raised
                      ("bad-task", None, exc, type_name, tb)   a task could not be unpickled
                      ("init-failed", None, exc, type_name, tb)
                                                               the initializer raised; it exits

``exc`` is the exception when it survived a pickle round trip in the worker, else None;
``type_name`` and ``tb`` (the formatted remote traceback) are always there. The two result
shapes ``ok``/``raised`` are those of the child outcome reports of Process and spawn.

Records come from another process: :func:`decode_task` and :func:`decode_result` check the
shape and every field's type and raise :class:`~aioshm.ProtocolError` for anything else.
Pure: no I/O, no processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, NamedTuple

from .._exceptions import ProtocolError

__all__ = (
    "EXIT",
    "RESULT_TAGS",
    "SWEEP",
    "Result",
    "Task",
    "decode_result",
    "decode_task",
    "encode_result",
)

#: A record that is no pickle (those start with b"\x80"): "sweep your retained segments".
SWEEP: Final = b"\x00sweep"
#: The task record that tells a worker to exit.
EXIT: Final = None
#: The tags of a result record.
RESULT_TAGS: Final = frozenset({"ok", "raised", "bad-task", "init-failed"})
#: Longest ``type_name`` accepted (a dotted qualified name; real ones are far shorter).
MAX_TYPE_NAME: Final = 1024


class Task(NamedTuple):
    """One task: ``fn(*args, **kwds)``, job ``job_id`` of the pool."""

    job_id: int
    fn: Any
    args: tuple[Any, ...]
    kwds: dict[str, Any]


class Result(NamedTuple):
    """One result record (see Note [Pool records])."""

    tag: str
    job_id: int | None
    value: Any  # the value ("ok") or the exception if it pickled, else None
    type_name: str = ""
    traceback: str = ""


#: ``Result(...)`` and ``Task(...)`` without NamedTuple's Python-level ``__new__`` (one of
#: each per task)
_new_result: Callable[[type[Result], tuple[Any, ...]], Result] = tuple.__new__
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


def encode_result(result: Result) -> tuple[Any, ...]:
    """The tuple that carries ``result`` (short for ``ok``)."""
    if result.tag == "ok":
        return ("ok", result.job_id, result.value)
    return tuple(result)


def decode_result(msg: object) -> Result:
    """The result ``msg`` carries; :class:`~aioshm.ProtocolError` if it is not a valid one."""
    if type(msg) is not tuple or not msg:
        raise ProtocolError(f"a pool result record is a tuple, not {_shape(msg)}")
    tag = msg[0]
    if tag == "ok" and type(tag) is str:
        if len(msg) != 3:
            raise ProtocolError(f"an 'ok' pool result has 3 fields, not {len(msg)}")
        if type(msg[1]) is not int:
            raise ProtocolError(f"an 'ok' pool result's job id is {type(msg[1]).__name__}")
        return _new_result(Result, ("ok", msg[1], msg[2], "", ""))  # Result(...), faster
    if type(tag) is not str or tag not in RESULT_TAGS:
        raise ProtocolError(f"unknown pool result tag {tag!r}"[:200])
    if len(msg) != 5:
        raise ProtocolError(f"a {tag!r} pool result has 5 fields, not {len(msg)}")
    _, job_id, exc, type_name, tb = msg
    if tag == "raised":
        if type(job_id) is not int:
            raise ProtocolError(f"a 'raised' pool result's job id is {type(job_id).__name__}")
    elif job_id is not None:
        raise ProtocolError(f"a {tag!r} pool result names no job")
    if exc is not None and not isinstance(exc, BaseException):
        raise ProtocolError(f"a pool result's exception is a {type(exc).__name__}")
    if type(type_name) is not str or not type_name or len(type_name) > MAX_TYPE_NAME:
        raise ProtocolError("a pool result's exception type name is not a short str")
    if type(tb) is not str:
        raise ProtocolError(f"a pool result's traceback is a {type(tb).__name__}")
    return Result(tag, job_id, exc, type_name, tb)


def _shape(msg: object) -> str:
    if type(msg) is tuple:
        return f"a {len(msg)}-tuple"
    return f"a {type(msg).__name__}"
