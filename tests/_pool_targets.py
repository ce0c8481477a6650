"""Importable task functions for ``test_pool.py`` (workers import this module by name).

Tasks that must tell the parent something (their pid, that they started) write a line to a
FIFO the parent made and keeps open read-write (so opening it never blocks either side).
Tasks that must wait for the parent block reading a "gate" FIFO until the parent writes to it.
None of them synchronises by sleeping; a few sleep only to be *slow*.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import threading
import time
from typing import Any

import numpy as np

import aioshm

# -------------------------------------------------------------------------- plain tasks


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def power(base: int, exp: int = 2, *, mod: int | None = None) -> int:
    return pow(base, exp, mod)


def getpid(_: object = None) -> int:
    return os.getpid()


def slow_square(x: int, seconds: float = 0.05) -> int:
    time.sleep(seconds)
    return x * x


# -------------------------------------------------------------------------- FIFO signalling


def tell(fifo: str, text: str) -> None:
    """Write one line to ``fifo`` (atomic: shorter than PIPE_BUF)."""
    fd = os.open(fifo, os.O_WRONLY)
    try:
        os.write(fd, f"{text}\n".encode())
    finally:
        os.close(fd)


def wait_gate(gate: str) -> None:
    """Block until the parent writes a byte to ``gate``."""
    fd = os.open(gate, os.O_RDONLY)
    try:
        os.read(fd, 1)
    finally:
        os.close(fd)


def announce_and_block(fifo: str) -> int:
    """Report our pid, then block forever (until killed)."""
    tell(fifo, str(os.getpid()))
    while True:
        time.sleep(3600)


def announce_and_wait(fifo: str, gate: str, value: Any = None) -> Any:
    """Report our pid, wait for the gate, report ``done <pid>``, return ``value``."""
    tell(fifo, str(os.getpid()))
    wait_gate(gate)
    tell(fifo, f"done {os.getpid()}")
    return value


def stamp(fifo: str, tag: str, gate: str | None = None, seconds: float = 0.0) -> str:
    """Report ``start <tag>``, be slow (or wait for ``gate``), report ``end <tag>``."""
    tell(fifo, f"start {tag}")
    if gate is not None:
        wait_gate(gate)
    if seconds:
        time.sleep(seconds)
    tell(fifo, f"end {tag}")
    return tag


# -------------------------------------------------------------------------- dying


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def segfault() -> None:
    import faulthandler

    faulthandler.disable()  # a quiet crash
    ctypes.string_at(0)


def exit7() -> None:
    os._exit(7)


DEATHS = {"sigkill": kill_self, "segfault": segfault, "exit7": exit7}


def die_on(x: int, doomed: int, how: str = "sigkill") -> int:
    """``x * x``, except that the task for ``doomed`` kills its own worker."""
    if x == doomed:
        DEATHS[how]()
    return x * x


def chaos(x: int, doomed: frozenset[int]) -> int:
    """``x * x``, or SIGKILL of the own worker if ``x`` is in ``doomed``."""
    if x in doomed:
        kill_self()
    if random.random() < 0.3:
        time.sleep(0.001)  # vary the timing a little
    return x * x


# -------------------------------------------------------------------------- raising


class CustomError(Exception):
    """Carries an attribute; pickles through ``__reduce__``."""

    def __init__(self, msg: str, code: int) -> None:
        super().__init__(msg, code)
        self.code = code


class UnpicklableError(Exception):
    """Cannot be pickled: it carries a lock."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.lock = threading.Lock()


def raise_value_error(msg: str) -> None:
    raise ValueError(msg)


def raise_value_error_if_neg(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x


def raise_custom(msg: str, code: int) -> None:
    raise CustomError(msg, code)


def raise_unpicklable(msg: str) -> None:
    raise UnpicklableError(msg)


def raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def return_lock() -> Any:
    return threading.Lock()


def _explode_on_load() -> None:
    raise RuntimeError("this argument cannot be rebuilt in the worker")


class BadOnLoad:
    """Pickles fine; fails to unpickle (in the worker)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_explode_on_load, ())


def identity(x: Any) -> Any:
    return x


# -------------------------------------------------------------------------- initializer

_INIT_TAG: str | None = None


def init_worker(tag: str) -> None:
    global _INIT_TAG
    _INIT_TAG = tag


def init_tag(_: object = None) -> tuple[int, str | None]:
    return os.getpid(), _INIT_TAG


# -------------------------------------------------------------------------- shared arrays


def mutate_and_make(a: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Add 1 in place to ``a``; return a new shared array, a big plain one, and whether ``a``
    arrived as shared memory."""
    a += 1
    made = aioshm.full(n, 7.0)
    big = np.arange(n, dtype=np.float64)  # >= the share threshold: travels as a handle
    return made, big, aioshm.is_shared(a)


def segment_report(_: object = None) -> tuple[int, int, int]:
    """``(pid, mapped segments, segments with live views)`` in this worker."""
    from aioshm import _shm

    segs = _shm.live_segments()
    return os.getpid(), len(segs), sum(1 for s in segs if s.has_views())


def sum_array(a: np.ndarray) -> float:
    return float(a.sum())


def segment_of(a: np.ndarray) -> tuple[int, tuple[int, int], int, int]:
    """``(pid, segment key, id of the Segment object, its address)`` of a received array."""
    base: Any = a
    while not hasattr(base, "segment"):
        base = base.base
    seg = base.segment
    return os.getpid(), seg.key, id(seg), seg.address


def mapped_keys(_: object = None) -> list[tuple[int, int]]:
    """The keys of every segment this worker maps (in use or retained)."""
    from aioshm import _shm

    return [s.key for s in _shm.live_segments()]


# -------------------------------------------------------------------------- start-up failures


def failing_initializer(fifo: str) -> None:
    """A pool ``initializer`` that reports its pid, then raises."""
    tell(fifo, str(os.getpid()))
    raise ValueError("this initializer always fails")
