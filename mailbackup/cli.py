"""Command line: parse options, call the library, draw progress, map errors to exit codes."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from .credentials import Login, resolve_secret
from .errors import ConfigError, MailbackupError, PartialFailure, UsageError
from .model import FolderReport, Summary
from .pipeline import BackupOptions, Progress, backup

# Commands import what only they need when they run: a rerun of `backup` with nothing
# new must not pay for the config file reader (OAuth, its journal), several accounts'
# process pool, prune, restore or the progress bars it is told not to draw (-q).
# keys and the stores load SQLAlchemy, which a rerun with nothing new never needs (rerun.py).
if TYPE_CHECKING:
    from tqdm import tqdm

    from . import keys
    from .stores.blobs import Bucket

log = logging.getLogger("mailbackup")


def human_bytes(size: float) -> str:
    """SI units, as the progress bars show them."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


# Option groups: each is declared once and used by every command that needs it.
# A group collects its options into one value (a Login, a Tls, an Output).


@dataclass(frozen=True)
class Tls:
    ca_file: str | None
    no_tls: bool
    timeout: float


@dataclass(frozen=True)
class Output:
    json: bool
    verbose: int
    quiet: bool


def _group(dest: str, names: list[str], build: Callable[..., Any], options: list[Callable[..., Any]]) -> Callable[..., Any]:
    """A decorator that adds options and hands the command one `dest` value built from them."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(**kwargs: Any) -> Any:
            kwargs[dest] = build(**{name: kwargs.pop(name) for name in names})
            return function(**kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


def login_options(prefix: str = "", what: str = "the server", env: str = "MAILBACKUP_PASSWORD") -> Callable[..., Any]:
    """--password-file, --password-command, --oauth2-token-command, --oauth2-mechanism (as `login`).

    With prefix "target-", the twins for a second server (as `target_login`).
    """
    key = prefix.replace("-", "_")
    names = [
        f"{key}password_file",
        f"{key}password_command",
        f"{key}oauth2_token_command",
        f"{key}oauth2_mechanism",
        f"{key}admin_user",
    ]

    def build(**values: Any) -> Login:
        return Login(
            password_file=values[names[0]],
            password_command=values[names[1]],
            password_env=env,
            oauth2_token_command=values[names[2]],
            oauth2_mechanism=values[names[3]],
            admin_user=values[names[4]],
        )

    return _group(f"{key}login", names, build, [
        click.option(f"--{prefix}password-file", names[0], type=click.Path(dir_okay=False),
                     help=f"Read the password of {what} from this file."),
        click.option(f"--{prefix}password-command", names[1], metavar="CMD",
                     help=f"Run CMD and use its output as the password of {what}."),
        click.option(f"--{prefix}oauth2-token-command", names[2], metavar="CMD",
                     help=f"Log in to {what} with OAuth2: CMD prints an access token."),
        click.option(f"--{prefix}oauth2-mechanism", names[3], type=click.Choice(["xoauth2", "oauthbearer"]),
                     default="xoauth2", show_default=True, help=f"SASL mechanism for OAuth2 logins to {what}."),
        click.option(f"--{prefix}admin-user", names[4], metavar="NAME",
                     help=f"Log in to {what} as this administrator (SASL PLAIN) for the URL's user; "
                     "the password options give the admin's password."),
    ])


def tls_options(prefix: str = "", what: str = "the server") -> Callable[..., Any]:
    """--ca-file, --no-tls, --timeout (as `tls`; `target_tls` with prefix "target-")."""
    key = prefix.replace("-", "_")
    names = [f"{key}ca_file", f"{key}no_tls", f"{key}timeout"]
    return _group(f"{key}tls", names, lambda **v: Tls(v[names[0]], v[names[1]], v[names[2]]), [
        click.option(f"--{prefix}ca-file", names[0], type=click.Path(dir_okay=False),
                     help=f"Also trust this CA (PEM) for the certificate of {what}."),
        click.option(f"--{prefix}no-tls", names[1], is_flag=True,
                     help=f"Allow cleartext to {what} (no STARTTLS). Unsafe."),
        click.option(f"--{prefix}timeout", names[2], type=click.FloatRange(min=1), default=120.0, show_default=True,
                     help=f"Seconds to wait for {what}: connect, TLS, greeting and every read."),
    ])


def passphrase_options(create: bool = False) -> Callable[..., Any]:
    """--passphrase-file, --passphrase-command, --identity-file for an encrypted archive
    (MAILBACKUP_PASSPHRASE or a prompt otherwise); with create, also --encrypt, --compress
    and --recipient for a new one. The command runs with these as its key source (keys.using).
    """
    names = ["passphrase_file", "passphrase_command", "identity_file"] + (["encrypt", "compress", "recipient"] if create else [])
    options = [
        click.option("--passphrase-file", type=click.Path(dir_okay=False), help="Read the archive passphrase from this file."),
        click.option("--passphrase-command", metavar="CMD", help="Run CMD and use its output as the archive passphrase."),
        click.option("--identity-file", type=click.Path(dir_okay=False),
                     help="age identity file that opens an archive encrypted to a public key."),
    ]
    if create:
        options += [
            click.option("--encrypt", is_flag=True, help="Encrypt a new SQL archive (zstd, then AES-256-GCM) under a passphrase."),
            click.option("--compress", is_flag=True, help="Compress a new SQL archive with zstd (implied by --encrypt)."),
            click.option("--recipient", multiple=True, metavar="KEY|FILE",
                         help="Encrypt a new SQL archive to this age public key (or a file of them): "
                              "this machine can append but not read (repeatable)."),
        ]

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            if not any(values.values()) and not sys.stdin.isatty():
                # What key_source would build is then the library's default: no need to load keys.
                return function(**kwargs)
            from . import keys

            source = key_source(values)
            with keys.using(source):
                return function(**kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


def key_source(values: dict[str, Any], new: Login | None = None) -> keys.KeySource:
    from . import keys

    recipients = run(False, lambda: keys.recipients_from(tuple(values.get("recipient") or ())))
    protection = keys.Protection(
        encrypt=bool(values.get("encrypt")) or bool(recipients), compress=bool(values.get("compress")), recipients=recipients
    )
    return keys.KeySource(
        passphrase=Login(password_file=values["passphrase_file"], password_command=values["passphrase_command"],
                         password_env="MAILBACKUP_PASSPHRASE"),
        prompt=passphrase_prompt("Archive passphrase", confirm=protection.encrypt),
        identity_file=values["identity_file"],
        new_passphrase=new,
        new_prompt=passphrase_prompt("New archive passphrase", confirm=True) if new is not None else None,
        protection=protection,
    )


def passphrase_prompt(text: str, confirm: bool) -> Callable[[], str] | None:
    """Ask on the terminal, or None without one (then the library says which options give it)."""
    if not sys.stdin.isatty():
        return None
    return lambda: str(click.prompt(text, hide_input=True, confirmation_prompt=confirm, err=True))


def folder_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """--folder and --exclude (as `include`, `exclude`)."""
    function = click.option("--exclude", multiple=True, metavar="GLOB", help="Skip matching folders (repeatable).")(function)
    return click.option("--folder", "include", multiple=True, metavar="GLOB", help="Only matching folders (repeatable).")(function)


def output_options(json_help: str = "Print the summary as one JSON object on stdout.") -> Callable[..., Any]:
    """--json, -v, -q (as `out`); sets up logging before the command runs."""

    def build(json_output: bool, verbose: int, quiet: bool) -> Output:
        setup_logging(verbose, quiet)
        return Output(json_output, verbose, quiet)

    return _group("out", ["json_output", "verbose", "quiet"], build, [
        click.option("--json", "json_output", is_flag=True, help=json_help),
        click.option("-v", "--verbose", count=True, help="More detail: a line per folder (-vv for debug)."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars or summary, errors only."),
    ])


def prompt_for(url: str, login: Login, prefix: str = "") -> Callable[[], str]:
    """Ask on the terminal; without one, say which options give a password."""

    def prompt() -> str:
        if not sys.stdin.isatty():
            raise UsageError(
                f"no password for {url}: use --{prefix}password-file, --{prefix}password-command "
                f"or {login.password_env} (no terminal to ask on)"
            )
        return str(click.prompt(f"Password for {url}", hide_input=True, err=True))

    return prompt


def secret_for(login: Login, url: str, what: str, prefix: str = "") -> str:
    return resolve_secret(login, what=what, prompt=prompt_for(url, login, prefix))


class Bars(Progress):
    """tqdm bars for messages and bytes, in total and for the folder at hand; a line per folder at -v."""

    def __init__(self, enabled: bool, verbose: int = 0) -> None:
        self.enabled = enabled
        self.verbose = verbose
        self.total_messages: tqdm | None = None
        self.total_bytes: tqdm | None = None
        self.folder_messages: tqdm | None = None
        self.folder_bytes: tqdm | None = None

    def plan(self, folders: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        # Totals grow as each folder says what it has to do: the percentage and ETA cover what is known.
        self.total_messages = tqdm(desc="all folders", total=0, unit="msg", position=0, dynamic_ncols=True)
        self.total_bytes = tqdm(desc="all folders", total=0, unit="B", unit_scale=True, position=1, dynamic_ncols=True)

    def folder_started(self, name: str, messages: int, size: int | None) -> None:
        for bar, amount in ((self.total_messages, messages), (self.total_bytes, size)):
            if bar is not None and amount:
                bar.total = (bar.total or 0) + amount
                bar.refresh()
        if not self.enabled:
            return
        from tqdm import tqdm

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
        if self.verbose and report.name:
            from tqdm import tqdm

            tqdm.write(folder_line(report), file=sys.stderr)

    def close(self) -> None:
        for bar in (self.folder_messages, self.folder_bytes, self.total_messages, self.total_bytes):
            if bar is not None:
                bar.close()
        self.folder_messages = self.folder_bytes = self.total_messages = self.total_bytes = None


def folder_line(report: FolderReport) -> str:
    """The -v line for one folder: name, new messages, bytes, time."""
    parts = [f"{report.new} new", human_bytes(report.bytes), f"{report.elapsed:.1f} s"]
    for count, what in ((report.flags_updated, "flag updates"), (report.gone, "gone"), (len(report.failed), "failed")):
        if count:
            parts.append(f"{count} {what}")
    if report.skipped:
        parts.append(f"skipped: {report.skipped}")
    return f"{report.name}: " + ", ".join(parts)


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


# Library settings whose option has another name; the rest are --name-with-dashes.
OPTION_NAMES = {"include": "--folder", "recipients": "--to", "sender": "--from", "rate_per_minute": "--rate",
                "reconnects": "--retries"}


def option_name(setting: str, role: str) -> str:
    """The command-line option for a library setting; migrate's target has --target- twins."""
    name = OPTION_NAMES.get(setting, "--" + setting.replace("_", "-"))
    context = click.get_current_context(silent=True)
    if role == "target" and context is not None and context.info_name == "migrate" and name in TWINNED:
        return "--target-" + name[2:]
    return name


