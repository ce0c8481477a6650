"""In-process unit tests of ``aioshm._shm``: segments, attachment, header validation, arrays.

Covers reliability.md §3 (names, permissions, squatting, fd passing, header bounds) and the
unit-level rows of §5 tables B (named segments), C (memfd segments) and D (array headers).
No child processes: everything runs in the test process (one ``fork`` makes a dead pid).

Many cases are checked in a loop inside one test (collecting every failing case before
asserting), because the leak check costs a fraction of a second per test.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import os
import re
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.array_utils import byte_bounds
from numpy.lib.stride_tricks import as_strided

from aioshm._exceptions import FdLimitError, InvalidHandle, SharedMemoryError, SharedMemoryFull
from aioshm._shm import (
    _segment,
    attach_fd,
    attach_name,
    cleanup_orphans,
    create,
    empty,
    empty_like,
    full,
    full_like,
    get_all_sharing_strategies,
    get_sharing_strategy,
    is_shared,
    live_segments,
    ones,
    ones_like,
    segment_buffer_of,
    set_pool_limit,
    set_sharing_strategy,
    share,
    shm_dir,
    trim,
    view_on,
    zeros,
    zeros_like,
)
from aioshm._shm._array import MAX_NDIM, MAX_VIEW_BYTES
from aioshm._shm._segment import PAGE, SegmentBuffer

STRATEGIES = sorted(get_all_sharing_strategies())
needs_memfd = pytest.mark.skipif(
    "file_descriptor" not in STRATEGIES, reason="memfd segments are Linux-only"
)
NAME_RE = re.compile(rf"aioshm_{os.getpid()}_[0-9a-f]{{16}}\Z")

#: dtypes that may live in shared memory (no Python objects)
DTYPES: list[Any] = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
    ">i8",
    "M8[ns]",
    "m8[s]",
    "U5",
    "S4",
    "i4,f8",
    [("x", "<f4"), ("y", ">i2", (2,))],
]


# --------------------------------------------------------------------------- helpers


def _nfds() -> int:
    """Open fds of this process (the listing's own fd is counted every time, so it cancels)."""
    return len(os.listdir("/proc/self/fd"))


def _fd_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


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


def _make_named(
    directory: str,
    *,
    pid: int | None = None,
    mode: int = 0o600,
    size: int = PAGE,
    sparse: bool = False,
) -> str:
    """A segment-like file created by hand (not by aioshm) under a valid aioshm name."""
    name = _segment._random_name(pid)
    fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        if size and not sparse:
            os.posix_fallocate(fd, 0, size)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return name


def _dead_pid() -> int:
    """The pid of a child that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _page_buf() -> SegmentBuffer:
    """A one-page segment whose byte i holds i % 251 (made in the test: no fixture keeps it)."""
    buf = create(PAGE)
    np.asarray(buf)[:] = np.arange(PAGE) % 251
    return buf


def _reference(
    buf: SegmentBuffer, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], dtype: Any
) -> np.ndarray:
    """The same view built by numpy's unchecked ``as_strided`` over a copy of the bytes."""
    raw = bytes(np.asarray(buf))
    first = np.frombuffer(raw, dtype=dtype, count=1, offset=offset)
    return as_strided(first, shape, strides, writeable=False)


def _in_segment(out: np.ndarray, buf: SegmentBuffer) -> bool:
    if out.size == 0:
        return True
    lo, hi = byte_bounds(out)
    address = buf.segment.address
    return bool(address <= lo and hi <= address + buf.segment.size)


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
def _trim_pool() -> Iterator[None]:
    """Release idle recycled segments before the leak check runs (they are a cache, not leaks)."""
    yield
    gc.collect()
    trim()


@pytest.fixture
def private_shm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty ``$AIOSHM_SHM_DIR`` of our own, so sweeps never touch other test runs."""
    directory = tmp_path / "shm"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("AIOSHM_SHM_DIR", str(directory))
    return str(directory)


# --------------------------------------------------------------------------- segments


@pytest.mark.parametrize("kind", STRATEGIES)
def test_create_rounds_up_to_whole_pages(kind: str) -> None:
    """``create(n)`` maps ``n`` rounded up to a page (at least one), zero-filled, all usable."""
    cases = _Cases()
    for nbytes, pages in [
        (0, 1),
        (1, 1),
        (PAGE - 1, 1),
        (PAGE, 1),
        (PAGE + 1, 2),
        (3 * PAGE + 5, 4),
    ]:
        with cases.case(nbytes):
            buf = create(nbytes, strategy=kind)
            seg = buf.segment
            assert seg.kind == kind
            assert seg.size == pages * PAGE
            assert os.fstat(seg.fd).st_size == pages * PAGE
            root = np.asarray(buf)
            assert root.shape == (pages * PAGE,) and root.dtype == np.uint8
            assert not root.any(), "a fresh segment must be zero-filled"
            root[-1] = 7
            assert root[-1] == 7
            del buf, seg, root
    cases.check()


def test_create_rejects_bad_arguments() -> None:
    """A negative size and an unknown strategy are ValueErrors, and nothing is created."""
    before = _nfds()
    with pytest.raises(ValueError, match="negative"):
        create(-1)
    with pytest.raises(ValueError, match="strategy"):
        create(10, strategy="file_magic")
    assert _nfds() == before


@needs_memfd
def test_memfd_segment_is_sealed_and_close_on_exec() -> None:
    """A memfd segment is sealed against shrink and grow, so a peer can never make it SIGBUS."""
    buf = create(3 * PAGE, strategy="file_descriptor")
    fd = buf.segment.fd
    assert buf.segment.name is None
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:aioshm")
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
    assert seals & fcntl.F_SEAL_SEAL, "seals must be final (nobody may remove them)"
    for new_size in (PAGE, 0, 8 * PAGE):
        with pytest.raises(PermissionError) as info:
            os.ftruncate(fd, new_size)
        assert info.value.errno == errno.EPERM
    assert os.fstat(fd).st_size == 3 * PAGE
    assert not os.get_inheritable(fd)
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_named_segment_mode_name_and_cloexec() -> None:
    """Named segments: mode exactly 0600 even with umask 0, our uid, ≥ 64 random bits, CLOEXEC."""
    old = os.umask(0)
    try:
        bufs = [create(100, strategy="file_system") for _ in range(3)]
    finally:
        os.umask(old)
    names = [b.segment.name for b in bufs]
    assert len(set(names)) == 3
    for buf, name in zip(bufs, names, strict=True):
        assert name is not None and NAME_RE.match(name), name
        st_ = os.stat(os.path.join(shm_dir(), name))
        assert stat.S_ISREG(st_.st_mode)
        assert stat.S_IMODE(st_.st_mode) == 0o600
        assert st_.st_uid == os.geteuid()
        assert not os.get_inheritable(buf.segment.fd)
        assert fcntl.fcntl(buf.segment.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert len(name.rsplit("_", 1)[1]) * 4 >= 64, "fewer than 64 random bits"


@pytest.mark.parametrize("squatter", ["file", "symlink"])
def test_squatted_name_is_skipped_never_attached(
    squatter: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B7: a pre-created file (or symlink) at the chosen name makes creation retry elsewhere."""
    directory = shm_dir()
    squat = _segment._random_name()
    path = os.path.join(directory, squat)
    content = b"the squatter's bytes"
    victim = tmp_path / "victim"
    victim.write_bytes(content)
    if squatter == "file":
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, 0o600)
    else:
        os.symlink(victim, path)
    real = _segment._random_name
    served = iter([squat, squat])
    calls: list[str] = []

    def fake(pid: int | None = None) -> str:
        name = next(served, None) or real(pid)
        calls.append(name)
        return name

    monkeypatch.setattr(_segment, "_random_name", fake)
    try:
        buf = create(100, strategy="file_system")
        assert calls[:2] == [squat, squat] and len(calls) == 3
        assert buf.segment.name == calls[2] != squat
        assert os.path.samestat(
            os.fstat(buf.segment.fd), os.stat(os.path.join(directory, calls[2]))
        )
        assert not np.asarray(buf).any()
        np.asarray(buf)[:5] = 1
        with open(path, "rb") as f:
            assert f.read() == content
        assert victim.read_bytes() == content
        if squatter == "symlink":
            assert os.path.islink(path)
        del buf
    finally:
        os.unlink(path)


