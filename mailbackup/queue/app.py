"""The procrastinate app: a backup task per account, and two periodic tasks the workers run.

A job carries an account's name and the path of the config that named it, never a
secret. The worker that takes it loads its own config and resolves the secret there,
as `backup --account` does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import procrastinate
import psycopg
from procrastinate import JobContext, RetryStrategy, exceptions
from procrastinate.job_context import AbortReason
from procrastinate.jobs import Status
from procrastinate.schema import SchemaManager

from .. import config
from ..accounts import backup_account
from ..errors import ConfigError, MailbackupError, QueueError
from ..malloc import after_job
from ..model import FolderReport
from ..pipeline import Progress
from . import runs

log = logging.getLogger("mailbackup")

QUEUE = "mailbackup"
BACKUP_TASK = "mailbackup.backup"
ENQUEUE_ALL_TASK = "mailbackup.enqueue_all"
RETRY_STALLED_TASK = "mailbackup.retry_stalled"
SCHEMA_LOCK = 0x6D62_7175  # "mbqu": one worker at a time creates the tables
MAX_DELAY = 6 * 3600.0  # a worker started up to 6 h after a scheduled run still makes it


def conninfo(url: str) -> str:
    """A libpq URL from a PostgreSQL URL, SQLAlchemy-style ones (postgresql+psycopg://) included."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0].lower() not in ("postgresql", "postgres"):
        raise QueueError(f"the queue must be a PostgreSQL URL (postgresql://user@host/db), not {url!r}")
    return f"postgresql://{rest}"


def lock_for(account: str) -> str:
    return f"mailbackup/{account}"


@dataclass(frozen=True)
class WorkerOptions:
    concurrency: int = 1
    config: Path | None = None  # this worker's config; None: the job's, else the default path
    schedule: str | None = None  # cron line: enqueue every account of `config` then
    heartbeat: float = 10.0  # seconds between heartbeats
    stall_timeout: float = 60.0  # a job whose worker is silent this long is queued again
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    @property
    def stall_check(self) -> str:
        """How often a worker looks for stalled jobs: every minute, or sooner for short timeouts."""
        if self.stall_timeout >= 120:
            return "* * * * *"
        return f"* * * * * */{max(1, min(30, int(self.stall_timeout // 2)))}"


class Stopped(Exception):
    """The worker is stopping: the backup ends after the batch it has committed."""


class StopAtBatch(Progress):
    """Ends a backup at the next batch boundary once `should_stop` says so.

    Every call comes after a batch (or a folder) is committed: raising here loses
    nothing, and the rerun goes on from the catalog.
    """

    def __init__(self, should_stop: Any) -> None:
        self.should_stop = should_stop

    def check(self) -> None:
        if self.should_stop():
            raise Stopped()

    def folder_started(self, name: str, messages: int, size: int | None) -> None:
        self.check()

    def stored(self, messages: int, size: int) -> None:
        self.check()

    def folder_done(self, report: FolderReport) -> None:
        self.check()


def ensure_schema(info: str) -> None:
    """procrastinate's tables and ours, created once whoever comes first."""
    try:
        with psycopg.connect(info) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            row = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()
            if row is None or row[0] is None:
                conn.execute(SchemaManager.get_schema())
            conn.execute(runs.SCHEMA)
    except psycopg.Error as exc:
        raise QueueError(f"cannot use the queue database: {one_line(exc)}") from exc


def one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def run_backup(info: str, options: WorkerOptions, context: JobContext, account: str, config_path: str | None) -> str:
    """One account's backup as a job, its memory handed back when it ends (see malloc.after_job)."""
    try:
        return backup_job(info, options, context, account, config_path)
    finally:
        after_job()


def backup_job(info: str, options: WorkerOptions, context: JobContext, account: str, config_path: str | None) -> str:
    """One account's backup: its run recorded before and after, a stop honoured at a batch boundary."""
    job = context.job
    run_id = runs.start(info, account, job.id, job.attempts, options.name)
    log.info("%s: backup started (job %s, attempt %d)", account, job.id, job.attempts + 1)
    try:
        path = options.config or (Path(config_path) if config_path else None)
        accounts = config.load(path)
        if account not in accounts:
            raise ConfigError(f"no account {account} in {path or config.default_path()}")
        summary = backup_account(accounts[account], progress=StopAtBatch(context.should_abort))
    except Stopped:
        reason = context.abort_reason()
        # On shutdown the retry strategy queues the job again, unless a newer one for the account waits already.
        requeue = reason == AbortReason.SHUTDOWN and not waiting(info, account)
        why = "the worker is stopping" if reason == AbortReason.SHUTDOWN else "the job was cancelled"
        runs.finish(info, run_id, "interrupted", error=f"{why}; stopped at a batch boundary"
                    + ("; queued again" if requeue else ""))
        log.warning("%s: stopped at a batch boundary (%s); what was committed stays", account, why)
        if requeue or reason != AbortReason.SHUTDOWN:
            raise exceptions.JobAborted() from None
        return "interrupted"
    except MailbackupError as exc:
        runs.finish(info, run_id, "failed", error=str(exc))
        log.error("%s: %s", account, exc)
        return "failed"
    except BaseException as exc:
        runs.finish(info, run_id, "failed", error=f"{type(exc).__name__}: {one_line(exc)}")
        raise
    status = "ok" if summary.ok else "partial"
    first = next((f"{folder}: {item}" for folder, item in summary.failed), None)
    failed = f"{len(summary.failed)} messages failed, e.g. {first}" if first else None
    runs.finish(info, run_id, status, new_messages=summary.new, size=summary.bytes, error=failed)
    log.info("%s: %s, %d new messages", account, status, summary.new)
    return status


def waiting(info: str, account: str) -> bool:
    """Whether a backup of `account` waits in the queue (its queueing lock is taken)."""
    with psycopg.connect(info) as conn:
        row = conn.execute(
            "SELECT 1 FROM procrastinate_jobs WHERE queueing_lock = %s AND status = 'todo'", (lock_for(account),)
        ).fetchone()
    return row is not None


async def defer_backup(app: procrastinate.App, account: str, config_path: str | None) -> int | None:
    """Queue a backup of `account`; None when one is already waiting (its queueing lock)."""
    key = lock_for(account)
    try:
        return await app.tasks[BACKUP_TASK].configure(lock=key, queueing_lock=key).defer_async(
            account=account, config=config_path
        )
    except exceptions.AlreadyEnqueued:
        return None


async def retry_stalled(app: procrastinate.App, info: str, options: WorkerOptions) -> None:
    """procrastinate's recipe for jobs of dead workers: find them by heartbeat, queue them again."""
    found_at = await asyncio.to_thread(runs.clock, info)
    for job in await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=options.stall_timeout):
        assert job.id is not None
        try:
            try:
                await app.job_manager.retry_job(job)
            except exceptions.UniqueViolation:
                # A newer job for the same account waits already: it does the rest.
                await app.job_manager.finish_job(job, status=Status.FAILED, delete_job=False)
        except exceptions.ConnectorException:
            continue  # no longer running: another worker's check got there first
        # Only runs that started before the job was found stalled: the rerun's own row stays.
        await asyncio.to_thread(runs.mark_lost, info, job.id, found_at)
        log.warning("job %s (%s) lost its worker; queued again", job.id, job.task_kwargs.get("account", job.task_name))


