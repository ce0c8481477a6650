"""ndarrays on shared segments: construction, recognition and validated reconstruction."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from .._exceptions import InvalidHandle
from ._segment import SegmentBuffer, create

__all__ = (
    "MAX_NDIM",
    "MAX_VIEW_BYTES",
    "empty",
    "empty_like",
    "full",
    "full_like",
    "is_shared",
    "ones",
    "ones_like",
    "segment_buffer_of",
    "share",
    "view_on",
    "zeros",
    "zeros_like",
)

MAX_NDIM: Final = 64
#: Largest logical size (shape × itemsize) a received view may claim: 256 GiB. Zero strides
#: let a tiny segment pose as a terabyte array, and a later ``.copy()`` would try to allocate
#: it. Why not the segment's size (Note [Logical size]): views legitimately claim more.
MAX_VIEW_BYTES: Final = 1 << 38

# Note [Logical size]
# ~~~~~~~~~~~~~~~~~~~
# Every *byte* a received view reaches is checked against the segment (view_on), so no view
# reads or writes outside it. Its *logical* size (shape × itemsize) is bounded only by
# MAX_VIEW_BYTES, not by the segment: numpy's own views of a shared array exceed it whenever
# strides repeat memory -- ``np.broadcast_to`` (zero strides) and
# ``sliding_window_view`` (overlapping strides) -- and aioshm sends those as handles, as torch
# sends expanded tensors. Receiving such a view allocates nothing; only a copy (``.copy()``,
# arithmetic) allocates its logical size, exactly as it would in the sender. A tighter bound
# would buy no safety either: the handle arrives inside a pickle, and a peer that can make a
# process unpickle can make it allocate anything (a pickle may call any function).

ShapeLike = int | Sequence[int]


def segment_buffer_of(a: np.ndarray) -> SegmentBuffer | None:
    """The :class:`SegmentBuffer` under ``a`` (walking its ``base`` chain), or None."""
    base: Any = a
    for _ in range(64):
        base = getattr(base, "base", None)
        if base is None:
            return None
        if isinstance(base, SegmentBuffer):
            return base
    return None


def is_shared(a: Any) -> bool:
    """True if ``a`` is an ndarray (or a view of one) backed by an aioshm segment."""
    return isinstance(a, np.ndarray) and segment_buffer_of(a) is not None


def _alloc(
    shape: ShapeLike, dtype: npt.DTypeLike | None, order: Literal["C", "F"] | str
) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(f"cannot put dtype {dt} in shared memory: it holds Python objects")
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', not {order!r}")
    shp = (shape,) if isinstance(shape, int | np.integer) else tuple(int(n) for n in shape)
    if any(n < 0 for n in shp):
        raise ValueError(f"negative dimensions are not allowed: {shp}")
    nbytes = math.prod(shp) * dt.itemsize
    buf = create(nbytes)
    root = np.asarray(buf)
    return np.ndarray(shp, dt, buffer=root, order="F" if order == "F" else "C")


def empty(shape: ShapeLike, dtype: npt.DTypeLike = float, order: str = "C") -> np.ndarray:
    """A new uninitialised (in practice zero-filled) array in shared memory."""
    return _alloc(shape, dtype, order)


def zeros(shape: ShapeLike, dtype: npt.DTypeLike = float, order: str = "C") -> np.ndarray:
    """A new array of zeros in shared memory (fresh segments are zero-filled by the kernel)."""
    return _alloc(shape, dtype, order)


def ones(shape: ShapeLike, dtype: npt.DTypeLike = float, order: str = "C") -> np.ndarray:
    """A new array of ones in shared memory."""
    return full(shape, 1, dtype, order)


def full(
    shape: ShapeLike, fill_value: Any, dtype: npt.DTypeLike | None = None, order: str = "C"
) -> np.ndarray:
    """A new array filled with ``fill_value`` in shared memory."""
    if dtype is None:
        dtype = np.asarray(fill_value).dtype
    a = _alloc(shape, dtype, order)
    a[...] = fill_value
    return a


def _like_order(proto: np.ndarray, order: str) -> str:
    if order == "K":
        return "F" if proto.flags.f_contiguous and not proto.flags.c_contiguous else "C"
    if order == "A":
        return "F" if proto.flags.f_contiguous else "C"
    return order


def empty_like(
    prototype: npt.ArrayLike,
    dtype: npt.DTypeLike | None = None,
    order: str = "K",
    shape: ShapeLike | None = None,
) -> np.ndarray:
    """Like :func:`numpy.empty_like`, in shared memory."""
    p = np.asarray(prototype)
    return _alloc(p.shape if shape is None else shape, dtype or p.dtype, _like_order(p, order))


def zeros_like(
    prototype: npt.ArrayLike,
    dtype: npt.DTypeLike | None = None,
    order: str = "K",
    shape: ShapeLike | None = None,
) -> np.ndarray:
    """Like :func:`numpy.zeros_like`, in shared memory."""
    return empty_like(prototype, dtype, order, shape)


def ones_like(
    prototype: npt.ArrayLike,
    dtype: npt.DTypeLike | None = None,
    order: str = "K",
    shape: ShapeLike | None = None,
) -> np.ndarray:
    """Like :func:`numpy.ones_like`, in shared memory."""
    return full_like(prototype, 1, dtype, order, shape)


def full_like(
    prototype: npt.ArrayLike,
    fill_value: Any,
    dtype: npt.DTypeLike | None = None,
    order: str = "K",
    shape: ShapeLike | None = None,
) -> np.ndarray:
    """Like :func:`numpy.full_like`, in shared memory."""
    a = empty_like(prototype, dtype, order, shape)
    a[...] = fill_value
    return a


def share(a: npt.ArrayLike) -> np.ndarray:
    """``a`` backed by shared memory: ``a`` itself if it already is, else a shared copy.

    The copy keeps shape, dtype, values and memory order (C or Fortran).

    :raises TypeError: for object dtypes, which cannot live in shared memory.
    """
    if isinstance(a, np.ndarray) and is_shared(a):
        return a
    src = np.asarray(a)
    out = empty_like(src, order="K")
    np.copyto(out, src)
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        out.flags.writeable = False
    return out


def copy_into_pool(a: np.ndarray, *, copy: bool = True) -> np.ndarray:
    """A copy of ``a`` in a recycled (pooled) segment; used by the reducers for value sends.

    With ``copy=False`` the array is only allocated (same shape, dtype and order)."""
    buf = create(a.nbytes, pooled=True)
    order: Literal["C", "F"] = "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"
    out: np.ndarray = np.ndarray(a.shape, a.dtype, buffer=np.asarray(buf), order=order)
    if copy:
        np.copyto(out, a, casting="no")
    return out


def _check_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidHandle(f"{what} must be an integer, got {value!r}")
    return int(value)


def view_on(
    buf: SegmentBuffer,
    offset: int,
    shape: Sequence[int],
    strides: Sequence[int],
    dtype: Any,
    readonly: bool,
) -> np.ndarray:
    """The ndarray a handle describes, after checking it fits inside the segment.

    Everything comes from an untrusted peer; the segment size comes from ``fstat`` of the
    segment itself. Rejected with :class:`~aioshm.InvalidHandle`: object or unknown dtypes,
    zero itemsize, more than 64 dimensions, negative dimensions or offsets, a stride larger
    than the segment, any byte of the view outside the segment, and logical sizes above
    :data:`MAX_VIEW_BYTES` (a logical size above the segment's is legal: broadcast and
    sliding-window views repeat memory; see Note [Logical size]).
    """
    size = buf.segment.size
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise InvalidHandle(f"invalid dtype in array handle: {dtype!r}") from exc
    if dt.hasobject:
        raise InvalidHandle(f"array handle with object dtype {dt} rejected")
    itemsize = dt.itemsize
    if itemsize <= 0:
        raise InvalidHandle(f"array handle with zero itemsize ({dt})")
    if not isinstance(shape, tuple | list) or not isinstance(strides, tuple | list):
        raise InvalidHandle("array handle shape and strides must be sequences")
    ndim = len(shape)
    if ndim + dt.ndim > MAX_NDIM or len(strides) != ndim:
        raise InvalidHandle(
            f"array handle with {ndim} dims (dtype adds {dt.ndim}) and {len(strides)} strides"
        )
    dims = [_check_int(n, "shape") for n in shape]
    steps = [_check_int(s, "stride") for s in strides]
    off = _check_int(offset, "offset")
    if any(n < 0 for n in dims):
        raise InvalidHandle(f"negative dimension in array handle: {dims}")
    if off < 0 or off > size:
        raise InvalidHandle(f"array offset {off} outside a {size}-byte segment")
    if any(abs(s) > size for s in steps):
        raise InvalidHandle(f"array stride larger than the {size}-byte segment: {steps}")
    # the size limit applies to every dimension, even when another one is zero
    if math.prod(max(n, 1) for n in dims) * itemsize > MAX_VIEW_BYTES:
        raise InvalidHandle(f"array handle claims more than {MAX_VIEW_BYTES} bytes")
    count = math.prod(dims)
    if count:
        lo = off + sum(min(0, (n - 1) * s) for n, s in zip(dims, steps, strict=True))
        hi = off + sum(max(0, (n - 1) * s) for n, s in zip(dims, steps, strict=True)) + itemsize
        if lo < 0 or hi > size:
            raise InvalidHandle(f"array view [{lo}, {hi}) does not fit in the {size}-byte segment")
    root = np.asarray(buf)
    try:
        if count == 0:
            out = np.ndarray(tuple(dims), dt, buffer=root, offset=0)
        else:
            out = np.ndarray(tuple(dims), dt, buffer=root, offset=off, strides=tuple(steps))
    except (ValueError, OverflowError, TypeError) as exc:  # numpy's own checks, as a backstop
        raise InvalidHandle(f"invalid array handle: {exc}") from exc
    if readonly:
        out.flags.writeable = False
    return out
