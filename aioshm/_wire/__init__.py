"""Sans-IO wire protocol: the ``multiprocessing.connection`` frame format, with no I/O.

Nothing here reads or writes a file descriptor, imports anyio, or knows about processes; the
transport layer feeds bytes in and writes the bytes it is given. See Note [Frame layout] in
``_framing.py``.
"""

from __future__ import annotations

from ._framing import (
    DEFAULT_MAX_FRAME_SIZE,
    NEED_DATA,
    FrameDecoder,
    NeedData,
    encode_frame,
    encode_header,
)
from ._report import Raised, Report, Returned, decode_report, encode_report

__all__ = (
    "DEFAULT_MAX_FRAME_SIZE",
    "NEED_DATA",
    "FrameDecoder",
    "NeedData",
    "Raised",
    "Report",
    "Returned",
    "decode_report",
    "encode_frame",
    "encode_header",
    "encode_report",
)
