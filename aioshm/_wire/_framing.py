"""Sans-IO framing: the byte layout of ``multiprocessing.connection``, with no I/O at all.

Note [Frame layout]
~~~~~~~~~~~~~~~~~~~

A stream is a sequence of frames, each a length header followed by that many payload bytes.
The layout is byte-for-byte the one CPython's ``multiprocessing.connection.Connection`` writes
and reads on POSIX, so a plain stdlib ``Connection`` can sit at the other end::

    n <= 0x7fffffff    +----------------+-------------------+
                       | n: int32 BE    | payload (n bytes) |
                       +----------------+-------------------+

    n >  0x7fffffff    +----------------+----------------+-------------------+
                       | -1: int32 BE   | n: uint64 BE   | payload (n bytes) |
                       +----------------+----------------+-------------------+

The escape form is also *accepted* for small ``n``, because the stdlib reader accepts it.
Any other negative length is a protocol error, and so is a length over the decoder's
``max_frame_size``: the length arrives from another process and is never trusted enough to
allocate from it. The decoder only stores bytes that have actually arrived.

The decoder has two states, and these are all its transitions:

    ========  ===========================================  ========================
    state     event                                        next state
    ========  ===========================================  ========================
    HEADER    4 bytes (or 12 after the -1 escape) arrive   PAYLOAD  (length checked)
    HEADER    a bad length arrives                         BROKEN   (ProtocolError)
    PAYLOAD   ``n`` payload bytes are buffered             ``next_frame()`` → HEADER
    any       ``receive_eof()`` with a partial frame       ProtocolError raised
    ========  ===========================================  ========================

``_size is None`` is HEADER, an int is PAYLOAD, ``_broken`` set is BROKEN.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, Literal

from .._exceptions import ProtocolError

__all__ = (
    "DEFAULT_MAX_FRAME_SIZE",
    "NEED_DATA",
    "FrameDecoder",
    "NeedData",
    "encode_frame",
    "encode_header",
)

DEFAULT_MAX_FRAME_SIZE: Final = 1 << 30
"""The default cap on one frame's payload: 1 GiB. Array data goes out of band, so real
frames are small; the cap only bounds what a broken or hostile peer can make us buffer."""

_MAX_SHORT: Final = 0x7FFFFFFF  # the largest length the plain 4-byte header can carry
_MAX_LONG: Final = (1 << 64) - 1  # the largest length the "!Q" escape can carry
_NAGLE_LIMIT: Final = 16384  # stdlib concatenates header and payload up to this size
_SHORT: Final = struct.Struct("!i")
_LONG: Final = struct.Struct("!iQ")  # the -1 escape and the real length, 12 bytes
_COMPACT_MIN: Final = 1 << 16  # compact the buffer only once this much is dead at its front


class NeedData(enum.Enum):
    """The type of :data:`NEED_DATA`: a one-member enum, so mypy narrows ``is NEED_DATA``."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA
"""Returned by :meth:`FrameDecoder.next_frame` when no complete frame is buffered yet."""


def encode_header(n: int) -> bytes:
    """The header announcing an ``n``-byte payload: 4 bytes, or 12 when ``n > 0x7fffffff``.

    Raises ``ValueError`` if ``n`` is negative or does not fit the 64-bit escape.
    """
    if n < 0 or n > _MAX_LONG:
        raise ValueError(f"frame length must be in 0..2**64-1, got {n}")
    if n > _MAX_SHORT:
        return _LONG.pack(-1, n)
    return _SHORT.pack(n)


