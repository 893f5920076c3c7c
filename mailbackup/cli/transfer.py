"""restore and migrate: one transfer engine, two sources."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

import click

from ..credentials import Login
from ..errors import UsageError
from .app import (
    MAILBOX_HELP,
    Output,
    Tls,
    _group,
    bars_for,
    finish,
    folder_options,
    human_bytes,
    login_options,
    main,
    output_options,
    passphrase_options,
    run,
    secret_for,
    tls_options,
)

RATE_UNITS = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "hour": 3600.0}


def parse_rate(text: str | None) -> float | None:
    """'30/min' -> messages per minute; also N/s and N/h."""
    if text is None:
        return None
    count, _, unit = text.partition("/")
    try:
        value = float(count)
    except ValueError:
        raise UsageError(f"--rate {text!r}: write N/min, N/s or N/h") from None
    if unit.strip().lower() not in RATE_UNITS or value <= 0:
        raise UsageError(f"--rate {text!r}: write N/min, N/s or N/h with N > 0")
    return value * 60.0 / RATE_UNITS[unit.strip().lower()]


def check_address(address: str, option: str) -> str:
    if any(c in address for c in "\r\n\0"):
        raise UsageError(f"{option} {address!r}: an address may not contain CR, LF or NUL")
    if not address.strip():
        raise UsageError(f"{option}: empty address")
    return address.strip()


def print_transfer(summary: Any, verb: str) -> None:
    info = summary.as_dict()
    if summary.dry_run:
        click.echo(f"dry run: nothing {verb}; the plan:")
        for report in summary.folders:
            note = f" (skipped: {report.skipped})" if report.skipped else ""
            click.echo(
                f"  {report.source} -> {report.target}: {report.planned} messages, {human_bytes(report.planned_bytes)}"
                f"{f', {report.done_before} done before' if report.done_before else ''}{note}"
            )
            for text in report.notes:
                click.echo(f"    note: {text}")
        click.echo(f"total: {info['planned']} messages, {human_bytes(info['planned_bytes'])}")
        return
    click.echo(
        f"{summary.sent} messages {verb} ({human_bytes(summary.bytes)}) from {len(summary.folders)} folders "
        f"in {summary.elapsed:.1f} s; {info['found']} already on the target, {info['done_before']} done by an "
        f"earlier run, {info['recovered']} recovered after an interruption, {info['flags_updated']} flag updates"
    )
    for report in summary.folders:
        if report.skipped:
            click.echo(f"skipped {report.source}: {report.skipped}")
    for folder, text in summary.notes:
        click.echo(f"note {folder}: {text}")
    for folder, item in summary.failed:
        click.echo(f"failed {folder}: {item}", err=True)


def finish_transfer(summary: Any, verb: str, out: Output) -> NoReturn:
    if out.json:
        click.echo(json.dumps(summary.as_dict()))
    elif not out.quiet:
        print_transfer(summary, verb)
    else:
        for folder, item in summary.failed:
            click.echo(f"failed {folder}: {item}", err=True)
    finish(summary.ok)


@dataclass(frozen=True)
class Transfer:
    """The options restore and migrate share, named as RestoreOptions names them."""

    include: tuple[str, ...]
    exclude: tuple[str, ...]
    into: str | None
    automap: bool
    dry_run: bool
    batch_messages: int
    force: bool
    reconnects: int
    workers: int


def transfer_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by restore and migrate (as `transfer`), and the output options (as `out`)."""
    names = ["include", "exclude", "into", "no_automap", "dry_run", "batch_messages", "force", "retries", "workers"]

    def build(no_automap: bool, retries: int, **values: Any) -> Transfer:
        return Transfer(automap=not no_automap, reconnects=retries, **values)

    return _group("transfer", names, build, [
        folder_options,
        click.option("--into", metavar="PREFIX", help="Put everything under this folder ('/'-separated)."),
        click.option("--no-automap", is_flag=True, help="Keep literal names; don't map \\Sent, \\Trash... by role."),
        click.option("--dry-run", is_flag=True, help="Print the plan and change nothing."),
        click.option("--batch-messages", type=click.IntRange(1, 10000), default=100, hidden=True),
        click.option("--force", is_flag=True, help="Check every message on the target by Message-ID and size (or hash) instead of trusting the journal."),
        click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True,
                     help="Give up after this many reconnects in a row that made no progress."),
        click.option("--workers", type=click.IntRange(1, 8), default=3, show_default=True,
                     help="IMAP: folders sent at once once a run is past its first 500 messages, each over "
                     "connections of its own (1: one folder at a time). More pays against a distant server."),
    ])(output_options()(function))


