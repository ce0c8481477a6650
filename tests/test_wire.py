"""Tests of the sans-IO framing layer, including interop with a real stdlib ``Connection``."""

from __future__ import annotations

import copy
import itertools
import mmap
import os
import pickle
import random
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioshm._exceptions import ProtocolError
from aioshm._wire import (
    DEFAULT_MAX_FRAME_SIZE,
    FD_MAGIC,
    MAX_FDS_PER_MESSAGE,
    NEED_DATA,
    FdHeader,
    FrameDecoder,
    NeedData,
    check_spill_file,
    encode_frame,
    encode_header,
)

# -- helpers ---------------------------------------------------------------------------------


def _payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _stream(payloads: list[bytes]) -> bytes:
    return b"".join(b"".join(encode_frame(p)) for p in payloads)


def _drain(decoder: FrameDecoder) -> list[bytes]:
    frames = []
    while (frame := decoder.next_frame()) is not NEED_DATA:
        frames.append(frame)
    return frames


def _feed_chunks(decoder: FrameDecoder, stream: bytes, cuts: list[int]) -> list[bytes]:
    frames = []
    edges = [0, *sorted(cuts), len(stream)]
    for start, stop in itertools.pairwise(edges):
        decoder.receive_data(stream[start:stop])
        frames += _drain(decoder)
    return frames


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "peer closed early"
        data += chunk
    return bytes(data)


def _in_thread(fn: Callable[..., None], *items: object) -> threading.Thread:
    """Run ``fn(item)`` for each item in a thread, so a full socket buffer cannot deadlock."""

    def run() -> None:
        for item in items:
            fn(item)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def conn_and_sock() -> Iterator[tuple[Connection, socket.socket]]:
    """A stdlib ``Connection`` on one end of a socketpair, a raw socket on the other."""
    left, right = socket.socketpair()
    conn = Connection(left.detach())
    try:
        yield conn, right
    finally:
        conn.close()
        right.close()


payload_sizes = st.one_of(
    st.integers(0, 64),
    st.integers(16380, 16390),  # around the stdlib's concatenate-or-not threshold
    st.integers(0, 300 * 1024),
)
payloads = st.builds(_payload, payload_sizes, st.integers(0, 2**32))


# -- the sentinel ----------------------------------------------------------------------------


def test_need_data_is_a_singleton_with_a_readable_repr() -> None:
    """NEED_DATA reprs as its name and survives copy and pickle as the very same object."""
    assert repr(NEED_DATA) == "NEED_DATA"
    assert NEED_DATA is NeedData.NEED_DATA
    assert copy.copy(NEED_DATA) is NEED_DATA
    assert copy.deepcopy(NEED_DATA) is NEED_DATA
    assert pickle.loads(pickle.dumps(NEED_DATA)) is NEED_DATA
    assert list(NeedData) == [NEED_DATA]


# -- the encoder -----------------------------------------------------------------------------


def test_encode_header_matches_struct_layout() -> None:
    """Short lengths are one big-endian int32; 0x7fffffff is the last one that fits."""
    assert encode_header(0) == b"\x00\x00\x00\x00"
    assert encode_header(5) == b"\x00\x00\x00\x05"
    assert encode_header(0x7FFFFFFF) == b"\x7f\xff\xff\xff"


def test_encode_header_uses_the_minus_one_escape_for_large_lengths() -> None:
    """Lengths over 0x7fffffff are -1 as int32 followed by the length as uint64."""
    assert encode_header(0x80000000) == struct.pack("!i", -1) + struct.pack("!Q", 0x80000000)
    assert encode_header(2**64 - 1) == b"\xff" * 12
    assert len(encode_header(5 * 2**30)) == 12


@pytest.mark.parametrize("bad", [-1, -(2**31), 2**64])
def test_encode_header_rejects_unencodable_lengths(bad: int) -> None:
    """A negative length, or one too big for uint64, is a ValueError, not a bogus header."""
    with pytest.raises(ValueError, match="frame length"):
        encode_header(bad)


