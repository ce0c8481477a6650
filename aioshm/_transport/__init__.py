"""The async transport: the first layer that imports anyio.

Every wait here is ``anyio.wait_readable``/``wait_writable`` on a file descriptor: no helper
thread, no executor, no sleep-polling. The sync classes (``Connection``, the queues,
``Process``) expose ``*_async`` twins that import this package lazily, so code that only uses
the blocking face (children, ``aioshm.multiprocessing``) never imports anyio.
"""
