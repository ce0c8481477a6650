"""``aioshm demo``: big arrays between an event loop and worker processes, against the stdlib.

An async program makes 16 MiB float32 frames on its event loop and has worker processes
normalise them, while the loop must stay responsive. The demo runs that pipeline twice, on one
event loop, one after the other:

* aioshm: the frames live in a ring of shared arrays; ``await inq.put_async((i, frame))`` sends a
  handle of a few hundred bytes, a worker started with ``aioshm.spawn`` normalises the frame in
  place, and only the index and a checksum come back;
* stdlib: ``multiprocessing.Queue`` driven from the same loop as a user would, through
  ``loop.run_in_executor`` (a thread), so each frame is pickled on its way out and back.

For each it measures apart: the transfer (a frame there and back with no compute, one at a
time; the worker reads one value per 4 KiB page), the compute (timed inside the worker), the
whole pipeline's wall time, and the event loop's tick lag (how late a 1 ms sleep on the loop
wakes up) while the pipeline runs, also less the loop thread's waits for a CPU that other
processes had (Linux schedstat), which is what the program itself did to its loop. Every
result is checked against numpy.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from ._bench import no_aioshm_reducer, stdlib_pickling, touch

__all__ = ("add_arguments", "main", "run")

T = TypeVar("T")
FRAME_SHAPE = (2048, 2048)  # 16 MiB of float32
FRAME_MIB = FRAME_SHAPE[0] * FRAME_SHAPE[1] * 4 / 2**20
_RING = 6  # frames in flight at most
_TIMEOUT = 60.0  # seconds: the longest wait for a worker's reply before the demo gives up


# --------------------------------------------------------------------------- the workers' side


def _normalise(frame: np.ndarray) -> float:
    """The workers' job: normalise a frame in place; return a checksum of the result."""
    frame -= frame.mean()
    frame /= frame.std() + 1e-6
    return float(frame[0, :16].sum())


def _job(frame: np.ndarray, compute: bool) -> tuple[float, float]:
    """Normalise ``frame`` (or, for the transfer timings, only read it): (checksum, CPU seconds
    of this thread, so that waiting for a CPU on a busy machine does not count)."""
    if not compute:
        return touch(frame), 0.0
    start = time.thread_time()
    checksum = _normalise(frame)
    return checksum, time.thread_time() - start


def _aioshm_worker(rank: int, inq: Any, outq: Any, ring: list[np.ndarray]) -> int:
    """A rank of ``aioshm.spawn``: plain blocking code. A frame arrives as a view of shared
    memory, so normalising it in place is the whole reply; only numbers travel back.

    ``ring`` is held for the whole run, so its segments stay mapped here and every frame that
    arrives is memory this process has already mapped; reading a value of each page once
    here, at start-up, maps its pages too (a cost a long-lived worker pays once)."""
    for slot in ring:
        touch(slot)
    done = 0
    while (item := inq.get()) is not None:
        index, frame, compute = item
        outq.put((index, *_job(frame, compute)))
        done += 1
    return done


def _stdlib_worker(inq: Any, outq: Any) -> None:
    """The same job on stdlib queues: the frame arrives pickled, so it must go back pickled."""
    no_aioshm_reducer()  # the fork server preloads aioshm: pickle frames the stdlib way
    while (item := inq.get()) is not None:
        index, frame, compute = item
        outq.put((index, *_job(frame, compute), frame))


# --------------------------------------------------------------------------- the producer's side


@functools.cache
def _base() -> np.ndarray:
    """The producer's source image (made on first use: workers never need it)."""
    return np.random.default_rng(0).standard_normal(FRAME_SHAPE, dtype=np.float32)


_FILL_ROWS = 256  # 2 MiB of a frame at a time: well under a millisecond of the loop's time


async def _fill(frame: np.ndarray, index: int) -> None:
    """Write frame ``index`` on the event loop (a stand-in for a camera or a file), a block of
    rows at a time, yielding in between."""
    import anyio.lowlevel

    base, value = _base(), np.float32(index)
    for row in range(0, frame.shape[0], _FILL_ROWS):
        np.add(base[row : row + _FILL_ROWS], value, out=frame[row : row + _FILL_ROWS])
        await anyio.lowlevel.checkpoint()