@pytest.mark.parametrize("size", [0, 1, 100, 16384])
def test_encode_frame_concatenates_small_payloads(size: int) -> None:
    """Up to 16 KiB the frame is one bytes object, header plus payload."""
    payload = _payload(size, size)
    pieces = encode_frame(payload)
    assert len(pieces) == 1
    assert type(pieces[0]) is bytes
    assert pieces[0] == struct.pack("!i", size) + payload


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_encode_frame_does_not_copy_large_payloads(kind: Callable[[bytes], object]) -> None:
    """Over 16 KiB the payload is passed on as a memoryview of the caller's own buffer."""
    source = bytearray(_payload(16385, 1))
    payload = source if kind is bytearray else kind(bytes(source))
    header, body = encode_frame(payload)  # type: ignore[arg-type]
    assert header == struct.pack("!i", 16385)
    assert isinstance(body, memoryview)
    assert body.obj is (payload.obj if isinstance(payload, memoryview) else payload)
    assert bytes(body) == bytes(source)
    if kind is bytearray:
        source[0] ^= 0xFF
        assert body[0] == source[0]  # same memory, not a copy


def test_encode_frame_sends_the_raw_bytes_of_typed_buffers() -> None:
    """A buffer of wider items is framed by its byte length, not its item count."""
    words = memoryview(bytearray(range(16))).cast("I")
    assert len(words) == 4
    (frame,) = encode_frame(words)
    assert frame == struct.pack("!i", 16) + bytes(range(16))


def test_encode_frame_rejects_non_contiguous_buffers() -> None:
    """A strided view has no single run of bytes to send, so it is refused."""
    with pytest.raises(TypeError):
        encode_frame(memoryview(bytes(10))[::2])


def test_encode_frame_escape_for_a_fake_huge_payload() -> None:
    """A > 2 GiB payload (a lazily mapped, never touched mmap) gets the 12-byte header."""
    size = 2**31 + 10
    try:
        huge = mmap.mmap(-1, size)
    except (OSError, OverflowError, ValueError) as exc:  # pragma: no cover - tight rlimits
        pytest.skip(f"cannot reserve {size} bytes of address space: {exc}")
    try:
        pieces = encode_frame(huge)  # type: ignore[arg-type]
        header, body = pieces
        assert header == struct.pack("!i", -1) + struct.pack("!Q", size)
        assert isinstance(body, memoryview)
        assert body.nbytes == size
        decoder = FrameDecoder(max_frame_size=3 * 2**30)
        assert isinstance(header, bytes)
        decoder.receive_data(header)
        assert decoder.want_bytes() == size
        assert decoder.pending_bytes == 12
        assert decoder.next_frame() is NEED_DATA
        body.release()
    finally:
        huge.close()


# -- the decoder: round trips ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(frames=st.lists(payloads, max_size=6), data=st.data())
def test_round_trip_in_random_chunks(frames: list[bytes], data: st.DataObject) -> None:
    """Concatenated frames fed in arbitrary chunks come back out whole and in order."""
    stream = _stream(frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40), label="cuts")
    decoder = FrameDecoder()
    assert _feed_chunks(decoder, stream, cuts) == frames
    assert decoder.pending_bytes == 0
    assert decoder.want_bytes() == 4
    decoder.receive_eof()


@settings(max_examples=100, deadline=None)
@given(frames=st.lists(st.binary(max_size=40), max_size=8))
def test_round_trip_one_byte_at_a_time(frames: list[bytes]) -> None:
    """Feeding single bytes yields each frame exactly when its last byte arrives."""
    stream = _stream(frames)
    decoder = FrameDecoder()
    got: list[bytes] = []
    for i in range(len(stream)):
        want = decoder.want_bytes()
        assert want >= 1
        decoder.receive_data(stream[i : i + 1])
        new = _drain(decoder)
        assert len(new) <= 1  # a byte can complete at most one frame
        got += new
        assert decoder.pending_bytes == len(stream[: i + 1]) - sum(len(f) + 4 for f in got)
    assert got == frames


@pytest.mark.parametrize(
    "frames",
    [
        [b"hello", b"world!"],
        [b"", b"x"],
        [b"abc", b""],
        [_payload(20000, 3), b"tail"],
    ],
    ids=["two-small", "empty-first", "empty-second", "large-first"],
)
def test_every_split_point_of_a_two_frame_stream(frames: list[bytes]) -> None:
    """Cutting the stream into two chunks at any offset decodes the same two frames."""
    stream = _stream(frames)
    for split in range(len(stream) + 1):
        decoder = FrameDecoder()
        got = _feed_chunks(decoder, stream, [split])
        assert got == frames, f"split at {split}"
        assert decoder.pending_bytes == 0


