"""The process pools: ``aioshm.Pool``, ``run_sync`` and the stdlib-compatible ``Pool``.

::

    _results.py    AsyncResult (awaitable, asyncio Future-like), MapResult, IMapIterator,
                   PoolStatistics, ProgressEvent
    _api.py        PoolAPI: the stdlib Pool method surface (shared with the Ray backend)
    _scheduler.py  pure decisions: send-ahead depth, death blame, the broken-pool rule
    _drivers.py    blocking, asyncio (LoopWatch) and trio drivers; _Waiter
    _pool.py       Pool: jobs, workers (start, reap, replace), steps, cancel/close/terminate
    _worker.py     the worker's loop in the child (anyio-free)
    _run_sync.py   run_sync and the default pool per event loop
    _stdlib.py     the stdlib multiprocessing.Pool on aioshm queues (aioshm.multiprocessing)

Nothing is imported here: a worker process imports ``_worker`` alone, without anyio.
"""