def _expected(index: int) -> float:
    return _normalise(_base() + np.float32(index))


class _Pipeline(Protocol):
    """What :func:`_measure` drives: the two pipelines differ only in these five steps."""

    label: str

    async def frame(self, index: int) -> np.ndarray: ...
    async def send(self, index: int, frame: np.ndarray, compute: bool) -> None: ...
    async def receive(self) -> tuple[int, float, float]: ...
    def release(self, index: int) -> None: ...
    async def stop(self) -> None: ...
    async def abort(self) -> None: ...


class _AioshmPipeline:
    label = "aioshm"

    def __init__(self, workers: int) -> None:
        import anyio

        import aioshm

        self._anyio = anyio
        self.ring = [aioshm.empty(FRAME_SHAPE, np.float32) for _ in range(_RING)]
        self.inq: Any = aioshm.Queue(maxsize=_RING)
        self.outq: Any = aioshm.Queue()
        self.workers = workers
        self.ctx = aioshm.spawn(
            _aioshm_worker, args=(self.inq, self.outq, self.ring), nprocs=workers
        )
        self.returned: dict[int, anyio.Event] = {}

    def _returned(self, index: int) -> Any:
        return self.returned.setdefault(index, self._anyio.Event())

    async def frame(self, index: int) -> np.ndarray:
        if index >= _RING:  # the slot is free once the frame sent _RING earlier is back
            await self._returned(index - _RING).wait()
        return self.ring[index % _RING]

    async def send(self, index: int, frame: np.ndarray, compute: bool) -> None:
        await self.inq.put_async((index, frame, compute))  # a handle, not 16 MiB

    async def receive(self) -> tuple[int, float, float]:
        with self._anyio.fail_after(_TIMEOUT):
            reply: tuple[int, float, float] = await self.outq.get_async()
        return reply

    def release(self, index: int) -> None:
        self._returned(index).set()

    async def stop(self) -> None:
        """Let the ranks finish; raise if one failed."""
        try:
            for _ in range(self.workers):
                await self.inq.put_async(None)
            await self.ctx  # every rank's count; raises if a rank failed
        finally:
            self.inq.close()
            self.outq.close()

    async def abort(self) -> None:
        """After an error: stop every rank (SIGTERM, grace, SIGKILL) and reap it."""
        try:
            await self.ctx.__aexit__(RuntimeError, RuntimeError("demo aborted"), None)
        finally:
            self.inq.close()
            self.outq.close()


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking call as an async program would: ``loop.run_in_executor`` on asyncio,
    ``anyio.to_thread.run_sync`` elsewhere."""
    import asyncio

    import anyio.to_thread

    from ._transport._waits import current_async_library

    if current_async_library() == "asyncio":
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    return await anyio.to_thread.run_sync(fn, *args)


class _StdlibPipeline:
    label = "stdlib"

    def __init__(self, workers: int) -> None:
        ctx = multiprocessing.get_context("forkserver")
        self.inq: Any = ctx.Queue(maxsize=_RING)
        self.outq: Any = ctx.Queue()
        self.procs = [
            ctx.Process(target=_stdlib_worker, args=(self.inq, self.outq), daemon=True)
            for _ in range(workers)
        ]
        for p in self.procs:
            p.start()

    async def frame(self, index: int) -> np.ndarray:
        return np.empty(FRAME_SHAPE, np.float32)  # a new one: the result comes back as a copy

    async def send(self, index: int, frame: np.ndarray, compute: bool) -> None:
        await _in_thread(self.inq.put, (index, frame, compute))

    async def receive(self) -> tuple[int, float, float]:
        index, checksum, seconds, _frame = await _in_thread(self.outq.get, True, _TIMEOUT)
        return index, checksum, seconds

    def release(self, index: int) -> None:
        pass

    async def stop(self) -> None:
        """Let the workers finish; raise if one failed."""
        try:
            for _ in self.procs:
                await _in_thread(self.inq.put, None)
            for p in self.procs:
                await _in_thread(p.join, _TIMEOUT)
                if p.exitcode != 0:
                    raise RuntimeError(f"a stdlib worker exited with {p.exitcode}")
        finally:
            await self.abort()

    async def abort(self) -> None:
        """Kill what still runs, reap it, and close the queues."""
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join()
        for q in (self.inq, self.outq):
            q.cancel_join_thread()  # a frame left in a dead worker's pipe must not block exit
            q.close()


# --------------------------------------------------------------------------- measuring


@dataclass
class Result:
    """What one pipeline measured."""

    label: str
    transfer: list[float] = field(default_factory=list)  # seconds per round trip
    compute: list[float] = field(default_factory=list)  # seconds per frame, in the workers
    lags: list[float] = field(default_factory=list)  # seconds late, per 1 ms tick
    own_lags: list[float] = field(default_factory=list)  # the same, less waits for a CPU
    wall: float = 0.0  # seconds for the pipeline's frames


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else 0.0


def _run_queue_wait() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU that other processes had
    (the kernel's schedstat; 0.0 where it is not available)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


async def _measure(pipe: _Pipeline, frames: int, round_trips: int, progress: _Progress) -> Result:
    """Measure ``pipe``, then stop it (or, on any error, abort it: no process is left)."""
    try:
        result = await _measure_running(pipe, frames, round_trips, progress)
    except BaseException:
        import anyio

        with anyio.CancelScope(shield=True):
            await pipe.abort()
        raise
    await pipe.stop()
    return result


async def _measure_running(
    pipe: _Pipeline, frames: int, round_trips: int, progress: _Progress
) -> Result:
    import anyio

    result = Result(pipe.label)
    # the transfer alone: one frame at a time there and back, no compute (one untimed warm-up
    # round trip per ring slot first)
    warmups = _RING
    for index in range(warmups + round_trips):
        frame = await pipe.frame(index)
        await _fill(frame, index)
        expected = touch(frame)
        start = time.perf_counter()
        await pipe.send(index, frame, False)
        got, checksum, _ = await pipe.receive()
        elapsed = time.perf_counter() - start
        if (got, checksum) != (index, expected):
            raise AssertionError(f"{pipe.label}: round trip {index} came back wrong")
        pipe.release(index)
        if index >= warmups:
            result.transfer.append(elapsed)

    # the pipeline: a producer fills and sends frames while this task takes the results, and
    # a ticker measures how late the loop wakes it up
    first = warmups + round_trips
    checksums: dict[int, float] = {}
    stop = anyio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            t, waited = time.perf_counter(), _run_queue_wait()
            await anyio.sleep(0.001)
            late = time.perf_counter() - t - 0.001
            result.lags.append(max(0.0, late))
            result.own_lags.append(max(0.0, late - (_run_queue_wait() - waited)))

    async def producer() -> None:
        for index in range(first, first + frames):
            frame = await pipe.frame(index)
            await _fill(frame, index)
            await pipe.send(index, frame, True)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        tg.start_soon(producer)
        for done in range(1, frames + 1):
            index, checksum, seconds = await pipe.receive()
            checksums[index - first] = checksum
            result.compute.append(seconds)
            pipe.release(index)
            progress.update(done)
        result.wall = time.perf_counter() - start
        stop.set()
    progress.close()
    for i in sorted({0, frames // 2, frames - 1}):
        if abs(checksums[i] - _expected(first + i)) > 1e-3:
            raise AssertionError(f"{pipe.label}: frame {i}: wrong result")
    return result


class _Progress:
    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.last = label, total, -1
        self.tty = sys.stdout.isatty()

    def update(self, done: int) -> None:
        if self.tty:
            bar = "#" * (done * 25 // self.total)
            print(f"\r  {self.label:8s} [{bar:<25s}] {done}/{self.total}", end="", flush=True)
        elif done == self.total:
            print(f"  {self.label:8s} {done}/{self.total} frames, every result checked", flush=True)

    def close(self) -> None:
        if self.tty:
            print(
                f"\r  {self.label:8s} {self.total}/{self.total} frames, every result checked"
                + " " * 20
            )


async def _both(frames: int, workers: int, round_trips: int) -> tuple[Result, Result]:
    aio = await _measure(_AioshmPipeline(workers), frames, round_trips, _Progress("aioshm", frames))
    with stdlib_pickling():
        std = await _measure(
            _StdlibPipeline(workers), frames, round_trips, _Progress("stdlib", frames)
        )
    return aio, std


# --------------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.0f} s"


def report(aio: Result, std: Result, frames: int, workers: int) -> None:
    """The closing table: aioshm, the stdlib, and the stdlib's figure over aioshm's."""
    median = statistics.median
    rows: list[tuple[str, str, str, str]] = []

    def row(
        label: str, a: float, s: float, fmt: Callable[[float], str], ratio: bool = True
    ) -> None:
        rows.append((label, fmt(a), fmt(s), f"{s / a:.1f}x" if ratio and a > 0 else ""))

    row("transfer: a frame there and back", median(aio.transfer), median(std.transfer), _ms)
    row("compute: one frame (worker CPU)", median(aio.compute), median(std.compute), _ms)
    row(f"pipeline: {frames} frames, wall time", aio.wall, std.wall, lambda s: f"{s:.2f} s")
    mib = frames * FRAME_MIB
    rows.append(
        ("pipeline: throughput", f"{mib / aio.wall:.0f} MiB/s", f"{mib / std.wall:.0f} MiB/s", "")
    )
    row("event loop tick lag, p99", _quantile(aio.lags, 0.99), _quantile(std.lags, 0.99), _ms)
    row("event loop tick lag, worst", max(aio.lags), max(std.lags), _ms)
    aio_own, std_own = _quantile(aio.own_lags, 0.99), _quantile(std.own_lags, 0.99)
    row("  less waits for a CPU, p99", aio_own, std_own, _ms)
    row("  less waits for a CPU, worst", max(aio.own_lags), max(std.own_lags), _ms)
    print(f"\n  {'':<34s} {'aioshm':>11s} {'stdlib':>11s} {'stdlib/aioshm':>14s}")
    for label, a, s, r in rows:
        print(f"  {label:<34s} {a:>11s} {s:>11s} {r:>14s}")
    print(
        "\n  The compute is the same on both sides. The transfer is what shared memory removes,\n"
        "  and with it the copies that hold the GIL: the stdlib's pickling runs in threads of\n"
        "  this process and keeps the event loop waiting. The tick lag of a busy machine also\n"
        "  includes the loop thread's waits for a CPU (on the kernel's run queue); the rows\n"
        "  below it leave those out."
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=48, help="frames in the pipeline (48)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument(
        "--round-trips", type=int, default=10, help="timed transfer round trips (10)"
    )
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument(
        "--quick", action="store_true", help="8 frames and 3 round trips (for tests)"
    )


def run(args: argparse.Namespace) -> int:
    import anyio

    from aioshm import _procutil  # importing aioshm sets the fork server's preloads

    if args.quick:
        args.frames, args.round_trips = min(args.frames, 8), min(args.round_trips, 3)
    if args.frames < 1 or args.workers < 1 or args.round_trips < 1:
        raise SystemExit("aioshm demo: --frames, --workers and --round-trips must be >= 1")
    _procutil.ensure_forkserver()  # both pipelines share one warm fork server
    print(
        f"aioshm demo: {args.frames} frames of {FRAME_SHAPE[0]}x{FRAME_SHAPE[1]} float32 "
        f"({FRAME_MIB:.0f} MiB each) through {args.workers} worker processes, on "
        f"{args.backend}; transfer timed over {args.round_trips} round trips\n"
    )
    _base()  # the source image, made before any clock starts
    aio, std = anyio.run(_both, args.frames, args.workers, args.round_trips, backend=args.backend)
    report(aio, std, args.frames, args.workers)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m aioshm._demo [options]`` (the same as ``aioshm demo``)."""
    parser = argparse.ArgumentParser(prog="aioshm demo", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
