"""Synchronous connections that carry shared-memory fds in-band (anyio-free).

Two kinds of channel, both Unix sockets so fds can ride in the same ``sendmsg`` as the data
(SCM_RIGHTS), received close-on-exec, with ``MSG_CTRUNC`` checked:

* :class:`Connection` — what :func:`Pipe` returns. A ``SOCK_STREAM`` socketpair speaking the
  stdlib ``multiprocessing.connection`` frame format, a subclass of the stdlib ``Connection``:
  every blocking method keeps its stdlib semantics, and a plain stdlib ``Connection`` on the
  other end interoperates for messages without arrays in shared memory.
* :class:`RecordChannel` — one end of a ``SOCK_SEQPACKET`` socketpair used by the queues. Each
  message is one record, delivered whole to exactly one reader, so any number of processes may
  put and get with **no cross-process lock**: a writer killed mid-send cannot leave half a
  frame, and a reader killed mid-receive holds nothing. Payloads above :data:`MAX_RECORD`
  bytes spill into an anonymous memfd that travels as one more fd.
"""

from __future__ import annotations

import array
import errno
import fcntl
import io
import os
import select
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator
from multiprocessing import connection as _mp_connection
from typing import Any, Final, Generic

from . import _mmsg, _reduction
from ._exceptions import FdLimitError, ProtocolError
from ._typing import RecvT_co, SendT_contra
from ._wire import (
    FD_MAGIC,
    MAX_FDS_PER_MESSAGE,
    NEED_DATA,
    FdHeader,
    FrameDecoder,
    check_spill_file,
    encode_frame,
)

__all__ = ("MAX_RECORD", "Connection", "Pipe", "RecordChannel", "record_pair")

_CMSG_SPACE: Final = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4)
_RECV_FLAGS: Final = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
_MSG_TRUNC: Final = int(socket.MSG_TRUNC)
_DONTWAIT_INT: Final = int(socket.MSG_DONTWAIT)
_FAST_MAX: Final = 16 * 1024  # frames up to this size take the two-syscall fast paths
_UNPACK_I: Final = struct.Struct("!i").unpack
_PACK_I: Final = struct.Struct("!i").pack
#: Records larger than this are spilled into a memfd (kernel socket buffers stay small).
MAX_RECORD: Final = 64 * 1024
_SOCKBUF: Final = 4 << 20


def _fds_from_ancdata(ancdata: list[tuple[int, int, bytes]], flags: int) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    if not _RECV_FLAGS:
        for fd in fds:
            os.set_inheritable(fd, False)
    if flags & _MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise FdLimitError(
            f"the kernel dropped file descriptors passed with a message (MSG_CTRUNC; "
            f"{len(fds)} arrived): this process is at its fd limit. Raise `ulimit -n`, hold "
            "fewer shared arrays at once, or use set_sharing_strategy('file_system')"
        )
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _rlimit_hint(exc: OSError) -> OSError:
    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ETOOMANYREFS):
        return FdLimitError(
            f"cannot pass file descriptors ({exc.strerror}): too many fds open or in flight; "
            "raise `ulimit -n` or use set_sharing_strategy('file_system')"
        )
    return exc


# --------------------------------------------------------------------------- Pipe connections


