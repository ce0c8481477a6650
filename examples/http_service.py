"""An async HTTP service that offloads numpy work to an aioshm pool (Starlette + uvicorn).

Run it with ``python examples/http_service.py [--port 0] [--workers N]`` (needs the
``examples`` extra: ``pip install -e '.[examples]'``). It binds 127.0.0.1 only; with
``--port 0`` (the default) the kernel picks a free port, and the first line printed is
``listening on http://127.0.0.1:<port>``.

Endpoints:

``POST /svd``       ``{"seed": int, "n": int, "rounds": int}``: a worker builds the ``n × n``
                    standard-normal matrix of ``numpy.random.default_rng(seed)`` and computes its
                    singular values ``rounds`` times; the answer is small (the top three singular
                    values, the condition number, the worker's pid and compute time).
``POST /spectrum``  samples, as raw little-endian float64 bytes (``Content-Type:
                    application/octet-stream``) or as a JSON list: the handler copies them into
                    shared memory, so the worker receives a handle to the same pages rather than
                    a pickled copy; it answers with the dominant ``rfft`` bin and its power.
``GET /ping``       answers at once from the event loop.
``GET /lag``        the event loop's worst tick lag (ms) since start or the last reset, measured
                    by a ticker task that sleeps ``TICK`` s and records how late it wakes up
                    (``max_lag_ms``, wall clock; ``max_own_lag_ms``, the same less the time
                    the loop's thread waited for a CPU other processes had), and the most CPU
                    the loop's thread used in one tick (``max_busy_ms``: time spent running
                    code on the loop).
``POST /lag/reset`` resets it.

Workers run with one BLAS thread each and at a lower priority (``nice``) than the server.
The pool is started in the app's lifespan and closed (``async with``: close, then join
without blocking the loop) when the server shuts down (SIGINT/SIGTERM), which prints ``pool closed after <n> tasks``
and exits with status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

# One BLAS thread per process: the pool is the parallelism. (Read when numpy loads, so set
# before importing it; the fork server that starts the workers inherits it.)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import anyio
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import aioshm

#: The ticker's period (s); ``/lag`` is how much later than this it woke up, at worst.
TICK = 0.005
MAX_N = 2000
MAX_ROUNDS = 50
MAX_SAMPLES = 1 << 22
#: Workers run at a lower priority than the server, so the event loop gets a CPU promptly.
WORKER_NICE = 10


# ----------------------------------------------------------------------- worker side (sync)


def init_worker(nice: int) -> None:
    """Pool initializer: make the worker yield the CPU to the server's event loop."""
    os.nice(nice)


def svd_stats(seed: int, n: int, rounds: int) -> dict[str, Any]:
    """Runs in a pool worker: singular values of a seeded random matrix, ``rounds`` times."""
    start = time.perf_counter()
    matrix = np.random.default_rng(seed).standard_normal((n, n))
    for _ in range(rounds):
        sv = np.linalg.svd(matrix, compute_uv=False)
    return {
        "seed": seed,
        "n": n,
        "top": [float(x) for x in sv[:3]],
        "cond": float(sv[0] / sv[-1]),
        "pid": os.getpid(),
        "compute_s": time.perf_counter() - start,
    }


def dominant_frequency(signal: np.ndarray) -> dict[str, Any]:
    """Runs in a pool worker: the strongest non-DC bin of ``signal``'s real FFT."""
    power = np.abs(np.fft.rfft(signal - signal.mean())) ** 2
    k = int(np.argmax(power))
    return {
        "samples": int(signal.size),
        "bin": k,
        "power": float(power[k]),
        "shared": aioshm.is_shared(signal),  # True: the worker got a handle, not a copy
        "pid": os.getpid(),
    }


# ----------------------------------------------------------------------- the async service


def _run_queue_wait() -> float:
    """Seconds the calling thread has spent runnable but waiting for a CPU (from the kernel's
    schedstat; 0.0 where it is not available)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class LoopLag:
    """Worst lateness of a periodic ``anyio.sleep(TICK)``: how long the loop was blocked.

    ``max_s`` is wall-clock lateness (whatever the cause, including the OS not scheduling the
    process); ``max_own_s`` is the worst lateness minus the time the loop's thread sat runnable
    waiting for a CPU that other processes had (Linux; elsewhere it equals the wall lateness):
    code on the loop that ran long, or a blocking call on its thread; ``max_busy_s`` is the most
    CPU time the loop's thread itself used during any one tick, i.e. the longest stretch of code
    running on the loop that kept the ticker waiting.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.max_s = 0.0
        self.max_own_s = 0.0
        self.max_busy_s = 0.0
        self.ticks = 0

    async def run(self) -> None:
        while True:
            before, cpu_before, wait_before = (
                time.perf_counter(),
                time.thread_time(),
                _run_queue_wait(),
            )
            await anyio.sleep(TICK)
            late = time.perf_counter() - before - TICK
            busy = time.thread_time() - cpu_before
            waited = _run_queue_wait() - wait_before
            self.ticks += 1
            self.max_s = max(self.max_s, late)
            self.max_own_s = max(self.max_own_s, late - waited)
            self.max_busy_s = max(self.max_busy_s, busy)