def test_every_split_point_with_the_escape_header() -> None:
    """The -1 + uint64 header form (which the stdlib reader accepts) decodes at every split."""
    stream = struct.pack("!iQ", -1, 5) + b"hello" + struct.pack("!i", 2) + b"ok"
    for split in range(len(stream) + 1):
        decoder = FrameDecoder()
        decoder.receive_data(stream[:split])
        if 4 <= split < 12:
            assert decoder.want_bytes() == 12 - split
        decoder.receive_data(stream[split:])
        assert _drain(decoder) == [b"hello", b"ok"], f"split at {split}"


@settings(max_examples=40, deadline=None)
@given(frames=st.lists(payloads, min_size=1, max_size=5))
def test_reads_sized_by_want_bytes_return_payloads_uncopied(frames: list[bytes]) -> None:
    """Feeding exactly want_bytes() at a time gives back the fed payload object itself."""
    stream = _stream(frames)
    decoder = FrameDecoder()
    pos = 0
    got: list[bytes] = []
    while pos < len(stream):
        want = decoder.want_bytes()
        assert want > 0
        chunk = stream[pos : pos + want]
        pos += want
        decoder.receive_data(chunk)
        frame = decoder.next_frame()
        if frame is not NEED_DATA:
            assert frame is chunk or frame == b""
            got.append(frame)
            assert decoder.want_bytes() == 4
    assert got == frames


def test_next_frame_is_need_data_until_the_last_byte() -> None:
    """A partial frame reports how much it still needs and yields nothing early."""
    decoder = FrameDecoder()
    assert decoder.want_bytes() == 4
    assert decoder.next_frame() is NEED_DATA
    decoder.receive_data(b"\x00\x00")
    assert decoder.want_bytes() == 2
    decoder.receive_data(bytearray(b"\x00\x03ab"))
    assert decoder.want_bytes() == 1
    assert decoder.pending_bytes == 6
    assert decoder.next_frame() is NEED_DATA
    decoder.receive_data(memoryview(b"c"))
    assert decoder.want_bytes() == 0
    assert decoder.next_frame() == b"abc"
    assert decoder.next_frame() is NEED_DATA
    decoder.receive_data(b"")  # an empty chunk is not end of stream
    assert decoder.want_bytes() == 4


def test_mutable_input_is_copied() -> None:
    """Reusing a bytearray after feeding it (as recv_into does) cannot corrupt a frame."""
    decoder = FrameDecoder()
    scratch = bytearray(struct.pack("!i", 3) + b"abc")
    decoder.receive_data(scratch)
    scratch[:] = b"\xff" * len(scratch)
    assert decoder.next_frame() == b"abc"


def test_decoding_is_linear_in_the_bytes_fed() -> None:
    """Many tiny frames in one chunk, and one big frame in many chunks, decode in linear time.

    A decoder that re-sliced its whole buffer per frame or per chunk would copy hundreds of
    gigabytes here and take many seconds.
    """
    start = time.process_time()
    tiny = [b"0123456789abcdef"] * 200_000
    decoder = FrameDecoder()
    decoder.receive_data(_stream(tiny))
    assert _drain(decoder) == tiny

    big = _payload(8 * 2**20, 7)
    stream = _stream([big])
    decoder = FrameDecoder()
    frames = _feed_chunks(decoder, stream, list(range(1000, len(stream), 1000)))
    assert frames == [big]
    assert time.process_time() - start < 5.0


# -- the decoder: bad input ------------------------------------------------------------------


@pytest.mark.parametrize("length", [-2, -100, -(2**31)])
def test_negative_lengths_are_protocol_errors(length: int) -> None:
    """Any negative length other than the -1 escape is rejected as soon as the header lands."""
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="negative frame length"):
        decoder.receive_data(struct.pack("!i", length) + b"payload")


def test_a_broken_decoder_stays_broken() -> None:
    """After a bad header every call raises again and nothing more is buffered."""
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.receive_data(struct.pack("!i", -5))
    for call in (decoder.next_frame, decoder.want_bytes, decoder.receive_eof):
        with pytest.raises(ProtocolError, match="negative frame length -5"):
            call()
    with pytest.raises(ProtocolError):
        decoder.receive_data(b"more")
    assert decoder.pending_bytes == 0


