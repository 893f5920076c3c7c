"""Command line: parse options, call the library, draw progress, map errors to exit codes."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from tqdm import tqdm

from . import config
from .accounts import backup_accounts
from .credentials import resolve_password, run_command
from .errors import ConfigError, MailbackupError, UsageError
from .model import FolderReport, Summary
from .pipeline import BackupOptions, Progress, archive_stats, backup
from .prune import PruneReport, parse_age, prune_server

log = logging.getLogger("mailbackup")


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


class Bars(Progress):
    """tqdm bars for messages and bytes, in total and for the folder at hand."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.total_messages: tqdm | None = None
        self.total_bytes: tqdm | None = None
        self.folder_messages: tqdm | None = None
        self.folder_bytes: tqdm | None = None

    def plan(self, folders: int) -> None:
        if not self.enabled:
            return
        self.total_messages = tqdm(desc="all folders", unit="msg", position=0, dynamic_ncols=True)
        self.total_bytes = tqdm(desc="all folders", unit="B", unit_scale=True, position=1, dynamic_ncols=True)

    def folder_started(self, name: str, messages: int, size: int | None) -> None:
        if not self.enabled:
            return
        self.folder_messages = tqdm(total=messages, desc=name[:30], unit="msg", position=2, leave=False)
        self.folder_bytes = tqdm(total=size, desc=name[:30], unit="B", unit_scale=True, position=3, leave=False)

    def stored(self, messages: int, size: int) -> None:
        for bar, amount in (
            (self.total_messages, messages),
            (self.total_bytes, size),
            (self.folder_messages, messages),
            (self.folder_bytes, size),
        ):
            if bar is not None:
                bar.update(amount)

    def folder_done(self, report: FolderReport) -> None:
        for bar in (self.folder_messages, self.folder_bytes):
            if bar is not None:
                bar.close()
        self.folder_messages = self.folder_bytes = None

    def close(self) -> None:
        self.folder_done(FolderReport(name=""))
        for bar in (self.total_messages, self.total_bytes):
            if bar is not None:
                bar.close()


def print_summary(summary: Summary) -> None:
    info = summary.as_dict()
    click.echo(
        f"{summary.new} new messages ({human_bytes(summary.bytes)}) from {len(summary.folders)} folders "
        f"in {summary.elapsed:.1f} s; {info['flags_updated']} flag updates, {info['gone']} gone from the server"
        + (f", {info['deleted']} deleted from the server" if info["deleted"] else "")
    )
    for report in summary.folders:
        if report.skipped:
            click.echo(f"skipped {report.name}: {report.skipped}")
        for note in report.notes:
            click.echo(f"note: {note}")
        if report.adopted:
            click.echo(f"{report.name}: {report.adopted} messages recognised by SHA-256, not stored again")
    for folder, item in summary.failed:
        click.echo(f"failed {folder}: {item}", err=True)


def fail(error: MailbackupError, json_output: bool) -> NoReturn:
    """A one-line message on stderr (and a JSON object with --json), then the error's exit code."""
    if json_output:
        click.echo(json.dumps({"ok": False, "error": str(error), "exit_code": error.exit_code}))
    click.echo(f"mailbackup: error: {error}", err=True)
    sys.exit(error.exit_code)


