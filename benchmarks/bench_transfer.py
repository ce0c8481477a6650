"""W1: hand a big float32 array to an already-running child and get a float back.

The child reads one value per 4 KiB page (``a.reshape(-1)[::1024].sum()``) and replies with
the sum. Every implementation runs in this one interpreter, one after another, each with its own
freshly started forkserver child; process start and warm-up are outside the timed region, and
the timed region is one round trip: from just before the parent sends to just after it has the
reply. Compare only ratios taken in one run (see /work/shared/BASELINE.md, W1).

Implementations (rows of the table):

* ``aioshm shared``: aioshm Queue, the array is ``share()``-d once and the same shared array
  is sent every time (the child keeps the last array it received until the next one arrives,
  as a plain ``while True: a = q.get()`` loop does);
* ``aioshm shared, child drops``: the same, but the child drops its view before replying;
* ``aioshm non-shared``: aioshm Queue, a private (non-shared) array, one element changed per
  send so every send is a value send; the transport copies it into a recycled segment;
* ``aioshm non-shared, child drops``: the same, the child drops its view before replying;
* ``stdlib Queue (pickle)``: ``multiprocessing.Queue`` from the stdlib, the array pickled
  (aioshm's ndarray reducer is switched off for this row);
* ``SharedMemory by name (b1)``: a ``multiprocessing.shared_memory`` block filled once; only
  its name goes over a stdlib Pipe; the child attaches, builds the ndarray, touches, closes;
* ``SharedMemory reused + copy (b3)``: the same block, ``np.copyto`` into it before each send;
* floors in this process: ``np.copyto`` into a warm buffer, ``a.copy()``, the page touch.

Besides, for each size it measures the *first* send of a freshly shared array (a segment the
child has never mapped) against the *second* send of that same array.

Usage::

    .venv/bin/python benchmarks/bench_transfer.py            # 1, 64 and 512 MiB
    .venv/bin/python benchmarks/bench_transfer.py --quick    # 1 and 64 MiB, fewer repeats
    .venv/bin/python benchmarks/bench_transfer.py --sizes 64 512 --only aioshm

Targets are printed with PASS/FAIL; the exit status is 0 whatever the timings.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing as stdmp
import os
import queue
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing import shared_memory
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
from _bench_report import verdict

import aioshm as _aioshm_top
import aioshm.multiprocessing as amp
from aioshm import _shm
from aioshm._exceptions import AioshmError

# prefer the top-level API where it exists
share: Callable[[Any], np.ndarray] = getattr(_aioshm_top, "share", _shm.share)
trim: Callable[[], None] = getattr(_aioshm_top, "trim", _shm.trim)

MiB = 1 << 20
START_METHOD = "forkserver"
TIMEOUT = 300.0  # seconds to wait for any single reply before giving up on a row

# what this run created, so that the leak check ignores other programs' segments
MY_PIDS: set[int] = {os.getpid()}
MY_SHM_NAMES: set[str] = set()

# what a failing row may raise; it is reported in the table and the other rows still run
ROW_ERRORS = (AioshmError, OSError, ValueError, RuntimeError, AssertionError, queue.Empty)


def touch(a: np.ndarray) -> float:
    """Read one float32 per 4 KiB page."""
    return float(a.reshape(-1)[::1024].sum())


# --------------------------------------------------------------------------- children


def queue_child(inq: Any, outq: Any, hold: bool) -> None:
    """Reply to every array with its page-touch sum; ``"drop"`` frees it; ``"stop"`` exits."""
    item: Any = None
    while True:
        item = inq.get()
        if isinstance(item, str):
            if item == "stop":
                break
            item = None  # "drop": forget the last array outside the timed region
            outq.put(0.0)
            continue
        r = touch(item)
        if not hold:
            item = None
        outq.put(r)
    item = None


def shm_child(conn: Any) -> None:
    """Attach to a SharedMemory block by name, touch it, close it, reply (stdlib peer b1)."""
    while True:
        msg = conn.recv()
        if msg is None:
            break
        name, count = msg
        shm = shared_memory.SharedMemory(name=name)
        a = np.ndarray((count,), np.float32, buffer=shm.buf)
        r = touch(a)
        del a
        shm.close()
        conn.send(r)
    conn.close()


# --------------------------------------------------------------------------- helpers


class Row:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ms: dict[int, float] = {}
        self.n: dict[int, int] = {}
        self.err: dict[int, str] = {}


def repeats(size_mib: int, quick: bool) -> tuple[int, int]:
    """(warm-ups, timed) for one size."""
    if quick:
        return (2, 5)
    if size_mib >= 256:
        return (2, 5)
    if size_mib >= 32:
        return (3, 10)
    return (5, 30)


def time_loop(fn: Callable[[int], None], warm: int, timed: int) -> list[float]:
    for i in range(warm):
        fn(i)
    out = []
    for i in range(timed):
        t0 = time.perf_counter()
        fn(warm + i)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def make_source(size_mib: int) -> np.ndarray:
    count = size_mib * MiB // 4
    a = np.arange(count, dtype=np.float32)
    a *= 1e-6
    return a


def _stop_process(p: Any) -> None:
    p.join(10)
    if p.is_alive():
        p.terminate()
        p.join(5)
    if p.is_alive():
        p.kill()
        p.join(5)
    with contextlib.suppress(Exception):
        p.close()


@contextlib.contextmanager
def stdlib_pickling() -> Iterator[None]:
    """Switch aioshm's ndarray reducer off in this process, so the stdlib pickles arrays."""
    reducers = ForkingPickler._extra_reducers
    saved = reducers.pop(np.ndarray, None)
    try:
        probe = np.zeros(64 * 1024, np.float32)
        assert len(ForkingPickler.dumps(probe)) >= probe.nbytes, "reducer still active"
        yield
    finally:
        if saved is not None:
            reducers[np.ndarray] = saved