TWINNED = {"--password-file", "--password-command", "--oauth2-token-command", "--oauth2-mechanism", "--admin-user",
           "--ca-file", "--no-tls", "--timeout"}


def message(error: MailbackupError) -> str:
    return error.render(lambda setting: option_name(setting, error.role))


def fail(error: MailbackupError, json_output: bool) -> NoReturn:
    """A one-line message on stderr (and a JSON object with --json), then the error's exit code."""
    text = message(error)
    if json_output:
        click.echo(json.dumps({"ok": False, "error": text, "exit_code": error.exit_code}))
    click.echo(f"mailbackup: error: {text}", err=True)
    sys.exit(error.exit_code)


def finish(ok: bool) -> NoReturn:
    """Exit 0, or PartialFailure's code once the failures are listed (the one place for partial runs)."""
    if ok:
        sys.exit(0)
    click.echo(f"mailbackup: error: {PartialFailure()}", err=True)
    sys.exit(PartialFailure.exit_code)


def run(json_output: bool, action: Callable[[], Any]) -> Any:
    """Call the library; turn its errors into a one-line message and an exit code."""
    try:
        return action()
    except MailbackupError as exc:
        fail(exc, json_output)
    except KeyboardInterrupt:
        click.echo("mailbackup: interrupted; what was committed stays, rerun to finish", err=True)
        sys.exit(130)


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mailbackup: %(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    # imapclient logs under its own name, which has no handler: LOGIN arguments never show.


def bucket(url: str | None, endpoint: str | None) -> Bucket | None:
    """--blobs and --s3-endpoint as one value (the stores package loads only when given)."""
    if not url:
        return None
    from .stores.blobs import Bucket

    return Bucket(url, endpoint)


def bars_for(out: Output, *, dry_run: bool = False) -> Bars:
    return Bars(enabled=not out.quiet and not out.json and not dry_run and sys.stderr.isatty(), verbose=out.verbose)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mailbackup")
def main() -> None:
    """Faithful, incremental backups of IMAP and POP3 mailboxes."""
    from .malloc import one_arena

    one_arena()  # before any thread starts: peak RSS stays flat (see malloc.py)


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
    from . import config
    from .accounts import backup_accounts

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
    from .prune import PruneReport, parse_age, prune_server

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
    from . import config, oauth

    settings = run(False, lambda: config.oauth2_settings(config_path, account_name))
    where = run(False, lambda: oauth.login(settings, device=device, say=lambda line: click.echo(line, err=True)))
    click.echo(f"signed in; the refresh token is in {where}", err=True)


@main.command("token")
@click.argument("account_name", metavar="ACCOUNT")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="Config file (default ~/.config/mailbackup/config.toml).")
def token_command(account_name: str, config_path: Path | None) -> None:
    """Print a fresh OAuth2 access token for ACCOUNT (for --oauth2-token-command)."""
    from . import config, oauth

    settings = run(False, lambda: config.oauth2_settings(config_path, account_name))
    click.echo(run(False, lambda: oauth.access_token(settings)))


