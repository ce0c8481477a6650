"""``SharedCounts``: a queue's item count and shutdown flag in a shared page, no syscalls."""

from __future__ import annotations

import fcntl
import os

import pytest

import aioshm.multiprocessing as mp
from aioshm._queues import _NSLOTS, SharedCounts, _lock_byte

pytestmark = pytest.mark.timeout(60)
# in-process "other processes" need locks owned by open file descriptions (Linux)
ofd_only = pytest.mark.skipif(not hasattr(fcntl, "F_OFD_SETLK"), reason="needs OFD locks")


@ofd_only
def test_counts_and_flag_are_shared_between_mappings() -> None:
    a = SharedCounts()
    b = SharedCounts(os.dup(a.fd))  # another "process": its own slot
    try:
        for _ in range(5):
            a.put_done()
        b.got()
        b.put_done()
        assert a.qsize() == b.qsize() == 5
        assert a._slot != b._slot
        assert not b.shut_down
        a.shutdown()
        assert b.shut_down
    finally:
        a.close()
        b.close()


@ofd_only
def test_every_slot_taken_falls_back_to_the_locked_shared_slot() -> None:
    a = SharedCounts()
    hog = os.open(f"/proc/self/fd/{a.fd}", os.O_RDWR | os.O_CLOEXEC)
    b = SharedCounts(os.dup(a.fd))
    try:
        for i in range(_NSLOTS):
            assert _lock_byte(hog, i, wait=False)
        a.put_done()
        a.put_done()
        b.got()
        assert a._slot == b._slot == 2  # the shared slot, updated under a lock
        assert a.qsize() == 1
    finally:
        os.close(hog)
        a.close()
        b.close()


@ofd_only
def test_a_slot_freed_by_a_dead_holder_keeps_its_counts() -> None:
    a = SharedCounts()
    a.put_done()
    a.put_done()
    slot = a._slot
    b = SharedCounts(os.dup(a.fd))
    a._words.release()
    a._map.close()
    os.close(a._lock_fd)  # its lock goes, as when a process dies
    a._lock_fd = -1
    try:
        c = SharedCounts(os.dup(b.fd))
        c.got()
        assert c._slot == slot  # took over the freed slot, adding to its counts
        assert b.qsize() == 1
        c.close()
    finally:
        os.close(a.fd)
        a.fd = -1
        b.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_counts_in_a_slot_of_its_own() -> None:
    """A forked child inherits the parent's open file description, hence its slot lock: it
    claims its own slot before its first update, so neither loses the other's counts."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    try:
        for i in range(3):
            q.put(i)
        parent_slot = q._counts._slot
        p = ctx.Process(target=_put_and_get, args=(q,))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        assert q.qsize() == 3 + 5 - 2
        q.put(99)
        assert q._counts._slot == parent_slot
        assert q.qsize() == 7
        got = [q.get(timeout=10) for _ in range(7)]
        assert got[:1] == [2] and got[-1] == 99
        assert q.qsize() == 0
    finally:
        q.close()


def _put_and_get(q: mp.Queue) -> None:  # type: ignore[name-defined]
    for i in range(5):
        q.put(100 + i)
    assert q.get(timeout=10) == 0
    assert q.get(timeout=10) == 1


def _die(counts: SharedCounts) -> None:
    """What the kernel does when the process holding ``counts`` is SIGKILLed."""
    counts._words.release()
    counts._map.close()
    os.close(counts._lock_fd)  # its slot lock goes
    counts._lock_fd = -1
    os.close(counts.fd)
    counts.fd = -1


@ofd_only
def test_a_dead_open_window_is_repaired_at_a_quiet_moment() -> None:
    """Killed inside a put's window (token taken, put counted, nothing sent): the next
    repair at an empty moment zeroes the balance and asks for the tokens to be restored."""
    a = SharedCounts()
    b = SharedCounts(os.dup(a.fd))
    try:
        a.put_done()
        a.got()
        b.enter()
        b.put_done()
        _die(b)
        assert a.balance() == 1
        fixed: list[int] = []
        assert a.repair(lambda: 7, fixed.append)
        assert fixed == [7]
        assert a.balance() == 0 and not a.repair_due
        # the dead window is closed now: a second repair has nothing to wait for
        assert a.repair(lambda: 8, fixed.append)
        assert a.balance() == 0
    finally:
        a.close()


@ofd_only
def test_no_repair_while_a_live_process_is_inside_a_window() -> None:
    a = SharedCounts()
    b = SharedCounts(os.dup(a.fd))
    try:
        a.got()
        b.enter()
        b.put_done()  # alive, mid-put
        fixed: list[int] = []
        assert not a.repair(lambda: 0, fixed.append)
        assert fixed == [] and a.balance() == 0
        b.leave()
        assert a.repair(lambda: None, fixed.append) is False  # not empty: not quiet either
        assert fixed == []
    finally:
        a.close()
        b.close()


@ofd_only
def test_a_window_entered_during_a_repair_cancels_it() -> None:
    a = SharedCounts()
    b = SharedCounts(os.dup(a.fd))
    try:
        b.put_done()
        fixed: list[int] = []

        def measure() -> int:
            b.enter()  # a put starts between the two scans
            b.leave()
            return 3

        assert not a.repair(measure, fixed.append)
        assert fixed == [] and a.balance() == 1
    finally:
        a.close()
        b.close()


@ofd_only
def test_a_process_taking_over_a_dead_slot_flags_the_repair() -> None:
    a = SharedCounts()
    b = SharedCounts(os.dup(a.fd))
    try:
        a.put_done()
        b.enter()
        slot = b._slot
        _die(b)
        c = SharedCounts(os.dup(a.fd))
        c.got()
        assert c._slot == slot and a.repair_due
        words = c._words
        assert words[slot + 2] == words[slot + 3]  # the dead window is closed
        c.close()
    finally:
        a.close()
