"""Process queues: ``Queue``, ``JoinableQueue``, ``SimpleQueue`` (synchronous face, anyio-free).

The stdlib's blocking API and semantics, on a :class:`~aioshm._connection.RecordChannel`
instead of a pipe, two locks and a feeder thread:

* every item is one record on a ``SOCK_SEQPACKET`` socketpair, so any number of processes put
  and get with no cross-process lock, and a process killed mid-put or mid-get cannot wedge the
  queue for the others;
* ``put`` pickles and sends in the calling thread (no feeder thread): pickling errors raise
  from ``put`` itself, and a child's items are in the kernel when ``put`` returns, so joining
  a child before draining its queue cannot deadlock on a flush. The kernel buffer (a few MiB,
  about ten thousand items; large payloads are spilled to memfds) is the only buffer: an
  unbounded queue's ``put`` blocks only when that much is unconsumed;
* ``maxsize`` is enforced with a token pipe holding one byte per free slot; ``qsize()`` and
  the shutdown flag live in a shared page (:class:`SharedCounts`) that puts and gets update
  without a syscall (``qsize()`` is approximate, as in the stdlib); a second pipe wakes
  waiters at shutdown;
* ndarrays in shared memory travel as handles with their fds in the same record.
"""

from __future__ import annotations

import fcntl
import mmap
import multiprocessing
import os
import queue as _queue
import select
import struct
import termios
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from functools import partial
from multiprocessing import context as _mp_context
from typing import TYPE_CHECKING, Any, Final, Generic, Self, TypeVar, overload

from . import _backend, _mmsg, _reduction
from ._connection import anon_fd, record_pair
from ._connection import poll_until as _poll_until
from ._connection import wait_any as _wait_any
from ._exceptions import FdLimitError, ProtocolError, QueueShutDown
from ._shm._segment import HAS_OFD, ofd_lock_byte
from ._typing import ItemT

T = TypeVar("T")

if TYPE_CHECKING:
    from ._backend import Backend

__all__ = ("JoinableQueue", "Queue", "SimpleQueue")

try:
    from _multiprocessing import SemLock as _SemLock  # type: ignore[import-not-found]

    _SEM_VALUE_MAX: int = _SemLock.SEM_VALUE_MAX
except ImportError:  # pragma: no cover
    _SEM_VALUE_MAX = 2**31 - 1

_PIPE_MAX: Final = 1 << 20
# outcomes of one attempt to put (Queue._try_put)
PUT: Final = 0  # the item is on the queue
NO_SLOT: Final = 1  # the queue holds maxsize items: wait on the token pipe
NO_ROOM: Final = 2  # the socket buffer is full: wait until the data fd is writable
_POLLIN: Final = select.POLLIN
_POLLOUT: Final = select.POLLOUT


def _token_pipe(preload: int) -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) if hasattr(os, "pipe2") else os.pipe()
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _PIPE_MAX)
        except OSError:
            pass
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    if preload:
        os.write(w, b"\0" * preload)
    return r, w


def _pipe_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


# --------------------------------------------------------------------------- shared counts

# words before the slots: [0] shutdown flag, [1] a repair is due, [2..5] the shared slot
_HEADER: Final = 8
_STRIDE: Final = 4  # words per slot: puts, gets, windows entered, windows left
_NSLOTS: Final = 508  # per-process slots after the header
_COUNTS_BYTES: Final = 8 * (_HEADER + _STRIDE * _NSLOTS)
_SHARED: Final = 2  # the shared slot's first word
_LOCK_SHARED: Final = _NSLOTS  # the byte locked around updates of the shared slot
_LOCK_REPAIR: Final = _NSLOTS + 1  # the byte a process repairing the counts holds
_fork_generation = 0


def _after_fork() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _lock_byte(fd: int, offset: int, *, wait: bool, unlock: bool = False) -> bool:
    """Write-lock (or unlock) one byte of ``fd``; False if it is held elsewhere (no wait)."""
    if HAS_OFD:  # owned by the open file description: per process, dropped when it dies
        return ofd_lock_byte(fd, fcntl.F_UNLCK if unlock else fcntl.F_WRLCK, offset, wait=wait)
    # macOS: classic per-process record locks
    flags = fcntl.LOCK_UN if unlock else fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)
    try:
        fcntl.lockf(fd, flags, 1, offset)
    except (BlockingIOError, PermissionError):
        return False
    return True


