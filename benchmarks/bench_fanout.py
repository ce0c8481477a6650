"""P8: fan-out, one 512 MiB float32 array to N = 1, 2, 4, 8 workers.

For each N, each row sends one array that the parent allocated in shared memory to N workers;
each worker touches every page of it (reads one value per 4 KiB page), reports the time it
finished (``time.monotonic()``, the same clock in every process), and holds the array until
the parent has sampled the PSS of every process (itself and all its descendants, through
``psutil``), then returns. Rows:

* ``aioshm_pool``: ``aioshm.Pool(N)`` (forkserver, started and warmed before), one
  ``apply_async(task, (a,))`` per worker, gathered; ``a`` from ``aioshm.empty``;
* ``aioshm_spawn``: ``await aioshm.spawn(rank_fn, (a, report, release), nprocs=N)``: the time
  includes starting the ranks;
* ``stdlib_shm``: stdlib ``Pool(N)`` (forkserver) with a ``SharedMemory`` block filled once;
  each task gets its name and attaches.

Memory: "total PSS" is the sum of the PSS of every process at the moment all N workers hold the
array, minus the same sum in a run of the same row with a 4 KiB array (so the interpreters'
own memory, and the spawned ranks', cancel out), in units of the array. Each row is warmed
with one small and one big round before its baseline is taken. The parent's own copy
counts: one array shared by everyone is 1.00x. Time: per worker, from the parent's first send
to that worker's report (median over the workers, then over repeats), and the wall time until
the last worker reported.

Goals: total PSS <= 1.05x the array for every N; time per worker flat in N up to the core
count (checked: median time per worker at N = cores <= 1.25x that at N = 1).

Usage::

    .venv/bin/python benchmarks/bench_fanout.py           # 512 MiB, N = 1 2 4 8, 3 repeats
    .venv/bin/python benchmarks/bench_fanout.py --quick   # 64 MiB, N = 1 2 4, 1 repeat
    .venv/bin/python benchmarks/bench_fanout.py --only aioshm_pool --ns 1 2 --mib 256
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as stdmp
import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from multiprocessing import shared_memory
from typing import Any

import _bench_targets as targets
import numpy as np
import psutil
from _bench_report import verdict

import aioshm

START_METHOD = "forkserver"
TINY = 1024  # float32 elements of the baseline run's array (4 KiB)
FLAT = 1.25
PSS_GOAL = 1.05
CORES = os.cpu_count() or 1

ROWS: list[tuple[str, str]] = [
    ("aioshm_pool", "aioshm Pool, apply_async per worker"),
    ("aioshm_spawn", "aioshm.spawn ranks (includes start)"),
    ("stdlib_shm", "stdlib Pool + SharedMemory by name"),
]

#: one round: (array elements) -> (total PSS at the hold point, per-worker seconds)
Round = Callable[[int], Awaitable[tuple[int, list[float]]]]


def total_pss() -> int:
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss
    return total


def _filled_shared(n: int) -> Any:
    a = aioshm.empty(n, np.float32)
    a[...] = 1.0
    return a


async def _hold_point(report: Any, n_workers: int, t0: float) -> tuple[int, list[float]]:
    """Wait for every worker's report, then sample: (total PSS, seconds per worker)."""
    times = []
    for _ in range(n_workers):
        _, t = await report.get_async()
        times.append(t - t0)
    return total_pss(), times


# --------------------------------------------------------------------------- rows


@contextlib.asynccontextmanager
async def aioshm_pool(nw: int) -> AsyncIterator[Round]:
    report, release = aioshm.Queue(), aioshm.Queue()
    pool = aioshm.Pool(
        nw, initializer=targets.fanout_init, initargs=(report, release), context=START_METHOD
    )

    async def one(n: int) -> tuple[int, list[float]]:
        a = _filled_shared(n)
        t0 = time.monotonic()
        done = asyncio.ensure_future(
            asyncio.gather(*(pool.apply_async(targets.fanout_task, (a,)) for _ in range(nw)))
        )
        try:
            got = await _hold_point(report, nw, t0)
        finally:
            for _ in range(nw):
                release.put(None)
            sums = await done
        _check(sums, n)
        del a
        aioshm.trim_pool()
        return got

    try:
        yield one
    finally:
        await pool.terminate_async()
        report.close()
        release.close()


