"""Allocator settings for the command line's own process."""

from __future__ import annotations

import ctypes

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
