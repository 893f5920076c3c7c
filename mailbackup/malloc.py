"""Allocator settings for the command line's own process, and handing memory back between jobs."""

from __future__ import annotations

import ctypes
import sys

M_ARENA_MAX = -8  # glibc's mallopt parameter


def one_arena() -> None:
    """Let every thread allocate from one glibc arena.

    glibc gives a thread that allocates under contention an arena of its own (up to
    eight per core), and each arena keeps the message buffers its thread freed. With
    the prefetch thread and Maildir's file writers that was 15-20 MB of RSS holding
    nothing. Python threads allocate under the GIL anyway, so one arena costs no
    parallelism. Not glibc (musl, macOS): nothing to do.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_ARENA_MAX, 1)


def trim() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim); elsewhere, nothing.

    A long-lived process that runs one job after another (the queue's worker) frees a
    job's message buffers between small objects that live on; without this the holes
    stay resident and the peak creeps up job after job.
    """
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    malloc_trim(0)


def after_job() -> None:
    """What a process that backs up one account after another does between two.

    SQLAlchemy's PostgreSQL dialect memoizes some reflection queries with
    functools.lru_cache on the method, keyed by the dialect, so each job's dialect (about
    45 KB with its caches) stayed alive until 128 newer jobs pushed it out. Then the
    freed heap pages go back to the system.
    """
    import gc

    dialects = sys.modules.get("sqlalchemy.dialects.postgresql.base")
    if dialects is not None:
        for name in ("_has_multi_table_query", "_table_options_query", "_columns_query", "_table_oids_query"):
            clear = getattr(getattr(dialects.PGDialect, name, None), "cache_clear", None)
            if clear is not None:
                clear()
    gc.collect()
    trim()