def run(json_output: bool, action: Callable[[], Any]) -> Any:
    """Call the library; turn its errors into a one-line message and an exit code."""
    try:
        return action()
    except MailbackupError as exc:
        fail(exc, json_output)
    except KeyboardInterrupt:
        click.echo("mailbackup: interrupted; rerun to finish", err=True)
        sys.exit(130)


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mailbackup: %(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    # imapclient logs under its own name, which has no handler: LOGIN arguments never show.


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mailbackup")
def main() -> None:
    """Faithful, incremental backups of IMAP and POP3 mailboxes."""


@main.command("backup")
@click.argument("source", required=False)
@click.argument("archive", required=False)
@click.option("--folder", "include", multiple=True, metavar="GLOB", help="Back up only matching folders (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip matching folders (repeatable).")
@click.option("--password-file", type=click.Path(dir_okay=False), help="Read the password from this file.")
@click.option("--password-command", metavar="CMD", help="Run CMD and use its output as the password.")
@click.option("--oauth2-token-command", metavar="CMD", help="Log in with OAuth2: CMD prints an access token.")
@click.option("--oauth2-mechanism", type=click.Choice(["xoauth2", "oauthbearer"]), default="xoauth2", show_default=True)
@click.option("--ca-file", type=click.Path(dir_okay=False), help="Also trust this CA (PEM) for the server's certificate.")
@click.option("--no-tls", is_flag=True, help="Allow cleartext on imap:// (no STARTTLS). Unsafe.")
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True, help="Network read timeout, seconds.")
@click.option("--into", metavar="NAME", help="POP3: archive folder for the maildrop (default INBOX).")
@click.option("--delete", is_flag=True, help="POP3: delete from the server what is safely archived.")
@click.option("--delete-older-than", type=float, metavar="DAYS", help="POP3: delete archived messages first downloaded DAYS ago or more.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="Config file (default ~/.config/mailbackup/config.toml).")
@click.option("--account", "account_names", multiple=True, metavar="NAME", help="Back up this configured account (repeatable).")
@click.option("--all", "all_accounts", is_flag=True, help="Back up every configured account.")
@click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True, help="Accounts backed up in parallel processes.")
@click.option("--no-index", is_flag=True, help="Do not update the search index (mailbackup reindex catches up).")
@click.option("--retries", type=click.IntRange(0, 100), default=3, show_default=True, help="Reconnect this often after a dropped connection.")
@click.option("--batch-messages", type=click.IntRange(1, 10000), default=200, hidden=True)
@click.option("--json", "json_output", is_flag=True, help="Print the summary as one JSON object on stdout.")
@click.option("-v", "--verbose", count=True, help="More detail (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or summary, errors only.")
def backup_command(
    source: str | None,
    archive: str | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    password_file: str | None,
    password_command: str | None,
    oauth2_token_command: str | None,
    oauth2_mechanism: str,
    ca_file: str | None,
    no_tls: bool,
    timeout: float,
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
    json_output: bool,
    verbose: int,
    quiet: bool,
) -> None:
    """Back up SOURCE into ARCHIVE, or configured accounts with --account/--all.

    SOURCE is imaps://user@host or imap://user@host (STARTTLS required), or
    pop3s://user@host or pop3://user@host (STLS required) for a POP3 maildrop,
    which is left on the server unless --delete or --delete-older-than says otherwise.

    ARCHIVE is maildir:DIR, mbox:DIR, a path ending in .sqlite or .db, or a
    SQLAlchemy URL such as postgresql://user@host/db.
    """
    setup_logging(verbose, quiet)
    if account_names or all_accounts:
        if source or archive:
            fail(UsageError("give SOURCE ARCHIVE or --account/--all, not both"), json_output)
        backup_configured(config_path, account_names, all_accounts, jobs, json_output, quiet)
        return
    if not (source and archive):
        fail(UsageError("give SOURCE and ARCHIVE, or --account NAME / --all with a config file"), json_output)
    options = BackupOptions(
        include=include,
        exclude=exclude,
        no_tls=no_tls,
        ca_file=ca_file,
        timeout=timeout,
        batch_messages=batch_messages,
        into=into,
        delete=delete,
        delete_older_than=delete_older_than,
        auth=oauth2_mechanism if oauth2_token_command else "password",
        index=not no_index,
        retries=retries,
    )
    bars = Bars(enabled=not quiet and not json_output and sys.stderr.isatty())

    def prompt() -> str:
        if not sys.stdin.isatty():
            raise UsageError("no password: use --password-file, --password-command or MAILBACKUP_PASSWORD")
        return str(click.prompt(f"Password for {source}", hide_input=True, err=True))

    def action() -> Summary:
        if oauth2_token_command:
            secret = run_command(oauth2_token_command, "--oauth2-token-command")
        else:
            secret = resolve_password(file=password_file, command=password_command, prompt=prompt)
        try:
            return backup(source, archive, password=secret, options=options, progress=bars)
        finally:
            bars.close()

    summary: Summary = run(json_output, action)
    show_summary(summary, json_output, quiet)
    sys.exit(0 if summary.ok else 1)


