"""The process pools: ``aioshm.Pool``, ``run_sync`` and the stdlib-compatible ``Pool``.

::

    _results.py    AsyncResult (awaitable, asyncio Future-like), MapResult, IMapIterator,
                   PoolStatistics, ProgressEvent
    _api.py        PoolAPI: the stdlib Pool method surface (shared with the Ray backend)
    _scheduler.py  Scheduler: the jobs' and workers' books, events in, decisions out (no I/O):
                   dispatch, send-ahead depth, death blame, cancel, close, terminate,
                   replacement, maxtasksperchild, the broken-pool rule
    _drivers.py    blocking, asyncio (LoopWatch) and trio drivers; _Waiter
    _pool.py       Pool: the I/O (pickling, sending, reading, starting and reaping workers),
                   steps, applying the scheduler's decisions
    _worker.py     the worker's loop in the child (anyio-free)
    _run_sync.py   run_sync and the default pool per event loop
    _stdlib.py     the stdlib multiprocessing.Pool on aioshm queues (aioshm.multiprocessing)

Nothing is imported here: a worker process imports ``_worker`` alone, without anyio.
"""
