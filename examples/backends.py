"""One script, two backends: the same aioshm calls on local processes or on a Ray cluster.

    python examples/backends.py --backend local
    python examples/backends.py --backend ray      # needs: pip install aioshm[ray]

spawn, a Pool, run_sync and a Queue, all carrying numpy arrays. The code never writes into an
array it received: on the local backend a shared array is writable memory shared with the
parent, on Ray it is a read-only zero-copy view, so portable code returns its results.
(Ray listens on every interface; run it inside ``unshare -n`` to keep it on loopback.)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import anyio
import numpy as np

import aioshm


def rank_stats(rank: int, a: np.ndarray, nprocs: int) -> tuple[int, float]:
    """Rank ``rank`` sums its slice of the shared array."""
    part = np.array_split(a, nprocs)[rank]
    return rank, float(part.sum())


def scaled(a: np.ndarray, k: float) -> np.ndarray:
    return a * k  # a new array: returned to the caller (read-only there on Ray)


def norm(row: np.ndarray) -> float:
    return float(np.sqrt((row * row).sum()))


def produce(rank: int, q: Any, n: int) -> int:
    for i in range(n):
        q.put((rank, i, np.full(1000, float(i))))
    return n


async def main(backend_name: str) -> None:
    backend: Any
    if backend_name == "ray":
        backend = aioshm.RayBackend("local", num_cpus=2, log_to_driver=False)
    else:
        backend = aioshm.LocalBackend()
    t0 = time.perf_counter()
    async with backend:
        a = aioshm.zeros(1_000_000)  # 8 MB in shared memory
        a[:] = np.arange(a.size) % 10

        # spawn: every rank gets the array (zero-copy); results come back in rank order
        results = await aioshm.spawn(rank_stats, (a, 4), nprocs=4, backend=backend)
        assert [r for r, _ in results] == [0, 1, 2, 3]
        assert sum(s for _, s in results) == float(a.sum())

        # run_sync: one call; the returned array comes back (read-only on Ray)
        doubled = await aioshm.run_sync(scaled, a, 2.0, backend=backend)
        assert doubled.shape == a.shape and float(doubled.sum()) == 2 * float(a.sum())

        # a pool: map over rows, and errors arrive as the original exception type
        rows = [np.full(100, float(i)) for i in range(16)]
        async with aioshm.Pool(2, backend=backend) as pool:
            norms = await pool.map_async(norm, rows)
            assert norms == [norm(r) for r in rows]
            total = 0.0
            async for value in pool.imap_unordered(norm, rows):
                total += value
            assert abs(total - sum(norms)) < 1e-6
            try:
                await pool.apply_async(np.array_split, (a, 0))
            except ValueError as exc:
                assert isinstance(exc.__cause__, aioshm.RemoteTraceback)
            else:
                raise AssertionError("expected a ValueError")

        # a queue that a worker fills with arrays
        q = aioshm.Queue(backend=backend)
        try:
            assert await aioshm.spawn(produce, (q, 5), nprocs=1, backend=backend) == [5]
            items = [await q.get_async() for _ in range(5)]
            assert [i for _, i, _ in items] == [0, 1, 2, 3, 4]
            assert float(items[4][2].sum()) == 4000.0
        finally:
            q.close()
    print(f"backend={backend_name}: ok ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("local", "ray"), default="local")
    parser.add_argument("--loop", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args()
    anyio.run(main, args.backend, backend=args.loop)