def test_oversized_length_is_a_protocol_error() -> None:
    """A length one over max_frame_size is rejected; exactly max_frame_size is accepted."""
    decoder = FrameDecoder(max_frame_size=10)
    decoder.receive_data(_stream([b"x" * 10]))
    assert decoder.next_frame() == b"x" * 10
    with pytest.raises(ProtocolError, match="exceeds max_frame_size=10"):
        decoder.receive_data(struct.pack("!i", 11))


def test_escape_header_over_the_limit_is_a_protocol_error() -> None:
    """A -1 + uint64 header claiming > 0x7fffffff bytes is refused under a small max."""
    decoder = FrameDecoder(max_frame_size=2**20)
    decoder.receive_data(struct.pack("!i", -1) + b"\x00\x00\x00")
    assert decoder.want_bytes() == 5
    with pytest.raises(ProtocolError, match="exceeds max_frame_size"):
        decoder.receive_data(struct.pack("!Q", 0x80000000)[3:])


def test_escape_header_with_a_huge_length_is_refused_by_default() -> None:
    """The largest uint64 length is refused with the default 1 GiB limit."""
    decoder = FrameDecoder()
    assert decoder.max_frame_size == DEFAULT_MAX_FRAME_SIZE == 2**30
    with pytest.raises(ProtocolError):
        decoder.receive_data(b"\xff" * 12)


def test_error_is_raised_by_next_frame_for_a_later_header() -> None:
    """A bad header behind a good frame surfaces only after the good frame is returned."""
    decoder = FrameDecoder(max_frame_size=100)
    decoder.receive_data(_stream([b"good"]) + struct.pack("!i", 101))
    assert decoder.next_frame() == b"good"
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_a_huge_claimed_length_allocates_nothing_up_front() -> None:
    """A header claiming 1 GiB followed by 10 bytes costs memory for 10 bytes, not 1 GiB."""
    decoder = FrameDecoder(max_frame_size=2 * 2**30)
    header = struct.pack("!i", 2**30)
    body = b"0123456789"
    tracemalloc.start()
    try:
        decoder.receive_data(header)
        decoder.receive_data(body)
        assert decoder.next_frame() is NEED_DATA
        assert decoder.want_bytes() == 2**30 - 10
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert decoder.pending_bytes == 14


def test_max_frame_size_is_settable_and_validated() -> None:
    """The limit can be changed between frames; bad values are rejected."""
    decoder = FrameDecoder(max_frame_size=4)
    decoder.max_frame_size = 8
    assert decoder.max_frame_size == 8
    decoder.receive_data(_stream([b"12345678"]))
    assert decoder.next_frame() == b"12345678"
    with pytest.raises(ValueError):
        decoder.max_frame_size = -1
    with pytest.raises(TypeError):
        decoder.max_frame_size = 1.5  # type: ignore[assignment]
    with pytest.raises(TypeError):
        FrameDecoder(max_frame_size=True)
    assert "max_frame_size=8" in repr(decoder)


# -- the decoder: end of stream --------------------------------------------------------------


@pytest.mark.parametrize(
    "partial",
    [
        b"\x00",
        b"\x00\x00\x00",
        struct.pack("!i", -1) + b"\x00\x00",
        struct.pack("!i", 5) + b"abc",
        struct.pack("!i", 5),
        struct.pack("!iQ", -1, 5) + b"a",
    ],
    ids=["1-header-byte", "3-header-bytes", "mid-escape-header", "mid-payload", "no-payload",
         "escape-mid-payload"],
)  # fmt: skip
def test_eof_inside_a_frame_is_a_protocol_error(partial: bytes) -> None:
    """End of stream in the middle of a header or a payload raises ProtocolError."""
    decoder = FrameDecoder()
    decoder.receive_data(partial)
    assert decoder.next_frame() is NEED_DATA
    with pytest.raises(ProtocolError, match="end of stream inside a"):
        decoder.receive_eof()
    with pytest.raises(ProtocolError, match="end of stream inside a"):
        decoder.next_frame()


def test_eof_between_frames_is_fine() -> None:
    """End of stream on a frame boundary is a clean close, even on a fresh decoder."""
    FrameDecoder().receive_eof()
    decoder = FrameDecoder()
    decoder.receive_data(_stream([b"a", b""]))
    assert _drain(decoder) == [b"a", b""]
    decoder.receive_eof()
    decoder.receive_eof()
    assert decoder.next_frame() is NEED_DATA
    with pytest.raises(RuntimeError, match="after receive_eof"):
        decoder.receive_data(b"x")