@contextlib.contextmanager
def aioshm_child(hold: bool) -> Iterator[Callable[[Any], float]]:
    """An aioshm-Queue child; yields ``rt(item) -> reply``."""
    ctx = amp.get_context(START_METHOD)
    inq, outq = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=queue_child, args=(inq, outq, hold), daemon=True)
    p.start()
    MY_PIDS.add(p.pid)
    try:

        def rt(item: Any) -> float:
            inq.put(item)
            return outq.get(timeout=TIMEOUT)  # type: ignore[no-any-return]

        rt(np.zeros(16, np.float32))  # the child is up and has imported everything
        yield rt
        inq.put("stop")
    finally:
        _stop_process(p)
        inq.close()
        outq.close()


@contextlib.contextmanager
def stdlib_queue_child() -> Iterator[Callable[[Any], float]]:
    ctx = stdmp.get_context(START_METHOD)
    inq, outq = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=queue_child, args=(inq, outq, False), daemon=True)
    p.start()
    MY_PIDS.add(p.pid)
    ok = False
    try:

        def rt(item: Any) -> float:
            inq.put(item)
            return outq.get(timeout=TIMEOUT)  # type: ignore[no-any-return]

        rt(np.zeros(16, np.float32))
        yield rt
        inq.put("stop")
        ok = True
    finally:
        if not ok:
            inq.cancel_join_thread()
            outq.cancel_join_thread()
        _stop_process(p)
        inq.close()
        outq.close()
        inq.join_thread()
        outq.join_thread()


@contextlib.contextmanager
def shm_pipe_child() -> Iterator[Any]:
    ctx = stdmp.get_context(START_METHOD)
    parent, child = ctx.Pipe()
    p = ctx.Process(target=shm_child, args=(child,), daemon=True)
    p.start()
    MY_PIDS.add(p.pid)
    child.close()
    try:
        yield parent
        parent.send(None)
    finally:
        _stop_process(p)
        parent.close()


# --------------------------------------------------------------------------- implementations