@contextlib.asynccontextmanager
async def aioshm_spawn(nw: int) -> AsyncIterator[Round]:
    report, release = aioshm.Queue(), aioshm.Queue()

    async def one(n: int) -> tuple[int, list[float]]:
        a = _filled_shared(n)
        t0 = time.monotonic()
        ranks = aioshm.spawn(targets.fanout_rank, (a, report, release), nprocs=nw)
        try:
            got = await _hold_point(report, nw, t0)
        finally:
            for _ in range(nw):
                release.put(None)
            sums = await ranks
        _check(sums, n)
        del a
        aioshm.trim_pool()
        return got

    try:
        yield one
    finally:
        report.close()
        release.close()


@contextlib.asynccontextmanager
async def stdlib_shm(nw: int) -> AsyncIterator[Round]:
    ctx = stdmp.get_context(START_METHOD)
    # aioshm's queues (their get_async) for the reports; stdlib ones would block the loop
    report, release = aioshm.Queue(), aioshm.Queue()
    pool = ctx.Pool(nw, initializer=targets.fanout_init, initargs=(report, release))

    async def one(n: int) -> tuple[int, list[float]]:
        shm = shared_memory.SharedMemory(create=True, size=n * 4)
        try:
            a = np.ndarray((n,), np.float32, buffer=shm.buf)
            a[...] = 1.0
            del a
            t0 = time.monotonic()
            res = [pool.apply_async(targets.fanout_shm_task, (shm.name, n)) for _ in range(nw)]
            try:
                got = await _hold_point(report, nw, t0)
            finally:
                for _ in range(nw):
                    release.put(None)
            _check([r.get(120) for r in res], n)
        finally:
            shm.close()
            shm.unlink()
        return got

    try:
        yield one
    finally:
        pool.terminate()
        pool.join()
        report.close()
        release.close()


FACTORIES: dict[str, Callable[[int], contextlib.AbstractAsyncContextManager[Round]]] = {
    "aioshm_pool": aioshm_pool,
    "aioshm_spawn": aioshm_spawn,
    "stdlib_shm": stdlib_shm,
}


