"""W3: 5,000 tiny tasks (``inc(x) = x + 1``) on 2 warm workers, from an asyncio parent.

Every implementation runs in this one interpreter, each with its own warm pool of 2 workers
(forkserver where the library lets us choose), all started and warmed before the first timed
repeat. Repeats are interleaved (repeat 1 of every row, then repeat 2, ...), with the row order
rotated each repeat, so load drifting on a shared machine hits every row alike; ratios are
medians of per-repeat ratios. A row whose single run takes under 20 ms (the auto-chunked maps)
is timed as the median of 5 back-to-back runs per repeat.

Rows:

* ``aioshm_apply``: ``asyncio.gather(*(pool.apply_async(inc, (i,)) for i in range(n)))`` on an
  ``aioshm.Pool(2)``: one awaitable per task, all awaited at once;
* ``aioshm_map`` / ``aioshm_map1``: ``await pool.map_async(inc, xs)`` with the automatic
  chunksize, and with ``chunksize=1``;
* ``aioshm_run_sync``: ``aioshm.run_sync(inc, i, limiter=CapacityLimiter(2))``, gathered (the
  loop's default pool; for reference);
* ``mp_map1`` / ``mp_map``: stdlib ``multiprocessing`` (forkserver) ``Pool(2).map(inc, xs,
  chunksize=1)`` and with the automatic chunksize, called directly in the coroutine (it
  blocks the loop for the whole batch, which costs nothing here since nothing else runs);
* ``aiomp_map``: ``await aiomultiprocess.Pool(2).map(ainc, xs)`` (it only takes coroutine
  functions; ``ainc`` is ``async def`` ``x + 1``);
* ``anyio``: ``anyio.to_process.run_sync(inc, i, limiter=CapacityLimiter(2))``, gathered;
* ``ppe``: ``loop.run_in_executor(ProcessPoolExecutor(2), inc, i)`` for every i, gathered.

The table gives tasks/s (median), µs per task, and the parent's CPU time per task
(``time.process_time()``: the whole parent, all its threads; it is far less noisy than the
wall time on a shared machine, and shows how much of the 2 cores the parent itself takes).

Targets (printed with PASS/FAIL; the exit status is 0 whatever the timings):

* aioshm per-task awaits (``aioshm_apply``) >= 1.0x the throughput of stdlib
  ``Pool.map(chunksize=1)``, and >= 3.5x ``anyio.to_process``;
* aioshm ``map_async`` (auto chunksize) >= 0.5x stdlib ``Pool.map`` (auto chunksize).

``--profile`` then runs the ``aioshm_apply`` row once more under cProfile in the parent, and
once in a separate pool whose workers run under cProfile (a pool ``initializer`` starts it; a
dump task writes it out), and prints where the time goes, per task.

Usage::

    .venv/bin/python benchmarks/bench_pool.py              # 5,000 tasks x 7 repeats (~45 s)
    .venv/bin/python benchmarks/bench_pool.py --quick      # 5,000 tasks x 3 repeats (~20 s)
    .venv/bin/python benchmarks/bench_pool.py --only aioshm_apply mp_map1 --profile
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import multiprocessing as stdmp
import os
import pstats
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import _bench_targets as targets
import anyio
import anyio.to_process
from _bench_report import per_rep_ratio, verdict

import aioshm

START_METHOD = "forkserver"
WORKERS = 2
#: A row whose single run is shorter than this is timed as the median of INNER runs.
SHORT_RUN = 0.020
INNER = 5

#: (key, label); the order of the table
ROWS: list[tuple[str, str]] = [
    ("aioshm_apply", "aioshm apply_async per task, gathered"),
    ("aioshm_map", "aioshm map_async, auto chunksize"),
    ("aioshm_map1", "aioshm map_async, chunksize=1"),
    ("aioshm_run_sync", "aioshm.run_sync, CapacityLimiter(2), gathered"),
    ("mp_map1", "stdlib Pool.map, chunksize=1"),
    ("mp_map", "stdlib Pool.map, auto chunksize"),
    ("aiomp_map", "aiomultiprocess Pool.map"),
    ("anyio", "anyio.to_process.run_sync, CapacityLimiter(2), gathered"),
    ("ppe", "ProcessPoolExecutor(2) + run_in_executor, gathered"),
]

Run = Callable[[list[int]], Awaitable[list[int]]]


# --------------------------------------------------------------------------- implementations


@contextlib.asynccontextmanager
async def aioshm_pool(kind: str) -> AsyncIterator[Run]:
    pool = aioshm.Pool(WORKERS, context=START_METHOD)
    try:
        inc = targets.inc

        if kind == "apply":

            async def run(xs: list[int]) -> list[int]:
                return list(await asyncio.gather(*(pool.apply_async(inc, (x,)) for x in xs)))

        else:
            chunksize = 1 if kind == "map1" else None

            async def run(xs: list[int]) -> list[int]:
                return await pool.map_async(inc, xs, chunksize)  # type: ignore[no-any-return]

        run.pool = pool  # type: ignore[attr-defined]  # for --profile
        yield run
    finally:
        await pool.terminate_async()


@contextlib.asynccontextmanager
async def aioshm_run_sync() -> AsyncIterator[Run]:
    # run_sync uses the loop's default pool (os.cpu_count() workers, started on demand); it is
    # stopped when the loop ends.
    limiter = anyio.CapacityLimiter(WORKERS)
    inc, run_sync = targets.inc, aioshm.run_sync

    async def run(xs: list[int]) -> list[int]:
        return list(await asyncio.gather(*(run_sync(inc, x, limiter=limiter) for x in xs)))

    yield run


@contextlib.asynccontextmanager
async def stdlib_pool(chunksize: int | None) -> AsyncIterator[Run]:
    pool = stdmp.get_context(START_METHOD).Pool(WORKERS)
    try:
        inc = targets.inc

        async def run(xs: list[int]) -> list[int]:
            return pool.map(inc, xs, chunksize)

        yield run
    finally:
        pool.terminate()
        pool.join()


@contextlib.asynccontextmanager
async def aiomp_pool() -> AsyncIterator[Run]:
    import aiomultiprocess

    aiomultiprocess.set_start_method(START_METHOD)
    pool = aiomultiprocess.Pool(processes=WORKERS)
    try:
        ainc = targets.ainc

        async def run(xs: list[int]) -> list[int]:
            return list(await pool.map(ainc, xs))

        yield run
    finally:
        pool.terminate()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.join(), 10)
        # aiomultiprocess keeps a module-level SyncManager process; stop it too
        from aiomultiprocess import core

        if core._manager is not None:
            with contextlib.suppress(Exception):
                core._manager.shutdown()
            core._manager = None


@contextlib.asynccontextmanager
async def anyio_to_process() -> AsyncIterator[Run]:
    # anyio's workers are stopped when the loop ends
    limiter = anyio.CapacityLimiter(WORKERS)
    inc, run_sync = targets.inc, anyio.to_process.run_sync

    async def run(xs: list[int]) -> list[int]:
        return list(await asyncio.gather(*(run_sync(inc, x, limiter=limiter) for x in xs)))

    yield run


@contextlib.asynccontextmanager
async def ppe_pool() -> AsyncIterator[Run]:
    ex = ProcessPoolExecutor(WORKERS, mp_context=stdmp.get_context(START_METHOD))
    try:
        loop = asyncio.get_running_loop()
        inc = targets.inc

        async def run(xs: list[int]) -> list[int]:
            return list(await asyncio.gather(*(loop.run_in_executor(ex, inc, x) for x in xs)))

        yield run
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


FACTORIES: dict[str, Callable[[], contextlib.AbstractAsyncContextManager[Run]]] = {
    "aioshm_apply": lambda: aioshm_pool("apply"),
    "aioshm_map": lambda: aioshm_pool("map"),
    "aioshm_map1": lambda: aioshm_pool("map1"),
    "aioshm_run_sync": aioshm_run_sync,
    "mp_map1": lambda: stdlib_pool(1),
    "mp_map": lambda: stdlib_pool(None),
    "aiomp_map": aiomp_pool,
    "anyio": anyio_to_process,
    "ppe": ppe_pool,
}


# --------------------------------------------------------------------------- measuring


async def _timed(run: Run, xs: list[int], expect: list[int]) -> tuple[float, float]:
    c0 = time.process_time()
    t0 = time.perf_counter()
    got = await run(xs)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if got != expect:
        raise AssertionError(f"wrong results (first items {got[:3]!r})")
    return wall, cpu


async def measure(
    keys: list[str], n: int, reps: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per row: wall seconds per run and parent CPU seconds per run, one sample per repeat."""
    xs = list(range(n))
    expect = [x + 1 for x in xs]
    samples: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    inner: dict[str, int] = {}
    errors: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        runs: dict[str, Run] = {}
        for key in keys:
            try:
                run = await stack.enter_async_context(FACTORIES[key]())
                # warm: start every worker, import the target, fill caches; then size the row
                await _timed(run, xs[:200], expect[:200])
                wall, _ = await _timed(run, xs, expect)
                inner[key] = INNER if wall < SHORT_RUN else 1
                runs[key] = run
            except Exception as exc:
                errors[key] = f"{type(exc).__name__}: {exc}"
        print(f"  {len(runs)} pools started and warmed", flush=True)
        order = [k for k in keys if k in runs]
        for rep in range(reps):
            # rotate the order, so no row always runs right after the same neighbour
            shift = rep % max(1, len(order))
            for key in order[shift:] + order[:shift]:
                try:
                    got = [await _timed(runs[key], xs, expect) for _ in range(inner[key])]
                except Exception as exc:
                    errors[key] = f"{type(exc).__name__}: {exc}"
                    continue
                samples[key].append(statistics.median(w for w, _ in got))
                cpu[key].append(statistics.median(c for _, c in got))
            print(f"  repeat {rep + 1}/{reps} done", flush=True)
    for key, err in errors.items():
        print(f"  {key}: FAILED: {err}", flush=True)
    return samples, cpu