def show_summary(summary: Summary, json_output: bool, quiet: bool) -> None:
    if json_output:
        click.echo(json.dumps(summary.as_dict()))
    elif not quiet:
        print_summary(summary)
    else:
        for folder, item in summary.failed:
            click.echo(f"failed {folder}: {item}", err=True)


def backup_configured(
    config_path: Path | None, names: tuple[str, ...], every: bool, jobs: int, json_output: bool, quiet: bool
) -> None:
    accounts = run(json_output, lambda: config.load(config_path))
    unknown = [n for n in names if n not in accounts]
    if unknown:
        fail(ConfigError(f"no account {', '.join(unknown)} in the config (have: {', '.join(accounts)})"), json_output)
    chosen = list(accounts.values()) if every else [accounts[n] for n in names]
    outcomes = run(json_output, lambda: backup_accounts(chosen, jobs))
    codes = []
    report: dict[str, object] = {}
    for name, outcome in outcomes.items():
        if isinstance(outcome, MailbackupError):
            codes.append(outcome.exit_code)
            report[name] = {"ok": False, "error": str(outcome), "exit_code": outcome.exit_code}
            click.echo(f"mailbackup: {name}: error: {outcome}", err=True)
            continue
        codes.append(0 if outcome.ok else 1)
        report[name] = outcome.as_dict()
        if not json_output and not quiet:
            click.echo(f"[{name}] ", nl=False)
            print_summary(outcome)
    if json_output:
        click.echo(json.dumps({"ok": not any(codes), "accounts": report}))
    sys.exit(max(codes, default=0))