def _check(sums: list[float], n: int) -> None:
    want = float(-(-n // 1024))
    if any(s != want for s in sums):
        raise AssertionError(f"workers' sums {sums} != {want}")


# --------------------------------------------------------------------------- driver


Result = dict[tuple[str, int], dict[str, list[float]]]


async def measure(keys: list[str], ns: list[int], n: int, reps: int) -> Result:
    out: Result = {}
    for nw in ns:
        async with contextlib.AsyncExitStack() as stack:
            rounds: dict[str, Round] = {}
            base: dict[str, int] = {}
            for key in keys:
                try:
                    rounds[key] = await stack.enter_async_context(FACTORIES[key](nw))
                except Exception as exc:
                    print(f"  {key} N={nw}: FAILED to start: {type(exc).__name__}: {exc}")
            # baselines once every row's processes run (each row's sum counts them all);
            # warm-up with the big array too: what a process keeps after its first big round
            # (code pages, allocator arenas) belongs to no copy of the array
            for key in list(rounds):
                try:
                    await rounds[key](TINY)
                    await rounds[key](n)
                    base[key] = min([(await rounds[key](TINY))[0] for _ in range(2)])
                except Exception as exc:
                    print(f"  {key} N={nw}: FAILED to warm up: {type(exc).__name__}: {exc}")
                    rounds.pop(key)
            order = list(rounds)
            for rep in range(reps):
                shift = rep % max(1, len(order))
                for key in order[shift:] + order[:shift]:
                    cell = out.setdefault((key, nw), {"pss": [], "per": [], "wall": []})
                    try:
                        pss, per = await rounds[key](n)
                    except Exception as exc:
                        print(f"  {key} N={nw}: FAILED: {type(exc).__name__}: {exc}")
                        continue
                    cell["pss"].append((pss - base[key]) / (n * 4))
                    cell["per"].append(statistics.median(per))
                    cell["wall"].append(max(per))
            print(f"  N={nw} done", flush=True)
    return out


def report(res: Result, keys: list[str], ns: list[int], mib: int, reps: int) -> None:
    labels = dict(ROWS)
    print()
    print(f"P8: one {mib} MiB float32 array to N workers, each touches every page; {reps} repeats,")
    print("medians. total PSS: all processes at the hold point, less a 4 KiB run, in arrays.")
    head = f"| {'row':<38} | {'N':>2} | {'total PSS':>9} | {'ms / worker':>11} | {'ms, last':>8} |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for key in keys:
        for nw in ns:
            c = res.get((key, nw))
            if not c or not c["pss"]:
                continue
            print(
                f"| {labels[key]:<38} | {nw:>2} | {statistics.median(c['pss']):>8.3f}x "
                f"| {statistics.median(c['per']) * 1e3:>11.1f} "
                f"| {statistics.median(c['wall']) * 1e3:>8.1f} |"
            )
    print()
    print(f"Goals: total PSS <= {PSS_GOAL}x for every N; time per worker flat up to N = {CORES}")
    print(f"(cores), i.e. at N = {CORES} <= {FLAT}x N = 1:")
    for key in keys:
        for nw in ns:
            c = res.get((key, nw))
            if c and c["pss"]:
                v = statistics.median(c["pss"])
                print(f"  {verdict(v <= PSS_GOAL)}  {labels[key]}, N={nw}: total PSS {v:.3f}x")
        one, top = res.get((key, 1)), res.get((key, CORES))
        if CORES > 1 and one and top and one["per"] and top["per"]:
            r = statistics.median(top["per"]) / statistics.median(one["per"])
            print(
                f"  {verdict(r <= FLAT)}  {labels[key]}: time per worker N={CORES} / N=1: {r:.2f}x"
            )
    for key in keys:
        if key == "aioshm_pool":
            continue
        ratios = []
        for nw in ns:
            a, b = res.get(("aioshm_pool", nw)), res.get((key, nw))
            if a and b and a["per"] and b["per"]:
                ratios.append(
                    f"N={nw} {statistics.median(b['per']) / statistics.median(a['per']):.2f}x"
                )
        if ratios:
            print(
                f"  (no target) time per worker, {labels[key]} / aioshm Pool: {', '.join(ratios)}"
            )


def _shm_entries() -> set[str]:
    with contextlib.suppress(OSError):
        return {e for e in os.listdir("/dev/shm") if e.startswith(("aioshm", "psm_"))}
    return set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mib", type=int, default=None, help="array size in MiB (default 512)")
    ap.add_argument("--ns", type=int, nargs="+", default=None, help="worker counts (1 2 4 8)")
    ap.add_argument("--reps", type=int, default=None, help="repeats (default 3; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help="64 MiB, N = 1 2 4, 1 repeat")
    ap.add_argument("--only", nargs="+", choices=[k for k, _ in ROWS], default=None)
    args = ap.parse_args()
    mib = args.mib or (64 if args.quick else 512)
    ns = args.ns or ([1, 2, 4] if args.quick else [1, 2, 4, 8])
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    keys = args.only or [k for k, _ in ROWS]
    before = _shm_entries()
    print(f"P8 fan-out: {mib} MiB, N = {ns}, {CORES} cores; load average {os.getloadavg()[0]:.1f}")
    try:
        res = asyncio.run(measure(keys, ns, (mib << 20) // 4, reps))
        report(res, keys, ns, mib, reps)
    finally:
        left = list(stdmp.active_children())
        for p in left:
            p.kill()
            p.join()
        if left:
            print(f"  killed {len(left)} leftover children")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    gone = _shm_entries() - before
    # aioshm's default segments are memfds (never in /dev/shm); a psm_ entry is ours or another
    # run's on this machine
    print(f"new aioshm*/psm_* entries in /dev/shm: {sorted(gone) if gone else 'none'}")


if __name__ == "__main__":
    main()
