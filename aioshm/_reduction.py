"""Reducers that make ``ForkingPickler`` carry ndarrays as shared-memory handles.

Registered once, idempotently, by :func:`init_reductions` (importing ``aioshm`` or
``aioshm.multiprocessing`` does it), so every queue, pipe, process argument and pool task
pickled by ``multiprocessing.reduction.ForkingPickler`` carries them.

An ndarray is reduced to ``(_rebuild_ndarray, (ref, pooled, offset, shape, strides, dtype,
readonly))``:

* a shared array, or any view of one, names its segment (``ref``): O(1) in its size, and
  writes on either side are seen by the other;
* a non-shared array of at least :func:`get_share_threshold` bytes is copied once into a
  recycled segment and sent the same way (value semantics, one copy instead of pickle's several);
* smaller arrays and object dtypes pickle inline, as numpy does.

How ``ref`` reaches the other process (see Note [Segment lifetime] in ``_shm/_segment.py``):

* through aioshm's own connections and queues, a segment fd rides in the same ``sendmsg`` as
  the frame (SCM_RIGHTS); the pickle stores only its index in the message (:func:`dumps` and
  :func:`loads` set up that context);
* to a process being started (spawn or fork-server arguments), the fd is inherited at launch
  (``multiprocessing.reduction.DupFd`` with the spawning popen);
* ``file_system`` segments travel as a name plus an in-flight ticket (a hard link), on any
  channel.

Note [Foreign channels]
~~~~~~~~~~~~~~~~~~~~~~~
A channel aioshm does not own (a stdlib ``Queue``, ``Pipe`` or ``Pool``, a
``ProcessPoolExecutor``) pickles with ``ForkingPickler`` outside :func:`dumps`, so it cannot
carry an fd beside the frame. The stdlib's own fallback, ``DupFd`` through the
``resource_sharer``, makes the receiver connect back to the *sender* for the fd: a producer that
exits before its item is received leaves the consumer a ``ConnectionRefusedError``. So on such a
channel an array of an anonymous (``file_descriptor``) segment, or a non-shared array, is pickled
by value, exactly as numpy pickles it without aioshm: the message is self-contained, outlives its
sender, and nothing can leak however it is lost. (A copy into a named segment with a ticket
would save the pipe's copies, but a message that is never received -- a queue dropped with items
in it, futures cancelled, a consumer killed -- would leave a name in ``/dev/shm`` with no process
to remove it.) Arrays on ``file_system`` segments keep their name and ticket, which outlive the
sender too, and stay shared. aioshm's own channels (``aioshm.multiprocessing``'s ``Queue``,
``Pipe`` and ``Pool``, and the async face) are unaffected: they pass the fd itself.

Several views of one buffer in one message share one fd, and arrive as views of one mapping.

Note [Functions by value]
~~~~~~~~~~~~~~~~~~~~~~~~~
Pickle carries a function by reference (module and qualified name), which fails for lambdas,
closures and functions of an interactive session (``__main__`` without a file: a spawned or
fork-server child cannot import it). With the optional ``cloudpickle`` installed
(``pip install 'aioshm[cloudpickle]'``), aioshm's picklers and ``ForkingPickler`` send such a
function -- only the function: code, closure, the globals it uses -- by value as a nested
cloudpickle blob, whose pickler still has aioshm's reducers, so an array the function captures
travels as a handle like any argument. Every function pickle can carry by reference still goes
by reference. Without cloudpickle, a function that cannot go by reference raises a
``PicklingError`` naming the extra; an interactive ``__main__`` function keeps the stdlib's
by-reference pickle (which a forked child can resolve).
"""

from __future__ import annotations

import collections
import copyreg
import io
import os
import pickle
import struct
import sys
import threading
import types
import weakref
from collections.abc import Callable
from multiprocessing import context as _mp_context
from multiprocessing import reduction as _mp_reduction
from typing import Any, Final

import numpy as np

from ._exceptions import ProtocolError
from ._shm import _segment
from ._shm._array import copy_into_pool, segment_buffer_of, view_on
from ._wire import FD_MAGIC, MAX_FDS_PER_MESSAGE, FdHeader

