"""An async consumer fed by compute processes through an ``aioshm.Queue``.

``aioshm.spawn`` starts ``PRODUCERS`` processes running plain synchronous code: each computes
``ITEMS`` arrays and ``put``s them on one bounded queue (a full queue blocks the producer, never
the consumer's event loop). The arrays come in three kinds, to show how each travels:

- ``shared``: allocated with ``aioshm.empty`` in the producer, so only a handle crosses;
- ``large``: a plain 1 MiB ndarray, copied once into a recycled segment and sent as a handle;
- ``small``: a plain 800-byte ndarray, pickled inline.

The async consumer ``async for``s over the queue and aggregates per producer. Once every
producer has returned (``await`` on the spawn context), the parent calls ``q.shutdown()``: the
consumer's loop drains what is left and ends. Each producer returns the checksum of what it
sent, which the consumer's totals must match. Run: ``python examples/queue_consumer.py``.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import anyio
import numpy as np

import aioshm

PRODUCERS = 3
ITEMS = 12  # per producer
LARGE = 1 << 17  # float64s: 1 MiB
SMALL = 100


def produce(rank: int, q: aioshm.Queue, items: int) -> float:
    """Runs in a child process (sync code): compute arrays and put them on the queue."""
    rng = np.random.default_rng(rank)
    checksum = 0.0
    for i in range(items):
        kind = ("shared", "large", "small")[i % 3]
        if kind == "shared":
            a = aioshm.empty((256, 512))  # 1 MiB in shared memory: only a handle is sent
            a[...] = rng.standard_normal(a.shape)
        elif kind == "large":
            a = np.cumsum(rng.standard_normal(LARGE))  # plain array: one copy into a segment
        else:
            a = rng.standard_normal(SMALL)  # small: pickled inline
        checksum += float(a.sum())
        q.put((rank, i, kind, a))
    return checksum


async def consume(q: aioshm.Queue, totals: dict[int, float], stats: Counter[str]) -> None:
    """The async consumer: aggregate every array until the queue is shut down and drained."""
    async for rank, _i, kind, a in q:
        totals[rank] += float(a.sum())
        stats[kind] += 1
        stats["bytes"] += a.nbytes
        stats["arrived as shared memory"] += aioshm.is_shared(a)


async def main() -> None:
    q = aioshm.Queue(maxsize=4)
    totals: dict[int, float] = defaultdict(float)
    stats: Counter[str] = Counter()
    start = time.perf_counter()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume, q, totals, stats)
            sent = await aioshm.spawn(produce, args=(q, ITEMS), nprocs=PRODUCERS)
            q.shutdown()  # every producer returned: let the consumer drain and stop
    finally:
        q.close()
    elapsed = time.perf_counter() - start

    received = stats["shared"] + stats["large"] + stats["small"]
    print(
        f"received {received} arrays ({stats['bytes'] / 2**20:.1f} MiB) "
        f"from {PRODUCERS} producers in {elapsed:.2f} s"
    )
    print(
        f"kinds: shared={stats['shared']} large={stats['large']} small={stats['small']}; "
        f"arrived as shared memory: {stats['arrived as shared memory']}"
    )
    ok = received == PRODUCERS * ITEMS and all(
        np.isclose(totals[rank], sent[rank], rtol=1e-12, atol=1e-9) for rank in range(PRODUCERS)
    )
    for rank in range(PRODUCERS):
        print(f"producer {rank}: sent sum {sent[rank]:.6f}, received sum {totals[rank]:.6f}")
    print("checksums match" if ok else "CHECKSUM MISMATCH")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    anyio.run(main)
