"""In-process tests of the ndarray reducers (``aioshm._reduction``) and fd-limit handling.

A message is simulated without a socket: :func:`_send` pickles with ``dumps``, duplicates the
fds the message carries (what the kernel holds while the message is in flight), and closes the
sender's own copies with ``close_owned``; ``loads`` then adopts the duplicates. Sender and
receiver are the same process, so a received segment is the very mapping the sender has.

Covers reliability.md §5 tables B (tickets, refcount, replay) and C (fd counts, MSG_CTRUNC).
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import resource
from collections.abc import Callable, Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from aioshm import _reduction
from aioshm._connection import Pipe
from aioshm._exceptions import FdLimitError, InvalidHandle, ProtocolError
from aioshm._shm import (
    get_all_sharing_strategies,
    get_sharing_strategy,
    is_shared,
    live_segments,
    segment_buffer_of,
    set_sharing_strategy,
    shm_dir,
    trim,
    zeros,
)
from aioshm._shm._segment import PAGE

STRATEGIES = sorted(get_all_sharing_strategies())
_reduction.init_reductions()

DTYPES: list[Any] = [
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
    np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128, ">i8",
    "M8[ns]", "m8[s]", "U5", "S4", "V8", "i4,f8", [("x", "<f4"), ("y", ">i2", (2,))],
    np.dtype("f8", metadata={"unit": "m"}),
]  # fmt: skip


# --------------------------------------------------------------------------- helpers


def _nfds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Cases:
    """Collects the failures of many cases checked in one test, then reports them all."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    @contextlib.contextmanager
    def case(self, label: object) -> Iterator[None]:
        try:
            yield
        except (Exception, pytest.fail.Exception) as exc:
            self.failures.append(f"{label!r}: {type(exc).__name__}: {exc}")

    def check(self) -> None:
        assert not self.failures, f"{len(self.failures)} failing case(s):\n" + "\n".join(
            self.failures
        )


def _send(obj: object) -> tuple[bytes | bytearray | memoryview, list[int]]:
    """Pickle ``obj`` as a message: ``(payload, fds in flight)``; the sender's fds are closed."""
    data, fds, owned = _reduction.dumps(obj)
    in_flight = [os.dup(fd) for fd in fds]
    _reduction.close_owned(fds, owned)
    return data, in_flight


def _roundtrip(obj: object) -> Any:
    data, fds = _send(obj)
    return _reduction.loads(data, fds)


def _tickets() -> list[str]:
    return sorted(n for n in os.listdir(shm_dir()) if ".t" in n)


def _sample(dt: np.dtype, n: int) -> np.ndarray:
    if dt.kind in "Mm":
        return np.arange(n).astype(dt)
    if dt.kind in "US":
        return np.array([str(i) for i in range(n)], dtype=dt)
    return np.frombuffer(np.random.default_rng(1).bytes(n * dt.itemsize), dt).copy()


def _filled(shape: tuple[int, ...], dtype: Any = np.float64) -> np.ndarray:
    a = zeros(shape, dtype)
    a[...] = np.arange(a.size).reshape(shape)
    return a


