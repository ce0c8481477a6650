"""W4: a 1 ms ticker's lag while the event loop awaits 64 MiB round trips to a running child.

A ticker task runs for the whole script: ``t = perf_counter(); await asyncio.sleep(0.001)``,
and its lag is how much later than 1 ms it resumes. For each row, for a fixed window, another
task of the same loop sends a 64 MiB float32 array to an already-running child (forkserver)
and awaits the reply, over and over; the child reads one value per 4 KiB page and replies with
the sum. Only the ticks inside the window count. Every row has its own child, started (and
warmed up) before the first window; windows are interleaved (run 1 of every row, then run 2,
...), and each figure is the median over the runs of that run's p99 or worst lag.

Rows:

* ``idle``: the loop only sleeps (the ticker alone);
* ``busy``: a control with no transfer: a child touches its own 64 MiB array for 10 ms per
  "round trip" while the loop just awaits its 1-byte reply (what a busy child alone does to
  the ticker on this machine);
* ``floor``: the least any library can do: the array already sits in a memfd, its fd goes out
  in a 1-byte ``sendmsg`` (SCM_RIGHTS) on a raw socketpair, the child maps each file once and
  replies with 8 bytes, read by a permanent ``loop.add_reader`` callback (no pickling, no
  per-message ticket or lock);
* ``aioshm Queue, shared``: ``aioshm.share()`` once, then ``put_async`` of that same array
  every time (only a handle and an fd travel), ``get_async`` of the reply;
* ``aioshm Queue, non-shared``: a private array with one element changed per send, so every
  send is a value send (copied into a recycled shared segment);
* ``aioprocessing AioQueue``: ``coro_put``/``coro_get`` (pickled by the stdlib; aioshm's
  ndarray reducer is switched off for this row);
* ``stdlib Queue + run_in_executor``: ``q.put`` (the feeder thread pickles), the reply taken
  with ``loop.run_in_executor(None, q.get)`` (reducer switched off too).

The "loop CPU" column is the CPU time the loop thread itself spent per round trip
(``time.thread_time()`` around the awaits; median, and the maximum over all runs): it tells a
library blocking the loop (high CPU) apart from the loop thread waiting for a CPU or for the
GIL (lag without loop CPU), which on a loaded 2-core machine is most of the idle-loop lag.
The "steal %" column is the share of the machine's CPU time its hypervisor gave to others
during the row's windows (``/proc/stat``; median over runs): on a shared VM, ticks come late
whenever the host does not run the loop's vCPU, whatever the loop does.

Targets: each aioshm row's p99 and worst lag <= 1.2x the floor row's of the same run (medians
of per-run ratios; the runs are interleaved). The absolute targets this benchmark had (p99 <=
2 ms, worst <= 5 ms) cannot be met on a shared VM, where the idle loop alone misses them; the
floor row pays what the machine adds, so the ratio isolates what the library adds. Printed with
PASS/FAIL; the exit status is 0 whatever the timings.

Usage::

    .venv/bin/python benchmarks/bench_ticklag.py            # 3 runs x 3 s windows per row
    .venv/bin/python benchmarks/bench_ticklag.py --quick    # 1 run x 1 s windows
    .venv/bin/python benchmarks/bench_ticklag.py --only idle aioshm_shared --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import mmap
import multiprocessing as stdmp
import os
import signal
import socket
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any

import _bench_targets as targets
import numpy as np
from _bench_report import per_rep_ratio, verdict

import aioshm

START_METHOD = "forkserver"
#: target: each aioshm row's p99 and worst lag <= this times the floor row's (same run)
FLOOR_RATIO = 1.2
MiB = 1 << 20
SIZE_MIB = 64
TICK = 0.001
TIMEOUT = 120.0

ROWS: list[tuple[str, str]] = [
    ("idle", "idle loop (ticker only)"),
    ("busy", "control: child busy, loop idle"),
    ("floor", "floor: raw fd over socketpair + add_reader"),
    ("aioshm_shared", "aioshm Queue, shared once"),
    ("aioshm_value", "aioshm Queue, non-shared (value send)"),
    ("aiop_queue", "aioprocessing AioQueue"),
    ("executor", "stdlib Queue + run_in_executor(None, q.get)"),
]

#: a round trip: send the payload, await the reply
Trip = Callable[[int], Awaitable[None]]

MY_CHILDREN: list[Any] = []


# --------------------------------------------------------------------------- helpers


def make_source() -> np.ndarray:
    a = np.arange(SIZE_MIB * MiB // 4, dtype=np.float32)
    a *= 1e-6
    return a


def _stop_process(p: Any) -> None:
    with contextlib.suppress(Exception):
        p.join(10)
    with contextlib.suppress(Exception):
        if p.is_alive():
            p.terminate()
            p.join(5)
    with contextlib.suppress(Exception):
        if p.is_alive():
            p.kill()
            p.join(5)
    with contextlib.suppress(Exception):
        p.close()


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) clock ticks of the whole machine so far, from ``/proc/stat`` (Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_percent(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float:
    if before is None or after is None or after[1] <= before[1]:
        return float("nan")
    return 100.0 * (after[0] - before[0]) / (after[1] - before[1])


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


class Ticker:
    """A 1 ms ticker; its lags (seconds) go to ``sink`` while one is set."""

    def __init__(self) -> None:
        self.sink: list[float] | None = None
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        pc, sleep = time.perf_counter, asyncio.sleep
        while True:
            t = pc()
            await sleep(TICK)
            sink = self.sink
            if sink is not None:
                sink.append(pc() - t - TICK)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# --------------------------------------------------------------------------- implementations


@contextlib.asynccontextmanager
async def idle() -> AsyncIterator[Trip]:
    async def trip(_: int) -> None:
        await asyncio.sleep(0.01)

    yield trip


@contextlib.asynccontextmanager
async def aioshm_row(shared: bool) -> AsyncIterator[Trip]:
    ctx = aioshm.get_context(START_METHOD)
    inq, outq = ctx.Queue(), ctx.Queue()
    src = make_source()
    payload = aioshm.share(src) if shared else src
    expect = targets.touch(src)
    p = None
    try:
        p = ctx.Process(target=targets.touch_child, args=(inq, outq), daemon=True)
        p.start()
        MY_CHILDREN.append(p)

        async def trip(i: int) -> None:
            if not shared:
                payload[0] = float(i)  # the content differs every time: a value send
            await inq.put_async(payload)
            r = await outq.get_async(timeout=TIMEOUT)
            if shared or i == 0:
                assert r == (expect if shared else targets.touch(payload)), r

        yield trip
        with contextlib.suppress(Exception):
            inq.put(None)
    finally:
        if p is not None:
            _stop_process(p)
        inq.close()
        outq.close()
        payload = src = None
        gc.collect()


@contextlib.contextmanager
def socket_child(target: Callable[[socket.socket], None]) -> Iterator[socket.socket]:
    """A running child ``target(sock)``; yields our (non-blocking) end of its socketpair and
    closes it at the end, which is the child's EOF: it stops."""
    ctx = stdmp.get_context(START_METHOD)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    p = None
    try:
        p = ctx.Process(target=target, args=(b,), daemon=True)
        p.start()
        MY_CHILDREN.append(p)
        b.close()
        a.setblocking(False)
        yield a
    finally:
        a.close()
        if p is not None:
            _stop_process(p)
        b.close()


