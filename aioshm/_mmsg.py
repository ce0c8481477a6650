"""Several queue records per syscall: ``sendmmsg(2)`` and ``recvmmsg(2)`` through ctypes.

A queue's records cost about 1.5 µs of kernel time each way; the syscall and the Python around
it cost as much again. ``put_many`` and ``get_many`` move up to :data:`BATCH` records per call
instead of one. Each record is still a record of its own on the ``SOCK_SEQPACKET`` socket: a
batch on the wire is not a thing, any reader takes any one record, so a plain ``get()`` in
another process sees the items of a ``put_many`` one by one, and nothing is held by a process
between calls. (Packing a batch into one record would be faster still, but the process that
received it would hold items no other consumer could take.)

Only records without fds go through :func:`send_batch`; the receive side takes records with
fds too (it parses ``SCM_RIGHTS`` itself). Both are non-blocking (``MSG_DONTWAIT``).

Linux only (glibc or musl, found through ``ctypes``); :data:`AVAILABLE` is False elsewhere and
the callers loop over the one-record calls instead. Synchronous and anyio-free.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import struct
import sys
import threading
from typing import Any, Final

from ._exceptions import FdLimitError, ProtocolError
from ._wire import MAX_FDS_PER_MESSAGE

__all__ = ("AVAILABLE", "BATCH", "recv_batch", "send_batch")

#: Records per syscall at most.
BATCH: Final = 64
_SEND_ARENA: Final = 256 * 1024  # record bytes per send_batch call at most (>= 4 records)
_CMSG_SPACE: Final = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4)
_CMSG_HDR: Final = socket.CMSG_LEN(0)
_DONTWAIT: Final = int(getattr(socket, "MSG_DONTWAIT", 0))
_CLOEXEC: Final = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_MSG_TRUNC: Final = int(socket.MSG_TRUNC)
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
_SOL_SOCKET: Final = socket.SOL_SOCKET
_SCM_RIGHTS: Final = socket.SCM_RIGHTS


class _IOVec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


class _MsgHdr(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    )


class _MMsgHdr(ctypes.Structure):
    _fields_ = (("hdr", _MsgHdr), ("len", ctypes.c_uint))


_IOV_SIZE: Final = ctypes.sizeof(_IOVec)
_MMSG_SIZE: Final = ctypes.sizeof(_MMsgHdr)
_IOV_LEN_AT: Final = _IOVec.len.offset
_CTRL_LEN_AT: Final = _MsgHdr.controllen.offset
_FLAGS_AT: Final = _MsgHdr.flags.offset
_LEN_AT: Final = _MMsgHdr.len.offset
_SIZE_T: Final = "Q" if ctypes.sizeof(ctypes.c_size_t) == 8 else "I"
# what a received message says: controllen, flags, len (native sizes, explicit offsets)
_RESULT: Final = struct.Struct(
    f"={_CTRL_LEN_AT}x{_SIZE_T}"
    f"{_FLAGS_AT - _CTRL_LEN_AT - ctypes.sizeof(ctypes.c_size_t)}xi"
    f"{_LEN_AT - _FLAGS_AT - 4}xI"
)
_PACK_IOV: Final = struct.Struct(f"={_SIZE_T}{_SIZE_T}").pack_into  # base, len
_CMSG: Final = struct.Struct(f"={_SIZE_T}ii")  # cmsg_len, cmsg_level, cmsg_type
_ALIGN: Final = ctypes.sizeof(ctypes.c_size_t)


def _load() -> tuple[Any, Any] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        send, recv = libc.sendmmsg, libc.recvmmsg
    except (OSError, AttributeError):  # pragma: no cover - a libc without them
        return None
    send.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
    send.restype = ctypes.c_int
    recv.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
    recv.restype = ctypes.c_int
    return send, recv


_calls = _load()
#: True where this module works (Linux); elsewhere callers use the one-record calls.
AVAILABLE: Final = _calls is not None


def _address(buf: Any) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class _RecvBuffers:
    """One thread's receive headers: :data:`BATCH` slots of ``slot`` bytes, each with room
    for a full SCM_RIGHTS message (anonymous maps: pages the kernel never writes to stay
    unallocated)."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.data = mmap.mmap(-1, BATCH * slot)
        self.data_view = memoryview(self.data)
        self.ctrl = mmap.mmap(-1, BATCH * _CMSG_SPACE)
        self.ctrl_view = memoryview(self.ctrl)
        self.iov = (_IOVec * BATCH)()
        self.msgs = (_MMsgHdr * BATCH)()
        data, ctrl = _address(self.data), _address(self.ctrl)
        for i in range(BATCH):
            self.iov[i].base = data + i * slot
            self.iov[i].len = slot
            hdr = self.msgs[i].hdr
            hdr.iov = ctypes.addressof(self.iov[i])
            hdr.iovlen = 1
            hdr.control = ctrl + i * _CMSG_SPACE
            hdr.controllen = _CMSG_SPACE
        self.msgs_view = memoryview(self.msgs).cast("B")
        self.pristine = bytes(self.msgs_view)  # the kernel rewrites lengths: restored per call
        self.msgs_addr = ctypes.addressof(self.msgs)


