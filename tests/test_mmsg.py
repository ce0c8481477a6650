"""Several records per syscall (``aioshm._mmsg``, sendmmsg/recvmmsg through ctypes) and the
one-record loop that replaces it where it is not available: both must keep every record a
record of its own, in order, with its fds, and hand back the good records received beside a
malformed one. Each test runs on both paths (``AVAILABLE`` switched off for the loop).
"""

from __future__ import annotations

import fcntl
import os
import pickle
import queue
import socket
import sys
from collections.abc import Iterator

import pytest

import aioshm
from aioshm import _mmsg
from aioshm._connection import MAX_RECORD, RecordChannel, record_pair
from aioshm._exceptions import ProtocolError

pytestmark = pytest.mark.timeout(60)

PATHS = ["mmsg", "loop"] if _mmsg.AVAILABLE else ["loop"]


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "loop":
        monkeypatch.setattr(_mmsg, "AVAILABLE", False)
    return str(request.param)


@pytest.fixture
def pair(path: str) -> Iterator[tuple[RecordChannel, RecordChannel]]:
    reader, writer = record_pair()
    try:
        yield reader, writer
    finally:
        reader.close()
        writer.close()


def _drain(reader: RecordChannel) -> list[bytes]:
    out: list[bytes] = []
    while True:
        got, error = reader.try_recv_records(1000)
        assert error is None
        if not got:
            return out
        for data, fds in got:
            assert fds == []
            out.append(data)


def test_more_records_than_a_batch_arrive_one_by_one_in_order(
    pair: tuple[RecordChannel, RecordChannel],
) -> None:
    reader, writer = pair
    records = [pickle.dumps(i) for i in range(3 * _mmsg.BATCH + 5)]
    start = 0
    while start < len(records):
        sent = writer.try_send_records(records, start)
        assert 0 < sent <= _mmsg.BATCH
        start += sent
    got, error = reader.try_recv_records(7)  # at most what was asked for
    assert error is None and len(got) == 7
    # a one-record receive takes exactly the next record: no batch exists on the wire
    one = reader.try_recv_record()
    assert one is not None and pickle.loads(one[0]) == 7
    rest = _drain(reader)
    assert [pickle.loads(d) for d, _ in got] + [7] + [pickle.loads(d) for d in rest] == list(
        range(len(records))
    )


def test_records_of_every_size_up_to_the_limit(pair: tuple[RecordChannel, RecordChannel]) -> None:
    reader, writer = pair
    records = [b"x" * n for n in (1, 100, 4096, MAX_RECORD - 1, MAX_RECORD, 7)]
    start = 0
    while start < len(records):
        start += writer.try_send_records(records, start)
    assert _drain(reader) == records


def test_records_with_fds_arrive_with_them_close_on_exec(
    pair: tuple[RecordChannel, RecordChannel],
) -> None:
    reader, writer = pair
    r, w = os.pipe()
    try:
        assert writer.try_send_record(b"a", [])
        assert writer.try_send_record(b"b", [r, w])
        assert writer.try_send_record(b"c", [])
        got, error = reader.try_recv_records(10)
        assert error is None
        assert [d for d, _ in got] == [b"a", b"b", b"c"]
        fds = got[1][1]
        assert len(fds) == 2 and got[0][1] == [] and got[2][1] == []
        try:
            for fd in fds:
                assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            os.write(fds[1], b"!")  # the received write end is the pipe's
            assert os.read(r, 1) == b"!"
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        os.close(r)
        os.close(w)


def test_a_malformed_record_is_dropped_and_the_good_ones_around_it_are_kept(
    path: str, pair: tuple[RecordChannel, RecordChannel]
) -> None:
    """Oversized and empty records are taken off the socket (so they cannot wedge the queue),
    their fds closed (the leak check would see one left open), the first problem returned; the
    good records received with them are returned, not lost."""
    reader, writer = pair
    r, w = os.pipe()
    try:
        raw = socket.socket(fileno=os.dup(writer.fileno()))
        try:
            raw.setblocking(True)
            raw.send(b"good-1")
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, sys.byteorder))]
            raw.sendmsg([b"y" * (MAX_RECORD + 1)], rights)  # oversized, with an fd
            raw.send(b"")
            raw.send(b"good-2")
        finally:
            raw.close()
        got, error = reader.try_recv_records(10)
        assert isinstance(error, ProtocolError)
        assert "larger than the protocol allows" in str(error)
        if path == "loop":  # one record per call: it stops at each problem
            assert [d for d, _ in got] == [b"good-1"]
            got2, error2 = reader.try_recv_records(10)
            assert got2 == [] and isinstance(error2, ProtocolError)
            assert "empty record" in str(error2)
            got, error = reader.try_recv_records(10)
            assert [d for d, _ in got] == [b"good-2"] and error is None
        else:  # one syscall took all four
            assert [d for d, _ in got] == [b"good-1", b"good-2"]
            assert any("empty record" in note for note in getattr(error, "__notes__", []))
        assert reader.try_recv_records(10) == ([], None)
    finally:
        os.close(r)
        os.close(w)


def test_a_full_socket_buffer_sends_nothing_and_raises_nothing(
    pair: tuple[RecordChannel, RecordChannel],
) -> None:
    reader, writer = pair
    record = b"z" * 1000
    while writer.try_send_record(record, []):
        pass
    assert writer.try_send_records([record] * 10) == 0
    got, error = reader.try_recv_records(_mmsg.BATCH)  # room for some again
    assert error is None and got
    assert writer.try_send_records([record] * 3) > 0
    _drain(reader)


def test_a_closed_channel_says_so(pair: tuple[RecordChannel, RecordChannel]) -> None:
    reader, writer = pair
    reader.close()
    writer.close()
    with pytest.raises(OSError, match="closed"):
        writer.try_send_records([b"a"])
    with pytest.raises(OSError, match="closed"):
        reader.try_recv_records(1)


def test_queue_batches_keep_capacity_and_counts_on_both_paths(path: str) -> None:
    """A bounded queue smaller than a batch: put_many takes the tokens there are, the rest of
    the batch says Full, and every count and token comes back with the gets."""
    q = aioshm.Queue(5)
    try:
        with pytest.raises(queue.Full) as info:
            q.put_many(range(_mmsg.BATCH + 3), block=False)
        assert "5 items of the batch were put" in str(info.value)
        assert q.qsize() == 5 and q.full()
        assert q.get_many(3) == [0, 1, 2]
        assert q.qsize() == 2 and not q.full()
        q.put_many(["a", "b", "c"], block=False)
        assert q.get_many(100) == [3, 4, "a", "b", "c"]
        assert q.qsize() == 0 and q.empty()
        q.put_many(range(5), block=False)  # all five tokens are back
        assert q.get_many(100) == list(range(5))
    finally:
        q.close()


def test_joinable_queue_counts_only_the_items_of_a_batch_that_went_in(path: str) -> None:
    q = aioshm.JoinableQueue(4)
    try:
        with pytest.raises(queue.Full):
            q.put_many(range(10), block=False)
        assert q.get_many(10) == [0, 1, 2, 3]
        for _ in range(4):
            q.task_done()
        q.join()  # returns: the six items that did not go in were never counted
        with pytest.raises(ValueError, match="too many times"):
            q.task_done()
    finally:
        q.close()