def bench_aioshm_shared(size: int, quick: bool, hold: bool) -> list[float]:
    sa = share(make_source(size))
    warm, timed = repeats(size, quick)
    try:
        with aioshm_child(hold) as rt:
            expect = touch(sa)

            def once(_: int) -> None:
                assert rt(sa) == expect

            return time_loop(once, warm, timed)
    finally:
        gc.collect()


#: size -> per-iteration (round trip / np.copyto into a warm buffer), timed back to back
PAIRED_COPY: dict[int, list[float]] = {}


def bench_aioshm_value(size: int, quick: bool, hold: bool) -> list[float]:
    src = make_source(size)
    warm, timed = repeats(size, quick)
    dst = np.empty_like(src) if hold else None
    if dst is not None:
        np.copyto(dst, src)
    ratios: list[float] = []
    try:
        with aioshm_child(hold) as rt:

            def once(i: int) -> None:
                src[0] = float(i)  # a value send: the content differs every time
                r = rt(src)
                if i == 0:  # a warm-up: check the child saw this very content
                    assert r == touch(src)

            samples = time_loop(once, warm, timed)
            if dst is not None:
                # the same loop again, each round trip followed by the in-process floor, so
                # that the ratio is immune to load drifting between rows on a shared machine
                for i in range(timed):
                    t0 = time.perf_counter()
                    once(warm + timed + i)
                    t1 = time.perf_counter()
                    np.copyto(dst, src)
                    t2 = time.perf_counter()
                    ratios.append((t1 - t0) / (t2 - t1))
                PAIRED_COPY[size] = ratios
            return samples
    finally:
        dst = None
        gc.collect()


def bench_stdlib_queue(size: int, quick: bool) -> list[float]:
    src = make_source(size)
    warm, timed = repeats(size, quick)
    try:
        with stdlib_pickling(), stdlib_queue_child() as rt:
            expect = touch(src)

            def once(_: int) -> None:
                assert rt(src) == expect

            return time_loop(once, warm, timed)
    finally:
        gc.collect()


def bench_shm_name(size: int, quick: bool, copy_each: bool) -> list[float]:
    src = make_source(size)
    warm, timed = repeats(size, quick)
    shm = shared_memory.SharedMemory(create=True, size=src.nbytes)
    MY_SHM_NAMES.add(shm.name.lstrip("/"))
    try:
        block = np.ndarray(src.shape, src.dtype, buffer=shm.buf)
        np.copyto(block, src)
        expect = touch(src)
        with shm_pipe_child() as conn:

            def once(_: int) -> None:
                if copy_each:
                    np.copyto(block, src)
                conn.send((shm.name, src.size))
                assert conn.recv() == expect

            return time_loop(once, warm, timed)
    finally:
        block = None  # the exported buffer must go before close()
        gc.collect()
        shm.close()
        shm.unlink()


def bench_floor(size: int, quick: bool, what: str) -> list[float]:
    src = make_source(size)
    warm, timed = repeats(size, quick)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    try:
        if what == "copyto":
            return time_loop(lambda _: np.copyto(dst, src), warm, timed)
        if what == "copy":
            return time_loop(lambda _: src.copy(), warm, timed)
        return time_loop(lambda _: touch(src), warm, timed)
    finally:
        gc.collect()


def bench_first_vs_second(size: int, quick: bool) -> tuple[list[float], list[float]]:
    """First send of a freshly shared array (never mapped by the child) vs its second send."""
    trials = 5 if (quick or size >= 256) else 8
    src = make_source(size)
    expect = touch(src)
    first: list[float] = []
    second: list[float] = []
    try:
        with aioshm_child(True) as rt:
            warm = share(src)  # warm the code paths on a segment we then throw away
            rt(warm)
            rt(warm)
            del warm
            for _ in range(trials):
                rt("drop")  # the child forgets the previous array, outside the timed region
                gc.collect()
                trim()
                fresh = share(src)  # a new segment: the child has never mapped it
                for out in (first, second):
                    t0 = time.perf_counter()
                    r = rt(fresh)
                    out.append((time.perf_counter() - t0) * 1e3)
                    assert r == expect
                del fresh
            rt("drop")
        return first, second
    finally:
        gc.collect()