@main.command("prune-server")
@click.argument("source")
@click.argument("archive")
@click.option("--older-than", "older_than", required=True, metavar="AGE", help="Only messages older than AGE: 365d, 52w, 1y.")
@click.option("--yes", is_flag=True, help="Really delete. Without it, only show what would go.")
@click.option("--folder", "include", multiple=True, metavar="GLOB", help="IMAP: only matching folders (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="IMAP: skip matching folders (repeatable).")
@click.option("--into", metavar="NAME", help="POP3: the archive folder holding the maildrop (default INBOX).")
@click.option("--password-file", type=click.Path(dir_okay=False), help="Read the password from this file.")
@click.option("--password-command", metavar="CMD", help="Run CMD and use its output as the password.")
@click.option("--oauth2-token-command", metavar="CMD", help="Log in with OAuth2: CMD prints an access token.")
@click.option("--oauth2-mechanism", type=click.Choice(["xoauth2", "oauthbearer"]), default="xoauth2", show_default=True)
@click.option("--ca-file", type=click.Path(dir_okay=False), help="Also trust this CA (PEM) for the server's certificate.")
@click.option("--no-tls", is_flag=True, help="Allow cleartext (no STARTTLS). Unsafe.")
@click.option("--json", "json_output", is_flag=True, help="Print the report as one JSON object on stdout.")
def prune_server_command(
    source: str,
    archive: str,
    older_than: str,
    yes: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    into: str | None,
    password_file: str | None,
    password_command: str | None,
    oauth2_token_command: str | None,
    oauth2_mechanism: str,
    ca_file: str | None,
    no_tls: bool,
    json_output: bool,
) -> None:
    """Delete from SOURCE the old messages that ARCHIVE holds and verifies.

    A dry run unless --yes. Each candidate must be in the archive with bytes
    that re-hash to its recorded SHA-256; one failed check and nothing in that
    folder is deleted. Messages the archive lacks are never touched.
    """
    setup_logging(0, False)
    options = BackupOptions(
        include=include, exclude=exclude, into=into, no_tls=no_tls, ca_file=ca_file,
        auth=oauth2_mechanism if oauth2_token_command else "password",
    )

    def action() -> PruneReport:
        days = parse_age(older_than)
        if oauth2_token_command:
            secret = run_command(oauth2_token_command, "--oauth2-token-command")
        else:
            secret = resolve_password(file=password_file, command=password_command)
        return prune_server(source, archive, password=secret, older_than_days=days, act=yes, options=options)

    report: PruneReport = run(json_output, action)
    if json_output:
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
            click.echo(line)
        if report.dry_run:
            click.echo("dry run: nothing was deleted; add --yes to delete")
    sys.exit(0 if report.ok else 1)


@main.command("ls")
@click.argument("archive")
@click.option("--json", "json_output", is_flag=True, help="One JSON object per folder.")
def ls_command(archive: str, json_output: bool) -> None:
    """List the folders in ARCHIVE with message counts and sizes."""
    rows = run(json_output, lambda: archive_stats(archive))
    if json_output:
        for folder, count, size, gone in rows:
            click.echo(json.dumps({"folder": folder.name, "messages": count, "bytes": size, "gone": gone}))
        return
    width = max([len(f.name) for f, *_ in rows] + [6])
    click.echo(f"{'FOLDER':<{width}}  {'MESSAGES':>8}  {'SIZE':>9}  {'GONE':>5}")
    for folder, count, size, gone in rows:
        click.echo(f"{folder.name:<{width}}  {count:>8}  {human_bytes(size):>9}  {gone:>5}")
    click.echo(f"{'total':<{width}}  {sum(r[1] for r in rows):>8}  {human_bytes(sum(r[2] for r in rows)):>9}  {sum(r[3] for r in rows):>5}")


# verify, search, reindex, show, export (issue 5)


@main.command("verify")
@click.argument("archive")
@click.option("--against", "source", metavar="SOURCE", help="Also compare with the live IMAP server (imaps://user@host).")
@click.option("--sample", type=click.FloatRange(0, 100, min_open=True), default=100.0, show_default=True, metavar="PERCENT",
              help="With --against: compare the bytes of this share of the messages.")
@click.option("--folder", "include", multiple=True, metavar="GLOB", help="With --against: only matching folders (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="With --against: skip matching folders (repeatable).")
@click.option("--password-file", type=click.Path(dir_okay=False), help="Read the password from this file.")
@click.option("--password-command", metavar="CMD", help="Run CMD and use its output as the password.")
@click.option("--ca-file", type=click.Path(dir_okay=False), help="Also trust this CA (PEM) for the server's certificate.")
@click.option("--no-tls", is_flag=True, help="Allow cleartext on imap:// (no STARTTLS). Unsafe.")
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True, help="Network read timeout, seconds.")
@click.option("--json", "json_output", is_flag=True, help="One JSON object per problem, then a summary object.")
@click.option("-v", "--verbose", count=True, help="More detail (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only the problems, no summary.")
def verify_command(
    archive: str,
    source: str | None,
    sample: float,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    password_file: str | None,
    password_command: str | None,
    ca_file: str | None,
    no_tls: bool,
    timeout: float,
    json_output: bool,
    verbose: int,
    quiet: bool,
) -> None:
    """Re-hash every message in ARCHIVE against its catalog; list missing, corrupted and unrecorded ones.

    With --against SOURCE, also compare each folder with the server: UIDVALIDITY,
    UIDs both ways, and the SHA-256 of every message (or of a --sample). Exit code 1
    when anything differs.
    """
    from .errors import VerifyFailed
    from .verify import AgainstOptions, Problem, VerifySummary, verify

    setup_logging(verbose, quiet)

    def report(problem: Problem) -> None:
        if json_output:
            click.echo(json.dumps(problem.as_dict()))
        else:
            where = f"{problem.folder}: " if problem.folder else ""
            ident = f" [id {problem.entry_id}]" if problem.entry_id is not None else ""
            click.echo(f"{problem.kind:<13} {where}{problem.detail}{ident}")

    def action() -> VerifySummary:
        against = None
        if source:
            def prompt() -> str:
                if not sys.stdin.isatty():
                    raise UsageError("no password: use --password-file, --password-command or MAILBACKUP_PASSWORD")
                return str(click.prompt(f"Password for {source}", hide_input=True, err=True))

            password = resolve_password(file=password_file, command=password_command, prompt=prompt)
            against = AgainstOptions(source, password, sample, include, exclude, no_tls, ca_file, timeout)
        elif include or exclude or sample != 100.0:
            raise UsageError("--sample, --folder and --exclude go with --against SOURCE")
        return verify(archive, report=report, against=against)

    summary: VerifySummary = run(json_output, action)
    if json_output:
        click.echo(json.dumps(summary.as_dict()))
    elif not quiet:
        compared = f", {summary.compared} compared with the server" if source else ""
        click.echo(f"{summary.checked} messages ({human_bytes(summary.bytes)}) re-hashed{compared} in {summary.elapsed:.1f} s")
    if not summary.ok:
        counts = ", ".join(f"{count} {kind}" for kind, count in sorted(summary.problems.items()))
        click.echo(f"mailbackup: error: {VerifyFailed(f'verify found problems: {counts}')}", err=True)
        sys.exit(VerifyFailed.exit_code)


@main.command("search")
@click.argument("archive")
@click.argument("query", nargs=-1)
@click.option("--from", "sender", metavar="TEXT", help="From: contains these words.")
@click.option("--to", "recipient", metavar="TEXT", help="To:, Cc: or Bcc: contains these words.")
@click.option("--subject", metavar="TEXT", help="Subject: contains these words.")
@click.option("--since", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]), help="Sent on or after (UTC).")
@click.option("--before", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]), help="Sent before (UTC).")
@click.option("--folder", metavar="NAME", help="Only this folder (the server's name).")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many hits.")
@click.option("--json", "json_output", is_flag=True, help="One JSON object per hit.")
def search_command(
    archive: str,
    query: tuple[str, ...],
    sender: str | None,
    recipient: str | None,
    subject: str | None,
    since: Any,
    before: Any,
    folder: str | None,
    limit: int | None,
    json_output: bool,
) -> None:
    """Full-text search over headers and text bodies in ARCHIVE, newest first.

    Every word of QUERY must match (a trailing * matches a prefix). Each hit prints
    date, from, subject, folder and the id that 'mailbackup show' takes. Needs a
    SQLite catalog (Maildir, mbox or .sqlite archives); see 'mailbackup reindex'.
    """
    from .search import Filters, search

    filters = Filters(" ".join(query), sender, recipient, subject, since, before, folder, limit)

    def action() -> None:
        for hit in search(archive, filters):
            if json_output:
                click.echo(json.dumps(hit.as_dict()))
            else:
                date = (hit.date or "")[:16].replace("T", " ")
                gone = " (gone)" if hit.gone else ""
                click.echo(f"{date:<16}  {hit.sender[:30]:<30}  {hit.subject[:50]:<50}  {hit.folder}{gone}  {hit.id}")

    run(json_output, action)