__all__ = (
    "ForkingPickler",
    "dumps",
    "get_share_threshold",
    "init_reductions",
    "loads",
    "reduce_ndarray",
    "set_share_threshold",
    "take_fd",
)

ForkingPickler = _mp_reduction.ForkingPickler

SHARE_THRESHOLD_DEFAULT: Final = 64 * 1024
#: Value copies at least this large are left to the async sender (done in chunks).
DEFER_COPY_MIN: Final = 4 << 20
_threshold = SHARE_THRESHOLD_DEFAULT

#: The fd header's layout (built and parsed only by :class:`aioshm._wire.FdHeader`; this
#: alias gives its size to tests).
FD_HEADER: Final = struct.Struct("!4sIQ")


def get_share_threshold() -> int:
    """Non-shared arrays of at least this many bytes travel through shared memory."""
    return _threshold


def set_share_threshold(nbytes: int) -> None:
    """Set the size from which non-shared arrays are copied into shared memory when sent.

    Below it they are pickled inline. ``0`` sends every non-object array through shared memory.
    """
    global _threshold
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"threshold must be a non-negative int, got {nbytes!r}")
    _threshold = nbytes


class _State:
    """What the pickling and unpickling in one thread share with the reducers they call."""

    __slots__ = ("buffer", "copies", "incoming", "memo", "out", "owned", "pickler", "pickling")

    def __init__(self) -> None:
        self.out: list[int] | None = None  # fds collected for the message being pickled
        self.owned: list[bool] | None = None  # whether each collected fd is ours to close
        self.memo: dict[object, int] | None = None
        self.incoming: list[int | None] | None = None  # fds received with the message
        self.copies: list[Any] | None = None  # large value copies an async sender makes
        self.pickler: _Pickler | None = None  # this thread's reusable pickler, its buffer
        self.buffer: io.BytesIO | None = None
        self.pickling = False  # the pickler is in use (a nested dump gets a fresh one)


class _Local(threading.local):
    """One :class:`_State` per thread, fetched once per call (a ``threading.local``
    attribute costs a per-thread dict lookup; a slot does not)."""

    def __init__(self) -> None:
        self.state = _State()


_local = _Local()


class _Pickler(pickle.Pickler):
    """``ForkingPickler``'s tables as a live view instead of a copy per pickle: a thread reuses
    one pickler (clearing its memo), which saves ~0.5-1 µs per message; reducers registered
    later still apply. The table is consulted only for types the C pickler does not handle
    itself (ndarrays, user classes), never for ints, strings, tuples, dicts or functions."""

    dispatch_table = collections.ChainMap(  # noqa: RUF012 (a live view, never mutated)
        ForkingPickler._extra_reducers,  # type: ignore[attr-defined]
        copyreg.dispatch_table,  # type: ignore[arg-type]
    )


def _pickle(obj: object, st: _State) -> bytes:
    pickler, buf = st.pickler, st.buffer
    if st.pickling or pickler is None or buf is None:
        if st.pickling:  # a reducer pickles something itself: not the shared one
            fresh = io.BytesIO()
            _Pickler(fresh, pickle.HIGHEST_PROTOCOL).dump(obj)
            return fresh.getvalue()
        buf = st.buffer = io.BytesIO()
        pickler = st.pickler = _Pickler(buf, pickle.HIGHEST_PROTOCOL)
    st.pickling = True
    try:
        pickler.dump(obj)
        return buf.getvalue()
    except BaseException:
        st.pickler = None  # whatever state a failed dump left it in
        raise
    finally:
        st.pickling = False
        pickler.clear_memo()
        buf.seek(0)
        buf.truncate()


# --------------------------------------------------------------------------- fd references


