"""The command group and what every command shares: option groups, progress bars, summaries, exit codes."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ..credentials import Login, resolve_secret
from ..errors import MailbackupError, PartialFailure, UsageError
from ..model import FolderReport, Summary
from ..pipeline import Progress

# Commands import what only they need when they run: a rerun of `backup` with nothing
# new must not pay for the config file reader (OAuth, its journal), several accounts'
# process pool, prune, restore or the progress bars it is told not to draw (-q).
# keys and the stores load SQLAlchemy, which a rerun with nothing new never needs (rerun.py).
if TYPE_CHECKING:
    from tqdm import tqdm

    from .. import keys
    from ..stores.blobs import Bucket

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
            from .. import keys

            source = key_source(values)
            with keys.using(source):
                return function(**kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


def key_source(values: dict[str, Any], new: Login | None = None) -> keys.KeySource:
    from .. import keys

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
    from ..stores.blobs import Bucket

    return Bucket(url, endpoint)


def bars_for(out: Output, *, dry_run: bool = False) -> Bars:
    return Bars(enabled=not out.quiet and not out.json and not dry_run and sys.stderr.isatty(), verbose=out.verbose)


MAILBOX_HELP = "The account (USER@HOST) to read, in an archive that holds several."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mailbackup")
def main() -> None:
    """Faithful, incremental backups of IMAP and POP3 mailboxes."""
    from ..malloc import one_arena

    one_arena()  # before any thread starts: peak RSS stays flat (see malloc.py)


