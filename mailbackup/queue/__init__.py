"""Many accounts, many machines: a job queue on PostgreSQL (procrastinate).

`enqueue` queues one backup job per account; `work` runs a worker until SIGTERM;
`status` and `wait_drained` read each account's last result and what is queued.
Needs the `queue` extra: pip install 'mailbackup[queue]'.
"""

from __future__ import annotations

import asyncio
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config
from ..errors import ConfigError, QueueError, QueueNotDrained, UsageError, setting
from . import runs
from .app import (
    BACKUP_TASK,
    QUEUE,
    WorkerOptions,
    conninfo,
    defer_backup,
    ensure_schema,
    make_app,
    one_line,
)
from .runs import Run

__all__ = ["AccountStatus", "Enqueued", "QueueStatus", "Run", "WorkerOptions", "enqueue", "queue_settings",
           "status", "wait_drained", "work"]


@dataclass(frozen=True)
class Enqueued:
    account: str
    job_id: int | None  # None: a job for this account was waiting already

    @property
    def already(self) -> bool:
        return self.job_id is None


@dataclass(frozen=True)
class AccountStatus:
    account: str
    queued: int
    running: int
    last: Run | None

    def as_dict(self) -> dict[str, Any]:
        return {"account": self.account, "queued": self.queued, "running": self.running,
                "last": self.last.as_dict() if self.last else None}


@dataclass(frozen=True)
class QueueStatus:
    accounts: tuple[AccountStatus, ...]

    @property
    def pending(self) -> int:
        return sum(a.queued + a.running for a in self.accounts)

    @property
    def ok(self) -> bool:
        """Every account's last run went fine (an account never run yet does not count)."""
        return all(a.last.status == "ok" for a in self.accounts if a.last is not None)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "pending": self.pending, "accounts": [a.as_dict() for a in self.accounts]}


def queue_settings(path: Path | None) -> dict[str, Any]:
    """The config file's optional [queue] table (url, schedule); {} without a file."""
    path = path or config.default_path()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    table = data.get("queue", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [queue] must be a table")
    unknown = sorted(set(table) - {"url", "schedule"})
    if unknown:
        raise ConfigError(f"{path}: [queue]: unknown keys {', '.join(unknown)}")
    return table


def check_schedule(schedule: str) -> str:
    import croniter

    if not croniter.croniter.is_valid(schedule):
        raise UsageError(f"schedule {schedule!r} is not a cron line (e.g. \"0 3 * * *\" for 03:00 every night)")
    return schedule


def _run(coroutine: Any) -> Any:
    """Run against the queue; database errors become one line."""
    import psycopg
    from procrastinate import exceptions

    try:
        return asyncio.run(coroutine)
    except (psycopg.Error, exceptions.ConnectorException, OSError) as exc:
        cause = exc.__cause__ or exc
        raise QueueError(f"queue database: {one_line(cause)}") from exc


def enqueue(url: str, names: Sequence[str] = (), *, every: bool = False, config_path: Path | None = None) -> list[Enqueued]:
    """Queue a backup of each named (or every) configured account; never a second waiting one."""
    accounts = config.load(config_path)
    unknown = [n for n in names if n not in accounts]
    if unknown:
        raise ConfigError(f"no account {', '.join(unknown)} in the config (have: {', '.join(accounts)})")
    if not every and not names:
        raise UsageError(f"give {setting('account')} NAME (repeatable) or {setting('all')}")
    chosen = list(accounts) if every else list(dict.fromkeys(names))
    # The job names the config only if one was given: otherwise each worker uses its own default.
    where = str(config_path.resolve()) if config_path else None
    info = conninfo(url)
    ensure_schema(info)

    async def go() -> list[Enqueued]:
        async with make_app(info).open_async() as app:
            return [Enqueued(name, await defer_backup(app, name, where)) for name in chosen]

    result: list[Enqueued] = _run(go())
    return result


def work(url: str, options: WorkerOptions) -> None:
    """Run jobs until SIGTERM or SIGINT: then stop taking jobs, end the running ones at a batch boundary."""
    if options.schedule:
        check_schedule(options.schedule)
    info = conninfo(url)
    ensure_schema(info)

    async def go() -> None:
        async with make_app(info, options).open_async() as app:
            await app.run_worker_async(
                queues=[QUEUE],
                concurrency=options.concurrency,
                name=options.name,
                shutdown_graceful_timeout=0,  # running jobs are asked to stop at once, and end at a batch boundary
                update_heartbeat_interval=options.heartbeat,
                stalled_worker_timeout=options.stall_timeout,
                delete_jobs="successful",  # results live in mailbackup_runs
                fetch_job_polling_interval=min(5.0, options.heartbeat),
                abort_job_polling_interval=min(5.0, options.heartbeat),
            )

    _run(go())


def status(url: str) -> QueueStatus:
    info = conninfo(url)
    ensure_schema(info)

    async def jobs() -> dict[str, list[int]]:
        counts: dict[str, list[int]] = {}
        async with make_app(info).open_async() as app:
            for column, state in enumerate(("todo", "doing")):
                for job in await app.job_manager.list_jobs_async(queue=QUEUE, task=BACKUP_TASK, status=state):
                    counts.setdefault(str(job.task_kwargs.get("account")), [0, 0])[column] += 1
        return counts

    counts: dict[str, list[int]] = _run(jobs())
    try:
        last = runs.latest(info)
    except Exception as exc:
        raise QueueError(f"queue database: {one_line(exc)}") from exc
    names = sorted(set(counts) | set(last))
    return QueueStatus(tuple(
        AccountStatus(n, queued=counts.get(n, [0, 0])[0], running=counts.get(n, [0, 0])[1], last=last.get(n)) for n in names
    ))


def wait_drained(url: str, timeout: float | None = None, poll: float = 1.0) -> QueueStatus:
    """Poll until no backup job is queued or running; then each account's last result."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        now = status(url)
        if now.pending == 0:
            return now
        if deadline is not None and time.monotonic() > deadline:
            raise QueueNotDrained(f"{now.pending} jobs still queued or running after {timeout:.0f} s")
        time.sleep(poll)
