"""W2: ping-pong of a small tuple between an asyncio parent and an already-running child.

The parent runs an asyncio loop and does N round trips of ``(1, 2, 3)`` with a child that
echoes it back through blocking calls. Every implementation runs in this one interpreter,
each with its own child (forkserver), all started before the first timed repeat. Repeats are
interleaved (repeat 1 of every row, then repeat 2 of every row, ...) so load drifting on a
shared machine hits every row alike; ratios are per-repeat ratios, then the median.

Rows:

* ``aioshm Pipe``: ``aioshm.Pipe()``, ``send_async``/``recv_async`` in the parent, blocking
  ``recv``/``send`` in the child;
* ``aioshm Queue``: two ``aioshm`` queues, ``put_async``/``get_async``;
* ``floor: socketpair + add_reader``: a raw ``socket.socketpair``; the parent writes the
  pickled tuple with ``os.write`` and reads the echo with ``os.read`` from a permanent
  ``loop.add_reader`` callback (no pickling on either side). This is the floor the targets use;
* ``socketpair + loop.sock_recv``: the same socket driven by ``loop.sock_sendall`` and
  ``loop.sock_recv`` (BASELINE's "1.00x" row);
* ``stdlib mp.Pipe + add_reader``: ``multiprocessing.Pipe``; the parent ``send``-s, waits for
  readability with a permanent ``add_reader`` callback, then ``recv``-s;
* ``anyio.to_process.run_sync``: one call of an echo function per round trip (warm worker);
* ``aioprocessing AioPipe`` / ``AioQueue``: ``coro_send``/``coro_recv``, ``coro_put``/
  ``coro_get`` (executor threads).

Targets: aioshm Pipe <= 1.3x the floor, aioshm Queue <= 2x the floor, and both >= 2x faster than
anyio.to_process. Printed with PASS/FAIL; the exit status is 0 whatever the timings.

Usage::

    .venv/bin/python benchmarks/bench_pingpong.py            # 20,000 round trips x 3 repeats
    .venv/bin/python benchmarks/bench_pingpong.py --quick    # 2,000 round trips x 3 repeats
    .venv/bin/python benchmarks/bench_pingpong.py --only aioshm_pipe floor
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as stdmp
import os
import pickle
import signal
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import _bench_targets as targets
from _bench_report import per_rep_ratio, verdict

import aioshm

START_METHOD = "forkserver"
MSG = (1, 2, 3)
PAYLOAD = pickle.dumps(MSG, protocol=pickle.HIGHEST_PROTOCOL)

#: (key, label); the order of the table
ROWS: list[tuple[str, str]] = [
    ("floor", "floor: socketpair + add_reader, os.read/os.write"),
    ("sock_recv", "socketpair + loop.sock_sendall/sock_recv"),
    ("aioshm_pipe", "aioshm Pipe send_async/recv_async"),
    ("aioshm_queue", "aioshm Queue put_async/get_async"),
    ("mp_pipe", "stdlib mp.Pipe + add_reader"),
    ("anyio", "anyio.to_process.run_sync"),
    ("aiop_pipe", "aioprocessing AioPipe"),
    ("aiop_queue", "aioprocessing AioQueue"),
]

Run = Callable[[int], Awaitable[None]]

MY_CHILDREN: list[Any] = []


# --------------------------------------------------------------------------- helpers


def _stop_process(p: Any) -> None:
    with contextlib.suppress(Exception):
        p.join(5)
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


def _start(ctx: Any, target: Callable[..., None], *args: Any) -> Any:
    p = ctx.Process(target=target, args=args, daemon=True)
    p.start()
    MY_CHILDREN.append(p)
    return p


# --------------------------------------------------------------------------- implementations


@contextlib.asynccontextmanager
async def aioshm_pipe() -> AsyncIterator[Run]:
    ctx = aioshm.get_context(START_METHOD)
    parent, child = aioshm.Pipe()
    p = None
    try:
        p = _start(ctx, targets.conn_echo, child)
        child.close()

        async def run(n: int) -> None:
            send, recv = parent.send_async, parent.recv_async
            r: Any = None
            for _ in range(n):
                await send(MSG)
                r = await recv()
            assert r == MSG, r

        yield run
        with contextlib.suppress(OSError):
            parent.send(None)
    finally:
        if p is not None:
            _stop_process(p)
        parent.close()
        child.close()


@contextlib.asynccontextmanager
async def aioshm_queue() -> AsyncIterator[Run]:
    ctx = aioshm.get_context(START_METHOD)
    inq, outq = ctx.Queue(), ctx.Queue()
    p = None
    try:
        p = _start(ctx, targets.queue_echo, inq, outq)

        async def run(n: int) -> None:
            put, get = inq.put_async, outq.get_async
            r: Any = None
            for _ in range(n):
                await put(MSG)
                r = await get()
            assert r == MSG, r

        yield run
        with contextlib.suppress(Exception):
            inq.put(None)
    finally:
        if p is not None:
            _stop_process(p)
        inq.close()
        outq.close()


@contextlib.asynccontextmanager
async def raw_socket(kind: str) -> AsyncIterator[Run]:
    ctx = stdmp.get_context(START_METHOD)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    loop = asyncio.get_running_loop()
    fd = a.fileno()
    p = None
    reading = False
    try:
        p = _start(ctx, targets.fd_echo, b)
        b.close()
        want = len(PAYLOAD)
        if kind == "add_reader":
            state: dict[str, Any] = {"fut": None, "buf": b""}

            def on_readable() -> None:
                buf = state["buf"] + os.read(fd, 4096)
                fut = state["fut"]
                if len(buf) >= want and fut is not None and not fut.done():
                    state["buf"] = b""
                    fut.set_result(buf)
                else:
                    state["buf"] = buf

            loop.add_reader(fd, on_readable)
            reading = True

            async def run(n: int) -> None:
                write, new = os.write, loop.create_future
                r = b""
                for _ in range(n):
                    fut = state["fut"] = new()
                    write(fd, PAYLOAD)
                    r = await fut
                assert r == PAYLOAD, r

        else:
            a.setblocking(False)

            async def run(n: int) -> None:
                sendall, recv = loop.sock_sendall, loop.sock_recv
                r = b""
                for _ in range(n):
                    await sendall(a, PAYLOAD)
                    r = await recv(a, 4096)
                    while len(r) < want:
                        r += await recv(a, 4096)
                assert r == PAYLOAD, r

        yield run
    finally:
        if reading:
            loop.remove_reader(fd)
        with contextlib.suppress(OSError):
            a.shutdown(socket.SHUT_WR)  # EOF ends the child's loop
        if p is not None:
            _stop_process(p)
        a.close()
        b.close()


@contextlib.asynccontextmanager
async def mp_pipe() -> AsyncIterator[Run]:
    ctx = stdmp.get_context(START_METHOD)
    parent, child = stdmp.Pipe()
    loop = asyncio.get_running_loop()
    fd = parent.fileno()
    p = None
    reading = False
    try:
        p = _start(ctx, targets.conn_echo, child)
        child.close()
        state: dict[str, Any] = {"fut": None}

        def on_readable() -> None:
            fut = state["fut"]
            if fut is not None and not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, on_readable)
        reading = True

        async def run(n: int) -> None:
            send, recv, new = parent.send, parent.recv, loop.create_future
            r: Any = None
            for _ in range(n):
                fut = state["fut"] = new()
                send(MSG)
                await fut
                state["fut"] = None
                r = recv()
            assert r == MSG, r

        yield run
        with contextlib.suppress(OSError):
            parent.send(None)
    finally:
        if reading:
            loop.remove_reader(fd)
        if p is not None:
            _stop_process(p)
        parent.close()
        child.close()


@contextlib.asynccontextmanager
async def anyio_to_process() -> AsyncIterator[Run]:
    import anyio.to_process

    run_sync = anyio.to_process.run_sync

    async def run(n: int) -> None:
        r: Any = None
        for _ in range(n):
            r = await run_sync(targets.echo, MSG)
        assert r == MSG, r

    # anyio keeps its worker process; it is stopped when the event loop shuts down
    yield run


@contextlib.asynccontextmanager
async def aiop_pipe() -> AsyncIterator[Run]:
    import aioprocessing

    ctx = stdmp.get_context(START_METHOD)
    parent, child = aioprocessing.AioPipe()
    p = None
    try:
        p = _start(ctx, targets.conn_echo, child._obj)
        child.close()

        async def run(n: int) -> None:
            send, recv = parent.coro_send, parent.coro_recv
            r: Any = None
            for _ in range(n):
                await send(MSG)
                r = await recv()
            assert r == MSG, r

        yield run
        with contextlib.suppress(OSError):
            parent.send(None)
    finally:
        if p is not None:
            _stop_process(p)
        parent.close()
        child.close()
        for conn in (parent, child):
            ex = getattr(conn, "_executor", None)
            if ex is not None:
                ex.shutdown(wait=False)


@contextlib.asynccontextmanager
async def aiop_queue() -> AsyncIterator[Run]:
    import aioprocessing

    ctx = stdmp.get_context(START_METHOD)
    inq, outq = aioprocessing.AioQueue(context=ctx), aioprocessing.AioQueue(context=ctx)
    p = None
    ok = False
    try:
        p = _start(ctx, targets.queue_echo, inq._obj, outq._obj)

        async def run(n: int) -> None:
            put, get = inq.coro_put, outq.coro_get
            r: Any = None
            for _ in range(n):
                await put(MSG)
                r = await get()
            assert r == MSG, r

        yield run
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


FACTORIES: dict[str, Callable[[], contextlib.AbstractAsyncContextManager[Run]]] = {
    "floor": lambda: raw_socket("add_reader"),
    "sock_recv": lambda: raw_socket("sock_recv"),
    "aioshm_pipe": aioshm_pipe,
    "aioshm_queue": aioshm_queue,
    "mp_pipe": mp_pipe,
    "anyio": anyio_to_process,
    "aiop_pipe": aiop_pipe,
    "aiop_queue": aiop_queue,
}


# --------------------------------------------------------------------------- driver


async def measure(
    keys: list[str], n: int, reps: int, warm: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and parent-CPU µs per round trip, per repeat, for every row that started."""
    samples: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    errors: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        runs: dict[str, Run] = {}
        for key in keys:
            try:
                run = await stack.enter_async_context(FACTORIES[key]())
                await run(warm)
            except Exception as exc:
                errors[key] = f"{type(exc).__name__}: {exc}"
                continue
            runs[key] = run
        order = [k for k in keys if k in runs]
        for rep in range(reps):
            # rotate the order, so no row always runs right after the same neighbour
            shift = rep % max(1, len(order))
            for key in order[shift:] + order[:shift]:
                c0 = time.process_time()
                t0 = time.perf_counter()
                try:
                    await runs[key](n)
                except Exception as exc:
                    errors[key] = f"{type(exc).__name__}: {exc}"
                    continue
                samples[key].append((time.perf_counter() - t0) / n * 1e6)
                cpu[key].append((time.process_time() - c0) / n * 1e6)
            print(f"  repeat {rep + 1}/{reps} done", flush=True)
    for key, err in errors.items():
        print(f"  {key}: FAILED: {err}", flush=True)
    return samples, cpu