class SharedCounts:
    """A queue's item count and shutdown flag in one memfd every process maps: no syscall.

    ``qsize()`` is Σ puts − Σ gets over per-process slots. A process updates only its own
    slot, claimed with a write lock on one byte of the file through an open file description
    of its own (the kernel drops it when the process dies; a process that takes over the
    slot adds to its counts, which stay true), so plain 8-byte stores need no atomics. A
    forked child claims a slot of its own before its first update. If every slot is taken,
    updates go to a shared slot under a lock (correct, one syscall pair each).

    Each slot also counts the *windows* its process entered and left: a window spans one
    put or get from taking a capacity token (or a record) to the last count it updates. See
    Note [Capacity after a kill] for what they are for.
    """

    __slots__ = ("_gen", "_lock_fd", "_map", "_slot", "_tlock", "_words", "fd")

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = anon_fd("queue-counts", _COUNTS_BYTES)
        self.fd = fd
        self._map = mmap.mmap(fd, _COUNTS_BYTES)
        self._words = memoryview(self._map).cast("q")
        self._slot = 0  # index of our puts word; 0: not claimed yet
        self._lock_fd = -1
        self._gen = -1
        # the threads of one process share its slot: an increment is a load and a store,
        # and a lost one would leave a window open for good (no repair could run)
        self._tlock = threading.Lock()

    def _claim(self) -> int:
        if self._lock_fd >= 0:  # inherited across fork: the parent's, not ours
            os.close(self._lock_fd)
            self._lock_fd = -1
            self._tlock = threading.Lock()  # whatever state another thread left it in
        self._gen = _fork_generation
        try:
            if HAS_OFD:
                self._lock_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
            else:  # pragma: no cover
                self._lock_fd = os.dup(self.fd)
        except OSError:
            self._slot = _SHARED  # no fd to lock with: the shared slot
            return self._slot
        words = self._words
        for i in range(_NSLOTS):
            if _lock_byte(self._lock_fd, i, wait=False):
                slot = _HEADER + _STRIDE * i
                if words[slot + 2] != words[slot + 3]:
                    # its last owner died inside a window: what it took is repaired at the
                    # next quiet moment (see Note [Capacity after a kill]); close the window
                    words[1] = 1
                    words[slot + 3] = words[slot + 2]
                self._slot = slot
                return slot
        self._slot = _SHARED
        return self._slot

    def _mine(self) -> int:
        slot = self._slot
        if not slot or self._gen != _fork_generation:
            slot = self._claim()
        return slot

    def _bump(self, slot: int, which: int) -> None:
        """Add one to a word of ``slot``; the caller holds ``_tlock``."""
        if slot == _SHARED:
            fd = self._lock_fd if self._lock_fd >= 0 else self.fd
            _lock_byte(fd, _LOCK_SHARED, wait=True)  # excludes other processes
            try:
                self._words[slot + which] += 1
            finally:
                _lock_byte(fd, _LOCK_SHARED, wait=False, unlock=True)
        else:
            self._words[slot + which] += 1

    def _add(self, which: int) -> None:
        slot = self._mine()
        with self._tlock:
            self._bump(slot, which)

    def put_done(self) -> None:
        self._add(0)

    def got(self) -> None:
        self._add(1)

    def enter(self) -> None:
        """This process starts a put or get that takes a token or a record."""
        self._add(2)

    def leave(self) -> None:
        """... and is done with it: every count it changes is updated."""
        self._add(3)

    # the hot path: one window of a put or get, the thread lock held throughout (the window
    # holds only non-blocking syscalls), its counts bumped inside
    def begin(self) -> int:
        """Enter a window; returns the slot to pass to :meth:`bump` and :meth:`end`."""
        slot = self._mine()
        self._tlock.acquire()
        try:
            self._bump(slot, 2)
        except BaseException:
            self._tlock.release()
            raise
        return slot

    def bump(self, slot: int, which: int) -> None:
        """Count a put (``which=0``) or a get (1) inside a window."""
        if slot == _SHARED:
            self._bump(slot, which)
        else:
            self._words[slot + which] += 1

    def bump_by(self, slot: int, which: int, k: int) -> None:
        """Count ``k`` puts (``which=0``) or gets (1) inside a window (a batch)."""
        if slot == _SHARED:
            for _ in range(k):
                self._bump(slot, which)
        else:
            self._words[slot + which] += k

    def end(self, slot: int) -> None:
        """Leave the window entered by :meth:`begin`."""
        try:
            self._bump(slot, 3)
        finally:
            self._tlock.release()

    def balance(self) -> int:
        """Σ puts − Σ gets (exact only while no process died inside a window)."""
        words = self._words
        puts = words[_SHARED] + sum(words[_HEADER::_STRIDE])
        gets = words[_SHARED + 1] + sum(words[_HEADER + 1 :: _STRIDE])
        return puts - gets

    def qsize(self) -> int:
        return max(0, self.balance())

    @property
    def repair_due(self) -> bool:
        """A process died inside a window: a repair is due at the next quiet moment."""
        return self._words[1] != 0

    def _windows(self, held: list[int]) -> int | None:
        """Σ windows entered if no live process is inside one, else None. A slot whose
        window is open with no live owner (its lock byte is free) is locked into ``held``
        (so nobody claims it meanwhile), flagged as due for repair and counted as closed."""
        words = self._words
        if words[_SHARED + 2] != words[_SHARED + 3]:
            return None  # a live process (or one we cannot tell) in the shared slot
        entered = words[_HEADER + 2 :: _STRIDE].tolist()
        left = words[_HEADER + 3 :: _STRIDE].tolist()
        for i, (e, x) in enumerate(zip(entered, left, strict=True)):
            if e == x:
                continue
            slot = _HEADER + _STRIDE * i
            if slot == self._slot:
                return None  # another thread of ours
            if i in held:
                continue
            if not _lock_byte(self._lock_fd, i, wait=False):
                return None  # a live process is inside a put or get
            held.append(i)
            words[1] = 1
        return sum(entered) + words[_SHARED + 2]

    def repair(self, measure: Callable[[], int | None], fix: Callable[[int], None]) -> bool:
        """Make the counts true again at a quiet moment: see Note [Capacity after a kill].

        ``measure()`` is called when no live process is inside a put or get: None if the
        queue holds a record, else what ``fix`` needs (the free tokens). If still no process
        entered a put or get by then, the balance is set to zero through this process's slot
        and ``fix(measured)`` restores the tokens. False if the moment was not quiet.
        """
        if not HAS_OFD:  # pragma: no cover - no per-description locks to tell the dead
            return False
        slot = self._slot
        if not slot or self._gen != _fork_generation:
            slot = self._claim()
        if slot == _SHARED or self._lock_fd < 0:
            return False
        if not _lock_byte(self._lock_fd, _LOCK_REPAIR, wait=False):
            return False  # another process is repairing
        held: list[int] = []
        try:
            before = self._windows(held)
            if before is None:
                return False
            balance = self.balance()
            measured = measure()
            if measured is None:
                return False
            if self._windows(held) != before:
                return False  # someone started a put or get meanwhile: try another time
            fix(measured)
            words = self._words
            if balance > 0:
                words[slot + 1] += balance
            elif balance < 0:
                words[slot] -= balance
            for i in held:  # the dead windows are accounted for now: close them
                dead = _HEADER + _STRIDE * i
                words[dead + 3] = words[dead + 2]
            words[1] = 0
            return True
        finally:
            for i in held:
                _lock_byte(self._lock_fd, i, wait=False, unlock=True)
            _lock_byte(self._lock_fd, _LOCK_REPAIR, wait=False, unlock=True)

    @property
    def shut_down(self) -> bool:
        return self._words[0] != 0

    def shutdown(self) -> None:
        self._words[0] = 1

    def close(self) -> None:
        if self.fd >= 0:
            self._words.release()
            self._map.close()
            os.close(self.fd)
            self.fd = -1
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1