@contextlib.asynccontextmanager
async def busy_row() -> AsyncIterator[Trip]:
    loop = asyncio.get_running_loop()
    with socket_child(targets.busy_child) as a:

        async def trip(_: int) -> None:
            await loop.sock_sendall(a, b"x")
            assert await loop.sock_recv(a, 1) == b"k"

        yield trip


@contextlib.asynccontextmanager
async def floor_row() -> AsyncIterator[Trip]:
    """What any library's round trip costs at least here: the array already lives in a memfd,
    its fd goes out with a 1-byte ``sendmsg`` (SCM_RIGHTS), the 8-byte reply is read by a
    permanent ``add_reader`` callback; no pickling, no tickets, no locks."""
    loop = asyncio.get_running_loop()
    src = make_source()
    expect = targets.touch(src)
    memfd = os.memfd_create("aioshm-bench-floor", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, src.nbytes)
        with mmap.mmap(memfd, src.nbytes) as m:
            np.frombuffer(m, np.float32)[:] = src
        with socket_child(targets.fd_touch_child) as a:
            fd = a.fileno()
            state: dict[str, Any] = {"fut": None, "buf": b""}

            def on_readable() -> None:
                buf = state["buf"] + os.read(fd, 64)
                fut = state["fut"]
                if len(buf) >= 8 and fut is not None and not fut.done():
                    state["buf"] = b""
                    fut.set_result(buf)
                else:
                    state["buf"] = buf

            loop.add_reader(fd, on_readable)
            try:

                async def trip(_: int) -> None:
                    fut = state["fut"] = loop.create_future()
                    socket.send_fds(a, [b"x"], [memfd])
                    (r,) = struct.unpack("d", await fut)
                    assert r == expect, r

                yield trip
            finally:
                loop.remove_reader(fd)
    finally:
        os.close(memfd)
        src = None
        gc.collect()