# --------------------------------------------------------------------------- reporting


def report(samples: dict[str, list[float]], cpu: dict[str, list[float]], n: int, reps: int) -> None:
    print()
    print(f"W3: {n:,} x inc(x) on {WORKERS} warm workers, {reps} repeats, medians")
    print("(speed ratios are medians of per-repeat time ratios; > 1x means aioshm is faster)")
    print()
    head = f"| {'implementation':<56} | {'tasks/s':>10} | {'µs / task':>9} "
    head += f"| {'parent CPU µs/task':>18} | {'spread (tasks/s)':>21} |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for key, label in ROWS:
        s = samples.get(key)
        if s is None:
            continue
        if not s:
            print(f"| {label:<56} | {'failed':>10} | {'':>9} | {'':>18} | {'':>21} |")
            continue
        med = statistics.median(s)
        pc = statistics.median(cpu[key]) / n * 1e6
        spread = f"{n / max(s):,.0f}-{n / min(s):,.0f}"
        print(
            f"| {label:<56} | {n / med:>10,.0f} | {med / n * 1e6:>9.1f} | {pc:>18.1f} "
            f"| {spread:>21} |"
        )
    print()
    print("Targets (throughput ratios):")
    g = {k: samples.get(k) or [] for k in ("aioshm_apply", "aioshm_map", "mp_map1", "mp_map")}
    anyio_s = samples.get("anyio") or []
    checks: list[tuple[str, list[float], list[float], float]] = [
        ("aioshm apply_async gathered vs stdlib Pool.map(chunksize=1)", g["aioshm_apply"],
         g["mp_map1"], 1.0),
        ("aioshm apply_async gathered vs anyio.to_process", g["aioshm_apply"], anyio_s, 3.5),
        ("aioshm map_async (auto) vs stdlib Pool.map (auto)", g["aioshm_map"], g["mp_map"], 0.5),
    ]  # fmt: skip
    ran = False
    for name, ours, theirs, goal in checks:
        if not ours or not theirs:
            continue
        ran = True
        value = per_rep_ratio(theirs, ours)  # time ratio theirs/ours = throughput ours/theirs
        print(f"  {verdict(value >= goal)}  {name}: {value:.2f}x (target >= {goal}x)")
    if not ran:
        print("  (not enough rows ran to check the targets)")
    others = [
        ("aioshm map_async(chunksize=1) vs stdlib Pool.map(chunksize=1)", "aioshm_map1", "mp_map1"),
        ("aioshm apply_async gathered vs aiomultiprocess Pool.map", "aioshm_apply", "aiomp_map"),
        ("aioshm apply_async gathered vs ProcessPoolExecutor + gather", "aioshm_apply", "ppe"),
        ("aioshm.run_sync vs anyio.to_process", "aioshm_run_sync", "anyio"),
    ]
    lines = [
        f"  {name}: {per_rep_ratio(samples[b], samples[a]):.2f}x"
        for name, a, b in others
        if samples.get(a) and samples.get(b)
    ]
    if lines:
        print("Other ratios (no target):")
        print("\n".join(lines))


