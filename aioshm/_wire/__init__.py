"""Sans-IO wire protocol: frames, payload envelopes and spill headers, with no I/O.

Nothing here reads or writes a file descriptor, imports anyio, or knows about processes; the
transport layer feeds bytes in and writes the bytes it is given. See Note [Frame layout] in
``_framing.py`` and Note [Payload layout] in ``_records.py``.
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
from ._records import FD_MAGIC, MAX_FDS_PER_MESSAGE, FdHeader, check_spill_file
from ._report import Raised, Report, Returned, decode_report, encode_report

__all__ = (
    "DEFAULT_MAX_FRAME_SIZE",
    "FD_MAGIC",
    "MAX_FDS_PER_MESSAGE",
    "NEED_DATA",
    "FdHeader",
    "FrameDecoder",
    "NeedData",
    "Raised",
    "Report",
    "Returned",
    "check_spill_file",
    "decode_report",
    "encode_frame",
    "encode_header",
    "encode_report",
)