@contextlib.asynccontextmanager
async def aiop_row() -> AsyncIterator[Trip]:
    import aioprocessing

    ctx = stdmp.get_context(START_METHOD)
    inq, outq = aioprocessing.AioQueue(context=ctx), aioprocessing.AioQueue(context=ctx)
    src = make_source()
    expect = targets.touch(src)
    p = None
    ok = False
    try:
        p = ctx.Process(target=targets.touch_child, args=(inq._obj, outq._obj), daemon=True)
        p.start()
        MY_CHILDREN.append(p)

        async def trip(_: int) -> None:
            with stdlib_pickling():
                await inq.coro_put(src)
                r = await outq.coro_get(timeout=TIMEOUT)
            assert r == expect, r

        yield trip
        inq.put(None)
        ok = True
    finally:
        if p is not None:
            _stop_process(p)
        for q in (inq, outq):
            if not ok:
                q._obj.cancel_join_thread()
            q._obj.close()
            q._obj.join_thread()
            ex = getattr(q, "_executor", None)
            if ex is not None:
                ex.shutdown(wait=False)
        src = None
        gc.collect()


@contextlib.asynccontextmanager
async def executor_row() -> AsyncIterator[Trip]:
    ctx = stdmp.get_context(START_METHOD)
    inq, outq = ctx.Queue(), ctx.Queue()
    src = make_source()
    expect = targets.touch(src)
    loop = asyncio.get_running_loop()
    p = None
    ok = False
    try:
        p = ctx.Process(target=targets.touch_child, args=(inq, outq), daemon=True)
        p.start()
        MY_CHILDREN.append(p)

        async def trip(_: int) -> None:
            with stdlib_pickling():
                inq.put(src)  # returns at once; the feeder thread pickles and writes
                r = await loop.run_in_executor(None, outq.get, True, TIMEOUT)
            assert r == expect, r

        yield trip
        inq.put(None)
        ok = True
    finally:
        if p is not None:
            _stop_process(p)
        for q in (inq, outq):
            if not ok:
                q.cancel_join_thread()
            q.close()
            q.join_thread()
        src = None
        gc.collect()


FACTORIES: dict[str, Callable[[], contextlib.AbstractAsyncContextManager[Trip]]] = {
    "idle": idle,
    "busy": busy_row,
    "floor": floor_row,
    "aioshm_shared": lambda: aioshm_row(True),
    "aioshm_value": lambda: aioshm_row(False),
    "aiop_queue": aiop_row,
    "executor": executor_row,
}


# --------------------------------------------------------------------------- driver


class Result:
    def __init__(self) -> None:
        self.p99: list[float] = []
        self.worst: list[float] = []
        self.ticks: list[int] = []
        self.trip_ms: list[float] = []
        self.cpu_med: list[float] = []
        self.cpu_max: list[float] = []
        self.steal: list[float] = []
        self.error = ""


