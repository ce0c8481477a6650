"""Chaos: producers and consumers on one bounded queue, SIGKILLed at random (issue 12).

Afterwards the queue has exactly its capacity (``qsize() == 0``, ``maxsize`` puts fit and one
more does not), no item was delivered twice, and no more items were lost than consumers were
killed (a consumer killed between ``get`` returning and its bookkeeping loses that one item;
nothing else may). The seed is printed; ``AIOSHM_CHAOS_SEED`` replays a run.
"""

from __future__ import annotations

import mmap
import os
import queue
import random
import signal
import sys
import time
from multiprocessing.connection import wait
from typing import Any

import numpy as np
import pytest

import aioshm.multiprocessing as mp

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork + OFD locks"),
]

MAXSIZE = 16
PRODUCERS = 2  # alive at a time
CONSUMERS = 2
MAX_INSTANCES = 256  # producer rows in the bookkeeping
PER_PRODUCER = 50_000  # items a producer instance puts at most
CHAOS_SECONDS = 12.0
ARRAY_EVERY = 16  # every this many items carry an array (its fd rides with the record)


class Board:
    """Bookkeeping in an anonymous shared mapping, inherited by forked children."""

    def __init__(self) -> None:
        n_words = 2 + MAX_INSTANCES + MAX_INSTANCES
        self._map = mmap.mmap(-1, 8 * n_words + MAX_INSTANCES * PER_PRODUCER)
        words = np.frombuffer(self._map, dtype=np.int64, count=n_words)
        self.stop = words[0:1]  # producers stop putting when set
        self.confirmed = words[2 : 2 + MAX_INSTANCES]  # per producer: puts that returned
        self.dups = words[2 + MAX_INSTANCES :]  # per consumer: items seen twice
        self.seen = np.frombuffer(
            self._map, dtype=np.uint8, offset=8 * n_words, count=MAX_INSTANCES * PER_PRODUCER
        ).reshape(MAX_INSTANCES, PER_PRODUCER)


def _produce(q: Any, board: Board, me: int) -> None:
    for seq in range(PER_PRODUCER):
        if board.stop[0]:
            return
        payload = np.full(8192, seq, dtype=np.int64) if seq % ARRAY_EVERY == 0 else None
        q.put((me, seq, payload))
        board.confirmed[me] = seq + 1


def _consume(q: Any, board: Board, me: int) -> None:
    while True:
        item = q.get()
        if item is None:
            return
        producer, seq, payload = item
        if payload is not None and not (payload.shape == (8192,) and payload[0] == seq):
            os._exit(3)  # corrupted array
        if board.seen[producer, seq]:
            board.dups[me] += 1
        board.seen[producer, seq] = 1


def test_random_kills_of_producers_and_consumers_keep_the_queue_exact() -> None:
    seed = int(os.environ.get("AIOSHM_CHAOS_SEED", random.randrange(2**32)))
    print(f"chaos seed={seed} (AIOSHM_CHAOS_SEED={seed} replays it)")
    rng = random.Random(seed)
    ctx = mp.get_context("fork")
    q = ctx.Queue(maxsize=MAXSIZE)
    board = Board()
    next_id = {"producer": 0, "consumer": 0}
    live: dict[str, list[Any]] = {"producer": [], "consumer": []}
    kills = {"producer": 0, "consumer": 0}

    def start(role: str) -> None:
        me = next_id[role]
        next_id[role] += 1
        assert me < MAX_INSTANCES
        target = _produce if role == "producer" else _consume
        p = ctx.Process(target=target, args=(q, board, me), daemon=True)
        p.start()
        live[role].append(p)

    try:
        for _ in range(PRODUCERS):
            start("producer")
        for _ in range(CONSUMERS):
            start("consumer")
        deadline = time.monotonic() + CHAOS_SECONDS
        while time.monotonic() < deadline:
            # a random moment: a wait on the children's sentinels with a random timeout
            wait([p.sentinel for ps in live.values() for p in ps], rng.uniform(0.01, 0.3))
            for role, ps in live.items():  # a producer that put all its items is done
                for p in [p for p in ps if p.exitcode is not None]:
                    assert p.exitcode == 0, f"{role} failed: exit code {p.exitcode}"
                    ps.remove(p)
                    start(role)
            role = rng.choice(["producer", "consumer"])
            victim = rng.choice(live[role])
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(30)
            live[role].remove(victim)
            if victim.exitcode == -signal.SIGKILL:
                kills[role] += 1
            start(role)

        board.stop[0] = 1
        for p in live["producer"]:
            p.join(60)
            assert p.exitcode == 0
        for _ in live["consumer"]:
            q.put(None)
        for p in live["consumer"]:
            p.join(60)
            assert p.exitcode == 0

        n = next_id["producer"]
        confirmed = board.confirmed[:n]
        delivered = int(board.seen[:n].sum())
        lost = sum(int((board.seen[i, : confirmed[i]] == 0).sum()) for i in range(n))
        duplicated = int(board.dups.sum())
        print(
            f"kills={kills} confirmed={int(confirmed.sum())} delivered={delivered} "
            f"lost={lost} duplicated={duplicated}"
        )
        assert delivered > 0
        assert duplicated == 0
        assert lost <= kills["consumer"]

        # exact capacity: empty, says so, takes maxsize and no more
        with pytest.raises(queue.Empty):
            q.get_nowait()
        assert q.qsize() == 0
        for i in range(MAXSIZE):
            q.put_nowait(i)
        with pytest.raises(queue.Full):
            q.put_nowait("one too many")
        assert q.qsize() == MAXSIZE
        assert [q.get_nowait() for _ in range(MAXSIZE)] == list(range(MAXSIZE))
    finally:
        for ps in live.values():
            for p in ps:
                if p.exitcode is None:
                    p.kill()
                p.join(30)
        q.close()