def test_eof_keeps_complete_buffered_frames_available() -> None:
    """Frames buffered before a clean EOF, or before a truncated tail, are still returned."""
    decoder = FrameDecoder()
    decoder.receive_data(_stream([b"one", b"two"]))
    decoder.receive_eof()
    assert _drain(decoder) == [b"one", b"two"]

    decoder = FrameDecoder()
    decoder.receive_data(_stream([b"one", b"two"]) + b"\x00\x00")
    with pytest.raises(ProtocolError, match="inside a header: 2 of 4"):
        decoder.receive_eof()
    assert decoder.next_frame() == b"one"
    assert decoder.next_frame() == b"two"
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_eof_after_an_uncopied_payload_is_fine() -> None:
    """A payload held by reference (the want_bytes path) counts as complete at EOF."""
    decoder = FrameDecoder()
    payload = _payload(100, 1)
    decoder.receive_data(struct.pack("!i", 100))
    decoder.receive_data(payload)
    assert decoder.pending_bytes == 104
    decoder.receive_eof()
    assert decoder.next_frame() is payload


# -- interop with the stdlib -----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 16384, 16385, 200_000])
def test_stdlib_connection_reads_our_frames(
    conn_and_sock: tuple[Connection, socket.socket], size: int
) -> None:
    """Bytes from encode_frame are read by Connection.recv_bytes() as the same payload."""
    conn, sock = conn_and_sock
    payload = _payload(size, size)
    writer = _in_thread(sock.sendall, *encode_frame(payload))
    assert conn.recv_bytes() == payload
    writer.join()


def test_stdlib_connection_reads_our_pickles(
    conn_and_sock: tuple[Connection, socket.socket],
) -> None:
    """A ForkingPickler pickle framed by encode_frame is unpickled by Connection.recv()."""
    conn, sock = conn_and_sock
    objects: list[object] = [None, 42, "text", {"a": [1, 2.5, (3, b"x")]}, b"z" * 50_000]
    for obj in objects:
        blob = bytes(ForkingPickler.dumps(obj, protocol=5))
        writer = _in_thread(sock.sendall, *encode_frame(blob))
        assert conn.recv() == obj
        writer.join()


def test_stdlib_connection_reads_the_escape_header(
    conn_and_sock: tuple[Connection, socket.socket],
) -> None:
    """The stdlib reader accepts the -1 + uint64 form, which is why we accept it too."""
    conn, sock = conn_and_sock
    sock.sendall(struct.pack("!iQ", -1, 5) + b"hello")
    assert conn.recv_bytes() == b"hello"


@pytest.mark.parametrize("size", [0, 7, 16384, 16385, 200_000])
def test_our_decoder_reads_stdlib_frames(
    conn_and_sock: tuple[Connection, socket.socket], size: int
) -> None:
    """Bytes written by Connection.send_bytes() decode to the same payload, byte for byte."""
    conn, sock = conn_and_sock
    payload = _payload(size, size + 1)
    writer = _in_thread(conn.send_bytes, payload)
    wire = _recv_exactly(sock, 4 + size)
    writer.join()
    assert wire == b"".join(encode_frame(payload))
    decoder = FrameDecoder()
    decoder.receive_data(wire)
    assert decoder.next_frame() == payload
    assert decoder.pending_bytes == 0


def test_our_decoder_reads_stdlib_frames_off_a_pipe() -> None:
    """A Connection over os.pipe() writes the same frames, read here in transport-sized reads."""
    rfd, wfd = os.pipe()
    conn = Connection(wfd, readable=False)
    try:
        payloads = [b"", b"small", _payload(70_000, 9)]
        writer = _in_thread(conn.send_bytes, *payloads)
        decoder = FrameDecoder()
        got: list[bytes] = []
        while len(got) < len(payloads):
            decoder.receive_data(os.read(rfd, decoder.want_bytes()))
            got += _drain(decoder)
        writer.join()
        assert got == payloads
    finally:
        conn.close()
        os.close(rfd)