class Connection(_mp_connection.Connection, Generic[SendT_contra, RecvT_co]):
    """A stdlib ``Connection`` over a Unix socket that also carries shared-memory fds.

    ``Connection[S, R]`` sends ``S`` and receives ``R`` (like typeshed's stdlib
    ``Connection``); :func:`Pipe` returns ``Connection[Any, Any]`` ends, which an annotation
    narrows: ``parent: aioshm.Connection[Request, Reply]``.

    ``send``/``recv`` pickle with aioshm's reducers; arrays in shared memory travel as handles
    whose fds ride with the frame. ``send_bytes``/``recv_bytes`` are byte-for-byte the
    stdlib's. Each blocking method has an awaitable twin (``send_async``, ``recv_async``,
    ``poll_async``, ``send_bytes_async``, ``recv_bytes_async``) and ``async for msg in conn``
    receives until EOF.

    Reading goes through one sans-IO :class:`~aioshm._wire.FrameDecoder` shared by both
    faces, with exact-size reads so fds always belong to the frame being read: a cancelled
    ``recv_async`` keeps what it read, and the next receive, sync or async, goes on from there.
    The fd itself stays blocking; the async face uses ``MSG_DONTWAIT`` per call, so a child
    sharing the socket is never switched to non-blocking under its feet.
    """

    _sock: socket.socket | None = None
    _decoder: FrameDecoder | None = None
    _fdq: list[int] | None = None
    _truncated: FdLimitError | None = None
    _broken: ProtocolError | None = None  # a rejected frame: the stream is out of step for good
    _eager = 0  # receives in a row that found their frame already there (async fairness)
    _async_state: Any = None  # per-connection async locks, made by aioshm._transport

    def _socket(self) -> socket.socket:
        sock = self._sock
        if sock is None:
            sock = self._sock = socket.socket(fileno=self.fileno())
            sock.settimeout(None)  # blocking, whatever socket.setdefaulttimeout() says
        return sock

    def _close(self, _close: Any = os.close) -> None:
        state, self._async_state = self._async_state, None
        if state is not None:  # the async face's epoll fds (and their loop registration)
            state.close()
        if self._sock is not None:
            self._sock.detach()
            self._sock = None
        if self._fdq:
            _close_all(self._fdq)
            self._fdq = None
        self._decoder = None
        super()._close()

    def _check_intact(self) -> None:
        """Raise again the protocol error that broke this connection, if one did.

        After a rejected frame (a bad length, a frame cut short) the stream is out of step:
        what follows is the rejected payload, not a header. Every later receive, on either
        face and on every path, raises until the connection is closed.
        """
        if self._broken is not None:
            raise ProtocolError(f"connection broken by an earlier protocol error: {self._broken}")

    def _break(self, exc: ProtocolError) -> None:
        if self._broken is None:
            self._broken = exc
        if self._fdq:
            _close_all(self._fdq)
            self._fdq = []

    # -- sending ----------------------------------------------------------------------------
    def send(self, obj: SendT_contra) -> None:
        """Send a picklable object; ndarrays in shared memory go as handles with their fds."""
        self._check_closed()
        self._check_writable()
        data, fds, owned = _reduction.dumps(obj)
        if not fds and len(data) <= _FAST_MAX:
            frame = _PACK_I(len(data)) + data
            try:
                sent = (self._sock or self._socket()).send(frame)
            except BlockingIOError:
                sent = 0
            if sent < len(frame):
                self._send(memoryview(frame)[sent:])
            return
        try:
            self._send_payload(data, fds)
        finally:
            _reduction.close_owned(fds, owned)

    def _send_first(self, first: bytes | memoryview, fds: list[int]) -> int:
        """Non-blocking ``sendmsg`` of a frame's first chunk with its fds; bytes sent (0 if
        the socket is full, in which case the fds were not sent either)."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            return self._socket().sendmsg([first], anc, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _rlimit_hint(exc) from exc

    def _send_payload(self, data: bytes | bytearray | memoryview, fds: list[int]) -> None:
        """Blocking send of header+payload, the fds riding with the first byte."""
        frame = encode_frame(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while True:
            try:
                sent = self._socket().sendmsg([frame[0]], anc)
            except BlockingIOError:
                _wait(self.fileno(), select.POLLOUT, None)  # see _read_some
                continue
            except OSError as exc:
                raise _rlimit_hint(exc) from exc
            break
        view = memoryview(frame[0])[sent:]
        if view:
            self._send(view)
        for part in frame[1:]:
            self._send(part)

    def _send(self, buf: Any, write: Any = None) -> None:
        """Write all of ``buf``, waiting if the description was made non-blocking elsewhere."""
        view = memoryview(buf)
        fd = self.fileno()
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                _wait(fd, select.POLLOUT, None)
                continue
            view = view[n:]

    def _send_bytes(self, buf: Any) -> None:
        self._send_payload(buf, [])

    # -- receiving --------------------------------------------------------------------------
    def _read_some(self, flags: int) -> None:
        """One exact-size read into the decoder (raises BlockingIOError with MSG_DONTWAIT).

        Never past the current frame: a complete frame left buffered here would be invisible
        to ``multiprocessing.connection.wait``, which only looks at the socket. fds arrive with
        the first byte of their frame, so exact reads also keep them with their frames.
        """
        decoder = self._decoder
        if decoder is None:
            decoder = self._decoder = FrameDecoder()
            self._fdq = []
        want = decoder.want_bytes()
        sock = self._socket()
        while True:
            try:
                chunk, ancdata, mflags, _ = sock.recvmsg(want, _CMSG_SPACE, _RECV_FLAGS | flags)
            except InterruptedError:
                continue
            except BlockingIOError:
                if flags:
                    raise
                # another process's event loop (libuv) made the shared description
                # non-blocking: the blocking face waits instead of failing
                _wait(self.fileno(), select.POLLIN, None)
                continue
            break
        if ancdata or mflags & _MSG_CTRUNC:
            assert self._fdq is not None
            try:
                self._fdq.extend(_fds_from_ancdata(ancdata, mflags))
            except FdLimitError as exc:
                # keep reading this frame so the stream stays in step; raise when it is complete
                self._truncated = exc
        if not chunk:
            truncated = decoder.pending_bytes > 0
            if truncated:
                decoder.receive_eof()  # raises ProtocolError
            raise EOFError
        decoder.receive_data(chunk)

    def _next_frame(self) -> tuple[bytes, list[int]] | None:
        """A complete frame and every fd that arrived with it, if the decoder holds one.

        Reads never go past the current frame and fds arrive with the bytes they were sent
        with, so all fds queued when a frame completes came with that frame: they are all
        handed over with it (never kept for the next frame), and whoever decodes the frame
        checks them against what it announces (see Note [Payload layout] in ``_wire``)."""
        decoder = self._decoder
        if decoder is None:
            return None
        frame = decoder.next_frame()
        if frame is NEED_DATA:
            return None
        assert isinstance(frame, bytes) and self._fdq is not None
        if self._truncated is not None:
            exc, self._truncated = self._truncated, None
            _close_all(self._fdq)
            self._fdq = []
            raise exc
        fds, self._fdq = self._fdq, []
        return frame, fds

    def _fast_frame(self, flags: int) -> tuple[bytes, list[int]] | None:
        """The common case in at most two syscalls: no partial frame buffered, a small frame
        without fds. Returns None (everything read so far handed to the decoder) otherwise.
        fds ride with a frame's first byte, so only the header read needs ancillary space.
        Raises BlockingIOError (``MSG_DONTWAIT``) when nothing is there yet."""
        decoder = self._decoder
        if decoder is not None and (decoder.pending_bytes or self._fdq):
            return None
        sock = self._sock or self._socket()
        header, ancdata, mflags, _ = sock.recvmsg(4, _CMSG_SPACE, _RECV_FLAGS | flags)
        if len(header) == 4 and not ancdata and not mflags & _MSG_CTRUNC:
            size = _UNPACK_I(header)[0]
            if 0 <= size <= _FAST_MAX and (decoder is None or size <= decoder.max_frame_size):
                try:
                    payload = sock.recv(size, _DONTWAIT_INT) if size else b""
                except BlockingIOError:
                    payload = b""
                if len(payload) == size:
                    if not payload.startswith(FD_MAGIC):
                        return payload, []
                    self._feed(header + payload, ancdata, mflags)
                    return None
                self._feed(header + payload, ancdata, mflags)
                return None
        if not header and not ancdata:
            raise EOFError
        self._feed(header, ancdata, mflags)
        return None

    def _feed(self, data: bytes, ancdata: list[Any], mflags: int) -> None:
        if self._decoder is None:
            self._decoder = FrameDecoder()
            self._fdq = []
        if ancdata or mflags & _MSG_CTRUNC:
            assert self._fdq is not None
            try:
                self._fdq.extend(_fds_from_ancdata(ancdata, mflags))
            except FdLimitError as exc:
                self._truncated = exc
        if data:
            self._decoder.receive_data(data)

    def _recv_frame_blocking(self) -> tuple[bytes, list[int]]:
        self._check_intact()
        try:
            return self._recv_frame_blocking_unchecked()
        except ProtocolError as exc:
            self._break(exc)
            raise

    def _recv_frame_blocking_unchecked(self) -> tuple[bytes, list[int]]:
        while True:
            try:
                got = self._fast_frame(0)
            except BlockingIOError:  # the description was made non-blocking elsewhere
                _wait(self.fileno(), select.POLLIN, None)
                continue
            except InterruptedError:
                continue
            if got is not None:
                return got
            break
        while True:
            got = self._next_frame()
            if got is not None:
                return got
            self._read_some(0)

    def recv(self) -> RecvT_co:
        """Receive an object sent with :meth:`send` (or by a stdlib ``Connection``)."""
        self._check_closed()
        self._check_readable()
        frame, fds = self._recv_frame_blocking()
        return _reduction.loads(frame, fds)

    def _recv_bytes(self, maxsize: int | None = None) -> io.BytesIO | None:
        frame, fds = self._recv_frame_blocking()
        _close_all(fds)
        if maxsize is not None and len(frame) > maxsize:
            return None
        buf = io.BytesIO(frame)
        buf.seek(0, io.SEEK_END)  # like the stdlib's: recv_bytes_into reads the size from tell()
        return buf

    def _poll(self, timeout: float | None) -> bool:
        self._check_intact()
        decoder = self._decoder
        if decoder is not None and decoder.pending_bytes and decoder.want_bytes() == 0:
            return True
        return bool(_mp_connection.wait([self], timeout))

    # -- async twins (implemented in aioshm._transport, the layer that imports anyio) -------
    async def send_async(self, obj: SendT_contra) -> None:
        """Awaitable :meth:`send`: never blocks the event loop."""
        await (_impl or _load_impl()).send_async(self, obj)

    async def recv_async(self) -> RecvT_co:
        """Awaitable :meth:`recv`. Cancelling it loses no bytes."""
        return await (_impl or _load_impl()).recv_async(self)

    async def send_bytes_async(self, buf: Any, offset: int = 0, size: int | None = None) -> None:
        """Awaitable :meth:`send_bytes`."""
        await (_impl or _load_impl()).send_bytes_async(self, buf, offset, size)

    async def recv_bytes_async(self, maxlength: int | None = None) -> bytes:
        """Awaitable :meth:`recv_bytes`."""
        data: bytes = await (_impl or _load_impl()).recv_bytes_async(self, maxlength)
        return data

    async def poll_async(self, timeout: float | None = 0.0) -> bool:
        """Awaitable :meth:`poll`: True once a message is waiting (None waits forever)."""
        ready: bool = await (_impl or _load_impl()).poll_async(self, timeout)
        return ready

    def __aiter__(self) -> AsyncIterator[RecvT_co]:
        """``async for msg in conn``: receive until EOF."""
        return (_impl or _load_impl()).iterate(self)

    def __reduce__(self) -> tuple[Any, ...]:
        ref = _reduction.fd_ref(os.dup(self.fileno()), owned=True)
        return (_rebuild_connection, (ref, self.readable, self.writable))


def _rebuild_connection(ref: object, readable: bool, writable: bool) -> Connection:
    return Connection(_reduction.take_fd(ref), readable, writable)


def Pipe(duplex: bool = True) -> tuple[Connection, Connection]:
    """A pair of connected :class:`Connection` objects, like ``multiprocessing.Pipe``.

    Always a Unix socketpair (even when ``duplex=False``, where the stdlib uses a pipe),
    because fds can only travel over sockets.
    """
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.settimeout(None)  # like the stdlib's: socket.setdefaulttimeout() does not apply
        s.set_inheritable(False)
    if duplex:
        return Connection(a.detach()), Connection(b.detach())
    a.shutdown(socket.SHUT_WR)
    b.shutdown(socket.SHUT_RD)
    return Connection(a.detach(), writable=False), Connection(b.detach(), readable=False)


# --------------------------------------------------------------------------- records (queues)


_tls = threading.local()


def _recv_buffer() -> memoryview:
    """A per-thread receive buffer one byte larger than a record may be (to detect more)."""
    buf: memoryview | None = getattr(_tls, "buf", None)
    if buf is None:
        buf = _tls.buf = memoryview(bytearray(MAX_RECORD + 1))
    return buf


def anon_fd(name: str, size: int = 0) -> int:
    """A close-on-exec memfd (an unlinked temp file off Linux) of ``size`` bytes."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    else:  # pragma: no cover - macOS
        import tempfile

        with tempfile.TemporaryFile() as tmp:
            fd = os.dup(tmp.fileno())
    if size:
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
    return fd