IMPLS: list[tuple[str, str, Callable[[int, bool], list[float]]]] = [
    ("shared", "aioshm Queue, shared once", lambda s, q: bench_aioshm_shared(s, q, True)),
    (
        "shared_drop",
        "aioshm Queue, shared, child drops",
        lambda s, q: bench_aioshm_shared(s, q, False),
    ),
    ("value", "aioshm Queue, non-shared", lambda s, q: bench_aioshm_value(s, q, True)),
    (
        "value_drop",
        "aioshm Queue, non-shared, child drops",
        lambda s, q: bench_aioshm_value(s, q, False),
    ),
    ("stdlib_queue", "stdlib mp.Queue (pickle)", bench_stdlib_queue),
    ("b1", "SharedMemory by name (b1)", lambda s, q: bench_shm_name(s, q, False)),
    ("b3", "SharedMemory reused + copy (b3)", lambda s, q: bench_shm_name(s, q, True)),
    ("floor_copyto", "floor: np.copyto warm buffer", lambda s, q: bench_floor(s, q, "copyto")),
    ("floor_copy", "floor: a.copy()", lambda s, q: bench_floor(s, q, "copy")),
    ("floor_touch", "floor: page touch", lambda s, q: bench_floor(s, q, "touch")),
]


# --------------------------------------------------------------------------- report