def make_app(info: str, options: WorkerOptions | None = None) -> procrastinate.App:
    options = options or WorkerOptions()
    connector = procrastinate.PsycopgConnector(conninfo=info, min_size=1, max_size=options.concurrency + 4)
    app = procrastinate.App(connector=connector, periodic_defaults={"max_delay": MAX_DELAY})

    # On a worker's shutdown the job raises JobAborted, which this strategy queues again.
    @app.task(name=BACKUP_TASK, queue=QUEUE, pass_context=True,
              retry=RetryStrategy(retry_exceptions={exceptions.JobAborted}))
    def backup_job(context: JobContext, account: str, config: str | None = None) -> str:
        return run_backup(info, options, context, account, config)

    @app.periodic(cron=options.stall_check, periodic_id="retry-stalled")
    @app.task(name=RETRY_STALLED_TASK, queue=QUEUE, queueing_lock=RETRY_STALLED_TASK, priority=10)
    async def retry_stalled_job(timestamp: int) -> None:
        await retry_stalled(app, info, options)

    if options.schedule:
        @app.periodic(cron=options.schedule, periodic_id="enqueue-all")
        @app.task(name=ENQUEUE_ALL_TASK, queue=QUEUE, queueing_lock=ENQUEUE_ALL_TASK, priority=5)
        async def enqueue_all_job(timestamp: int) -> None:
            accounts = await asyncio.to_thread(config.load, options.config)
            where = str(options.config.resolve()) if options.config else None
            queued = [name for name in accounts if await defer_backup(app, name, where) is not None]
            log.info("scheduled run: %d of %d accounts queued", len(queued), len(accounts))

    return app