@pytest.fixture(params=STRATEGIES)
def strategy(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each supported sharing strategy, set as the process default for the test."""
    old = get_sharing_strategy()
    set_sharing_strategy(request.param)
    try:
        yield request.param
    finally:
        set_sharing_strategy(old)


@pytest.fixture(autouse=True)
def _restore_threshold_and_trim() -> Iterator[None]:
    """Restore the share threshold, then drop idle recycled segments before the leak check."""
    old = _reduction.get_share_threshold()
    try:
        yield
    finally:
        _reduction.set_share_threshold(old)
        gc.collect()
        trim()


# --------------------------------------------------------------------------- shared views

VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "whole": lambda a: a,
    "rows": lambda a: a[1:4],
    "column": lambda a: a[:, 1],
    "step": lambda a: a[::2, 1::3],
    "transpose": lambda a: a.T,
    "negative-strides": lambda a: a[::-1, ::-2],
    "zero-d": lambda a: a[2, 3, ...],
    "reshape": lambda a: a.reshape(4, 12),
    "newaxis": lambda a: a[:, None, 2:5],
    "dtype-view": lambda a: a.view(np.uint8)[:, 3:11],
    "as-strided-overlap": lambda a: as_strided(a, (5, 3), (8, 8)),
    "broadcast": lambda a: np.broadcast_to(a[1], (3, 8)),
    "last-element": lambda a: a[-1, -1:],
}


def test_shared_views_roundtrip_as_views_of_the_same_memory(strategy: str) -> None:
    """A shared view of any kind arrives as a view of the same memory: writes seen both ways."""
    cases = _Cases()
    for label, make in VIEWS.items():
        with cases.case(label):
            a = _filled((6, 8))
            v = make(a)
            data, fds = _send(v)
            assert len(fds) == (1 if strategy == "file_descriptor" else 0)
            assert len(data) < 512, "a handle must be O(1), not a copy"
            r = _reduction.loads(data, fds)
            assert is_shared(r)
            assert segment_buffer_of(r) is segment_buffer_of(a)
            assert r.shape == v.shape and r.strides == v.strides and r.dtype == v.dtype
            np.testing.assert_array_equal(r, v)
            assert np.shares_memory(r, v)
            if v.flags.writeable:
                idx = (0,) * r.ndim
                val = np.array(77, dtype=r.dtype)
                r[idx] = val
                assert v[idx] == val
                a[...] = 3
                np.testing.assert_array_equal(r, v)
            else:
                assert not r.flags.writeable
    cases.check()
    assert _tickets() == []


def test_empty_and_zero_d_shared_arrays_roundtrip(strategy: str) -> None:
    """Empty and 0-d shared arrays arrive shared, with their shape, dtype and value."""
    a = _filled((4, 5))
    for v in (a[2:2], a[:, 5:], a[1, 1, ...], zeros(0), zeros((), np.int16)):
        r = _roundtrip(v)
        assert is_shared(r) and r.shape == v.shape and r.dtype == v.dtype
        np.testing.assert_array_equal(r, v)


def test_readonly_flag_survives(strategy: str) -> None:
    """A read-only shared view arrives read-only; a writeable one arrives writeable."""
    a = _filled((3, 3))
    ro = a[1:]
    ro.flags.writeable = False
    r_ro, r_rw = _roundtrip([ro, a])
    assert not r_ro.flags.writeable
    assert r_rw.flags.writeable


def test_one_fd_and_one_mapping_per_segment_per_message(strategy: str) -> None:
    """``[a, a, a[2], a[:, 1]]`` travels with one fd and arrives on one mapping."""
    a = _filled((4, 3))
    msg = [a, a, a[2], a[:, 1]]
    before = _nfds()
    data, fds = _send(msg)
    assert len(fds) == (1 if strategy == "file_descriptor" else 0)
    out = _reduction.loads(data, fds)
    assert out[0] is out[1], "pickle's memo must keep the identity of a repeated array"
    bufs = {id(segment_buffer_of(x)) for x in out}
    assert bufs == {id(segment_buffer_of(a))}
    out[2][1] = 99.0
    assert a[2, 1] == 99.0 and out[3][2] == 99.0
    assert _nfds() == before
    assert _tickets() == []


def test_distinct_segments_travel_with_distinct_fds() -> None:
    """Arrays on different segments need one fd each (file_descriptor strategy)."""
    if "file_descriptor" not in STRATEGIES:
        pytest.skip("memfd segments are Linux-only")
    old = get_sharing_strategy()
    set_sharing_strategy("file_descriptor")
    try:
        arrays = [_filled((3,)) for _ in range(3)]
    finally:
        set_sharing_strategy(old)
    data, fds = _send([arrays[0], arrays[1], arrays[0][1:], arrays[2]])
    assert len(fds) == 3
    out = _reduction.loads(data, fds)
    for got, want in zip(out, [arrays[0], arrays[1], arrays[0][1:], arrays[2]], strict=True):
        assert np.shares_memory(got, want)


# --------------------------------------------------------------------------- value sends


def test_large_plain_arrays_become_shared_copies(strategy: str) -> None:
    """A non-shared array ≥ threshold arrives as a shared copy: equal, but not aliasing."""
    _reduction.set_share_threshold(0)
    cases = _Cases()
    for dtype in DTYPES:
        dt = np.dtype(dtype)
        for layout in ("C", "F", "strided", "0-d", "readonly"):
            with cases.case((str(dt), layout)):
                base = _sample(dt, 24)
                src = {
                    "C": base.reshape(4, 6),
                    "F": np.asfortranarray(base.reshape(4, 6)),
                    "strided": base.reshape(4, 6)[::-2, 1::2],
                    "0-d": base[5, ...],
                    "readonly": base.reshape(6, 4),
                }[layout]
                if layout == "readonly":
                    src.flags.writeable = False
                data, fds = _send(src)
                assert len(fds) == (1 if strategy == "file_descriptor" else 0)
                r = _reduction.loads(data, fds)
                assert is_shared(r) and not is_shared(src)
                assert r.shape == src.shape and r.dtype == src.dtype
                assert r.dtype.str == src.dtype.str and r.dtype.metadata == src.dtype.metadata
                assert r.tobytes() == src.tobytes()
                assert not np.shares_memory(r, src)
                assert segment_buffer_of(r).segment.pooled  # type: ignore[union-attr]
                if layout == "F":
                    assert r.flags.f_contiguous and not r.flags.c_contiguous
                if layout == "readonly":
                    assert not r.flags.writeable
                else:
                    before = src.tobytes()
                    flat = r.reshape(-1, order="A").view(np.uint8)
                    assert np.shares_memory(flat, r)
                    flat[...] = 0xA5  # the receiver's copy is its own
                    assert src.tobytes() == before
    cases.check()


def test_threshold_boundary_and_inline_pickles() -> None:
    """Below the threshold, empty arrays and object arrays pickle inline (no fds, no segment)."""
    _reduction.set_share_threshold(800)
    at = np.arange(100, dtype=np.float64)  # 800 bytes: shared
    below = np.arange(99, dtype=np.float64)  # 792 bytes: inline
    data, fds = _send(at)
    r = _reduction.loads(data, fds)
    assert is_shared(r)
    del r
    _reduction.set_share_threshold(0)
    for obj in (
        np.array([], dtype=np.float64),
        np.zeros((0, 1000)),
        np.array([1, "a", None] * 10000, dtype=object),
    ):
        data, fds = _send(obj)
        assert fds == [] and bytes(data[:4]) != _reduction.FD_MAGIC
        r = _reduction.loads(data, fds)
        assert not is_shared(r) and r.shape == obj.shape and r.dtype == obj.dtype
        assert (r == obj).all()
    _reduction.set_share_threshold(800)
    data, fds = _send(below)
    assert fds == [] and bytes(data[:4]) != _reduction.FD_MAGIC
    r = _reduction.loads(data, fds)
    assert not is_shared(r)
    np.testing.assert_array_equal(r, below)


def test_scalar_messages_pickle_as_the_stdlib_does_without_the_shared_pickler() -> None:
    """Scalars and flat tuples of scalars (the common control message) are pickled directly,
    byte for byte as the stdlib ``ForkingPickler`` would; a subclass of a scalar type or a
    tuple holding anything else still goes through the reducers (and carries its fds)."""
    for obj in [(1, 2, 3), 7, 2.5, "é" * 40, b"x" * 100, None, True, 3 + 4j, (), (2**100,),
                (1.5, None, False, b"ab", "s", 1j)]:  # fmt: skip
        data, fds, owned = _reduction.dumps(obj)
        assert bytes(data) == bytes(ForkingPickler.dumps(obj, pickle.HIGHEST_PROTOCOL)), obj
        assert fds == [] and owned == []
        assert _reduction.loads(data, []) == obj
    arr = zeros(4)
    arr[:] = 5
    data, fds = _send((1, arr))
    assert len(fds) == 1
    one, back = _reduction.loads(data, fds)
    assert one == 1 and is_shared(back) and back.tolist() == [5.0] * 4
    del back
    data, fds = _send((np.float64(2.5), np.int64(3)))  # float/int subclasses: via numpy's own
    assert _reduction.loads(data, fds) == (2.5, 3) and fds == []


def test_set_share_threshold_validation() -> None:
    """The threshold is a non-negative int; anything else is a ValueError and changes nothing."""
    _reduction.set_share_threshold(1234)
    assert _reduction.get_share_threshold() == 1234
    for bad in (-1, 1.5, "10", None, 2.0):
        with pytest.raises(ValueError):
            _reduction.set_share_threshold(bad)  # type: ignore[arg-type]
    assert _reduction.get_share_threshold() == 1234
    _reduction.set_share_threshold(0)
    assert _reduction.get_share_threshold() == 0


def test_default_threshold_is_64_kib() -> None:
    """By default, 64 KiB and larger plain arrays go through shared memory, smaller ones inline."""
    assert _reduction.get_share_threshold() == _reduction.SHARE_THRESHOLD_DEFAULT == 64 * 1024
    big = np.ones(8192)
    small = np.ones(8191)
    data, fds = _send([big, small])
    big_r, small_r = _reduction.loads(data, fds)
    assert is_shared(big_r) and not is_shared(small_r)


def test_stdlib_pickle_of_a_shared_array_is_a_plain_copy(strategy: str) -> None:
    """Plain ``pickle`` (not ForkingPickler) copies the data: no handle, no fd, no ticket."""
    a = _filled((5, 5))
    before = _nfds()
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        blob = pickle.dumps(a[1:], protocol=proto)
        assert _nfds() == before and _tickets() == []
        r = pickle.loads(blob)
        assert not is_shared(r)
        np.testing.assert_array_equal(r, a[1:])
        assert not np.shares_memory(r, a)


# --------------------------------------------------------------------------- recycling


def test_recycled_segment_reused_after_receiver_drops_its_views(strategy: str) -> None:
    """Value sends reuse the same pooled segment once the received copy is gone."""
    _reduction.set_share_threshold(0)
    x = np.arange(1000.0)
    r1 = _roundtrip(x)
    key1 = segment_buffer_of(r1).segment.key  # type: ignore[union-attr]
    del r1
    r2 = _roundtrip(x)
    assert segment_buffer_of(r2).segment.key == key1  # type: ignore[union-attr]
    np.testing.assert_array_equal(r2, x)


def test_recycled_segment_not_reused_while_the_receiver_holds_a_view(strategy: str) -> None:
    """A pooled segment whose received copy is still alive is not overwritten by the next send."""
    _reduction.set_share_threshold(0)
    x = np.arange(1000.0)
    r1 = _roundtrip(x)
    held = r1[10:20]
    del r1
    r2 = _roundtrip(x * 2)
    assert segment_buffer_of(r2).segment.key != segment_buffer_of(held).segment.key  # type: ignore[union-attr]
    np.testing.assert_array_equal(held, x[10:20])
    np.testing.assert_array_equal(r2, x * 2)


def test_recycled_segment_not_reused_while_a_ticket_is_in_flight(strategy: str) -> None:
    """A message not yet received (its ticket alive) pins its segment: no reuse, no overwrite."""
    _reduction.set_share_threshold(0)
    x = np.arange(1000.0)
    data1, fds1 = _send(x)  # in flight: nobody holds a view, only the ticket
    gc.collect()
    data2, fds2 = _send(x + 1)
    r2 = _reduction.loads(data2, fds2)
    r1 = _reduction.loads(data1, fds1)
    assert segment_buffer_of(r1).segment.key != segment_buffer_of(r2).segment.key  # type: ignore[union-attr]
    np.testing.assert_array_equal(r1, x)
    np.testing.assert_array_equal(r2, x + 1)


# --------------------------------------------------------------------------- named refcount


def test_named_segment_lives_while_a_ticket_is_in_flight() -> None:
    """file_system: with a message in flight the name survives its sender; then it is unlinked."""
    old = get_sharing_strategy()
    set_sharing_strategy("file_system")
    try:
        a = _filled((4, 4))
    finally:
        set_sharing_strategy(old)
    name = segment_buffer_of(a).segment.name  # type: ignore[union-attr]
    assert name is not None
    data, fds = _send(a[1:])
    assert fds == [] and len(_tickets()) == 1 and _tickets()[0].startswith(name + ".t")
    del a
    gc.collect()
    assert name in os.listdir(shm_dir()), "unlinked while a message was in flight"
    r = _reduction.loads(data, fds)
    assert _tickets() == [], "the receiver removes the ticket once it holds the segment"
    assert name in os.listdir(shm_dir())
    np.testing.assert_array_equal(r, np.arange(16.0).reshape(4, 4)[1:])
    del r
    assert name not in os.listdir(shm_dir()), "the last holder must unlink the name"


def test_named_handle_replay_is_invalid_handle() -> None:
    """B10: unpickling a file_system handle a second time (ticket consumed) → InvalidHandle."""
    old = get_sharing_strategy()
    set_sharing_strategy("file_system")
    try:
        a = _filled((3,))
    finally:
        set_sharing_strategy(old)
    data, fds = _send(a)
    r = _reduction.loads(data, fds)
    with pytest.raises(InvalidHandle):
        _reduction.loads(data, [])
    del a, r
    with pytest.raises(InvalidHandle):
        _reduction.loads(data, [])
    assert [n for n in os.listdir(shm_dir()) if n.startswith("aioshm")] == []


# --------------------------------------------------------------------------- malformed input


def test_wrong_fd_count_is_protocol_error_and_closes_every_fd() -> None:
    """C3: a message with too few or too many fds → ProtocolError; every fd passed is closed."""
    if "file_descriptor" not in STRATEGIES:
        pytest.skip("memfd segments are Linux-only")
    old = get_sharing_strategy()
    set_sharing_strategy("file_descriptor")
    try:
        a = _filled((4,))
    finally:
        set_sharing_strategy(old)
    before = _nfds()
    data, fds = _send([a])
    assert len(fds) == 1
    r, w = os.pipe()
    with pytest.raises(ProtocolError):
        _reduction.loads(data, [*fds, r, w])  # too many
    assert _nfds() == before
    data, fds = _send([a])
    with pytest.raises(ProtocolError):
        _reduction.loads(data, [])  # too few
    os.close(fds[0])
    plain, no_fds = _send([1, 2, 3])
    assert no_fds == []
    r, w = os.pipe()
    with pytest.raises(ProtocolError):
        _reduction.loads(plain, [r, w])  # stray fds on a message that carries none
    assert _nfds() == before
    assert a[0] == 0.0, "the sender's array is untouched"


def test_hostile_handle_in_a_message_is_invalid_handle_and_leaks_nothing(strategy: str) -> None:
    """A handle whose header overruns its segment → InvalidHandle; the received fd is closed."""
    a = _filled((4,))
    seg = segment_buffer_of(a).segment  # type: ignore[union-attr]

    class Forged:
        def __init__(self, header: tuple[Any, ...]) -> None:
            self.header = header

        def __reduce__(self) -> tuple[Any, ...]:
            if seg.name is not None:
                ref: object = ("name", seg.name, seg.ticket_name())
            else:
                ref = _reduction.fd_ref(seg.ticket_fd(), owned=True, memo_key=seg.key)
            return (_reduction._rebuild_ndarray, (ref, False, *self.header))

    before = _nfds()
    cases = _Cases()
    for header in [
        (0, (PAGE + 1,), (1,), np.dtype("u1"), False),
        (-8, (1,), (8,), np.dtype("f8"), False),
        (0, (2,), (8,), np.dtype("O"), False),
        (PAGE - 8, (2,), (8,), np.dtype("f8"), False),
    ]:
        with cases.case(header[:3]):
            data, fds = _send(Forged(header))
            with pytest.raises(InvalidHandle):
                _reduction.loads(data, fds)
            assert _nfds() == before
    cases.check()
    # the sender's mapping is unaffected and later messages still work
    np.testing.assert_array_equal(_roundtrip(a), np.arange(4.0))
    assert _tickets() == []


def test_fd_reference_without_its_fd_is_protocol_error() -> None:
    """An fd index with no fd behind it (or a plain ForkingPickler load) → ProtocolError."""
    if "file_descriptor" not in STRATEGIES:
        pytest.skip("memfd segments are Linux-only")
    with pytest.raises(ProtocolError):
        _reduction.take_fd(0)  # outside any loads(): no fds arrived
    old = get_sharing_strategy()
    set_sharing_strategy("file_descriptor")
    try:
        a = _filled((2,))
    finally:
        set_sharing_strategy(old)
    data, fds = _send(a)
    body = bytes(data[_reduction.FD_HEADER.size :])
    with pytest.raises(ProtocolError):
        _reduction.ForkingPickler.loads(body)  # the handle refers to fd #0 of no message
    for fd in fds:
        os.close(fd)


# --------------------------------------------------------------------------- fd limits


def _free_slots_below(limit: int) -> int:
    free = 0
    for fd in range(limit):
        try:
            os.fstat(fd)
        except OSError:
            free += 1
    return free


def _limit_with_free_slots(n: int) -> int:
    """The smallest RLIMIT_NOFILE soft limit that leaves exactly ``n`` fd numbers free."""
    limit = 0
    while _free_slots_below(limit) < n:
        limit += 1
    return limit


@pytest.fixture
def four_memfd_arrays() -> Iterator[list[np.ndarray]]:
    if "file_descriptor" not in STRATEGIES:
        pytest.skip("memfd segments are Linux-only")
    old = get_sharing_strategy()
    set_sharing_strategy("file_descriptor")
    try:
        arrays = [_filled((16,)) for _ in range(4)]
    finally:
        set_sharing_strategy(old)
    yield arrays
    arrays.clear()


def test_truncated_scm_rights_is_fd_limit_error_and_leaks_nothing(
    four_memfd_arrays: list[np.ndarray],
) -> None:
    """C2: 4 fds sent to a receiver with room for 2 → FdLimitError; no fd leaks either side."""
    a, b = Pipe()
    try:
        before = _nfds()
        a.send(four_memfd_arrays)
        assert _nfds() == before, "the sender closes its tickets once the message is sent"
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (_limit_with_free_slots(2), hard))
            with pytest.raises(FdLimitError, match="MSG_CTRUNC"):
                b.recv()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert _nfds() == before
    finally:
        a.close()
        b.close()


def test_connection_stays_usable_after_a_truncated_transfer(
    four_memfd_arrays: list[np.ndarray],
) -> None:
    """C2: after FdLimitError the channel resynchronises (next message arrives) or is closed.

    Today the bytes read with the truncated ancillary data are dropped and the rest of the
    frame stays in the socket, so the next ``recv`` parses pickle bytes as a frame header
    (b"AIOX" read as a length: ProtocolError "frame length 1095323480 exceeds ...") and the
    following message is lost. The writer is closed before that ``recv`` so it cannot hang.
    """
    a, b = Pipe()
    try:
        a.send(four_memfd_arrays)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (_limit_with_free_slots(2), hard))
            with pytest.raises(FdLimitError):
                b.recv()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        a.send("next message")
        a.close()
        if b.closed:
            return
        assert b.recv() == "next message"
    finally:
        a.close()
        b.close()


def test_live_segments_back_to_baseline_after_roundtrips(strategy: str) -> None:
    """After many messages and ``trim()``, no segment of this test is still mapped."""
    _reduction.set_share_threshold(0)
    before = {id(s) for s in live_segments()}
    a = _filled((8, 8))
    for i in range(50):
        msg = [a[i % 8], np.full(100, i), a.T]
        out = _roundtrip(msg)
        assert out[1][0] == i and np.shares_memory(out[0], a)
    del a, out, msg
    gc.collect()
    trim()
    assert {id(s) for s in live_segments()} <= before
    assert _tickets() == []
