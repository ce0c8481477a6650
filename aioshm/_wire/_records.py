"""Sans-IO message envelopes: the fd header of a payload and the spill header of a record.

Note [Payload layout]
~~~~~~~~~~~~~~~~~~~~~

A *payload* is what one frame (on a Pipe connection) or one record (on a queue's socketpair)
carries. Three forms, told apart by the first four bytes::

    plain pickle      +---------------------------------------------+   no fd arrives with it
                      | ForkingPickler pickle (starts with 0x80)    |
                      +---------------------------------------------+

    inline, with fds  +------+----------+--------------+----------+   exactly ``nfds`` fds
                      | AIOX | nfds u32 | 0 u64        | pickle   |   arrive with it
                      +------+----------+--------------+----------+

    spilled record    +------+----------+--------------+              ``nfds + 1`` fds arrive:
                      | AIOX | nfds u32 | length u64   |              the first is a memfd of
                      +------+----------+--------------+              exactly ``length`` bytes
                                                                      holding the pickle

All integers are big-endian. The pickle's fd references are indices into the fds that arrived
with the payload (after the spill fd, for a spilled record). Spilled records exist only on
queues (:class:`~aioshm._connection.RecordChannel`); a Pipe frame is never spilled (it has no
size limit below the frame cap).

:meth:`FdHeader.split` is the only parser of this layout and :meth:`FdHeader.encode` the only
builder. ``split`` checks everything a peer controls against what actually arrived (the
number of fds, the body length) and raises :class:`~aioshm.ProtocolError`;
:func:`check_spill_file` checks a spill fd's type and real size before a byte is allocated
for it. Nothing here does I/O.
"""

from __future__ import annotations

import stat
import struct
from typing import Final

from .._exceptions import ProtocolError

__all__ = ("FD_MAGIC", "MAX_FDS_PER_MESSAGE", "FdHeader", "check_spill_file")

FD_MAGIC: Final = b"AIOX"
MAX_FDS_PER_MESSAGE: Final = 253  # SCM_MAX_FD on Linux: more cannot ride in one sendmsg
_STRUCT: Final = struct.Struct("!4sIQ")


class FdHeader:
    """The header of a payload that carries fds, or of a spilled record.

    ``nfds``: the segment fds the pickle refers to; ``spilled``: the pickle's length when it
    travels in a memfd (0: the pickle follows the header inline).
    """

    __slots__ = ("nfds", "spilled")

    SIZE: Final = _STRUCT.size

    def __init__(self, nfds: int, spilled: int = 0) -> None:
        if not 0 <= nfds <= MAX_FDS_PER_MESSAGE:
            raise ValueError(f"nfds must be in 0..{MAX_FDS_PER_MESSAGE}, got {nfds}")
        if spilled < 0:
            raise ValueError(f"spilled length must be >= 0, got {spilled}")
        if not nfds and not spilled:
            raise ValueError("a header announces fds, a spilled pickle, or both")
        self.nfds = nfds
        self.spilled = spilled

    def __repr__(self) -> str:
        return f"FdHeader(nfds={self.nfds}, spilled={self.spilled})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FdHeader):
            return NotImplemented
        return (self.nfds, self.spilled) == (other.nfds, other.spilled)

    def __hash__(self) -> int:
        return hash((self.nfds, self.spilled))

    @property
    def fds_expected(self) -> int:
        """How many fds must arrive with a payload that has this header."""
        return self.nfds + (1 if self.spilled else 0)

    def encode(self) -> bytes:
        """The header's 16 bytes."""
        return _STRUCT.pack(FD_MAGIC, self.nfds, self.spilled)

    @staticmethod
    def split(
        data: bytes | bytearray | memoryview, *, fds: int, spill: bool
    ) -> tuple[FdHeader | None, memoryview]:
        """``(header, pickle)`` of a received payload that arrived with ``fds`` fds.

        ``header`` is None for a plain pickle. For a spilled record the pickle is empty (it
        is in the spill fd). ``spill``: whether a spilled record is allowed here (queues).
        Raises ``ProtocolError`` for an empty payload, a truncated or impossible header, a
        body after a spill header, or a number of fds other than the header announces.
        """
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        if not len(view):
            raise ProtocolError("received an empty message")
        if bytes(view[:4]) != FD_MAGIC:
            if fds:
                raise ProtocolError(f"{fds} fds arrived with a message that announces none")
            return None, view
        if len(view) < _STRUCT.size:
            raise ProtocolError(f"truncated fd header: {len(view)} of {_STRUCT.size} bytes")
        _, nfds, spilled = _STRUCT.unpack_from(view)
        if nfds > MAX_FDS_PER_MESSAGE:
            raise ProtocolError(f"message announces {nfds} fds (at most {MAX_FDS_PER_MESSAGE})")
        body = view[_STRUCT.size :]
        if spilled:
            if not spill:
                raise ProtocolError("a spilled-record header where only inline ones may be")
            if len(body):
                raise ProtocolError(f"spilled record has {len(body)} bytes after its header")
        elif not nfds:
            raise ProtocolError("fd header announces neither fds nor a spilled pickle")
        header = FdHeader(nfds, spilled)
        if fds != header.fds_expected:
            raise ProtocolError(f"message announced {header.fds_expected} fds but {fds} arrived")
        return header, body


def check_spill_file(mode: int, size: int, announced: int, *, sealed: bool | None) -> None:
    """Validate a received spill fd from its ``fstat`` (``mode``, ``size``) before reading it.

    ``sealed`` is whether ``F_GET_SEALS`` works on it (None where memfds do not exist): every
    spill fd is a memfd on Linux. The announced length must be the file's real size, so a
    peer cannot make the receiver allocate more than it actually sent.
    """
    if not stat.S_ISREG(mode):
        raise ProtocolError("a spilled record's fd is not a regular file")
    if sealed is False:
        raise ProtocolError("a spilled record's fd is not a memfd")
    if size != announced:
        raise ProtocolError(f"spilled message is {size} bytes, its header says {announced}")
