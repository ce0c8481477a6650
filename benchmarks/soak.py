"""Soak and fuzz (outside CI): hostile input to every wire decoder, then MPMC queue traffic with
arrays on both sharing strategies while producers and consumers are SIGKILLed at random.

    .venv/bin/python benchmarks/soak.py --minutes 10
    .venv/bin/python benchmarks/soak.py --minutes 1 --seed 42 --fuzz-cases 20000
    .venv/bin/python benchmarks/soak.py --minutes 3 --kill producer   # then nothing may be lost

Prints, for the fuzz phase, the cases run per decoder and any that broke a rule (a decoder may
only return a consistent result or raise ProtocolError); for the traffic phase, messages/s,
lost and duplicated items (an item is lost if its put returned but no consumer recorded it; a
consumer killed between get and its bookkeeping may lose that one item, so "lost <= consumer
kills" is the promise, and 0 the goal when it holds no item), the USS slope of the long-lived
processes (the parent and one producer and one consumer per strategy that are never killed;
least squares over samples after the first minute, the shared bookkeeping mapping excluded),
and the parent's fds, threads and the run's shm entries before and after. Exits 0 whatever the
figures; the last line says whether the goals were met.

The RecordChannel fuzz feeds garbage pickles to the unpickler; CPython's own unpickler may
then print "SystemError: deallocated bytearray object has exported buffers" (plain
``pickle.loads`` of random bytes does the same, without aioshm): that line is not a failure.
"""

from __future__ import annotations

import argparse
import mmap
import os
import pickle
import queue
import random
import signal
import struct
import tempfile
import threading
import time
from multiprocessing.connection import wait
from typing import Any

_SHM_DIR = tempfile.mkdtemp(prefix="aioshm-soak-", dir="/dev/shm")
os.environ["AIOSHM_SHM_DIR"] = _SHM_DIR  # before aioshm is imported: this run's names only

import numpy as np
import psutil

import aioshm
import aioshm.multiprocessing as mp
from aioshm._connection import record_pair
from aioshm._exceptions import AioshmError, ProtocolError
from aioshm._wire import (
    FD_MAGIC,
    NEED_DATA,
    FdHeader,
    FrameDecoder,
    check_spill_file,
    encode_frame,
)

STRATEGIES = ("file_descriptor", "file_system")
MAXSIZE = 64
BOARD_BYTES = 1 << 30  # virtual; pages are touched only as items are recorded
SURVIVOR_ROW = 40_000_000
MORTAL_ROW = 400_000
ARRAY_EVERY = 4
# Each process keeps idle recycled segments mapped up to a bound (1 GiB by default), and a
# consumer receives segments from ever new producers: that bounded cache would fill for many
# minutes and hide a leak in the USS slope. It is bounded lower here.
POOL_LIMIT = int(os.environ.get("SOAK_POOL_LIMIT", str(16 << 20)))


# --------------------------------------------------------------------------- fuzz


def _fuzz_frames(rng: random.Random, cases: int) -> tuple[int, list[str]]:
    bad: list[str] = []
    for i in range(cases):
        frames = [
            rng.randbytes(rng.choice([0, 1, 5, 100, 20_000])) for _ in range(rng.randint(0, 4))
        ]
        stream = bytearray(b"".join(b"".join(encode_frame(f)) for f in frames))
        forged = rng.random() < 0.5
        if forged and stream:  # corrupt a few bytes anywhere (headers included)
            for _ in range(rng.randint(1, 3)):
                stream[rng.randrange(len(stream))] = rng.randrange(256)
        if rng.random() < 0.2:
            stream += struct.pack("!i", rng.choice([-1, -2, -(2**31), 2**31 - 1]))
        decoder = FrameDecoder(max_frame_size=rng.choice([64, 1 << 16, 1 << 30]))
        got: list[bytes] = []
        try:
            pos = 0
            while pos < len(stream):
                step = rng.randint(1, 50_000)
                decoder.receive_data(bytes(stream[pos : pos + step]))
                pos += step
                while (frame := decoder.next_frame()) is not NEED_DATA:
                    got.append(frame)
            decoder.receive_eof()
        except ProtocolError:
            continue
        except Exception as exc:
            bad.append(f"frames case {i}: {exc!r}")
            continue
        fits = all(len(f) <= decoder.max_frame_size for f in frames)
        if not forged and fits and got != frames:
            bad.append(f"frames case {i}: frames differ")
    return cases, bad


