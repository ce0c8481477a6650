"""Child targets of tests/test_lifetime.py (importable by spawn and forkserver children)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct


def write_torn_report_and_die() -> None:
    """Write the start of a report frame on this Process's result pipe, then die of SIGKILL."""
    conn = multiprocessing.current_process()._result_w  # type: ignore[attr-defined]
    os.write(conn.fileno(), struct.pack("!i", 1000) + b"\x80\x05partial")
    os.kill(os.getpid(), signal.SIGKILL)
