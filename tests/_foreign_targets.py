"""Importable child targets for ``test_foreign_channels.py``: senders on stdlib channels.

Each imports aioshm (so its reducers are registered in the child, as in a user's program) and
returns or exits as soon as it has handed its arrays to the channel.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import aioshm
from aioshm import _shm

N = 1 << 17  # float64 elements: 1 MiB


def arrays(strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """A plain 1 MiB array and a shared one (on a segment of ``strategy``)."""
    _shm.set_sharing_strategy(strategy)
    plain = np.arange(N, dtype=np.float64)
    return plain, aioshm.share(plain[::-1])


def put_arrays(q: Any, strategy: str) -> None:
    """Put both arrays on a stdlib queue and exit."""
    q.put(arrays(strategy))


def send_arrays(conn: Any, strategy: str) -> None:
    """Send both arrays over a stdlib connection and exit."""
    conn.send(arrays(strategy))
    conn.close()


def make_array(i: int) -> np.ndarray:
    """A 1 MiB result (a pool task)."""
    return np.full(N, float(i))


def make_shared(i: int) -> np.ndarray:
    """A 1 MiB result on a shared segment (a pool task)."""
    return aioshm.share(np.full(N, float(i)))


def total(a: np.ndarray) -> float:
    """The sum of an array argument (a pool task)."""
    return float(a.sum())