@main.command("reindex")
@click.argument("archive")
@click.option("--rebuild", is_flag=True, help="Drop the search index and build it from scratch.")
@click.option("--json", "json_output", is_flag=True, help="The summary as one JSON object.")
def reindex_command(archive: str, rebuild: bool, json_output: bool) -> None:
    """Build or catch up the search index of ARCHIVE."""
    from .search import ReindexSummary, reindex

    summary: ReindexSummary = run(json_output, lambda: reindex(archive, rebuild=rebuild))
    if json_output:
        click.echo(json.dumps({"archive": summary.archive, "indexed": summary.indexed,
                               "failed": list(summary.failed), "elapsed": round(summary.elapsed, 3)}))
    else:
        click.echo(f"{summary.indexed} messages indexed in {summary.elapsed:.1f} s")
        for item in summary.failed:
            click.echo(f"failed {item}", err=True)
    sys.exit(1 if summary.failed else 0)


@main.command("show")
@click.argument("archive")
@click.argument("ident", metavar="ID")
@click.option("--eml", type=click.Path(dir_okay=False), help="Write the message to this file (mode 0600) instead of stdout.")
def show_command(archive: str, ident: str, eml: str | None) -> None:
    """Print a message's original bytes: ID is an id from 'search' or a SHA-256 prefix."""
    from .show import show, write_eml

    shown = run(False, lambda: show(archive, ident))
    if eml:
        run(False, lambda: write_eml(eml, shown.raw))
        click.echo(f"wrote {human_bytes(len(shown.raw))} from {shown.folder} to {eml}", err=True)
        return
    out = sys.stdout.buffer
    out.write(shown.raw)
    out.flush()


