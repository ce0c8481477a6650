"""Shared-memory segments: creation, attachment, validation, lifetime and recycling.

Pure and synchronous: no processes, no event loop. Everything above builds on :class:`Segment`.

Note [Segment lifetime]
-----------------------
Two strategies (torch's names):

* ``file_descriptor`` (Linux default): an anonymous ``memfd``, close-on-exec, sized with
  ``ftruncate``, every page reserved with ``posix_fallocate`` (a full tmpfs is an exception
  now, never a SIGBUS later) and sealed against shrinking and growing, so no peer can make a
  receiver's mapping fault. It has no name: the kernel frees it when the last fd and the last
  mapping are gone, whatever was killed.
* ``file_system``: a named file in ``/dev/shm`` (``$AIOSHM_SHM_DIR`` overrides), created
  ``O_CREAT|O_EXCL|O_NOFOLLOW`` mode 0600, named ``aioshm_<creator pid>_<64 random bits>``.
  Attaching checks type, owner, mode and size before mapping.

Cross-process reference counting uses the kernel instead of a tracker process. Every process
that holds views of a segment holds a *read lock* (an open-file-description lock,
``F_OFD_SETLK``) on byte 0 of the segment through its own fd. The kernel drops it when the fd
is closed or the process dies, so a SIGKILL can never leave a count behind. A message in flight
holds a *ticket*:

* with fds, the ticket is a fresh open file description of the segment carrying its own read
  lock; that fd rides in the message (SCM_RIGHTS), so the lock lives inside the socket until the
  receiver adopts it. If every holder of the socket dies, the kernel frees the fd and its lock;
* with names, the ticket is a hard link ``<name>.t<random>``: the segment's link count says how
  many messages are in flight, and the receiver removes the link once it holds its own lock.

"Nobody uses this segment" is then one non-blocking write-lock attempt (plus, for names,
``st_nlink == 1``). For named segments the process that finds itself last unlinks the name; a
name whose creator died with nobody holding it is an orphan that :func:`cleanup_orphans`
removes.

Recycling: copies of non-shared arrays made by the transport go into *pooled* segments. When
the last local view of a pooled segment dies, the process keeps it mapped (lock released) in a
bounded LRU; a later send reuses it once the write-lock attempt proves no process holds or is
about to receive it. Receivers keep such mappings warm too, so a buffer that goes back and forth
costs neither a new segment nor a new mapping (Ray's object store does the same).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import re
import secrets
import stat
import struct
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from multiprocessing import util as _mp_util
from typing import Final, Literal

from .._exceptions import FdLimitError, InvalidHandle, SharedMemoryError, SharedMemoryFull

__all__ = (
    "PAGE",
    "Segment",
    "SegmentBuffer",
    "attach_fd",
    "attach_name",
    "cleanup_orphans",
    "create",
    "get_all_sharing_strategies",
    "get_sharing_strategy",
    "live_segments",
    "set_sharing_strategy",
    "shm_dir",
    "trim",
)

Strategy = Literal["file_descriptor", "file_system"]

PAGE: Final = mmap.PAGESIZE
PREFIX: Final = "aioshm_"
_NAME_RE: Final = re.compile(
    r"aioshm_(\d{1,10})_[0-9a-f]{16}(\.t(\d{1,10})_[0-9a-f]{16})?", re.ASCII
)
_HAS_MEMFD: Final = hasattr(os, "memfd_create") and sys.platform.startswith("linux")
HAS_OFD: Final = hasattr(fcntl, "F_OFD_SETLK")
_F_SEAL_FUTURE_WRITE: Final = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
_FLOCK: Final = struct.Struct("=hh4xqqi4x")  # struct flock on Linux (l_pid must be 0 for OFD locks)

_lock = threading.RLock()
_strategy: Strategy = "file_descriptor" if _HAS_MEMFD else "file_system"

# identity cache: (st_dev, st_ino) -> Segment mapped in this process (live or warm)
_segments: dict[tuple[int, int], Segment] = {}
# warm pooled segments with no local view, least recently used first
_idle: collections.OrderedDict[tuple[int, int], Segment] = collections.OrderedDict()
_idle_bytes = 0
POOL_LIMIT_DEFAULT: Final = 1 << 30
_pool_limit = POOL_LIMIT_DEFAULT
# keep received segments mapped after their last local view dies (pool workers; see
# retain_received) and the hook told when a segment this process shared is closed
_retain = False
_close_hook: Callable[[], object] | None = None


# --------------------------------------------------------------------------- strategies


def get_all_sharing_strategies() -> set[str]:
    """The sharing strategies this platform supports (torch's API)."""
    return {"file_descriptor", "file_system"} if _HAS_MEMFD else {"file_system"}


def get_sharing_strategy() -> str:
    """The strategy new segments are created with in this process."""
    return _strategy


def set_sharing_strategy(new_strategy: str) -> None:
    """Choose how new segments are shared: ``"file_descriptor"`` or ``"file_system"``.

    :raises ValueError: for a name that is not one of :func:`get_all_sharing_strategies`.
    """
    global _strategy
    if new_strategy not in get_all_sharing_strategies():
        raise ValueError(
            f"unknown sharing strategy {new_strategy!r}; "
            f"choose one of {sorted(get_all_sharing_strategies())}"
        )
    _strategy = new_strategy  # type: ignore[assignment]


def shm_dir() -> str:
    """The directory named segments live in: ``$AIOSHM_SHM_DIR`` or ``/dev/shm``."""
    return os.environ.get("AIOSHM_SHM_DIR", "/dev/shm")


def set_pool_limit(nbytes: int) -> None:
    """Bound the bytes of idle recycled segments this process keeps mapped (default 1 GiB)."""
    global _pool_limit
    if nbytes < 0:
        raise ValueError("pool limit must be >= 0")
    _pool_limit = nbytes
    _evict(0)


# --------------------------------------------------------------------------- locks


def ofd_lock_byte(fd: int, kind: int, offset: int, *, wait: bool = False) -> bool:
    """Set (or, with ``F_UNLCK``, drop) an open-file-description lock on one byte of ``fd``;
    False if it conflicts (non-blocking). Linux only (``HAS_OFD``)."""
    cmd = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    try:
        fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _ofd_lock(fd: int, kind: int, *, wait: bool = False) -> bool:
    """Set an open-file-description lock on byte 0; False if it conflicts (non-blocking)."""
    if HAS_OFD:
        return ofd_lock_byte(fd, kind, 0, wait=wait)
    # macOS and other platforms without OFD locks: flock() is per open file description too
    op = {fcntl.F_RDLCK: fcntl.LOCK_SH, fcntl.F_WRLCK: fcntl.LOCK_EX, fcntl.F_UNLCK: fcntl.LOCK_UN}
    try:
        fcntl.flock(fd, op[kind] | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


# --------------------------------------------------------------------------- segments


def _page_round(n: int) -> int:
    return max(PAGE, (n + PAGE - 1) // PAGE * PAGE)


def _check_new_fd(what: str, exc: OSError) -> SharedMemoryError:
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return FdLimitError(
            f"cannot {what}: the file-descriptor table is full ({exc.strerror}); raise "
            "`ulimit -n`, hold fewer shared arrays at once, or use the 'file_system' strategy"
        )
    if exc.errno == errno.ENOSPC:
        return SharedMemoryFull(f"cannot {what}: no space left for shared memory", 0)
    return SharedMemoryError(f"cannot {what}: {exc}")


def _reserve(fd: int, size: int) -> None:
    """Size the segment and reserve every page now: ENOSPC here, never SIGBUS later."""
    try:
        os.ftruncate(fd, size)
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise SharedMemoryFull(
                f"no room for a {size}-byte shared-memory segment ({exc.strerror}); "
                f"free space in {shm_dir()} or the memfd tmpfs, or send smaller arrays",
                size,
            ) from exc
        raise


def _random_name(pid: int | None = None) -> str:
    return f"{PREFIX}{pid if pid is not None else os.getpid()}_{secrets.token_hex(8)}"


def _open_new_name(size: int) -> tuple[int, str]:
    directory = shm_dir()
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        name = _random_name()
        try:
            fd = os.open(os.path.join(directory, name), flags, 0o600)
        except FileExistsError:
            continue  # squatted or a collision: never attach to what we did not create
        except OSError as exc:
            raise _check_new_fd("create a named shared-memory segment", exc) from exc
        try:
            os.fchmod(fd, 0o600)  # whatever the umask did
            _reserve(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(os.path.join(directory, name))
            raise
        return fd, name
    raise SharedMemoryError(f"could not find a free segment name in {directory}")


def _open_new_memfd(size: int) -> int:
    try:
        fd = os.memfd_create("aioshm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        raise _check_new_fd("create a memfd segment", exc) from exc
    try:
        _reserve(fd, size)
        fcntl.fcntl(
            fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


# mmap through libc rather than the mmap module: Python's mmap keeps a dup() of the fd, which
# would double the descriptors every mapped segment costs.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED: Final = ctypes.c_void_p(-1).value


def _map(fd: int, size: int) -> int:
    addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise SharedMemoryError(f"cannot map a {size}-byte segment: {os.strerror(err)}")
    return int(addr)


def _unmap(address: int, size: int) -> None:
    if _libc.munmap(address, size) != 0:
        err = ctypes.get_errno()
        raise SharedMemoryError(f"munmap failed: {os.strerror(err)}")


class Segment:
    """A shared-memory segment mapped read-write in this process.

    Created by :func:`create`, :func:`attach_fd` or :func:`attach_name`; one instance per
    segment per process (identity cache keyed by device and inode). Arrays never reference a
    segment directly: they reference its :class:`SegmentBuffer`, whose death releases the
    segment (or parks it, if it is pooled).
    """

    __slots__ = (
        "__weakref__",
        "_buffer",
        "address",
        "closed",
        "fd",
        "key",
        "locked",
        "name",
        "pooled",
        "received",
        "size",
    )

    def __init__(self, fd: int, size: int, name: str | None, pooled: bool) -> None:
        self.fd = fd
        self.size = size
        self.name = name
        self.pooled = pooled
        self.closed = False
        self.locked = False
        self.received = False
        st = os.fstat(fd)
        self.key = (st.st_dev, st.st_ino)
        self.address = _map(fd, size)
        self._buffer: weakref.ref[SegmentBuffer] | None = None

    @property
    def kind(self) -> Strategy:
        return "file_system" if self.name is not None else "file_descriptor"

    def __repr__(self) -> str:
        where = self.name or f"fd={self.fd}"
        return f"<Segment {where} size={self.size}{' pooled' if self.pooled else ''}>"

    # -- views ----------------------------------------------------------------------------
    def buffer(self) -> SegmentBuffer:
        """The live buffer object arrays on this segment use as their base (made on demand)."""
        with _lock:
            buf = self._buffer() if self._buffer is not None else None
            if buf is not None:
                return buf
            if self.closed:
                raise SharedMemoryError(f"{self!r} is closed")
            global _idle_bytes
            if _idle.pop(self.key, None) is not None:
                _idle_bytes -= self.size
            if not self.locked:
                _ofd_lock(self.fd, fcntl.F_RDLCK, wait=True)
                self.locked = True
            buf = SegmentBuffer(self)
            self._buffer = weakref.ref(buf)
            weakref.finalize(buf, _views_dropped, self)
            return buf

    def has_views(self) -> bool:
        return self._buffer is not None and self._buffer() is not None

    # -- tickets ----------------------------------------------------------------------------
    def ticket_fd(self) -> int:
        """A new fd (own open file description, read-locked) to send with a message."""
        try:
            fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _check_new_fd("open a ticket for a shared segment", exc) from exc
        _ofd_lock(fd, fcntl.F_RDLCK, wait=True)
        return fd

    def ticket_name(self) -> str:
        """A new hard link to this named segment, counted as one message in flight."""
        assert self.name is not None
        directory = shm_dir()
        for _ in range(100):
            ticket = f"{self.name}.t{os.getpid()}_{secrets.token_hex(8)}"
            try:
                os.link(os.path.join(directory, self.name), os.path.join(directory, ticket))
            except FileExistsError:
                continue
            except FileNotFoundError as exc:
                raise SharedMemoryError(f"{self!r} was unlinked while still in use") from exc
            return ticket
        raise SharedMemoryError("could not create a ticket name")

    # -- reuse ------------------------------------------------------------------------------
    def try_claim(self) -> bool:
        """Take this idle pooled segment for reuse if no other process holds or awaits it."""
        if self.has_views() or self.closed:
            return False
        if not _ofd_lock(self.fd, fcntl.F_WRLCK):
            return False
        if self.name is not None and os.fstat(self.fd).st_nlink != 1:
            # > 1: a ticket is still in flight; 0: the last other holder unlinked the name
            # (nobody held it while it sat idle here), so it can never be sent again
            _ofd_lock(self.fd, fcntl.F_UNLCK)
            return False
        _ofd_lock(self.fd, fcntl.F_RDLCK)  # atomic conversion: no gap for a competitor
        self.locked = True
        return True

    # -- closing ----------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap and close; for named segments, unlink the name if this was the last holder."""
        with _lock:
            if self.closed:
                return
            self.closed = True
            if _segments.get(self.key) is self:
                del _segments[self.key]
            global _idle_bytes
            if _idle.pop(self.key, None) is not None:
                _idle_bytes -= self.size
        name, fd = self.name, self.fd
        try:
            _unmap(self.address, self.size)
            if name is not None and not _unlink_if_last(fd, name):
                # Another holder may be closing at this very moment and fail the same test
                # against our lock: retry once from a fresh fd after ours is gone, so that
                # at least one of the two unlinks.
                os.close(fd)
                fd = -1
                try:
                    fd = os.open(
                        os.path.join(shm_dir(), name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
                    )
                except OSError:
                    pass
                else:
                    _unlink_if_last(fd, name)
        finally:
            if fd >= 0:
                os.close(fd)
            self.fd = -1
        hook = _close_hook
        if hook is not None and not self.pooled:
            with contextlib.suppress(Exception):
                hook()


def _unlink_if_last(fd: int, name: str) -> bool:
    """Unlink ``name`` if no other process holds it and no ticket is in flight."""
    if not _ofd_lock(fd, fcntl.F_WRLCK):
        return False
    if os.fstat(fd).st_nlink <= 1:
        try:
            os.unlink(os.path.join(shm_dir(), name))
        except FileNotFoundError:
            pass
    return True


class SegmentBuffer:
    """The base object of every ndarray on a segment (numpy's ``array.base``).

    It exposes the whole mapping through ``__array_interface__``; keeping any view alive keeps
    it alive, and its death releases the segment.
    """

    __slots__ = ("__array_interface__", "__weakref__", "segment")

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.__array_interface__ = {
            "shape": (segment.size,),
            "typestr": "|u1",
            "data": (segment.address, False),
            "version": 3,
        }

    def __repr__(self) -> str:
        return f"<SegmentBuffer of {self.segment!r}>"


def _views_dropped(seg: Segment) -> None:
    """Called when the last local view of ``seg`` dies."""
    global _idle_bytes
    with _lock:
        if seg.closed or seg.has_views():
            return
        if not (seg.pooled or (_retain and seg.received)) or seg.size > _pool_limit:
            pass
        else:
            # keep it mapped for reuse; release our read lock so others may claim it
            _ofd_lock(seg.fd, fcntl.F_UNLCK)
            seg.locked = False
            _idle[seg.key] = seg
            _idle_bytes += seg.size
            _evict(0)
            return
    seg.close()


def _evict(extra: int) -> None:
    """Close idle pooled segments until ``extra`` more bytes fit under the pool limit."""
    while True:
        with _lock:
            if not _idle or _idle_bytes + extra <= _pool_limit:
                return
            _, seg = next(iter(_idle.items()))
        seg.close()


def retain_received(on: bool) -> None:
    """Keep received segments mapped (unlocked, like idle pooled ones) after their last local
    view dies, so that receiving the same segment again costs no new mapping and no page
    faults; :func:`sweep_retained` closes those no other process holds any more. For pool
    workers, which see the same arrays task after task. Bounded by the pool limit."""
    global _retain
    _retain = on
    if not on:
        sweep_retained(everything=True)


def sweep_retained(*, everything: bool = False) -> int:
    """Close the retained received segments that no other process holds (or all of them);
    return how many stay retained."""
    with _lock:
        retained = [s for s in _idle.values() if not s.pooled]
    kept = 0
    for seg in retained:
        if not everything:
            with _lock:
                if seg.closed or _idle.get(seg.key) is not seg:
                    continue  # in use again, or gone
                # a write lock is granted only if no other holder (or ticket in flight)
                # keeps a read lock on the segment
                alone = _ofd_lock(seg.fd, fcntl.F_WRLCK)
                if alone:
                    _ofd_lock(seg.fd, fcntl.F_UNLCK)
                elif seg.name is not None and os.fstat(seg.fd).st_nlink == 0:
                    alone = True
            if not alone:
                kept += 1
                continue
        seg.close()
    return kept


def set_close_hook(hook: Callable[[], object] | None) -> None:
    """Call ``hook()`` (from any thread, errors ignored) when a non-pooled segment is closed
    here: the pool uses it to tell workers that retained segments may have lost their last
    other holder."""
    global _close_hook
    _close_hook = hook


def trim() -> None:
    """Close every idle recycled segment this process keeps mapped."""
    with _lock:
        idle = list(_idle.values())
    for seg in idle:
        seg.close()


def live_segments() -> list[Segment]:
    """Segments mapped in this process (with live views or idle in the pool)."""
    with _lock:
        return list(_segments.values())


def _register(seg: Segment) -> Segment:
    _segments[seg.key] = seg
    return seg


def _after_fork_in_child() -> None:
    """A forked child shares its parent's open file descriptions, hence its locks: give every
    segment the child holds views of its own description and lock, and forget the idle ones
    (closing our copy of their fds leaves the parent's description, lock and name alone)."""
    global _lock, _idle_bytes
    _lock = threading.RLock()
    for seg in list(_segments.values()):
        if seg.has_views():
            try:
                fd = os.open(f"/proc/self/fd/{seg.fd}", os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            os.dup2(fd, seg.fd, inheritable=False)
            os.close(fd)
            _ofd_lock(seg.fd, fcntl.F_RDLCK, wait=True)
            seg.locked = True
        else:
            _segments.pop(seg.key, None)
            _idle.pop(seg.key, None)
            seg.closed = True
            _unmap(seg.address, seg.size)
            os.close(seg.fd)
            seg.fd = -1
    _idle_bytes = sum(seg.size for seg in _idle.values())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _trim_at_exit() -> None:
    with contextlib.suppress(Exception):  # never let cleanup at exit mask the real exit
        trim()


# multiprocessing runs these finalizers at exit in the main process (atexit) and in every
# child it starts (which leave through os._exit): idle recycled segments are released, so a
# named one whose other holders are gone gets unlinked.
_mp_util.Finalize(None, _trim_at_exit, exitpriority=10)


# --------------------------------------------------------------------------- public constructors


def create(nbytes: int, *, strategy: str | None = None, pooled: bool = False) -> SegmentBuffer:
    """A new segment of at least ``nbytes`` (rounded up to a page), every page reserved.

    :raises SharedMemoryFull: when the shared-memory filesystem has no room.
    :raises FdLimitError: when no fd is left for it.
    """
    if nbytes < 0:
        raise ValueError(f"negative segment size {nbytes}")
    strategy = strategy or _strategy
    if strategy not in get_all_sharing_strategies():
        raise ValueError(f"unknown sharing strategy {strategy!r}")
    size = _page_round(nbytes)
    if pooled:
        reused = _claim_pooled(size, strategy)
        if reused is not None:
            return reused.buffer()
        _evict(size)
    if strategy == "file_descriptor":
        fd, name = _open_new_memfd(size), None
    else:
        fd, name = _open_new_name(size)
    try:
        seg = Segment(fd, size, name, pooled)
    except BaseException:
        os.close(fd)
        if name is not None:
            os.unlink(os.path.join(shm_dir(), name))
        raise
    with _lock:
        return _register(seg).buffer()


def _claim_pooled(size: int, strategy: str) -> Segment | None:
    global _idle_bytes
    orphaned: list[Segment] = []
    try:
        with _lock:
            candidates = [
                s
                for s in _idle.values()
                if s.pooled and s.kind == strategy and size <= s.size <= 2 * size
            ]
            candidates.sort(key=lambda s: s.size)
            for seg in candidates:
                if seg.try_claim():
                    del _idle[seg.key]
                    _idle_bytes -= seg.size
                    return seg
                if seg.name is not None and os.fstat(seg.fd).st_nlink == 0:
                    orphaned.append(seg)
        return None
    finally:
        for seg in orphaned:
            seg.close()


def attach_fd(fd: int, *, pooled: bool = False) -> SegmentBuffer:
    """Adopt a received fd (ownership passes to this call) and return its mapped segment.

    The fd must be a sealed memfd (or, off Linux, a regular shm file). If this process already
    maps the same segment, the existing one is returned and ``fd`` is closed (after its lock,
    the message's ticket, has been replaced by ours).
    """
    owned = True
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidHandle(f"received fd {fd} is not a shared-memory file")
        if _HAS_MEMFD:
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError as exc:
                raise InvalidHandle(f"received fd {fd} is not a memfd segment") from exc
            need = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
            if seals & need != need:
                raise InvalidHandle(f"received memfd {fd} is not sealed against resizing")
            if seals & (fcntl.F_SEAL_WRITE | _F_SEAL_FUTURE_WRITE):
                raise InvalidHandle(f"received memfd {fd} is sealed against writing")
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
            raise InvalidHandle(f"received segment fd {fd} is not open for reading and writing")
        if st.st_size <= 0:
            raise InvalidHandle(f"received segment fd {fd} is empty")
        key = (st.st_dev, st.st_ino)
        with _lock:
            seg = _segments.get(key)
            if seg is not None and not seg.closed:
                return seg.buffer()  # takes our own read lock before the ticket's goes away
            # the ticket's read lock becomes ours: the fd is our holder fd from now on
            seg = Segment(fd, st.st_size, None, pooled)
            owned = False
            seg.locked = True
            seg.received = True
            return _register(seg).buffer()
    finally:
        if owned:
            os.close(fd)


def _check_name(name: str) -> re.Match[str]:
    if not isinstance(name, str) or len(name) > 200:
        raise InvalidHandle(f"invalid segment name {name!r}")
    m = _NAME_RE.fullmatch(name)
    if m is None:
        raise InvalidHandle(f"invalid segment name {name!r}: not an aioshm segment")
    return m


def attach_name(name: str, ticket: str | None = None, *, pooled: bool = False) -> SegmentBuffer:
    """Open the named segment ``name`` (validated), adopting ``ticket`` (a link) if given."""
    _check_name(name)
    if ticket is not None:
        _check_name(ticket)
        if not ticket.startswith(name + ".t"):
            raise InvalidHandle(f"ticket {ticket!r} does not belong to segment {name!r}")
    directory = shm_dir()
    try:
        fd = os.open(
            os.path.join(directory, ticket or name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        )
    except FileNotFoundError as exc:
        raise InvalidHandle(f"shared-memory segment {name!r} no longer exists") from exc
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES, errno.EPERM):
            raise InvalidHandle(f"{name!r} is not an aioshm segment we may map ({exc})") from exc
        raise _check_new_fd(f"open segment {name!r}", exc) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidHandle(f"segment {name!r} is not a regular file")
        if st.st_uid != os.geteuid():
            raise InvalidHandle(f"segment {name!r} belongs to uid {st.st_uid}, not us")
        if st.st_mode & 0o077:
            raise InvalidHandle(f"segment {name!r} is accessible to others (mode {st.st_mode:o})")
        if st.st_size <= 0:
            raise InvalidHandle(f"segment {name!r} is empty")
        key = (st.st_dev, st.st_ino)
        with _lock:
            seg = _segments.get(key)
            if seg is not None and not seg.closed:
                buf = seg.buffer()
            else:
                _ofd_lock(fd, fcntl.F_RDLCK, wait=True)
                seg = Segment(fd, st.st_size, name, pooled)
                seg.locked = True
                seg.received = True
                fd = -1
                buf = _register(seg).buffer()
        if ticket is not None:
            try:
                os.unlink(os.path.join(directory, ticket))
            except FileNotFoundError:
                pass
        return buf
    finally:
        if fd >= 0:
            os.close(fd)


# --------------------------------------------------------------------------- orphans


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _iter_names(directory: str) -> Iterator[tuple[str, re.Match[str]]]:
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return
    for entry in entries:
        m = _NAME_RE.fullmatch(entry)
        if m is not None:
            yield entry, m


def cleanup_orphans(*, dry_run: bool = False) -> list[str]:
    """Remove named segments (and in-flight tickets) left behind by dead processes.

    A name is an orphan when the process that created it (or, for a ticket, the process that
    sent it) is dead and no living process holds the segment. Returns the names removed.
    Segments held by a live process are never touched. A message still queued from a sender
    that died holds only a ticket, so call this when such messages no longer matter (at
    start-up, or after the queues of the dead processes are gone). With ``dry_run``, remove
    nothing and return the names that would go.
    """
    directory = shm_dir()
    removed: list[str] = []
    for entry, m in _iter_names(directory):
        owner = int(m.group(3) or m.group(1))
        if _pid_alive(owner):
            continue
        path = os.path.join(directory, entry)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                continue
            if not _ofd_lock(fd, fcntl.F_WRLCK):
                continue  # somebody alive holds it
            if not dry_run:
                os.unlink(path)
            removed.append(entry)
        finally:
            os.close(fd)
    return removed
