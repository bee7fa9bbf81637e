"""Process-level compute settings of a worker (what the detectors' numpy calls may use)."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager


def blas_thread_limit(threads: int) -> AbstractContextManager[object]:
    """Hold the BLAS library that numpy calls to ``threads`` threads inside the context (0: leave the
    library's default). See ``detection.blas_threads`` for why one is the default."""
    if threads <= 0:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits  # imported here: only runs and evals need it

    return threadpool_limits(limits=threads, user_api="blas")