def _fuzz_fd_header(rng: random.Random, cases: int) -> tuple[int, list[str]]:
    bad: list[str] = []
    for i in range(cases):
        kind = rng.random()
        if kind < 0.3:
            data = rng.randbytes(rng.randint(0, 40))
        elif kind < 0.6:
            data = FD_MAGIC + rng.randbytes(rng.randint(0, 30))
        else:
            nfds = rng.choice([0, 1, 2, 253, 254, rng.randrange(2**32)])
            spilled = rng.choice([0, 1, rng.randrange(2**64)])
            data = FD_MAGIC + struct.pack("!IQ", nfds, spilled) + rng.randbytes(rng.randint(0, 8))
        fds = rng.choice([0, 1, 2, 3, 253, 254, rng.randint(0, 300)])
        try:
            header, body = FdHeader.split(data, fds=fds, spill=rng.random() < 0.5)
        except ProtocolError:
            continue
        except Exception as exc:
            bad.append(f"fd header case {i}: {exc!r}")
            continue
        if header is not None and header.fds_expected != fds:
            bad.append(f"fd header case {i}: {header} accepted with {fds} fds")
        if header is None and (fds or bytes(body) != data):
            bad.append(f"fd header case {i}: plain payload inconsistent")
    return cases, bad


def _fuzz_spill_file(rng: random.Random, cases: int) -> tuple[int, list[str]]:
    bad: list[str] = []
    modes = [0o100600, 0o040700, 0o020600, 0o140777, 0o010600, 0o120777]
    for i in range(cases):
        mode = rng.choice(modes)
        size = rng.choice([0, 10, rng.randrange(2**63)])
        announced = rng.choice([size, size + 1, rng.randrange(2**63)])
        sealed = rng.choice([True, False, None])
        try:
            check_spill_file(mode, size, announced, sealed=sealed)
        except ProtocolError:
            continue
        except Exception as exc:
            bad.append(f"spill case {i}: {exc!r}")
            continue
        if not (mode == 0o100600 and sealed is not False and size == announced):
            bad.append(f"spill case {i}: accepted mode={mode:o} sealed={sealed}")
    return cases, bad


def _fuzz_records(rng: random.Random, cases: int) -> tuple[int, list[str]]:
    """Forged records through a real record socketpair: the receiver raises ProtocolError (or
    the pickle's own error) and keeps no fd."""
    bad: list[str] = []
    reader, writer = record_pair()
    pool = []
    for _ in range(4):
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.write(fd, rng.randbytes(rng.randint(0, 64)))
        pool.append(fd)
    pool.append(os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY))
    base = len(os.listdir("/proc/self/fd"))
    try:
        for i in range(cases):
            kind = rng.random()
            if kind < 0.25:
                data = rng.randbytes(rng.randint(1, 64))
            elif kind < 0.5:
                data = FD_MAGIC + struct.pack("!IQ", rng.randint(0, 3), rng.choice([0, 10, 64]))
                data += rng.randbytes(rng.randint(0, 16))
            elif kind < 0.75:
                data = pickle.dumps(rng.randbytes(rng.randint(0, 32)))
            else:
                data = FdHeader(rng.randint(1, 2)).encode() + pickle.dumps(None)
            fds = rng.sample(pool, rng.randint(0, 3))
            writer.send_record(data, fds)
            got = reader.recv_record(5)
            try:
                reader.decode(*got)
            except (ProtocolError, AioshmError, pickle.UnpicklingError, EOFError, ValueError):
                pass
            except Exception as exc:  # a pickle's own errors are fine; say which
                pickle_errors = (
                    KeyError,
                    IndexError,
                    TypeError,
                    AttributeError,
                    OverflowError,
                    MemoryError,
                )
                if not isinstance(exc, pickle_errors):
                    bad.append(f"record case {i}: {exc!r}")
        if len(os.listdir("/proc/self/fd")) != base:
            bad.append(f"records: {len(os.listdir('/proc/self/fd')) - base} fds left open")
    finally:
        reader.close()
        writer.close()
        for fd in pool:
            os.close(fd)
    return cases, bad


# --------------------------------------------------------------------------- traffic


class Board:
    """Bookkeeping in an anonymous shared mapping (forked children inherit it)."""

    def __init__(self) -> None:
        self.map = mmap.mmap(-1, BOARD_BYTES)
        words = np.frombuffer(self.map, dtype=np.int64, count=8192)
        self.stop = words[0:1]
        self.confirmed = words[16:4096]  # per producer instance: puts that returned
        self.dups = words[4096:8192]  # per consumer instance
        self.bytes = np.frombuffer(self.map, dtype=np.uint8)
        self.start = 8 * 8192
        self.address = np.frombuffer(self.map, dtype=np.uint8).ctypes.data