def test_name_generation_gives_up_when_every_name_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If every candidate name is squatted, creation fails cleanly (no fd, no file)."""
    squat = _make_named(shm_dir())
    monkeypatch.setattr(_segment, "_random_name", lambda pid=None: squat)
    before_fds, before_dir = _nfds(), set(os.listdir(shm_dir()))
    try:
        with pytest.raises(SharedMemoryError) as info:
            create(100, strategy="file_system")
        assert not isinstance(info.value, SharedMemoryFull)
        assert _nfds() == before_fds
        assert not {n for n in os.listdir(shm_dir()) if squat in n} - before_dir
    finally:
        os.unlink(os.path.join(shm_dir(), squat))


def test_sharing_strategy_api() -> None:
    """``set/get/get_all_sharing_strategies``: round trip, default for create, ValueError on junk."""
    assert get_all_sharing_strategies() == {"file_descriptor", "file_system"}
    old = get_sharing_strategy()
    assert old in get_all_sharing_strategies()
    try:
        for name in STRATEGIES:
            set_sharing_strategy(name)
            assert get_sharing_strategy() == name
            assert create(1).segment.kind == name
        for junk in ("file_magic", "", "FILE_SYSTEM", "file_system "):
            with pytest.raises(ValueError, match="sharing strategy"):
                set_sharing_strategy(junk)
        assert get_sharing_strategy() == STRATEGIES[-1], "a rejected name must not change it"
    finally:
        set_sharing_strategy(old)


# --------------------------------------------------------------------------- full /dev/shm


_libc = ctypes.CDLL(None, use_errno=True)


def _mount_tmpfs(path: str, options: str) -> None:
    if _libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def _umount(path: str) -> None:
    if _libc.umount2(path.encode(), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


@pytest.mark.root
def test_full_shm_dir_raises_at_creation_never_sigbus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B5: an 8 MiB named segment on a 1 MiB tmpfs is SharedMemoryFull(ENOSPC) at creation."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tinyshm"
    mnt.mkdir()
    try:
        _mount_tmpfs(str(mnt), "size=1m,mode=0700")
    except OSError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        monkeypatch.setenv("AIOSHM_SHM_DIR", str(mnt))
        assert shm_dir() == str(mnt)
        before = _nfds()
        with pytest.raises(SharedMemoryFull) as info:
            create(8 << 20, strategy="file_system")
        assert isinstance(info.value, OSError)
        assert info.value.errno == errno.ENOSPC
        assert info.value.nbytes == 8 << 20
        assert os.listdir(mnt) == [], "a half-created segment was left behind"
        assert _nfds() == before
        # the failed reservation gave its pages back: a segment that fits still works
        buf = create(512 << 10, strategy="file_system")
        np.asarray(buf)[:] = 1
        assert os.listdir(mnt) == [buf.segment.name]
        del buf
        assert os.listdir(mnt) == []
    finally:
        monkeypatch.delenv("AIOSHM_SHM_DIR")
        _umount(str(mnt))


@pytest.mark.parametrize("kind", STRATEGIES)
def test_reservation_failure_is_shared_memory_full(
    kind: str, private_shm_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing ``posix_fallocate`` is SharedMemoryFull; the fd is closed and no name remains."""
    cases = _Cases()
    for err in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
        with cases.case(errno.errorcode[err]):
            calls: list[int] = []

            def no_room(
                fd: int, offset: int, length: int, err: int = err, calls: list[int] = calls
            ) -> None:
                calls.append(fd)
                raise OSError(err, os.strerror(err))

            monkeypatch.setattr(os, "posix_fallocate", no_room)
            before = _nfds()
            with pytest.raises(SharedMemoryFull) as info:
                create(5 * PAGE, strategy=kind)
            assert calls, "posix_fallocate was never called: pages are not reserved up front"
            assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
            assert _fd_closed(calls[0])
            assert _nfds() == before
            assert os.listdir(private_shm_dir) == []
    cases.check()


@needs_memfd
def test_fd_table_full_at_creation_is_fd_limit_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """EMFILE from ``memfd_create`` becomes FdLimitError (an OSError with advice)."""

    def emfile(*args: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "memfd_create", emfile)
    with pytest.raises(FdLimitError, match="ulimit"):
        create(10, strategy="file_descriptor")


# --------------------------------------------------------------------------- attach_name


HOSTILE_NAMES: list[Any] = [
    "../../etc/passwd",
    "a/b",
    "x\0y",
    "a" * 300,
    "aioshm_1_" + "0" * 291,
    "psm_1_0123456789abcdef",
    "1_0123456789abcdef",
    "",
    "aioshm_1_0123456789abcdef/../../../etc/passwd",
    "aioshm_1_0123456789ABCDEF",
    "aioshm_1_0123456789abcde",
    "aioshm__0123456789abcdef",
    "/dev/shm/aioshm_1_0123456789abcdef",
    "aioshm_1_0123456789abcdef.t1_0123456789abcdef/..",
    b"aioshm_1_0123456789abcdef",
    None,
    12,
]

#: Names that get past the regex today: its ``$`` also matches before a trailing newline, and
#: ``\d`` matches any Unicode digit (so ``int()`` of the pid part succeeds too).
REGEX_ESCAPES = [
    "aioshm_1_0123456789abcdef\n",
    "aioshm_1_0123456789abcdef.t2_0123456789abcdef\n",
    "aioshm_\u0661\u0662_0123456789abcdef",
    "aioshm_1_0123456789abcdef.t\u0663_0123456789abcdef",
]