def test_our_decoder_unpickles_stdlib_sends(
    conn_and_sock: tuple[Connection, socket.socket],
) -> None:
    """Objects sent with Connection.send() decode with FrameDecoder and unpickle equal."""
    conn, sock = conn_and_sock
    objects: list[object] = [None, [1, 2, 3], {"k": ("v", 1.5)}, "é" * 10, b"b" * 40_000]
    writer = _in_thread(conn.send, *objects)
    decoder = FrameDecoder()
    got: list[object] = []
    while len(got) < len(objects):
        decoder.receive_data(sock.recv(65536))
        got += [pickle.loads(frame) for frame in _drain(decoder)]
    writer.join()
    assert got == objects


# -- payload envelopes: the fd header and the spill header (Note [Payload layout]) -----------


def _valid_header(nfds: int, spilled: int) -> FdHeader | None:
    try:
        return FdHeader(nfds, spilled)
    except ValueError:
        return None


@settings(max_examples=300, deadline=None)
@given(st.integers(0, MAX_FDS_PER_MESSAGE), st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_fd_header_round_trips(nfds: int, spilled: int, body: bytes) -> None:
    header = _valid_header(nfds, spilled)
    if header is None:
        assert nfds == 0 and spilled == 0
        return
    data = header.encode() + (b"" if spilled else body)
    got, rest = FdHeader.split(data, fds=header.fds_expected, spill=True)
    assert got == header and hash(got) == hash(header)
    assert bytes(rest) == (b"" if spilled else body)
    assert len(header.encode()) == FdHeader.SIZE


@settings(max_examples=2000, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=40),
        st.binary(max_size=24).map(lambda b: FD_MAGIC + b),
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=8)).map(
            lambda t: FD_MAGIC + struct.pack("!IQ", t[0], t[1]) + t[2]
        ),
    ),
    st.integers(0, 300),
    st.booleans(),
)
def test_fd_header_split_accepts_exactly_the_layout(data: bytes, fds: int, spill: bool) -> None:
    """Whatever a peer sends, ``split`` either returns a header consistent with the fds that
    arrived and the bytes that follow, or raises ProtocolError: never anything else."""
    try:
        header, body = FdHeader.split(data, fds=fds, spill=spill)
    except ProtocolError:
        return
    assert data
    if header is None:
        assert not data.startswith(FD_MAGIC) and fds == 0 and bytes(body) == data
        return
    assert header.fds_expected == fds <= MAX_FDS_PER_MESSAGE + 1
    assert header.encode() == data[: FdHeader.SIZE]
    if header.spilled:
        assert spill and len(data) == FdHeader.SIZE and not len(body)
    else:
        assert header.nfds >= 1 and bytes(body) == data[FdHeader.SIZE :]


def test_fd_header_rejects_what_a_peer_might_forge() -> None:
    ok = FdHeader(2).encode() + b"pickle"
    cases = [
        (b"", 0, "empty"),
        (b"\x80\x05N.", 1, "announces none"),
        (FD_MAGIC + b"\0\0", 0, "truncated"),
        (FD_MAGIC + struct.pack("!IQ", 254, 0), 254, "at most"),
        (FD_MAGIC + struct.pack("!IQ", 0, 0), 0, "neither"),
        (FdHeader(0, 10).encode() + b"x", 1, "after its header"),
        (ok, 1, "announced 2 fds but 1"),
        (ok, 3, "announced 2 fds but 3"),
    ]
    for data, fds, match in cases:
        with pytest.raises(ProtocolError, match=match):
            FdHeader.split(data, fds=fds, spill=True)
    with pytest.raises(ProtocolError, match="spilled-record header"):
        FdHeader.split(FdHeader(0, 10).encode(), fds=1, spill=False)
    for bad in [(-1, 0), (254, 0), (0, -1), (0, 0)]:
        with pytest.raises(ValueError):
            FdHeader(*bad)


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from([0o100600, 0o040700, 0o020600, 0o140777, 0o010600]),
    st.integers(0, 2**63),
    st.integers(0, 2**63),
    st.sampled_from([True, False, None]),
)
def test_check_spill_file_accepts_only_a_memfd_of_the_announced_size(
    mode: int, size: int, announced: int, sealed: bool | None
) -> None:
    try:
        check_spill_file(mode, size, announced, sealed=sealed)
    except ProtocolError:
        assert mode != 0o100600 or sealed is False or size != announced
    else:
        assert mode == 0o100600 and sealed is not False and size == announced