def _produce(q: Any, board: Board, me: int, offset: int, cap: int, strategy: str) -> None:
    aioshm.set_sharing_strategy(strategy)
    aioshm.set_pool_limit(POOL_LIMIT)
    rng = random.Random(me)
    shared = aioshm.share(np.arange(4096, dtype=np.int32))
    for seq in range(cap):
        if board.stop[0]:
            return
        if seq % ARRAY_EVERY == 0:
            payload: Any = np.full(rng.choice([1024, 16384]), seq, dtype=np.int64)
        elif seq % ARRAY_EVERY == 1:
            payload = shared
        else:
            payload = None
        q.put((offset, seq, payload))
        board.confirmed[me] = seq + 1


def _consume(q: Any, board: Board, me: int, strategy: str) -> None:
    aioshm.set_sharing_strategy(strategy)
    aioshm.set_pool_limit(POOL_LIMIT)
    while True:
        item = q.get()
        if item is None:
            return
        offset, seq, payload = item
        if payload is not None and payload.dtype == np.int64 and payload[0] != seq:
            os._exit(3)  # a corrupted array
        cell = offset + seq
        if board.bytes[cell]:
            board.dups[me] += 1
        board.bytes[cell] = 1


def _uss(pid: int, board: Board) -> int:
    """Unique set size of ``pid`` without the shared bookkeeping mapping."""
    total = 0
    skip = False
    lo, hi = board.address, board.address + BOARD_BYTES
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                first = line.split(maxsplit=1)[0]
                if "-" in first and not first.endswith(":"):
                    start, end = (int(x, 16) for x in first.split("-"))
                    skip = start < hi and end > lo
                elif not skip and first in ("Private_Clean:", "Private_Dirty:"):
                    total += int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return total


def _slope(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 2:
        return float("nan")
    xs = np.array([t for t, _ in samples]) / 60.0
    ys = np.array([v for _, v in samples]) / (1 << 20)
    return float(np.polyfit(xs, ys, 1)[0])


def _snapshot() -> dict[str, int]:
    shm = os.listdir(_SHM_DIR)
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        "os_threads": len(os.listdir("/proc/self/task")),
        "shm_entries": len(shm),
        "children": len(psutil.Process().children(recursive=True)),
    }


def traffic(minutes: float, rng: random.Random, roles: tuple[str, ...]) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    board = Board()
    next_offset = board.start
    next_producer = 0
    next_consumer = 0
    queues = {s: ctx.Queue(maxsize=MAXSIZE) for s in STRATEGIES}
    live: list[tuple[str, str, bool, Any]] = []  # (role, strategy, survivor, process)
    kills = {"producer": 0, "consumer": 0}
    rows: list[tuple[int, int]] = []  # per producer instance: its row of the board

    def start(role: str, strategy: str, survivor: bool) -> None:
        nonlocal next_offset, next_producer, next_consumer
        q = queues[strategy]
        if role == "producer":
            cap = SURVIVOR_ROW if survivor else MORTAL_ROW
            if next_offset + cap > BOARD_BYTES:
                cap = 0
            args: tuple[Any, ...] = (q, board, next_producer, next_offset, cap, strategy)
            rows.append((next_offset, cap))
            next_offset += cap
            next_producer += 1
            target: Any = _produce
        else:
            args = (q, board, next_consumer, strategy)
            next_consumer += 1
            target = _consume
        p = ctx.Process(target=target, args=args, daemon=True)
        p.start()
        live.append((role, strategy, survivor, p))

    for strategy in STRATEGIES:
        for role in ("producer", "consumer"):
            start(role, strategy, True)
            start(role, strategy, False)
    t0 = time.monotonic()
    deadline = t0 + minutes * 60
    samples: list[tuple[float, float]] = []
    next_sample = t0
    while time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_sample:
            pids = [os.getpid()] + [p.pid for _, _, surv, p in live if surv]
            samples.append((now - t0, float(sum(_uss(pid, board) for pid in pids))))
            if os.environ.get("SOAK_DEBUG"):
                labels = ["parent"] + [f"{r[0]}/{st[5:9]}" for r, st, surv, _ in live if surv]
                print({k: _uss(pid, board) >> 20 for k, pid in zip(labels, pids, strict=True)})
            next_sample = now + 5
        wait([p.sentinel for *_, p in live], rng.uniform(0.05, 1.0))
        for entry in [e for e in live if e[3].exitcode is not None]:
            role, strategy, survivor, p = entry
            live.remove(entry)
            if p.exitcode != 0:
                raise SystemExit(f"a {role} failed with exit code {p.exitcode}")
            start(role, strategy, survivor)
        mortal = [e for e in live if not e[2] and e[0] in roles]
        victim = rng.choice(mortal)
        os.kill(victim[3].pid, signal.SIGKILL)
        victim[3].join(30)
        live.remove(victim)
        if victim[3].exitcode == -signal.SIGKILL:
            kills[victim[0]] += 1
        start(victim[0], victim[1], False)
    elapsed = time.monotonic() - t0
    board.stop[0] = 1
    for role, _, _, p in live:
        if role == "producer":
            p.join(120)
    for strategy in STRATEGIES:
        for role, s, _, _ in live:
            if role == "consumer" and s == strategy:
                queues[strategy].put(None)
    for role, _, _, p in live:
        if role == "consumer":
            p.join(120)
    # every producer instance's confirmed items must have been seen exactly once
    delivered = int(np.count_nonzero(board.bytes[board.start : next_offset]))
    lost = 0
    for me, (offset, _) in enumerate(rows):
        confirmed = int(board.confirmed[me])
        lost += confirmed - int(np.count_nonzero(board.bytes[offset : offset + confirmed]))
    capacity_ok = {strategy: _capacity_exact(q) for strategy, q in queues.items()}
    for q in queues.values():
        q.close()
    return {
        "elapsed": elapsed,
        "delivered": delivered,
        "lost": lost,
        "duplicated": int(board.dups.sum()),
        "kills": kills,
        "samples": samples,
        "capacity_ok": capacity_ok,
    }


