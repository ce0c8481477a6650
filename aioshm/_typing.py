"""Type variables of the public generic classes (typing only; no runtime behaviour).

Type checkers see PEP 696 defaults (``Any``), so a bare ``aioshm.Queue()`` or a bare
``aioshm.Connection`` annotation stays what it was before the classes were generic, and
``aioshm.Queue[int]()`` is precise. At runtime these are plain :class:`typing.TypeVar` objects
(``TypeVar(default=...)`` needs Python 3.13, and ``typing_extensions`` is not a dependency).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVarTuple

__all__ = ("ItemT", "RecvT_co", "ReturnT", "SendT_contra", "Ts")

if TYPE_CHECKING:
    from typing_extensions import TypeVar

    #: What a queue carries: ``Queue[ItemT]``.
    ItemT = TypeVar("ItemT", default=Any)
    #: What a connection sends and receives: ``Connection[SendT_contra, RecvT_co]``.
    SendT_contra = TypeVar("SendT_contra", contravariant=True, default=Any)
    RecvT_co = TypeVar("RecvT_co", covariant=True, default=Any)
    #: What a process (or each rank of a group) returns: ``await p`` → ``ReturnT``.
    ReturnT = TypeVar("ReturnT", default=Any)
else:
    from typing import TypeVar

    ItemT = TypeVar("ItemT")
    SendT_contra = TypeVar("SendT_contra", contravariant=True)
    RecvT_co = TypeVar("RecvT_co", covariant=True)
    ReturnT = TypeVar("ReturnT")

#: The positional arguments after a function's first ones: ``Callable[[int, *Ts], R]``.
Ts = TypeVarTuple("Ts")