def fd_ref(fd: int, *, owned: bool, memo_key: object = None) -> object:
    """A picklable reference to ``fd`` for the message being pickled.

    In an aioshm message this is an index into the fds sent with it; otherwise a stdlib
    ``DupFd``. ``owned`` fds (tickets) are closed once the message has been sent.
    """
    st = _local.state
    out = st.out
    if out is not None:
        memo = st.memo
        assert memo is not None and st.owned is not None
        if memo_key is not None and memo_key in memo:
            if owned:
                os.close(fd)
            return memo[memo_key]
        if len(out) >= MAX_FDS_PER_MESSAGE:
            if owned:
                os.close(fd)
            raise ValueError(
                f"a message may carry at most {MAX_FDS_PER_MESSAGE} shared segments; "
                "send fewer distinct arrays per message"
            )
        out.append(fd)
        st.owned.append(owned)
        if memo_key is not None:
            memo[memo_key] = len(out) - 1
        return len(out) - 1
    popen = _mp_context.get_spawning_popen()
    dup = _mp_reduction.DupFd(fd)
    if owned:
        if popen is not None:
            # spawn / the fork server pass this very fd at launch: close it once the child has
            # it (aioshm's Process.start calls release_spawn_fds), or when the popen goes
            _spawn_fds.setdefault(popen, []).append(weakref.finalize(popen, os.close, fd))
        else:
            os.close(fd)  # resource_sharer kept its own duplicate
    return dup


_spawn_fds: weakref.WeakKeyDictionary[Any, list[weakref.finalize]] = weakref.WeakKeyDictionary()


def release_spawn_fds(popen: Any) -> None:
    """Close the fds :func:`fd_ref` handed to ``popen`` once the child has been launched."""
    if popen is None:
        return
    for fin in _spawn_fds.pop(popen, ()):
        fin()


def take_fd(ref: object) -> int:
    """The fd a reference made by :func:`fd_ref` stands for, owned by the caller."""
    if isinstance(ref, int):
        incoming = _local.state.incoming
        if incoming is None or not 0 <= ref < len(incoming) or incoming[ref] is None:
            raise ProtocolError(f"message refers to fd #{ref}, which did not arrive with it")
        fd = incoming[ref]
        assert fd is not None
        # the same index may be referenced again in this message: hand out duplicates
        incoming[ref] = None
        try:
            incoming[ref] = os.dup(fd)
        except OSError:
            incoming[ref] = None
        return fd
    detach: Callable[[], int] | None = getattr(ref, "detach", None)
    if detach is None:
        raise ProtocolError(f"invalid fd reference {ref!r}")
    return detach()


# --------------------------------------------------------------------------- ndarray


def _rebuild_ndarray(
    ref: object,
    pooled: bool,
    offset: int,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    dtype: np.dtype | str,
    readonly: bool,
) -> np.ndarray:
    if isinstance(ref, tuple) and len(ref) == 3 and ref[0] == "name":
        buf = _segment.attach_name(ref[1], ref[2], pooled=pooled)
    else:
        buf = _segment.attach_fd(take_fd(ref), pooled=pooled)
    return view_on(buf, offset, shape, strides, dtype, readonly)


def _dtype_ref(dt: np.dtype) -> np.dtype | str:
    """A plain dtype as its ``str`` (``'<f4'``: pickling a dtype object costs ~5 µs, and
    rebuilding it ~3 µs, on a path that otherwise sends a handle); structured, subarray and
    metadata-carrying dtypes as themselves."""
    if dt.fields is None and dt.subdtype is None and dt.metadata is None:
        return dt.str
    return dt


def reduce_ndarray(a: np.ndarray) -> tuple[Any, ...]:
    """The ForkingPickler reducer for :class:`numpy.ndarray` (see the module docstring)."""
    buf = segment_buffer_of(a)
    target = a
    if _local.state.out is None and _mp_context.get_spawning_popen() is None:
        # a foreign channel (Note [Foreign channels]): only names outlive the sender there
        if buf is None:
            if _segment.get_sharing_strategy() != "file_system":
                return a.__reduce__()  # type: ignore[return-value]
        elif buf.segment.name is None:
            return a.__reduce__()  # type: ignore[return-value]
    if buf is None:
        if a.dtype.hasobject or a.nbytes < _threshold or a.nbytes == 0:
            return a.__reduce__()  # type: ignore[return-value]
        copies = _local.state.copies
        if copies is not None and a.nbytes >= DEFER_COPY_MIN:
            target = copy_into_pool(a, copy=False)
            copies.append((target, a))  # the async sender copies before it sends
        else:
            target = copy_into_pool(a)
        buf = segment_buffer_of(target)
        assert buf is not None
    seg = buf.segment
    offset = target.__array_interface__["data"][0] - seg.address if target.size else 0
    if seg.name is not None:
        ref: object = ("name", seg.name, seg.ticket_name())
    else:
        ref = fd_ref(seg.ticket_fd(), owned=True, memo_key=seg.key)
    return (
        _rebuild_ndarray,
        (
            ref,
            seg.pooled,
            offset,
            target.shape,
            target.strides,
            _dtype_ref(target.dtype),
            not a.flags.writeable,
        ),
    )