def _capacity_exact(q: Any) -> bool:
    """Empty, says so, takes exactly MAXSIZE items (and gives them back in order)."""
    try:
        q.get_nowait()
        return False
    except queue.Empty:
        pass
    if q.qsize() != 0:
        return False
    try:
        for i in range(MAXSIZE):
            q.put_nowait(i)
    except queue.Full:
        return False
    try:
        q.put_nowait("one too many")
        return False
    except queue.Full:
        pass
    return [q.get_nowait() for _ in range(MAXSIZE)] == list(range(MAXSIZE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fuzz-cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--kill",
        choices=["both", "producer", "consumer"],
        default="both",
        help="which roles are SIGKILLed (only producers: nothing may be lost at all)",
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(
        f"soak: seed={seed} minutes={args.minutes} kill={args.kill} "
        f"fuzz cases per decoder={args.fuzz_cases}"
    )
    rng = random.Random(seed)
    before = _snapshot()

    fuzz_bad = 0
    for name, fn in [
        ("FrameDecoder", _fuzz_frames),
        ("FdHeader.split", _fuzz_fd_header),
        ("check_spill_file", _fuzz_spill_file),
        ("RecordChannel.decode", _fuzz_records),
    ]:
        t = time.monotonic()
        n, bad = fn(rng, args.fuzz_cases)
        fuzz_bad += len(bad)
        print(
            f"fuzz {name:22} {n:7d} cases  {len(bad)} broke a rule  ({time.monotonic() - t:.1f} s)"
        )
        for line in bad[:5]:
            print("   ", line)

    roles = ("producer", "consumer") if args.kill == "both" else (args.kill,)
    result = traffic(args.minutes, rng, roles)
    after = _snapshot()
    left_by_kills = after["shm_entries"]
    swept = aioshm.cleanup_orphans()  # what SIGKILLed file_system users left (their names)
    after = _snapshot()
    samples = [s for s in result["samples"] if s[0] >= 60] or result["samples"]
    slope = _slope(samples)
    rate = result["delivered"] / result["elapsed"]
    print(
        f"traffic: {result['elapsed'] / 60:.1f} min, {result['delivered']} messages "
        f"({rate:,.0f} messages/s), kills {result['kills']}"
    )
    print(
        f"lost: {result['lost']} (consumer kills: {result['kills']['consumer']}; a consumer "
        "killed after its get returned and before it recorded the item loses that item)"
    )
    print(f"duplicated: {result['duplicated']}")
    first = result["samples"][0][1] / (1 << 20) if result["samples"] else float("nan")
    last = result["samples"][-1][1] / (1 << 20) if result["samples"] else float("nan")
    print(
        f"USS of the long-lived processes: {first:.1f} -> {last:.1f} MiB, "
        f"slope {slope:+.3f} MiB/min ({len(samples)} samples)"
    )
    print(f"capacity exact after the run: {result['capacity_ok']}")
    print(
        f"shm entries left by killed processes: {left_by_kills}, "
        f"swept by cleanup_orphans(): {len(swept)}"
    )
    for key in before:
        print(f"{key:12} before {before[key]:5d}  after {after[key]:5d}")
    goals = (
        fuzz_bad == 0
        and result["lost"] <= result["kills"]["consumer"]
        and result["duplicated"] == 0
        and slope <= 0.5
        and all(result["capacity_ok"].values())
        and all(after[k] <= before[k] for k in before)
    )
    print("goals met" if goals else "goals NOT met")


if __name__ == "__main__":
    try:
        main()
    finally:
        import shutil

        shutil.rmtree(_SHM_DIR, ignore_errors=True)
