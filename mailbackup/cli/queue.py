"""Many accounts, many machines: enqueue, worker and jobs on a PostgreSQL job queue (the `queue` extra)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..errors import PartialFailure, UsageError
from .app import (
    Output,
    fail,
    human_bytes,
    log,
    main,
    output_options,
    run,
)


def queue_api() -> Any:
    """mailbackup.queue, or a clear error when procrastinate is not installed."""
    try:
        from .. import queue
    except ImportError as exc:
        raise UsageError(f"the job queue needs the 'queue' extra: pip install 'mailbackup[queue]' ({exc})") from None
    return queue


def queue_url_for(url: str | None, config_path: Path | None) -> str:
    """--queue (or MAILBACKUP_QUEUE), else the config's [queue] url."""
    if url:
        return url
    configured = queue_api().queue_settings(config_path).get("url")
    if not configured:
        raise UsageError("give --queue postgresql://... (or set MAILBACKUP_QUEUE, or url in the config's [queue] table)")
    return str(configured)


def queue_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--queue", "queue_url", envvar="MAILBACKUP_QUEUE", metavar="URL",
        help="The queue's PostgreSQL database: postgresql://user@host/db (password in ~/.pgpass or PGPASSWORD).",
    )(function)


config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    help="Config file (default ~/.config/mailbackup/config.toml).",
)


@main.command("enqueue")
@queue_option
@config_option
@click.option("--account", "account_names", multiple=True, metavar="NAME", help="Queue this configured account (repeatable).")
@click.option("--all", "all_accounts", is_flag=True, help="Queue every configured account.")
@click.option("--command", "command", type=click.Choice(["backup"]), default="backup", show_default=True,
              help="What the job does.")
@output_options("Print one JSON object per account.")
def enqueue_command(
    queue_url: str | None, config_path: Path | None, account_names: tuple[str, ...], all_accounts: bool, command: str, out: Output
) -> None:
    """Queue a backup job for each configured account (--account NAME... or --all).

    A job names the account and the config file, never a secret: the worker that
    runs it resolves the secret from its own config. An account with a job
    already waiting is not queued twice.
    """
    if all_accounts and account_names:
        fail(UsageError("give --account NAME or --all, not both"), out.json)

    def action() -> Any:
        url = queue_url_for(queue_url, config_path)
        return queue_api().enqueue(url, account_names, every=all_accounts, config_path=config_path)

    for item in run(out.json, action):
        if out.json:
            click.echo(json.dumps({"account": item.account, "job_id": item.job_id, "already_queued": item.already}))
        elif not out.quiet:
            click.echo(f"{item.account}: " + ("already queued" if item.already else f"queued (job {item.job_id})"))


@main.command("worker")
@queue_option
@config_option
@click.option("--concurrency", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Accounts backed up at once by this worker (threads).")
@click.option("--schedule", metavar="CRON",
              help="Queue every account of --config on this cron line, e.g. \"0 3 * * *\" (default: [queue] schedule).")
@click.option("--heartbeat", type=click.FloatRange(min=0.1), default=10.0, show_default=True, metavar="SECONDS",
              help="How often this worker tells the queue it is alive.")
@click.option("--stall-timeout", type=click.FloatRange(min=0.5), default=60.0, show_default=True, metavar="SECONDS",
              help="Queue the jobs of a worker silent this long again (keep it above the time one batch takes).")
@output_options("Print a failure as one JSON object on stdout.")
def worker_command(
    queue_url: str | None,
    config_path: Path | None,
    concurrency: int,
    schedule: str | None,
    heartbeat: float,
    stall_timeout: float,
    out: Output,
) -> None:
    """Run queued backup jobs until stopped; run as many as you like, on any machines.

    SIGTERM or Ctrl-C: take no new job, end the running backups after the batch
    they are storing, put their jobs back in the queue, exit 0. A worker that
    dies (SIGKILL, power) stops sending heartbeats; another worker then queues
    its job again, and the rerun goes on from what was committed.
    """

    def action() -> None:
        queue = queue_api()
        url = queue_url_for(queue_url, config_path)
        options = queue.WorkerOptions(
            concurrency=concurrency,
            config=config_path,
            schedule=schedule or queue.queue_settings(config_path).get("schedule"),
            heartbeat=heartbeat,
            stall_timeout=stall_timeout,
        )
        log.info("worker %s on %s", options.name, url.split("@")[-1])
        queue.work(url, options)

    run(out.json, action)
    log.info("worker stopped")


@main.command("jobs")
@queue_option
@config_option
@click.option("--wait", is_flag=True, help="Wait until no job is queued or running, then show the results.")
@click.option("--timeout", type=click.FloatRange(min=0), metavar="SECONDS", help="With --wait: give up after this long (exit 1).")
@click.option("--json", "json_output", is_flag=True, help="Print one JSON object.")
def jobs_command(queue_url: str | None, config_path: Path | None, wait: bool, timeout: float | None, json_output: bool) -> None:
    """Each account's last result, and what is queued or running.

    Exit code 0 when every account's last run was ok, 1 when one was partial or failed.
    """

    def action() -> Any:
        queue = queue_api()
        url = queue_url_for(queue_url, config_path)
        return queue.wait_drained(url, timeout) if wait else queue.status(url)

    summary = run(json_output, action)
    if json_output:
        click.echo(json.dumps(summary.as_dict()))
    else:
        print_jobs(summary)
    sys.exit(0 if summary.ok else PartialFailure.exit_code)


def print_jobs(summary: Any) -> None:
    width = max([len(a.account) for a in summary.accounts] + [7])
    click.echo(f"{'ACCOUNT':<{width}}  {'NOW':<9}  {'LAST':<11}  {'NEW':>6}  {'SIZE':>9}  {'TIME':>7}  {'FINISHED':<19}  ERROR")
    for item in summary.accounts:
        now = "running" if item.running else ("queued" if item.queued else "-")
        last = item.last
        if last is None:
            click.echo(f"{item.account:<{width}}  {now:<9}  {'never run':<11}")
            continue
        finished = last.finished_at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if last.finished_at else "-"
        size = human_bytes(last.bytes) if last.bytes is not None else "-"
        took = f"{last.duration:.1f} s" if last.duration is not None else "-"
        new = last.new_messages if last.new_messages is not None else "-"
        click.echo(f"{item.account:<{width}}  {now:<9}  {last.status:<11}  {new:>6}  {size:>9}  {took:>7}  {finished:<19}  {last.error or ''}")