#: The most one ``read``/``write`` moves on Linux, whatever is asked (0x7ffff000 bytes).
_IO_MAX: Final = 0x7FFFF000


def _spill(data: bytes | bytearray | memoryview) -> int:
    """An unlinked memfd (or temp file) holding ``data``, positioned at 0."""
    fd = anon_fd("aioshm-spill")
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view[:_IO_MAX])
            view = view[n:]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unspill(fd: int, size: int, chunk: int = _IO_MAX) -> bytes:
    """The ``size`` bytes of a received spill fd, checked before anything is allocated:
    a memfd (a regular file off Linux) whose real size is ``size`` (ProtocolError otherwise).
    Reads in a loop: one ``pread`` returns at most ``chunk`` bytes. Does not close ``fd``.

    The result is ``bytes``, not a bytearray: the unpickler holds a buffer export of its input
    while it runs, and a garbage pickle that leaves a reference cycle can get a bytearray
    freed under that export (CPython then prints "deallocated bytearray object has exported
    buffers"); bytes track no exports. Above ``chunk`` the pieces are joined (a second
    copy, briefly)."""
    st = os.fstat(fd)
    sealed: bool | None = None
    if hasattr(os, "memfd_create") and stat.S_ISREG(st.st_mode):
        try:
            fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            sealed = True
        except OSError:
            sealed = False  # a regular file, not a memfd
    check_spill_file(st.st_mode, st.st_size, size, sealed=sealed)
    parts: list[bytes] = []
    done = 0
    while done < size:
        part = os.pread(fd, min(chunk, size - done), done)
        if not part:
            raise ProtocolError(f"spilled message shrank while read: {done} of {size} bytes")
        parts.append(part)
        done += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _wait(fd: int, events: int, deadline: float | None) -> bool:
    """Block until ``fd`` is ready for ``events`` or the deadline passes (False on timeout)."""
    return wait_any([(fd, events)], deadline)


