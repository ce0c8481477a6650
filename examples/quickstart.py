"""The README's quickstart ("What aioshm is"), verbatim below the two header lines.

Run: ``python examples/quickstart.py``. Prints the per-rank results of ``spawn`` (rank 0 sees
1.0 or 2.0, depending on whether rank 1 already wrote), the norm of a million ones computed in
a child (1000.0), and the shared array back from the queue (``[1. 1. 0. 0.]``).
"""

# The README puts its three imports on one line, unsorted.
# ruff: noqa: I001
from __future__ import annotations

import anyio, numpy as np, aioshm


def work(rank: int, a: np.ndarray) -> float:  # plain sync code in the child
    a[rank] += 1  # writes land in the parent's array
    return float(a.sum())


async def main() -> None:
    a = aioshm.zeros(4)  # backed by shared memory
    print(await aioshm.spawn(work, args=(a,), nprocs=2))  # per-rank results, rank order
    q = aioshm.Queue(maxsize=8)
    p = aioshm.Process(target=np.linalg.norm, args=(aioshm.share(np.ones(10**6)),))
    print(await p)  # the target's return value
    await q.put_async(a)
    print(await q.get_async())


if __name__ == "__main__":
    anyio.run(main)