# --------------------------------------------------------------------------- --profile


def _print_stats(prof: Any, n: int, title: str, limit: int) -> None:
    out = io.StringIO()
    st = prof if isinstance(prof, pstats.Stats) else pstats.Stats(prof)
    st.stream = out  # type: ignore[attr-defined]
    total = st.total_tt  # type: ignore[attr-defined]
    print(f"\n--- {title}: {total:.3f} s profiled, {total / n * 1e6:.1f} µs per task ---")
    st.sort_stats("tottime").print_stats(limit)
    print("\n".join(out.getvalue().splitlines()[-limit - 3 :]))
    out.seek(0)
    out.truncate()
    st.sort_stats("cumulative").print_stats(limit)
    print("\n".join(out.getvalue().splitlines()[-limit - 3 :]))


async def phase_split(pool: aioshm.Pool, xs: list[int], expect: list[int]) -> None:
    """Without a profiler: the time to create the awaitables vs the time to await them."""
    inc, n = targets.inc, len(xs)
    t0 = time.perf_counter()
    results = [pool.apply_async(inc, (x,)) for x in xs]
    t1 = time.perf_counter()
    ready = sum(r.ready() for r in results)
    got = await asyncio.gather(*results)
    t2 = time.perf_counter()
    assert list(got) == expect
    print(
        f"\nphase split (no profiler): {n:,} apply_async calls {(t1 - t0) / n * 1e6:.1f} µs/task "
        f"({ready:,} already done when the last was submitted); "
        f"gather of the awaitables {(t2 - t1) / n * 1e6:.1f} µs/task"
    )