def _forbid_fs(monkeypatch: pytest.MonkeyPatch, touched: list[str]) -> None:
    def forbidden(what: str) -> Callable[..., Any]:
        def call(*args: object, **kwargs: object) -> Any:
            touched.append(f"os.{what}{args!r}")
            raise AssertionError(f"os.{what}{args!r} called for a hostile name")

        return call

    for fn in ("open", "stat", "lstat", "fstat", "unlink", "link"):
        monkeypatch.setattr(os, fn, forbidden(fn))


@pytest.mark.parametrize("names", [HOSTILE_NAMES, REGEX_ESCAPES], ids=["hostile", "regex-escapes"])
def test_attach_name_rejects_hostile_names_before_any_syscall(
    names: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """B9: traversal, separators, NUL, overlong, foreign or non-ASCII names → InvalidHandle.

    ``os.open`` and friends are replaced by functions that fail the case if called.
    """
    cases = _Cases()
    for name in names:
        touched: list[str] = []
        with cases.case(name), monkeypatch.context() as m:
            _forbid_fs(m, touched)
            try:
                with pytest.raises(InvalidHandle):
                    attach_name(name)
            finally:
                m.undo()
            assert touched == [], touched
    cases.check()


def test_attach_name_rejects_hostile_tickets_before_any_syscall(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ticket must be a valid ticket name *of this segment*; checked before any open."""
    tickets = [
        "../../etc/passwd",
        "aioshm_1_0123456789abcdef.t1_0123456789abcdef",  # another segment's ticket
        "aioshm_2_0123456789abcdef",  # the segment itself, not a ticket
        "x\0y",
        "a" * 300,
        "aioshm_2_0123456789abcdef.t1_0123456789abcdef/../x",
    ]
    cases = _Cases()
    for ticket in tickets:
        touched: list[str] = []
        with cases.case(ticket), monkeypatch.context() as m:
            _forbid_fs(m, touched)
            try:
                with pytest.raises(InvalidHandle):
                    attach_name("aioshm_2_0123456789abcdef", ticket)
            finally:
                m.undo()
            assert touched == [], touched
    cases.check()


def test_attach_name_rejects_group_readable_segment() -> None:
    """B8: a segment readable by others (0644) is not ours to trust → InvalidHandle, fd closed."""
    name = _make_named(shm_dir(), mode=0o644)
    try:
        before = _nfds()
        with pytest.raises(InvalidHandle, match="accessible"):
            attach_name(name)
        assert _nfds() == before
        assert name in os.listdir(shm_dir()), "a rejected segment must not be unlinked"
    finally:
        os.unlink(os.path.join(shm_dir(), name))


@pytest.mark.root
def test_attach_name_rejects_segment_of_another_uid() -> None:
    """B8: a segment owned by another uid (chowned as root) → InvalidHandle, fd closed."""
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    name = _make_named(shm_dir())
    path = os.path.join(shm_dir(), name)
    try:
        os.chown(path, 54321, 54321)
        before = _nfds()
        with pytest.raises(InvalidHandle, match="uid"):
            attach_name(name)
        assert _nfds() == before
    finally:
        os.unlink(path)


def test_attach_name_rejects_a_sparse_file() -> None:
    """A same-uid peer's file with holes is refused before it is mapped: touching a hole on a
    full filesystem would kill the receiver with SIGBUS (every aioshm segment is reserved)."""
    name = _make_named(shm_dir(), size=4 * PAGE, sparse=True)
    path = os.path.join(shm_dir(), name)
    try:
        with open(path, "r+b") as f:  # one page of four allocated
            f.write(b"x" * PAGE)
        before = _nfds()
        with pytest.raises(InvalidHandle, match="sparse"):
            attach_name(name)
        assert _nfds() == before
        assert not any(s.name == name for s in live_segments())
    finally:
        os.unlink(path)


def test_attach_name_rejects_dead_empty_and_fifo_names() -> None:
    """B10 and B8: an unlinked name, an empty file or a FIFO → InvalidHandle, no fd left open."""
    buf = create(100, strategy="file_system")
    dead = buf.segment.name
    assert dead is not None
    del buf
    assert dead not in os.listdir(shm_dir())
    empty_name = _make_named(shm_dir(), size=0)
    fifo_name = _segment._random_name()
    fifo = os.path.join(shm_dir(), fifo_name)
    os.mkfifo(fifo, 0o600)
    try:
        before = _nfds()
        with pytest.raises(InvalidHandle, match="no longer exists"):
            attach_name(dead)
        with pytest.raises(InvalidHandle, match="empty"):
            attach_name(empty_name)
        with pytest.raises(InvalidHandle, match="regular"):
            attach_name(fifo_name)
        assert _nfds() == before
    finally:
        os.unlink(os.path.join(shm_dir(), empty_name))
        os.unlink(fifo)


def test_attach_name_rejects_symlinks_and_directories_as_invalid_handle(tmp_path: Path) -> None:
    """B8: a symlink (even to a 0600 file we own) or a directory at a valid name is a bad handle.

    Both are refused today, but as a bare SharedMemoryError from ``os.open`` (ELOOP, EISDIR),
    unlike the FIFO, wrong-mode and wrong-owner cases: they must be InvalidHandle too.
    """
    target = tmp_path / "target"
    target.write_bytes(b"\0" * PAGE)
    target.chmod(0o600)
    cases = _Cases()
    for kind in ("symlink", "directory"):
        name = _segment._random_name()
        path = os.path.join(shm_dir(), name)
        if kind == "symlink":
            os.symlink(target, path)
        else:
            os.mkdir(path, 0o700)
        try:
            with cases.case(kind):
                before = _nfds()
                with pytest.raises(SharedMemoryError) as info:
                    attach_name(name)
                assert _nfds() == before
                assert target.read_bytes() == b"\0" * PAGE
                assert isinstance(info.value, InvalidHandle), repr(info.value)
        finally:
            (os.unlink if kind == "symlink" else os.rmdir)(path)
    cases.check()


def test_attach_name_returns_the_mapping_this_process_already_has() -> None:
    """Attaching a name this process maps returns the same buffer (one mapping per segment)."""
    buf = create(100, strategy="file_system")
    name = buf.segment.name
    assert name is not None
    before = _nfds()
    assert attach_name(name) is buf
    assert _nfds() == before


def test_attach_name_adopts_a_segment_made_elsewhere() -> None:
    """A well-formed 0600 segment made by someone else (same uid) maps with its fstat size."""
    name = _make_named(shm_dir(), pid=1, size=3 * PAGE)
    path = os.path.join(shm_dir(), name)
    try:
        buf = attach_name(name)
        assert buf.segment.size == 3 * PAGE and buf.segment.name == name
        np.asarray(buf)[-1] = 9
        with open(path, "rb") as f:
            assert f.read()[-1] == 9
        del buf
        assert name not in os.listdir(shm_dir()), "the last holder unlinks the name"
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# --------------------------------------------------------------------------- attach_fd


def _memfd(size: int, seals: int, *, sparse: bool = False) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if size and not sparse:
        os.posix_fallocate(fd, 0, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _reopen(fd: int, flags: int) -> int:
    try:
        return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
    finally:
        os.close(fd)


def _pipe_fd(tmp: Path) -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def _socket_fd(tmp: Path) -> int:
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def _disk_file_fd(tmp: Path) -> int:
    fd = os.open(tmp / "regular", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.write(fd, b"\0" * PAGE)
    return fd


def _tmpfs_file_fd(tmp: Path) -> int:
    path = os.path.join("/dev/shm", f"t_{os.getpid()}_tmpfsfile")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.unlink(path)
    os.ftruncate(fd, PAGE)
    return fd


_SEALED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
BAD_FDS: dict[str, Callable[[Path], int]] = {
    "pipe": _pipe_fd,
    "socket": _socket_fd,
    "regular file on disk": _disk_file_fd,
    "/dev/zero": lambda tmp: os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC),
    "directory": lambda tmp: os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC),
    "unlinked tmpfs file": _tmpfs_file_fd,
    "unsealed memfd": lambda tmp: _memfd(PAGE, 0),
    "memfd sealed against shrinking only": lambda tmp: _memfd(PAGE, fcntl.F_SEAL_SHRINK),
    "empty sealed memfd": lambda tmp: _memfd(0, _SEALED),
    "O_PATH fd of a sealed memfd": lambda tmp: _reopen(_memfd(PAGE, _SEALED), os.O_PATH),
}


@needs_memfd
def test_attach_fd_rejects_wrong_kinds_and_closes_them(tmp_path: Path) -> None:
    """C4/C5: anything but a non-empty memfd sealed against resizing → InvalidHandle, fd closed."""
    cases = _Cases()
    for label, make in BAD_FDS.items():
        with cases.case(label):
            before = _nfds()
            fd = make(tmp_path)
            assert _nfds() == before + 1
            with pytest.raises(InvalidHandle):
                attach_fd(fd)
            assert _fd_closed(fd)
            assert _nfds() == before
    cases.check()


@needs_memfd
def test_attach_fd_unmappable_memfd_is_invalid_handle(tmp_path: Path) -> None:
    """C4: a sealed memfd that cannot be mapped read-write (O_RDONLY, F_SEAL_WRITE) is a bad handle.

    It is refused and closed today, but as a bare SharedMemoryError from ``mmap`` (EACCES,
    EPERM): a peer-supplied fd of the wrong kind must be InvalidHandle, like the others.
    """
    makers = {
        "read-only fd": lambda: _reopen(_memfd(PAGE, _SEALED), os.O_RDONLY),
        "write-sealed memfd": lambda: _memfd(PAGE, _SEALED | fcntl.F_SEAL_WRITE),
    }
    cases = _Cases()
    for label, make in makers.items():
        with cases.case(label):
            before = _nfds()
            fd = make()
            with pytest.raises(SharedMemoryError) as info:
                attach_fd(fd)
            assert _fd_closed(fd)
            assert _nfds() == before
            assert isinstance(info.value, InvalidHandle), repr(info.value)
    cases.check()


@needs_memfd
def test_attach_fd_adopts_a_sealed_memfd() -> None:
    """A sealed memfd from a peer is adopted: its size comes from fstat, the fd becomes ours."""
    before = _nfds()
    fd = _memfd(2 * PAGE, _SEALED)
    os.pwrite(fd, b"hello", PAGE)
    buf = attach_fd(fd)
    assert buf.segment.fd == fd and buf.segment.size == 2 * PAGE
    assert bytes(np.asarray(buf)[PAGE : PAGE + 5]) == b"hello"
    assert buf.segment in live_segments()
    del buf
    assert _fd_closed(fd)
    assert _nfds() == before


@needs_memfd
def test_attach_fd_rejects_a_sparse_memfd() -> None:
    """A sealed memfd with holes is refused (and closed): a write into a hole when the memfd
    tmpfs is full would be a SIGBUS in the receiver."""
    before = _nfds()
    fd = _memfd(2 * PAGE, _SEALED, sparse=True)
    os.pwrite(fd, b"hello", PAGE)
    with pytest.raises(InvalidHandle, match="sparse"):
        attach_fd(fd)
    assert _fd_closed(fd)
    assert _nfds() == before


@needs_memfd
def test_attach_fd_of_a_mapped_segment_reuses_the_mapping() -> None:
    """A second fd for a segment this process maps returns the same buffer and closes the fd."""
    buf = create(PAGE, strategy="file_descriptor")
    before = _nfds()
    dup = os.open(f"/proc/self/fd/{buf.segment.fd}", os.O_RDWR | os.O_CLOEXEC)
    assert attach_fd(dup) is buf
    assert _fd_closed(dup)
    assert _nfds() == before


# --------------------------------------------------------------------------- view_on (table D)


def test_view_on_rejects_object_and_unknown_dtypes() -> None:
    """D1/D7: object dtypes (even nested in fields or subarrays), unknown codes, itemsize 0."""
    buf = _page_buf()
    cases = _Cases()
    objects: list[Any] = ["O", "i4,O", [("a", "i4"), ("b", [("c", "O")])], ("O", (2,)), "f8,(2,)O"]
    for dtype in objects:
        with cases.case(dtype), pytest.raises(InvalidHandle, match="object"):
            view_on(buf, 0, (2,), (16,), dtype, False)
    for dtype in [
        "bogus",
        "V0",
        "U0",
        "S0",
        12345,
        "i4,O,",
        "S" + "9" * 30,
        "i4,(-1,)f8",
        object(),
    ]:
        with cases.case(dtype), pytest.raises(InvalidHandle):
            view_on(buf, 0, (1,), (1,), dtype, False)
    cases.check()


def test_view_on_rejects_negative_offset() -> None:
    """D2: numpy would read before the buffer; aioshm refuses."""
    buf = _page_buf()
    cases = _Cases()
    for offset in (-1, -4, -PAGE, -(2**70)):
        with cases.case(offset), pytest.raises(InvalidHandle, match="offset"):
            view_on(buf, offset, (1,), (1,), "u1", False)
    cases.check()


#: (offset, shape, strides, dtype) that end exactly at the segment's last byte, or start at it
EXACT_FITS: list[tuple[int, tuple[int, ...], tuple[int, ...], str]] = [
    (0, (PAGE // 4,), (4,), "<i4"),
    (PAGE - 1, (1,), (1,), "u1"),
    (1, (PAGE - 1,), (1,), "u1"),
    (0, (64, 16), (64, 4), "<i4"),
    (0, (64, 16), (4, 256), "<i4"),
    (PAGE - 8, (), (), "<f8"),
    (PAGE - 16, (2,), (8,), "<c8"),
    (PAGE - 4, (PAGE // 4,), (-4,), "<i4"),
]
#: the same views, one byte further
ONE_BYTE_OVER: list[tuple[int, tuple[int, ...], tuple[int, ...], str]] = [
    (1, (PAGE // 4,), (4,), "<i4"),
    (PAGE, (1,), (1,), "u1"),
    (1, (PAGE,), (1,), "u1"),
    (0, (64, 16), (65, 4), "<i4"),
    (1, (64, 16), (4, 256), "<i4"),
    (PAGE - 7, (), (), "<f8"),
    (PAGE - 15, (2,), (8,), "<c8"),
    (PAGE - 5, (PAGE // 4,), (-4,), "<i4"),
]


def test_view_on_exact_fit_accepted_one_byte_more_rejected() -> None:
    """D3: a view ending at the segment's last byte reads the right data; one byte more → reject."""
    buf = _page_buf()
    cases = _Cases()
    for offset, shape, strides, dtype in EXACT_FITS:
        with cases.case(("fits", offset, shape, strides, dtype)):
            out = view_on(buf, offset, shape, strides, dtype, False)
            assert out.shape == shape and out.dtype == np.dtype(dtype)
            assert out.strides == strides
            assert _in_segment(out, buf)
            np.testing.assert_array_equal(out, _reference(buf, offset, shape, strides, dtype))
            assert segment_buffer_of(out) is buf
    for offset, shape, strides, dtype in ONE_BYTE_OVER:
        label = ("one byte over", offset, shape, strides, dtype)
        with cases.case(label), pytest.raises(InvalidHandle):
            view_on(buf, offset, shape, strides, dtype, False)
    cases.check()


def test_view_on_empty_views_and_offsets() -> None:
    """Empty views may sit anywhere in [0, size]; an offset past the end is still rejected."""
    buf = _page_buf()
    for offset in (0, 17, PAGE):
        out = view_on(buf, offset, (0, 3), (8, 8), "<f8", False)
        assert out.shape == (0, 3) and is_shared(out)
    with pytest.raises(InvalidHandle):
        view_on(buf, PAGE + 1, (0,), (8,), "<f8", False)


def test_view_on_negative_strides() -> None:
    """D4: negative strides inside the segment read what numpy reads; outside → InvalidHandle."""
    buf = _page_buf()
    cases = _Cases()
    inside: list[tuple[int, tuple[int, ...], tuple[int, ...], str]] = [
        (36, (10,), (-4,), "<i4"),
        (32, (3, 4), (-16, 4), "<i4"),
        (44, (3, 4), (-16, -4), "<i4"),
        (13, (3, 5), (-1, 3), "u1"),
        (PAGE - 8, (4, 4), (-8, -(PAGE // 4) + 32), "<f8"),
    ]
    for offset, shape, strides, dtype in inside:
        with cases.case(("inside", offset, shape, strides)):
            out = view_on(buf, offset, shape, strides, dtype, False)
            assert out.strides == strides
            assert _in_segment(out, buf)
            np.testing.assert_array_equal(out, _reference(buf, offset, shape, strides, dtype))
    outside = [(32, (10,), (-4,)), (0, (2,), (-4,)), (40, (3, 4), (-16, -4)), (3, (2, 2), (4, -4))]
    for offset, shape, strides in outside:
        with cases.case(("outside", offset, shape, strides)), pytest.raises(InvalidHandle):
            view_on(buf, offset, shape, strides, "<i4", False)
    cases.check()


def test_view_on_rejects_huge_strides_and_sizes() -> None:
    """D5/D6: |stride| > segment (numpy#32219) and zero-stride terabyte views → InvalidHandle."""
    buf = _page_buf()
    cases = _Cases()
    headers: list[tuple[int, tuple[int, ...], tuple[int, ...], str]] = [
        (0, (2,), (PAGE + 1,), "u1"),
        (PAGE - 1, (2,), (-(PAGE + 1),), "u1"),
        (0, (2, 1), (2**62, 1), "u1"),
        (0, (2,), (2**70,), "u1"),
        (PAGE - 1, (2,), (-(2**70),), "u1"),
        (0, (2**40,), (0,), "u1"),
        (0, (2**62, 2**62), (0, 0), "u1"),
        (0, (2**20, 2**20), (0, 0), "<f8"),
        (0, (2**64,), (0,), "u1"),
        (0, (MAX_VIEW_BYTES // 8 + 1,), (0,), "<f8"),
    ]
    for offset, shape, strides, dtype in headers:
        with cases.case((offset, shape, strides, dtype)), pytest.raises(InvalidHandle):
            view_on(buf, offset, shape, strides, dtype, False)
    cases.check()


def test_view_on_zero_strides_within_the_limit() -> None:
    """Zero strides over a few bytes, below ``MAX_VIEW_BYTES``, are a legal broadcast view."""
    buf = create(PAGE)
    np.asarray(buf)[8:16] = 3
    out = view_on(buf, 8, (1 << 16, 4), (0, 0), "<i2", True)
    assert out.shape == (1 << 16, 4) and out.strides == (0, 0)
    assert (out.copy() == 0x0303).all()


def test_broadcast_view_larger_than_its_segment_travels_without_allocating() -> None:
    """The decision of Note [Logical size]: a 1 GiB broadcast of a one-page shared array is a
    legal handle (numpy made it); it arrives as a zero-stride view of the same page, and
    receiving it allocates nothing. Only claims above ``MAX_VIEW_BYTES`` are refused."""
    import aioshm

    base = aioshm.zeros(PAGE // 8)
    big = np.broadcast_to(base[:1], (1 << 27,))  # 1 GiB logical, 8 bytes of memory
    a, b = aioshm.Pipe()
    try:
        a.send(big)
        got = b.recv()
        assert got.shape == big.shape and got.strides == (0,)
        assert got.nbytes == 1 << 30 > PAGE
        base[0] = 7.0
        assert got[12345] == 7.0  # the same memory, not a copy
        assert aioshm.is_shared(got)
    finally:
        a.close()
        b.close()
    with pytest.raises(InvalidHandle, match="claims more than"):
        view_on(segment_buffer_of(base), 0, (MAX_VIEW_BYTES // 8 + 1,), (0,), "<f8", True)


def test_view_on_ndim_limit() -> None:
    """D7: 64 dimensions are fine; 65 (or 1000) → InvalidHandle."""
    buf = _page_buf()
    assert view_on(buf, 0, (1,) * MAX_NDIM, (1,) * MAX_NDIM, "u1", False).ndim == 64
    for ndim in (65, 1000):
        with pytest.raises(InvalidHandle):
            view_on(buf, 0, (1,) * ndim, (1,) * ndim, "u1", False)


def test_view_on_rejects_malformed_header_fields() -> None:
    """D7: negative dims; shape, strides and offset must be (sequences of) ints of equal length."""
    buf = _page_buf()
    bad: list[tuple[Any, Any, Any]] = [
        (0, (-1,), (1,)),
        (0, (2, -1), (1, 1)),
        (0, (-(2**70),), (1,)),
        (0, (0, -1), (1, 1)),
        (0, (1.0,), (1,)),
        (0, ("3",), (1,)),
        (0, (True,), (1,)),
        (0, (None,), (1,)),
        (0, (np.float64(2),), (1,)),
        (0, 3, (1,)),
        (0, "ab", (1,)),
        (0, np.array([2]), (1,)),
        (0, (2,), (1.0,)),
        (0, (2,), (None,)),
        (0, (2,), 1),
        (0, (2,), (1, 1)),
        (0, (2, 2), (1,)),
        (0.0, (2,), (1,)),
        ("0", (2,), (1,)),
        (True, (2,), (1,)),
        (None, (2,), (1,)),
    ]
    cases = _Cases()
    for offset, shape, strides in bad:
        with cases.case((offset, shape, strides)), pytest.raises(InvalidHandle):
            view_on(buf, offset, shape, strides, "u1", False)
    cases.check()
    # numpy integer scalars are fine (they come out of shape arithmetic)
    out = view_on(buf, np.int64(4), [np.int32(3)], [np.uint8(4)], "<i4", False)
    np.testing.assert_array_equal(out, _reference(buf, 4, (3,), (4,), "<i4"))


def test_view_on_readonly_flag() -> None:
    """D9: a read-only handle gives a non-writeable array; a writable one a writeable array."""
    buf = _page_buf()
    ro = view_on(buf, 0, (4,), (1,), "u1", True)
    assert ro.flags.writeable is False
    with pytest.raises(ValueError, match="read-only"):
        ro[0] = 1
    rw = view_on(buf, 0, (4,), (1,), "u1", False)
    assert rw.flags.writeable is True
    rw[0] = 200
    assert ro[0] == 200


def test_view_on_never_lets_numpy_raise() -> None:
    """Whatever the header, the result is a valid array or InvalidHandle, never numpy's errors.

    These headers pass the bounds checks (a zero-length dimension skips them; strides of
    length-1 dimensions are not checked; subarray dtypes add dimensions after the ndim check)
    and then ``np.ndarray(...)`` raises ValueError: "array is too big", "Maximum allowed
    dimension exceeded", "number of dimensions must be within [0, 64]".
    """
    buf = _page_buf()
    headers: list[tuple[tuple[int, ...], tuple[int, ...], Any]] = [
        ((0, 2**62, 2**62), (1, 1, 1), "u1"),
        ((0, 2**64), (1, 1), "u1"),
        ((1,), (2**63,), "u1"),
        ((1,), (2**70,), "u1"),
        ((1, 2), (-(2**70), 1), "u1"),
        ((1,) * 64, (8,) * 64, ("<f4", (2,))),
        ((1,) * 63, (8,) * 63, ("<f4", (1, 1))),
    ]
    cases = _Cases()
    for shape, strides, dtype in headers:
        with cases.case((shape if len(shape) < 4 else f"{len(shape)} dims", strides[:3], dtype)):
            try:
                out = view_on(buf, 0, shape, strides, dtype, False)
            except InvalidHandle:
                continue
            assert _in_segment(out, buf)
            out.copy()
    cases.check()


_HEADER_DTYPES: list[Any] = [
    "u1", "<i2", ">i4", "<f8", "c16", "M8[s]", "U3", "S5", "V7", "?", "i4,f8",
    ("<f4", (2,)), "O", "i4,O", "V0", "bogus", None, 7,
]  # fmt: skip
_ints = st.one_of(
    st.integers(-8, 40),
    st.integers(-(2**66), 2**66),
    st.sampled_from([PAGE - 1, PAGE, PAGE + 1, 2**31, 2**32, 2**62, 2**63, 2**64, -(2**63)]),
)
_dims = st.one_of(st.integers(0, 6), st.integers(-2, 2**40), st.sampled_from([2**62, 2**64]))
_headers = st.integers(0, 5).flatmap(
    lambda n: st.tuples(
        st.one_of(st.integers(-16, PAGE + 16), _ints),
        st.lists(_dims, min_size=n, max_size=n).map(tuple),
        st.lists(_ints, min_size=n, max_size=n + (1 if n < 5 else 0)).map(tuple),
        st.sampled_from(_HEADER_DTYPES),
        st.booleans(),
    )
)


@settings(max_examples=600, deadline=None, database=None)
@given(header=_headers)
def test_view_on_fuzz_valid_or_invalid_handle(header: tuple[Any, ...]) -> None:
    """D8: random headers over a one-page segment give an in-bounds readable array or InvalidHandle.

    Anything else numpy raises (ValueError, OverflowError, ...) is a failure. An accepted view
    must lie inside the mapping (checked before touching its memory), and ``.copy()`` works.
    """
    offset, shape, strides, dtype, readonly = header
    buf = create(PAGE)
    try:
        out = view_on(buf, offset, shape, strides, dtype, readonly)
    except InvalidHandle:
        return
    assert out.flags.writeable is not readonly
    assert _in_segment(out, buf), byte_bounds(out)
    assert out.nbytes <= MAX_VIEW_BYTES
    if out.nbytes <= 1 << 20:
        assert out.copy().shape == out.shape


# --------------------------------------------------------------------------- arrays


def _fill_for(dt: np.dtype) -> np.ndarray:
    """A 0-d fill value of dtype ``dt`` that differs from zero."""
    if dt.kind == "M":
        return np.array("2001-02-03", dtype=dt)
    return np.ones((), dtype=dt)


def _check_made(
    got: np.ndarray,
    want: np.ndarray | None,
    shape: tuple[int, ...],
    dt: np.dtype,
    order: str,
    kind: str,
) -> None:
    assert is_shared(got)
    assert segment_buffer_of(got).segment.kind == kind  # type: ignore[union-attr]
    assert got.shape == shape and got.dtype == dt
    assert got.flags.c_contiguous == (order == "C")
    assert got.flags.f_contiguous == (order == "F")
    assert got.flags.writeable
    if want is not None:
        np.testing.assert_array_equal(got, want)


def test_constructors_match_numpy(strategy: str) -> None:
    """``empty/zeros/ones/full`` give shared arrays equal to numpy's, for every dtype and order."""
    cases = _Cases()
    shape = (3, 5)
    for dtype in DTYPES:
        dt = np.dtype(dtype)
        fill = _fill_for(dt)
        for order in ("C", "F"):
            makers: dict[str, tuple[Callable[..., np.ndarray], Any, tuple[Any, ...]]] = {
                "empty": (empty, None, (shape, dt, order)),
                "zeros": (zeros, np.zeros, (shape, dt, order)),
                "ones": (ones, np.ones, (shape, dt, order)),
                "full": (full, np.full, (shape, fill, dt, order)),
            }
            for what, (ours, numpys, args) in makers.items():
                with cases.case((what, str(dt), order)):
                    want = None if numpys is None else numpys(*args)
                    _check_made(ours(*args), want, shape, dt, order, strategy)
    cases.check()


def test_like_constructors_match_numpy(strategy: str) -> None:
    """``*_like`` keep the prototype's shape, dtype and memory order (order='K')."""
    cases = _Cases()
    for dtype in DTYPES:
        dt = np.dtype(dtype)
        fill = _fill_for(dt)
        for order in ("C", "F"):
            proto = np.zeros((4, 3), dt, order=order)
            makers: dict[str, tuple[Callable[..., np.ndarray], Any, tuple[Any, ...]]] = {
                "empty_like": (empty_like, None, (proto,)),
                "zeros_like": (zeros_like, np.zeros_like, (proto,)),
                "ones_like": (ones_like, np.ones_like, (proto,)),
                "full_like": (full_like, np.full_like, (proto, fill)),
            }
            for what, (ours, numpys, args) in makers.items():
                with cases.case((what, str(dt), order)):
                    want = None if numpys is None else numpys(*args)
                    _check_made(ours(*args), want, (4, 3), dt, order, strategy)
    cases.check()


def test_like_constructors_overrides() -> None:
    """``dtype``, ``order`` and ``shape`` overrides of ``*_like`` behave like numpy's."""
    proto = np.arange(12, dtype=np.int16).reshape(3, 4)
    for dt in (np.float32, np.dtype(np.float32), "f4"):
        got = zeros_like(proto, dtype=dt)
        assert got.dtype == np.float32 and got.shape == (3, 4)
    got = ones_like(proto, order="F")
    assert got.flags.f_contiguous and not got.flags.c_contiguous
    got = full_like(proto, 7, shape=(2, 5))
    assert got.shape == (2, 5) and got.dtype == np.int16 and (got == 7).all()
    got = empty_like([[1.5, 2.5]])
    assert got.shape == (1, 2) and got.dtype == np.float64 and is_shared(got)


def test_full_infers_dtype_from_the_fill_value() -> None:
    """``full`` without a dtype uses the fill value's, like numpy."""
    assert full((2,), 2.5).dtype == np.float64
    assert full((2,), 3).dtype == np.asarray(3).dtype
    got = full((2,), "ab")
    assert got.dtype == np.dtype("U2") and list(got) == ["ab", "ab"]
    assert full(3, True).dtype == np.bool_


def test_constructors_reject_bad_arguments() -> None:
    """Object dtypes are TypeError; negative dims and bad orders are ValueError; no fd leaks."""
    before = _nfds()
    for maker in (empty, zeros, ones):
        with pytest.raises(TypeError):
            maker(3, object)
        with pytest.raises(TypeError):
            maker(3, "i4,O")
        with pytest.raises(ValueError):
            maker((2, -1))
        with pytest.raises(ValueError):
            maker(3, float, "K")
    assert _nfds() == before


def test_empty_and_zero_d_constructors() -> None:
    """Empty and 0-d shared arrays work (a page is still mapped for them)."""
    e = zeros((0, 5))
    assert e.shape == (0, 5) and is_shared(e)
    z = full((), 4.5)
    assert z.shape == () and z[()] == 4.5 and is_shared(z)
    n = ones(np.int64(3), np.uint8)
    assert n.shape == (3,) and n.tolist() == [1, 1, 1]


VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "self": lambda a: a,
    "row-slice": lambda a: a[1:4],
    "column": lambda a: a[:, 2],
    "step": lambda a: a[::2, 1::3],
    "transpose": lambda a: a.T,
    "negative-strides": lambda a: a[::-1, ::-2],
    "zero-d": lambda a: a[1, 2, ...],
    "empty": lambda a: a[2:2],
    "empty-columns": lambda a: a[:, 5:1],
    "reshape": lambda a: a.reshape(-1),
    "ravel": lambda a: a.ravel(),
    "newaxis": lambda a: a[None, :, None],
    "dtype-view": lambda a: a.view(np.uint8),
    "as-strided": lambda a: as_strided(a, (3, 3), (8, 8)),
    "broadcast": lambda a: np.broadcast_to(a[0], (4, 6)),
    "asarray": np.asarray,
    "diagonal": lambda a: a.diagonal(),
    "real": lambda a: a.real,
}


def test_is_shared_on_views(strategy: str) -> None:
    """Every kind of view of a shared array is shared, on the same buffer."""
    a = zeros((5, 6), np.float64)
    cases = _Cases()
    for label, view in VIEWS.items():
        with cases.case(label):
            v = view(a)
            assert isinstance(v, np.ndarray)
            assert is_shared(v)
            assert segment_buffer_of(v) is segment_buffer_of(a)
    cases.check()


def test_is_shared_false_for_ordinary_objects() -> None:
    """Plain arrays, scalars, other objects, and copies of shared arrays are not shared."""
    a = ones((3, 4))
    others: list[Any] = [
        np.zeros(3),
        np.zeros(3)[1:],
        np.float64(1.0),
        [1.0, 2.0],
        memoryview(b"abc"),
        b"abc",
        None,
        3,
        a[0, 0],
    ]
    derived = [a.copy(), np.array(a), a + 1, a.astype(np.float32), a[[0, 2]], a[a > 0]]
    for obj in others + derived:
        assert not is_shared(obj), repr(obj)
        assert segment_buffer_of(obj) is None if isinstance(obj, np.ndarray) else True


def test_share_is_a_no_op_for_shared_arrays() -> None:
    """``share`` returns a shared array (or any shared view) itself: no copy, same memory."""
    a = zeros((4, 4), np.int32)
    for v in (a, a[1:], a.T, a[::-1], a[0, 0, ...], a[:0]):
        assert share(v) is v
    ro = a[:2]
    ro.flags.writeable = False
    assert share(ro) is ro and not ro.flags.writeable


def _sample(dt: np.dtype, n: int) -> np.ndarray:
    if dt.kind in "Mm":
        return np.arange(n).astype(dt)
    if dt.kind in "US":
        return np.array([str(i) for i in range(n)], dtype=dt)
    return np.frombuffer(np.random.default_rng(0).bytes(n * dt.itemsize), dt).copy()


def test_share_copies_ordinary_arrays(strategy: str) -> None:
    """``share`` of a plain array is a shared copy: equal values, shape, dtype and order."""
    cases = _Cases()
    for dtype in DTYPES:
        dt = np.dtype(dtype)
        base = _sample(dt, 20)
        layouts = {
            "C": base.reshape(4, 5),
            "F": np.asfortranarray(base.reshape(4, 5)),
            "strided": base.reshape(4, 5)[::2, ::-2],
            "0-d": base[3, ...],
            "empty": base[:0].reshape(0, 3),
        }
        for layout, src in layouts.items():
            with cases.case((str(dt), layout)):
                got = share(src)
                assert is_shared(got)
                assert segment_buffer_of(got).segment.kind == strategy  # type: ignore[union-attr]
                assert got.shape == src.shape and got.dtype == src.dtype
                assert not np.shares_memory(got, src)
                assert got.tobytes() == src.tobytes()  # bitwise (NaNs and void included)
                if layout == "F":
                    assert got.flags.f_contiguous and not got.flags.c_contiguous
                if layout == "C":
                    assert got.flags.c_contiguous
                assert got.flags.writeable
    cases.check()


def test_share_preserves_readonly_and_accepts_sequences() -> None:
    """A read-only source gives a read-only shared copy; lists are converted like asarray."""
    src = np.arange(6.0)
    src.flags.writeable = False
    got = share(src)
    assert is_shared(got) and not got.flags.writeable
    np.testing.assert_array_equal(got, src)
    lst = share([[1, 2], [3, 4]])
    assert is_shared(lst) and lst.tolist() == [[1, 2], [3, 4]]


def test_share_rejects_object_dtypes() -> None:
    """Python objects cannot live in shared memory: TypeError, nothing created."""
    before = _nfds()
    for obj in (np.array([1, "a", None], dtype=object), [1, "a", None], np.zeros(2, "i4,O")):
        with pytest.raises(TypeError):
            share(obj)
    assert _nfds() == before


# --------------------------------------------------------------------------- lifetime


def test_named_segment_unlinked_when_last_view_dies() -> None:
    """A named segment's name outlives its first array while a view lives, then disappears."""
    old = get_sharing_strategy()
    set_sharing_strategy("file_system")
    try:
        b = zeros((10, 10))
    finally:
        set_sharing_strategy(old)
    name = segment_buffer_of(b).segment.name  # type: ignore[union-attr]
    assert name is not None and name in os.listdir(shm_dir())
    view = b[3:5]
    del b
    gc.collect()
    assert name in os.listdir(shm_dir())
    view[0, 0] = 1.0
    del view
    assert name not in os.listdir(shm_dir())


@needs_memfd
def test_memfd_segment_closed_when_last_view_dies() -> None:
    """A memfd segment's fd and mapping go away with its last view."""
    before = _nfds()
    buf = create(1000, strategy="file_descriptor")
    a = np.asarray(buf).view(np.int32)
    seg = buf.segment
    del buf
    col = a[::7]
    del a
    assert not seg.closed and seg in live_segments()
    del col
    assert seg.closed and seg not in live_segments()
    assert _nfds() == before


@pytest.mark.parametrize("kind", STRATEGIES)
def test_pooled_segment_is_parked_then_reused_then_trimmed(kind: str) -> None:
    """An idle pooled segment stays mapped (unlocked), is reused by size, and ``trim`` frees it."""
    before = _nfds()
    buf = create(3000, strategy=kind, pooled=True)
    seg = buf.segment
    name = seg.name
    del buf
    assert seg in live_segments() and not seg.closed and not seg.locked
    again = create(PAGE, strategy=kind, pooled=True)
    assert again.segment is seg, "an idle pooled segment of the right size must be reused"
    other = create(PAGE, strategy=kind, pooled=True)
    assert other.segment is not seg, "a segment with live views must not be handed out twice"
    too_small = create(3 * PAGE, strategy=kind, pooled=True)
    assert too_small.segment is not seg
    del again, other, too_small
    trim()
    assert seg.closed and seg not in live_segments()
    assert _nfds() == before
    if name is not None:
        assert name not in os.listdir(shm_dir())


@pytest.mark.parametrize("kind", STRATEGIES)
def test_pooled_segment_not_reused_while_another_holder_locks_it(kind: str) -> None:
    """A read lock from another open file description (another process's view) blocks reuse."""
    buf = create(PAGE, strategy=kind, pooled=True)
    seg = buf.segment
    other = os.open(f"/proc/self/fd/{seg.fd}", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert _segment._ofd_lock(other, fcntl.F_RDLCK)
        del buf
        assert not seg.closed
        fresh = create(PAGE, strategy=kind, pooled=True)
        assert fresh.segment is not seg
        del fresh
    finally:
        os.close(other)
    again = create(PAGE, strategy=kind, pooled=True)
    assert again.segment is seg, "once the other holder is gone, the segment is reusable"


def test_pool_limit() -> None:
    """``set_pool_limit(0)`` closes idle segments at once; negative limits are rejected."""
    with pytest.raises(ValueError):
        set_pool_limit(-1)
    buf = create(PAGE, pooled=True)
    seg = buf.segment
    del buf
    assert not seg.closed
    try:
        set_pool_limit(0)
        assert seg.closed
        buf = create(PAGE, pooled=True)
        seg = buf.segment
        del buf
        assert seg.closed, "with a zero pool limit, nothing is parked"
    finally:
        set_pool_limit(_segment.POOL_LIMIT_DEFAULT)


# --------------------------------------------------------------------------- orphans


def test_cleanup_orphans(private_shm_dir: str) -> None:
    """B4: only names whose owner (creator, or ticket sender) is dead and unheld are removed."""
    dead = _dead_pid()
    me = os.getpid()
    orphan = _make_named(private_shm_dir, pid=dead)
    live = _make_named(private_shm_dir, pid=me)
    held = _make_named(private_shm_dir, pid=dead)
    dead_ticket = f"{_segment._random_name(me)}.t{dead}_{'a' * 16}"
    live_ticket = f"{_segment._random_name(dead)}.t{me}_{'b' * 16}"
    foreign = ["aioshm_junk", f"aioshm_{dead}_xyz", "psm_12345678", f"other_{dead}_{'c' * 16}"]
    for name in (dead_ticket, live_ticket, *foreign):
        with open(os.path.join(private_shm_dir, name), "wb") as f:
            f.write(b"x")
    holder = os.open(os.path.join(private_shm_dir, held), os.O_RDWR | os.O_CLOEXEC)
    try:
        assert _segment._ofd_lock(holder, fcntl.F_RDLCK)
        removed = cleanup_orphans()
        assert sorted(removed) == sorted([orphan, dead_ticket])
        assert set(os.listdir(private_shm_dir)) == {live, held, live_ticket, *foreign}
    finally:
        os.close(holder)
    # once nobody holds it any more, the held orphan goes too
    assert cleanup_orphans() == [held]


@pytest.mark.root
def test_cleanup_orphans_leaves_other_users_alone(
    private_shm_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead-pid name owned by another uid is not ours to remove; a missing dir has none."""
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    name = _make_named(private_shm_dir, pid=_dead_pid())
    os.chown(os.path.join(private_shm_dir, name), 54321, 54321)
    assert cleanup_orphans() == []
    assert os.listdir(private_shm_dir) == [name]
    monkeypatch.setenv("AIOSHM_SHM_DIR", os.path.join(private_shm_dir, "absent"))
    assert cleanup_orphans() == []