# --------------------------------------------------------------------------- functions

CLOUDPICKLE_HINT: Final = "pip install 'aioshm[cloudpickle]'"
_MISSING: Final = object()


class FunctionNotPicklable(pickle.PicklingError, AttributeError):
    """A function pickle cannot carry by name, and cloudpickle is not installed. Both of the
    types pickle itself raises for it (``PicklingError`` for a lambda, ``AttributeError`` for a
    local function), so code that catches either keeps working."""


def _by_reference(fn: types.FunctionType) -> bool:
    """Whether a child can find ``fn`` by module and qualified name: pickle's own test, and for
    ``__main__``, that the function comes from the main file a child re-imports."""
    qualname = fn.__qualname__
    if "<" in qualname:  # <lambda>, <locals>
        return False
    module = sys.modules.get(fn.__module__)
    if module is None:
        return True  # not imported here: leave it to pickle (which imports it or says why)
    obj: object = module
    for part in qualname.split("."):
        obj = getattr(obj, part, _MISSING)
    if obj is not fn:
        return False
    if fn.__module__ != "__main__":
        return True
    main_file = getattr(module, "__file__", None)
    return main_file is not None and fn.__code__.co_filename == main_file


def _reduce_function(obj: Any) -> Any:
    """``reducer_override`` of the by-value picklers: NotImplemented except for a function that
    cannot go by reference, which goes by value with cloudpickle or raises naming the extra."""
    if type(obj) is not types.FunctionType or _by_reference(obj):
        return NotImplemented
    pickler = _cloud_pickler()
    if pickler is None:
        if obj.__module__ == "__main__" and "<" not in obj.__qualname__:
            return NotImplemented  # interactive: a forked child resolves it by reference
        raise FunctionNotPicklable(
            f"cannot pickle {obj!r}: {obj.__module__}.{obj.__qualname__} cannot be imported by "
            f"name; to send lambdas, closures and interactive functions by value, install "
            f"cloudpickle: {CLOUDPICKLE_HINT}"
        )
    buf = io.BytesIO()
    pickler(buf, _PROTOCOL).dump(obj)
    return _rebuild_function, (buf.getvalue(),)


def _rebuild_function(blob: bytes) -> Any:
    try:
        return pickle.loads(blob)
    except ModuleNotFoundError as exc:
        if exc.name != "cloudpickle":
            raise
        raise ModuleNotFoundError(
            f"a function was sent by value with cloudpickle, which this process cannot import: "
            f"{CLOUDPICKLE_HINT}",
            name="cloudpickle",
        ) from exc


_cloud_pickler_cls: Any = None  # None: not looked for yet; False: not installed


def _cloud_pickler() -> Any:
    """cloudpickle's pickler with aioshm's reducers in its dispatch table, or None."""
    global _cloud_pickler_cls
    if _cloud_pickler_cls is None:
        try:
            import cloudpickle  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            _cloud_pickler_cls = False
            return None

        class CloudPickler(cloudpickle.Pickler):  # type: ignore[misc]
            dispatch_table = collections.ChainMap(  # noqa: RUF012 (never mutated)
                cloudpickle.Pickler.dispatch_table,
                ForkingPickler._extra_reducers,  # type: ignore[attr-defined]
            )

        _cloud_pickler_cls = CloudPickler
    return _cloud_pickler_cls or None


_interactive_for: tuple[object, bool] = (None, False)  # (the __main__ module, the answer)