async def micro_costs(pool: aioshm.Pool) -> None:
    """Unprofiled cost of the pieces each pump step pays (uses aioshm internals; best effort)."""
    from anyio.lowlevel import cancel_shielded_checkpoint, checkpoint_if_cancelled

    def per_call(fn: Callable[[], object], k: int = 20_000) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        return (time.perf_counter() - t0) / k * 1e6

    print("micro costs in this parent (µs per call, no profiler):")
    try:
        w = pool._workers[0]
        rows = [
            ("Process.is_alive() (forkserver popen.poll)", w.proc.is_alive),
            ("results.try_recv_record() on an empty channel", w.results.try_recv_record),
            ("Pool._step() with nothing to do", pool._step),
            ("os.getpid() (a bare syscall, for scale)", os.getpid),
        ]
        for name, fn in rows:
            print(f"  {per_call(fn):6.2f}  {name}")
        task = (1, targets.inc, (1,), {})
        print(
            f"  {per_call(lambda: w.tasks.encode(task)):6.2f}  tasks.encode((id, inc, (1,), {{}}))"
        )
    except Exception as exc:
        print(f"  (internals changed: {type(exc).__name__}: {exc})")
    k = 20_000
    t0 = time.perf_counter()
    for _ in range(k):
        await checkpoint_if_cancelled()
    t1 = time.perf_counter()
    for _ in range(k):
        await cancel_shielded_checkpoint()
    t2 = time.perf_counter()
    for _ in range(k):
        await asyncio.sleep(0)
    t3 = time.perf_counter()
    print(f"  {(t1 - t0) / k * 1e6:6.2f}  anyio checkpoint_if_cancelled()")
    print(f"  {(t2 - t1) / k * 1e6:6.2f}  anyio cancel_shielded_checkpoint() (a loop pass)")
    print(f"  {(t3 - t2) / k * 1e6:6.2f}  asyncio.sleep(0) (a bare loop pass)")