@main.command("export")
@click.argument("archive")
@click.argument("destination")
@click.option("--json", "json_output", is_flag=True, help="The summary as one JSON object.")
def export_command(archive: str, destination: str, json_output: bool) -> None:
    """Copy ARCHIVE into a new archive DESTINATION of any kind, catalog included.

    DESTINATION is maildir:DIR, mbox:DIR, a .sqlite path or a SQLAlchemy URL. The
    copy keeps UIDs, UIDVALIDITY, flags, dates and gone state, so a backup into it
    fetches nothing it already holds.
    """
    from .export import ExportSummary, export

    summary: ExportSummary = run(json_output, lambda: export(archive, destination))
    if json_output:
        click.echo(json.dumps(summary.as_dict()))
    else:
        click.echo(f"{summary.messages} messages ({human_bytes(summary.bytes)}) in {summary.folders} folders "
                   f"copied to {summary.destination} in {summary.elapsed:.1f} s")


# restore and migrate

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


def secret(
    file: str | None, command: str | None, token_command: str | None, url: str, what: str, env: str = "MAILBACKUP_PASSWORD"
) -> str:
    """An OAuth2 access token when a token command is given, else the password."""
    if token_command:
        return run_command(token_command, f"OAuth2 token command for {what}")
    return resolve_password(file=file, command=command, env=env, prompt=password_prompt(url), what=what)


def password_prompt(url: str) -> Callable[[], str]:
    def prompt() -> str:
        if not sys.stdin.isatty():
            raise UsageError(f"no password for {url}: use a password file, a password command or the environment")
        return str(click.prompt(f"Password for {url}", hide_input=True, err=True))

    return prompt


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


def finish_transfer(summary: Any, verb: str, json_output: bool, quiet: bool) -> None:
    if json_output:
        click.echo(json.dumps(summary.as_dict()))
    elif not quiet:
        print_transfer(summary, verb)
    else:
        for folder, item in summary.failed:
            click.echo(f"failed {folder}: {item}", err=True)
    sys.exit(0 if summary.ok else 1)


