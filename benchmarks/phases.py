"""Run mailbackup with timers around its three outside parties: where a worker's time goes.

    python benchmarks/phases.py OUT.json worker --queue URL ...   (any mailbackup command line)

Sums wall seconds, per process, spent in:
  imap   reading the server's responses and sending commands (imaplib's _get_response
         and send), on whichever thread; the backup fetches the next batch on a second
         thread while it stores this one, so IMAP time overlaps the other two
  s3     S3Blobs: opening the bucket (HEAD) and each batch's PUTs (8 at a time: wall
         time of the batch, not the sum over threads), GETs
  pg     psycopg's synchronous execute/executemany/commit/connect: the catalog's
         statements and commits, plus the queue's run rows (procrastinate's own
         polling is asynchronous and not counted)
and, for a worker, the jobs' total wall time (`jobs`). At exit (SIGTERM makes a worker
exit normally) the sums go to OUT.json, one object per process.
"""

from __future__ import annotations

import atexit
import functools
import imaplib
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

totals: dict[str, float] = {"imap": 0.0, "s3": 0.0, "pg": 0.0, "jobs": 0.0}
counts: dict[str, int] = {key: 0 for key in totals}
lock = threading.Lock()
inside = threading.local()  # a timed call inside another of the same phase is not counted twice


def timed(phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if getattr(inside, phase, False):
            return function(*args, **kwargs)
        setattr(inside, phase, True)
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent = time.perf_counter() - started
            setattr(inside, phase, False)
            with lock:
                totals[phase] += spent
                counts[phase] += 1

    return wrapper


def install() -> None:
    import psycopg

    from mailbackup.queue import app
    from mailbackup.stores import blobs

    imaplib.IMAP4._get_response = timed("imap", imaplib.IMAP4._get_response)  # type: ignore[attr-defined]  # a private method, timed from outside
    imaplib.IMAP4.send = timed("imap", imaplib.IMAP4.send)
    for name in ("__init__", "put", "get"):
        setattr(blobs.S3Blobs, name, timed("s3", getattr(blobs.S3Blobs, name)))
    for name in ("execute", "executemany"):
        setattr(psycopg.Cursor, name, timed("pg", getattr(psycopg.Cursor, name)))
    psycopg.Connection.commit = timed("pg", psycopg.Connection.commit)  # type: ignore[method-assign]
    psycopg.Connection.connect = classmethod(timed("pg", psycopg.Connection.connect.__func__))  # type: ignore[method-assign,attr-defined]
    app.backup_job = timed("jobs", app.backup_job)


def main() -> None:
    out = Path(sys.argv[1])
    install()

    def dump() -> None:
        with out.open("a") as sink:
            sink.write(json.dumps({"seconds": totals, "calls": counts}) + "\n")

    atexit.register(dump)
    from mailbackup.cli import main as cli

    cli(sys.argv[2:], prog_name="mailbackup")


if __name__ == "__main__":
    main()