def report(samples: dict[str, list[float]], cpu: dict[str, list[float]], n: int, reps: int) -> None:
    labels = dict(ROWS)
    floor = samples.get("floor") or []
    sockr = samples.get("sock_recv") or []
    print()
    print(f"W2 ping-pong of {MSG!r}: {n:,} round trips x {reps} repeats, medians")
    print(f"(ratios are medians of per-repeat ratios; floor = {labels['floor']})")
    print()
    head = f"| {'implementation':<52} | {'µs / rt':>8} | {'rt/s':>8} | {'vs floor':>8} "
    head += f"| {'vs sock_recv':>12} | {'parent CPU µs/rt':>16} | {'spread (min-max µs)':>19} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for key, label in ROWS:
        s = samples.get(key)
        if s is None:
            continue
        if not s:
            print(
                f"| {label:<52} | {'failed':>8} | {'':>8} | {'':>8} | {'':>12} | {'':>16} "
                f"| {'':>19} |"
            )
            continue
        med = statistics.median(s)
        vf = f"{per_rep_ratio(s, floor):.2f}x" if floor else "-"
        vs = f"{per_rep_ratio(s, sockr):.2f}x" if sockr else "-"
        spread = f"{min(s):.1f}-{max(s):.1f}"
        pc = statistics.median(cpu[key]) if cpu.get(key) else float("nan")
        print(
            f"| {label:<52} | {med:>8.1f} | {1e6 / med:>8,.0f} | {vf:>8} | {vs:>12} "
            f"| {pc:>16.1f} | {spread:>19} |"
        )
    print()
    print("Targets:")
    pipe, queue, anyio_s = (samples.get(k) or [] for k in ("aioshm_pipe", "aioshm_queue", "anyio"))
    checks: list[tuple[str, float, str, float]] = []
    if pipe and floor:
        checks.append(("aioshm Pipe / floor", per_rep_ratio(pipe, floor), "<=", 1.3))
    if queue and floor:
        checks.append(("aioshm Queue / floor", per_rep_ratio(queue, floor), "<=", 2.0))
    if pipe and anyio_s:
        checks.append(("anyio.to_process / aioshm Pipe", per_rep_ratio(anyio_s, pipe), ">=", 2.0))
    if queue and anyio_s:
        checks.append(("anyio.to_process / aioshm Queue", per_rep_ratio(anyio_s, queue), ">=", 2.0))
    for name, value, op, goal in checks:
        ok = value <= goal if op == "<=" else value >= goal
        print(f"  {verdict(ok)}  {name}: {value:.2f}x (target {op} {goal}x)")
    if not checks:
        print("  (not enough rows ran to check the targets)")


def _reap_leftovers() -> None:
    """Stop any child of ours that is still alive (not the fork servers, which exit with us)."""
    for p in MY_CHILDREN:
        with contextlib.suppress(Exception):
            if p.is_alive():
                print(f"  leftover child {p.pid}: killing it", file=sys.stderr)
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 round trips per repeat")
    parser.add_argument("-n", type=int, default=None, help="round trips per repeat")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=list(FACTORIES), default=None)
    args = parser.parse_args()
    n = args.n or (2_000 if args.quick else 20_000)
    keys = [k for k, _ in ROWS if args.only is None or k in args.only]
    warm = min(1_000, n)
    print(
        f"python {sys.version.split()[0]}, pid {os.getpid()}, nproc {os.cpu_count()}, "
        f"loadavg {os.getloadavg()[0]:.2f}, start method {START_METHOD}",
        flush=True,
    )
    try:
        samples, cpu = asyncio.run(measure(keys, n, args.reps, warm))
    finally:
        _reap_leftovers()
    report(samples, cpu, n, args.reps)


if __name__ == "__main__":
    main()