def transfer_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by restore and migrate."""
    for option in reversed(
        [
            click.option("--folder", "include", multiple=True, metavar="GLOB", help="Only matching folders (repeatable)."),
            click.option("--exclude", multiple=True, metavar="GLOB", help="Skip matching folders (repeatable)."),
            click.option("--into", metavar="PREFIX", help="Put everything under this folder ('/'-separated)."),
            click.option("--no-automap", is_flag=True, help="Keep literal names; don't map \\Sent, \\Trash... by role."),
            click.option("--dry-run", is_flag=True, help="Print the plan and change nothing."),
            click.option("--ca-file", type=click.Path(dir_okay=False), help="Also trust this CA (PEM)."),
            click.option("--no-tls", is_flag=True, help="Allow cleartext on imap:// or smtp:// (no STARTTLS). Unsafe."),
            click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True, help="Network read timeout, seconds."),
            click.option("--batch-messages", type=click.IntRange(1, 10000), default=100, hidden=True),
            click.option("--force", is_flag=True, help="Check every message on the target by Message-ID and size (or hash) instead of trusting the journal."),
            click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True, help="Reconnects to a dropped server without progress in between, with backoff."),
            click.option("--json", "json_output", is_flag=True, help="Print the summary as one JSON object on stdout."),
            click.option("-v", "--verbose", count=True, help="More detail (-vv for debug)."),
            click.option("-q", "--quiet", is_flag=True, help="No progress bars or summary, errors only."),
        ]
    ):
        function = option(function)
    return function


@main.command("restore")
@click.argument("archive")
@click.argument("target")
@transfer_options
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d"]), help="Only messages dated on or after YYYY-MM-DD.")
@click.option("--before", type=click.DateTime(formats=["%Y-%m-%d"]), help="Only messages dated before YYYY-MM-DD.")
@click.option("--include-gone", is_flag=True, help="Also restore messages that were gone from the server at backup time.")
@click.option("--as-of", metavar="DATE", help="The mailbox as it stood then: YYYY-MM-DD (end of that day) or YYYY-MM-DDTHH:MM[:SS][+HH:MM]; local time.")
@click.option("--state", type=click.Path(dir_okay=False), help="Journal database (default: $XDG_STATE_HOME/mailbackup/restore.sqlite).")
@click.option("--password-file", type=click.Path(dir_okay=False), help="Read the target's password from this file.")
@click.option("--password-command", metavar="CMD", help="Run CMD and use its output as the target's password.")
@click.option("--to", "recipients", multiple=True, metavar="ADDRESS", help="SMTP: a recipient (required, repeatable).")
@click.option("--from", "sender", metavar="ADDRESS", help="SMTP: the envelope sender (default: the login if it is an address).")
@click.option("--resent", is_flag=True, help="SMTP: add Resent-From/To/Date/Message-ID headers.")
@click.option("--rate", metavar="N/min", help="SMTP: send at most N messages per minute (or N/s, N/h).")
@click.option("--oauth2-token-command", metavar="CMD", help="Log in to the target with OAuth2: CMD prints an access token.")
@click.option("--oauth2-mechanism", type=click.Choice(["xoauth2", "oauthbearer"]), default="xoauth2", show_default=True)
def restore_command(
    archive: str,
    target: str,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    into: str | None,
    no_automap: bool,
    dry_run: bool,
    ca_file: str | None,
    no_tls: bool,
    timeout: float,
    batch_messages: int,
    force: bool,
    retries: int,
    json_output: bool,
    verbose: int,
    quiet: bool,
    since: Any,
    before: Any,
    include_gone: bool,
    as_of: str | None,
    state: str | None,
    password_file: str | None,
    password_command: str | None,
    recipients: tuple[str, ...],
    sender: str | None,
    resent: bool,
    rate: str | None,
    oauth2_token_command: str | None,
    oauth2_mechanism: str,
) -> None:
    """Put the messages of ARCHIVE back on TARGET.

    TARGET is imaps://user@host or imap://user@host (APPEND, flags, dates and
    folders kept), or smtps://user@host[:465] or smtp://user@host[:587] (resend
    to the --to addresses, bytes as archived). Reruns resume; nothing is sent twice.
    """
    setup_logging(verbose, quiet)
    from .restore import RestoreOptions, parse_as_of, restore

    bars = Bars(enabled=not quiet and not json_output and not dry_run and sys.stderr.isatty())

    def action() -> Any:
        options = RestoreOptions(
            include=include,
            exclude=exclude,
            since=since.date() if since else None,
            before=before.date() if before else None,
            include_gone=include_gone,
            as_of=parse_as_of(as_of) if as_of is not None else None,
            into=into,
            automap=not no_automap,
            dry_run=dry_run,
            force=force,
            reconnects=retries,
            no_tls=no_tls,
            ca_file=ca_file,
            timeout=timeout,
            batch_messages=batch_messages,
            recipients=tuple(check_address(a, "--to") for a in recipients),
            sender=check_address(sender, "--from") if sender is not None else None,
            resent=resent,
            rate_per_minute=parse_rate(rate),
            auth=oauth2_mechanism if oauth2_token_command else "password",
        )
        password = secret(password_file, password_command, oauth2_token_command, target, "the target")
        try:
            return restore(archive, target, password=password, options=options, state=state, progress=bars)
        finally:
            bars.close()

    summary = run(json_output, action)
    finish_transfer(summary, "sent" if target.lower().startswith("smtp") else "restored", json_output, quiet)


@main.command("migrate")
@click.argument("source")
@click.argument("target")
@transfer_options
@click.option("--state", type=click.Path(dir_okay=False), help="State database (default: $XDG_STATE_HOME/mailbackup/migrate.sqlite).")
@click.option("--password-file", type=click.Path(dir_okay=False), help="Read the source's password from this file.")
@click.option("--password-command", metavar="CMD", help="Run CMD and use its output as the source's password.")
@click.option("--target-password-file", type=click.Path(dir_okay=False), help="Read the target's password from this file.")
@click.option("--target-password-command", metavar="CMD", help="Run CMD and use its output as the target's password.")
@click.option("--oauth2-token-command", metavar="CMD", help="Log in to the source with OAuth2: CMD prints an access token.")
@click.option("--target-oauth2-token-command", metavar="CMD", help="Log in to the target with OAuth2.")
@click.option("--oauth2-mechanism", type=click.Choice(["xoauth2", "oauthbearer"]), default="xoauth2", show_default=True)
def migrate_command(
    source: str,
    target: str,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    into: str | None,
    no_automap: bool,
    dry_run: bool,
    ca_file: str | None,
    no_tls: bool,
    timeout: float,
    batch_messages: int,
    force: bool,
    retries: int,
    json_output: bool,
    verbose: int,
    quiet: bool,
    state: str | None,
    password_file: str | None,
    password_command: str | None,
    target_password_file: str | None,
    target_password_command: str | None,
    oauth2_token_command: str | None,
    target_oauth2_token_command: str | None,
    oauth2_mechanism: str,
) -> None:
    """Copy the IMAP account SOURCE to the IMAP account TARGET, folder by folder.

    Incremental: a rerun copies only new messages and carries flag changes over.
    The source password comes from --password-file, --password-command or
    MAILBACKUP_PASSWORD; the target's from --target-password-file,
    --target-password-command or MAILBACKUP_TARGET_PASSWORD.
    """
    setup_logging(verbose, quiet)
    from .restore import RestoreOptions, migrate

    bars = Bars(enabled=not quiet and not json_output and not dry_run and sys.stderr.isatty())

    def action() -> Any:
        options = RestoreOptions(
            include=include,
            exclude=exclude,
            into=into,
            automap=not no_automap,
            dry_run=dry_run,
            force=force,
            reconnects=retries,
            no_tls=no_tls,
            ca_file=ca_file,
            timeout=timeout,
            batch_messages=batch_messages,
            source_auth=oauth2_mechanism if oauth2_token_command else "password",
            auth=oauth2_mechanism if target_oauth2_token_command else "password",
        )
        password = secret(password_file, password_command, oauth2_token_command, source, "the source")
        target_password = secret(
            target_password_file, target_password_command, target_oauth2_token_command, target, "the target",
            env="MAILBACKUP_TARGET_PASSWORD",
        )
        try:
            return migrate(
                source, target, password=password, target_password=target_password, state=state, options=options, progress=bars
            )
        finally:
            bars.close()

    summary = run(json_output, action)
    finish_transfer(summary, "copied", json_output, quiet)
