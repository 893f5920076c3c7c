"""glibc allocator settings: one arena for the CLI, big buffers handed back at once, memory returned between jobs."""

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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
_lean = False  # lean_malloc ran


def lean_malloc() -> None:
    """Ask glibc (once) to give a freed message buffer over 64 KB back to the system at once.

    glibc raises its mmap threshold after big frees, and then serves the next big
    buffers from an arena that keeps them resident once freed: with several batches of
    attachments passing through, peak RSS grows with the mail, not with what is alive.
    (The CLI also keeps every thread on one arena: malloc.one_arena.) A no-op elsewhere.
    """
    global _lean
    if _lean:
        return
    _lean = True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 64 << 10)