def wait_any(fds: list[tuple[int, int]], deadline: float | None) -> bool:
    """Block until one of ``(fd, events)`` is ready or the deadline passes (False on timeout)."""
    poller = select.poll()
    for fd, events in fds:
        poller.register(fd, events)
    return poll_until(poller, deadline)


def poll_until(poller: Any, deadline: float | None) -> bool:
    """Block in ``poller.poll`` until something is ready or the deadline (monotonic) passes."""
    while True:
        if deadline is None:
            timeout_ms = None
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bool(poller.poll(0))
            timeout_ms = max(1, int(remaining * 1000 + 0.999))
        if poller.poll(timeout_ms):
            return True


def _seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    kind = socket.SOCK_SEQPACKET if sys.platform.startswith("linux") else socket.SOCK_DGRAM
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    for s in (a, b):
        s.set_inheritable(False)
        s.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, _SOCKBUF)
            except OSError:
                pass
    return a, b


class RecordChannel:
    """One end of a record socketpair: whole messages, many readers and writers, no locks.

    Blocking methods wait with ``poll()`` on the (non-blocking) socket, so timeouts are exact
    and a reader that loses the race for a record simply waits again.
    """

    __slots__ = ("__weakref__", "_sock", "readable", "writable")

    def __init__(self, sock: socket.socket, readable: bool, writable: bool) -> None:
        self._sock: socket.socket | None = sock
        self.readable = readable
        self.writable = writable

    def __repr__(self) -> str:
        return f"<RecordChannel fd={self._sock.fileno() if self._sock else 'closed'}>"

    @property
    def closed(self) -> bool:
        return self._sock is None

    def fileno(self) -> int:
        if self._sock is None:
            raise OSError("handle is closed")
        return self._sock.fileno()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _live(self) -> socket.socket:
        if self._sock is None:
            raise OSError("handle is closed")
        return self._sock

    # -- sending ----------------------------------------------------------------------------
    def encode(
        self, obj: Any, copies: list[Any] | None = None
    ) -> tuple[bytes | bytearray | memoryview, list[int], list[bool]]:
        """Pickle ``obj`` into one record (spilling big payloads): ``(record, fds, owned)``.

        ``copies``: see :func:`aioshm._reduction.dumps`."""
        data, fds, owned = _reduction.dumps(obj, copies)
        if len(data) > MAX_RECORD:
            try:
                header, body = FdHeader.split(data, fds=len(fds), spill=False)
                spill = _spill(body)
            except BaseException:
                _reduction.close_owned(fds, owned)
                raise
            record = FdHeader(header.nfds if header else 0, len(body)).encode()
            return record, [spill, *fds], [True, *owned]
        return data, fds, owned

    def try_send_record(self, record: bytes | bytearray | memoryview, fds: list[int]) -> bool:
        """Send one record without blocking; False if the socket buffer is full."""
        sock = self._sock
        if sock is None:
            raise OSError("handle is closed")
        try:
            if fds:
                sock.sendmsg(
                    [record], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                )
            else:
                sock.send(record)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise _rlimit_hint(exc) from exc
        return True

    def try_send_records(self, records: list[Any], start: int = 0) -> int:
        """Send records from ``records[start:]`` (fd-less ones) without blocking, several per
        syscall where the platform allows (:mod:`aioshm._mmsg`), each its own record. Returns
        how many went: 0 if the socket buffer is full."""
        sock = self._sock
        if sock is None:
            raise OSError("handle is closed")
        if _mmsg.AVAILABLE:
            try:
                return _mmsg.send_batch(sock.fileno(), records, start)
            except OSError as exc:
                raise _rlimit_hint(exc) from exc
        sent = 0
        for i in range(start, min(len(records), start + _mmsg.BATCH)):
            if not self.try_send_record(records[i], []):
                break
            sent += 1
        return sent

    def send(self, obj: Any, timeout: float | None = None) -> bool:
        """Send ``obj`` as one record, blocking up to ``timeout`` for room (False on timeout)."""
        if not self.writable:
            raise OSError("connection is read-only")
        record, fds, owned = self.encode(obj)
        try:
            return self.send_record(record, fds, timeout)
        finally:
            _reduction.close_owned(fds, owned)

    def send_record(
        self, record: bytes | bytearray | memoryview, fds: list[int], timeout: float | None = None
    ) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.try_send_record(record, fds):
            if not _wait(self.fileno(), select.POLLOUT, deadline):
                return False
        return True

    # -- receiving --------------------------------------------------------------------------
    def try_recv_record(self) -> tuple[bytes, list[int]] | None:
        """One record and its fds, or None if none is waiting. Raises EOFError at EOF."""
        sock = self._sock
        if sock is None:
            raise OSError("handle is closed")
        buf = _recv_buffer()
        try:
            n, ancdata, flags, _ = sock.recvmsg_into([buf], _CMSG_SPACE, _RECV_FLAGS)
        except BlockingIOError:
            return None
        data = bytes(buf[:n])
        fds = _fds_from_ancdata(ancdata, flags) if ancdata or flags & _MSG_CTRUNC else []
        if not data and not fds:
            raise EOFError
        if flags & _MSG_TRUNC or n > MAX_RECORD:
            _close_all(fds)
            raise ProtocolError("received a record larger than the protocol allows")
        return data, fds

    def try_recv_records(
        self, max_records: int
    ) -> tuple[list[tuple[bytes, list[int]]], BaseException | None]:
        """Up to ``max_records`` waiting records, several per syscall where the platform
        allows, without blocking: ``(records, error)``. ``error`` is the first record that
        was taken off the socket but cannot be used (oversized, empty, its fds dropped):
        the caller raises it after handing out the good ones, which are not lost."""
        sock = self._sock
        if sock is None:
            raise OSError("handle is closed")
        if _mmsg.AVAILABLE:
            return _mmsg.recv_batch(sock.fileno(), max_records, MAX_RECORD + 1)
        out: list[tuple[bytes, list[int]]] = []
        while len(out) < max_records:
            try:
                got = self.try_recv_record()
            except EOFError:
                return out, ProtocolError("received an empty record")
            except (ProtocolError, FdLimitError) as exc:
                return out, exc
            if got is None:
                break
            out.append(got)
        return out, None

    def decode(self, data: bytes, fds: list[int]) -> Any:
        """Unpickle a record received by :meth:`try_recv_record`, adopting ``fds``: they are
        all consumed or closed, whatever happens (Note [One owner per fd] in ``_reduction``).
        A malformed record (empty, a bad header, fds it does not announce, a spill fd that is
        not a memfd of the announced size) is a ``ProtocolError``."""
        if not fds and data and not data.startswith(FD_MAGIC):
            return _reduction.ForkingPickler.loads(data)  # the common case: a plain pickle
        try:
            header, body = FdHeader.split(data, fds=len(fds), spill=True)
            if header is None or not header.spilled:
                pickle: bytes | bytearray | memoryview = body
            else:
                spill, fds = fds[0], fds[1:]
                try:
                    pickle = _unspill(spill, header.spilled)
                finally:
                    os.close(spill)
        except BaseException:
            _close_all(fds)
            raise
        return _reduction.loads_pickle(pickle, fds)  # owns fds from here on

    def recv(self, timeout: float | None = None) -> Any:
        """Receive one object, blocking up to ``timeout``; raises TimeoutError on timeout."""
        return self.decode(*self.recv_record(timeout))

    def recv_record(self, timeout: float | None = None) -> tuple[bytes, list[int]]:
        """One raw record and its fds (for :meth:`decode`), blocking up to ``timeout``."""
        if not self.readable:
            raise OSError("connection is write-only")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            got = self.try_recv_record()
            if got is not None:
                return got
            if not _wait(self.fileno(), select.POLLIN, deadline):
                raise TimeoutError

    def poll(self, timeout: float | None = 0.0) -> bool:
        """True if a record is waiting (waits up to ``timeout``; None waits forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return _wait(self.fileno(), select.POLLIN, deadline)

    # -- stdlib Connection-compatible names used by multiprocessing.pool --------------------
    def send_bytes(self, buf: bytes) -> None:
        self.send_record(buf, [])

    def recv_bytes(self) -> bytes:
        while True:
            got = self.try_recv_record()
            if got is not None:
                data, fds = got
                _close_all(fds)
                return data
            _wait(self.fileno(), select.POLLIN, None)

    def __reduce__(self) -> tuple[Any, ...]:
        ref = _reduction.fd_ref(os.dup(self.fileno()), owned=True)
        return (_rebuild_channel, (ref, self.readable, self.writable))


def _rebuild_channel(ref: object, readable: bool, writable: bool) -> RecordChannel:
    fd = _reduction.take_fd(ref)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return RecordChannel(sock, readable, writable)


def record_pair() -> tuple[RecordChannel, RecordChannel]:
    """``(reader, writer)`` ends of a new record socketpair."""
    a, b = _seqpacket_pair()
    return RecordChannel(a, True, False), RecordChannel(b, False, True)


# the async faces live in aioshm._transport (the layer that imports anyio), imported on first
# use: a child that never awaits never imports anyio
_impl: Any = None


def _load_impl() -> Any:
    global _impl
    from ._transport import _conn

    _impl = _conn
    return _impl
