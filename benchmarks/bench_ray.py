"""The Ray backend against plain Ray and the local backend, in one run.

    unshare -n sh -c 'ip link set lo up && .venv/bin/python benchmarks/bench_ray.py'

Two workloads, each on three paths:

* **64 MiB call**: a task that sums a 64 MiB float32 array and returns a float.
  local = ``await aioshm.run_sync(f, shared_array)``; aioshm-ray = ``await rb.run_sync(f,
  handle)`` with ``handle = await rb.put_array(a)`` made once (and, for reference, passing the
  ndarray itself, which puts it again on every call); plain Ray = ``await f.remote(ref)`` with
  ``ref = ray.put(a)`` made once.
* **tiny tasks**: ``N`` calls of ``x + 1``, each awaited before the next (per-call overhead).
  local = ``aioshm.run_sync``; aioshm-ray = ``rb.run_sync``; plain Ray = ``await f.remote(x)``.

Targets: aioshm's Ray backend within 1.2x of plain Ray; the local backend ahead of both.
Median of the per-call times (64 MiB) and of ``--repeat`` whole runs (tiny tasks).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

import aioshm

MIB = 1 << 20


def array_sum(a: np.ndarray) -> float:
    return float(a.sum())


def plus_one(x: int) -> int:
    return x + 1


async def per_call(fn: Callable[[], Awaitable[Any]], calls: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        await fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t)
    return times


async def tiny(call: Callable[[int], Awaitable[Any]], n: int, repeat: int) -> list[float]:
    for i in range(20):
        await call(i)
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        for i in range(n):
            await call(i)
        runs.append(time.perf_counter() - t)
    return runs


async def main(args: argparse.Namespace) -> None:
    import ray

    a = aioshm.empty(64 * MIB // 4, dtype=np.float32)
    a[:] = 1.0
    big: dict[str, float] = {}
    small: dict[str, float] = {}
    rows = {"64 MiB call (ms)": big, f"{args.tasks} tiny tasks (s)": small}

    # local backend
    big["local"] = statistics.median(
        await per_call(lambda: aioshm.run_sync(array_sum, a), args.calls)
    )
    small["local"] = statistics.median(
        await tiny(lambda i: aioshm.run_sync(plus_one, i), args.tasks, args.repeat)
    )

    async with aioshm.RayBackend("local", num_cpus=2, log_to_driver=False) as rb:
        handle = await rb.put_array(a)
        big["aioshm-ray"] = statistics.median(
            await per_call(lambda: rb.run_sync(array_sum, handle), args.calls)
        )
        big["aioshm-ray (ndarray arg, put per call)"] = statistics.median(
            await per_call(lambda: rb.run_sync(array_sum, a), args.calls)
        )
        small["aioshm-ray"] = statistics.median(
            await tiny(lambda i: rb.run_sync(plus_one, i), args.tasks, args.repeat)
        )

        remote_sum = ray.remote(max_retries=0)(array_sum)
        remote_plus = ray.remote(max_retries=0)(plus_one)
        ref = ray.put(a)

        async def plain_big() -> Any:
            return await remote_sum.remote(ref)

        async def plain_small(i: int) -> Any:
            return await remote_plus.remote(i)

        big["plain Ray"] = statistics.median(await per_call(plain_big, args.calls))
        small["plain Ray"] = statistics.median(await tiny(plain_small, args.tasks, args.repeat))

    print(f"\n{'workload':<22} {'path':<40} {'median':>10}")
    for workload, paths in rows.items():
        scale = 1000.0 if "ms" in workload else 1.0
        for path, value in paths.items():
            print(f"{workload:<22} {path:<40} {value * scale:>10.3f}")
    print("\nratios (lower is better; target: aioshm-ray/plain <= 1.2, local/… < 1)")
    for workload, paths in rows.items():
        plain = paths["plain Ray"]
        print(
            f"{workload:<22} aioshm-ray/plain = {paths['aioshm-ray'] / plain:.2f}   "
            f"local/plain = {paths['local'] / plain:.2f}   "
            f"local/aioshm-ray = {paths['local'] / paths['aioshm-ray']:.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=15, help="64 MiB calls per path")
    parser.add_argument("--tasks", type=int, default=5000, help="tiny tasks per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the tiny tasks")
    asyncio.run(main(parser.parse_args()))