def _interactive() -> bool:
    """Whether functions of ``__main__`` may come from outside a file a child can import (a
    REPL, ``-c``, stdin, a notebook) and cloudpickle could send them by value."""
    global _interactive_for
    main = sys.modules.get("__main__")
    if _interactive_for[0] is not main:
        answer = (
            main is not None
            and (getattr(main, "__file__", None) is None or "ipykernel" in sys.modules)
            and _cloud_pickler() is not None
        )
        _interactive_for = (main, answer)
    return _interactive_for[1]


#: Errors pickle raises for a function it cannot find by name (the C pickler says
#: "attribute lookup ... failed" with PicklingError, "Can't pickle local object" with
#: AttributeError): worth one more try with :func:`_reduce_function` in the pickler.
_BY_NAME_ERRORS: Final = (pickle.PicklingError, AttributeError)


class _ValuePickler(_Pickler):
    """:class:`_Pickler` that sends functions by value where needed. Not the default: a
    ``reducer_override`` is called for every non-builtin object and costs ~1.4 µs per small
    array, so it is used only to retry a pickle that failed, or in an interactive session."""

    def reducer_override(self, obj: Any) -> Any:
        return _reduce_function(obj)


class _ForkingValuePickler(ForkingPickler):
    """``ForkingPickler`` that sends functions by value where needed (see :class:`_ValuePickler`)."""

    def reducer_override(self, obj: Any) -> Any:
        return _reduce_function(obj)


def _pickle_by_value(obj: object) -> bytes:
    buf = io.BytesIO()
    _ValuePickler(buf, _PROTOCOL).dump(obj)
    return buf.getvalue()


_std_dumps: Final = ForkingPickler.dumps.__func__  # type: ignore[attr-defined]


def _forking_dumps(cls: Any, obj: Any, protocol: int | None = None) -> memoryview:
    """``ForkingPickler.dumps`` with the by-value retry (Note [Functions by value])."""
    if cls is not ForkingPickler:  # someone's subclass: theirs to decide
        return _std_dumps(cls, obj, protocol)  # type: ignore[no-any-return]
    if _interactive():
        return _std_dumps(_ForkingValuePickler, obj, protocol)  # type: ignore[no-any-return]
    try:
        return _std_dumps(cls, obj, protocol)  # type: ignore[no-any-return]
    except _BY_NAME_ERRORS:
        pass
    return _std_dumps(_ForkingValuePickler, obj, protocol)  # type: ignore[no-any-return]


def _forking_dump(obj: Any, file: Any, protocol: int | None = None) -> None:
    """``multiprocessing.reduction.dump`` (what spawn and the fork server pickle a process
    object with) through :func:`_forking_dumps`, so a failed attempt writes nothing."""
    file.write(ForkingPickler.dumps(obj, protocol))


_installed = False


def init_reductions() -> None:
    """Register aioshm's reducers with ``ForkingPickler`` (idempotent): ndarrays as handles,
    and the by-value retry for functions (Note [Functions by value])."""
    global _installed
    if _installed:
        return
    ForkingPickler.register(np.ndarray, reduce_ndarray)
    ForkingPickler.dumps = classmethod(_forking_dumps)  # type: ignore[method-assign,assignment]
    _mp_reduction.dump = _forking_dump
    _installed = True


# --------------------------------------------------------------------------- payloads


#: Exact types the C pickler writes itself (never through a reducer or the dispatch table).
_SCALARS: Final = frozenset((int, float, complex, str, bytes, bool, type(None)))
_plain_dumps = pickle.dumps
_PROTOCOL: Final = pickle.HIGHEST_PROTOCOL