def encode_frame(payload: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
    """The pieces to write, in order, to send ``payload`` as one frame.

    Up to 16 KiB (the stdlib's rule, so the header does not sit alone in a Nagle-delayed
    segment) this is one ``bytes`` object holding header and payload. Above that it is
    ``[header, memoryview(payload)]`` and the payload is not copied: the caller must not
    mutate it until the pieces are written. Any C-contiguous buffer is accepted and sent as
    its raw bytes.
    """
    view = memoryview(payload)
    if view.ndim != 1 or view.format != "B" or not view.c_contiguous:
        view = view.cast("B")  # raises TypeError for a non-contiguous buffer
    header = encode_header(view.nbytes)
    if view.nbytes > _NAGLE_LIMIT:
        return [header, view]
    return [header + view]


class FrameDecoder:
    """Splits a byte stream into frame payloads, h11-style: feed bytes in, pull frames out.

    ::

        decoder = FrameDecoder()
        decoder.receive_data(chunk)             # whatever the transport read
        while (frame := decoder.next_frame()) is not NEED_DATA:
            handle(frame)
        ...
        decoder.receive_eof()                   # at end of stream: raises if it cut a frame

    A transport may size its reads with :meth:`want_bytes`. When it reads exactly the payload
    of a frame into a fresh ``bytes`` object and feeds it right after the header, that very
    object comes back from :meth:`next_frame`, uncopied.

    Total work is linear in the bytes fed, however they are chunked. A bad header raises
    :class:`~aioshm.ProtocolError` from whichever call first parses it (``receive_data`` for
    the header of the current frame), before any payload is stored; the decoder then stays
    broken and every later call raises again.
    """

    __slots__ = (
        "_broken",
        "_buf",
        "_eof",
        "_header_len",
        "_max_frame_size",
        "_pos",
        "_size",
        "_whole",
    )

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self._max_frame_size = _check_max(max_frame_size)
        self._buf = bytearray()  # received bytes; those before _pos are consumed
        self._pos = 0
        self._size: int | None = None  # the current frame's length once its header is parsed
        self._header_len = 0  # 4 or 12 once the header is parsed, for pending_bytes
        self._whole: bytes | None = None  # the current frame's payload, fed as one bytes object
        self._eof = False
        self._broken: str | None = None

    def __repr__(self) -> str:
        state = "broken" if self._broken else "payload" if self._size is not None else "header"
        return (
            f"<FrameDecoder state={state} pending_bytes={self.pending_bytes}"
            f" max_frame_size={self._max_frame_size}>"
        )

    @property
    def max_frame_size(self) -> int:
        """The largest payload accepted, in bytes. Setting it applies to headers parsed later."""
        return self._max_frame_size

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        self._max_frame_size = _check_max(value)

    @property
    def pending_bytes(self) -> int:
        """Bytes received but not yet returned as frames (headers included)."""
        pending = len(self._buf) - self._pos
        if self._size is not None:
            pending += self._header_len
        if self._whole is not None:
            pending += len(self._whole)
        return pending

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes read from the stream. An empty chunk is a no-op, not end of stream.

        ``bytes`` may be kept by reference; any other buffer is copied, so the caller can
        reuse it. Raises ``ProtocolError`` if this completes a bad header, and
        ``RuntimeError`` after :meth:`receive_eof`.
        """
        self._raise_if_broken()
        if self._eof:
            raise RuntimeError("receive_data() called after receive_eof()")
        if (
            self._size
            and self._whole is None
            and self._pos == len(self._buf)
            and type(data) is bytes
            and len(data) == self._size
        ):
            self._whole = data  # exactly the current payload: keep it, copy nothing
            return
        self._buf += data
        if self._size is None:
            self._parse_header()

    def next_frame(self) -> bytes | Literal[NeedData.NEED_DATA]:
        """The next complete payload, or :data:`NEED_DATA` if none is buffered yet.

        After :meth:`receive_eof`, buffered complete frames are still returned; if a partial
        frame is left after them, this raises ``ProtocolError`` instead of ``NEED_DATA``.
        """
        self._raise_if_broken()
        if self._size is None:
            self._parse_header()
            if self._size is None:
                return self._need_data()
        if self._whole is not None:
            payload, self._whole = self._whole, None
        elif len(self._buf) - self._pos >= self._size:
            payload = self._take(self._size)
        else:
            return self._need_data()
        self._size = None
        self._header_len = 0
        return payload

    def want_bytes(self) -> int:
        """How many more bytes the current frame needs before :meth:`next_frame` can return it.

        At a frame boundary that is 4 (the header), after the ``-1`` escape the rest of the
        12-byte header, then the rest of the payload. ``0`` means a frame is ready.
        """
        self._raise_if_broken()
        if self._size is None:
            self._parse_header()
            if self._size is None:
                buffered = len(self._buf) - self._pos
                return (_LONG.size if buffered >= _SHORT.size else _SHORT.size) - buffered
        if self._whole is not None:
            return 0
        return max(0, self._size - (len(self._buf) - self._pos))

    def receive_eof(self) -> None:
        """Mark the end of the stream. Raises ``ProtocolError`` if it cut a frame short.

        Ending between frames is fine, even with complete frames still buffered: they stay
        available from :meth:`next_frame`. Calling it twice is harmless.
        """
        self._raise_if_broken()
        self._eof = True
        problem = self._truncation()
        if problem is not None:
            raise ProtocolError(problem)

    # -- internals ---------------------------------------------------------------------------

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise ProtocolError(self._broken)

    def _need_data(self) -> Literal[NeedData.NEED_DATA]:
        if self._eof:
            problem = self._truncation()
            if problem is not None:
                raise ProtocolError(problem)
        return NEED_DATA

    def _parse_header(self) -> None:
        """In HEADER state, parse and check the header if all of it is buffered."""
        buffered = len(self._buf) - self._pos
        if buffered < _SHORT.size:
            return
        (n,) = _SHORT.unpack_from(self._buf, self._pos)
        header_len = _SHORT.size
        if n == -1:
            if buffered < _LONG.size:
                return
            (_, n) = _LONG.unpack_from(self._buf, self._pos)
            header_len = _LONG.size
        problem = self._check_length(n)
        if problem is not None:
            self._broken = problem
            self._buf = bytearray()  # drop what a broken peer sent; it is never read
            self._pos = 0
            raise ProtocolError(problem)
        self._consume(header_len)
        self._size = n
        self._header_len = header_len

    def _check_length(self, n: int) -> str | None:
        if n < 0:
            return f"negative frame length {n}"
        if n > self._max_frame_size:
            return f"frame length {n} exceeds max_frame_size={self._max_frame_size}"
        return None

    def _take(self, n: int) -> bytes:
        if n == 0:
            return b""
        start = self._pos
        with memoryview(self._buf) as view:
            payload = bytes(view[start : start + n])
        self._consume(n)
        return payload

    def _consume(self, n: int) -> None:
        # Advance past consumed bytes; move the live tail to the front only when the dead
        # prefix is at least as long as the tail, so each byte is moved O(1) times overall.
        self._pos += n
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= _COMPACT_MIN and 2 * self._pos >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0

    def _truncation(self) -> str | None:
        """Walk the buffered frames without consuming them: what is wrong with them, if anything."""
        pos = self._pos
        end = len(self._buf)
        if self._size is not None and self._whole is None:
            if end - pos < self._size:
                return f"end of stream inside a payload: {end - pos} of {self._size} bytes"
            pos += self._size
        while pos < end:
            buffered = end - pos
            if buffered < _SHORT.size:
                return f"end of stream inside a header: {buffered} of {_SHORT.size} bytes"
            (n,) = _SHORT.unpack_from(self._buf, pos)
            header_len = _SHORT.size
            if n == -1:
                if buffered < _LONG.size:
                    return f"end of stream inside a header: {buffered} of {_LONG.size} bytes"
                (_, n) = _LONG.unpack_from(self._buf, pos)
                header_len = _LONG.size
            problem = self._check_length(n)
            if problem is not None:
                return problem
            if buffered - header_len < n:
                return f"end of stream inside a payload: {buffered - header_len} of {n} bytes"
            pos += header_len + n
        return None


def _check_max(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_frame_size must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"max_frame_size must be >= 0, got {value}")
    return value