@main.command("restore")
@passphrase_options()
@click.argument("archive")
@click.argument("target")
@transfer_options
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d"]), help="Only messages dated on or after YYYY-MM-DD.")
@click.option("--before", type=click.DateTime(formats=["%Y-%m-%d"]), help="Only messages dated before YYYY-MM-DD.")
@click.option("--include-gone", is_flag=True, help="Also restore messages that were gone from the server at backup time.")
@click.option("--as-of", metavar="DATE", help="The mailbox as it stood then: YYYY-MM-DD (end of that day) or YYYY-MM-DDTHH:MM[:SS][+HH:MM]; local time.")
@click.option("--state", type=click.Path(dir_okay=False), help="Journal database (default: $XDG_STATE_HOME/mailbackup/restore.sqlite).")
@click.option("--mailbox", metavar="USER@HOST", help=MAILBOX_HELP)
@login_options(what="the target")
@tls_options(what="the target")
@click.option("--to", "recipients", multiple=True, metavar="ADDRESS", help="SMTP: a recipient (required, repeatable).")
@click.option("--from", "sender", metavar="ADDRESS", help="SMTP: the envelope sender (default: the login if it is an address).")
@click.option("--resent", is_flag=True, help="SMTP: add Resent-From/To/Date/Message-ID headers.")
@click.option("--rate", metavar="N/min", help="SMTP: send at most N messages per minute (or N/s, N/h).")
def restore_command(
    archive: str,
    target: str,
    transfer: Transfer,
    out: Output,
    since: Any,
    before: Any,
    include_gone: bool,
    login: Login,
    tls: Tls,
    as_of: str | None,
    state: str | None,
    mailbox: str | None,
    recipients: tuple[str, ...],
    sender: str | None,
    resent: bool,
    rate: str | None,
) -> None:
    """Put the messages of ARCHIVE back on TARGET.

    TARGET is imaps://user@host or imap://user@host (APPEND, flags, dates and
    folders kept), or smtps://user@host[:465] or smtp://user@host[:587] (resend
    to the --to addresses, bytes as archived). Reruns resume; nothing is sent twice.
    """
    from ..restore import RestoreOptions, parse_as_of, restore

    bars = bars_for(out, dry_run=transfer.dry_run)

    def action() -> Any:
        options = RestoreOptions(
            **asdict(transfer),
            since=since.date() if since else None,
            before=before.date() if before else None,
            include_gone=include_gone,
            as_of=parse_as_of(as_of) if as_of is not None else None,
            no_tls=tls.no_tls,
            ca_file=tls.ca_file,
            timeout=tls.timeout,
            recipients=tuple(check_address(a, "--to") for a in recipients),
            sender=check_address(sender, "--from") if sender is not None else None,
            resent=resent,
            rate_per_minute=parse_rate(rate),
            auth=login.auth,
            admin_user=login.admin_user,
        )
        password = secret_for(login, target, "the target")
        try:
            return restore(archive, target, password=password, options=options, state=state, progress=bars, mailbox=mailbox)
        finally:
            bars.close()

    summary = run(out.json, action)
    finish_transfer(summary, "sent" if target.lower().startswith("smtp") else "restored", out)


@main.command("migrate")
@click.argument("source")
@click.argument("target")
@transfer_options
@click.option("--state", type=click.Path(dir_okay=False), help="State database (default: $XDG_STATE_HOME/mailbackup/migrate.sqlite).")
@login_options(what="the source")
@login_options("target-", what="the target", env="MAILBACKUP_TARGET_PASSWORD")
@tls_options(what="the source")
@tls_options("target-", what="the target")
def migrate_command(
    source: str,
    target: str,
    transfer: Transfer,
    out: Output,
    state: str | None,
    login: Login,
    target_login: Login,
    tls: Tls,
    target_tls: Tls,
) -> None:
    """Copy the IMAP account SOURCE to the IMAP account TARGET, folder by folder.

    Incremental: a rerun copies only new messages and carries flag changes over.
    The source password comes from --password-file, --password-command or
    MAILBACKUP_PASSWORD; the target's from --target-password-file,
    --target-password-command or MAILBACKUP_TARGET_PASSWORD.
    """
    from ..restore import RestoreOptions, migrate

    bars = bars_for(out, dry_run=transfer.dry_run)

    def action() -> Any:
        options = RestoreOptions(
            **asdict(transfer),
            no_tls=target_tls.no_tls,
            ca_file=target_tls.ca_file,
            timeout=target_tls.timeout,
            source_no_tls=tls.no_tls,
            source_ca_file=tls.ca_file,
            source_timeout=tls.timeout,
            source_auth=login.auth,
            auth=target_login.auth,
            source_admin_user=login.admin_user,
            admin_user=target_login.admin_user,
        )
        password = secret_for(login, source, "the source")
        target_password = secret_for(target_login, target, "the target", "target-")
        try:
            return migrate(
                source, target, password=password, target_password=target_password, state=state, options=options, progress=bars
            )
        finally:
            bars.close()

    summary = run(out.json, action)
    finish_transfer(summary, "copied", out)


# Many accounts, many machines: a job queue on PostgreSQL (mailbackup.queue, the `queue` extra)