async def profile_apply(n: int, limit: int) -> None:
    """cProfile the parent over one ``aioshm_apply`` run, then the workers over another."""
    xs = list(range(n))
    expect = [x + 1 for x in xs]
    async with aioshm_pool("apply") as run:
        await _timed(run, xs, expect)
        prof = cProfile.Profile()
        prof.enable()
        try:
            await run(xs)
        finally:
            prof.disable()
        _print_stats(prof, n, "parent, aioshm apply_async gathered (cProfile)", limit)
        await phase_split(run.pool, xs, expect)  # type: ignore[attr-defined]
        await micro_costs(run.pool)  # type: ignore[attr-defined]

    tmp = tempfile.mkdtemp(prefix="bench_pool_prof_")
    pool = aioshm.Pool(WORKERS, context=START_METHOD, initializer=targets.profile_worker_start)
    try:
        await asyncio.gather(*(pool.apply_async(targets.inc, (x,)) for x in xs[:200]))
        await asyncio.gather(*(pool.apply_async(targets.inc, (x,)) for x in xs))
        # 2 dumps per worker, sent in order: each worker gets at least one
        pids = await asyncio.gather(
            *(pool.apply_async(targets.profile_worker_dump, (tmp, 0.2)) for _ in range(2 * WORKERS))
        )
        files = [os.path.join(tmp, f) for f in os.listdir(tmp)]
        print(f"\n(worker pids {sorted(set(pids))}; {len(files)} worker profiles)")
        if files:
            st = pstats.Stats(files[0])
            for f in files[1:]:
                st.add(f)
            # the worker profile includes its idle wait and the dump tasks' sleep
            _print_stats(st, n, "workers, summed, incl. idle waits (cProfile)", limit)
    finally:
        await pool.terminate_async()
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- main


def _reap_leftovers() -> None:
    """Kill any child process of ours that is still alive (by pid; ours only)."""
    for p in stdmp.active_children():
        with contextlib.suppress(Exception):
            if p.is_alive() and p.pid is not None:
                print(f"  leftover child {p.name} ({p.pid}): killing it", file=sys.stderr)
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)


async def amain(keys: list[str], n: int, reps: int, profile: bool, limit: int) -> None:
    samples, cpu = await measure(keys, n, reps)
    report(samples, cpu, n, reps)
    if profile:
        await profile_apply(n, limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("-n", type=int, default=5_000, help="tasks per run")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--only", nargs="+", choices=list(FACTORIES), default=None)
    parser.add_argument(
        "--profile", action="store_true", help="cProfile aioshm_apply (parent and workers)"
    )
    parser.add_argument("--profile-lines", type=int, default=25)
    args = parser.parse_args()
    reps = args.reps or (3 if args.quick else 7)
    keys = [k for k, _ in ROWS if args.only is None or k in args.only]
    print(
        f"python {sys.version.split()[0]}, pid {os.getpid()}, nproc {os.cpu_count()}, "
        f"loadavg {' '.join(f'{x:.2f}' for x in os.getloadavg())}, start method {START_METHOD}",
        flush=True,
    )
    try:
        asyncio.run(amain(keys, args.n, reps, args.profile, args.profile_lines))
    except Exception as exc:
        print(f"benchmark failed: {type(exc).__name__}: {exc}", flush=True)
    finally:
        _reap_leftovers()
    print(f"\nloadavg at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
