"""Commands that read an archive: ls, serve, repair, verify, search, reindex, show, export."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..credentials import Login
from ..errors import UsageError
from .app import (
    MAILBOX_HELP,
    Output,
    Tls,
    fail,
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


@main.command("ls")
@passphrase_options()
@click.argument("archive")
@click.option("--mailbox", metavar="USER@HOST", help="Only this account, in an archive that holds several.")
@click.option("--as-of", "as_of", metavar="DATE", help="The archive as it stood then: YYYY-MM-DD (end of that day) or YYYY-MM-DDTHH:MM[:SS][+HH:MM]; local time.")
@click.option("--json", "json_output", is_flag=True, help="One JSON object per folder.")
def ls_command(archive: str, mailbox: str | None, as_of: str | None, json_output: bool) -> None:
    """List the folders in ARCHIVE with message counts and sizes (per account, if it holds several)."""
    from ..restore import parse_as_of
    from ..show import FolderListing, listing

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
        from ..serve import ServeSettings, default_user, parse_address, start_imap

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
            from ..web import serve_web

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
    from ..repair import RepairSummary, repair

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
    from ..errors import VerifyFailed
    from ..verify import AgainstOptions, Problem, VerifySummary, verify

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
    from ..search import Filters, search, unindexed

    filters = Filters(" ".join(query), sender, recipient, subject, since, before, folder, limit)

    def action() -> None:
        for hit in search(archive, filters, mailbox=mailbox):
            if json_output:
                click.echo(json.dumps(hit.as_dict()))
            else:
                date = (hit.date or "")[:16].replace("T", " ")
                gone = " (gone)" if hit.gone else ""
                click.echo(f"{date:<16}  {hit.sender[:30]:<30}  {hit.subject[:50]:<50}  {hit.folder}{gone}  {hit.id}")
        # A search that cannot see everything says so, rather than look complete.
        missing = unindexed(archive, mailbox=mailbox)
        if missing:
            are = "message is" if missing == 1 else "messages are"
            click.echo(f"mailbackup: note: {missing} {are} not in the search index yet; 'mailbackup reindex {archive}' adds them", err=True)

    run(json_output, action)


@main.command("reindex")
@passphrase_options()
@click.argument("archive")
@click.option("--rebuild", is_flag=True, help="Drop the search index and build it from scratch.")
@click.option("--json", "json_output", is_flag=True, help="The summary as one JSON object.")
def reindex_command(archive: str, rebuild: bool, json_output: bool) -> None:
    """Build or catch up the search index of ARCHIVE."""
    from ..search import ReindexSummary, reindex

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
    from ..show import show, write_eml

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
    from ..export import ExportSummary, export

    summary: ExportSummary = run(json_output, lambda: export(archive, destination, mailbox=mailbox))
    if json_output:
        click.echo(json.dumps(summary.as_dict()))
    else:
        click.echo(f"{summary.messages} messages ({human_bytes(summary.bytes)}) in {summary.folders} folders "
                   f"copied to {summary.destination} in {summary.elapsed:.1f} s")