MAILBOX_HELP = "The account (USER@HOST) to read, in an archive that holds several."


@main.command("ls")
@passphrase_options()
@click.argument("archive")
@click.option("--mailbox", metavar="USER@HOST", help="Only this account, in an archive that holds several.")
@click.option("--as-of", "as_of", metavar="DATE", help="The archive as it stood then: YYYY-MM-DD (end of that day) or YYYY-MM-DDTHH:MM[:SS][+HH:MM]; local time.")
@click.option("--json", "json_output", is_flag=True, help="One JSON object per folder.")
def ls_command(archive: str, mailbox: str | None, as_of: str | None, json_output: bool) -> None:
    """List the folders in ARCHIVE with message counts and sizes (per account, if it holds several)."""
    from .restore import parse_as_of
    from .show import FolderListing, listing

    rows: list[FolderListing] = run(
        json_output, lambda: listing(archive, mailbox=mailbox, as_of=parse_as_of(as_of) if as_of else None)
    )
    accounts = sorted({r.account for r in rows})
    if json_output:
        for r in rows:
            click.echo(json.dumps({"account": r.account, "folder": r.folder.name, "messages": r.messages, "bytes": r.bytes, "gone": r.gone}))
        return
    width = max([len(r.folder.name) for r in rows] + [6])
    for account in accounts:
        if len(accounts) > 1 or account:
            click.echo(f"account {account or '(not yet named)'}")
        mine = [r for r in rows if r.account == account]
        click.echo(f"{'FOLDER':<{width}}  {'MESSAGES':>8}  {'SIZE':>9}  {'GONE':>5}")
        for r in mine:
            click.echo(f"{r.folder.name:<{width}}  {r.messages:>8}  {human_bytes(r.bytes):>9}  {r.gone:>5}")
        click.echo(
            f"{'total':<{width}}  {sum(r.messages for r in mine):>8}  {human_bytes(sum(r.bytes for r in mine)):>9}  "
            f"{sum(r.gone for r in mine):>5}"
        )
    if not rows:
        click.echo(f"{'FOLDER':<{width}}  {'MESSAGES':>8}  {'SIZE':>9}  {'GONE':>5}")
        click.echo(f"{'total':<{width}}  {0:>8}  {human_bytes(0):>9}  {0:>5}")