async def measure(keys: list[str], runs: int, window: float) -> dict[str, Result]:
    results = {k: Result() for k in keys}
    ticker = Ticker()
    ticker.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            trips: dict[str, Trip] = {}
            for key in keys:
                try:
                    trip = await stack.enter_async_context(FACTORIES[key]())
                    for i in range(2):  # the child is up, the code paths are warm
                        await trip(i)
                except Exception as exc:
                    results[key].error = f"{type(exc).__name__}: {exc}"
                    continue
                trips[key] = trip
            order = [k for k in keys if k in trips]
            counter = 2
            for run in range(runs):
                shift = run % max(1, len(order))
                for key in order[shift:] + order[:shift]:
                    gc.collect()
                    await asyncio.sleep(0.05)  # settle
                    lags: list[float] = []
                    durations: list[float] = []
                    cpus: list[float] = []
                    ticker.sink = lags
                    end = time.perf_counter() + window
                    ticks0 = cpu_ticks()
                    try:
                        while time.perf_counter() < end:
                            c0 = time.thread_time()
                            t0 = time.perf_counter()
                            await trips[key](counter)
                            durations.append(time.perf_counter() - t0)
                            cpus.append(time.thread_time() - c0)
                            counter += 1
                    except Exception as exc:
                        results[key].error = f"{type(exc).__name__}: {exc}"
                        continue
                    finally:
                        ticker.sink = None
                    r = results[key]
                    ms = sorted(x * 1e3 for x in lags)
                    if ms:
                        r.p99.append(ms[min(len(ms) - 1, int(0.99 * len(ms)))])
                        r.worst.append(ms[-1])
                    r.ticks.append(len(ms))
                    r.trip_ms.append(statistics.median(durations) * 1e3)
                    r.cpu_med.append(statistics.median(cpus) * 1e3)
                    r.cpu_max.append(max(cpus) * 1e3)
                    r.steal.append(steal_percent(ticks0, cpu_ticks()))
                print(f"  run {run + 1}/{runs} done", flush=True)
    finally:
        await ticker.stop()
    return results


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(results: dict[str, Result], runs: int, window: float) -> None:
    print()
    print(
        f"W4 1 ms ticker lag while awaiting {SIZE_MIB} MiB round trips (ms; medians over "
        f"{runs} run(s) of {window:g} s windows)"
    )
    print()
    head = f"| {'path':<44} | {'p99 lag':>8} | {'worst lag':>9} | {'ticks/s':>7} "
    head += f"| {'ms / round trip':>15} | {'loop CPU ms/trip med / max':>26} "
    head += f"| {'worst of runs':>13} | {'steal %':>7} |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for key, label in ROWS:
        r = results.get(key)
        if r is None:
            continue
        if not r.p99:
            print(
                f"| {label:<44} | {'failed':>8} | {r.error[:9]:>9} | {'':>7} | {'':>15} "
                f"| {'':>26} | {'':>13} | {'':>7} |"
            )
            continue
        trip = "-" if key in ("idle", "busy") else f"{med(r.trip_ms):.2f}"
        cpu = "-" if key in ("idle", "busy") else f"{med(r.cpu_med):.2f} / {max(r.cpu_max):.2f}"
        print(
            f"| {label:<44} | {med(r.p99):>8.2f} | {med(r.worst):>9.2f} "
            f"| {med([t / window for t in r.ticks]):>7.0f} | {trip:>15} | {cpu:>26} "
            f"| {max(r.worst):>13.2f} | {med(r.steal):>7.1f} |"
        )
    for key, r in results.items():
        if r.error:
            print(f"  {key}: {r.error}")
    print()
    print("Targets (each aioshm row against the floor row of this run; medians of per-run ratios):")
    floor = results.get("floor")
    any_check = False
    for key in ("aioshm_shared", "aioshm_value"):
        r = results.get(key)
        if r is None or not r.p99 or floor is None or not floor.p99:
            continue
        any_check = True
        label = dict(ROWS)[key]
        for what, ours, base in (("p99", r.p99, floor.p99), ("worst", r.worst, floor.worst)):
            ratio = per_rep_ratio(ours, base)
            print(
                f"  {verdict(ratio <= FLOOR_RATIO)}  {label}: {what} {med(ours):.2f} ms = "
                f"{ratio:.2f}x the floor's {med(base):.2f} ms (target <= {FLOOR_RATIO}x)"
            )
    if not any_check:
        print("  (needs the floor row and an aioshm row)")
    idle_r = results.get("idle")
    if idle_r is not None and idle_r.p99:
        print(
            f"  (no target) the idle loop alone: p99 {med(idle_r.p99):.2f} ms, worst "
            f"{med(idle_r.worst):.2f} ms, host steal {med(idle_r.steal):.1f}%: the lag this "
            f"machine adds whatever the library does"
        )


def _reap_leftovers() -> None:
    for p in MY_CHILDREN:
        with contextlib.suppress(Exception):
            if p.is_alive():
                print(f"  leftover child {p.pid}: killing it", file=sys.stderr)
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 run x 1 s windows")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--window", type=float, default=None, help="seconds per row and run")
    parser.add_argument("--only", nargs="+", choices=list(FACTORIES), default=None)
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    window = args.window or (1.0 if args.quick else 3.0)
    keys = [k for k, _ in ROWS if args.only is None or k in args.only]
    print(
        f"python {sys.version.split()[0]}, pid {os.getpid()}, nproc {os.cpu_count()}, "
        f"loadavg {os.getloadavg()[0]:.2f}, start method {START_METHOD}, "
        f"{SIZE_MIB} MiB float32",
        flush=True,
    )
    try:
        results = asyncio.run(measure(keys, runs, window))
    finally:
        _reap_leftovers()
    report(results, runs, window)


if __name__ == "__main__":
    main()