def dumps(
    obj: object, copies: list[Any] | None = None
) -> tuple[bytes | bytearray | memoryview, list[int], list[bool]]:
    """Pickle ``obj`` with fds in-band: ``(payload, fds, owned)``.

    The payload is a plain ``ForkingPickler`` pickle when no fd is needed (byte-compatible with
    the stdlib), else an :class:`~aioshm._wire.FdHeader` followed by the pickle. The caller
    sends ``fds`` with the payload and then closes the ``owned`` ones. With ``copies`` (async
    senders), large value copies are not made here but appended as ``(dst, src)`` for the
    caller to make, in chunks, before sending.
    """
    # Scalars and short flat tuples of them: no reducer can be involved (the C pickler writes
    # these types itself, byte for byte as the shared pickler below would), so skip its setup.
    cls = type(obj)
    if cls is tuple and len(obj) <= 16:  # type: ignore[arg-type]
        for item in obj:  # type: ignore[attr-defined]
            if type(item) not in _SCALARS:
                break
        else:
            return _plain_dumps(obj, _PROTOCOL), [], []
    elif cls in _SCALARS:
        return _plain_dumps(obj, _PROTOCOL), [], []
    fds: list[int] = []
    owned: list[bool] = []
    st = _local.state
    prev = (st.out, st.owned, st.memo, st.copies)  # a reducer may pickle a message itself
    st.out, st.owned, st.memo, st.copies = fds, owned, {}, copies
    ncopies = len(copies) if copies is not None else 0
    retry: BaseException | None = None
    try:
        if _interactive():
            data = _pickle_by_value(obj)
        else:
            try:
                data = _pickle(obj, st)
            except _BY_NAME_ERRORS as exc:
                retry = exc  # maybe a function that can go by value: start the message over
                close_owned(fds, owned)
                del fds[:], owned[:]
                if copies is not None:
                    del copies[ncopies:]
                st.memo = {}
        if retry is not None:
            data = _pickle_by_value(obj)
    except BaseException:
        close_owned(fds, owned)
        raise
    finally:
        st.out, st.owned, st.memo, st.copies = prev
    if fds:
        return FdHeader(len(fds)).encode() + data, fds, owned
    return data, fds, owned


def close_owned(fds: list[int], owned: list[bool]) -> None:
    """Close the fds that :func:`dumps` created for a message (after sending or on failure)."""
    for fd, mine in zip(fds, owned, strict=True):
        if mine:
            try:
                os.close(fd)
            except OSError:
                pass


# Note [One owner per fd]
# ~~~~~~~~~~~~~~~~~~~~~~~
# Every fd that arrives with a message has exactly one owner at every moment, and only the
# owner may close it:
#
# 1. the receive path (``_fds_from_ancdata``, a connection's fd queue) until it hands the
#    message's fds to a decoder: :func:`loads`, :func:`loads_pickle`, or a channel's
#    ``decode``. If it never does (a frame read as raw bytes, a rejected frame, a connection
#    closed mid-frame) it closes them itself;
# 2. from the moment a decoder is *called*, the decoder owns all of them, on success and on
#    failure alike. The caller forgets the list; it never closes an fd of it again, not even
#    in an ``except`` block, because by then the decoder may have given it away;
# 3. inside the decoder, :func:`take_fd` gives an fd to exactly one new owner (a segment, a
#    connection, a queue) and leaves a duplicate or None in its place; the decoder closes
#    what is left in its ``finally``.
#
# An fd closed by two owners closes, the second time, whatever unrelated file has meanwhile
# been given that number.


def loads(data: bytes | bytearray | memoryview, fds: list[int]) -> Any:
    """Unpickle a payload made by :func:`dumps`, adopting ``fds`` (see Note [One owner per
    fd]): all of them are consumed or closed, whatever happens. A spilled-record header is a
    ``ProtocolError`` here (only queues spill, and they unspill first)."""
    if not fds and isinstance(data, bytes) and data and not data.startswith(FD_MAGIC):
        return ForkingPickler.loads(data)  # the common case: a plain pickle
    try:
        _, body = FdHeader.split(data, fds=len(fds), spill=False)
    except BaseException:
        _close_fds(fds)
        raise
    return loads_pickle(body, fds)


def loads_pickle(body: bytes | bytearray | memoryview, fds: list[int]) -> Any:
    """Unpickle a bare pickle whose fd references index ``fds`` (adopted: consumed or closed,
    whatever happens; see Note [One owner per fd])."""
    incoming: list[int | None] = list(fds)
    st = _local.state
    prev = st.incoming
    st.incoming = incoming
    try:
        return ForkingPickler.loads(body)
    finally:
        st.incoming = prev
        for fd in incoming:
            if fd is not None:
                os.close(fd)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