class _SendBuffers:
    """One thread's send headers: records are copied into one arena, one iovec each."""

    def __init__(self) -> None:
        self.data = mmap.mmap(-1, _SEND_ARENA)
        self.base = _address(self.data)
        self.iov = (_IOVec * BATCH)()
        self.iov_view = memoryview(self.iov).cast("B")
        self.msgs = (_MMsgHdr * BATCH)()
        for i in range(BATCH):
            self.msgs[i].hdr.iov = ctypes.addressof(self.iov[i])
            self.msgs[i].hdr.iovlen = 1
        self.msgs_addr = ctypes.addressof(self.msgs)


_local = threading.local()


def _recv_buffers(slot: int) -> _RecvBuffers:
    bufs: _RecvBuffers | None = getattr(_local, "recv", None)
    if bufs is None or bufs.slot != slot:
        bufs = _local.recv = _RecvBuffers(slot)
    return bufs


def _send_buffers() -> _SendBuffers:
    bufs: _SendBuffers | None = getattr(_local, "send", None)
    if bufs is None:
        bufs = _local.send = _SendBuffers()
    return bufs


def _os_error(err: int) -> OSError:
    return OSError(err, os.strerror(err))


def send_batch(fd: int, records: list[Any], start: int = 0) -> int:
    """Send ``records[start:]`` (fd-less, each at most 64 KiB), as many as fit in one call
    and in the socket buffer, one record each. Returns how many went (0 if the buffer is
    full); raises ``OSError`` on any other error before the first record went."""
    assert _calls is not None
    bufs = _send_buffers()
    arena, iov, base = bufs.data, bufs.iov_view, bufs.base
    off = 0
    k = 0
    end = min(len(records), start + BATCH)
    for i in range(start, end):
        rec = records[i]
        n = len(rec)
        if off + n > _SEND_ARENA:
            break
        arena[off : off + n] = rec
        _PACK_IOV(iov, k * _IOV_SIZE, base + off, n)
        off += n
        k += 1
    if not k:
        raise ValueError("a record is larger than a batch may carry")
    sent: int = _calls[0](fd, bufs.msgs_addr, k, _DONTWAIT)
    if sent < 0:
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EWOULDBLOCK):
            return 0
        raise _os_error(err)
    return sent


def _rights(ctrl: memoryview, length: int) -> list[int]:
    """The fds of the SCM_RIGHTS messages in a received control buffer."""
    fds: list[int] = []
    pos = 0
    while pos + _CMSG.size <= length:
        clen, level, kind = _CMSG.unpack_from(ctrl, pos)
        if clen < _CMSG_HDR or pos + clen > length:
            break
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            nfds = (clen - _CMSG_HDR) // 4
            fds.extend(struct.unpack_from(f"={nfds}i", ctrl, pos + _CMSG_HDR))
        pos += (clen + _ALIGN - 1) & ~(_ALIGN - 1)
    return fds


def recv_batch(
    fd: int, max_records: int, slot: int
) -> tuple[list[tuple[bytes, list[int]]], BaseException | None]:
    """Receive up to ``max_records`` waiting records in one call, without blocking.

    Returns ``(records, error)``: the good records as ``(data, fds)``, oldest first, and the
    first problem met (a record larger than ``slot - 1`` bytes, fds the kernel dropped, an
    empty record), whose record is dropped (its fds closed) after it was taken off the
    socket, as a one-record receive would. ``([], None)`` if nothing is waiting.
    """
    assert _calls is not None
    bufs = _recv_buffers(slot)
    bufs.msgs_view[:] = bufs.pristine
    got = _calls[1](fd, bufs.msgs_addr, min(max_records, BATCH), _DONTWAIT | _CLOEXEC, None)
    if got < 0:
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EWOULDBLOCK):
            return [], None
        raise _os_error(err)
    out: list[tuple[bytes, list[int]]] = []
    error: BaseException | None = None
    msgs, data, ctrl = bufs.msgs_view, bufs.data_view, bufs.ctrl_view
    for i in range(got):
        clen, flags, n = _RESULT.unpack_from(msgs, i * _MMSG_SIZE)
        fds = _rights(ctrl[i * _CMSG_SPACE :], clen) if clen else []
        problem: BaseException | None = None
        if flags & _MSG_CTRUNC:
            problem = FdLimitError(
                f"the kernel dropped file descriptors passed with a message (MSG_CTRUNC; "
                f"{len(fds)} arrived): this process is at its fd limit. Raise `ulimit -n`, "
                "hold fewer shared arrays at once, or use set_sharing_strategy('file_system')"
            )
        elif flags & _MSG_TRUNC or n >= slot:
            problem = ProtocolError("received a record larger than the protocol allows")
        elif not n and not fds:
            problem = ProtocolError("received an empty record")
        if problem is not None:
            for x in fds:
                try:
                    os.close(x)
                except OSError:
                    pass
            if error is None:
                error = problem
            else:
                error.add_note(f"and another malformed record was dropped: {problem}")
            continue
        start = i * slot
        out.append((bytes(data[start : start + n]), fds))
    return out, error