def shm_entries() -> set[str]:
    """``aioshm*`` entries created by this run's processes, and this run's ``psm_*`` blocks."""
    try:
        entries = os.listdir("/dev/shm")
    except FileNotFoundError:
        return set()
    mine = set()
    for e in entries:
        if e.startswith("aioshm_"):
            pid = e.split("_")[1]
            if pid.isdigit() and int(pid) in MY_PIDS:
                mine.add(e)
        elif e in MY_SHM_NAMES:
            mine.add(e)
    return mine


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 and 64 MiB, fewer repeats")
    ap.add_argument("--sizes", type=int, nargs="+", metavar="MiB", help="array sizes in MiB")
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="KEY",
        help="run only these rows (keys: " + ", ".join(k for k, _, _ in IMPLS) + ", first)",
    )
    args = ap.parse_args(argv)
    sizes = args.sizes or ([1, 64] if args.quick else [1, 64, 512])
    only = set(args.only) if args.only else None
    amp.set_start_method(START_METHOD, force=True)

    before = shm_entries()
    rows: dict[str, Row] = {}
    fvs: dict[int, tuple[float, float]] = {}
    print(
        f"W1 transfer, {START_METHOD} children, sizes {sizes} MiB, "
        f"numpy {np.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    try:
        for key, label, fn in IMPLS:
            if only is not None and key not in only:
                continue
            row = rows[key] = Row(label)
            for size in sizes:
                try:
                    samples = fn(size, args.quick)
                except ROW_ERRORS as exc:  # a broken row must not hide the others
                    row.err[size] = f"{type(exc).__name__}: {exc}"
                    print(f"  {label:40s} {size:4d} MiB  ERROR {row.err[size]}", flush=True)
                    continue
                finally:
                    gc.collect()
                    trim()
                row.ms[size] = statistics.median(samples)
                row.n[size] = len(samples)
                print(
                    f"  {label:40s} {size:4d} MiB  median {fmt_ms(row.ms[size]):>8s} ms"
                    f"  (min {fmt_ms(min(samples))}, n={len(samples)})",
                    flush=True,
                )
                gc.collect()
        if only is None or "first" in only:
            for size in sizes:
                try:
                    first, second = bench_first_vs_second(size, args.quick)
                except ROW_ERRORS as exc:
                    print(f"  first/second send {size} MiB  ERROR {type(exc).__name__}: {exc}")
                    continue
                fvs[size] = (statistics.median(first), statistics.median(second))
                print(
                    f"  {'aioshm shared: 1st / 2nd send':40s} {size:4d} MiB  "
                    f"{fmt_ms(fvs[size][0])} / {fmt_ms(fvs[size][1])} ms  (n={len(first)})",
                    flush=True,
                )
    finally:
        gc.collect()
        trim()

    # ---- table
    print()
    head = f"| {'implementation':40s} | " + " | ".join(f"{s:>7d} MiB" for s in sizes) + " |"
    print(head)
    print("|" + "-" * 42 + "|" + "|".join("-" * 13 for _ in sizes) + "|")
    for row in rows.values():
        cells = ["ERROR" if s in row.err else fmt_ms(row.ms.get(s)) for s in sizes]
        print(f"| {row.name:40s} | " + " | ".join(f"{c:>11s}" for c in cells) + " |")
    if fvs:
        cells = [f"{fmt_ms(fvs[s][0])}/{fmt_ms(fvs[s][1])}" if s in fvs else "-" for s in sizes]
        print(
            f"| {'aioshm shared: 1st/2nd send':40s} | "
            + " | ".join(f"{c:>11s}" for c in cells)
            + " |"
        )
    print("(median ms per round trip; floors are one in-process operation)")

    # ---- ratios
    def ms(key: str, size: int) -> float | None:
        row = rows.get(key)
        return None if row is None else row.ms.get(size)

    print("\nRatios (lower is better unless said otherwise):")
    big = max(sizes)
    for size in sizes:
        a, b = ms("shared", size), ms("b1", size)
        if a and b:
            tag = verdict(a / b <= 1.0) + " (target <= 1.0x)" if size == big else "(info)"
            print(f"  already-shared vs SharedMemory by name, {size} MiB: {a / b:.2f}x  {tag}")
    for size in sizes:
        if size in fvs:
            f, s = fvs[size]
            tag = verdict(s / f <= 0.2) + " (target <= 0.2x)" if size == big else "(info)"
            print(f"  2nd send vs 1st send of a shared array, {size} MiB: {s / f:.3f}x  {tag}")
    for size in sizes:
        a, c = ms("value", size), ms("floor_copyto", size)
        if a and c:
            tag = verdict(a / c <= 1.5) + " (target <= 1.5x)" if size == big else "(info)"
            print(
                f"  non-shared vs in-process copy into a warm buffer, {size} MiB: {a / c:.2f}x  {tag}"
            )
    for size in sizes:
        if size in PAIRED_COPY:
            r = statistics.median(PAIRED_COPY[size])
            tag = verdict(r <= 1.5) + " (target <= 1.5x)" if size == big else "(info)"
            print(
                f"  non-shared vs copy into a warm buffer, paired back to back, {size} MiB: "
                f"{r:.2f}x  {tag}"
            )
    for size in sizes:
        a, q = ms("value", size), ms("stdlib_queue", size)
        if a and q:
            tag = verdict(q / a >= 30) + " (target >= 30x)" if size == big else "(info)"
            print(f"  stdlib Queue / non-shared (speed-up), {size} MiB: {q / a:.1f}x  {tag}")
    for size in sizes:
        a, q, b1, b3 = (ms(k, size) for k in ("shared", "stdlib_queue", "b1", "b3"))
        if a and q:
            extra = f", b1 {q / b1:.1f}x" if b1 else ""
            extra += f", b3 {q / b3:.1f}x" if b3 else ""
            print(f"  speed-up over stdlib Queue, {size} MiB: shared {q / a:.1f}x{extra}")

    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(
            f"\nNOTE: load average {load:.1f} on {os.cpu_count()} CPUs: other processes competed "
            "for the CPUs and memory bandwidth; the round trips (two processes, two wake-ups) "
            "suffer more from that than the in-process floors."
        )
    time.sleep(0.2)
    left = shm_entries() - before
    if left:
        print(f"\nWARNING: left behind in /dev/shm: {sorted(left)}")
    else:
        print("\n/dev/shm: this run left no aioshm* or psm_* entries behind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
