"""The table of job runs in the queue database: who backed up which account, when, and how it went.

One row per attempt. It is ours, not procrastinate's: procrastinate deletes finished
jobs, while this keeps each account's last result (and the start and end of every
attempt, which is what proves no account was worked on by two workers at once).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg

SCHEMA = """
CREATE TABLE IF NOT EXISTS mailbackup_runs (
    id bigserial PRIMARY KEY,
    account text NOT NULL,
    job_id bigint,
    attempt integer NOT NULL DEFAULT 0,
    worker text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz,
    status text NOT NULL DEFAULT 'running',
    new_messages integer,
    bytes bigint,
    duration double precision,
    error text
);
CREATE INDEX IF NOT EXISTS mailbackup_runs_account ON mailbackup_runs (account, started_at DESC);
"""

# running: under way (or its worker died; see 'lost'); ok; partial: some messages failed;
# failed: the run stopped with an error; interrupted: the worker was stopping, the job went
# back in the queue; lost: the worker stopped sending heartbeats, the job went back in the queue.
FINAL = ("ok", "partial", "failed", "interrupted", "lost")


@dataclass(frozen=True)
class Run:
    account: str
    status: str
    worker: str
    started_at: datetime
    finished_at: datetime | None
    new_messages: int | None
    bytes: int | None
    duration: float | None
    error: str | None
    job_id: int | None = None
    attempt: int = 0

    def as_dict(self) -> dict[str, Any]:
        info = asdict(self)
        for key in ("started_at", "finished_at"):
            info[key] = info[key].isoformat() if info[key] else None
        return info


def start(conninfo: str, account: str, job_id: int | None, attempt: int, worker: str) -> int:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO mailbackup_runs (account, job_id, attempt, worker) VALUES (%s, %s, %s, %s) RETURNING id",
            (account, job_id, attempt, worker),
        ).fetchone()
    assert row is not None
    return int(row[0])


def finish(
    conninfo: str,
    run_id: int,
    status: str,
    *,
    new_messages: int | None = None,
    size: int | None = None,
    error: str | None = None,
) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            "UPDATE mailbackup_runs SET status = %s, finished_at = clock_timestamp(), new_messages = %s, bytes = %s,"
            " duration = extract(epoch FROM clock_timestamp() - started_at), error = %s WHERE id = %s",
            (status, new_messages, size, error, run_id),
        )


def clock(conninfo: str) -> datetime:
    """The database's clock, which every worker's rows share."""
    with psycopg.connect(conninfo) as conn:
        row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]


def mark_lost(conninfo: str, job_id: int, found_at: datetime) -> None:
    """The job's worker fell silent: its run ended, at the latest, when the job was found stalled."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            "UPDATE mailbackup_runs SET status = 'lost', finished_at = %s,"
            " duration = extract(epoch FROM %s - started_at),"
            " error = 'the worker stopped sending heartbeats; the job was queued again'"
            " WHERE job_id = %s AND status = 'running' AND started_at < %s",
            (found_at, found_at, job_id, found_at),
        )


COLUMNS = "account, status, worker, started_at, finished_at, new_messages, bytes, duration, error, job_id, attempt"


def latest(conninfo: str) -> dict[str, Run]:
    """Each account's most recent run."""
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            f"SELECT DISTINCT ON (account) {COLUMNS} FROM mailbackup_runs ORDER BY account, started_at DESC, id DESC"
        ).fetchall()
    return {row[0]: Run(*row) for row in rows}


def history(conninfo: str) -> list[Run]:
    """Every run, oldest first."""
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(f"SELECT {COLUMNS} FROM mailbackup_runs ORDER BY started_at, id").fetchall()
    return [Run(*row) for row in rows]