@main.command("serve")
@passphrase_options()
@click.argument("archive")
@click.option("--imap", "imap_address", metavar="HOST:PORT", help="Serve the archive read-only over IMAP here (e.g. 127.0.0.1:1143).")
@click.option("--web", "web", metavar="HOST:PORT", help="Serve the web viewer here (loopback only by default; port 0 picks one).")
@click.option("--web-allow-remote", is_flag=True, help="Allow --web on an address beyond loopback (no TLS: a warning is printed).")
@click.option("--user", metavar="NAME", help="IMAP: the one login name (default: the archive's account user name).")
@click.option("--password-file", type=click.Path(dir_okay=False), help="IMAP: clients log in with the password in this file.")
@click.option("--password-command", metavar="CMD", help="IMAP: clients log in with the password CMD prints.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), help="IMAP: TLS certificate (PEM): offers STARTTLS, and allows a non-loopback address.")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), help="IMAP: private key of --tls-cert (if not in the same file).")
@click.option("--implicit-tls", is_flag=True, help="IMAP: TLS from the first byte (imaps) instead of STARTTLS.")
@click.option("--include-gone", is_flag=True, help="IMAP: also show messages gone from the server, in folders Gone/<folder>.")
@click.option("--mailbox", metavar="USER@HOST", help="IMAP: the account to serve, in an archive that holds several.")
def serve_command(
    archive: str, imap_address: str | None, web: str | None, web_allow_remote: bool, user: str | None,
    password_file: str | None, password_command: str | None, tls_cert: str | None, tls_key: str | None,
    implicit_tls: bool, include_gone: bool, mailbox: str | None,
) -> None:
    """Open ARCHIVE read-only without restoring it: --imap for mail clients, --web for a browser (Ctrl-C stops).

    The web viewer prints a URL with a random access token. The archive never changes.
    An encrypted archive is unlocked once, before anything listens.
    """
    import threading

    if not imap_address and not web:
        fail(UsageError("say what to serve: --imap HOST:PORT and/or --web HOST:PORT, e.g. --web 127.0.0.1:8025"), False)

    def start() -> Any:
        from .serve import ServeSettings, default_user, parse_address, start_imap

        address = parse_address(imap_address or "")
        login = Login(password_file=password_file, password_command=password_command)
        password = secret_for(login, f"mailbackup serve {archive}", "the served archive")
        settings = ServeSettings(
            archive=archive, user=user or default_user(archive, mailbox), password=password, mailbox=mailbox,
            tls_cert=tls_cert, tls_key=tls_key, implicit_tls=implicit_tls, include_gone=include_gone,
        )
        server = start_imap(address, settings)
        click.echo(f"serving {archive} read-only over IMAP at {address[0]}:{server.port} as user {settings.user}", err=True)
        return server

    def announce(url: str) -> None:
        click.echo(f"mailbackup: web viewer at {url}  (Ctrl-C stops it)")

    import signal

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # systemctl stop and kill end the server as Ctrl-C does

    signal.signal(signal.SIGTERM, stop)
    server = run(False, start) if imap_address else None
    try:
        if web:
            from .web import serve_web

            run(False, lambda: serve_web(archive, web, allow_remote=web_allow_remote, announce=announce,
                                         warn=lambda line: click.echo(f"mailbackup: {line}", err=True)))
        else:
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


@main.command("repair")
@passphrase_options()
@click.argument("archive")
@click.option("--mailbox", metavar="USER@HOST", help="The account that gets recovered messages, in an archive that holds several.")
@click.option("--json", "json_output", is_flag=True, help="The summary as one JSON object.")
def repair_command(archive: str, mailbox: str | None, json_output: bool) -> None:
    """Rebuild a lost or damaged catalog of ARCHIVE from the messages its store holds.

    A damaged catalog file is renamed, not deleted. UIDs cannot come back: the next
    backup recognises each message by SHA-256 and stores nothing twice.
    """
    from .repair import RepairSummary, repair

    summary: RepairSummary = run(json_output, lambda: repair(archive, mailbox=mailbox))
    if json_output:
        click.echo(json.dumps(summary.as_dict()))
        return
    if summary.set_aside:
        click.echo(f"the damaged catalog was moved to {summary.set_aside}")
    click.echo(f"{summary.messages} messages ({human_bytes(summary.bytes)}) in {summary.folders} folders "
               f"put back into the catalog in {summary.elapsed:.1f} s")


# verify, search, reindex, show, export
@main.command("verify")
@passphrase_options()
@click.argument("archive")
@click.option("--against", "source", metavar="SOURCE", help="Also compare with the live IMAP server (imaps://user@host).")
@click.option("--sample", type=click.FloatRange(0, 100, min_open=True), default=100.0, show_default=True, metavar="PERCENT",
              help="With --against: compare the bytes of this share of the messages.")
@folder_options
@login_options(what="the --against server")
@tls_options(what="the --against server")
@output_options("One JSON object per problem, then a summary object.")
@click.option("--mailbox", metavar="USER@HOST", help=MAILBOX_HELP)
def verify_command(
    archive: str,
    mailbox: str | None,
    source: str | None,
    sample: float,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    login: Login,
    tls: Tls,
    out: Output,
) -> None:
    """Re-hash every message in ARCHIVE against its catalog; list missing, corrupted and unrecorded ones.

    With --against SOURCE, also compare each folder with the server: UIDVALIDITY,
    UIDs both ways, and the SHA-256 of every message (or of a --sample). Exit code 1
    when anything differs.
    """
    from .errors import VerifyFailed
    from .verify import AgainstOptions, Problem, VerifySummary, verify

    def report(problem: Problem) -> None:
        if out.json:
            click.echo(json.dumps(problem.as_dict()))
        else:
            where = f"{problem.folder}: " if problem.folder else ""
            ident = f" [id {problem.entry_id}]" if problem.entry_id is not None else ""
            click.echo(f"{problem.kind:<13} {where}{problem.detail}{ident}")

    def action() -> VerifySummary:
        against = None
        if source:
            password = secret_for(login, source, "the --against server")
            against = AgainstOptions(
                source, password, sample, include, exclude, tls.no_tls, tls.ca_file, tls.timeout, auth=login.auth,
                admin_user=login.admin_user,
            )
        elif include or exclude or sample != 100.0:
            raise UsageError("--sample, --folder and --exclude go with --against SOURCE")
        return verify(archive, report=report, against=against, mailbox=mailbox)

    summary: VerifySummary = run(out.json, action)
    if out.json:
        click.echo(json.dumps(summary.as_dict()))
    elif not out.quiet:
        compared = f", {summary.compared} compared with the server" if source else ""
        click.echo(f"{summary.checked} messages ({human_bytes(summary.bytes)}) re-hashed{compared} in {summary.elapsed:.1f} s")
    if not summary.ok:
        counts = ", ".join(f"{count} {kind}" for kind, count in sorted(summary.problems.items()))
        click.echo(f"mailbackup: error: {VerifyFailed(f'verify found problems: {counts}')}", err=True)
        sys.exit(VerifyFailed.exit_code)


@main.command("search")
@passphrase_options()
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
@click.option("--mailbox", metavar="USER@HOST", help=MAILBOX_HELP)
def search_command(
    archive: str,
    mailbox: str | None,
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
        for hit in search(archive, filters, mailbox=mailbox):
            if json_output:
                click.echo(json.dumps(hit.as_dict()))
            else:
                date = (hit.date or "")[:16].replace("T", " ")
                gone = " (gone)" if hit.gone else ""
                click.echo(f"{date:<16}  {hit.sender[:30]:<30}  {hit.subject[:50]:<50}  {hit.folder}{gone}  {hit.id}")

    run(json_output, action)


@main.command("reindex")
@passphrase_options()
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
@passphrase_options()
@click.argument("archive")
@click.argument("ident", metavar="ID")
@click.option("--eml", type=click.Path(dir_okay=False), help="Write the message to this file (mode 0600) instead of stdout.")
@click.option("--mailbox", metavar="USER@HOST", help=MAILBOX_HELP)
def show_command(archive: str, ident: str, eml: str | None, mailbox: str | None) -> None:
    """Print a message's original bytes: ID is an id from 'search' or a SHA-256 prefix."""
    from .show import show, write_eml

    shown = run(False, lambda: show(archive, ident, mailbox=mailbox))
    if eml:
        run(False, lambda: write_eml(eml, shown.raw))
        click.echo(f"wrote {human_bytes(len(shown.raw))} from {shown.folder} to {eml}", err=True)
        return
    out = sys.stdout.buffer
    out.write(shown.raw)
    out.flush()


@main.command("export")
@passphrase_options(create=True)
@click.argument("archive")
@click.argument("destination")
@click.option("--json", "json_output", is_flag=True, help="The summary as one JSON object.")
@click.option("--mailbox", metavar="USER@HOST", help=MAILBOX_HELP)
def export_command(archive: str, destination: str, json_output: bool, mailbox: str | None) -> None:
    """Copy ARCHIVE into a new archive DESTINATION of any kind, catalog included.

    DESTINATION is maildir:DIR, mbox:DIR, a .sqlite path or a SQLAlchemy URL. The
    copy keeps UIDs, UIDVALIDITY, flags, dates and gone state, so a backup into it
    fetches nothing it already holds.
    """
    from .export import ExportSummary, export

    summary: ExportSummary = run(json_output, lambda: export(archive, destination, mailbox=mailbox))
    if json_output:
        click.echo(json.dumps(summary.as_dict()))
    else:
        click.echo(f"{summary.messages} messages ({human_bytes(summary.bytes)}) in {summary.folders} folders "
                   f"copied to {summary.destination} in {summary.elapsed:.1f} s")


@main.group("key")
def key_group() -> None:
    """Manage the passphrase slots of an encrypted archive; no message is touched."""


def new_passphrase_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """--new-passphrase-file, --new-passphrase-command (as `new`; MAILBACKUP_NEW_PASSPHRASE or a prompt otherwise)."""
    names = ["new_passphrase_file", "new_passphrase_command"]
    build = lambda **v: Login(password_file=v[names[0]], password_command=v[names[1]],  # noqa: E731
                              password_env="MAILBACKUP_NEW_PASSPHRASE")
    return _group("new", names, build, [
        click.option("--new-passphrase-file", names[0], type=click.Path(dir_okay=False), help="Read the new passphrase from this file."),
        click.option("--new-passphrase-command", names[1], metavar="CMD", help="Run CMD and use its output as the new passphrase."),
    ])(function)


def with_new(new: Login, action: Callable[[], Any]) -> Any:
    """Run action with the command's key source extended by the new passphrase."""
    from . import keys

    source = replace(keys.current(), new_passphrase=new, new_prompt=passphrase_prompt("New archive passphrase", confirm=True))
    with keys.using(source):
        return run(False, action)


def manage_slots(archive: str, action: Callable[[Any, str], Any]) -> Any:
    from .key_admin import manage  # the store modules load only for key commands

    return manage(archive, action)


@key_group.command("list")
@passphrase_options()
@click.argument("archive")
@click.option("--json", "json_output", is_flag=True, help="One JSON object per slot.")
def key_list_command(archive: str, json_output: bool) -> None:
    """List the key slots of ARCHIVE (no passphrase needed: slots hold no secret in clear)."""
    from . import keys

    slots: list[keys.Slot] = run(json_output, lambda: manage_slots(archive, keys.list_slots))
    for slot in slots:
        if json_output:
            click.echo(json.dumps(slot.as_dict()))
        else:
            click.echo(f"{slot.id:>4}  {slot.kind:<10}  {slot.created_at}  {slot.params}")


@key_group.command("add")
@passphrase_options()
@new_passphrase_options
@click.argument("archive")
def key_add_command(archive: str, new: Login) -> None:
    """Add a slot for a new passphrase to ARCHIVE; the current one keeps working."""
    from . import keys

    slot = with_new(new, lambda: manage_slots(archive, lambda e, w: keys.add_slot(e, keys.current(), w)))
    click.echo(f"added key slot {slot}")


@key_group.command("change")
@passphrase_options()
@new_passphrase_options
@click.argument("archive")
def key_change_command(archive: str, new: Login) -> None:
    """Replace the slot the current passphrase opens by one for the new passphrase."""
    from . import keys

    slot = with_new(new, lambda: manage_slots(archive, lambda e, w: keys.change_slot(e, keys.current(), w)))
    click.echo(f"passphrase changed (now key slot {slot})")


@key_group.command("remove")
@passphrase_options()
@click.argument("archive")
@click.argument("slot_id", metavar="SLOT", type=int)
def key_remove_command(archive: str, slot_id: int) -> None:
    """Remove key slot SLOT (an id from 'key list'); never the last one."""
    from . import keys

    run(False, lambda: manage_slots(archive, lambda e, w: keys.remove_slot(e, keys.current(), w, slot_id)))
    click.echo(f"removed key slot {slot_id}")


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


def transfer_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by restore and migrate."""
    for option in reversed(
        [
            folder_options,
            click.option("--into", metavar="PREFIX", help="Put everything under this folder ('/'-separated)."),
            click.option("--no-automap", is_flag=True, help="Keep literal names; don't map \\Sent, \\Trash... by role."),
            click.option("--dry-run", is_flag=True, help="Print the plan and change nothing."),
            click.option("--batch-messages", type=click.IntRange(1, 10000), default=100, hidden=True),
            click.option("--force", is_flag=True, help="Check every message on the target by Message-ID and size (or hash) instead of trusting the journal."),
            click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True,
                         help="Give up after this many reconnects in a row that made no progress."),
            output_options(),
        ]
    ):
        function = option(function)
    return function


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
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    into: str | None,
    no_automap: bool,
    dry_run: bool,
    batch_messages: int,
    force: bool,
    retries: int,
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
    from .restore import RestoreOptions, parse_as_of, restore

    bars = bars_for(out, dry_run=dry_run)

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
            no_tls=tls.no_tls,
            ca_file=tls.ca_file,
            timeout=tls.timeout,
            batch_messages=batch_messages,
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
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    into: str | None,
    no_automap: bool,
    dry_run: bool,
    batch_messages: int,
    force: bool,
    retries: int,
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
    from .restore import RestoreOptions, migrate

    bars = bars_for(out, dry_run=dry_run)

    def action() -> Any:
        options = RestoreOptions(
            include=include,
            exclude=exclude,
            into=into,
            automap=not no_automap,
            dry_run=dry_run,
            force=force,
            reconnects=retries,
            no_tls=target_tls.no_tls,
            ca_file=target_tls.ca_file,
            timeout=target_tls.timeout,
            source_no_tls=tls.no_tls,
            source_ca_file=tls.ca_file,
            source_timeout=tls.timeout,
            batch_messages=batch_messages,
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


def queue_api() -> Any:
    """mailbackup.queue, or a clear error when procrastinate is not installed."""
    try:
        from . import queue
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