def _close_fds(channels: list[Any], fds: list[int]) -> None:
    for ch in channels:
        ch.close()
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Queue(Generic[ItemT]):
    """A process-shared FIFO queue with the stdlib ``multiprocessing.Queue`` API.

    ``Queue[T]`` is generic in what it carries (``aioshm.Queue[int](maxsize=8)``): ``put``
    takes a ``T``, ``get`` returns one. ``backend`` (keyword) makes another engine's queue with
    the same face (e.g. on Ray).
    """

    @overload
    def __new__(cls, maxsize: int = 0, *, ctx: Any = None, backend: None = None) -> Self: ...
    @overload
    def __new__(cls, maxsize: int = 0, *, ctx: Any = None, backend: Backend) -> Any: ...
    def __new__(cls, maxsize: int = 0, *, ctx: Any = None, backend: Any = None) -> Any:
        if backend is not None:  # another engine's queue (it has maxsize, not ctx)
            remote = _backend.engine_queue(
                backend, maxsize, joinable=issubclass(cls, JoinableQueue)
            )
            if remote is not None:
                return remote
        return super().__new__(cls)

    def __init__(self, maxsize: int = 0, *, ctx: Any = None, backend: Any = None) -> None:
        if maxsize <= 0:
            maxsize = _SEM_VALUE_MAX
        self._maxsize = maxsize
        self._ctx = ctx if ctx is not None else multiprocessing.get_context()
        self._reader, self._writer = record_pair()
        bounded = maxsize <= _PIPE_MAX
        self._slots_r, self._slots_w = _token_pipe(maxsize) if bounded else (-1, -1)
        self._counts = SharedCounts()
        self._shut_r, self._shut_w = _token_pipe(0)  # wakes waiters (the flag is in _counts)
        self._closed = False
        self._after_init()

    def _fds(self) -> list[int]:
        return [self._slots_r, self._slots_w, self._counts.fd, self._shut_r, self._shut_w]

    def _set_fds(self, fds: list[int]) -> None:
        self._slots_r, self._slots_w, counts_fd, self._shut_r, self._shut_w = fds
        self._counts = SharedCounts(counts_fd)

    def _after_init(self) -> None:
        self._async_state: Any = None
        self._eager = 0
        self._get_poller: Any = None  # the blocking get's poll object (data fd + shutdown)
        self._got_waiting = False  # the last blocking get found the queue empty
        self._put_here = False  # this process put an item (empty() after close() tells)
        self._finalizer = weakref.finalize(
            self,
            _close_fds,
            [self._reader, self._writer, self._counts],
            [fd for fd in self._fds() if fd >= 0 and fd != self._counts.fd],
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} at {id(self):#x} maxsize={self._maxsize}>"

    # -- pickling: only while spawning a child, like the stdlib -----------------------------
    def __getstate__(self) -> dict[str, Any]:
        _mp_context.assert_spawning(self)
        fds = self._fds()
        return {
            "maxsize": self._maxsize,
            "reader": self._reader,
            "writer": self._writer,
            "fds": [_reduction.fd_ref(os.dup(fd), owned=True) if fd >= 0 else None for fd in fds],
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._maxsize = state["maxsize"]
        self._reader = state["reader"]
        self._writer = state["writer"]
        fds = [_reduction.take_fd(ref) if ref is not None else -1 for ref in state["fds"]]
        self._set_fds(fds)
        for fd in fds:
            if fd >= 0:
                os.set_blocking(fd, False)
        self._closed = False
        self._ctx = multiprocessing.get_context()
        self._after_init()

    # -- accounting -------------------------------------------------------------------------
    def _is_shutdown(self) -> bool:
        return self._counts.shut_down

    def _deadline(self, block: bool, timeout: float | None) -> float | None:
        if not block:
            return time.monotonic()
        if timeout is None:
            return None
        return time.monotonic() + max(0.0, timeout)

    def _try_take_slot(self) -> bool:
        if self._slots_r < 0:
            return True
        try:
            return bool(os.read(self._slots_r, 1))
        except BlockingIOError:
            return False

    def _give_slot(self) -> None:
        if self._slots_w >= 0:
            try:
                os.write(self._slots_w, b"\0")
            except BlockingIOError:
                pass

    def _give_slots(self, k: int) -> None:
        if self._slots_w >= 0 and k > 0:
            try:
                os.write(self._slots_w, b"\0" * k)
            except BlockingIOError:
                pass

    def _check_closed(self) -> None:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    def _check_put(self) -> None:
        self._check_closed()
        if self._counts.shut_down:
            raise QueueShutDown(f"Queue {self!r} is shut down")

    # -- steps shared by the blocking and the async face --------------------------------------
    #
    # Note [Capacity after a kill]
    # ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    # A bounded queue's free capacity is one byte per free slot in a token pipe; the items
    # are records on the socket. A put takes a token and sends; a get receives and gives a
    # token back. Nothing is held across a wait: a put that finds the socket buffer full
    # gives its token back before it waits, so a process killed while blocked in put (or
    # get) holds nothing. A failed get (a record it could not use: FdLimitError, an
    # oversized, empty or otherwise malformed record) still counts the record it consumed
    # and gives its token back.
    #
    # What is left is a process killed inside the few instructions between one syscall and
    # the next (a token taken but the record not yet sent; a record received but the token
    # not yet given back). No user-space count can be made exact across such a kill, so
    # every put and get marks that stretch as a *window* in its process's slot of the shared
    # counts (entered / left), and the counts are repaired at the next quiet moment: when no
    # live process is inside a window (a dead one's slot lock is gone, so its open window is
    # known to be dead) and the socket holds no record, the queue is empty, so the true
    # state is "maxsize free tokens, qsize 0". A repair (under a lock of its own) reads the
    # token count and the balance, checks that no window was entered meanwhile (the
    # windows-entered sums are unchanged: a seqlock), and restores both. Gets and puts pay
    # two stores each for this; the repair runs only when a get or ``qsize()`` finds the
    # queue empty and its counts wrong, when a put finds no token with nothing queued, or
    # after a dead window was seen.

    def _try_put(self, record: Any, fds: list[int]) -> int:
        """One non-blocking attempt: :data:`PUT`, :data:`NO_SLOT` or :data:`NO_ROOM`. Holds
        no token when it returns (see Note [Capacity after a kill])."""
        counts = self._counts
        slot = counts.begin()
        try:
            if not self._try_take_slot():
                return NO_SLOT
            counts.bump(slot, 0)  # before the item can be taken: qsize() never goes negative
            try:
                sent = self._writer.try_send_record(record, fds)
            except BaseException:
                counts.bump(slot, 1)
                self._give_slot()
                raise
            if not sent:
                counts.bump(slot, 1)
                self._give_slot()
                return NO_ROOM
            self._put_here = True
            return PUT
        finally:
            counts.end(slot)

    def _try_put_batch(self, records: list[Any], start: int) -> tuple[int, int]:
        """:meth:`_try_put` for fd-less ``records[start:]``, several per syscall: ``(how
        many went, outcome)``; when none went, the outcome says why (:data:`NO_SLOT`,
        :data:`NO_ROOM`). Holds no token when it returns."""
        counts = self._counts
        slot = counts.begin()
        try:
            want = min(len(records) - start, _mmsg.BATCH)
            if self._slots_r < 0:
                tokens = want
            else:
                try:
                    tokens = len(os.read(self._slots_r, want))
                except BlockingIOError:
                    return 0, NO_SLOT
            counts.bump_by(slot, 0, tokens)  # before the items can be taken (see _try_put)
            try:
                sent = self._writer.try_send_records(records[: start + tokens], start)
            except BaseException:
                counts.bump_by(slot, 1, tokens)
                self._give_slots(tokens)
                raise
            if sent < tokens:
                counts.bump_by(slot, 1, tokens - sent)
                self._give_slots(tokens - sent)
            if not sent:
                return 0, NO_ROOM
            self._put_here = True
            return sent, PUT
        finally:
            counts.end(slot)

    def _try_get(self) -> Any:
        """One non-blocking attempt: the record ``(data, fds)`` or None. A record that was
        consumed but cannot be used is still counted, and its token given back."""
        counts = self._counts
        slot = counts.begin()
        try:
            try:
                got = self._reader.try_recv_record()
            except (EOFError, ProtocolError, FdLimitError) as exc:
                counts.bump(slot, 1)
                self._give_slot()
                if isinstance(exc, EOFError):  # this process holds a writer: not the end
                    raise ProtocolError("received an empty record") from None
                raise
            if got is not None:
                counts.bump(slot, 1)
                self._give_slot()
        finally:
            counts.end(slot)
        if counts.repair_due:
            self._settle()
        return got

    def _settle(self) -> bool:
        """Repair the counts and the capacity if the queue is empty and they are wrong (a
        process was killed inside a put or get). True if a repair was made."""
        counts = self._counts
        if self._reader.closed or self._reader.poll(0):
            return False
        if (
            not counts.repair_due
            and counts.balance() == 0
            and (self._slots_r < 0 or _pipe_size(self._slots_r) == self._maxsize)
        ):
            return False
        return counts.repair(self._measure, self._fix_tokens)

    def _measure(self) -> int | None:
        if self._reader.poll(0):
            return None  # a record is waiting: not a quiet moment
        return _pipe_size(self._slots_r) if self._slots_r >= 0 else 0

    def _fix_tokens(self, free: int) -> None:
        if self._slots_r < 0:
            return
        missing = self._maxsize - free
        try:
            if missing > 0:
                os.write(self._slots_w, b"\0" * missing)
            elif missing < 0:
                os.read(self._slots_r, -missing)
        except BlockingIOError:
            pass

    # -- the stdlib API ---------------------------------------------------------------------
    def put(self, obj: ItemT, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` on the queue; block (up to ``timeout``) while it is full.

        :raises queue.Full: if no slot frees up in time (or at once, with ``block=False``).
        :raises ValueError: if the queue was closed in this process.
        :raises ~aioshm.QueueShutDown: if the queue was shut down.
        """
        self._check_put()
        record, fds, owned = self._writer.encode(obj)
        try:
            self._put_record(record, fds, self._deadline(block, timeout))
        finally:
            _reduction.close_owned(fds, owned)

    def _put_record(self, record: Any, fds: list[int], deadline: float | None) -> None:
        """:meth:`put` of one encoded record: try, and wait for room until ``deadline``."""
        while True:
            outcome = self._try_put(record, fds)
            if outcome == PUT:
                return
            self._wait_room(outcome, deadline)

    def _wait_room(self, outcome: int, deadline: float | None) -> None:
        """Wait after a put found no slot (``NO_SLOT``) or no room in the socket buffer
        (``NO_ROOM``). Returns when it may be worth trying again.

        :raises queue.Full: at the deadline.
        :raises ~aioshm.QueueShutDown: if the queue was shut down meanwhile.
        """
        if outcome == NO_SLOT:
            if self._settle():
                return  # capacity a killed process took is back
            wait_fd, events = self._slots_r, _POLLIN
        else:
            wait_fd, events = self._writer.fileno(), _POLLOUT
        if not _wait_any([(wait_fd, events), (self._shut_r, _POLLIN)], deadline):
            raise _queue.Full
        if self._is_shutdown():
            raise QueueShutDown(f"Queue {self!r} is shut down")

    def get(self, block: bool = True, timeout: float | None = None) -> ItemT:
        """Remove and return an item; block (up to ``timeout``) while the queue is empty.

        :raises queue.Empty: if nothing arrives in time (or at once, with ``block=False``).
        :raises ValueError: if the queue was closed in this process.
        :raises ~aioshm.QueueShutDown: if the queue was shut down and is empty.
        """
        return self._reader.decode(*self._take(block, timeout, self._try_get))

    def _take(self, block: bool, timeout: float | None, take: Callable[[], T | None]) -> T:
        """Wait (as :meth:`get`) until ``take()`` returns something, and return it."""
        self._check_closed()
        deadline = self._deadline(block, timeout)
        waited = not block  # a non-blocking get checks for shutdown before giving up
        # a consumer that found the queue empty last time likely will again: wait first
        # instead of paying for a failed receive (a wait on a non-empty queue returns at once)
        try_first = not (block and self._got_waiting)
        while True:
            if try_first:
                got = take()
                if got is not None:
                    self._got_waiting = waited and block
                    return got
                # the wait watches the shutdown pipe too: look at it only once a wait returned
                if waited and self._is_shutdown():
                    raise QueueShutDown(f"Queue {self!r} is shut down and empty")
            try_first = True
            if not self._wait_for_item(deadline):
                self._got_waiting = False
                self._settle()
                if self._is_shutdown():
                    raise QueueShutDown(f"Queue {self!r} is shut down and empty")
                raise _queue.Empty
            waited = True

    def _wait_for_item(self, deadline: float | None) -> bool:
        """Block until the data fd or the shutdown pipe is readable (False on timeout)."""
        poller = self._get_poller
        if poller is None:
            poller = self._get_poller = select.poll()
            poller.register(self._reader.fileno(), _POLLIN)
            poller.register(self._shut_r, _POLLIN)
        return _poll_until(poller, deadline)

    def put_nowait(self, obj: ItemT) -> None:
        """``put(obj, False)``."""
        self.put(obj, False)

    def get_nowait(self) -> ItemT:
        """``get(False)``."""
        return self.get(False)

    def qsize(self) -> int:
        """Approximate number of items in the queue."""
        self._check_closed()
        size = self._counts.qsize()
        if size and self._settle():
            size = self._counts.qsize()
        return size

    def empty(self) -> bool:
        """True if no item is waiting right now.

        Closed in this process, as the stdlib's: True if this process never put an item on the
        queue (its ``close()`` does nothing until then), else ``OSError`` (the stdlib's feeder
        thread closed the reader).
        """
        if self._closed:
            if self._put_here:
                raise OSError(f"handle is closed: Queue {self!r} is closed")
            return True
        return not self._reader.poll(0)

    def full(self) -> bool:
        """True if the queue holds ``maxsize`` items."""
        self._check_closed()
        if self._slots_r < 0:
            return False
        return _pipe_size(self._slots_r) == 0

    def shutdown(self) -> None:
        """Shut the queue down for every process: later puts raise
        :class:`~aioshm.QueueShutDown`; gets drain what is left, then raise it. Every task or
        thread waiting on the queue, in any process, wakes up."""
        self._counts.shutdown()
        try:
            os.write(self._shut_w, b"\0")
        except BlockingIOError:
            pass

    def close(self) -> None:
        """No more items from this process; release this process's end of the queue."""
        if self._closed:
            return
        self._closed = True
        state, self._async_state = self._async_state, None
        if state is not None:  # wakes a get_async parked on the reader, which then raises
            state.close()
        self._reader.close()

    def join_thread(self) -> None:
        """Stdlib compatibility: there is no feeder thread, everything put is already sent."""
        assert self._closed, f"Queue {self!r} not closed"

    def cancel_join_thread(self) -> None:
        """Stdlib compatibility: nothing to cancel (no feeder thread)."""

    # -- the async face (implemented in aioshm._transport) ----------------------------------
    async def put_async(self, obj: ItemT, block: bool = True, timeout: float | None = None) -> None:
        """Awaitable :meth:`put`: a full queue suspends the task, never the event loop."""
        await (_impl or _load_impl()).put_async(self, obj, block, timeout)

    async def get_async(self, block: bool = True, timeout: float | None = None) -> ItemT:
        """Awaitable :meth:`get`. Cancelling it never loses an item."""
        return await (_impl or _load_impl()).get_async(self, block, timeout)

    def __aiter__(self) -> AsyncIterator[ItemT]:
        """``async for item in q``: get items until the queue is shut down and drained."""
        return (_impl or _load_impl()).iterate(self)

    # -- batches, beside the stdlib API ------------------------------------------------------
    # Each item is still its own record (any consumer's get() takes one item, whoever put
    # it, and no process holds items between calls); a batch moves up to _mmsg.BATCH records
    # per syscall (sendmmsg/recvmmsg on Linux) inside one window of the shared counts, and
    # takes or gives back its capacity tokens with one read or write.

    def put_many(
        self, objs: Iterable[Any], block: bool = True, timeout: float | None = None
    ) -> None:
        """Put every item of ``objs`` in order, as :meth:`put` each, with one deadline for all.

        Items go up to 64 per syscall (each still its own record: any process's ``get()``
        takes them one by one); this is the fast way to feed a queue many small items.

        ``block`` and ``timeout`` apply to the whole batch. If one item cannot go in (a full
        queue past the deadline, a pickling error, a shutdown), the items before it are on
        the queue (``queue.Full`` and ``QueueShutDown`` say how many) and the rest are not.

        :raises queue.Full: if the queue stays full past the deadline.
        :raises ValueError: if the queue was closed in this process.
        :raises ~aioshm.QueueShutDown: if the queue was shut down.
        """
        self._check_put()
        deadline = self._deadline(block, timeout)
        encode, close_owned = self._writer.encode, _reduction.close_owned
        try_batch, wait_room = self._try_put_batch, self._wait_room
        batch: list[Any] = []  # encoded fd-less records, not sent yet
        n = 0  # items on the queue

        def flush() -> None:
            nonlocal n
            start = 0
            try:
                while start < len(batch):
                    sent, outcome = try_batch(batch, start)
                    if sent:
                        start += sent
                    else:
                        wait_room(outcome, deadline)
            finally:
                n += start
                batch.clear()

        try:
            for obj in objs:
                try:
                    record, fds, owned = encode(obj)
                except BaseException:
                    flush()  # the items before it go in
                    raise
                if not fds:
                    batch.append(record)
                    if len(batch) >= _mmsg.BATCH:
                        flush()
                    continue
                try:
                    flush()
                    self._put_record(record, fds, deadline)
                finally:
                    close_owned(fds, owned)
                n += 1
            flush()
        except (_queue.Full, QueueShutDown) as exc:
            exc.args = (*exc.args, f"{n} items of the batch were put before this one")
            raise

    def get_many(
        self, max_items: int, block: bool = True, timeout: float | None = None
    ) -> list[Any]:
        """Up to ``max_items`` items, oldest first: the ones already waiting, or else wait (as
        :meth:`get`) for the first and then take the ones waiting, without waiting again.

        One call can take several end-of-work markers (say ``None``) that were meant for
        several consumers: a consumer that stops at one should put the others back.

        :raises queue.Empty: if nothing arrives in time (or at once, with ``block=False``).
        :raises ValueError: if ``max_items < 1``, or the queue was closed in this process.
        :raises ~aioshm.QueueShutDown: if the queue was shut down and is empty.
        """
        self._check_batch(max_items)
        return self._take(block, timeout, partial(self._take_some, max_items))

    def _take_some(self, max_items: int) -> list[Any] | None:
        """Up to ``max_items`` items already waiting; None if there are none (and no error
        to raise)."""
        return self._or_raise(self._take_waiting([], max_items)) or None

    def _check_batch(self, max_items: int) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, not {max_items!r}")
        error = self.__dict__.pop("_batch_error", None)
        if error is not None:
            raise error

    def _or_raise(self, items: list[Any]) -> list[Any]:
        """``items``, or (if there are none) the error met while taking them."""
        if not items:
            error = self.__dict__.pop("_batch_error", None)
            if error is not None:
                raise error
        return items

    def _take_waiting(self, items: list[Any], max_items: int) -> list[Any]:
        """Append the items already waiting to ``items``, up to ``max_items`` in all.

        A record that cannot be used (malformed, or an item that fails to unpickle) is
        dropped (as :meth:`get` would lose it) and its error raised by the next call, so
        that the items taken with it are returned, not lost."""
        want = max_items - len(items)
        if want <= 0 or self._reader.closed:
            return items
        counts = self._counts
        slot = counts.begin()
        try:
            records, error = self._reader.try_recv_records(want)
            taken = len(records) + (error is not None)
            if taken:
                counts.bump_by(slot, 1, taken)
                self._give_slots(taken)
        finally:
            counts.end(slot)
        if counts.repair_due:
            self._settle()
        decode = self._reader.decode
        for i, (data, fds) in enumerate(records):
            try:
                items.append(decode(data, fds))
            except Exception as exc:
                error = error or exc
            except BaseException:
                for _, later in records[i + 1 :]:
                    _close_fds([], later)
                raise
        if error is not None and "_batch_error" not in self.__dict__:
            self._batch_error = error
        return items

    async def put_many_async(
        self, objs: Iterable[Any], block: bool = True, timeout: float | None = None
    ) -> None:
        """Awaitable :meth:`put_many`: a full queue suspends the task, never the event loop."""
        deadline = self._deadline(block, timeout)
        n = 0
        try:
            for obj in objs:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                await self.put_async(obj, block, left)
                n += 1
        except (_queue.Full, QueueShutDown) as exc:
            exc.args = (*exc.args, f"{n} items of the batch were put before this one")
            raise

    async def get_many_async(
        self, max_items: int, block: bool = True, timeout: float | None = None
    ) -> list[Any]:
        """Awaitable :meth:`get_many`. Cancelling it never loses an item."""
        return await (_impl or _load_impl()).get_many_async(self, max_items, block, timeout)


class JoinableQueue(Queue[ItemT]):
    """A :class:`Queue` with ``task_done()`` and ``join()`` (and ``join_async()``).

    Unfinished tasks are counted in a pipe (one byte each), and a second pipe gets a byte
    whenever the count drops to zero, so ``join`` and ``join_async`` wait on an fd: no
    cross-process condition variable, nothing a killed process can leave locked.
    """

    def __init__(self, maxsize: int = 0, *, ctx: Any = None, backend: Any = None) -> None:
        self._tasks_r, self._tasks_w = _token_pipe(0)
        self._done_r, self._done_w = _token_pipe(0)
        super().__init__(maxsize, ctx=ctx)

    def _fds(self) -> list[int]:
        return [*super()._fds(), self._tasks_r, self._tasks_w, self._done_r, self._done_w]

    def _set_fds(self, fds: list[int]) -> None:
        super()._set_fds(fds[:5])
        self._tasks_r, self._tasks_w, self._done_r, self._done_w = fds[5:]

    def _try_put(self, record: Any, fds: list[int]) -> int:
        # count the task before the item can be taken, so task_done() never runs ahead
        _drain(self._done_r)
        _write_blocking(self._tasks_w)
        try:
            outcome = super()._try_put(record, fds)
        except BaseException:
            self._task_finished()
            raise
        if outcome != PUT:
            self._task_finished()
        return outcome

    def _try_put_batch(self, records: list[Any], start: int) -> tuple[int, int]:
        want = min(len(records) - start, _mmsg.BATCH)
        _drain(self._done_r)
        _write_blocking(self._tasks_w, want)
        sent = 0
        try:
            sent, outcome = super()._try_put_batch(records, start)
        finally:
            for _ in range(want - sent):
                self._task_finished()
        return sent, outcome

    def _task_finished(self) -> bool:
        try:
            if not os.read(self._tasks_r, 1):
                return False
        except BlockingIOError:
            return False
        if _pipe_size(self._tasks_r) == 0:
            try:
                os.write(self._done_w, b"\0")
            except BlockingIOError:
                pass
        return True

    def _all_done(self) -> bool:
        """True if no task is unfinished; consumes a stale "all done" byte otherwise."""
        if _pipe_size(self._tasks_r) == 0:
            return True
        _drain(self._done_r)
        return _pipe_size(self._tasks_r) == 0

    def task_done(self) -> None:
        """Mark one item taken with ``get()`` as processed."""
        if not self._task_finished():
            raise ValueError("task_done() called too many times")

    def join(self) -> None:
        """Block until every item put has been marked done."""
        while not self._all_done():
            _wait_any([(self._done_r, _POLLIN)], None)

    async def join_async(self) -> None:
        """Awaitable :meth:`join`."""
        await (_impl or _load_impl()).join_async(self)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _write_blocking(fd: int, n: int = 1) -> None:
    while n > 0:
        try:
            n -= os.write(fd, b"\0" * n)
        except BlockingIOError:
            _wait_any([(fd, _POLLOUT)], None)


class SimpleQueue(Generic[ItemT]):
    """An unbounded queue with only ``put``, ``get``, ``empty`` and ``close`` (stdlib API).

    ``SimpleQueue[T]`` is generic in what it carries, like :class:`Queue`."""

    def __init__(self, *, ctx: Any = None) -> None:
        ctx = ctx if ctx is not None else multiprocessing.get_context()
        self._reader, self._writer = record_pair()
        self._rlock = ctx.Lock()  # used by multiprocessing.pool's shutdown helpers only
        self._wlock = None
        self._poll: Callable[..., bool] = self._reader.poll
        self._async_state: Any = None
        self._finalizer = weakref.finalize(self, _close_fds, [self._reader, self._writer], [])

    def __getstate__(self) -> tuple[Any, ...]:
        _mp_context.assert_spawning(self)
        return (self._reader, self._writer, self._rlock)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self._reader, self._writer, self._rlock = state
        self._wlock = None
        self._poll = self._reader.poll
        self._async_state = None
        self._finalizer = weakref.finalize(self, _close_fds, [self._reader, self._writer], [])

    def empty(self) -> bool:
        """True if no item is waiting right now."""
        return not self._reader.poll(0)

    def close(self) -> None:
        """Close both ends in this process."""
        self._reader.close()
        self._writer.close()

    def get(self) -> ItemT:
        """Remove and return an item, blocking while the queue is empty."""
        try:
            return self._reader.recv()
        except EOFError:  # this process holds a writer: not the end of the stream
            raise ProtocolError("received an empty record") from None

    def put(self, obj: ItemT) -> None:
        """Put ``obj`` on the queue."""
        self._writer.send(obj)

    async def get_async(self) -> ItemT:
        """Awaitable :meth:`get`."""
        return await (_impl or _load_impl()).simple_get_async(self)

    async def put_async(self, obj: ItemT) -> None:
        """Awaitable :meth:`put`."""
        await (_impl or _load_impl()).simple_put_async(self, obj)


# the async faces live in aioshm._transport (the layer that imports anyio), imported on first
# use: a child that never awaits never imports anyio
_impl: Any = None


def _load_impl() -> Any:
    global _impl
    from ._transport import _queue

    _impl = _queue
    return _impl
