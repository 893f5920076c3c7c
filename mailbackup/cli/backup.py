"""backup, prune-server, and the OAuth2 sign-in commands (login, token)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..credentials import Login
from ..errors import ConfigError, MailbackupError, PartialFailure, UsageError
from ..model import Summary
from ..pipeline import BackupOptions, backup
from .app import (
    Output,
    Tls,
    bars_for,
    bucket,
    fail,
    finish,
    folder_options,
    human_bytes,
    login_options,
    main,
    message,
    output_options,
    passphrase_options,
    print_summary,
    run,
    secret_for,
    tls_options,
)


@main.command("backup")
@passphrase_options(create=True)
@click.argument("source", required=False)
@click.argument("archive", required=False)
@folder_options
@login_options()
@tls_options()
@click.option("--into", metavar="NAME", help="POP3: archive folder for the maildrop (default INBOX).")
@click.option("--delete", is_flag=True, help="POP3: delete from the server what is safely archived.")
@click.option("--delete-older-than", type=float, metavar="DAYS", help="POP3: delete archived messages first downloaded DAYS ago or more.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="Config file (default ~/.config/mailbackup/config.toml).")
@click.option("--account", "account_names", multiple=True, metavar="NAME", help="Back up this configured account (repeatable).")
@click.option("--all", "all_accounts", is_flag=True, help="Back up every configured account.")
@click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True, help="Accounts backed up in parallel processes.")
@click.option("--no-index", is_flag=True, help="Do not update the search index (mailbackup reindex catches up).")
@click.option("--retries", type=click.IntRange(0, 100), default=3, show_default=True, help="Give up after this many reconnects in a row that made no progress.")
@click.option("--batch-messages", type=click.IntRange(1, 10000), default=200, hidden=True)
@click.option("--blobs", metavar="s3://BUCKET/PREFIX", help="A new SQL archive keeps message bytes in this S3 bucket (recorded in the archive).")
@click.option("--s3-endpoint", metavar="URL", help="The S3 server (default: AWS_ENDPOINT_URL, else AWS). Credentials come the AWS way, never argv.")
@click.option("--max-rate", type=click.FloatRange(min=1), metavar="BYTES", help="Read from the source at most BYTES per second on average.")
@click.option("--max-bytes-per-day", type=click.IntRange(min=1), metavar="BYTES",
              help="Stop (exit 1, rerun to go on) before the source sends more than BYTES in a UTC day (default for Gmail: 2,400 MB).")
@click.option("--max-connections", type=click.IntRange(min=1), metavar="N", help="Connections per account (a run uses one).")
@click.option("--gmail-include-trash-spam", is_flag=True, help="Gmail: back up Trash and Spam too.")
@output_options()
def backup_command(
    source: str | None,
    archive: str | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    login: Login,
    tls: Tls,
    into: str | None,
    delete: bool,
    delete_older_than: float | None,
    config_path: Path | None,
    account_names: tuple[str, ...],
    all_accounts: bool,
    jobs: int,
    no_index: bool,
    retries: int,
    batch_messages: int,
    blobs: str | None,
    s3_endpoint: str | None,
    max_rate: float | None,
    max_bytes_per_day: int | None,
    max_connections: int | None,
    gmail_include_trash_spam: bool,
    out: Output,
) -> None:
    """Back up SOURCE into ARCHIVE, or configured accounts with --account/--all.

    SOURCE is imaps://user@host or imap://user@host (STARTTLS required), or
    pop3s://user@host or pop3://user@host (STLS required) for a POP3 maildrop,
    which is left on the server unless --delete or --delete-older-than says otherwise.

    ARCHIVE is maildir:DIR, mbox:DIR, a path ending in .sqlite or .db, or a
    SQLAlchemy URL such as postgresql://user@host/db.
    """
    if account_names or all_accounts:
        if source or archive:
            fail(UsageError("give SOURCE ARCHIVE or --account/--all, not both"), out.json)
        backup_configured(config_path, account_names, all_accounts, jobs, out)
        return
    if not (source and archive):
        fail(UsageError("give SOURCE and ARCHIVE, or --account NAME / --all with a config file"), out.json)
    options = BackupOptions(
        include=include,
        exclude=exclude,
        no_tls=tls.no_tls,
        ca_file=tls.ca_file,
        timeout=tls.timeout,
        batch_messages=batch_messages,
        into=into,
        delete=delete,
        delete_older_than=delete_older_than,
        auth=login.auth,
        index=not no_index,
        retries=retries,
        admin_user=login.admin_user,
        blobs=bucket(blobs, s3_endpoint),
        max_rate=max_rate,
        max_bytes_per_day=max_bytes_per_day,
        max_connections=max_connections,
        gmail_trash_and_spam=gmail_include_trash_spam,
    )
    bars = bars_for(out)

    def action() -> Summary:
        secret = secret_for(login, source, "the source")
        try:
            return backup(source, archive, password=secret, options=options, progress=bars)
        finally:
            bars.close()

    summary: Summary = run(out.json, action)
    show_summary(summary, out)
    finish(summary.ok)


def show_summary(summary: Summary, out: Output) -> None:
    if out.json:
        click.echo(json.dumps(summary.as_dict()))
    elif not out.quiet:
        print_summary(summary)
    else:
        for folder, item in summary.failed:
            click.echo(f"failed {folder}: {item}", err=True)


def backup_configured(config_path: Path | None, names: tuple[str, ...], every: bool, jobs: int, out: Output) -> None:
    from .. import config
    from ..accounts import backup_accounts

    accounts = run(out.json, lambda: config.load(config_path))
    unknown = [n for n in names if n not in accounts]
    if unknown:
        fail(ConfigError(f"no account {', '.join(unknown)} in the config (have: {', '.join(accounts)})"), out.json)
    chosen = list(accounts.values()) if every else [accounts[n] for n in names]
    outcomes = run(out.json, lambda: backup_accounts(chosen, jobs))
    codes = []
    report: dict[str, object] = {}
    for name, outcome in outcomes.items():
        if isinstance(outcome, MailbackupError):
            codes.append(outcome.exit_code)
            report[name] = {"ok": False, "error": message(outcome), "exit_code": outcome.exit_code}
            click.echo(f"mailbackup: {name}: error: {message(outcome)}", err=True)
            continue
        codes.append(0 if outcome.ok else PartialFailure.exit_code)
        report[name] = outcome.as_dict()
        if not out.json and not out.quiet:
            click.echo(f"[{name}] ", nl=False)
            print_summary(outcome)
    if out.json:
        click.echo(json.dumps({"ok": not any(codes), "accounts": report}))
    sys.exit(max(codes, default=0))


@main.command("prune-server")
@passphrase_options()
@click.argument("source")
@click.argument("archive")
@click.option("--older-than", "older_than", required=True, metavar="AGE", help="Only messages older than AGE: 365d, 52w, 1y.")
@click.option("--yes", is_flag=True, help="Really delete. Without it, only show what would go.")
@folder_options
@click.option("--into", metavar="NAME", help="POP3: the archive folder holding the maildrop (default INBOX).")
@login_options()
@tls_options()
@output_options("Print the report as one JSON object on stdout.")
def prune_server_command(
    source: str,
    archive: str,
    older_than: str,
    yes: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    into: str | None,
    login: Login,
    tls: Tls,
    out: Output,
) -> None:
    """Delete from SOURCE the old messages that ARCHIVE holds and verifies.

    A dry run unless --yes. Each candidate must be in the archive with bytes
    that re-hash to its recorded SHA-256; one failed check and nothing in that
    folder is deleted. Messages the archive lacks are never touched.
    """
    from ..prune import PruneReport, parse_age, prune_server

    options = BackupOptions(
        include=include, exclude=exclude, into=into, no_tls=tls.no_tls, ca_file=tls.ca_file, timeout=tls.timeout,
        auth=login.auth, admin_user=login.admin_user,
    )

    def action() -> PruneReport:
        days = parse_age(older_than)
        secret = secret_for(login, source, "the source")
        return prune_server(source, archive, password=secret, older_than_days=days, act=yes, options=options)

    report: PruneReport = run(out.json, action)
    if out.json:
        click.echo(json.dumps(report.as_dict()))
    else:
        verb = "would delete" if report.dry_run else "deleted"
        for f in report.folders:
            if f.refused:
                click.echo(f"{f.name}: nothing deleted: {f.refused}", err=True)
                continue
            count = f.candidates if report.dry_run else f.deleted
            line = f"{f.name}: {verb} {count} messages ({human_bytes(f.bytes)}) older than {report.cutoff[:10]}"
            if f.not_archived:
                line += f"; {f.not_archived} old messages are not in the archive and stay"
            if not out.quiet or f.deleted:
                click.echo(line)
        if report.dry_run and not out.quiet:
            click.echo("dry run: nothing was deleted; add --yes to delete")
    finish(report.ok)


@main.command("login")
@click.argument("account_name", metavar="ACCOUNT")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="Config file (default ~/.config/mailbackup/config.toml).")
@click.option("--device", is_flag=True, help="Sign in on another device: print a URL and a code (no browser here).")
def login_command(account_name: str, config_path: Path | None, device: bool) -> None:
    """Sign ACCOUNT in with OAuth2 (its oauth2 = {...} table) and keep the refresh token.

    Later runs of that account get a fresh access token by themselves.
    """
    from .. import config, oauth

    settings = run(False, lambda: config.oauth2_settings(config_path, account_name))
    where = run(False, lambda: oauth.login(settings, device=device, say=lambda line: click.echo(line, err=True)))
    click.echo(f"signed in; the refresh token is in {where}", err=True)


@main.command("token")
@click.argument("account_name", metavar="ACCOUNT")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="Config file (default ~/.config/mailbackup/config.toml).")
def token_command(account_name: str, config_path: Path | None) -> None:
    """Print a fresh OAuth2 access token for ACCOUNT (for --oauth2-token-command)."""
    from .. import config, oauth

    settings = run(False, lambda: config.oauth2_settings(config_path, account_name))
    click.echo(run(False, lambda: oauth.access_token(settings)))