def _int_field(body: Any, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default) if isinstance(body, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name!r} must be an integer in [{low}, {high}]")
    return value


async def svd(request: Request) -> JSONResponse:
    try:
        body = await request.json()
        seed = _int_field(body, "seed", 0, 0, 2**63 - 1)
        n = _int_field(body, "n", 256, 1, MAX_N)
        rounds = _int_field(body, "rounds", 1, 1, MAX_ROUNDS)
    except ValueError as exc:  # JSONDecodeError is a ValueError
        return JSONResponse({"error": str(exc)}, status_code=400)
    pool: aioshm.Pool = request.state.pool
    return JSONResponse(await pool.apply_async(svd_stats, (seed, n, rounds)))


async def spectrum(request: Request) -> JSONResponse:
    try:
        if request.headers.get("content-type") == "application/octet-stream":
            # raw little-endian float64s: one memcpy into shared memory, nothing to parse
            raw = await request.body()
            if len(raw) % 8 or not 2 <= len(raw) // 8 <= MAX_SAMPLES:
                raise ValueError(f"expected 2 to {MAX_SAMPLES} little-endian float64s")
            signal = aioshm.empty(len(raw) // 8)
            signal[:] = np.frombuffer(raw, dtype="<f8")
        else:
            # a JSON list: fine for small inputs, but decoding it runs on the event loop
            # (about 4 ms per 16k numbers), so large signals should come as raw bytes
            samples = await request.json()
            if not isinstance(samples, list) or not 2 <= len(samples) <= MAX_SAMPLES:
                raise ValueError(f"expected a JSON list of 2 to {MAX_SAMPLES} numbers")
            signal = aioshm.share(np.asarray(samples, dtype=np.float64))
    except (ValueError, TypeError) as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    pool: aioshm.Pool = request.state.pool
    return JSONResponse(await pool.apply_async(dominant_frequency, (signal,)))


async def ping(request: Request) -> JSONResponse:
    return JSONResponse({"pong": True})


async def lag(request: Request) -> JSONResponse:
    meter: LoopLag = request.state.lag
    return JSONResponse(
        {
            "max_lag_ms": meter.max_s * 1e3,
            "max_own_lag_ms": meter.max_own_s * 1e3,
            "max_busy_ms": meter.max_busy_s * 1e3,
            "ticks": meter.ticks,
        }
    )


async def lag_reset(request: Request) -> JSONResponse:
    request.state.lag.reset()
    return JSONResponse({"reset": True})


def make_app(workers: int) -> Starlette:
    """The Starlette app; its lifespan owns the pool and the loop-lag ticker."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        meter = LoopLag()
        async with aioshm.Pool(workers, init_worker, (WORKER_NICE,)) as pool:
            async with anyio.create_task_group() as tg:
                tg.start_soon(meter.run)
                yield {"pool": pool, "lag": meter}
                tg.cancel_scope.cancel()  # stop the ticker; then the pool closes and joins
            done = pool.statistics().tasks_done
        print(f"pool closed after {done} tasks", flush=True)

    return Starlette(
        routes=[
            Route("/svd", svd, methods=["POST"]),
            Route("/spectrum", spectrum, methods=["POST"]),
            Route("/ping", ping),
            Route("/lag", lag),
            Route("/lag/reset", lag_reset, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 (default): a free port")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)

    # Bind here so that port 0 gives a free port we can announce; uvicorn calls listen()
    # itself, after the lifespan started the pool, so a connect succeeds only once the
    # service is ready.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    port = sock.getsockname()[1]
    print(f"listening on http://127.0.0.1:{port} ({args.workers} workers)", flush=True)

    config = uvicorn.Config(
        make_app(args.workers), lifespan="on", log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM (lifespan shutdown included), then
    # re-raises the signal once its own handlers are gone: make that a clean exit.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    main()
