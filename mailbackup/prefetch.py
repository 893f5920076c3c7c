"""Read ahead on one worker thread: the next batch is fetched while the caller handles this one.

Backup (store while the server sends), restore (APPEND while the archive is read)
and migrate (APPEND while the source sends) all overlap their two ends this way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from .malloc import lean_malloc

T = TypeVar("T")
R = TypeVar("R")


def prefetched(items: Iterable[T], fetch: Callable[[T], R], depth: int = 1) -> Iterator[tuple[T, Future[R]]]:
    """Yield each item with its fetch, in order, while up to `depth` later fetches already run.

    One worker thread does every fetch, so a connection is never used by two threads
    at once; the caller still handles batches one at a time. At most depth + 1 results
    are in memory. A fetch's exception is raised by its future's result().
    """
    lean_malloc()  # before the worker thread makes its arena
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
    try:
        pending: deque[tuple[T, Future[R]]] = deque()
        for item in items:
            pending.append((item, pool.submit(fetch, item)))
            if len(pending) > depth:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
