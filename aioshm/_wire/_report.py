"""Child outcome reports: what a child sends its parent once its target returned or raised.

Note [Outcome report]
~~~~~~~~~~~~~~~~~~~~~

A ``Process`` child, a spawn rank and a pool worker (once per task) each send one report over
their result channel (an aioshm connection: arrays in ``value`` travel as shared-memory
handles). On the wire a report is a tuple, pickled by the channel::

    ("ok",     key, value)                             the target returned ``value``
    ("raised", key, exception, type_name, traceback)   the target raised

``key`` is None or an int: the pool's job id (None for a task that could not even be
unpickled in the worker); processes and ranks send None. ``exception`` is the original
exception when it survived a pickle round trip in the child, else None; ``type_name``
(``ValueError``, ``pkg.mod.Error``) and ``traceback`` (the formatted remote traceback) are
always there, so the parent can name the failure either way.

A report comes from another process: :func:`decode` checks the shape and every field's type
and raises :class:`~aioshm.ProtocolError` for anything else. Pure: no I/O, no processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from .._exceptions import ProtocolError

__all__ = ("MAX_TYPE_NAME", "Raised", "Report", "Returned", "decode_report", "encode_report")

#: Longest ``type_name`` accepted (a dotted qualified name; real ones are far shorter).
MAX_TYPE_NAME: Final = 1024


# Not frozen: a pool builds one per task on each side, and a frozen dataclass's __init__ costs
# three times as much. Treat them as immutable all the same.


@dataclass(slots=True)
class Returned:
    """The target returned ``value``."""

    value: Any
    key: int | None = None


@dataclass(slots=True)
class Raised:
    """The target raised: its type name, formatted traceback, and the exception if it pickled."""

    type_name: str
    traceback: str
    exception: BaseException | None = None
    key: int | None = None


Report = Returned | Raised


def encode_report(report: Report) -> tuple[Any, ...]:
    """The tuple that carries ``report`` (see Note [Outcome report])."""
    if isinstance(report, Returned):
        return ("ok", report.key, report.value)
    return ("raised", report.key, report.exception, report.type_name, report.traceback)


def _key(key: object) -> int | None:
    if key is None or (type(key) is int):
        return key
    raise ProtocolError(f"outcome report with a key of type {type(key).__name__}")


def decode_report(msg: object) -> Report:
    """The report ``msg`` carries; :class:`~aioshm.ProtocolError` if it is not a valid one."""
    if type(msg) is not tuple or not msg:
        raise ProtocolError(f"outcome report is not a tuple: {type(msg).__name__}")
    tag = msg[0]
    if tag == "ok" and type(tag) is str:
        if len(msg) != 3:
            raise ProtocolError(f"'ok' outcome report with {len(msg)} fields, not 3")
        key = msg[1]
        if key is not None and type(key) is not int:  # _key(), inline: once per pool task
            raise ProtocolError(f"outcome report with a key of type {type(key).__name__}")
        return Returned(msg[2], key)
    if tag == "raised" and type(tag) is str:
        if len(msg) != 5:
            raise ProtocolError(f"'raised' outcome report with {len(msg)} fields, not 5")
        _, key, exc, type_name, tb = msg
        if exc is not None and not isinstance(exc, BaseException):
            raise ProtocolError(f"outcome report carries a {type(exc).__name__} as exception")
        if type(type_name) is not str or not 0 < len(type_name) <= MAX_TYPE_NAME:
            raise ProtocolError("outcome report without a valid exception type name")
        if type(tb) is not str:
            raise ProtocolError(f"outcome report with a {type(tb).__name__} as traceback")
        return Raised(type_name, tb, exc, _key(key))
    raise ProtocolError(f"unknown outcome report tag {tag!r:.80}")
